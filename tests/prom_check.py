#!/usr/bin/env python3
"""Checks an `entitled` /metrics scrape (on stdin) against docs/metrics.md.

    curl -s http://127.0.0.1:4780/metrics | python3 tests/prom_check.py [--at-start] CUSTOMER_ID...

Parses the text with prometheus_client's own parser (what a scraper would accept),
then checks that every metric of REQUIRED below (rows of the Metrics table of
docs/metrics.md) is there with its type and label names, and that no label value
anywhere is one of the customer ids given as arguments (customer ids are never label
values). With --at-start (a scrape taken right after start-up, before any request),
also checks that the series of AT_START exist at 0: an alert on `increase()` sees no
data, and the first event no increase, on a series that only appears with that event.
Exits 1 with one line per problem.
"""

import sys

try:
    from prometheus_client.parser import text_string_to_metric_families
except ImportError as e:  # the test must fail, not skip, without the module
    sys.stderr.write(f"prom_check: cannot import prometheus_client ({e}); pip install prometheus_client\n")
    sys.exit(2)

# name -> (type, label names every sample must carry)
REQUIRED = {
    "entitled_decisions_total": ("counter", {"op", "kind", "allowed", "reason"}),
    "entitled_decision_duration_seconds": ("histogram", set()),
    "entitled_policy_reloads_total": ("counter", {"result"}),
    "entitled_policy_last_reload_success_timestamp_seconds": ("gauge", set()),
    "entitled_policy_snapshot_info": ("gauge", {"version"}),
    "entitled_customers": ("gauge", set()),
    "entitled_overrides_active": ("gauge", set()),
    "entitled_quota_warnings_total": ("counter", {"feature"}),
    "entitled_subscriptions_expiring": ("gauge", {"within"}),
    "entitled_store_errors_total": ("counter", set()),
    "entitled_audit_dropped_total": ("counter", set()),
    "entitled_http_errors_total": ("counter", {"route", "status"}),
    "entitled_gateway_requests_total": ("counter", {"api", "status", "reason"}),
    "entitled_idempotent_replays_total": ("counter", set()),
    "entitled_state_checkpoints_total": ("counter", {"result"}),
}

# Series that exist from start-up at 0 (name -> label sets); with --at-start, every
# sample of these families but the reloads' success must be 0 too. `None`: any labels,
# at least one sample (the quota features depend on the policy).
AT_START = {
    "entitled_decisions_total": [
        {"op": "check", "kind": "flag", "allowed": "false", "reason": "not_entitled"},
        {"op": "check", "kind": "none", "allowed": "false", "reason": "unknown_feature"},
        {"op": "consume", "kind": "quota", "allowed": "false", "reason": "quota_exhausted"},
        {"op": "consume", "kind": "rate", "allowed": "false", "reason": "rate_limited"},
        {"op": "reserve", "kind": "quota", "allowed": "true", "reason": "granted"},
        {"op": "seat_acquire", "kind": "seats", "allowed": "false", "reason": "seats_exhausted"},
        {"op": "seat_release", "kind": "seats", "allowed": "false", "reason": "unknown_customer"},
    ],
    "entitled_gateway_requests_total": [
        {"api": "authz_http", "status": "403", "reason": "unknown_customer"},
        {"api": "authz_http", "status": "429", "reason": "quota_exhausted"},
        {"api": "authz_grpc", "status": "403", "reason": "no_route"},
        {"api": "ratelimit_grpc", "status": "429", "reason": "over_limit"},
    ],
    "entitled_http_errors_total": [
        {"route": "consume", "status": "503"},
        {"route": "check", "status": "400"},
        {"route": "reservations", "status": "503"},
    ],
    "entitled_quota_warnings_total": None,
    "entitled_idempotent_replays_total": [{}],
    "entitled_state_checkpoints_total": [{"result": "success"}, {"result": "failure"}],
    "entitled_policy_reloads_total": [{"result": "failure"}],
    "entitled_notices_failed_total": [{}],
}

