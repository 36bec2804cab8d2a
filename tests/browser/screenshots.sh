#!/usr/bin/env bash
# Remakes the portal and console screenshots in docs/images/ (shown in the README and
# docs/portal.md): starts the built binary on a copy of policies/ with a test clock,
# records some usage for `acme`, breaks one policy file so the console shows a failed
# reload, and has headless Chromium save both pages at desktop and phone width.
#   cargo build && bash tests/browser/screenshots.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
bin="${ENTITLED_BIN:-$PWD/target/debug/entitled}"
out="${1:-docs/images}"
work="$(mktemp -d)"
pid=""
cleanup() { if [ -n "$pid" ]; then kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true; fi; rm -rf "$work"; }
trap cleanup EXIT
cp -r policies "$work/policies"
head -c 48 /dev/urandom | base64 > "$work/portal.key"
echo "ops:screenshot-admin-token" > "$work/admins"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
base="http://127.0.0.1:$port"
(cd "$work" && exec "$bin" serve --policies policies --listen "127.0.0.1:$port" --grpc-listen off \
  --state-dir state --portal-key-file portal.key --admin-token-file admins \
  --test-clock 2026-12-01T09:30:00Z --reload-debounce 20ms >"$work/log" 2>&1) &
pid=$!
for _ in $(seq 100); do curl -sf "$base/readyz" >/dev/null && break; sleep 0.1; done
post() { curl -sf -XPOST "$base/v1/$1" -d "$2" >/dev/null; }
post consume '{"customer":"acme","feature":"api.calls","amount":97500}'
post consume '{"customer":"acme","feature":"storage.gb","amount":42}'
for _ in $(seq 11); do post consume '{"customer":"acme","feature":"exports"}'; done
# Denials for the console's report: a feature not in the plan, a quota used up.
for _ in $(seq 3); do post check '{"customer":"northwind","feature":"analytics.advanced"}'; done
post consume '{"customer":"acme","feature":"api.calls","amount":40000}' || true
for u in ana bo cy di ed fay gus hal ivy jo kim lu mo nia; do
  post seats/acquire "{\"customer\":\"acme\",\"feature\":\"seats\",\"holder\":\"$u@acme.example\"}"
done
# A typo in a policy file: the reload fails and the console shows where.
sed -i 's/sso:                  { kind: flag,/sso:                  { kind: flg,/' "$work/policies/saas/features.yaml"
for _ in $(seq 100); do
  curl -sf "$base/v1/status" | grep -q '"last_error":{' && break; sleep 0.1
done
python3 tests/browser/portal_check.py screenshots --base "$base" \
  --admin-token screenshot-admin-token --customer acme --console-customer hooli --out "$out"
