#!/usr/bin/env bash
# Customer writes under load, on the release binary: N customers loaded (one
# subscription each, NDJSON), `--durability async`, wrk sending checks of random
# customers the whole time, and a paced writer (benches/write_client.rs) sending
# `PUT /v1/customers/{id}` at RATE writes a second (spread over WRITERS keep-alive
# connections) for DURATION seconds. Prints the writes' latency (p50, p99, p99.9, max,
# each measured from when the write was due) and the checks' rate and latency from wrk.
#
#   bash benches/write_load.sh                              # 1M customers, 1,000 writes/s, 10 s
#   CUSTOMERS=100000 RATE=500 DURATION=5 bash benches/write_load.sh
#   CHECKS=20000 bash benches/write_load.sh                 # 20,000 paced checks a second beside them
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
[ -n "${BIN_BUILT:-}" ] || cargo build --release --quiet --bin entitled --example write_client

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
# CHECKS=max: wrk as fast as it can (the cores saturated); CHECKS=N: N checks a second,
# paced by the same client as the writes (headroom left, as in production);
# CHECKS=0: none.
CHECKS=${CHECKS:-max}
PACED=()
WRK=
case "$CHECKS" in
  max)
    wrk -t1 -c16 -d"$((DURATION + 2))s" --latency -s "$WORK/check.lua" "http://127.0.0.1:$PORT" >"$WORK/wrk" 2>&1 &
    WRK=$!
    sleep 1 ;;
  0) ;;
  *) PACED=("$CHECKS" 8) ;;
esac

target/release/examples/write_client "$PORT" "$(cut -d: -f2 "$WORK/tokens")" "$RATE" "$DURATION" "$WRITERS" "$CUSTOMERS" "${PACED[@]}" \
  | python3 benches/common/latency.py
if [ -n "$WRK" ]; then
  wait "$WRK" || true
  echo "checks beside them (wrk -t1 -c16, as fast as they are answered):"
  grep -E "Requests/sec|99%|99.9%|Latency " "$WORK/wrk" | sed 's/^/  /'
fi
curl -fs "http://127.0.0.1:$PORT/v1/status" | python3 -c 'import json,sys; s=json.load(sys.stdin); print("applied revision:", s.get("revision"))'
grep -h "start-up memory given back" "$WORK/log" | sed 's/^/server: /' || true