# Label values with a fixed vocabulary.
VOCABULARY = {
    ("entitled_decisions_total", "allowed"): {"true", "false"},
    ("entitled_decisions_total", "reason"): {
        "granted", "not_entitled", "expired", "not_yet_active", "out_of_scope",
        "quota_exhausted", "rate_limited", "exceeds_burst", "seats_exhausted", "unknown_customer",
        "unknown_feature",
    },
    ("entitled_decisions_total", "op"): {
        "check", "consume", "reserve", "seat_acquire", "seat_release",
    },
    ("entitled_policy_reloads_total", "result"): {"success", "failure"},
    ("entitled_state_checkpoints_total", "result"): {"success", "failure"},
}


def family_key(fam):
    """The exposed metric name: the parser drops `_total` from counter families."""
    if fam.type == "counter" and not fam.name.endswith("_total"):
        return fam.name + "_total"
    return fam.name


def check_at_start(by_name, problems):
    """Every AT_START series is there, and at 0."""
    for name, wanted in AT_START.items():
        fam = by_name.get(name)
        samples = list(fam.samples) if fam else []
        if not samples:
            problems.append(f"{name}: no series at start-up")
            continue
        for labels in wanted or []:
            if not any(x.labels == labels for x in samples):
                problems.append(f"{name}{labels}: not there at start-up")
        for x in samples:
            reload_success = name == "entitled_policy_reloads_total" and x.labels.get("result") == "success"
            if x.value != 0 and not reload_success:
                problems.append(f"{name}{x.labels}: {x.value} at start-up, expected 0")


def main(argv):
    at_start = "--at-start" in argv[1:]
    customer_ids = {a for a in argv[1:] if a != "--at-start"}
    text = sys.stdin.read()
    problems = []
    try:
        families = list(text_string_to_metric_families(text))
    except Exception as e:  # noqa: BLE001 - any parse failure is the finding
        sys.stderr.write(f"prom_check: the scrape does not parse as Prometheus text: {e!r}\n")
        return 1
    by_name = {}
    for fam in families:
        key = family_key(fam)
        if key in by_name:
            problems.append(f"{key}: exposed twice")
        by_name[key] = fam

    for name, (want_type, want_labels) in REQUIRED.items():
        fam = by_name.get(name)
        if fam is None:
            problems.append(f"{name}: missing")
            continue
        if fam.type != want_type:
            problems.append(f"{name}: type {fam.type}, expected {want_type}")
        if not fam.samples:
            problems.append(f"{name}: no samples")
        if want_type == "histogram":
            suffixes = {s.name[len(name):] for s in fam.samples}
            for part in ("_bucket", "_sum", "_count"):
                if part not in suffixes:
                    problems.append(f"{name}: histogram without {part}")
            if not any(s.name.endswith("_bucket") and s.labels.get("le") == "+Inf" for s in fam.samples):
                problems.append(f"{name}: histogram without an le=\"+Inf\" bucket")
        for s in fam.samples:
            labels = set(s.labels) - {"le"}
            if want_labels and labels != want_labels:
                problems.append(
                    f"{name}: sample {s.name}{s.labels} has labels {sorted(labels)}, expected {sorted(want_labels)}"
                )
                break
            for (metric, label), allowed in VOCABULARY.items():
                if metric == name and label in s.labels and s.labels[label] not in allowed:
                    problems.append(f"{name}: {label}={s.labels[label]!r} is not one of {sorted(allowed)}")

    if at_start:
        check_at_start(by_name, problems)

    for fam in families:
        for s in fam.samples:
            for label, value in s.labels.items():
                if value in customer_ids:
                    problems.append(
                        f"{s.name}: label {label}={value!r} is a customer id (customer ids are never label values)"
                    )

    if problems:
        for p in problems:
            sys.stderr.write(f"prom_check: {p}\n")
        return 1
    print(f"prom_check: ok, {len(families)} metric families, {len(REQUIRED)} required present")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
