#!/usr/bin/env bash
# Conformance run: psycopg2's own test suite, directly against PostgreSQL and through sluice in
# transaction mode, with the outcomes compared test by test.
#
#   bash tests/conformance/run.sh [--out DIR] [--no-build] [--sluice BIN] [--fast]
#                                 [--per-test-timeout S] [--suite-timeout S] [--hold S]
#                                 [--primary-run]
#
# What it does (everything on 127.0.0.1, everything with a timeout, everything stopped on exit):
#   1. gets psycopg2-binary 2.9.13 (the driver, a wheel: no C build) into a venv and the
#      psycopg2 2.9.13 sdist (which ships the test suite under tests/) from PyPI, cached in
#      $SLUICE_CONFORMANCE_CACHE (default ~/.cache/sluice-conformance);
#   2. starts a PostgreSQL primary and one streaming replica (as the `postgres` OS user when
#      run as root), with a SCRAM user `psycopg2` owning database `psycopg2_test` (hstore and
#      citext installed, max_prepared_transactions = 10 so the two-phase-commit tests run);
#   3. starts target/debug/sluice (built first unless --no-build) with pool_mode =
#      "transaction", consistency = "eventual", both nodes in discovery.static;
#   4. runs the suite against the primary, then through sluice, with identical settings
#      (PSYCOPG2_TESTDB*), and prints total/passed/failed/errors/skipped for each plus the tests
#      that pass directly but fail through sluice.
# Raw outputs (unittest logs, per-test JSON lines, sluice and server logs, the sluice config)
# go to --out DIR (default: a new temp dir, kept and printed at the end).
# --primary-run adds a third run through a second sluice listener with consistency = "primary"
# (pooling without read routing), to tell routing effects from pooling effects.
# --fast sets PSYCOPG2_TEST_FAST=1 (the suite skips its @slow tests).
# --hold S starts PostgreSQL and sluice, prints their ports, waits S seconds (or Ctrl-C) and
# stops them without running the suite: a sandbox for reproducing a failure by hand.
# Exit status: 0 when both runs completed and every test that fails only through sluice is
# listed in psycopg2-known-failures.txt (with its cause); 1 otherwise.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
HERE="$ROOT/tests/conformance"
PSYCOPG2_VERSION=2.9.13
OUT=""
BUILD=1
SLUICE_BIN="$ROOT/target/debug/sluice"
FAST=0
PER_TEST_TIMEOUT=60
SUITE_TIMEOUT=900
HOLD=""
PRIMARY_RUN=0

while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --sluice) SLUICE_BIN="$2"; BUILD=0; shift 2 ;;
        --fast) FAST=1; shift ;;
        --per-test-timeout) PER_TEST_TIMEOUT="$2"; shift 2 ;;
        --suite-timeout) SUITE_TIMEOUT="$2"; shift 2 ;;
        --hold) HOLD="$2"; shift 2 ;;
        --primary-run) PRIMARY_RUN=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

