#!/usr/bin/env bash
# What an idle entitled costs: the release binary serves the bundled policies/ with no
# requests coming, and after a settling pause this reports, over WINDOW seconds (10),
# the CPU time it used and how often each of its threads woke up (voluntary context
# switches, from /proc). A sidecar sits beside every instance of an application, most
# of them quiet most of the time; this number is paid by all of them.
#
#   bash benches/idle.sh
#   WINDOW=30 bash benches/idle.sh
set -euo pipefail
cd "$(dirname "$0")/.."
WINDOW=${WINDOW:-10}
SETTLE=${SETTLE:-3}
cargo build --release --quiet
BIN=target/release/entitled
state=$(mktemp -d)
log=$(mktemp)
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$state" "$log"' EXIT
"$BIN" serve --policies policies --listen 127.0.0.1:0 --grpc-listen off \
  --state-dir "$state" >"$log" 2>/dev/null &
pid=$!
for _ in $(seq 1 100); do
  grep -q "listening on" "$log" && break
  sleep 0.1
done
grep -q "listening on" "$log" || { echo "entitled did not start" >&2; exit 1; }
addr=$(sed -n 's/.*listening on http:\/\///p' "$log" | head -1)
# One request, so the measured quiet follows traffic, as it would in production.
curl -sf "http://$addr/readyz" >/dev/null
sleep "$SETTLE"
tick=$(getconf CLK_TCK)
cpu() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
wakeups() {
  for t in /proc/"$pid"/task/*; do
    printf '%s %s\n' "$(cut -c1-15 "$t/comm" | tr ' ' _)-${t##*/}" \
      "$(awk '/^voluntary_ctxt_switches/ {print $2}' "$t/status")"
  done | sort
}
c0=$(cpu); w0=$(wakeups)
sleep "$WINDOW"
c1=$(cpu); w1=$(wakeups)
echo "idle for ${WINDOW} s: $(((c1 - c0) * 1000 / tick)) ms of CPU"
join <(echo "$w0") <(echo "$w1") | awk -v w="$WINDOW" '{ d = $3 - $2; total += d; if (d > 0) printf "  %-28s %7.1f wake-ups/s\n", $1, d / w } END { printf "  %-28s %7.1f wake-ups/s\n", "all threads", total / w }'
