#!/usr/bin/env bash
# Customer writes across replicas through Redis, on the release binary: a
# redis-server of its own whose shared snapshot is seeded with N customer records
# (one subscription each, written as the write API writes them); three replicas A,
# B and C started from nothing (each loads the N records from Redis); then a paced
# writer sends `PUT /v1/customers/{id}` to A at RATE writes a second for DURATION
# seconds, and for every acknowledged write a check with `min_revision` (the write's
# revision) goes to B and to C at once: its answer time after A's acknowledgement
# is how long the write took to be served there. Finally a fourth replica D starts
# cold and is timed until /readyz answers (it has every record).
#
#   bash benches/replicas.sh                                  # 1M customers, 500 writes/s, 10 s
#   CUSTOMERS=100000 RATE=200 DURATION=5 bash benches/replicas.sh
#
# Needs redis-server and redis-cli. Loopback only; everything is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

CUSTOMERS=${CUSTOMERS:-1000000}
RATE=${RATE:-500}
DURATION=${DURATION:-10}
WRITERS=${WRITERS:-4}
BIN=${BIN:-target/release/entitled}
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

command -v redis-server >/dev/null || { echo "redis-server is needed" >&2; exit 1; }
[ -n "${BIN_BUILT:-}" ] || cargo build --release --quiet --bin entitled

source benches/common/bench.sh
bench_policies "$WORK/policies" 0
echo "bench:$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')" > "$WORK/tokens"
TOKEN=$(cut -d: -f2 "$WORK/tokens")

RPORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --port "$RPORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$WORK" \
  >"$WORK/redis.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 100); do redis-cli -p "$RPORT" ping >/dev/null 2>&1 && break; sleep 0.1; done

echo "seeding the shared snapshot with $CUSTOMERS customer records..."
python3 - "$CUSTOMERS" <<'PY' | redis-cli -p "$RPORT" --pipe >/dev/null
import json, random, sys
n = int(sys.argv[1])
out = sys.stdout.buffer
def cmd(*args):
    b = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        b.append(b"$%d\r\n%s\r\n" % (len(a), a))
    out.write(b"".join(b))
records = "{entitled:customers}:records"
rnd = random.Random(42)
for i in range(n):
    cid = f"cust-{i:07d}"
    m, day = rnd.randint(1, 12), rnd.randint(1, 28)
    e = {"op": "put", "id": cid, "record": {"id": cid, "subscriptions": [
        {"plan": rnd.choice(["free", "pro"]), "starts": f"2025-{m:02d}-{day:02d}"}]},
        "by": "bench", "at": "2025-01-01T00:00:00Z"}
    cmd("HSET", records, cid, f"{i + 1} " + json.dumps(e, separators=(",", ":")))
cmd("HSET", "{entitled:customers}:meta", "epoch", "bench-epoch", "revision", n)
PY

# Starts replica $1, sets PORT_$1; prints seconds until /readyz answers.
replica() {
  local name=$1
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  local t0
  t0=$(date +%s.%N)
  "$BIN" serve --policies "$WORK/policies" --listen "127.0.0.1:$port" --grpc-listen off \
    --state-dir "$WORK/state-$name" --admin-token-file "$WORK/tokens" \
    --store "redis://127.0.0.1:$RPORT" --store-timeout 200ms --revision-wait 5s \
    >"$WORK/log-$name" 2>&1 &
  PIDS+=($!)
  local pid=$!
  for _ in $(seq 1 1200); do
    if curl -fs "http://127.0.0.1:$port/readyz" >/dev/null 2>&1; then
      printf -v "PORT_$name" '%s' "$port"
      echo "replica $name ready in $(python3 -c "print(f'{$(date +%s.%N) - $t0:.2f}')") s"
      return 0
    fi
    kill -0 "$pid" 2>/dev/null || { cat "$WORK/log-$name"; exit 1; }
    sleep 0.05
  done
  echo "replica $name not ready after 60 s" >&2
  exit 1
}

replica a
replica b
replica c
for n in a b c; do
  p="PORT_$n"
  rss=$(ps -o rss= -p "$(pgrep -f "listen 127.0.0.1:${!p}" | head -1)" 2>/dev/null || echo 0)
  echo "replica $n: RSS $((rss / 1024)) MB"
done

python3 - "$PORT_a" "$PORT_b" "$PORT_c" "$TOKEN" "$RATE" "$DURATION" "$WRITERS" "$CUSTOMERS" <<'PY'
import http.client, json, queue, sys, threading, time
pa, pb, pc, token = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
rate, duration, writers, n = int(sys.argv[5]), float(sys.argv[6]), int(sys.argv[7]), int(sys.argv[8])
start = time.perf_counter() + 0.3
lock = threading.Lock()
ack_lat, errors = [], []
served = {pb: [], pc: []}
stale = {pb: 0, pc: 0}
queues = {pb: queue.Queue(), pc: queue.Queue()}

def writer(w):
    c = http.client.HTTPConnection("127.0.0.1", int(pa))
    every = writers / rate
    k = 0
    while True:
        due = start + w / rate + k * every
        if due - start >= duration:
            return
        now = time.perf_counter()
        if due > now:
            time.sleep(due - now)
        i = (w * 7919 + k * 104729) % n
        body = json.dumps({"subscriptions": [{"plan": "pro" if k % 2 else "free", "starts": "2025-06-01"}]})
        t0 = time.perf_counter()
        c.request("PUT", f"/v1/customers/cust-{i:07d}", body,
                  {"authorization": f"Bearer {token}", "content-type": "application/json"})
        r = c.getresponse()
        data = r.read()
        t1 = time.perf_counter()
        if r.status == 200:
            rev = json.loads(data)["revision"]
            with lock:
                ack_lat.append(t1 - t0)
            for q in queues.values():
                q.put((f"cust-{i:07d}", rev, t1))
        else:
            with lock:
                errors.append(r.status)
        k += 1

def checker(port):
    c = http.client.HTTPConnection("127.0.0.1", int(port))
    q = queues[port]
    while True:
        item = q.get()
        if item is None:
            return
        cid, rev, acked = item
        body = json.dumps({"customer": cid, "feature": "analytics.advanced", "min_revision": rev})
        c.request("POST", "/v1/check", body, {"content-type": "application/json"})
        r = c.getresponse()
        r.read()
        t = time.perf_counter()
        with lock:
            if r.status == 200:
                served[port].append(t - acked)
            else:
                stale[port] += 1

ws = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
cs = [threading.Thread(target=checker, args=(p,)) for p in (pb, pc) for _ in range(4)]
for t in ws + cs:
    t.start()
for t in ws:
    t.join()
for p in (pb, pc):
    for _ in range(4):
        queues[p].put(None)
for t in cs:
    t.join()

def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))] * 1000 if xs else float("nan")

print(f"writes on A: {len(ack_lat)} acknowledged in {duration:.0f} s ({len(ack_lat) / duration:.0f}/s), "
      f"{len(errors)} refused; ack p50 {pct(ack_lat, .5):.1f} ms, p99 {pct(ack_lat, .99):.1f} ms")
for name, p in (("B", pb), ("C", pc)):
    xs = served[p]
    print(f"served on {name} after A's ack: p50 {pct(xs, .5):.1f} ms, p99 {pct(xs, .99):.1f} ms, "
          f"max {pct(xs, 1):.1f} ms ({len(xs)} checks, {stale[p]} stale)")
PY

replica d
curl -fs "http://127.0.0.1:$PORT_d/v1/status" | python3 -c '
import json, sys
r = json.load(sys.stdin)["customers_api"]
print("replica d:", r["api_records"], "records, revision", r["revision"])'
