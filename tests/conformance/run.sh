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

PSYCOPG2_VERSION=2.9.13
OUT=""
BUILD=1
SLUICE_BIN=""
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

CONF_NAME=conformance
# shellcheck source=tests/conformance/lib.sh
source "$(dirname "$0")/lib.sh"
[ -n "$SLUICE_BIN" ] || SLUICE_BIN="$ROOT/target/debug/sluice"

# --- the driver and the suite, cached ------------------------------------------------------------
VENV="$CACHE/venv-psycopg2-$PSYCOPG2_VERSION"
SDIST="$CACHE/psycopg2-$PSYCOPG2_VERSION"
if ! "$VENV/bin/python" -c "import psycopg2" >/dev/null 2>&1; then
    log "creating $VENV with psycopg2-binary==$PSYCOPG2_VERSION"
    rm -rf "$VENV"
    timeout 120 python3 -m venv "$VENV" || die "python3 -m venv failed (install python3-venv)"
    timeout 300 "$VENV/bin/pip" install -q --disable-pip-version-check \
        "psycopg2-binary==$PSYCOPG2_VERSION" || die "pip install psycopg2-binary failed"
fi
if [ ! -f "$SDIST/tests/__init__.py" ]; then
    log "downloading the psycopg2 $PSYCOPG2_VERSION sdist (for its tests/)"
    pypi_sdist psycopg2 "$PSYCOPG2_VERSION" "$CACHE" \
        || die "could not download the psycopg2 $PSYCOPG2_VERSION sdist from PyPI"
fi
PY="$VENV/bin/python"
log "driver: $("$PY" -c 'import psycopg2; print("psycopg2", psycopg2.__version__, "libpq", psycopg2.__libpq_version__)')"

# --- sluice ----------------------------------------------------------------------------------------
if [ "$BUILD" -eq 1 ]; then
    log "cargo build"
    (cd "$ROOT" && timeout 1200 cargo build -q --bin sluice) || die "cargo build failed"
fi
[ -x "$SLUICE_BIN" ] || die "no sluice binary at $SLUICE_BIN"

# --- PostgreSQL primary + streaming replica ------------------------------------------------------
PRIMARY_PORT="$(free_port)"
REPLICA_PORT="$(free_port)"
SLUICE_PORT="$(free_port)"
ADMIN_PORT="$(free_port)"
SLUICE_PRIMARY_PORT="$(free_port)"
log "PostgreSQL $PG_VERSION: primary 127.0.0.1:$PRIMARY_PORT, replica 127.0.0.1:$REPLICA_PORT"
pg_init_primary "$PRIMARY_PORT" <<<"max_prepared_transactions = 10"
psql_su "$PRIMARY_PORT" postgres \
    "SET password_encryption = 'scram-sha-256'; CREATE ROLE psycopg2 LOGIN PASSWORD 'psycopg2-secret'" \
    "CREATE DATABASE psycopg2_test OWNER psycopg2"
psql_su "$PRIMARY_PORT" psycopg2_test \
    "CREATE EXTENSION hstore" "CREATE EXTENSION citext" \
    "GRANT ALL ON SCHEMA public TO psycopg2"

pg_start_replica "$REPLICA_PORT"

# --- sluice in transaction mode ------------------------------------------------------------------
# One [[clusters]] table: cluster_table NAME PORT CONSISTENCY.
cluster_table() {
    sluice_cluster_table "$1" "$2" transaction "$3" 20 psycopg2 psycopg2-secret
}
{
    printf '[admin]\nlisten = "127.0.0.1:%s"\n' "$ADMIN_PORT"
    cluster_table conformance "$SLUICE_PORT" eventual
    if [ "$PRIMARY_RUN" -eq 1 ]; then
        cluster_table conformance-primary "$SLUICE_PRIMARY_PORT" primary
    fi
} >"$OUT/sluice.toml"
sluice_start "$SLUICE_BIN" "$OUT/sluice.toml" "$ADMIN_PORT" "$OUT/sluice.log"
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
    hold_for "$HOLD"
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
if ! "$PY" "$HERE/psycopg2_suite.py" compare "$OUT/direct" "$OUT/sluice" "${extra[@]}" \
        --known "$HERE/psycopg2-known-failures.txt" | tee "$OUT/comparison.txt"; then
    status=1
fi
echo
echo "raw outputs: $OUT"
exit "$status"
