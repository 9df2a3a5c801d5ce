#!/usr/bin/env bash
# The end-to-end benchmark: builds the release binaries and runs the whole
# system against the local RabbitMQ and PostgreSQL, in a vhost and database
# of its own (orderflow_bench), then prints a Markdown report.
#
#   ./scripts/bench.sh --orders 1000 --concurrency 32 --replicas 1
#   ./scripts/bench.sh --orders 10000 --concurrency 64 --replicas 2
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/services.sh
cargo build --release --locked -q --bins
exec target/release/orders "$@"
