#!/usr/bin/env bash
# Checks the Kubernetes manifests: every core resource against the
# Kubernetes API's schema (kubernetes-validate --strict), and the resources
# of KEDA and the Prometheus Operator (deploy/kubernetes/operators.yaml)
# against those operators' schemas (scripts/validate-operators.mjs, with the
# @kubernetes-models packages from the npm registry, installed under
# target/tools/node).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "kubernetes: $*" >&2; }

if ! python3 -c 'import kubernetes_validate' 2>/dev/null; then
    python3 -m pip install --quiet kubernetes-validate 2>/dev/null \
        || python3 -m pip install --quiet --break-system-packages kubernetes-validate
fi
# The operators' kinds have no schema here; they are checked below.
python3 -m kubernetes_validate --strict --quiet --no-warn deploy/kubernetes/*.yaml

if ! command -v npm >/dev/null; then
    [ "$(id -u)" = 0 ] || { log "npm is missing: install Node.js and npm"; exit 1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null \
        || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null; }
fi
tools=target/tools/node
if [ ! -d "$tools/node_modules/@kubernetes-models/keda" ]; then
    log "installing the operators' schemas (@kubernetes-models) under $tools"
    mkdir -p "$tools"
    npm install --silent --no-audit --no-fund --prefix "$tools" \
        @kubernetes-models/keda@2.0.0 @kubernetes-models/prometheus-operator@6.0.0 js-yaml@4.1.0 >/dev/null
fi
# Node resolves the packages from the script's own directory.
cp scripts/validate-operators.mjs "$tools/"
node "$tools/validate-operators.mjs" deploy/kubernetes/*.yaml
