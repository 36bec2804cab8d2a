#!/usr/bin/env bash
# Bytes of usage ledger per consume, plain and as closed segments are kept (gzip -6,
# the level entitled compresses at). N consumes spread round-robin over C customers
# with ids like real ones (cus_ and 16 hex digits), one feature.
#   bash benches/ledger_bytes.sh [BIN] [N] [C]
set -eu
BIN=${1:-target/release/entitled}
N=${2:-2000}
C=${3:-1000}
tmp=$(mktemp -d)
trap 'kill $pid 2>/dev/null; rm -rf "$tmp"' EXIT
mkdir "$tmp/policies"
cat > "$tmp/policies/catalog.yaml" <<'YAML'
features:
  api.calls: { kind: quota, unit: call }
plans:
  base:
    grants:
      api.calls: { limit: 100000000, per: month }
YAML
python3 - "$C" > "$tmp/policies/customers.yaml" <<'PY'
import sys
print("customers:")
for i in range(int(sys.argv[1])):
    print(f'  - {{ id: cus_{i * 2654435761 % 2**64:016x}, subscriptions: [{{ plan: base, starts: "2020-01-01T00:00:00Z" }}] }}')
PY
"$BIN" serve --policies "$tmp/policies" --listen 127.0.0.1:0 --grpc-listen off \
  --state-dir "$tmp/state" > "$tmp/out" 2> "$tmp/err" &
pid=$!
for _ in $(seq 100); do grep -q . "$tmp/out" && break; sleep 0.1; done
addr=$(head -1 "$tmp/out" | grep -oE '127\.0\.0\.1:[0-9]+')
python3 - "$addr" "$N" "$C" <<'PY'
import http.client, sys
addr, n, customers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
c = http.client.HTTPConnection(addr)
for i in range(n):
    cus = f"cus_{i % customers * 2654435761 % 2**64:016x}"
    body = '{"customer":"%s","feature":"api.calls"}' % cus
    c.request("POST", "/v1/consume", body, {"content-type": "application/json"})
    r = c.getresponse(); r.read()
    assert r.status == 200, r.status
PY
kill -TERM $pid; wait $pid || true
plain=$(cat "$tmp"/state/ledger/usage-*.ndjson | wc -c)
gz=$(cat "$tmp"/state/ledger/usage-*.ndjson | gzip -6 | wc -c)
echo "consumes: $N"
echo "ledger bytes per consume, plain: $(( plain / N ))"
echo "ledger bytes per consume, gzipped (closed segments): $(python3 -c "print(round($gz / $N, 1))")"
