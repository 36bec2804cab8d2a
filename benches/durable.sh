#!/usr/bin/env bash
# Cost of durable usage, on this machine (loopback only, every run bounded in time):
# POST /v1/consume throughput and latency with --durability memory, async (the
# default) and sync, measured in one run, and how the journal group-commits in sync
# mode, from the server's own metrics.
#
#   bash benches/durable.sh                      # all of it (~2 min, plus a release build if needed)
#   DURATION=5 ROUNDS=1 bash benches/durable.sh  # shorter
#
# Setup, the same for the three modes: 64 connections, each request consumes 1 unit
# of `api.calls` for a random customer of a 100k-customer policy set, on a monthly
# quota of 10^12 (never runs out: every consume is admitted, so every one is
# journaled in the durable modes). As in load.sh the server gets one worker thread
# and wrk the other core: on this 2-core machine that keeps client and server off
# each other's core, so a mode that costs more on the request path shows up as fewer
# requests per second, instead of being hidden by (or stolen from) the load
# generator. The journal writer is a thread of its own in the durable modes and
# shares the machine like everything else: its cost is part of what is measured.
# (WORKERS=2, measured once: memory fell to ~101k req/s from ~110k and p99 tripled,
# the second worker fighting wrk for a core; sync rose to ~69k.)
# Every (round, mode) starts a new server, durable modes on a fresh, empty state
# directory; a short warm-up creates the counters first.
#
# The modes run one after the other, ROUNDS times, interleaved, so that noise from
# other work on the machine spreads over all three; every run is printed and the
# summary quotes the median and the range. Beside req/s, each run reports the server's
# CPU time per consume (worker and journal threads, from /proc: steadier than req/s
# on a shared machine) and the CPU other processes used meanwhile (`other`, in
# cores: above ~0.1 the run was disturbed).
#
# 1. req/s, p50 and p99 latency for memory, async and sync; the ratio async/memory
#    (target >= 0.85) and sync throughput (target >= 10,000 consumes/s).
# 2. The journal's flushes in the measured run, from the server's metrics (deltas):
#    entitled_journal_flushes_total, entitled_journal_flush_duration_seconds_sum and
#    _count (write + fdatasync), and consumes per flush (the group commit size in
#    sync mode), from the admitted consumes in entitled_decisions_total.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
ROUNDS=${ROUNDS:-3}
CONNECTIONS=${CONNECTIONS:-64}
WRK_THREADS=${WRK_THREADS:-1}
WORKERS=${WORKERS:-1}
CUSTOMERS=${CUSTOMERS:-100000}
PORT=${PORT:-4796}
MODES=(memory async sync)
WORK=$(mktemp -d /tmp/entitled-durable.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

command -v wrk >/dev/null || { echo "wrk is needed: apt-get install wrk" >&2; exit 1; }
cargo build --release --quiet --bin entitled
BIN=target/release/entitled
HZ=$(getconf CLK_TCK)

echo "generating $CUSTOMERS customers"
mkdir -p "$WORK/policies"
python3 - "$WORK/policies" "$CUSTOMERS" <<'PY'
import json, random, sys
d, n = sys.argv[1], int(sys.argv[2])
open(f"{d}/catalog.yaml", "w").write("""
features:
  api.calls: { kind: quota, combine: sum }
plans:
  bench:
    grants:
      api.calls: { limit: 1000000000000, per: month }
""")
rnd = random.Random(42)
with open(f"{d}/customers.ndjson", "w") as f:
    for i in range(n):
        m, day = rnd.randint(1, 12), rnd.randint(1, 28)
        f.write(json.dumps({"id": f"cust-{i:07d}", "name": f"Customer {i}",
            "subscriptions": [{"plan": "bench", "starts": f"2025-{m:02d}-{day:02d}"}]}) + "\n")
PY

cat > "$WORK/consume.lua" <<LUA
local n = $CUSTOMERS
math.randomseed(11)
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  local id = string.format("cust-%07d", math.random(0, n - 1))
  return wrk.format(nil, "/v1/consume", nil, '{"customer":"' .. id .. '","feature":"api.calls","amount":1}')
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT rps=%.0f p50_us=%d p99_us=%d p999_us=%d requests=%d non2xx=%d errors=%d\n",
    summary.requests / (summary.duration / 1e6), latency:percentile(50), latency:percentile(99),
    latency:percentile(99.9), summary.requests, e.status, e.connect + e.read + e.write + e.timeout))
