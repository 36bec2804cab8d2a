//! The offline subcommands (`validate`, `check`, `test`, `report`) as a user runs
//! them: the real binary, its exit codes, its messages and its help.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use super::support::{PolicyDir, output_within};

const POLICY: &str = "features:\n  sso: { kind: flag }\n  audit.log: { kind: flag }\nplans:\n  pro:\n    grants: { sso: true }\ncustomers:\n  - id: acme\n    subscriptions:\n      - { plan: pro, starts: 2020-01-01 }\n";

fn entitled(cwd: &Path, args: &[&str]) -> Output {
    output_within(
        std::process::Command::new(env!("CARGO_BIN_EXE_entitled"))
            .current_dir(cwd)
            .env_remove("ENTITLED_POLICIES")
            .args(args),
        Duration::from_secs(30),
    )
}

fn code(o: &Output) -> Option<i32> {
    o.status.code()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `check` tells allowed (0), denied (1), a policy that does not load (2) and a
/// customer or feature the policy does not have (3) apart; a directory that cannot be
/// read is named without a made-up position.
#[test]
fn check_exit_codes_tell_denied_from_broken() {
    let dir = PolicyDir::with(&[("policy.yaml", POLICY)]);
    let d = dir.path().to_str().expect("UTF-8 path");
    let run = |customer: &str, feature: &str| {
        entitled(
            dir.path(),
            &[
                "check",
                d,
                "--customer",
                customer,
                "--feature",
                feature,
                "--json",
            ],
        )
    };
    assert_eq!(code(&run("acme", "sso")), Some(0));
    assert_eq!(code(&run("acme", "audit.log")), Some(1));
    assert_eq!(code(&run("nobody", "sso")), Some(3));
    assert_eq!(code(&run("acme", "no.such.feature")), Some(3));

    let missing = entitled(
        dir.path(),
        &[
            "check",
            "/nonexistent",
            "--customer",
            "acme",
            "--feature",
            "sso",
        ],
    );
    assert_eq!(code(&missing), Some(2), "{}", stderr(&missing));
    let err = stderr(&missing);
    assert!(
        err.contains("/nonexistent: cannot read policy directory"),
        "{err}"
    );
    assert!(
        !err.contains(":0:0"),
        "a path-level error shows a made-up position: {err}"
    );

    let broken = PolicyDir::with(&[("policy.yaml", "features:\n  sso: { kind: flg }\n")]);
    let b = broken.path().to_str().expect("UTF-8 path");
    let o = entitled(
        dir.path(),
        &["check", b, "--customer", "acme", "--feature", "sso"],
    );
    assert_eq!(code(&o), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("policy.yaml:2:"), "{}", stderr(&o));
    let usage = entitled(dir.path(), &["check", d, "--customer", "acme"]);
    assert_eq!(code(&usage), Some(2));
}

/// An empty or mistyped policy directory is refused by every offline command, saying
/// why, unless `--allow-empty` says it is intended.
#[test]
fn a_directory_without_features_is_refused_unless_allowed() {
    let empty = PolicyDir::new();
    let e = empty.path().to_str().expect("UTF-8 path");
    let v = entitled(empty.path(), &["validate", e]);
    assert_eq!(code(&v), Some(1), "{}", stderr(&v));
    let err = stderr(&v);
    assert!(
        err.contains("no policy files") && err.contains("--allow-empty"),
        "{err}"
    );
    assert!(!err.contains(":0:0"), "{err}");
    assert_eq!(
        code(&entitled(empty.path(), &["validate", e, "--allow-empty"])),
        Some(0)
    );
    let c = entitled(
        empty.path(),
        &["check", e, "--customer", "acme", "--feature", "sso"],
    );
    assert_eq!(code(&c), Some(2), "{}", stderr(&c));
    assert_eq!(code(&entitled(empty.path(), &["test", e])), Some(2));

    // Files, but none defines a feature (a customers file alone).
    let customers_only = PolicyDir::with(&[("customers.yaml", "customers: []\n")]);
    let p = customers_only.path().to_str().expect("UTF-8 path");
    let v = entitled(customers_only.path(), &["validate", p]);
    assert_eq!(code(&v), Some(1));
    assert!(
        stderr(&v).contains("1 policy file(s) but no `features`"),
        "{}",
        stderr(&v)
    );
}

/// `validate`, `check`, `test` and `report expiring` read `./policies` by default, as
/// `serve` does.
#[test]
fn offline_commands_default_to_the_policies_directory() {
    let work = PolicyDir::with(&[("policies/policy.yaml", POLICY)]);
    let v = entitled(work.path(), &["validate"]);
    assert_eq!(code(&v), Some(0), "{}", stderr(&v));
    assert!(String::from_utf8_lossy(&v.stdout).contains("ok: 2 features"));
    let c = entitled(
        work.path(),
        &["check", "--customer", "acme", "--feature", "sso"],
    );
    assert_eq!(code(&c), Some(0), "{}", stderr(&c));
    let r = entitled(work.path(), &["report", "expiring"]);
    assert_eq!(code(&r), Some(0), "{}", stderr(&r));
}

/// Every argument of `check` and `report expiring` says what it is, and the exit
/// codes are in the help.
#[test]
fn help_describes_every_argument_and_the_exit_codes() {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let help = |args: &[&str]| String::from_utf8_lossy(&entitled(here, args).stdout).into_owned();
    let check = help(&["check", "--help"]);
    let described = |help: &str, arg: &str, text: &str| {
        help.lines()
            .any(|l| l.trim_start().starts_with(arg) && l.contains(text))
    };
    for (arg, text) in [
        ("[DIR]", "The policy directory"),
        ("--customer <CUSTOMER>", "The customer id"),
        ("--feature <FEATURE>", "The feature asked about"),
    ] {
        assert!(
            described(&check, arg, text),
            "`check --help` does not describe {arg}:\n{check}"
        );
    }
    assert!(check.contains("3 check only"), "{check}");
    assert!(check.contains("[default: ./policies]"), "{check}");
    let report = help(&["report", "expiring", "--help"]);
    assert!(
        described(&report, "[DIR]", "The policy directory"),
        "{report}"
    );
    for cmd in ["validate", "test"] {
        let h = help(&[cmd, "--help"]);
        assert!(h.contains("[default: ./policies]"), "{h}");
    }
}
