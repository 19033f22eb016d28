#!/usr/bin/env bash
# Validates deploy/ offline, installing what it needs on a fresh machine:
#   - Kubernetes manifests against the API schemas (kubernetes-validate, strict: unknown fields
#     fail), the ServiceMonitor against a schema of its CRD, and the cross-checks of
#     scripts/check-deploy.py (ConfigMap = config/base.toml, shutdown timings, runbook links);
#   - Prometheus rules: `promtool check rules`, then the unit tests `promtool test rules`;
#   - the Grafana dashboard's queries: parsed by `promtool check rules` as recording rules.
# Tools: a Python venv under $WD_CACHE_DIR (default ~/.cache/webhook-delivery), promtool from
# Debian's `prometheus` package.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE_DIR="${WD_CACHE_DIR:-$HOME/.cache/webhook-delivery}"
VENV="$CACHE_DIR/deploy-venv"
KUBERNETES_VALIDATE_VERSION="1.37.0"

log() { echo "validate-deploy: $*" >&2; }

if ! "$VENV/bin/python" -c "import kubernetes_validate, jsonschema, yaml" 2>/dev/null; then
  log "installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION into $VENV"
  mkdir -p "$CACHE_DIR"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
fi
if ! command -v promtool >/dev/null; then
  log "installing promtool (Debian package prometheus)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

manifests=(deploy/kubernetes/{deployment,service,configmap,secret,poddisruptionbudget}.yaml)
"$VENV/bin/kubernetes-validate" --strict --quiet "${manifests[@]}"
"$VENV/bin/python" scripts/check-deploy.py
promtool check rules deploy/prometheus/alerts.yml
# The dashboard's queries, as recording rules, so their PromQL is checked too.
dashboard_rules=$(mktemp --suffix=.yml)
trap 'rm -f "$dashboard_rules"' EXIT
scripts/dashboard-rules.py >"$dashboard_rules"
promtool check rules "$dashboard_rules"
promtool test rules deploy/prometheus/alerts.test.yml
echo "deploy/ is valid"