end
LUA

wait_ready() { # url
  for _ in $(seq 1 300); do curl -fs "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "server at $1 did not become ready" >&2; return 1
}
run_wrk() { # seconds: the RESULT line, then wrk's CPU ticks (from `times` in a subshell)
  (
    wrk -t"$WRK_THREADS" -c"$CONNECTIONS" -d"$1"s -s "$WORK/consume.lua" "http://127.0.0.1:$PORT" |
      grep '^RESULT' | sed 's/^RESULT //'
    times >"$WORK/times" # not in a pipe: a forked `times` would see no children
    sed -n 2p "$WORK/times" | awk -v hz="$HZ" '{
      t = 0; for (i = 1; i <= 2; i++) { split($i, a, "m"); sub("s", "", a[2]); t += a[1] * 60 + a[2] }
      printf "wrk_ticks=%d\n", t * hz }'
  ) | paste -sd' '
}
field() { echo "$1" | tr ' ' '\n' | sed -n "s/^$2=//p"; }
metric() { # file name: an unlabelled sample, 0 if absent
  awk -v m="$2" '$1 == m { v = $2 } END { printf "%.9f\n", v + 0 }' "$1"
}
consumes() { # file allowed: consume decisions with allowed="true"/"false"
  awk -v a="allowed=\"$2\"" '/^entitled_decisions_total\{/ && /op="consume"/ && index($0, a) { s += $2 } END { print s + 0 }' "$1"
}
threads() { # pid: CPU ticks by thread name (worker, journal, other)
  for t in /proc/"$1"/task/*/stat; do cat "$t" 2>/dev/null || true; done | awk '{
    s = $0; name = s; sub(/^[^(]*\(/, "", name); sub(/\).*/, "", name)
    sub(/^.*\) /, "", s); split(s, f, " "); ticks = f[12] + f[13]
    if (name ~ /worker/) w += ticks; else if (name ~ /journa/) j += ticks; else o += ticks
  } END { printf "worker=%d journal=%d rest=%d\n", w, j, o }'
}
busy() { # machine-wide busy ticks (all but idle and iowait), and steal
  awk '/^cpu / { printf "busy=%d steal=%d\n", $2 + $3 + $4 + $7 + $8 + $9, $9 }' /proc/stat
}

run_mode() { # round mode
  local r=$1 mode=$2 tag="$1-$2" pid
  mkdir -p "$WORK/state-$tag"
  "$BIN" serve --policies "$WORK/policies" --listen "127.0.0.1:$PORT" --grpc-listen off --workers "$WORKERS" \
    --state-dir "$WORK/state-$tag" --durability "$mode" --log error >/dev/null &
  pid=$!; PIDS+=("$pid")
  wait_ready "http://127.0.0.1:$PORT/readyz"
  run_wrk "$WARMUP" >/dev/null
  curl -fs "http://127.0.0.1:$PORT/metrics" >"$WORK/m0-$tag"
  local t0 b0 res t1 b1
  t0=$(threads "$pid"); b0=$(busy)
  res=$(run_wrk "$DURATION")
  t1=$(threads "$pid"); b1=$(busy)
  curl -fs "http://127.0.0.1:$PORT/metrics" >"$WORK/m1-$tag"
  kill "$pid"; wait "$pid" 2>/dev/null || true
  local m0="$WORK/m0-$tag" m1="$WORK/m1-$tag"
  python3 - "$mode" "$DURATION" "$HZ" "$res" "$t0" "$t1" "$b0" "$b1" \
    "$(consumes "$m0" true) $(consumes "$m1" true) $(consumes "$m0" false) $(consumes "$m1" false)" \
    "$(for f in "$m0" "$m1"; do for n in flushes_total flush_duration_seconds_sum flush_duration_seconds_count bytes_total; do
         metric "$f" "entitled_journal_$n"; done; done | paste -sd' ')" <<'PY' | tee -a "$WORK/runs"
