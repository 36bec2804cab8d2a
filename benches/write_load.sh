#!/usr/bin/env bash
# Customer writes under load, on the release binary: N customers loaded (one
# subscription each, NDJSON), `--durability async`, wrk sending checks of random
# customers the whole time, and a paced writer sending `PUT /v1/customers/{id}` at
# RATE writes a second (spread over WRITERS keep-alive connections) for DURATION
# seconds. Prints the writes' latency (p50, p99, p99.9, max) and the checks' rate and
# latency from wrk.
#
#   bash benches/write_load.sh                              # 1M customers, 1,000 writes/s, 10 s
#   CUSTOMERS=100000 RATE=500 DURATION=5 bash benches/write_load.sh
#   CHECKS=0 bash benches/write_load.sh                     # the writes alone
#
# Needs wrk. Loopback only; the server is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

CUSTOMERS=${CUSTOMERS:-1000000}
RATE=${RATE:-1000}
DURATION=${DURATION:-10}
WRITERS=${WRITERS:-4}
BIN=${BIN:-target/release/entitled}
WORK=$(mktemp -d)
PID=
trap '[ -n "$PID" ] && kill "$PID" 2>/dev/null; rm -rf "$WORK"' EXIT

command -v wrk >/dev/null || { echo "wrk is needed: apt-get install wrk" >&2; exit 1; }
[ -n "${BIN_BUILT:-}" ] || cargo build --release --quiet --bin entitled

source benches/common/bench.sh
bench_policies "$WORK/policies" "$CUSTOMERS"
echo "bench:$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')" > "$WORK/tokens"

bench_serve "$WORK/policies" "$WORK/log" --durability async --state-dir "$WORK/state" \
  --admin-token-file "$WORK/tokens"

cat > "$WORK/check.lua" <<LUA
local n = $CUSTOMERS
math.randomseed(7)
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  local id = string.format("cust-%07d", math.random(0, n - 1))
  return wrk.format(nil, "/v1/check", nil, '{"customer":"' .. id .. '","feature":"analytics.advanced"}')
end
LUA
if [ "${CHECKS:-1}" = 1 ]; then
  wrk -t1 -c16 -d"$((DURATION + 2))s" --latency -s "$WORK/check.lua" "http://127.0.0.1:$PORT" >"$WORK/wrk" 2>&1 &
  WRK=$!
else
  WRK=
  echo "(no checks beside the writes)" >"$WORK/wrk"
fi
sleep 1

python3 - "$PORT" "$(cut -d: -f2 "$WORK/tokens")" "$RATE" "$DURATION" "$WRITERS" "$CUSTOMERS" <<'PY'
import http.client, json, sys, threading, time
port, token, rate, duration, writers, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
lat, errors, lock = [], [], threading.Lock()
start = time.perf_counter() + 0.2

def writer(w):
    c = http.client.HTTPConnection("127.0.0.1", int(port))
    every = writers / rate
    k = 0
    while True:
        due = start + w / rate + k * every
        if due - start >= duration:
            return
        now = time.perf_counter()
        if due > now:
            time.sleep(due - now)
        i = (w * 7919 + k * 104729) % n
        body = json.dumps({"subscriptions": [{"plan": "pro" if k % 2 else "free", "starts": "2025-06-01"}]})
        t0 = time.perf_counter()
        c.request("PUT", f"/v1/customers/cust-{i:07d}", body, {"authorization": f"Bearer {token}", "content-type": "application/json"})
        r = c.getresponse()
        r.read()
        t1 = time.perf_counter()
        with lock:
            (lat if r.status == 200 else errors).append((t1 - t0) if r.status == 200 else r.status)
        k += 1

ts = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
for t in ts: t.start()
for t in ts: t.join()
lat.sort()
q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000
print(f"writes: {len(lat)} ok, {len(errors)} errors in {duration:.0f} s ({len(lat) / duration:.0f}/s): "
      f"p50 {q(0.5):.2f} ms, p99 {q(0.99):.2f} ms, p99.9 {q(0.999):.2f} ms, max {lat[-1] * 1000:.2f} ms")
PY
[ -z "$WRK" ] || wait "$WRK" || true
echo "checks beside them (wrk -t1 -c16):"
grep -E "Requests/sec|99%|99.9%|Latency " "$WORK/wrk" | sed 's/^/  /'
curl -fs "http://127.0.0.1:$PORT/v1/status" | python3 -c 'import json,sys; s=json.load(sys.stdin); print("applied revision:", s.get("revision"))'
