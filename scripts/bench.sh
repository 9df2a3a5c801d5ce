#!/usr/bin/env bash
# The end-to-end benchmark: builds the release binaries and runs the whole
# system against the local RabbitMQ and PostgreSQL, in a vhost and database
# of its own (orderflow_bench), then prints a Markdown report.
#
#   ./scripts/bench.sh --orders 1000 --concurrency 32 --replicas 1
#   ./scripts/bench.sh --orders 10000 --concurrency 64 --replicas 2
#
# With --compare-celery first, the Celery implementation of the same saga
# (CELERY_PEER, default ../shared/peers/celery-orders; its README) runs right
# after in the same sitting (CELERY_ORDERS, default 3000, in its best
# configuration, CELERY_CONFIGS), and both are printed side by side with the
# ratio:
#
#   ./scripts/bench.sh --compare-celery --orders 2000 --concurrency 32 --replicas 1
set -euo pipefail
cd "$(dirname "$0")/.."
compare=0
if [ "${1:-}" = "--compare-celery" ]; then
    compare=1
    shift
fi
./scripts/services.sh
cargo build --release --locked -q --bins
if [ "$compare" = 0 ]; then
    exec target/release/orders "$@"
fi

peer=${CELERY_PEER:-../shared/peers/celery-orders}
[ -x "$peer/bench.sh" ] || { echo "bench: no Celery reference at $peer (set CELERY_PEER)" >&2; exit 1; }
report=$(mktemp)
celery=$(mktemp)
trap 'rm -f "$report" "$celery"' EXIT
target/release/orders "$@" | tee "$report"
( cd "$peer" && ./setup.sh >/dev/null && ORDERS=${CELERY_ORDERS:-3000} REPS=1 \
    CONFIGS=${CELERY_CONFIGS:-threads:8:4:quorum} ./bench.sh ) | tee "$celery"

ours=$(grep -m1 'end-to-end orders/s' "$report" | awk -F'|' '{gsub(/ /, "", $3); print $3}')
ours_latency=$(grep -m1 'latency POST→email' "$report" | awk -F'|' '{gsub(/^ +| +$/, "", $3); print $3}' | sed 's/ ms$//')
theirs=$(awk -F'|' '$4 ~ /True|False/ {gsub(/ /, "", $6); print $6; exit}' "$celery")
theirs_latency=$(awk -F'|' '$4 ~ /True|False/ {gsub(/^ +| +$/, "", $8); print $8; exit}' "$celery")
[ -n "$ours" ] && [ -n "$theirs" ] || { echo "bench: could not read both results" >&2; exit 1; }
cat <<TABLE

| same sitting | orderflow | Celery |
| --- | --- | --- |
| end-to-end orders/s | $ours | $theirs |
| latency p50 / p95 / p99 (ms) | $ours_latency | $theirs_latency |
| ratio | $(echo "scale=1; $ours / $theirs" | bc)× | 1× |
TABLE
