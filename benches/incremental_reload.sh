#!/usr/bin/env bash
# Time from a customer file change to the changed customer being served, on the release
# binary, for two layouts of the same customers (one subscription each, NDJSON):
#
#   FILES=100 — spread over 100 files; one small file is replaced by rename.
#   FILES=1   — all in one file; one line changes and the file is replaced by rename.
#
#   bash benches/incremental_reload.sh                 # 1,000,000 customers, both layouts
#   CUSTOMERS=100000 LAYOUTS="100" bash benches/incremental_reload.sh
#
# For each layout: the time until a check sees the change (polled over one keep-alive
# connection), the slowest of those checks, the load path and files read (from
# /v1/status), RSS before, after and at its peak during the reload, and the latency of
# CHECK_RATE checks a second of random customers (default 5,000, paced over 8
# connections by benches/write_client.rs) sent for 6 s around the change. Loopback
# only; the server runs with --durability memory and is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

CUSTOMERS=${CUSTOMERS:-1000000}
LAYOUTS=${LAYOUTS:-"100 1"}
BIN=${BIN:-target/release/entitled}
WORK=$(mktemp -d)
PID=
trap '[ -n "$PID" ] && kill "$PID" 2>/dev/null; rm -rf "$WORK"' EXIT

CHECK_RATE=${CHECK_RATE:-5000}
[ -n "${BIN_BUILT:-}" ] || cargo build --release --quiet --bin entitled --example write_client

source benches/common/bench.sh
for FILES in $LAYOUTS; do
  rm -rf "$WORK/policies"
  bench_policies "$WORK/policies" "$CUSTOMERS" "$FILES" free
  bench_serve "$WORK/policies" "$WORK/log" --durability memory --reload-debounce 20ms
  echo "== $CUSTOMERS customers in $FILES file(s) =="
  # Paced checks from now until well after the change (made about 2 s from now).
  target/release/examples/write_client "$PORT" - 0 6 1 "$CUSTOMERS" "$CHECK_RATE" 8 \
    >"$WORK/checks" 2>&1 &
  CHECKER=$!
  python3 - "$WORK/policies" "$PORT" "$PID" <<'PY'
import http.client, json, os, sys, time
d, port, pid = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def rss(key):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) // 1024
conn = http.client.HTTPConnection("127.0.0.1", port)
def check():
    body = json.dumps({"customer": "cust-0000000", "feature": "analytics.advanced"})
    conn.request("POST", "/v1/check", body, {"content-type": "application/json"})
    return json.loads(conn.getresponse().read())["allowed"]
def status():
    conn.request("GET", "/v1/status")
    return json.loads(conn.getresponse().read())
for _ in range(100):
    check()
time.sleep(2)  # let the start-up load's transient memory go back
steady = rss("VmRSS")
open(f"/proc/{pid}/clear_refs", "w").write("5")  # the peak below is the reload's
path = f"{d}/customers-000.ndjson"
text = open(path).read()
changed = text.replace('"plan": "free"', '"plan": "pro"', 1)
open(f"{d}/.tmp", "w").write(changed)
assert not check()
t0 = time.perf_counter()
os.rename(f"{d}/.tmp", path)
slowest, served = 0.0, None
while time.perf_counter() - t0 < 30:
    a = time.perf_counter()
    ok = check()
    slowest = max(slowest, time.perf_counter() - a)
    if ok:
        served = time.perf_counter() - t0
        break
st = status()
print(f"served after {served * 1000:.0f} ms" if served else "NOT served within 30 s")
print(f"slowest check while polling: {slowest * 1000:.1f} ms")
print(f"load: {json.dumps(st['last_load'])}")
print(f"RSS steady {steady} MB, after {rss('VmRSS')} MB, peak during the reload {rss('VmHWM')} MB")
PY
  wait "$CHECKER" || true
  printf "paced around the change: "
  python3 benches/common/latency.py checks <"$WORK/checks"
  grep -o 'policy directory loaded.*' "$WORK/log" | tail -1 | sed 's/^/log: /'
  kill "$PID"; wait "$PID" 2>/dev/null || true; PID=
done
