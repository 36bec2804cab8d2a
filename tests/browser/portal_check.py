#!/usr/bin/env python3
"""Drives headless Chromium (Selenium, Debian's chromedriver) against a running
`entitled serve` and checks what a person sees on the customer portal and the
operator console.

    portal_check.py check --base http://127.0.0.1:PORT --admin-token T --policies DIR
    portal_check.py screenshots --base URL --admin-token T --customer ID --out DIR

`check` expects the policy tests/suite/portal.rs writes (customers acme, globex and
one whose id is markup) and a server started with --test-clock, --portal-key-file
and --admin-token-file. It prints one line per check and exits non-zero on the
first failure. `screenshots` saves the portal and the console at desktop and phone
width (the README's images). Every wait is bounded; nothing sleeps for time to pass
(the server's test clock is moved instead).
"""

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

# Selenium Manager must never reach the network: the driver is Debian's.
os.environ.setdefault("SE_OFFLINE", "true")

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import NoAlertPresentException  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

DESKTOP = (1280, 900)
PHONE = (390, 844)


def find_driver():
    for p in (os.environ.get("CHROMEDRIVER"), "/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"):
        if p and os.path.exists(p):
            return p
    sys.exit("chromedriver not found (apt-get install chromium-driver)")


def browser():
    opts = Options()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--hide-scrollbars", "--force-device-scale-factor=1", "--lang=en-US"):
        opts.add_argument(a)
    for b in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", "/usr/bin/chromium-browser"):
        if b and os.path.exists(b):
            opts.binary_location = b
            break
    d = webdriver.Chrome(service=Service(find_driver()), options=opts)
    d.set_page_load_timeout(30)
    # A click that submits a form returns before the next page is in: look for an
    # element for up to 5 s (bounded) before saying it is not there.
    d.implicitly_wait(5)
    d.set_window_size(*DESKTOP)
    return d


