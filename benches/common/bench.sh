# Shared by the benchmark scripts that serve generated customers (source it):
#   bench_policies DIR N [FILES] [PLAN]   a catalog and N customers, one subscription each,
#                                        NDJSON over FILES files customers-000.ndjson, ...
#                                        (default 1); PLAN `random`
#                                        (free or pro, fixed seed; default) or a plan name
#   bench_serve DIR LOG ARGS...          the release binary on a free port serving DIR
#                                        (sets PORT and PID; returns once /readyz answers)

bench_policies() {
  mkdir -p "$1"
  python3 - "$1" "$2" "${3:-1}" "${4:-random}" <<'PY'
import json, random, sys
d, n, files, plan = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
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
outs = [open(f"{d}/customers-{k:03d}.ndjson", "w") for k in range(files)]
for i in range(n):
    m, day = rnd.randint(1, 12), rnd.randint(1, 28)
    p = rnd.choice(["free", "pro"]) if plan == "random" else plan
    outs[i % files].write(json.dumps({"id": f"cust-{i:07d}", "subscriptions": [
        {"plan": p, "starts": f"2025-{m:02d}-{day:02d}"}]}) + "\n")
for f in outs:
    f.close()
PY
  # Written back now rather than by the kernel's flusher in the middle of a
  # measurement (80 MB at a million customers, ahead of the server's own fsyncs).
  sync
}

bench_serve() {
  local dir=$1 log=$2
  shift 2
  PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  "$BIN" serve --policies "$dir" --listen "127.0.0.1:$PORT" --grpc-listen off "$@" >"$log" 2>&1 &
  PID=$!
  for _ in $(seq 1 600); do
    curl -fs "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && return 0
    kill -0 "$PID" 2>/dev/null || { cat "$log"; exit 1; }
    sleep 0.2
  done
  echo "not ready after 120 s" >&2
  exit 1
}
