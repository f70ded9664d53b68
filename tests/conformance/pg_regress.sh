#!/usr/bin/env bash
# Conformance run: PostgreSQL's own regression suite (src/test/regress, parallel_schedule),
# directly against a PostgreSQL primary and through sluice in several pool modes, compared
# test by test.
#
#   bash tests/conformance/pg_regress.sh [--sluice BIN] [--out DIR] [--variants a,b,...]
#                                        [--schedule NAME] [--run-timeout S] [--hold S]
#
# Variants (default: all four; `direct` always runs first, it is what the others are judged by):
#   session-primary        pool_mode = "session",     consistency = "primary"
#   transaction-primary    pool_mode = "transaction", consistency = "primary"
#   transaction-ryw        pool_mode = "transaction", consistency = "read-your-writes"
#   transaction-eventual   pool_mode = "transaction", consistency = "eventual"
#
# What it does (everything on 127.0.0.1, everything with a timeout, everything stopped on exit):
#   1. builds pg_regress and regress.so (+ refint.so, autoinc.so) from the Debian source of the
#      installed postgresql-NN package (`apt-get source`, adding deb-src entries derived from the
#      machine's Debian sources when there are none), configured --without-readline
#      --without-zlib --without-icu: the release tarball ships the generated parser and headers,
#      so no bison/flex; ~40 s. The modules are built from the same version's headers, so the
#      installed server loads them (checked). Source and build are cached in
#      $SLUICE_CONFORMANCE_CACHE (default ~/.cache/sluice-conformance);
#   2. starts a primary + streaming replica (max_prepared_transactions = 10), gives the bootstrap
#      superuser `postgres` a SCRAM password (it logs in over TCP with it), and one sluice (--sluice BIN, default target/debug/sluice, never built here)
#      with one listener per variant;
#   3. for each variant: drops and recreates database `regression` (as pg_regress itself would,
#      with its ALTER DATABASE ... SET lc_messages/...; plus leftover regress_* roles and
#      tablespaces), waits until the replica has replayed that, and runs
#      `pg_regress --use-existing --schedule parallel_schedule` against the primary (direct) or
#      the variant's sluice listener;
#   4. pg_regress_classify.py compares every variant with the direct run: a test that fails
#      through sluice but passes directly must be listed in pg_regress-known-failures.txt with
#      the decisive line of its diff; in transaction-eventual, a failure whose diff shows only
#      "stale read" patterns (objects just created not found, rows missing) is accepted by
#      design, and one that shows a write reaching the replica always fails the run.
# Raw outputs (per variant: pg_regress output, regression.diffs, regression.out, results/) go to
# --out DIR (default: a new temp dir, kept and printed at the end).
# --hold S starts PostgreSQL and sluice (all listeners), creates `regression`, prints the ports,
# waits S seconds (or Ctrl-C) and stops everything without running the suite.
# Exit status: 0 when every run completed and every sluice-only failure is accepted; 1 otherwise.
set -euo pipefail

OUT=""
SLUICE_BIN=""
VARIANTS="session-primary,transaction-primary,transaction-ryw,transaction-eventual"
SCHEDULE=parallel_schedule
RUN_TIMEOUT=600
HOLD=""

while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        --sluice) SLUICE_BIN="$2"; shift 2 ;;
        --variants) VARIANTS="$2"; shift 2 ;;
        --schedule) SCHEDULE="$2"; shift 2 ;;
        --run-timeout) RUN_TIMEOUT="$2"; shift 2 ;;
        --hold) HOLD="$2"; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

CONF_NAME=pg_regress
# shellcheck source=tests/conformance/lib.sh
source "$(dirname "$0")/lib.sh"
resolve_sluice_bin

select_variants "$VARIANTS"

# --- pg_regress and regress.so, built from the installed version's source ----------------------
PG_MAJOR="${PG_VERSION%%.*}"
DEB_PKG="postgresql-$PG_MAJOR"
DEB_VERSION="$(dpkg-query -W -f='${Version}' "$DEB_PKG" 2>/dev/null)" \
    || die "$DEB_PKG is not installed as a Debian package (the source must match the server)"
