#!/usr/bin/env bash
# Dead queues of any size: fills payment.dead with MESSAGES dead charges (as
# the runtime dead-letters them: headers and a JSON body) in a scratch vhost
# and database, then measures with the release binaries:
#   - `dlq list --limit 100`: the first page, and the page after the middle
#     message (half the queue read to reach it);
#   - `dlq serve`: the queue's page in the console (groups of the first
#     1,000 and the first 100 messages);
# each with its time and the process's peak RSS. Everything is removed at
# the end.
#
#   bench/scripts/dead_queue_pages.sh [MESSAGES]      (default 1000000)
set -euo pipefail
cd "$(dirname "$0")/../.."
messages=${1:-1000000}
vhost=orderflow_bench_dlq
db=orderflow_bench_dlq
api=http://127.0.0.1:15672/api
psql=(psql -h 127.0.0.1 -U postgres -v ON_ERROR_STOP=1 -qAt)
work=$(mktemp -d)
console_pid=
cleanup() {
    [ -n "$console_pid" ] && kill "$console_pid" 2>/dev/null || true
    curl -fsS -u guest:guest -X DELETE "$api/vhosts/$vhost" >/dev/null 2>&1 || true
    "${psql[@]}" -d postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

cargo build --release --locked -q -p dlq -p topology
python3 -c 'import pika' 2>/dev/null || python3 -m pip install --quiet pika

curl -fsS -u guest:guest -X PUT "$api/vhosts/$vhost" >/dev/null
curl -fsS -u guest:guest -X PUT -H 'content-type: application/json' \
    -d '{"configure":".*","write":".*","read":".*"}' "$api/permissions/$vhost/guest" >/dev/null
"${psql[@]}" -d postgres -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db"
export AMQP_URL="amqp://guest:guest@127.0.0.1:5672/$vhost"
export DATABASE_URL="postgres://postgres@127.0.0.1:5432/$db"
export RUST_LOG=warn
target/release/topology apply >/dev/null

echo "filling payment.dead with $messages messages"
start=$(date +%s.%N)
python3 - "$messages" "$vhost" "$work/middle" <<'PY'
import datetime, json, sys, uuid
import pika
count, vhost, middle = int(sys.argv[1]), sys.argv[2], sys.argv[3]
connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", virtual_host=vhost))
channel = connection.channel()
died = datetime.datetime.now(datetime.timezone.utc).isoformat()
errors = ["payment gateway unavailable: HTTP 503 service_unavailable",
          "payment gateway unavailable: timed out", "card_declined: insufficient_funds"]
for n in range(count):
    order = str(uuid.uuid4())
    headers = {"x-error-kind": "exhausted", "x-error": errors[n % 3], "x-attempts": 6,
               "x-original-exchange": "commands", "x-original-routing-key": "payment.charge",
               "x-first-failed-at": died}
    message_id = str(uuid.uuid4())
    if n == count // 2 - 1:
        open(middle, "w").write(message_id)
    channel.basic_publish("", "payment.dead",
        json.dumps({"order_id": order, "amount_cents": 1999, "currency": "EUR",
                    "payment_method": "pm_card_visa"}).encode(),
        pika.BasicProperties(message_id=message_id, type="payment.charge",
                             correlation_id=order, content_type="application/json",
                             delivery_mode=2, headers=headers))
connection.close()
PY
until [ "$(curl -fsS -u guest:guest "$api/queues/$vhost/payment.dead" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("messages", 0))')" -ge "$messages" ]; do
    sleep 2
done
printf 'filled in %.0f s\n' "$(echo "$(date +%s.%N) - $start" | bc)"

measure() {
    local what=$1
    shift
    /usr/bin/time -f "%e %M" -o "$work/time" "$@" >"$work/out"
    read -r seconds kib <"$work/time"
    printf '%-48s %8.2f s %8.1f MiB peak RSS\n' "$what" "$seconds" "$(echo "$kib / 1024" | bc -l)"
}
measure "dlq list --limit 100 (first page)" target/release/dlq list payment.dead --limit 100 --json
# The page that starts after the middle message.
measure "dlq list --limit 100 --after <the middle one>" \
    target/release/dlq list payment.dead --limit 100 --after "$(cat "$work/middle")" --json

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
CONSOLE_ADDR=127.0.0.1:$port API_KEYS="bench:admin:bench-admin-key-0123456789" \
    target/release/dlq serve &
console_pid=$!
for _ in $(seq 1 100); do curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
for round in 1 2 3; do
    seconds=$(curl -fsS -o /dev/null -w '%{time_total}' -H "Authorization: Bearer bench-admin-key-0123456789" \
        "http://127.0.0.1:$port/queues/payment.dead")
    echo "console: payment.dead page, round $round: ${seconds} s"
done
echo "console: peak RSS $(awk '/VmHWM/ {printf "%.1f MiB", $2 / 1024}' /proc/$console_pid/status)"
