#!/usr/bin/env bash
# Checks what ships for monitoring with promtool: the alert rules (syntax,
# and their unit tests on synthetic series), Prometheus' scrape
# configuration, and every query of the Grafana dashboard (as rules, so a
# query that does not parse fails). promtool comes from the PATH, or from
# Debian's prometheus package, unpacked into target/tools (nothing is
# installed or started).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "monitoring: $*" >&2; }

promtool=$(command -v promtool || true)
if [ -z "$promtool" ]; then
    promtool=target/tools/usr/bin/promtool
    if [ ! -x "$promtool" ]; then
        log "fetching promtool (Debian's prometheus package, unpacked into target/tools)"
        download=$(mktemp -d)
        ( cd "$download" && apt-get download prometheus >/dev/null 2>&1 ) \
            || { [ "$(id -u)" = 0 ] && apt-get update -qq && ( cd "$download" && apt-get download prometheus >/dev/null 2>&1 ); } \
            || { log "cannot download Debian's prometheus package for promtool"; exit 1; }
        mkdir -p target/tools
        dpkg-deb --fsys-tarfile "$download"/prometheus_*.deb | tar -x -C target/tools ./usr/bin/promtool
        rm -rf "$download"
    fi
fi

promtool=$(realpath "$promtool")
# The unit tests name their rule file relative to themselves.
( cd deploy/prometheus && "$promtool" check rules alerts.yml && "$promtool" test rules alerts.test.yml )
"$promtool" check config --syntax-only deploy/prometheus/prometheus.yml

# The dashboard's queries, each as a recording rule.
rules=$(mktemp --suffix=.yml)
trap 'rm -f "$rules"' EXIT
python3 - deploy/grafana/dashboards/orderflow.json "$rules" <<'PY'
import json, sys
dashboard = json.load(open(sys.argv[1]))
with open(sys.argv[2], "w") as out:
    out.write("groups:\n  - name: dashboard\n    rules:\n")
    n = 0
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            n += 1
            out.write("      - record: dashboard:query_%d\n        expr: %s\n" % (n, json.dumps(target["expr"])))
    if n == 0:
        sys.exit("the dashboard has no queries")
PY
"$promtool" check rules "$rules" >/dev/null
log "alerts, their tests, the scrape configuration and the dashboard's queries are valid"
