#!/usr/bin/env bash
# Memory soak of the release binary under sustained mixed load, with nobody scraping
# /metrics: RSS must stay flat. (The Prometheus recorder keeps every histogram sample
# until it folds them into buckets; the sidecar runs that upkeep itself every 5 s, so
# a sidecar whose scraper is down does not grow.) Loopback only, bounded in time.
#
#   bash benches/soak.sh                          # 10 minutes, no scrape, --durability memory
#   DURATION=120 bash benches/soak.sh             # shorter
#   SCRAPE_EVERY=2 bash benches/soak.sh           # the same with a scrape every 2 s
#   DURABILITY=async bash benches/soak.sh         # with the journal and ledger
#   BIN=path/to/entitled bash benches/soak.sh     # another build (no cargo build)
#
# Load: wrk, 16 connections, random customers of a 100k set; per request one of a flag
# check, a quota consume or a rate-limited consume. RSS (VmRSS) is sampled every
# SAMPLE seconds; the last line compares the first sample after warm-up with the last.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-600}
SAMPLE=${SAMPLE:-10}
SCRAPE_EVERY=${SCRAPE_EVERY:-0}
DURABILITY=${DURABILITY:-memory}
CUSTOMERS=${CUSTOMERS:-100000}
PORT=${PORT:-4796}
WORK=$(mktemp -d /tmp/entitled-soak.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

command -v wrk >/dev/null || { echo "wrk is needed: apt-get install wrk" >&2; exit 1; }
if [ -z "${BIN:-}" ]; then
  cargo build --release --quiet --bin entitled
  BIN=target/release/entitled
fi

mkdir -p "$WORK/policies"
python3 - "$WORK/policies" "$CUSTOMERS" <<'PY'
import json, sys
d, n = sys.argv[1], int(sys.argv[2])
open(f"{d}/catalog.yaml", "w").write("""
features:
  analytics.advanced: { kind: flag }
  api.calls: { kind: quota }
  api.rate: { kind: rate }
plans:
  pro:
    grants:
      analytics.advanced: true
      api.calls: { limit: 1000000000000, per: month }
      api.rate: { limit: 1000000, per: 1s }
""")
with open(f"{d}/customers.ndjson", "w") as f:
    for i in range(n):
        f.write(json.dumps({"id": f"cust-{i:07d}", "subscriptions": [{"plan": "pro", "starts": "2025-01-01"}]}) + "\n")
PY

cat > "$WORK/mixed.lua" <<LUA
local n = $CUSTOMERS
math.randomseed(11)
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local bodies = {
  {"/v1/check", '","feature":"analytics.advanced"}'},
  {"/v1/consume", '","feature":"api.calls","amount":1}'},
  {"/v1/consume", '","feature":"api.rate","amount":1}'},
}
request = function()
  local b = bodies[math.random(1, 3)]
  local id = string.format("cust-%07d", math.random(0, n - 1))
  return wrk.format(nil, b[1], nil, '{"customer":"' .. id .. b[2])
end
LUA

"$BIN" serve --policies "$WORK/policies" --listen "127.0.0.1:$PORT" --grpc-listen off \
  --durability "$DURABILITY" --state-dir "$WORK/state" --log warn >/dev/null & PIDS+=($!)
SERVER=${PIDS[-1]}
for _ in $(seq 1 300); do curl -fs "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break; sleep 0.1; done

rss_mb() { awk '/^VmRSS/ { printf "%.0f", $2 / 1024 }' "/proc/$SERVER/status"; }
if ((SCRAPE_EVERY > 0)); then
  ( while :; do curl -fs "http://127.0.0.1:$PORT/metrics" >/dev/null || true; sleep "$SCRAPE_EVERY"; done ) & PIDS+=($!)
fi
wrk -t1 -c16 -d"${DURATION}s" -s "$WORK/mixed.lua" "http://127.0.0.1:$PORT" >"$WORK/wrk.out" & PIDS+=($!)
WRK=${PIDS[-1]}

echo "soak: ${DURATION}s, durability $DURABILITY, scrape every ${SCRAPE_EVERY}s (0: never), RSS in MB every ${SAMPLE}s"
samples=()
start=$SECONDS
while kill -0 "$WRK" 2>/dev/null; do
  sleep "$SAMPLE"
  kill -0 "$WRK" 2>/dev/null || break
  r=$(rss_mb); samples+=("$r")
  printf 't=%4ds rss=%s MB\n' $((SECONDS - start)) "$r"
done
wait "$WRK" || true
grep -E "Requests/sec|Non-2xx|Socket errors" "$WORK/wrk.out" | sed 's/^ *//'
if ((${#samples[@]} >= 3)); then
  python3 - "${samples[@]}" <<'PY'
import sys
s = [int(x) for x in sys.argv[1:]]
# Counters and limiters are created as customers are first hit (100k customers of
# random traffic take a minute or two to all appear): judge the second half.
half = s[len(s) // 2]
print(f"RSS first {s[0]} MB, at half time {half} MB, last {s[-1]} MB, max {max(s)} MB; "
      f"second half {s[-1] - half:+d} MB")
PY
fi
