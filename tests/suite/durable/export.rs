//! `entitled usage export`: the ledger filtered by event time across its segments.

use serde_json::{Value, json};

use super::{assert_well_formed, consume, export, policy, serve, stop};

/// `usage export --since/--until` filter by event time (inclusive since, exclusive
/// until), across ledger segments.
#[test]
fn usage_export_filters_by_time() {
    let dir = policy();
    let state = tempfile::tempdir().expect("state tempdir");
    let mut s = serve(&dir, state.path(), &[]);
    consume(&s, "api.calls", 1); // 00:00
    s.decide("/v1/test-clock", &json!({"advance": "10m"}));
    consume(&s, "api.calls", 2); // 00:10
    s.decide("/v1/test-clock", &json!({"advance": "110m"}));
    consume(&s, "api.calls", 4); // 02:00, a new segment (past the 1h age)
    stop(&mut s);

    let amounts = |events: &[Value]| -> Vec<i64> {
        events
            .iter()
            .map(|e| e["data"]["amount"].as_i64().expect("amount"))
            .collect()
    };
    let all = export(state.path(), &[]);
    assert_well_formed(&all, state.path());
    assert_eq!(amounts(&all), [1, 2, 4]);
    let times: Vec<String> = all
        .iter()
        .map(|e| super::support::parse_time(&e["time"]).to_string())
        .collect();
    assert_eq!(
        times,
        [
            "2030-01-15T00:00:00Z",
            "2030-01-15T00:10:00Z",
            "2030-01-15T02:00:00Z"
        ]
    );
    let cases: &[(&[&str], &[i64])] = &[
        (&["--since", "2030-01-15T00:05:00Z"], &[2, 4]),
        (&["--since", "2030-01-15T00:10:00Z"], &[2, 4]),
        (&["--since", "2030-01-15T01:00:00Z"], &[4]),
        (&["--since", "2030-01-15T03:00:00Z"], &[]),
        (&["--until", "2030-01-15T00:10:00Z"], &[1]),
        (
            &[
                "--since",
                "2030-01-15T00:05:00Z",
                "--until",
                "2030-01-15T01:00:00Z",
            ],
            &[2],
        ),
        (&["--since", "2030-01-14"], &[1, 2, 4]),
    ];
    for (args, expect) in cases {
        assert_eq!(
            amounts(&export(state.path(), args)),
            *expect,
            "export {args:?}"
        );
    }
}