SRC="$CACHE/src/$DEB_PKG-$DEB_VERSION"
REGRESS="$SRC/src/test/regress"

# deb-src entries for the Debian archives the machine already uses (deb822 .sources files and
# one-line .list files), unless some deb-src entry exists.
ensure_deb_src() {
    if grep -rqsE '^[[:space:]]*(deb-src[[:space:]]|Types:.*deb-src)' \
        /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; then
        return 0
    fi
    [ "$(id -u)" -eq 0 ] || die "no deb-src entry in the apt sources (run as root to add one)"
    local f tmp_sources tmp_list
    tmp_sources="$(mktemp)"; tmp_list="$(mktemp)"
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        case "$f" in */sluice-conformance-src.*) continue ;; esac
        # every stanza with Types: deb and a Debian archive URI, as deb-src
        awk 'BEGIN { RS = ""; ORS = "\n\n" }
             /(^|\n)Types:[^\n]*deb/ && /(^|\n)URIs:[^\n]*debian/ {
                 sub(/Types:[^\n]*/, "Types: deb-src"); print }' "$f" >>"$tmp_sources"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        case "$f" in */sluice-conformance-src.*) continue ;; esac
        grep -E '^[[:space:]]*deb[[:space:]].*debian' "$f" \
            | sed -E 's/^[[:space:]]*deb[[:space:]]/deb-src /' >>"$tmp_list" || true
    done
    if [ -s "$tmp_sources" ]; then
        install -m 644 "$tmp_sources" /etc/apt/sources.list.d/sluice-conformance-src.sources
    fi
    if [ -s "$tmp_list" ]; then
        install -m 644 "$tmp_list" /etc/apt/sources.list.d/sluice-conformance-src.list
    fi
    rm -f "$tmp_sources" "$tmp_list"
    log "added deb-src entries: $(ls /etc/apt/sources.list.d/sluice-conformance-src.* 2>/dev/null | tr '\n' ' ')"
    APT_UPDATED=0
}

