#!/usr/bin/env bash
# Runs the whole orderflow system on this machine, without Docker: RabbitMQ
# and PostgreSQL (started or installed by services.sh), the payment gateway
# simulator, an SMTP server with a web page of the mail it got, every worker,
# the publisher and the failed-message console (`dlq serve`). Places a demo order, prints its lifecycle and the URLs,
# then runs until Ctrl-C (or SIGTERM), when it stops what it started.
#
#   REPLICAS=2 ./scripts/run.sh      # two replicas of each worker
#   ./scripts/run.sh --no-demo       # skip the demo order
set -euo pipefail
cd "$(dirname "$0")/.."

demo=1
[ "${1:-}" = "--no-demo" ] && demo=0
replicas=${REPLICAS:-1}
run_dir=.run
mkdir -p "$run_dir/logs"

log() { echo "run: $*" >&2; }

./scripts/services.sh

log "building (release)"
cargo build --release --locked --bins -q
bin=target/release

export AMQP_URL=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
export DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/orderflow}
export RETRY_DELAYS=${RETRY_DELAYS:-1s,5s,30s,2m,10m}
export SMTP_URL=${SMTP_URL:-smtp://127.0.0.1:1025}
export PAYMENT_GATEWAY_URL=${PAYMENT_GATEWAY_URL:-http://127.0.0.1:8090}
export RUST_LOG=${RUST_LOG:-info}
api=http://${HTTP_ADDR:-127.0.0.1:8080}

# The publisher's API keys: made once for this checkout (kept in
# .run/api-keys, readable by its owner only) unless API_KEYS is given.
if [ -z "${API_KEYS:-}" ] && [ "${AUTH:-on}" != off ]; then
    keys_file=$run_dir/api-keys
    if [ ! -s "$keys_file" ]; then
        ( umask 077
          printf 'ADMIN_TOKEN=%s\nORDERS_TOKEN=%s\n' \
              "$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')" \
              "$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')" >"$keys_file" )
    fi
    # shellcheck disable=SC1090
    . "$keys_file"
    export API_KEYS="local-admin:admin:$ADMIN_TOKEN,local-shop:orders:$ORDERS_TOKEN"
fi
auth=()
if [ -n "${ADMIN_TOKEN:-}" ]; then
    auth=(-H "Authorization: Bearer $ADMIN_TOKEN")
elif [ -n "${API_KEYS:-}" ] && [ "$demo" = 1 ]; then
    log "API_KEYS given without ADMIN_TOKEN (the secret of one of its admin keys): no demo order"
    demo=0
fi

# A password per binary, NAME_<BINARY>, made once for this checkout (kept
# in FILE, readable by its owner only) and exported.
load_passwords() {
    local name=$1 file=$2
    if [ ! -s "$file" ]; then
        ( umask 077
          for b in PUBLISHER ORDER_WORKER INVENTORY_WORKER PAYMENT_WORKER NOTIFICATION_WORKER DLQ; do
              printf '%s_%s=%s\n' "$name" "$b" "$(od -An -N18 -tx1 /dev/urandom | tr -d ' \n')"
          done >"$file" )
    fi
    set -a
    # shellcheck disable=SC1090
    . "$file"
    set +a
}

# One least-privilege broker user per binary (topology apply --users, as
# the operator's AMQP_URL user); passwords made once for this checkout.
load_passwords AMQP_PASSWORD "$run_dir/amqp-passwords"
"$bin/topology" apply --users
# AMQP_URL with another user and password (its userinfo replaced).
as_user() {
    local rest=${AMQP_URL#*://}
    echo "${AMQP_URL%%://*}://$1:$2@${rest#*@}"
}

# The database: migrated as the owner (DATABASE_URL), and one
# least-privilege role per binary (migrate --roles); passwords made once
# for this checkout.
load_passwords DATABASE_PASSWORD "$run_dir/db-passwords"
"$bin/migrate" --roles
# DATABASE_URL with another role and password (its userinfo replaced).
as_role() {
    local rest=${DATABASE_URL#*://}
    echo "${DATABASE_URL%%://*}://orderflow_$1:$2@${rest#*@}"
}

pids=()
start() {
    local name=$1
    shift
    "$@" >"$run_dir/logs/$name.log" 2>&1 &
    pids+=($!)
    echo $! >"$run_dir/$name.pid"
}

stop_all() {
    log "stopping"
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -f "$run_dir"/*.pid
}
trap stop_all EXIT
trap 'exit 0' INT TERM

start smtp python3 scripts/smtp_sink.py --port 1025 --http 8025 --record "$run_dir/mail.jsonl"
start payment-gateway-sim env HTTP_ADDR=127.0.0.1:8090 "$bin/payment-gateway-sim"
# Each worker replica serves its metrics on a port of its own: 9101-9104
# for the first replica, 9111-9114 for the second, and so on.
for i in $(seq 1 "$replicas"); do
    n=1
    for worker in order-worker inventory-worker payment-worker notification-worker; do
        upper=$(echo "$worker" | tr 'a-z-' 'A-Z_')
        amqp_password=AMQP_PASSWORD_$upper
        db_password=DATABASE_PASSWORD_$upper
        start "$worker-$i" env METRICS_ADDR="127.0.0.1:$((9100 + (i - 1) * 10 + n))" \
            AMQP_URL="$(as_user "$worker" "${!amqp_password}")" \
            DATABASE_URL="$(as_role "$(echo "$worker" | tr - _)" "${!db_password}")" "$bin/$worker"
        n=$((n + 1))
    done
done
start publisher env HTTP_ADDR="${HTTP_ADDR:-127.0.0.1:8080}" \
    AMQP_URL="$(as_user publisher "$AMQP_PASSWORD_PUBLISHER")" \
    DATABASE_URL="$(as_role publisher "$DATABASE_PASSWORD_PUBLISHER")" "$bin/publisher"

# The failed-message console, as the dlq user and role, taking the same keys.
start console env CONSOLE_ADDR=127.0.0.1:8081 \
    AMQP_URL="$(as_user dlq "$AMQP_PASSWORD_DLQ")" \
    DATABASE_URL="$(as_role dlq "$DATABASE_PASSWORD_DLQ")" "$bin/dlq" serve

log "waiting until the publisher is ready"
for _ in $(seq 1 120); do
    curl -fsS "$api/readyz" >/dev/null 2>&1 && break
    sleep 0.5
done
curl -fsS "$api/readyz" >/dev/null || { log "the publisher never became ready; see $run_dir/logs"; exit 1; }

if [ "$demo" = 1 ]; then
    log "demo: pricing and restocking SKU-DEMO, then placing an order"
    curl -fsS "${auth[@]}" -X PUT "$api/products/SKU-DEMO" -H 'content-type: application/json' \
        -d '{"unit_price_cents": 1999, "currency": "EUR"}' >/dev/null
    curl -fsS "${auth[@]}" -X POST "$api/inventory/SKU-DEMO/restock" -H 'content-type: application/json' \
        -H "Idempotency-Key: demo-restock-$(date +%s)" -d '{"quantity": 10}' >/dev/null
    # Both are commands: wait until the workers applied them.
    for _ in $(seq 1 50); do
        curl -fsS "${auth[@]}" "$api/products/SKU-DEMO" >/dev/null 2>&1 &&
            curl -fsS "${auth[@]}" "$api/inventory/SKU-DEMO" >/dev/null 2>&1 && break
        sleep 0.2
    done
    order=$(curl -fsS "${auth[@]}" -X POST "$api/orders" -H 'content-type: application/json' \
        -d '{"customer_email": "ada@example.com", "currency": "EUR", "items": [{"sku": "SKU-DEMO", "quantity": 2}]}')
    id=$(echo "$order" | python3 -c 'import json,sys; print(json.load(sys.stdin)["order_id"])')
    log "placed order $id"
    for _ in $(seq 1 100); do
        status=$(curl -fsS "${auth[@]}" "$api/orders/$id" 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])' 2>/dev/null || true)
        [ "$status" = CONFIRMED ] || [ "$status" = CANCELLED ] && break
        sleep 0.2
    done
    curl -fsS "${auth[@]}" "$api/orders/$id" | python3 -c '
import json, sys
o = json.load(sys.stdin)
print("order %s: %s (%s %s cents)" % (o["order_id"], o["status"], o["total_cents"], o["currency"]))
for h in o["history"]:
    print("  %s  %s%s" % (h["at"], h["status"], " (%s)" % h["reason"] if h["reason"] else ""))
'
fi

cat <<INFO

orderflow is running ($replicas replica(s) of each worker). Logs: $run_dir/logs/
  API                 $api   (try: curl -H "Authorization: Bearer \$ORDERS_TOKEN" $api/orders/<id>)
  API keys            $run_dir/api-keys (ADMIN_TOKEN: every endpoint; ORDERS_TOKEN: orders and stock);
                      load them with: . $run_dir/api-keys
  Console             http://127.0.0.1:8081   (dead messages: sign in with ADMIN_TOKEN)
  RabbitMQ management http://127.0.0.1:15672   (guest / guest; each binary on its own user,
                      passwords in $run_dir/amqp-passwords)
  PostgreSQL          each binary on its own role (orderflow_<binary>), passwords in
                      $run_dir/db-passwords
  Mail received       http://127.0.0.1:8025
  Payment gateway     http://127.0.0.1:8090/charges
  Worker metrics      http://127.0.0.1:9101/metrics (order), 9102 (inventory), 9103 (payment), 9104 (notification)
Press Ctrl-C to stop.
INFO
wait
