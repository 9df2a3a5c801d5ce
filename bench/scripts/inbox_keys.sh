#!/usr/bin/env bash
# Inserting into a consumer's inbox (10 new message ids per transaction, as
# a chunk does) once the inbox holds ROWS rows: random ids (UUIDv4) against
# time-ordered ones (UUIDv7), with a checkpoint before each run. Prints
# transactions per second, WAL bytes per transaction and full-page images.
# Uses a scratch database, dropped at the end. See decision 0015.
#
#   bench/scripts/inbox_keys.sh [ROWS] [SECONDS] [ROUNDS]
set -euo pipefail
rows=${1:-3000000}
secs=${2:-15}
rounds=${3:-2}
db=orderflow_inbox_keys
psql=(psql -h 127.0.0.1 -U postgres -v ON_ERROR_STOP=1 -qAt)
work=$(mktemp -d)
trap 'rm -rf "$work"; "${psql[@]}" -d postgres -c "DROP DATABASE IF EXISTS $db" >/dev/null' EXIT

"${psql[@]}" -d postgres -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db"
"${psql[@]}" -d "$db" <<SQL
-- A UUIDv7 in SQL (PostgreSQL 15 has none): microseconds since the epoch
-- in the first 48 bits, random bits after; ordered as the runtime's are.
CREATE FUNCTION uuid7() RETURNS uuid LANGUAGE sql VOLATILE AS \$\$
  SELECT encode(overlay(uuid_send(gen_random_uuid())
    PLACING substring(int8send((extract(epoch FROM clock_timestamp()) * 1000000)::bigint) FROM 3)
    FROM 1 FOR 6), 'hex')::uuid \$\$;
CREATE TABLE inbox_v4 (consumer text, message_id uuid, processed_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (consumer, message_id));
CREATE TABLE inbox_v7 (LIKE inbox_v4 INCLUDING ALL);
INSERT INTO inbox_v4 (consumer, message_id) SELECT 'order', gen_random_uuid() FROM generate_series(1, $rows);
INSERT INTO inbox_v7 (consumer, message_id) SELECT 'order', uuid7() FROM generate_series(1, $rows);
VACUUM ANALYZE inbox_v4;
VACUUM ANALYZE inbox_v7;
SQL
echo "INSERT INTO inbox_v4 (consumer, message_id) SELECT 'order', gen_random_uuid() FROM generate_series(1, 10) ON CONFLICT DO NOTHING;" > "$work/v4.sql"
echo "INSERT INTO inbox_v7 (consumer, message_id) SELECT 'order', uuid7() FROM generate_series(1, 10) ON CONFLICT DO NOTHING;" > "$work/v7.sql"
wal() { "${psql[@]}" -d "$db" -c "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::int8, (SELECT wal_fpi FROM pg_stat_wal)"; }
echo "inbox of $rows rows; index sizes: $("${psql[@]}" -d "$db" -c "SELECT pg_size_pretty(pg_relation_size('inbox_v4_pkey')) || ' (v4), ' || pg_size_pretty(pg_relation_size('inbox_v7_pkey')) || ' (v7)'")"
for _ in $(seq "$rounds"); do
  for v in v4 v7; do
    "${psql[@]}" -d "$db" -c CHECKPOINT
    before=$(wal)
    tps=$(pgbench -h 127.0.0.1 -U postgres -n -M prepared -c 4 -j 2 -T "$secs" -f "$work/$v.sql" "$db" 2>/dev/null | awk '/^tps/ {print $3}')
    # WAL statistics reach pg_stat_wal when backends report them.
    sleep 1.5
    after=$(wal)
    python3 - "$v" "$tps" "$secs" "$before" "$after" <<'PY'
import sys
v, tps, secs, before, after = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4].split('|'), sys.argv[5].split('|')
tx = tps * secs
print(f"{v}: {tps:,.0f} tx/s, {(int(after[0]) - int(before[0])) / tx:,.0f} WAL bytes/tx, {int(after[1]) - int(before[1])} full-page images")
PY
  done
done
