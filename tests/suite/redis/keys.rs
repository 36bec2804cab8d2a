//! The Redis key encoding: length-prefixed keys that never collide, every key of a
//! customer under that customer's hash tag, and `--store-prefix` as a namespace.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::json;

use super::support::Redis;

use super::{
    PREFIX, consume, counter_key, decide, policy, replica, replica_here, serial, shared_used,
    shared_used_in, tag, used,
};

/// A key of the documented shape, taken apart.
#[derive(Debug)]
struct ParsedKey {
    tag: String,
    kind: String,
    /// The customer (length-prefixed part), or for a reservation its id.
    customer: Option<String>,
    name: Option<String>,
}

fn take_len_prefixed<'a>(s: &'a str, key: &str) -> (&'a str, &'a str) {
    let (len, rest) = s
        .split_once(':')
        .unwrap_or_else(|| panic!("no length in {key}"));
    let len: usize = len
        .parse()
        .unwrap_or_else(|_| panic!("bad length {len:?} in {key}"));
    assert!(rest.len() >= len, "{key}: part shorter than its length");
    let (part, rest) = rest.split_at(len);
    (part, rest.strip_prefix(':').unwrap_or(rest))
}

fn parse_key(prefix: &str, key: &str) -> ParsedKey {
    let rest = key
        .strip_prefix(prefix)
        .and_then(|r| r.strip_prefix(":{"))
        .unwrap_or_else(|| panic!("{key} does not start with {prefix}:{{"));
    let (tag, rest) = rest
        .split_once("}:")
        .unwrap_or_else(|| panic!("no tag in {key}"));
    assert!(
        tag.len() == 16 && tag.chars().all(|c| c.is_ascii_hexdigit()),
        "tag {tag:?} of {key}"
    );
    // The first `{…}` of the key is the tag: what Redis Cluster hashes.
    let open = key.find('{').expect("a brace");
    let close = open + key[open..].find('}').expect("a closing brace");
    assert_eq!(&key[open + 1..close], tag, "the cluster hash tag of {key}");
    let (kind, rest) = rest
        .split_once(':')
        .unwrap_or_else(|| panic!("no kind in {key}"));
    if kind == "r" || kind == "o" {
        return ParsedKey {
            tag: tag.to_string(),
            kind: kind.to_string(),
            customer: None,
            name: Some(rest.to_string()),
        };
    }
    let (customer, rest) = take_len_prefixed(rest, key);
    let (name, _) = take_len_prefixed(rest, key);
    ParsedKey {
        tag: tag.to_string(),
        kind: kind.to_string(),
        customer: Some(customer.to_string()),
        name: Some(name.to_string()),
    }
}

