#!/usr/bin/env bash
# Conformance run: asyncpg's own test suite, directly against PostgreSQL and through sluice in
# several pool modes, compared test by test.
#
#   bash tests/conformance/asyncpg.sh [--sluice BIN] [--out DIR] [--variants a,b,...]
#                                     [--per-test-timeout S] [--per-file-timeout S]
#                                     [--suite-timeout S] [--hold S]
#
# Variants (default: all three; `direct` always runs first, it is what the others are judged by):
#   session-primary        pool_mode = "session",     consistency = "primary"
#   transaction-primary    pool_mode = "transaction", consistency = "primary"
#   transaction-ryw        pool_mode = "transaction", consistency = "read-your-writes"
#
# What it does (everything on 127.0.0.1, everything with a timeout, everything stopped on exit):
#   1. gets asyncpg 0.32.0 (the wheel) and distro (test_connect imports it) into a venv, and the
#      tests/ of the asyncpg 0.32.0 sdist, cached in $SLUICE_CONFORMANCE_CACHE (default
#      ~/.cache/sluice-conformance); the tests run with the installed asyncpg (only tests/ is
#      on the path, not the sdist's uncompiled package);
#   2. starts a primary + streaming replica; the suite logs in as the superuser `postgres` with a
#      SCRAM password (it creates databases, roles and extensions: hstore, citext, isn) to
#      database `postgres`; starts one sluice (--sluice BIN, default target/debug/sluice, never
#      built here) with one listener per variant;
#   3. runs the suite (psycopg2_suite.py run --suite asyncpg: one outcome per test in
#      results.jsonl, a hung test is recorded as `timeout` after --per-test-timeout, a test
#      module that exceeds --per-file-timeout has its remaining tests recorded as `timeout`)
#      with PGHOST/PGPORT/PGUSER/PGPASSWORD/PGDATABASE pointing at the primary, then at each
#      variant's listener; between runs, what a run may have left (databases, roles, the
#      public schema of `postgres`) is dropped directly on the primary;
#   4. compares each variant with the direct run (psycopg2_suite.py compare).
# With PGHOST set, asyncpg's _testbase uses RunningCluster and the suite itself skips what needs
# a cluster it manages (auth methods via pg_hba, SSL, GSS, adversity/fuzzing proxies, ...).
# Excluded here, as they cannot run against an external server: the 5 tests of
# test_connect.TestConnectionAttributes (HotStandbyTestCase: they initdb their own primary and
# standby with TempCluster, which does not look at PGHOST).
# Raw outputs (per run: results.jsonl, unittest.log, summary.json) go to --out DIR.
# --hold S starts PostgreSQL and sluice, prints the ports, waits S seconds (or Ctrl-C).
# Exit status: 0 when every run completed and every test that fails only through sluice is
# listed for its variant in asyncpg-known-failures.txt; 1 otherwise.
set -euo pipefail

ASYNCPG_VERSION=0.32.0
DISTRO_VERSION=1.9.0
OUT=""
SLUICE_BIN=""
VARIANTS="session-primary,transaction-primary,transaction-ryw"
PER_TEST_TIMEOUT=60
PER_FILE_TIMEOUT=240
SUITE_TIMEOUT=900
HOLD=""

while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        --sluice) SLUICE_BIN="$2"; shift 2 ;;
        --variants) VARIANTS="$2"; shift 2 ;;
        --per-test-timeout) PER_TEST_TIMEOUT="$2"; shift 2 ;;
        --per-file-timeout) PER_FILE_TIMEOUT="$2"; shift 2 ;;
        --suite-timeout) SUITE_TIMEOUT="$2"; shift 2 ;;
        --hold) HOLD="$2"; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

CONF_NAME=asyncpg
# shellcheck source=tests/conformance/lib.sh
source "$(dirname "$0")/lib.sh"
resolve_sluice_bin

select_variants "$VARIANTS"

# --- the driver and the suite, cached ------------------------------------------------------------
VENV="$CACHE/venv-asyncpg-$ASYNCPG_VERSION"
TESTS="$CACHE/asyncpg-$ASYNCPG_VERSION-tests"
ensure_venv "$VENV" "import asyncpg, distro" --only-binary asyncpg \
    "asyncpg==$ASYNCPG_VERSION" "distro==$DISTRO_VERSION"
cached_sdist_parts asyncpg "$ASYNCPG_VERSION" "$TESTS" tests
PY="$VENV/bin/python"
log "driver: asyncpg $("$PY" -c 'import asyncpg; print(asyncpg.__version__)')"

