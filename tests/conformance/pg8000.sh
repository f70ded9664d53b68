#!/usr/bin/env bash
# Conformance run: pg8000's own test suite (pytest), directly against PostgreSQL and through
# sluice in several pool modes, compared test by test.
#
#   bash tests/conformance/pg8000.sh [--sluice BIN] [--out DIR] [--variants a,b,...]
#                                    [--per-test-timeout S] [--suite-timeout S] [--hold S]
#
# Variants (default: all three; `direct` always runs first, it is what the others are judged by):
#   session-primary        pool_mode = "session",     consistency = "primary"
#   transaction-primary    pool_mode = "transaction", consistency = "primary"
#   transaction-ryw        pool_mode = "transaction", consistency = "read-your-writes"
#
# pg8000 is a pure-Python driver that speaks the protocol itself: every query is extended
# protocol (Parse/Bind/Describe/Execute/Sync, unnamed statements unless prepared), COPY in and
# out, NOTIFY, its own SCRAM. Its three APIs (native, dbapi, legacy) each have a suite.
#
# What it does (everything on 127.0.0.1, everything with a timeout, everything stopped on exit):
#   1. gets pg8000 1.31.6 with its pinned dependencies and pytest, pytest-mock, pytest-timeout,
#      pytest-benchmark and pytz (what its tox environment installs) into a venv, and the test/
#      of the pg8000 sdist, cached in $SLUICE_CONFORMANCE_CACHE (default
#      ~/.cache/sluice-conformance); the tests run with the installed pg8000;
#   2. starts a primary + streaming replica set up as pg8000's README asks (the hstore
#      extension, SCRAM passwords) and one sluice (--sluice BIN, default target/debug/sluice,
#      never built here) with one listener per variant; the suite logs in as the superuser
#      `postgres`, and creates roles of its own that log in through sluice by `auth_query`
#      (`auth_user = "postgres"`, `auth_dbname = "postgres"`: what a PgBouncer user would set);
#   3. runs the suite with pytest (pytest_jsonl.py records one outcome per test in
#      results.jsonl; pytest-timeout fails a test after --per-test-timeout) with
#      PGHOST/PGPORT/PGPASSWORD pointing at the primary, then at each variant's listener;
#      between runs, the roles and tables a run may have left are dropped on the primary;
#   4. compares each variant with the direct run (psycopg2_suite.py compare).
# Excluded: test/*/auth (they log in to databases pg8000_md5, pg8000_gss, pg8000_password and
# pg8000_scram_sha_256 whose pg_hba.conf method is md5, gss, password or scram, with and
# without SSL: the server's authentication methods, which sluice replaces with its own client
# authentication; README "Authentication modes").
# Raw outputs (per run: results.jsonl, pytest.log, summary.json) go to --out DIR.
# --hold S starts PostgreSQL and sluice, prints the ports, waits S seconds (or Ctrl-C).
# Exit status: 0 when every run completed and every test that fails only through sluice is
# listed for its variant in pg8000-known-failures.txt; 1 otherwise.
set -euo pipefail

PG8000_VERSION=1.31.6
OUT=""
SLUICE_BIN=""
VARIANTS="session-primary,transaction-primary,transaction-ryw"
PER_TEST_TIMEOUT=60
SUITE_TIMEOUT=900
HOLD=""

while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        --sluice) SLUICE_BIN="$2"; shift 2 ;;
        --variants) VARIANTS="$2"; shift 2 ;;
        --per-test-timeout) PER_TEST_TIMEOUT="$2"; shift 2 ;;
        --suite-timeout) SUITE_TIMEOUT="$2"; shift 2 ;;
        --hold) HOLD="$2"; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

CONF_NAME=pg8000
# shellcheck source=tests/conformance/lib.sh
source "$(dirname "$0")/lib.sh"
resolve_sluice_bin

select_variants "$VARIANTS"

# --- the driver and the suite, cached ------------------------------------------------------------
VENV="$CACHE/venv-pg8000-$PG8000_VERSION"
TESTS="$CACHE/pg8000-$PG8000_VERSION-tests"
ensure_venv "$VENV" "import pg8000, pytest, pytest_mock, pytest_timeout, pytest_benchmark, pytz" \
    "pg8000==$PG8000_VERSION" "pytest==9.2.0" "pytest-mock==3.17.0" "pytest-timeout==2.4.0" \
    "pytest-benchmark==5.3.1" "pytz==2026.6"
cached_sdist_parts pg8000 "$PG8000_VERSION" "$TESTS" test README.md
PY="$VENV/bin/python"
log "driver: pg8000 $("$PY" -c 'import importlib.metadata as m; print(m.version("pg8000"))'), pytest $("$PY" -c 'import pytest; print(pytest.__version__)')"

