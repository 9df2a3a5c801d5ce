#!/usr/bin/env bash
# Makes sure RabbitMQ (with the management plugin) and PostgreSQL run on this
# machine, installing them from Debian packages where they are missing.
# Idempotent: on a machine where both already run it only checks them.
set -euo pipefail

log() { echo "services: $*" >&2; }

need_root_for() {
    if [ "$(id -u)" != 0 ]; then
        log "$1 needs root (apt-get); run as root or install it yourself"
        exit 1
    fi
}

apt_updated=0
apt_install() {
    need_root_for "installing $*"
    if [ "$apt_updated" = 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

if ! command -v curl >/dev/null; then
    apt_install curl
fi

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
    local port=$1 what=$2
    for _ in $(seq 1 120); do
        port_open "$port" && return 0
        sleep 0.5
    done
    log "$what did not open port $port"
    exit 1
}

# --- PostgreSQL -------------------------------------------------------------
if ! command -v pg_ctlcluster >/dev/null && ! command -v psql >/dev/null; then
    log "installing PostgreSQL"
    apt_install postgresql
fi
if ! port_open 5432; then
    log "starting PostgreSQL"
    version=$(ls /etc/postgresql | sort -V | tail -n1)
    pg_ctlcluster --skip-systemctl-redirect "$version" main start
    wait_port 5432 PostgreSQL
fi
# Local development uses trust auth for the postgres user on loopback, as the
# contract's default DATABASE_URL has no password. Only touch a fresh install.
if ! psql -h 127.0.0.1 -U postgres -d postgres -Atc 'select 1' >/dev/null 2>&1; then
    need_root_for "configuring PostgreSQL trust auth on loopback"
    version=$(ls /etc/postgresql | sort -V | tail -n1)
    hba=/etc/postgresql/$version/main/pg_hba.conf
    sed -i '1i host all postgres 127.0.0.1/32 trust\nhost all postgres ::1/128 trust' "$hba"
    pg_ctlcluster --skip-systemctl-redirect "$version" main reload
fi
psql -h 127.0.0.1 -U postgres -d postgres -Atc "select 1 from pg_database where datname = 'orderflow'" | grep -q 1 \
    || psql -h 127.0.0.1 -U postgres -d postgres -qc 'create database orderflow'

# --- RabbitMQ ---------------------------------------------------------------
if ! command -v rabbitmq-server >/dev/null; then
    log "installing RabbitMQ"
    apt_install rabbitmq-server
fi
if ! port_open 5672; then
    log "starting RabbitMQ"
    rabbitmq-server -detached
    wait_port 5672 RabbitMQ
fi
if ! port_open 15672; then
    log "enabling the RabbitMQ management plugin"
    rabbitmq-plugins enable rabbitmq_management >/dev/null
    wait_port 15672 "the RabbitMQ management plugin"
fi
# A TLS listener on 127.0.0.1:5671, for the tests of `amqps://` (and for
# trying it by hand): a CA and a server certificate for localhost made here,
# the CA left where the tests read it (ORDERFLOW_TEST_AMQPS_CA in testkit).
tls_dir=/etc/rabbitmq/orderflow-test-tls
tls_conf=/etc/rabbitmq/conf.d/90-orderflow-test-tls.conf
if [ ! -s "$tls_dir/server.pem" ] || ! openssl x509 -checkend 86400 -noout -in "$tls_dir/server.pem" >/dev/null 2>&1; then
    need_root_for "making the broker's test TLS certificate"
    command -v openssl >/dev/null || apt_install openssl
    log "making a test CA and a server certificate for RabbitMQ's TLS listener"
    mkdir -p "$tls_dir"
    openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj "/CN=orderflow test broker CA" \
        -keyout "$tls_dir/ca.key" -out "$tls_dir/ca.pem" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
        -keyout "$tls_dir/server.key" -out "$tls_dir/server.csr" 2>/dev/null
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' >"$tls_dir/server.ext"
    openssl x509 -req -days 365 -in "$tls_dir/server.csr" -CA "$tls_dir/ca.pem" -CAkey "$tls_dir/ca.key" \
        -CAcreateserial -extfile "$tls_dir/server.ext" -out "$tls_dir/server.pem" 2>/dev/null
    chown -R rabbitmq:rabbitmq "$tls_dir" 2>/dev/null || true
    chmod 0644 "$tls_dir/ca.pem" "$tls_dir/server.pem"
    chmod 0640 "$tls_dir/server.key" "$tls_dir/ca.key"
    rm -f "$tls_conf"
fi
if [ ! -s "$tls_conf" ]; then
    need_root_for "configuring RabbitMQ's TLS listener"
    mkdir -p "$(dirname "$tls_conf")"
    cat >"$tls_conf" <<CONF
listeners.ssl.default = 127.0.0.1:5671
ssl_options.cacertfile = $tls_dir/ca.pem
ssl_options.certfile = $tls_dir/server.pem
ssl_options.keyfile = $tls_dir/server.key
ssl_options.verify = verify_none
ssl_options.fail_if_no_peer_cert = false
CONF
fi
if ! port_open 5671; then
    # The configuration is read when the application starts: restarting it
    # (the node and its data stay) opens the listener.
    log "restarting RabbitMQ's application to open its TLS listener on 5671"
    rabbitmqctl -q stop_app >/dev/null
    rabbitmqctl -q start_app >/dev/null
    wait_port 5671 "RabbitMQ's TLS listener"
fi
# The management API answers only once the node has finished booting.
for _ in $(seq 1 60); do
    curl -fsS -u guest:guest http://127.0.0.1:15672/api/overview >/dev/null 2>&1 && break
    sleep 0.5
done
# --- The SMTP sink used by tests, the benchmark and run.sh ----------------------
if ! command -v python3 >/dev/null; then
    log "installing Python 3"
    apt_install python3 python3-pip
fi
if ! python3 -c 'import aiosmtpd' 2>/dev/null; then
    log "installing aiosmtpd"
    python3 -m pip install --quiet aiosmtpd 2>/dev/null \
        || python3 -m pip install --quiet --break-system-packages aiosmtpd 2>/dev/null \
        || apt_install python3-aiosmtpd
fi
# The tests make a CA and a server certificate for the sink's implicit TLS.
if ! command -v openssl >/dev/null; then
    log "installing openssl"
    apt_install openssl
fi

# The console's browser test drives Debian's Chromium through chromedriver.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    log "installing chromium and chromium-driver (the console's browser test)"
    apt_install chromium chromium-driver
fi

log "PostgreSQL on 127.0.0.1:5432, RabbitMQ on 127.0.0.1:5672 (management UI http://127.0.0.1:15672)"