/// Customers and features chosen so that a naive `customer:feature` key collides
/// (`a:b`+`x` and `a`+`b:x`; `a:1`+`x` and `a`+`1:x`), and customers holding `{`/`}`:
/// every counter is its own (power-of-two amounts name each one), the keys have the
/// documented length-prefixed shape, and every key of one customer (counter, holds,
/// idempotency key, reservation, seat pool, rate limiter) carries that customer's
/// hash tag as its first `{…}`. Another `--store-prefix` is another namespace.
#[test]
fn keys_never_collide_and_share_the_customer_tag() {
    let _serial = serial();
    let redis = Redis::start();
    let dir = policy();
    let a = replica_here(&dir, &redis);
    let pairs = [
        ("a:b", "x"),
        ("a", "b:x"),
        ("a:1", "x"),
        ("a", "1:x"),
        ("a", "x"),
        ("{a}", "x"),
        ("}x{y", "x"),
        ("}x{y", "b:x"),
    ];
    for (i, (c, f)) in pairs.iter().enumerate() {
        let d = consume(&a, c, f, 1 << i);
        assert_eq!(d["allowed"], true, "{c} {f}: {d}");
    }
    for (i, (c, f)) in pairs.iter().enumerate() {
        assert_eq!(used(&a, c, f), 1 << i, "counter of {c:?} / {f:?}");
        assert_eq!(
            shared_used(&redis, c, f),
            1 << i,
            "{}",
            counter_key(PREFIX, c, f)
        );
    }
    // Every other kind of key, for the customers with braces (and one colon).
    let mut reservations = BTreeMap::new();
    for c in ["{a}", "}x{y", "a:b"] {
        let d = decide(
            &a,
            "/v1/consume",
            json!({"customer": c, "feature": "x", "amount": 1, "idempotency_key": "k:1"}),
        );
        assert_eq!(d["allowed"], true, "{d}");
        let d = decide(
            &a,
            "/v1/seats/acquire",
            json!({"customer": c, "feature": "seats", "holder": "h"}),
        );
        assert_eq!(d["allowed"], true, "{d}");
        let d = decide(
            &a,
            "/v1/consume",
            json!({"customer": c, "feature": "api.rate"}),
        );
        assert_eq!(d["allowed"], true, "{d}");
        let d = decide(
            &a,
            "/v1/reserve",
            json!({"customer": c, "feature": "b:x", "amount": 1, "ttl": "5m"}),
        );
        let id = d["reservation"].as_str().unwrap_or_else(|| panic!("{d}"));
        reservations.insert(id[4..].to_string(), c.to_string());
    }
    // The same idempotency key for two customers is two keys.
    assert_eq!(used(&a, "{a}", "x"), 32 + 1);
    assert_eq!(used(&a, "a:b", "x"), 1 + 1);

    let scan = redis.cli(&["--scan", "--pattern", &format!("{PREFIX}:*")]);
    let keys: Vec<&str> = scan.lines().filter(|l| !l.is_empty()).collect();
    let mut kinds: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut tags: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    // Operation keys (`o`, the ids that make a resent consume count once) name no
    // customer: their tag must be one of a customer's.
    let mut op_tags = BTreeSet::new();
    for key in &keys {
        let p = parse_key(PREFIX, key);
        if p.kind == "o" {
            op_tags.insert(p.tag);
            continue;
        }
        let customer = match (&p.customer, p.kind.as_str()) {
            (Some(c), _) => c.clone(),
            (None, "r") => {
                let id = p.name.as_deref().expect("reservation id");
                assert_eq!(&id[..16], p.tag, "a reservation id carries its tag: {key}");
                reservations
                    .get(id)
                    .unwrap_or_else(|| panic!("unknown reservation key {key}"))
                    .clone()
            }
            _ => panic!("unexpected key {key}"),
        };
        let kind = if key.ends_with(":h") {
            "q:h".to_string()
        } else {
            p.kind.clone()
        };
        kinds.entry(customer.clone()).or_default().insert(kind);
        tags.entry(customer).or_default().insert(p.tag);
    }
    for (c, t) in &tags {
        assert_eq!(
            t.iter().collect::<Vec<_>>(),
            vec![&tag(c)],
            "keys of {c:?} must all carry its tag"
        );
    }
    let all_tags: BTreeSet<&String> = tags.values().flatten().collect();
    assert_eq!(all_tags.len(), tags.len(), "two customers share a tag");
    assert!(!op_tags.is_empty(), "consumes leave operation keys");
    for t in &op_tags {
        assert!(
            all_tags.contains(t),
            "operation key with a stranger's tag {t}"
        );
    }
    for c in ["{a}", "}x{y", "a:b"] {
        assert_eq!(
            kinds[c].iter().map(String::as_str).collect::<Vec<_>>(),
            vec!["g", "i", "q", "q:h", "r", "s"],
            "key kinds of {c:?}: {keys:?}"
        );
    }
    eprintln!(
        "{} keys, e.g. {}",
        keys.len(),
        keys.iter()
            .filter(|k| k.contains(":}x{y:"))
            .copied()
            .collect::<Vec<_>>()
            .join(" ")
    );

    // Another prefix: its own counters.
    let b = replica(&dir, &redis, &["--store-prefix", "tenant2"]);
    assert_eq!(used(&b, "a", "x"), 0, "another prefix sees nothing");
    consume(&b, "a", "x", 1000);
    assert_eq!(shared_used_in(&redis, "tenant2", "a", "x"), 1000);
    assert_eq!(used(&a, "a", "x"), 16, "the default prefix is untouched");
}