build_regress() {
    if [ -f "$REGRESS/.sluice-built" ]; then return 0; fi
    ensure_apt dpkg-dev gcc make libc6-dev
    if [ ! -f "$SRC/configure" ]; then
        ensure_deb_src
        if [ "$APT_UPDATED" -eq 0 ]; then
            log "apt-get update"
            timeout 300 apt-get update -q >/dev/null || die "apt-get update failed"
            APT_UPDATED=1
        fi
        local dl="$CACHE/src/download"
        rm -rf "$dl" "$SRC"; mkdir -p "$dl"
        log "apt-get source $DEB_PKG=$DEB_VERSION"
        (cd "$dl" && timeout 600 apt-get source -q --download-only "$DEB_PKG=$DEB_VERSION" \
            >"$OUT/apt-source.log" 2>&1) || { tail -20 "$OUT/apt-source.log" >&2; die "apt-get source failed"; }
        (cd "$dl" && timeout 300 dpkg-source -q -x ./*.dsc "$SRC" >>"$OUT/apt-source.log" 2>&1) \
            || { tail -20 "$OUT/apt-source.log" >&2; die "dpkg-source -x failed"; }
        rm -rf "$dl"
    fi
    log "building pg_regress and regress.so in $SRC"
    (cd "$SRC" && timeout 600 ./configure -q --without-readline --without-zlib --without-icu \
        >"$OUT/build.log" 2>&1) || { tail -30 "$OUT/build.log" >&2; die "configure failed"; }
    timeout 900 make -s -j"$(nproc)" -C "$REGRESS" >>"$OUT/build.log" 2>&1 \
        || { tail -30 "$OUT/build.log" >&2; die "make -C src/test/regress failed"; }
    for f in pg_regress regress.so refint.so autoinc.so; do
        [ -f "$REGRESS/$f" ] || die "the build made no $f"
    done
    touch "$REGRESS/.sluice-built"
}
start_build="$(date +%s)"
build_regress
log "pg_regress $DEB_VERSION ready ($(( $(date +%s) - start_build )) s)"

# What pg_regress and the server read and write, owned by the server's OS user: the server
# loads the modules from --dlpath and reads/writes files under --inputdir/--outputdir (COPY).
RDIR="$WORK/regress"
mkdir -p "$RDIR"
cp -r "$REGRESS/sql" "$REGRESS/expected" "$REGRESS/data" "$REGRESS/resultmap" \
    "$REGRESS"/*_schedule "$REGRESS/pg_regress" "$REGRESS/regress.so" "$REGRESS/refint.so" \
    "$REGRESS/autoinc.so" "$RDIR/"
[ -f "$RDIR/$SCHEDULE" ] || die "no schedule $SCHEDULE in $REGRESS"
if [ "$(id -u)" -eq 0 ]; then chown -R postgres: "$RDIR"; fi

# --- PostgreSQL primary + streaming replica, the regress user ----------------------------------
PRIMARY_PORT="$(free_port)"
REPLICA_PORT="$(free_port)"
ADMIN_PORT="$(free_port)"
log "PostgreSQL $PG_VERSION: primary 127.0.0.1:$PRIMARY_PORT, replica 127.0.0.1:$REPLICA_PORT"
PG_SCRAM_POSTGRES=1
pg_init_primary "$PRIMARY_PORT" <<'EOF'
max_connections = 200
max_prepared_transactions = 10
EOF
# pg_regress's tests create roles, tablespaces, C functions, event triggers, ...: a superuser,
# and the bootstrap one (sequence.out expects the test user to own pg_class). It logs in over
# TCP with SCRAM, directly and through sluice.
psql_su "$PRIMARY_PORT" postgres \
    "SET password_encryption = 'scram-sha-256'; ALTER ROLE postgres PASSWORD 'regress-secret'"
psql_su "$PRIMARY_PORT" postgres "LOAD '$RDIR/regress.so'" "LOAD '$RDIR/refint.so'" \
    "LOAD '$RDIR/autoinc.so'" || die "the server cannot load the modules built in $REGRESS"
pg_start_replica "$REPLICA_PORT"

# --- sluice: one listener per variant ---------------------------------------------------------------
# pool_size above the largest parallel group (20 tests), so session mode never waits
sluice_start_variants 30 postgres regress-secret

# The database as pg_regress creates it without --use-existing, after removing what a previous
# run may have left: roles and tablespaces the tests create are cluster-wide.
recreate_regression_db() {
    # a run through a pooler may leave a prepared transaction (temp.sql's twophase_search)
    local xact
    for xact in $(psql_su "$PRIMARY_PORT" postgres \
        "SELECT database || '/' || gid FROM pg_prepared_xacts"); do
        psql_su "$PRIMARY_PORT" "${xact%%/*}" "ROLLBACK PREPARED '${xact#*/}'" || true
    done
    psql_su "$PRIMARY_PORT" postgres "DROP DATABASE IF EXISTS regression WITH (FORCE)"
    local stale
    stale="$(psql_su "$PRIMARY_PORT" postgres \
        "SELECT string_agg(quote_ident(spcname), ',') FROM pg_tablespace WHERE spcname LIKE 'regress\_%'")"
    [ -z "$stale" ] || psql_su "$PRIMARY_PORT" postgres "DROP TABLESPACE $stale" || true
    stale="$(psql_su "$PRIMARY_PORT" postgres \
        "SELECT string_agg(quote_ident(rolname), ',') FROM pg_roles WHERE rolname LIKE 'regress\_%'")"
    [ -z "$stale" ] || psql_su "$PRIMARY_PORT" postgres "DROP ROLE $stale" \
        || die "could not drop roles left by the previous run: $stale"
    psql_su "$PRIMARY_PORT" postgres "CREATE DATABASE regression TEMPLATE = template0" \
        "ALTER DATABASE regression SET lc_messages TO 'C'" \
        "ALTER DATABASE regression SET lc_monetary TO 'C'" \
        "ALTER DATABASE regression SET lc_numeric TO 'C'" \
        "ALTER DATABASE regression SET lc_time TO 'C'" \
        "ALTER DATABASE regression SET bytea_output TO 'hex'" \
        "ALTER DATABASE regression SET timezone_abbreviations TO 'Default'"
    pg_wait_replica_caught_up 60
}