import sys
mode, secs, hz = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
kv = lambda s: {k: float(v) for k, v in (x.split("=") for x in s.split())}
res, t0, t1, b0, b1 = (kv(a) for a in sys.argv[4:9])
a0, a1, d0, d1 = map(float, sys.argv[9].split())
m = list(map(float, sys.argv[10].split()))
admitted, denied = a1 - a0, d1 - d0
cpu = {k: (t1[k] - t0[k]) / hz for k in t0}
wrk = res["wrk_ticks"] / hz
other = max((b1["busy"] - b0["busy"]) / hz - sum(cpu.values()) - wrk, 0) / secs
flushes, fsum, fcnt, fbytes = m[4] - m[0], m[5] - m[1], m[6] - m[2], m[7] - m[3]
out = dict(mode=mode, rps=res["rps"], p50_us=res["p50_us"], p99_us=res["p99_us"], p999_us=res["p999_us"],
           worker_us=cpu["worker"] / admitted * 1e6, journal_us=cpu["journal"] / admitted * 1e6,
           other=other, steal=(b1["steal"] - b0["steal"]) / hz / secs,
           flushes_per_s=flushes / secs, flush_ms=fsum / max(fcnt, 1) * 1e3, flush_busy=fsum / secs,
           per_flush=admitted / max(flushes, 1), bytes_per_consume=fbytes / max(admitted, 1))
bad = res["non2xx"] + res["errors"] + denied
print("RUN " + " ".join("%s=%s" % (k, v if isinstance(v, str) else ("%.4g" % v)) for k, v in out.items())
      + ("" if bad == 0 else " BAD(non2xx=%d errors=%d denied=%d)" % (res["non2xx"], res["errors"], denied)))
PY
}

for r in $(seq 1 "$ROUNDS"); do
  for mode in "${MODES[@]}"; do run_mode "$r" "$mode"; done
done

echo
echo "== POST /v1/consume, $CONNECTIONS connections, $WORKERS server worker(s), wrk -t$WRK_THREADS, ${DURATION}s runs after ${WARMUP}s warm-up, $ROUNDS round(s), random customer of $CUSTOMERS"
python3 - "$WORK/runs" <<'PY'
import statistics, sys
runs = [dict(kv.split("=", 1) for kv in l.split()[1:] if "=" in kv) for l in open(sys.argv[1]) if l.startswith("RUN ")]
by = {}
for r in runs:
    by.setdefault(r["mode"], []).append({k: float(v) for k, v in r.items() if k != "mode" and not v.startswith("BAD")})
def q(mode, k, fmt="%.0f"):
    v = [r[k] for r in by[mode]]
    med = statistics.median(v)
    return (fmt % med) + ("" if len(v) == 1 else " [" + fmt % min(v) + ".." + fmt % max(v) + "]")
print("median [min..max] over rounds; CPU in us per consume")
for mode in ("memory", "async", "sync"):
    print("%-7s req/s %-24s p50 %-18s p99 %-20s worker %-18s journal %s" % (mode + ":", q(mode, "rps"),
          q(mode, "p50_us") + " us", q(mode, "p99_us") + " us", q(mode, "worker_us", "%.2f"), q(mode, "journal_us", "%.2f")))
rounds = list(zip(by["memory"], by["async"], by["sync"]))
ra = [a["rps"] / m["rps"] for m, a, _ in rounds]
rs = [s["rps"] / m["rps"] for m, _, s in rounds]
ca = [m["worker_us"] / (a["worker_us"] + a["journal_us"]) for m, a, _ in rounds]
syn = statistics.median(s["rps"] for _, _, s in rounds)
rng = lambda v: "%.2f" % statistics.median(v) + ("" if len(v) == 1 else " [%.2f..%.2f]" % (min(v), max(v)))
print("ratio async/memory req/s = %s (per round)   target >= 0.85: %s" % (rng(ra), "met" if statistics.median(ra) >= 0.85 else "MISSED"))
print("      async/memory by server CPU per consume (memory / (async worker + journal)) = %s" % rng(ca))
print("ratio sync/memory req/s  = %s" % rng(rs))
print("sync throughput = %.0f consumes/s (median)   target >= 10000: %s" % (syn, "met" if syn >= 10000 else "MISSED"))
print("other load during the runs (cores busy outside entitled and wrk): %s" % ", ".join("%.2f" % r["other"] for r in (x for rr in rounds for x in rr)))
print()
print("== journal during the measured runs (server metrics, deltas; flush = write + fdatasync of one batch)")
for mode in ("async", "sync"):
    print("%-6s flushes/s %-22s mean flush %-22s consumes/flush %-18s writer in fsync %s" % (mode + ":",
          q(mode, "flushes_per_s"), q(mode, "flush_ms", "%.3f") + " ms", q(mode, "per_flush", "%.1f"),
          q(mode, "flush_busy", "%.2f") + " of the run"))
print("journal bytes per consume: %s" % q("sync", "bytes_per_consume", "%.1f"))
PY