log() { printf '[conformance %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ -n "$OUT" ] || OUT="$(mktemp -d /tmp/sluice-conformance-XXXXXX)"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

# --- PostgreSQL binaries and the OS user that runs them ----------------------------------------
pg_bindir() {
    if [ -n "${SLUICE_PG_BINDIR:-}" ]; then echo "$SLUICE_PG_BINDIR"; return; fi
    local best
    best="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k4 -n | tail -1 || true)"
    if [ -n "$best" ] && [ -x "$best/initdb" ]; then echo "$best"; return; fi
    if command -v pg_config >/dev/null && [ -x "$(pg_config --bindir)/initdb" ]; then
        pg_config --bindir; return
    fi
    die "no PostgreSQL server binaries (install the postgresql package, or run .ci/run)"
}
PGBIN="$(pg_bindir)"
if [ "$(id -u)" -eq 0 ]; then
    id postgres >/dev/null 2>&1 || die "running as root needs an OS user 'postgres'"
    as_pg() { runuser -u postgres -- env LC_ALL=C "$@"; }
else
    as_pg() { env LC_ALL=C "$@"; }
fi

# --- the driver and the suite, cached ------------------------------------------------------------
CACHE="${SLUICE_CONFORMANCE_CACHE:-$HOME/.cache/sluice-conformance}"
VENV="$CACHE/venv-psycopg2-$PSYCOPG2_VERSION"
SDIST="$CACHE/psycopg2-$PSYCOPG2_VERSION"
mkdir -p "$CACHE"
if ! "$VENV/bin/python" -c "import psycopg2" >/dev/null 2>&1; then
    log "creating $VENV with psycopg2-binary==$PSYCOPG2_VERSION"
    rm -rf "$VENV"
    timeout 120 python3 -m venv "$VENV" || die "python3 -m venv failed (install python3-venv)"
    timeout 300 "$VENV/bin/pip" install -q --disable-pip-version-check \
        "psycopg2-binary==$PSYCOPG2_VERSION" || die "pip install psycopg2-binary failed"
fi
if [ ! -f "$SDIST/tests/__init__.py" ]; then
    log "downloading the psycopg2 $PSYCOPG2_VERSION sdist (for its tests/)"
    tmp="$(mktemp -d)"
    timeout 300 "$VENV/bin/pip" download -q --disable-pip-version-check --no-deps \
        --no-binary :all: --no-build-isolation -d "$tmp" "psycopg2==$PSYCOPG2_VERSION" 2>/dev/null \
        || timeout 300 "$VENV/bin/pip" download -q --disable-pip-version-check --no-deps \
            --no-binary :all: -d "$tmp" "psycopg2==$PSYCOPG2_VERSION" \
        || die "pip download psycopg2==$PSYCOPG2_VERSION failed"
    tar -xzf "$tmp/psycopg2-$PSYCOPG2_VERSION.tar.gz" -C "$CACHE"
    rm -rf "$tmp"
fi
PY="$VENV/bin/python"
log "driver: $("$PY" -c 'import psycopg2; print("psycopg2", psycopg2.__version__, "libpq", psycopg2.__libpq_version__)')"

# --- sluice ----------------------------------------------------------------------------------------
if [ "$BUILD" -eq 1 ]; then
    log "cargo build"
    (cd "$ROOT" && timeout 1200 cargo build -q --bin sluice) || die "cargo build failed"
fi
[ -x "$SLUICE_BIN" ] || die "no sluice binary at $SLUICE_BIN"

# --- cleanup ---------------------------------------------------------------------------------------
WORK="$(mktemp -d /tmp/sluice-conformance-pg-XXXXXX)"
chmod 755 "$WORK"
[ "$(id -u)" -eq 0 ] && chown postgres: "$WORK"
SLUICE_PID=""
HOLD_PID=""
NODES=()
cleanup() {
    local rc=$?
    set +e
    [ -n "$HOLD_PID" ] && kill "$HOLD_PID" 2>/dev/null
    if [ -n "$SLUICE_PID" ] && kill -0 "$SLUICE_PID" 2>/dev/null; then
        kill -TERM "$SLUICE_PID" 2>/dev/null
        for _ in $(seq 1 30); do kill -0 "$SLUICE_PID" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$SLUICE_PID" 2>/dev/null
        wait "$SLUICE_PID" 2>/dev/null
    fi
    for node in "${NODES[@]}"; do
        local pid
        pid="$(head -1 "$WORK/$node/postmaster.pid" 2>/dev/null)"
        as_pg timeout 30 "$PGBIN/pg_ctl" stop -w -t 20 -m immediate -D "$WORK/$node" >/dev/null 2>&1
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            kill -QUIT "$pid" 2>/dev/null; sleep 1; kill -KILL "$pid" 2>/dev/null
        fi
        cp "$WORK/$node.log" "$OUT/$node.log" 2>/dev/null
    done
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() {
    python3 - <<'EOF'
import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()
EOF
}

psql_su() { # port db sql...
    local port="$1" db="$2"; shift 2
    local args=()
    for sql in "$@"; do args+=(-c "$sql"); done
    timeout 60 "$PGBIN/psql" -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres \
        -d "$db" "${args[@]}"
}

start_node() { # name port
    local name="$1" port="$2"
    echo "port = $port" | as_pg tee -a "$WORK/$name/postgresql.conf" >/dev/null
    NODES+=("$name")
    as_pg timeout 90 "$PGBIN/pg_ctl" -w -t 60 -D "$WORK/$name" -l "$WORK/$name.log" start \
        >/dev/null || { tail -30 "$WORK/$name.log" >&2; die "$name did not start"; }
}

# --- PostgreSQL primary + streaming replica ------------------------------------------------------
PRIMARY_PORT="$(free_port)"
REPLICA_PORT="$(free_port)"
SLUICE_PORT="$(free_port)"
ADMIN_PORT="$(free_port)"
SLUICE_PRIMARY_PORT="$(free_port)"
log "PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}'): primary 127.0.0.1:$PRIMARY_PORT, replica 127.0.0.1:$REPLICA_PORT"
as_pg timeout 120 "$PGBIN/initdb" -D "$WORK/node0" -U postgres -N -E UTF8 --locale=C \
    --auth=trust >"$OUT/initdb.log" 2>&1 || { cat "$OUT/initdb.log" >&2; die "initdb failed"; }
as_pg tee "$WORK/node0/pg_hba.conf" >/dev/null <<'EOF'
local all all trust
host all postgres 127.0.0.1/32 trust
host replication all 127.0.0.1/32 trust
host all all 127.0.0.1/32 scram-sha-256
EOF
as_pg tee -a "$WORK/node0/postgresql.conf" >/dev/null <<EOF

# sluice conformance run
listen_addresses = '127.0.0.1'
unix_socket_directories = '$WORK'
wal_level = replica
max_wal_senders = 10
hot_standby = on
fsync = off
shared_buffers = 32MB
max_connections = 100
max_prepared_transactions = 10
log_line_prefix = '%m [%p] %q%u@%d '
EOF
start_node node0 "$PRIMARY_PORT"
psql_su "$PRIMARY_PORT" postgres \
    "SET password_encryption = 'scram-sha-256'; CREATE ROLE psycopg2 LOGIN PASSWORD 'psycopg2-secret'" \
    "CREATE DATABASE psycopg2_test OWNER psycopg2"
psql_su "$PRIMARY_PORT" psycopg2_test \
    "CREATE EXTENSION hstore" "CREATE EXTENSION citext" \
    "GRANT ALL ON SCHEMA public TO psycopg2"

as_pg timeout 120 "$PGBIN/pg_basebackup" -h 127.0.0.1 -p "$PRIMARY_PORT" -U postgres \
    -D "$WORK/node1" -R -X stream -c fast >"$OUT/basebackup.log" 2>&1 \
    || { cat "$OUT/basebackup.log" >&2; die "pg_basebackup failed"; }
start_node node1 "$REPLICA_PORT"
for i in $(seq 1 300); do
    n="$(psql_su "$PRIMARY_PORT" postgres \
        "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'")"
    [ "$n" -ge 1 ] && break
    [ "$i" -eq 300 ] && { tail -30 "$WORK/node1.log" >&2; die "replica not streaming after 30 s"; }
    sleep 0.1
done

# --- sluice in transaction mode ------------------------------------------------------------------
# One [[clusters]] table: cluster_table NAME PORT CONSISTENCY.
cluster_table() {
    cat <<EOF

[[clusters]]
name = "$1"
protocol = "postgres"
listen = "127.0.0.1:$2"
pool_mode = "transaction"
consistency = "$3"
pool_size = 20

[clusters.discovery]
static = ["127.0.0.1:$PRIMARY_PORT", "127.0.0.1:$REPLICA_PORT"]

[[clusters.users]]
name = "psycopg2"
password = "psycopg2-secret"
EOF
}
{
    printf '[admin]\nlisten = "127.0.0.1:%s"\n' "$ADMIN_PORT"
    cluster_table conformance "$SLUICE_PORT" eventual
    if [ "$PRIMARY_RUN" -eq 1 ]; then
        cluster_table conformance-primary "$SLUICE_PRIMARY_PORT" primary
    fi
} >"$OUT/sluice.toml"
RUST_LOG="${RUST_LOG:-sluice=info}" "$SLUICE_BIN" --config "$OUT/sluice.toml" \
    >"$OUT/sluice.log" 2>&1 &
SLUICE_PID=$!
for i in $(seq 1 150); do
    topo="$(curl -s --max-time 2 "http://127.0.0.1:$ADMIN_PORT/topology" || true)"
    if [ "$(grep -o '"replica"' <<<"$topo" | wc -l)" -ge 1 ] \
        && [ "$(grep -o '"primary"' <<<"$topo" | wc -l)" -ge 1 ]; then
        break
    fi
    kill -0 "$SLUICE_PID" 2>/dev/null || { tail -30 "$OUT/sluice.log" >&2; die "sluice exited"; }
    [ "$i" -eq 150 ] && { echo "$topo" >&2; die "sluice did not see a primary and a replica in 30 s"; }
    sleep 0.2
done
echo "$topo" >"$OUT/topology.json"
log "sluice $("$SLUICE_BIN" --version 2>/dev/null | awk '{print $NF}') on 127.0.0.1:$SLUICE_PORT (admin $ADMIN_PORT), transaction mode"

if [ -n "$HOLD" ]; then
    cat >&2 <<EOF
holding for $HOLD s (Ctrl-C stops everything):
  direct : psql "host=127.0.0.1 port=$PRIMARY_PORT dbname=psycopg2_test user=psycopg2 password=psycopg2-secret"
  replica: psql "host=127.0.0.1 port=$REPLICA_PORT dbname=psycopg2_test user=postgres"
  sluice : psql "host=127.0.0.1 port=$SLUICE_PORT dbname=psycopg2_test user=psycopg2 password=psycopg2-secret"
  admin  : curl http://127.0.0.1:$ADMIN_PORT/topology
  sluice with consistency = "primary" (only with --primary-run): port $SLUICE_PRIMARY_PORT
  python : $PY
EOF
    sleep "$HOLD" & HOLD_PID=$!
    wait "$HOLD_PID" || true
    exit 0
fi

# --- the suite, twice ------------------------------------------------------------------------------
run_suite() { # label port
    local label="$1" port="$2"
    log "running the psycopg2 suite $label (port $port)"
    PSYCOPG2_TESTDB=psycopg2_test PSYCOPG2_TESTDB_HOST=127.0.0.1 PSYCOPG2_TESTDB_PORT="$port" \
    PSYCOPG2_TESTDB_USER=psycopg2 PSYCOPG2_TESTDB_PASSWORD=psycopg2-secret \
    PSYCOPG2_TEST_FAST="$FAST" PGCONNECT_TIMEOUT=10 \
        timeout "$((SUITE_TIMEOUT + 60))" "$PY" "$HERE/psycopg2_suite.py" run \
        --tests-dir "$SDIST" --out "$OUT/$label" \
        --per-test-timeout "$PER_TEST_TIMEOUT" --total-timeout "$SUITE_TIMEOUT" >&2
}
status=0
run_suite direct "$PRIMARY_PORT" || status=1
run_suite sluice "$SLUICE_PORT" || status=1
extra=()
if [ "$PRIMARY_RUN" -eq 1 ]; then
    run_suite sluice-primary "$SLUICE_PRIMARY_PORT" || status=1
    extra=("$OUT/sluice-primary")
fi
curl -s --max-time 5 "http://127.0.0.1:$ADMIN_PORT/metrics" >"$OUT/sluice-metrics.txt" || true

echo
echo "psycopg2 $PSYCOPG2_VERSION test suite, PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}'), sluice pool_mode = transaction, consistency = eventual"
"$PY" "$HERE/psycopg2_suite.py" compare "$OUT/direct" "$OUT/sluice" "${extra[@]}" \
    --known "$HERE/psycopg2-known-failures.txt" | tee "$OUT/comparison.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo
echo "raw outputs: $OUT"
exit "$status"
