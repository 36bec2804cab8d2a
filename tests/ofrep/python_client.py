"""The real OpenFeature Python SDK and its OFREP provider against a running `entitled`.

Run by tests/suite/ofrep.rs (which starts the binary on the policies it writes):

    python3 tests/ofrep/python_client.py http://127.0.0.1:PORT [TOKEN]

Evaluates through `openfeature-sdk` + `openfeature-provider-ofrep` (from PyPI, installed
by .ci/run): a boolean (granted and not), a string, a number (integer and float), a
quota as "one more unit allowed now", a missing flag, a missing targeting key and an
unknown customer. Each answer is also compared with `/v1/check` for the same question,
so the OFREP mapping cannot drift from the decisions it stands for. Prints `ok` and
exits 0, or fails with the first wrong answer.
"""

import json
import sys
import urllib.request

from openfeature import api
from openfeature.evaluation_context import EvaluationContext
from openfeature.exception import ErrorCode
from openfeature.flag_evaluation import Reason
from openfeature.contrib.provider.ofrep import OFREPProvider


def check(base, customer, feature, context=None):
    """The JSON API's answer to the same question."""
    body = {"customer": customer, "feature": feature}
    if context:
        body["context"] = context
    req = urllib.request.Request(
        base + "/v1/check",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def expect(what, got, want):
    if got != want:
        raise AssertionError(f"{what}: got {got!r}, want {want!r}")


def main():
    base = sys.argv[1]
    token = sys.argv[2] if len(sys.argv) > 2 else None
    headers = (lambda: {"Authorization": f"Bearer {token}"}) if token else None
    api.set_provider(OFREPProvider(base, headers_factory=headers, timeout=10))
    client = api.get_client()

    acme = EvaluationContext(targeting_key="acme")
    northwind = EvaluationContext(targeting_key="northwind")

    # A flag granted by a plan: TARGETING_MATCH, with the plan and snapshot as metadata.
    d = client.get_boolean_details("sso", False, acme)
    expect("sso for acme", d.value, True)
    expect("sso reason", d.reason, Reason.TARGETING_MATCH)
    expect("sso variant", d.variant, "granted")
    expect("sso error", d.error_code, None)
    expect("sso plan", d.flag_metadata.get("plan"), "pro")
    expect("sso source", d.flag_metadata.get("source"), "subscription")
    expect(
        "sso snapshot",
        d.flag_metadata.get("snapshot"),
        check(base, "acme", "sso")["snapshot"],
    )

    # Not entitled: false, decided for this customer (TARGETING_MATCH), with the plans
    # that would grant it as one comma-separated string.
    d = client.get_boolean_details("sso", True, northwind)
    expect("sso for northwind", d.value, False)
    expect("sso northwind reason", d.reason, Reason.TARGETING_MATCH)
    expect("sso northwind variant", d.variant, "not_entitled")
    want_upgrade = ",".join(check(base, "northwind", "sso")["upgrade"])
    expect("sso northwind upgrade", d.flag_metadata.get("upgrade"), want_upgrade)

    # A string value, scoped by context.
    d = client.get_string_details("support.tier", "none", acme)
    expect("support.tier", d.value, check(base, "acme", "support.tier")["value"])
    expect("support.tier value", d.value, "standard")
    expect("support.tier reason", d.reason, Reason.TARGETING_MATCH)

    # A number: as an integer, and as a float where the policy says 2.5.
    d = client.get_integer_details("max_upload_mb", 0, acme)
    expect("max_upload_mb", d.value, 250)
    expect("max_upload_mb check", d.value, check(base, "acme", "max_upload_mb")["value"])
    d = client.get_float_details("cpu.share", 0.0, acme)
    expect("cpu.share", d.value, 2.5)

    # A value the customer has not: no value, so the caller's default (DEFAULT).
    d = client.get_integer_details("max_upload_mb", 7, northwind)
    expect("max_upload_mb for northwind", d.value, 7)
    expect("max_upload_mb northwind reason", d.reason, Reason.DEFAULT)
    expect("max_upload_mb northwind variant", d.variant, "not_entitled")

    # A quota: would one more call be allowed now? With its figures as metadata.
    d = client.get_boolean_details("api.calls", False, acme)
    want = check(base, "acme", "api.calls")
    expect("api.calls", d.value, want["allowed"])
    for k in ("limit", "used", "remaining", "resets_at"):
        expect(f"api.calls {k}", d.flag_metadata.get(k), want[k])
    # A check counts nothing: asking again gives the same figures.
    again = client.get_boolean_details("api.calls", False, acme)
    expect("api.calls used again", again.flag_metadata.get("used"), want["used"])

    # A flag the catalog does not have: FLAG_NOT_FOUND, the default.
    d = client.get_boolean_details("no.such.feature", True, acme)
    expect("missing flag value", d.value, True)
    expect("missing flag error", d.error_code, ErrorCode.FLAG_NOT_FOUND)
    expect("missing flag reason", d.reason, Reason.ERROR)

    # No targeting key: TARGETING_KEY_MISSING, the default.
    d = client.get_boolean_details("sso", True, EvaluationContext(attributes={"asset": "a"}))
    expect("no targeting key value", d.value, True)
    expect("no targeting key error", d.error_code, ErrorCode.TARGETING_KEY_MISSING)

    # `at` in the context: INVALID_CONTEXT.
    d = client.get_boolean_details(
        "sso", True, EvaluationContext("acme", {"at": "2026-01-01T00:00:00Z"})
    )
    expect("at in context error", d.error_code, ErrorCode.INVALID_CONTEXT)

    # An unknown customer is a decision, not an error: false, DEFAULT, reason given.
    d = client.get_boolean_details("sso", True, EvaluationContext(targeting_key="nobody"))
    expect("unknown customer value", d.value, False)
    expect("unknown customer error", d.error_code, None)
    expect("unknown customer reason", d.reason, Reason.DEFAULT)
    expect("unknown customer variant", d.variant, "unknown_customer")
    expect("unknown customer metadata", d.flag_metadata.get("reason"), "unknown_customer")

    print("ok")


if __name__ == "__main__":
    main()
