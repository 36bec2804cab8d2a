#!/usr/bin/env bash
# The cost of sharing usage through Redis, on this machine (loopback only, every run
# bounded in time), measured in one run against a redis-server of its own:
#
# 1. POST /v1/consume latency, one connection at a time (wrk -c1): p50/p99 for the
#    memory store, strict mode (one Lua script per consume) and cached mode.
#    Target: strict p50 <= 0.5 ms.
# 2. POST /v1/consume throughput at 64 connections for the same three.
#    Target: cached >= 80% of the memory store.
# 3. Flag checks never touch Redis: Redis's own command count before and after a run
#    of flag checks.
#
#   bash benches/redis.sh              # ~1.5 min
#   DURATION=5 bash benches/redis.sh   # shorter
#
# The server gets one worker thread (as in load.sh); wrk and redis-server share the
# other core, so strict mode's numbers include Redis's own CPU on this 2-core machine.
# All three run with the same --durability (DURABILITY, default memory: no journal or
# ledger), so the comparison is of the stores alone; DURABILITY=async adds the
# journal to all three.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
DURABILITY=${DURABILITY:-memory}
CUSTOMERS=${CUSTOMERS:-10000}
PORT=${PORT:-4795}
WORK=$(mktemp -d /tmp/entitled-redis.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

command -v wrk >/dev/null || { echo "wrk is needed: apt-get install wrk" >&2; exit 1; }
command -v redis-server >/dev/null || { echo "redis-server is needed: apt-get install redis-server" >&2; exit 1; }
cargo build --release --quiet --bin entitled
BIN=target/release/entitled

RPORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --port "$RPORT" --save "" --appendonly no --daemonize no >"$WORK/redis.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 100); do redis-cli -p "$RPORT" ping >/dev/null 2>&1 && break; sleep 0.05; done

mkdir -p "$WORK/policies"
python3 - "$WORK/policies" "$CUSTOMERS" <<'PY'
import json, sys
d, n = sys.argv[1], int(sys.argv[2])
open(f"{d}/catalog.yaml", "w").write("""
features:
  api.calls: { kind: quota }
  sso: { kind: flag }
plans:
  bench:
    grants:
      api.calls: { limit: 1000000000000, per: month }
      sso: true
""")
with open(f"{d}/customers.ndjson", "w") as f:
    for i in range(n):
        f.write(json.dumps({"id": f"cust-{i:06d}", "subscriptions": [{"plan": "bench", "starts": "2025-01-01"}]}) + "\n")
PY

script() { # path feature
  cat > "$WORK/$2.lua" <<LUA
local n = $CUSTOMERS
math.randomseed(7)
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  local id = string.format("cust-%06d", math.random(0, n - 1))
  return wrk.format(nil, "$1", nil, '{"customer":"' .. id .. '","feature":"$2"}')
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("rps=%.0f p50_us=%d p99_us=%d non2xx=%d errors=%d\n",
    summary.requests / (summary.duration / 1e6), latency:percentile(50), latency:percentile(99),
    e.status, e.connect + e.read + e.write + e.timeout))
end
LUA
}
script /v1/consume api.calls
script /v1/check sso

start() { # extra flags...
  "$BIN" serve --policies "$WORK/policies" --listen "127.0.0.1:$PORT" --grpc-listen off --workers 1 \
    --state-dir "$WORK/state-$RANDOM" --log error "$@" >/dev/null &
  SERVER=$!; PIDS+=("$SERVER")
  for _ in $(seq 1 300); do curl -fs "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "server did not become ready" >&2; exit 1
}
stop() { kill "$SERVER"; wait "$SERVER" 2>/dev/null || true; }
load() { # connections seconds lua
  wrk -t1 -c"$1" -d"$2"s -s "$WORK/$3.lua" "http://127.0.0.1:$PORT" | grep '^rps='
}

declare -A LAT TPUT
for mode in memory strict cached; do
  case $mode in
    memory) start --durability "$DURABILITY" ;;
    strict) start --durability "$DURABILITY" --store "redis://127.0.0.1:$RPORT" --store-mode strict --store-prefix "b$RANDOM" ;;
    cached) start --durability "$DURABILITY" --store "redis://127.0.0.1:$RPORT" --store-mode cached --store-prefix "b$RANDOM" ;;
  esac
  load 8 2 api.calls >/dev/null # warm-up
  LAT[$mode]=$(load 1 "$DURATION" api.calls)
  TPUT[$mode]=$(load 64 "$DURATION" api.calls)
  echo "$mode: one connection: ${LAT[$mode]}"
  echo "$mode: 64 connections: ${TPUT[$mode]}"
  if [ "$mode" = strict ]; then
    before=$(redis-cli -p "$RPORT" info stats | sed -n 's/^total_commands_processed:\([0-9]*\).*/\1/p')
    checks=$(load 8 2 sso)
    after=$(redis-cli -p "$RPORT" info stats | sed -n 's/^total_commands_processed:\([0-9]*\).*/\1/p')
    echo "strict: flag checks: $checks; Redis commands meanwhile: $((after - before - 1)) (the INFO itself excluded)"
  fi
  stop
done

field() { echo "$1" | tr ' ' '\n' | sed -n "s/^$2=//p"; }
echo
echo "== POST /v1/consume, random customer of $CUSTOMERS, ${DURATION}s runs, server --workers 1, --durability $DURABILITY"
python3 - "$(field "${LAT[strict]}" p50_us)" "$(field "${TPUT[memory]}" rps)" "$(field "${TPUT[cached]}" rps)" "$(field "${TPUT[strict]}" rps)" <<'PY'
import sys
p50, mem, cached, strict = map(float, sys.argv[1:])
print("strict p50 at one connection: %.0f us   target <= 500 us: %s" % (p50, "met" if p50 <= 500 else "MISSED"))
print("cached/memory throughput: %.2f   target >= 0.80: %s" % (cached / mem, "met" if cached / mem >= 0.8 else "MISSED"))
print("strict/memory throughput: %.2f" % (strict / mem))
PY
