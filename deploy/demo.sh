#!/usr/bin/env bash
# Runs sluice on its embedded default configuration in front of a real local PostgreSQL
# primary (127.0.0.1:5432) and streaming replica (127.0.0.1:5433), shows a read landing on the
# replica and a write landing on the primary, then stops everything it started.
#
#   bash deploy/demo.sh
#
# Needs root (to install PostgreSQL when missing and to run the servers as `postgres`) or a
# user who can run initdb; ports 5432, 5433, 6432 and 9930 must be free.
set -euo pipefail
cd "$(dirname "$0")/.."

pg_bin() {
  local d
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    [ -x "$d/initdb" ] && { echo "$d"; return; }
  done
}
BIN=$(pg_bin || true)
if [ -z "$BIN" ]; then
  echo "== installing PostgreSQL (Debian package)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  service postgresql stop >/dev/null 2>&1 || true
  BIN=$(pg_bin)
fi
for port in 5432 5433 6432 9930; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port is in use; stop what listens there first" >&2
    exit 1
  fi
done

echo "== building sluice"
cargo build --release --quiet

DIR=$(mktemp -d /tmp/sluice-demo.XXXXXX)
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[ "$(id -u)" = 0 ] && chown postgres "$DIR"
SLUICE_PID=
cleanup() {
  [ -n "$SLUICE_PID" ] && kill "$SLUICE_PID" 2>/dev/null || true
  as_pg "$BIN/pg_ctl" -D "$DIR/replica" stop -m immediate >/dev/null 2>&1 || true
  as_pg "$BIN/pg_ctl" -D "$DIR/primary" stop -m immediate >/dev/null 2>&1 || true
  rm -rf "$DIR"
}
trap cleanup EXIT

echo "== starting a primary on 127.0.0.1:5432 and a streaming replica on 127.0.0.1:5433 in $DIR"
as_pg "$BIN/initdb" -D "$DIR/primary" -U postgres --auth=trust >/dev/null
cat >>"$DIR/primary/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = 5432
unix_socket_directories = '$DIR'
wal_level = replica
hot_standby = on
EOF
cat >"$DIR/primary/pg_hba.conf" <<EOF
local all all trust
host replication all 127.0.0.1/32 trust
host all all 127.0.0.1/32 scram-sha-256
EOF
as_pg "$BIN/pg_ctl" -w -D "$DIR/primary" -l "$DIR/primary.log" start >/dev/null
as_pg psql -h "$DIR" -p 5432 -U postgres -qc "ALTER ROLE postgres PASSWORD 'postgres'"
as_pg "$BIN/pg_basebackup" -h 127.0.0.1 -p 5432 -U postgres -D "$DIR/replica" -R -X stream -c fast
echo "port = 5433" | as_pg tee -a "$DIR/replica/postgresql.auto.conf" >/dev/null
as_pg "$BIN/pg_ctl" -w -D "$DIR/replica" -l "$DIR/replica.log" start >/dev/null

echo "== starting sluice with its embedded default config (listens on 127.0.0.1:6432)"
./target/release/sluice &
SLUICE_PID=$!
for _ in $(seq 1 50); do
  curl -sf http://127.0.0.1:9930/readyz >/dev/null 2>&1 && break
  sleep 0.2
done
sleep 1.5 # let both probes report

export PGPASSWORD=postgres
q() { psql -h 127.0.0.1 -p 6432 -U postgres -d postgres -qAt -F ' | ' -c "$1"; }
echo
echo "read : SELECT inet_server_port(), pg_is_in_recovery()"
echo "       -> $(q 'SELECT inet_server_port(), pg_is_in_recovery()')   (the replica)"
q "CREATE TABLE IF NOT EXISTS demo (id serial PRIMARY KEY, at timestamptz DEFAULT now())"
echo "write: INSERT INTO demo DEFAULT VALUES RETURNING inet_server_port(), pg_is_in_recovery()"
echo "       -> $(q 'INSERT INTO demo DEFAULT VALUES RETURNING inet_server_port(), pg_is_in_recovery()')  (the primary)"
echo
echo "topology: $(curl -s http://127.0.0.1:9930/topology)"
