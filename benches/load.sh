#!/usr/bin/env bash
# Load benchmarks of the release binary with wrk, on this machine (loopback only,
# every run bounded in time). Prints the figures quoted in docs/performance.md.
#
#   bash benches/load.sh            # all of it (~2.5 min)
#   DURATION=5 bash benches/load.sh # shorter runs
#
# 1. POST /v1/check throughput at 32 connections, next to a bare hyper server
#    (reads the body, answers a constant) measured in the same run: the ratio is the
#    cost of everything entitled adds. Both get one worker thread; wrk gets the other
#    core. Each request asks for a random customer of a 100k-customer policy set.
# 2. p50/p99/p99.9 latency of the same run; beside it, the same question asked
#    through OpenFeature (POST /ofrep/v1/evaluate/flags/{key}, targetingKey = the
#    customer), alternated with /v1/check twice so both see the same machine load.
# 3. POST /v1/batch of 100 checks: server time per batch, from the server's own
#    entitled_decision_duration_seconds histogram (sum/count).
# 4. Reloads of the 100k-customer set every 100 ms for 30 s under load: errors and
#    p99.9 (reads never wait for a reload).
# 5. A one-file change to the bundled example set: time until it is served.
# 6. OFREP bulk evaluation of the bundled example set's 20 features for one
#    customer: server time per bulk answer, from the same histogram as 3.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
RELOAD_SECONDS=${RELOAD_SECONDS:-30}
CUSTOMERS=${CUSTOMERS:-100000}
PORT_BARE=${PORT_BARE:-4798}
PORT=${PORT:-4797}
WORK=$(mktemp -d /tmp/entitled-load.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

command -v wrk >/dev/null || { echo "wrk is needed: apt-get install wrk" >&2; exit 1; }
cargo build --release --quiet --bin entitled --example bare_hyper
BIN=target/release/entitled
BARE=target/release/examples/bare_hyper

echo "generating $CUSTOMERS customers"
mkdir -p "$WORK/policies"
python3 - "$WORK/policies" "$CUSTOMERS" <<'PY'
import json, random, sys
d, n = sys.argv[1], int(sys.argv[2])
open(f"{d}/catalog.yaml", "w").write("""
features:
  analytics.advanced: { kind: flag }
  api.calls: { kind: quota, combine: sum }
  seats: { kind: seats }
plans:
  free:
    grants:
      api.calls: { limit: 1000, per: month }
      seats: { limit: 3 }
  pro:
    includes: [free]
    grants:
      analytics.advanced: true
      api.calls: { limit: 100000, per: month }
  api-pack-10k:
    grants:
      api.calls: { limit: 10000, per: month }
""")
rnd = random.Random(42)
with open(f"{d}/customers.ndjson", "w") as f:
    for i in range(n):
        m, day = rnd.randint(1, 12), rnd.randint(1, 28)
        f.write(json.dumps({"id": f"cust-{i:07d}", "name": f"Customer {i}", "subscriptions": [
            {"plan": rnd.choice(["free", "pro"]), "starts": f"2025-{m:02d}-{day:02d}"},
            {"plan": "api-pack-10k", "quantity": rnd.randint(1, 5), "starts": f"2025-{m:02d}-{day:02d}", "ends": f"2027-{m:02d}-{day:02d}"}]}) + "\n")
PY

cat > "$WORK/check.lua" <<LUA
local n = $CUSTOMERS
math.randomseed(7)
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  local id = string.format("cust-%07d", math.random(0, n - 1))
  return wrk.format(nil, "/v1/check", nil, '{"customer":"' .. id .. '","feature":"analytics.advanced"}')
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT rps=%.0f p50_us=%d p99_us=%d p999_us=%d non2xx=%d errors=%d\n",
    summary.requests / (summary.duration / 1e6), latency:percentile(50), latency:percentile(99),
    latency:percentile(99.9), e.status, e.connect + e.read + e.write + e.timeout))
end
LUA

cat > "$WORK/ofrep.lua" <<LUA
local n = $CUSTOMERS
math.randomseed(7)
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  local id = string.format("cust-%07d", math.random(0, n - 1))
  return wrk.format(nil, "/ofrep/v1/evaluate/flags/analytics.advanced", nil, '{"context":{"targetingKey":"' .. id .. '"}}')
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT rps=%.0f p50_us=%d p99_us=%d p999_us=%d non2xx=%d errors=%d\n",
    summary.requests / (summary.duration / 1e6), latency:percentile(50), latency:percentile(99),
    latency:percentile(99.9), e.status, e.connect + e.read + e.write + e.timeout))
end
LUA

