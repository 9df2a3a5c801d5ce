#!/usr/bin/env bash
# Removes the vhosts, broker users, databases and database roles that tests make (prefix
# oftest_) and that a killed or panicking test left behind, and a memory
# alarm one left raised.
# Touches nothing else.
set -euo pipefail
prefix=oftest_
for vhost in $(curl -fsS -u guest:guest http://127.0.0.1:15672/api/vhosts 2>/dev/null \
    | grep -o "\"name\":\"${prefix}[a-z0-9]*\"" | cut -d'"' -f4); do
    curl -fsS -u guest:guest -X DELETE "http://127.0.0.1:15672/api/vhosts/$vhost" >/dev/null || true
done
for user in $(curl -fsS -u guest:guest http://127.0.0.1:15672/api/users 2>/dev/null \
    | grep -o "\"name\":\"${prefix}[a-z0-9]*-[a-z-]*\"" | cut -d'"' -f4); do
    curl -fsS -u guest:guest -X DELETE "http://127.0.0.1:15672/api/users/$user" >/dev/null || true
done
for db in $(psql -h 127.0.0.1 -U postgres -d postgres -Atc "select datname from pg_database where datname like '${prefix}%'"); do
    psql -h 127.0.0.1 -U postgres -d postgres -qc "drop database if exists \"$db\" with (force)" >/dev/null || true
done
# The PostgreSQL roles of tests (prefix oftest_), once their databases are gone.
for role in $(psql -h 127.0.0.1 -U postgres -d postgres -Atc "select rolname from pg_roles where rolname like '${prefix}%'"); do
    psql -h 127.0.0.1 -U postgres -d postgres -qc "drop role if exists \"$role\"" >/dev/null || true
done
# The memory alarm a killed `broker_alarm` test left raised (it sets the
# watermark to 0.0001 and puts the broker's value back when it ends).
if command -v rabbitmqctl >/dev/null; then
    watermark=$(rabbitmqctl eval 'vm_memory_monitor:get_vm_memory_high_watermark().' 2>/dev/null | tail -1 || true)
    if [ "$watermark" = "0.0001" ]; then
        rabbitmqctl set_vm_memory_high_watermark 0.4 >/dev/null || true
    fi
fi