# --- PostgreSQL primary + streaming replica ------------------------------------------------------
PRIMARY_PORT="$(free_port)"
REPLICA_PORT="$(free_port)"
ADMIN_PORT="$(free_port)"
PASSWORD=asyncpg-secret
log "PostgreSQL $PG_VERSION: primary 127.0.0.1:$PRIMARY_PORT, replica 127.0.0.1:$REPLICA_PORT"
PG_SCRAM_POSTGRES=1
# jit = off as asyncpg's own managed test clusters (timing-sensitive tests)
pg_init_primary "$PRIMARY_PORT" <<'EOF'
max_connections = 300
jit = off
EOF
psql_su "$PRIMARY_PORT" postgres \
    "SET password_encryption = 'scram-sha-256'; ALTER ROLE postgres PASSWORD '$PASSWORD'"
pg_start_replica "$REPLICA_PORT"

# the pool tests open up to ~30 connections at once
sluice_start_variants 40 postgres "$PASSWORD"

if [ -n "$HOLD" ]; then
    {
        echo "holding for $HOLD s (Ctrl-C stops everything):"
        echo "  direct : psql \"host=127.0.0.1 port=$PRIMARY_PORT dbname=postgres user=postgres password=$PASSWORD\""
        echo "  replica: psql \"host=127.0.0.1 port=$REPLICA_PORT dbname=postgres user=postgres password=$PASSWORD\""
        for v in "${SELECTED[@]}"; do
            echo "  $v: psql \"host=127.0.0.1 port=${PORT_OF[$v]} dbname=postgres user=postgres password=$PASSWORD\""
        done
        echo "  admin  : curl http://127.0.0.1:$ADMIN_PORT/topology"
        echo "  one test: cd $TESTS && PGHOST=127.0.0.1 PGPORT=PORT PGUSER=postgres PGPASSWORD=$PASSWORD PGDATABASE=postgres $PY -m unittest -v tests.test_execute"
    } >&2
    hold_for "$HOLD"
    exit 0
fi

# What a run may leave behind (a test that failed before its cleanup): other databases, roles,
# the public schema of `postgres` (tables, types, extensions), prepared transactions.
reset_server() {
    local x
    local xact
    for xact in $(psql_su "$PRIMARY_PORT" postgres \
        "SELECT database || '/' || gid FROM pg_prepared_xacts"); do
        psql_su "$PRIMARY_PORT" "${xact%%/*}" "ROLLBACK PREPARED '${xact#*/}'" || true
    done
    for x in $(psql_su "$PRIMARY_PORT" postgres \
        "SELECT quote_ident(datname) FROM pg_database WHERE datname NOT IN ('postgres', 'template0', 'template1')"); do
        psql_su "$PRIMARY_PORT" postgres "DROP DATABASE $x WITH (FORCE)"
    done
    psql_su "$PRIMARY_PORT" postgres "DROP SCHEMA public CASCADE" "CREATE SCHEMA public" \
        "GRANT ALL ON SCHEMA public TO public"
    for x in $(psql_su "$PRIMARY_PORT" postgres \
        "SELECT quote_ident(rolname) FROM pg_roles WHERE rolname !~ '^pg_' AND rolname <> 'postgres'"); do
        psql_su "$PRIMARY_PORT" postgres "DROP OWNED BY $x" "DROP ROLE $x" || true
    done
    pg_wait_replica_caught_up 60
}

# --- the suite, once per variant -------------------------------------------------------------------
EXCLUDE=(
    --exclude "test_connect.TestConnectionAttributes.=HotStandbyTestCase initdbs its own primary and standby (TempCluster)"
)
status=0
run_suite() { # variant
    local v="$1" port="${PORT_OF[$1]}"
    reset_server >"$OUT/reset-$v.log" 2>&1 || { cat "$OUT/reset-$v.log" >&2; die "could not reset the server"; }
    log "running the asyncpg suite $v (port $port)"
    PGHOST=127.0.0.1 PGPORT="$port" PGUSER=postgres PGPASSWORD="$PASSWORD" PGDATABASE=postgres \
    PGSSLMODE=disable PYTHONDONTWRITEBYTECODE=1 \
        timeout "$((SUITE_TIMEOUT + 60))" "$PY" "$HERE/psycopg2_suite.py" run --suite asyncpg \
        --tests-dir "$TESTS" --out "$OUT/$v" "${EXCLUDE[@]}" \
        --per-test-timeout "$PER_TEST_TIMEOUT" --per-file-timeout "$PER_FILE_TIMEOUT" \
        --total-timeout "$SUITE_TIMEOUT" >&2 || status=1
}
run_suite direct
for v in "${SELECTED[@]}"; do
    run_suite "$v"
done
curl -s --max-time 5 "http://127.0.0.1:$ADMIN_PORT/metrics" >"$OUT/sluice-metrics.txt" 2>/dev/null || true

compare_variants "asyncpg $ASYNCPG_VERSION test suite" "$HERE/asyncpg-known-failures.txt"
echo
echo "raw outputs: $OUT"
exit "$status"