# --- PostgreSQL primary + streaming replica ------------------------------------------------------
PRIMARY_PORT="$(free_port)"
REPLICA_PORT="$(free_port)"
ADMIN_PORT="$(free_port)"
PASSWORD=pg8000-secret
log "PostgreSQL $PG_VERSION: primary 127.0.0.1:$PRIMARY_PORT, replica 127.0.0.1:$REPLICA_PORT"
PG_SCRAM_POSTGRES=1
pg_init_primary "$PRIMARY_PORT" <<'EOF'
max_connections = 200
password_encryption = 'scram-sha-256'
EOF
psql_su "$PRIMARY_PORT" postgres \
    "ALTER ROLE postgres PASSWORD '$PASSWORD'" "CREATE EXTENSION hstore"
pg_start_replica "$REPLICA_PORT"

SLUICE_CLUSTER_EXTRA=$'auth_user = "postgres"\nauth_dbname = "postgres"' \
    sluice_start_variants 20 postgres "$PASSWORD"

if [ -n "$HOLD" ]; then
    {
        echo "holding for $HOLD s (Ctrl-C stops everything):"
        echo "  direct : psql \"host=127.0.0.1 port=$PRIMARY_PORT dbname=postgres user=postgres password=$PASSWORD\""
        for v in "${SELECTED[@]}"; do
            echo "  $v: psql \"host=127.0.0.1 port=${PORT_OF[$v]} dbname=postgres user=postgres password=$PASSWORD\""
        done
        echo "  admin  : curl http://127.0.0.1:$ADMIN_PORT/topology"
        echo "  one test: cd $TESTS && PGHOST=127.0.0.1 PGPORT=PORT PGPASSWORD=$PASSWORD $PY -m pytest -p no:cacheprovider test/native/test_query.py"
    } >&2
    hold_for "$HOLD"
    exit 0
fi

# What a run may leave behind (a test that failed before its cleanup): roles, the tables and
# types of `postgres`'s public schema (hstore stays), prepared transactions.
reset_server() {
    local x xact
    for xact in $(psql_su "$PRIMARY_PORT" postgres "SELECT gid FROM pg_prepared_xacts"); do
        psql_su "$PRIMARY_PORT" postgres "ROLLBACK PREPARED '$xact'" || true
    done
    psql_su "$PRIMARY_PORT" postgres "DROP SCHEMA public CASCADE" "CREATE SCHEMA public" \
        "GRANT ALL ON SCHEMA public TO public" "CREATE EXTENSION hstore"
    for x in $(psql_su "$PRIMARY_PORT" postgres \
        "SELECT quote_ident(rolname) FROM pg_roles WHERE rolname !~ '^pg_' AND rolname <> 'postgres'"); do
        psql_su "$PRIMARY_PORT" postgres "DROP OWNED BY $x" "DROP ROLE $x" || true
    done
    pg_wait_replica_caught_up 60
}

# --- the suite, once per variant -------------------------------------------------------------------
status=0
run_suite() { # variant
    local v="$1" port="${PORT_OF[$1]}" started code
    reset_server >"$OUT/reset-$v.log" 2>&1 || { cat "$OUT/reset-$v.log" >&2; die "could not reset the server"; }
    log "running the pg8000 suite $v (port $port)"
    mkdir -p "$OUT/$v"
    rm -f "$OUT/$v/results.jsonl"
    started=$SECONDS
    code=0
    (cd "$TESTS" && PGHOST=127.0.0.1 PGPORT="$port" PGPASSWORD="$PASSWORD" \
        PYTHONPATH="$HERE" PYTHONDONTWRITEBYTECODE=1 \
        timeout "$SUITE_TIMEOUT" "$PY" -m pytest -p no:cacheprovider -p pytest_jsonl \
        --jsonl-out "$OUT/$v/results.jsonl" --timeout "$PER_TEST_TIMEOUT" -q -rfE \
        --ignore=test/native/auth --ignore=test/dbapi/auth --ignore=test/legacy/auth test \
        >"$OUT/$v/pytest.log" 2>&1) || code=$?
    # pytest: 0 all passed, 1 some failed; anything else (an interrupted run, a usage error,
    # the suite timeout's 124) means the run did not complete.
    local run_status=complete
    case "$code" in
        0|1) ;;
        124) run_status="stopped: suite timeout $SUITE_TIMEOUT s"; status=1 ;;
        *) run_status="pytest exited with $code (see pytest.log)"; status=1 ;;
    esac
    printf '{"status": "%s", "seconds": %s}\n' "$run_status" "$((SECONDS - started))" \
        >"$OUT/$v/summary.json"
    log "$v: $(tail -n 1 "$OUT/$v/pytest.log") ($run_status)"
}
run_suite direct
for v in "${SELECTED[@]}"; do
    run_suite "$v"
done
curl -s --max-time 5 "http://127.0.0.1:$ADMIN_PORT/metrics" >"$OUT/sluice-metrics.txt" 2>/dev/null || true

compare_variants "pg8000 $PG8000_VERSION test suite" "$HERE/pg8000-known-failures.txt"
echo
echo "raw outputs: $OUT"
exit "$status"