if [ -n "$HOLD" ]; then
    recreate_regression_db
    {
        echo "holding for $HOLD s (Ctrl-C stops everything):"
        echo "  direct : psql \"host=127.0.0.1 port=$PRIMARY_PORT dbname=regression user=postgres password=regress-secret\""
        echo "  replica: psql \"host=127.0.0.1 port=$REPLICA_PORT dbname=regression user=postgres\""
        for v in "${SELECTED[@]}"; do
            echo "  $v: psql \"host=127.0.0.1 port=${PORT_OF[$v]} dbname=regression user=postgres password=regress-secret\""
        done
        echo "  admin  : curl http://127.0.0.1:$ADMIN_PORT/topology"
        echo "  pg_regress: $RDIR/pg_regress --use-existing --host 127.0.0.1 --port PORT --user postgres --bindir $PGBIN --dlpath $RDIR --inputdir $RDIR --outputdir DIR TEST... (as postgres, PGPASSWORD=regress-secret)"
    } >&2
    hold_for "$HOLD"
    exit 0
fi

# --- the suite, once per variant -------------------------------------------------------------------
status=0
run_variant() { # variant
    local v="$1" port="${PORT_OF[$1]}" odir="$WORK/out-$1" started rc=0
    recreate_regression_db
    mkdir -p "$odir" "$OUT/$v"
    if [ "$(id -u)" -eq 0 ]; then chown postgres: "$odir"; fi
    log "running $SCHEDULE $v (port $port)"
    started="$(date +%s)"
    as_pg env PGPASSWORD=regress-secret PGCONNECT_TIMEOUT=10 \
        timeout -k 10 "$RUN_TIMEOUT" "$RDIR/pg_regress" --use-existing \
        --host 127.0.0.1 --port "$port" --user postgres --bindir "$PGBIN" \
        --dlpath "$RDIR" --inputdir "$RDIR" --outputdir "$odir" \
        --schedule "$RDIR/$SCHEDULE" >"$OUT/$v/pg_regress.out" 2>&1 || rc=$?
    # pg_regress exits 1 when a test failed; anything else (timeout: 124) means an incomplete run
    echo "{\"variant\": \"$v\", \"exit\": $rc, \"seconds\": $(( $(date +%s) - started ))}" \
        >"$OUT/$v/run.json"
    cp "$odir/regression.diffs" "$odir/regression.out" "$OUT/$v/" 2>/dev/null || true
    cp -r "$odir/results" "$OUT/$v/" 2>/dev/null || true
    log "$v: $(grep -E '^(#| )' "$OUT/$v/pg_regress.out" | grep -E 'tests (passed|failed)' | head -1 | sed 's/^[ #]*//') ($(( $(date +%s) - started )) s, exit $rc)"
    if [ "$rc" -gt 1 ]; then status=1; fi
}
run_variant direct
for v in "${SELECTED[@]}"; do
    run_variant "$v"
done
curl -s --max-time 5 "http://127.0.0.1:$ADMIN_PORT/metrics" >"$OUT/sluice-metrics.txt" 2>/dev/null || true

echo
echo "PostgreSQL $PG_VERSION regression suite ($SCHEDULE, pg_regress --use-existing), directly and through sluice"
python3 "$HERE/pg_regress_classify.py" --self-test || status=1
if ! python3 "$HERE/pg_regress_classify.py" --out "$OUT" --variants "$(IFS=,; echo "${SELECTED[*]}")" \
        --sql-dir "$REGRESS/sql" --known "$HERE/pg_regress-known-failures.txt" | tee "$OUT/comparison.txt"; then
    status=1
fi
echo
echo "raw outputs: $OUT"
exit "$status"
