#!/usr/bin/env bash
# Latency of the operator console and the customer portal pages on the release
# binary serving N generated customers: a console search that matches nothing (a full
# scan of the customer table), a search that matches, the console overview (renewals
# within 90 days over every customer) and one customer's portal page.
#
#   bash benches/console.sh                 # 1,000,000 customers, 20 requests each
#   CUSTOMERS=100000 RUNS=10 bash benches/console.sh
#
# Prints the median and the worst time_total (curl, loopback, one request at a time).
set -euo pipefail
cd "$(dirname "$0")/.."

CUSTOMERS=${CUSTOMERS:-1000000}
RUNS=${RUNS:-20}
BIN=${BIN:-target/release/entitled}
WORK=$(mktemp -d)
PID=
trap '[ -n "$PID" ] && kill "$PID" 2>/dev/null; rm -rf "$WORK"' EXIT

[ -n "${BIN_BUILT:-}" ] || cargo build --release --quiet --bin entitled

source benches/common/bench.sh
bench_policies "$WORK/policies" "$CUSTOMERS"
head -c 48 /dev/urandom | base64 > "$WORK/portal.key"
echo "ops:bench-admin-token" > "$WORK/admins"
bench_serve "$WORK/policies" "$WORK/log" --durability memory \
  --portal-key-file "$WORK/portal.key" --admin-token-file "$WORK/admins"
base="http://127.0.0.1:$PORT"
token=$("$BIN" portal-token --customer cust-0000042 --key-file "$WORK/portal.key" 2>/dev/null)

measure() {
  local name=$1 path=$2 auth=${3:-}
  local times=()
  for _ in $(seq "$RUNS"); do
    if [ -n "$auth" ]; then
      times+=("$(curl -s -o /dev/null -w '%{time_total}' -H "authorization: Bearer $auth" "$base$path")")
    else
      times+=("$(curl -s -o /dev/null -w '%{time_total}' "$base$path")")
    fi
  done
  printf '%s\n' "${times[@]}" | sort -n | awk -v name="$name" '
    { t[NR] = $1 } END { printf "%-34s median %7.1f ms   max %7.1f ms\n", name, t[int((NR + 1) / 2)] * 1000, t[NR] * 1000 }'
}

echo "$CUSTOMERS customers, $RUNS requests each"
measure "console search, no match"   "/console?q=no-such-customer" bench-admin-token
measure "console search, 1 match"    "/console?q=cust-0999999"     bench-admin-token
measure "console overview"            "/console"                    bench-admin-token
measure "portal page"                 "/portal?token=$token"
