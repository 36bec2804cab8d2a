#!/usr/bin/env bash
# Resident memory of the release binary serving N customers (one subscription each,
# NDJSON): right after the load, and steady (after SETTLE seconds idle, when the
# allocator has had time to give the load's transient memory back).
#
#   bash benches/customers_rss.sh            # 1,000,000 customers, 30 s settle
#   CUSTOMERS=100000 SETTLE=10 bash benches/customers_rss.sh
#
# Prints RSS in MB at ready, the peak (VmHWM) and steady. Loopback only; the server
# runs with --durability memory and is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

CUSTOMERS=${CUSTOMERS:-1000000}
SETTLE=${SETTLE:-30}
BIN=${BIN:-target/release/entitled}
WORK=$(mktemp -d)
PID=
trap '[ -n "$PID" ] && kill "$PID" 2>/dev/null; rm -rf "$WORK"' EXIT

[ -n "${BIN_BUILT:-}" ] || cargo build --release --quiet --bin entitled

source benches/common/bench.sh
bench_policies "$WORK/policies" "$CUSTOMERS"
echo "$CUSTOMERS customers: $(du -m "$WORK/policies/customers-000.ndjson" | cut -f1) MB of NDJSON"

start=$(date +%s.%N)
bench_serve "$WORK/policies" "$WORK/log" --durability memory
ready=$(date +%s.%N)
rss() { awk -v k="$1" '$1 == k":" {printf "%d", $2 / 1024}' "/proc/$PID/status"; }
echo "ready after $(python3 -c "print(round($ready - $start, 2))") s; RSS $(rss VmRSS) MB, peak $(rss VmHWM) MB"
curl -fs "http://127.0.0.1:$PORT/v1/check" -d '{"customer":"cust-0000007","feature":"api.calls"}' >/dev/null
sleep "$SETTLE"
echo "steady after ${SETTLE} s idle: RSS $(rss VmRSS) MB"
