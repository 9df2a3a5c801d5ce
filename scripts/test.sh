#!/usr/bin/env bash
# The whole test suite: format, lints, dependencies (cargo deny), the
# compose file and the Kubernetes manifests, every test against
# the real RabbitMQ and PostgreSQL (started or installed by services.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
# A fresh build each run (CI): incremental compilation would only fill the disk.
export CARGO_INCREMENTAL=0

./scripts/services.sh

log() { echo "test: $*" >&2; }

if ! command -v cargo >/dev/null; then
    log "cargo is missing: install Rust with rustup (https://rustup.rs) and rerun"
    exit 1
fi

# What a killed test run could not clean up: its vhosts and databases.
./scripts/clean-test-leftovers.sh

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

log "cargo deny (deny.toml)"
./scripts/deny.sh

log "monitoring (promtool: alerts, their tests, the dashboard's queries)"
./scripts/monitoring.sh

log "docker-compose.yml"
if ! command -v docker-compose >/dev/null && ! docker compose version >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null \
            || { DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null; }
    fi
fi
if command -v docker-compose >/dev/null; then
    docker-compose -f docker-compose.yml config -q
elif docker compose version >/dev/null 2>&1; then
    docker compose -f docker-compose.yml config -q
else
    log "neither docker-compose nor docker compose is available to check docker-compose.yml"
    exit 1
fi

log "deploy/kubernetes (the API's schema, and KEDA's and the Prometheus Operator's)"
./scripts/kubernetes.sh

# Tests that stop the shared broker, or raise its memory alarm, run alone,
# after the others.
serial='binary(broker_restart) | binary(broker_alarm)'
if command -v cargo-nextest >/dev/null || cargo nextest --version >/dev/null 2>&1; then
    log "cargo nextest (parallel)"
    cargo nextest run --workspace --locked --no-tests=fail -E "not ($serial)"
    log "cargo nextest (serial: tests that restart the broker)"
    cargo nextest run --workspace --locked -E "$serial" -j 1
else
    log "cargo test (cargo-nextest not found)"
    cargo test --workspace --locked -- --skip a_broker_restart --skip while_the_broker_blocks
    cargo test --workspace --locked --test broker_restart --test broker_alarm -- --test-threads 1
fi

./scripts/clean-test-leftovers.sh
log "all green"