class Api:
    def __init__(self, base, admin):
        self.base = base.rstrip("/")
        self.admin = admin

    def call(self, method, path, body=None, token=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("content-type", "application/json")
        if token:
            req.add_header("authorization", "Bearer " + token)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def json(self, method, path, body=None, token=None):
        status, text = self.call(method, path, body, token)
        return status, (json.loads(text) if text.strip().startswith("{") else text)

    def mint(self, customer, ttl=None):
        body = {"customer": customer}
        if ttl:
            body["ttl"] = ttl
        status, v = self.json("POST", "/v1/portal/tokens", body, self.admin)
        assert status == 201, (status, v)
        return v["token"]

    def portal_url(self, token):
        return self.base + "/portal?token=" + urllib.parse.quote(token, safe="")


def ok(what):
    print("ok -", what, flush=True)


def expect(cond, what, detail=""):
    if not cond:
        raise AssertionError(f"{what}: {detail}")
    ok(what)


def text(d, css):
    return d.find_element(By.CSS_SELECTOR, css).text


def no_alert(d):
    try:
        d.switch_to.alert
        return False
    except NoAlertPresentException:
        return True


def fits_width(d):
    return d.execute_script(
        "return document.documentElement.scrollWidth <= window.innerWidth + 1")


def check(args):
    api = Api(args.base, args.admin_token)
    d = browser()
    try:
        # --- the portal shows the customer's features, usage and renewal ---------------
        for _ in range(3):
            s, v = api.json("POST", "/v1/consume", {"customer": "acme", "feature": "api.calls"})
            assert s == 200 and v["allowed"], v
        # One denial, for the console's report and the customer's recent denials.
        s, v = api.json("POST", "/v1/check", {"customer": "acme", "feature": "audit.export"})
        assert s == 200 and not v["allowed"] and v["reason"] == "not_entitled", v
        s, v = api.json("POST", "/v1/seats/acquire",
                        {"customer": "acme", "feature": "seats", "holder": "ana@acme.example"})
        assert s == 200 and v["allowed"], v
        token = api.mint("acme")
        d.get(api.portal_url(token))
        expect(text(d, "#customer-name") == "Acme Corp", "the portal names the customer")
        features = {e.get_attribute("data-feature"): e
                    for e in d.find_elements(By.CSS_SELECTOR, "#features .feature")}
        expect({"reports", "api.calls", "seats", "sso"} <= set(features),
               "the portal lists the customer's features", sorted(features))
        expect(features["reports"].get_attribute("data-state") == "active",
               "a flag the plan grants reads active")
        bar = d.find_element(By.CSS_SELECTOR, '.bar[data-feature="api.calls"]')
        expect(bar.get_attribute("data-percent") == "30" and bar.get_attribute("aria-valuenow") == "30",
               "the api.calls bar is at 30% after 3 of 10 consumes")
        fill = bar.find_element(By.CSS_SELECTOR, "span")
        ratio = fill.size["width"] / max(1, bar.size["width"] - 2)
        expect(abs(ratio - 0.30) < 0.03, "the bar is drawn 30% full", f"{ratio:.3f}")
        usage = text(d, '[data-usage="api.calls"]')
        expect("3 of 10 calls used (30%)" in usage and "resets 2026-02-01" in usage,
               "the usage is written out in words with its reset date", usage)
        expect("1 of 5 seats used (20%)" in text(d, '[data-usage="seats"]'), "seats in use are shown")
        expect("2027-01-01" in text(d, "#renewal") and "356 days left" in text(d, "#renewal"),
               "the renewal date and the days left are shown", text(d, "#renewal"))
        expect("business" in text(d, "#upgrades"), "the upgrade options are listed")
        page = d.page_source
        expect("Globex" not in page and "globex" not in page,
               "another customer's data never appears")
        expect("jane@vendor.example" not in page, "who approved an override stays on the operator's side")
        # Asking for another customer beside the token changes nothing.
        d.get(api.portal_url(token) + "&customer=globex")
        expect(text(d, "#customer-name") == "Acme Corp" and "Globex" not in d.page_source,
               "a token for acme shows acme whatever else the link asks")
        # The same page at phone width: no sideways scrolling.
        d.set_window_size(*PHONE)
        d.get(api.portal_url(token))
        expect(fits_width(d), "the portal fits a phone-width screen")
        d.set_window_size(*DESKTOP)

        # --- markup in customer data is shown as text ----------------------------------
        evil_id = "<script>alert(1)</script>"
        d.get(api.portal_url(api.mint(evil_id)))
        expect(text(d, "#customer-name") == "<img src=x onerror=alert(2)>",
               "a customer name with markup is shown as text")
        expect(text(d, "#customer-id") == evil_id, "a customer id with markup is shown as text")
        expect(d.execute_script("return document.querySelectorAll('script, img').length") == 0,
               "no element was made from customer data")
        expect(no_alert(d), "no script ran")

        # --- forged and expired tokens get the 401 page ----------------------------------
        forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
        d.get(api.portal_url(forged))
        expect(text(d, "#notice h1") == "This link is not valid", "a forged token gets the refusal page")
        expect(api.call("GET", "/portal?token=" + urllib.parse.quote(forged))[0] == 401,
               "a forged token is answered 401")
        short = api.mint("acme", ttl="1h")
        d.get(api.portal_url(short))
        expect(text(d, "#customer-name") == "Acme Corp", "a one-hour token works now")
        s, _ = api.json("POST", "/v1/test-clock", {"advance": "61m"})
        assert s == 200
        d.get(api.portal_url(short))
        expect(text(d, "#notice h1") == "This link has expired", "an expired token gets the expiry page")
        expect(api.call("GET", "/portal?token=" + urllib.parse.quote(short))[0] == 401,
               "an expired token is answered 401")
        d.get(args.base + "/portal")
        expect(text(d, "#notice h1") == "Sign-in link required", "no token gets the sign-in page")

        # --- the console -----------------------------------------------------------------
        d.get(args.base + "/console")
        expect(len(d.find_elements(By.ID, "token")) == 1, "the console asks for an admin token")
        d.find_element(By.ID, "token").send_keys("not-a-token")
        d.find_element(By.ID, "sign-in").click()
        expect(text(d, "#login-error").startswith("That is not"), "a wrong admin token is refused")
        d.find_element(By.ID, "token").send_keys(args.admin_token)
        d.find_element(By.ID, "sign-in").click()
        expect(text(d, "#admin-name") == "ops", "the console signs the admin in")
        cookie = d.get_cookie("entitled_console")
        expect(cookie and cookie.get("httpOnly") and cookie.get("sameSite") == "Strict",
               "the session cookie is HttpOnly and SameSite=Strict", str(cookie))
        expect(text(d, "#snapshot-version") != "", "the console shows the snapshot version")
        expect(text(d, "#renewals-60 .big").strip() == "1", "renewals in the next 60 days are counted",
               text(d, "#renewals"))
        report = text(d, "#report")
        expect("not_entitled" in report and "no report data yet" not in report,
               "the report charts the denials by reason", report)

        # A broken policy file: the console lists its file:line:col.
        before = api.json("GET", "/v1/status")[1]["reloads_failed"]
        with open(os.path.join(args.policies, "features.yaml"), "a") as f:
            f.write("  broken: { kind: nonsense }\n")
        deadline = time.monotonic() + 20
        status = None
        while time.monotonic() < deadline:
            status = api.json("GET", "/v1/status")[1]
            if status["reloads_failed"] > before and status["last_error"]:
                break
            time.sleep(0.05)  # polling the reloader, not waiting for time to pass
        first = status["last_error"]["diagnostics"][0]
        where = f"features.yaml:{first['line']}:{first['column']}"
        d.get(args.base + "/console")
        errors = [e.text for e in d.find_elements(By.CSS_SELECTOR, "#last-error .diag")]
        expect(any(where in e for e in errors), f"the console lists the broken reload at {where}", errors)
        expect(d.find_elements(By.CSS_SELECTOR, '#reload-history tr[data-outcome="failed"]'),
               "the reload history has the failed load")

        # Search, then one customer's full picture.
        box = d.find_element(By.CSS_SELECTOR, 'input[name="q"]')
        box.send_keys("acm")
        box.submit()
        found = [e.get_attribute("data-customer") for e in d.find_elements(By.CSS_SELECTOR, "#search li[data-customer]")]
        expect(found == ["acme"], "search finds the customer", found)
        d.find_element(By.CSS_SELECTOR, '#search li[data-customer="acme"] a').click()
        expect(text(d, "#customer-id") == "acme", "the console opens the customer")
        expect("jane@vendor.example" in text(d, "#overrides") and "SSO pilot" in text(d, "#overrides"),
               "the console shows who approved an override and why")
        expect("override approved by jane@vendor.example" in text(d, '#sources tr[data-feature="sso"]'),
               "the console shows each feature's source")
        expect("audit.export" in text(d, "#denials") and "not_entitled" in text(d, "#denials"),
               "the customer's recent denials are listed", text(d, "#denials"))
        d.set_window_size(*PHONE)
        expect(fits_width(d), "the console's customer page fits a phone-width screen")
        d.set_window_size(*DESKTOP)

        # Signing out ends the session.
        d.get(args.base + "/console")
        d.find_element(By.CSS_SELECTOR, 'form[action="/console/logout"] button').click()
        expect(len(d.find_elements(By.ID, "token")) == 1, "signing out shows the sign-in form again")
    finally:
        d.quit()
    print("all browser checks passed")


def full_page(d, path, width):
    d.set_window_size(width, 900)
    height = d.execute_script("return document.documentElement.scrollHeight")
    d.set_window_size(width, min(max(height, 600), 4000))
    d.save_screenshot(path)
    print("wrote", path)


def screenshots(args):
    api = Api(args.base, args.admin_token)
    os.makedirs(args.out, exist_ok=True)
    d = browser()
    try:
        url = api.portal_url(api.mint(args.customer))
        for name, width in (("desktop", DESKTOP[0]), ("phone", PHONE[0])):
            d.get(url)
            full_page(d, os.path.join(args.out, f"portal-{name}.png"), width)
        d.set_window_size(*DESKTOP)
        d.get(args.base + "/console")
        d.find_element(By.ID, "token").send_keys(args.admin_token)
        d.find_element(By.ID, "sign-in").click()
        for name, width in (("desktop", DESKTOP[0]), ("phone", PHONE[0])):
            d.get(args.base + "/console")
            full_page(d, os.path.join(args.out, f"console-{name}.png"), width)
            d.get(args.base + "/console/customer?id=" + urllib.parse.quote(args.console_customer or args.customer))
            full_page(d, os.path.join(args.out, f"console-customer-{name}.png"), width)
    finally:
        d.quit()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["check", "screenshots"])
    p.add_argument("--base", required=True)
    p.add_argument("--admin-token", required=True)
    p.add_argument("--policies")
    p.add_argument("--customer", default="acme")
    p.add_argument("--console-customer")
    p.add_argument("--out", default="docs/images")
    args = p.parse_args()
    if args.mode == "check":
        if not args.policies:
            p.error("check needs --policies")
        check(args)
    else:
        screenshots(args)


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print("FAILED -", e, flush=True)
        sys.exit(1)