batch_body=$(python3 -c "
import json
print(json.dumps({'requests': [{'op': 'check', 'customer': 'cust-%07d' % (i * 997 % $CUSTOMERS), 'feature': 'analytics.advanced'} for i in range(100)]}))")
cat > "$WORK/batch.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '$batch_body'
LUA

wait_ready() { # url
  for _ in $(seq 1 300); do curl -fs "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "server at $1 did not become ready" >&2; return 1
}
run_wrk() { # port script seconds
  wrk -t1 -c32 -d"$3"s -s "$2" "http://127.0.0.1:$1" | grep '^RESULT' | sed 's/^RESULT //'
}
field() { echo "$1" | tr ' ' '\n' | sed -n "s/^$2=//p"; }

"$BARE" "127.0.0.1:$PORT_BARE" 1 >/dev/null & PIDS+=($!)
wait_ready "http://127.0.0.1:$PORT_BARE/"
bare=$(run_wrk "$PORT_BARE" "$WORK/check.lua" "$DURATION")
kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true

"$BIN" serve --policies "$WORK/policies" --listen "127.0.0.1:$PORT" --grpc-listen off --workers 1 --reload-debounce 20ms --log warn >/dev/null & PIDS+=($!)
wait_ready "http://127.0.0.1:$PORT/readyz"
check=$(run_wrk "$PORT" "$WORK/check.lua" "$DURATION")
ofrep=$(run_wrk "$PORT" "$WORK/ofrep.lua" "$DURATION")
check2=$(run_wrk "$PORT" "$WORK/check.lua" "$DURATION")
ofrep2=$(run_wrk "$PORT" "$WORK/ofrep.lua" "$DURATION")

echo
echo "== POST /v1/check, 32 connections, 1 server worker, ${DURATION}s, random customer of $CUSTOMERS"
echo "bare hyper:  $bare"
echo "entitled:    $check"
python3 -c "print('ratio entitled/bare = %.2f' % ($(field "$check" rps) / $(field "$bare" rps)))"
echo
echo "== the same question through OFREP, alternated with /v1/check"
echo "check:       $check"
echo "ofrep:       $ofrep"
echo "check again: $check2"
echo "ofrep again: $ofrep2"
python3 -c "print('ratio check/ofrep throughput = %.3f' % (($(field "$check" rps) + $(field "$check2" rps)) / ($(field "$ofrep" rps) + $(field "$ofrep2" rps))))"

hist() { curl -fs "http://127.0.0.1:$PORT/metrics" | awk -v m="entitled_decision_duration_seconds_$1" '$1 == m { print $2 }'; }
s0=$(hist sum); c0=$(hist count)
wrk -t1 -c8 -d"$DURATION"s -s "$WORK/batch.lua" "http://127.0.0.1:$PORT/v1/batch" >"$WORK/batch.out"
s1=$(hist sum); c1=$(hist count)
echo
echo "== POST /v1/batch of 100 checks, 8 connections"
grep -E "Requests/sec|Latency" "$WORK/batch.out" | sed 's/^ *//'
python3 -c "print('server time per batch: %.1f us (histogram sum/count over %d batches)' % (($s1 - $s0) / ($c1 - $c0) * 1e6, $c1 - $c0))"

echo
echo "== reload of the $CUSTOMERS-customer set every 100 ms for ${RELOAD_SECONDS}s, under load"
gen0=$(curl -fs "http://127.0.0.1:$PORT/v1/status" | python3 -c 'import json,sys; print(json.load(sys.stdin)["generation"])')
(
  end=$((SECONDS + RELOAD_SECONDS)); i=0
  while ((SECONDS < end)); do
    i=$((i + 1)); printf '\n# reload %d\n' "$i" >> "$WORK/policies/catalog.yaml"; sleep 0.1
  done
) & writer=$!
reload=$(run_wrk "$PORT" "$WORK/check.lua" "$RELOAD_SECONDS")
wait "$writer"
gen1=$(curl -fs "http://127.0.0.1:$PORT/v1/status" | python3 -c 'import json,sys; print(json.load(sys.stdin)["generation"])')
echo "during reloads: $reload"
echo "snapshots swapped during the run: $((gen1 - gen0))"
kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true

echo
echo "== one-file change to the bundled example set, time until served"
cp -r policies "$WORK/example"
"$BIN" serve --policies "$WORK/example" --listen "127.0.0.1:$PORT" --grpc-listen off --workers 1 --log warn >/dev/null & PIDS+=($!)
wait_ready "http://127.0.0.1:$PORT/readyz"
python3 - "$WORK/example/saas/plans.yaml" "$PORT" <<'PY'
import json, sys, time, urllib.request
path, port = sys.argv[1], sys.argv[2]
def version():
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/status") as r:
        return json.load(r)["snapshot"]["version"]
before = version()
t0 = time.monotonic()
with open(path, "a") as f:
    f.write("\n# changed\n")
while version() == before:
    if time.monotonic() - t0 > 10:
        sys.exit("change not served within 10 s")
    time.sleep(0.005)
print("served %.0f ms after the write (default debounce 100 ms)" % ((time.monotonic() - t0) * 1000))
PY

echo
echo "== OFREP bulk evaluation: every feature of the bundled set for one customer, 8 connections"
features=$(curl -fs "http://127.0.0.1:$PORT/v1/status" | python3 -c 'import json,sys; print(json.load(sys.stdin)["snapshot"]["features"])')
cat > "$WORK/bulk.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"context":{"targetingKey":"acme"}}'
LUA
s0=$(hist sum); c0=$(hist count)
wrk -t1 -c8 -d"$DURATION"s -s "$WORK/bulk.lua" "http://127.0.0.1:$PORT/ofrep/v1/evaluate/flags" >"$WORK/bulk.out"
s1=$(hist sum); c1=$(hist count)
grep -E "Requests/sec|Latency" "$WORK/bulk.out" | sed 's/^ *//'
python3 -c "print('server time per bulk answer of $features features: %.1f us (histogram sum/count over %d answers)' % (($s1 - $s0) / ($c1 - $c0) * 1e6, $c1 - $c0))"
