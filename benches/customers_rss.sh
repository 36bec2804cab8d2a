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

mkdir -p "$WORK/policies"
python3 - "$WORK/policies" "$CUSTOMERS" <<'PY'
import json, random, sys
d, n = sys.argv[1], int(sys.argv[2])
open(f"{d}/catalog.yaml", "w").write("""
features:
  analytics.advanced: { kind: flag }
  api.calls: { kind: quota }
plans:
  free:
    grants:
      api.calls: { limit: 1000, per: month }
  pro:
    includes: [free]
    grants:
      analytics.advanced: true
      api.calls: { limit: 100000, per: month }
""")
rnd = random.Random(42)
with open(f"{d}/customers.ndjson", "w") as f:
    for i in range(n):
        m, day = rnd.randint(1, 12), rnd.randint(1, 28)
        f.write(json.dumps({"id": f"cust-{i:07d}", "subscriptions": [
            {"plan": rnd.choice(["free", "pro"]), "starts": f"2025-{m:02d}-{day:02d}"}]}) + "\n")
PY
echo "$CUSTOMERS customers: $(du -m "$WORK/policies/customers.ndjson" | cut -f1) MB of NDJSON"

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$BIN" serve --policies "$WORK/policies" --listen "127.0.0.1:$PORT" --grpc-listen off \
  --durability memory >"$WORK/log" 2>&1 &
PID=$!
start=$(date +%s.%N)
for _ in $(seq 1 600); do
  curl -fs "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break
  kill -0 "$PID" 2>/dev/null || { cat "$WORK/log"; exit 1; }
  sleep 0.2
done
ready=$(date +%s.%N)
rss() { awk -v k="$1" '$1 == k":" {printf "%d", $2 / 1024}' "/proc/$PID/status"; }
echo "ready after $(python3 -c "print(round($ready - $start, 2))") s; RSS $(rss VmRSS) MB, peak $(rss VmHWM) MB"
curl -fs "http://127.0.0.1:$PORT/v1/check" -d '{"customer":"cust-0000007","feature":"api.calls"}' >/dev/null
sleep "$SETTLE"
echo "steady after ${SETTLE} s idle: RSS $(rss VmRSS) MB"
