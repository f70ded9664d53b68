# Shared by the conformance scripts (run.sh, pg_regress.sh, asyncpg.sh); sourced, not run.
#
# The caller sets CONF_NAME (the log prefix) and OUT (may be empty: a temp dir is made), then
# sources this file, which gives it:
#   ROOT HERE CACHE OUT       the checkout, this directory, the download cache, the output dir
#   log / die                 timestamped messages on stderr; die exits 1 (cleanup runs)
#   PGBIN, as_pg CMD...       the PostgreSQL server binaries, and CMD as the `postgres` OS user
#                             when run as root
#   WORK                      a scratch dir owned by that user, removed on exit
#   free_port                 an unused TCP port on 127.0.0.1
#   ensure_apt PKG...         apt-get install (as root, with timeouts) the packages not installed
#   resolve_sluice_bin        SLUICE_BIN made absolute (default target/debug/sluice), or die
#   variant_settings NAME     "pool_mode consistency" of a variant (session-primary,
#                             transaction-primary, transaction-ryw, transaction-eventual)
#   select_variants LIST      SELECTED: the variants of a comma-separated LIST (`direct` skipped)
#   ensure_venv VENV CHECK PIP_ARG...
#                             create VENV with `pip install PIP_ARG...` unless its python can run
#                             CHECK (an import line) already
#   cached_sdist_parts NAME VERSION DEST PART...
#                             copy PARTs (paths inside the sdist, e.g. tests/) of the NAME
#                             VERSION sdist into DEST, unless an earlier copy completed
#   sluice_start_variants POOL_SIZE USER PASSWORD
#                             one sluice with one cluster per variant of SELECTED (PORT_OF[v]
#                             its port, PORT_OF[direct] the primary's), started and logged
#   compare_variants LABEL KNOWN_FILE
#                             psycopg2_suite.py compare of each variant's run ($OUT/<variant>)
#                             with $OUT/direct ($PY runs it); sets `status=1` on a failure
#   pypi_sdist NAME VERSION DIR
#                             unpack the sdist NAME-VERSION.tar.gz from PyPI into DIR (found
#                             in PyPI's simple index, checked against its sha256; nothing is
#                             built, as `pip download --no-binary` would; that is the fallback)
#   pg_init_primary PORT      initdb + start node0 (extra postgresql.conf lines on stdin)
#   pg_start_replica PORT     pg_basebackup node1 from node0, start it, wait for streaming
#   pg_wait_replica_caught_up the replica has replayed everything the primary has written
#   psql_su PORT DB SQL...    psql as the superuser `postgres` (unix socket in $WORK, trust)
#   sluice_cluster_table NAME PORT POOL_MODE CONSISTENCY POOL_SIZE USER PASSWORD
#                             one [[clusters]] table in front of node0 + node1 (with the lines
#                             of $SLUICE_CLUSTER_EXTRA, if set, among the cluster's settings)
#   sluice_start BIN CONFIG ADMIN_PORT [LOG]
#                             start sluice, wait until /topology shows a primary and a replica
#   sluice_stop               stop it (SIGTERM, then SIGKILL after 6 s)
#   hold_for S                sleep S seconds or until Ctrl-C (for --hold)
# Everything started here (sluice, PostgreSQL nodes, a --hold sleep) is stopped on exit, and the
# server logs are copied to $OUT. Extra cleanup: define conformance_cleanup_hook.
# shellcheck shell=bash

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HERE="$ROOT/tests/conformance"
CONF_NAME="${CONF_NAME:-conformance}"

log() { printf '[%s %s] %s\n' "$CONF_NAME" "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ -n "${OUT:-}" ] || OUT="$(mktemp -d "/tmp/sluice-$CONF_NAME-XXXXXX")"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

CACHE="${SLUICE_CONFORMANCE_CACHE:-$HOME/.cache/sluice-conformance}"
mkdir -p "$CACHE"

# --- packages ------------------------------------------------------------------------------------
APT_UPDATED=0
ensure_apt() { # PKG... (the ones not installed yet)
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "${p%%=*}" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$p")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] || die "missing packages ${missing[*]} (run as root, or install them)"
    if [ "$APT_UPDATED" -eq 0 ]; then
        log "apt-get update"
        timeout 300 apt-get update -q >/dev/null || die "apt-get update failed"
        APT_UPDATED=1
    fi
    log "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -q --no-install-recommends \
        "${missing[@]}" >/dev/null || die "apt-get install ${missing[*]} failed"
}

command -v curl >/dev/null || ensure_apt curl ca-certificates

resolve_sluice_bin() {
    [ -n "${SLUICE_BIN:-}" ] || SLUICE_BIN="$ROOT/target/debug/sluice"
    SLUICE_BIN="$(cd "$(dirname "$SLUICE_BIN")" && pwd)/$(basename "$SLUICE_BIN")"
    [ -x "$SLUICE_BIN" ] || die "no sluice binary at $SLUICE_BIN (build it, or pass --sluice BIN)"
}

variant_settings() { # NAME
    case "$1" in
        session-primary) echo "session primary" ;;
        transaction-primary) echo "transaction primary" ;;
        transaction-ryw) echo "transaction read-your-writes" ;;
        transaction-eventual) echo "transaction eventual" ;;
        *) return 1 ;;
    esac
}

select_variants() { # LIST
    local requested v
    SELECTED=()
    IFS=',' read -r -a requested <<<"$1"
    for v in "${requested[@]}"; do
        [ "$v" = direct ] && continue
        variant_settings "$v" >/dev/null \
            || die "unknown variant '$v' (session-primary, transaction-primary, transaction-ryw, transaction-eventual)"
        SELECTED+=("$v")
    done
}

pypi_sdist() { # NAME VERSION DIR
    local name="$1" version="$2" dir="$3" tmp
    tmp="$(mktemp -d)"
    if ! timeout 300 python3 - "$name" "$version" "$tmp/sdist.tar.gz" <<'PY'; then
import hashlib, json, os, ssl, sys, urllib.request
name, version, dest = sys.argv[1:]
# The CA bundle pip is told to use (PIP_CERT), if any, so both reach PyPI the same way.
cafile = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE") or None
context = ssl.create_default_context(cafile=cafile)
want = f"{name}-{version}.tar.gz"
req = urllib.request.Request(f"https://pypi.org/simple/{name}/",
                             headers={"Accept": "application/vnd.pypi.simple.v1+json"})
with urllib.request.urlopen(req, timeout=60, context=context) as r:
    files = [f for f in json.load(r)["files"] if f["filename"].lower() == want.lower()]
if not files:
    sys.exit(f"PyPI lists no {want}")
with urllib.request.urlopen(files[0]["url"], timeout=120, context=context) as r:
    data = r.read()
if hashlib.sha256(data).hexdigest() != files[0]["hashes"]["sha256"]:
    sys.exit(f"{files[0]['url']}: sha256 mismatch")
open(dest, "wb").write(data)
PY
        # The slow way: pip builds the sdist's metadata (and its build requirements) first.
        log "fetching $name $version from PyPI's index failed; trying pip download"
        timeout 600 python3 -m pip download -q --disable-pip-version-check --no-deps \
            --no-binary :all: -d "$tmp" "$name==$version" \
            && mv "$tmp/$name-$version.tar.gz" "$tmp/sdist.tar.gz" \
            || { rm -rf "$tmp"; return 1; }
    fi
    mkdir -p "$dir"
    tar -xzf "$tmp/sdist.tar.gz" -C "$dir" || { rm -rf "$tmp"; return 1; }
    rm -rf "$tmp"
}
ensure_venv() { # VENV CHECK PIP_ARG...
    local venv="$1" check="$2"
    shift 2
    "$venv/bin/python" -c "$check" >/dev/null 2>&1 && return 0
    python3 -c "import ensurepip" >/dev/null 2>&1 || ensure_apt python3-venv
    log "creating $venv with $*"
    rm -rf "$venv"
    timeout 120 python3 -m venv "$venv" || die "python3 -m venv failed (install python3-venv)"
    timeout 300 "$venv/bin/pip" install -q --disable-pip-version-check "$@" \
        || die "pip install $* failed"
}

cached_sdist_parts() { # NAME VERSION DEST PART...
    local name="$1" version="$2" dest="$3" tmp part
    shift 3
    [ -f "$dest/.complete" ] && return 0
    log "downloading the $name $version sdist (for its $*)"
    tmp="$(mktemp -d)"
    pypi_sdist "$name" "$version" "$tmp" \
        || die "could not download the $name $version sdist from PyPI"
    rm -rf "$dest"; mkdir -p "$dest"
    for part in "$@"; do
        cp -r "$tmp/$name-$version/$part" "$dest/" || die "the $name sdist has no $part"
    done
    touch "$dest/.complete"
    rm -rf "$tmp"
}

python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || ensure_apt python3 python3-venv

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
PG_VERSION="$("$PGBIN/postgres" --version | awk '{print $3}')"
if [ "$(id -u)" -eq 0 ]; then
    id postgres >/dev/null 2>&1 || die "running as root needs an OS user 'postgres'"
    as_pg() { runuser -u postgres -- env LC_ALL=C "$@"; }
else
    as_pg() { env LC_ALL=C "$@"; }
fi

# --- scratch dir and cleanup -------------------------------------------------------------------------
WORK="$(mktemp -d "/tmp/sluice-$CONF_NAME-pg-XXXXXX")"
chmod 755 "$WORK"
if [ "$(id -u)" -eq 0 ]; then chown postgres: "$WORK"; fi
SLUICE_PID=""
HOLD_PID=""
NODES=()
sluice_stop() {
    if [ -n "$SLUICE_PID" ] && kill -0 "$SLUICE_PID" 2>/dev/null; then
        kill -TERM "$SLUICE_PID" 2>/dev/null
        for _ in $(seq 1 30); do kill -0 "$SLUICE_PID" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$SLUICE_PID" 2>/dev/null
        wait "$SLUICE_PID" 2>/dev/null
    fi
    SLUICE_PID=""
    return 0
}
cleanup() {
    local rc=$?
    set +e
    if declare -F conformance_cleanup_hook >/dev/null; then conformance_cleanup_hook; fi
    [ -n "$HOLD_PID" ] && kill "$HOLD_PID" 2>/dev/null
    sluice_stop
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
    timeout 60 "$PGBIN/psql" -X -q -At -v ON_ERROR_STOP=1 -h "$WORK" -p "$port" -U postgres \
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
# pg_init_primary PORT: initdb (C locale, UTF8) and start node0. pg_hba: trust on the unix
# socket and for replication on 127.0.0.1, scram-sha-256 for users on 127.0.0.1 except
# `postgres`, which is trusted there too unless PG_SCRAM_POSTGRES=1 (then give it a password).
# Extra postgresql.conf lines come on stdin (may be empty). PRIMARY_PORT is set.
pg_init_primary() {
    PRIMARY_PORT="$1"
    local extra trust_postgres="host all postgres 127.0.0.1/32 trust"
    extra="$(cat)"
    if [ "${PG_SCRAM_POSTGRES:-0}" = 1 ]; then trust_postgres=""; fi
    as_pg timeout 120 "$PGBIN/initdb" -D "$WORK/node0" -U postgres -N -E UTF8 --locale=C \
        --auth=trust >"$OUT/initdb.log" 2>&1 || { cat "$OUT/initdb.log" >&2; die "initdb failed"; }
    as_pg tee "$WORK/node0/pg_hba.conf" >/dev/null <<EOF
local all all trust
$trust_postgres
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
log_line_prefix = '%m [%p] %q%u@%d '
$extra
EOF
    start_node node0 "$PRIMARY_PORT"
}

# pg_start_replica PORT: a streaming replica of node0 (node1); waits until it streams.
pg_start_replica() {
    REPLICA_PORT="$1"
    as_pg timeout 120 "$PGBIN/pg_basebackup" -h 127.0.0.1 -p "$PRIMARY_PORT" -U postgres \
        -D "$WORK/node1" -R -X stream -c fast >"$OUT/basebackup.log" 2>&1 \
        || { cat "$OUT/basebackup.log" >&2; die "pg_basebackup failed"; }
    start_node node1 "$REPLICA_PORT"
    local i n
    for i in $(seq 1 300); do
        n="$(psql_su "$PRIMARY_PORT" postgres \
            "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'")"
        [ "$n" -ge 1 ] && break
        [ "$i" -eq 300 ] && { tail -30 "$WORK/node1.log" >&2; die "replica not streaming after 30 s"; }
        sleep 0.1
    done
    return 0
}

# pg_wait_replica_caught_up [SECONDS]: replay position of node1 >= insert position of node0.
pg_wait_replica_caught_up() {
    local limit="${1:-60}" lsn i
    lsn="$(psql_su "$PRIMARY_PORT" postgres "SELECT pg_current_wal_insert_lsn()")"
    for i in $(seq 1 "$((limit * 10))"); do
        [ "$(psql_su "$REPLICA_PORT" postgres \
            "SELECT pg_last_wal_replay_lsn() >= '$lsn'::pg_lsn")" = t ] && return 0
        sleep 0.1
    done
    die "the replica did not replay up to $lsn within $limit s"
}

# --- sluice ----------------------------------------------------------------------------------------
# sluice_cluster_table NAME PORT POOL_MODE CONSISTENCY POOL_SIZE USER PASSWORD [USER PASSWORD...]
sluice_cluster_table() {
    local name="$1" port="$2" mode="$3" consistency="$4" size="$5"
    shift 5
    cat <<EOF

[[clusters]]
name = "$name"
protocol = "postgres"
listen = "127.0.0.1:$port"
pool_mode = "$mode"
consistency = "$consistency"
pool_size = $size
${SLUICE_CLUSTER_EXTRA:-}
[clusters.discovery]
static = ["127.0.0.1:$PRIMARY_PORT", "127.0.0.1:$REPLICA_PORT"]
EOF
    while [ $# -ge 2 ]; do
        printf '\n[[clusters.users]]\nname = "%s"\npassword = "%s"\n' "$1" "$2"
        shift 2
    done
}

# sluice_start_variants POOL_SIZE USER PASSWORD: $OUT/sluice.toml with the admin endpoint on
# ADMIN_PORT and one cluster per variant of SELECTED (SLUICE_CLUSTER_EXTRA applies to each),
# its port in PORT_OF[variant]; then sluice started (when there is a variant) and logged.
declare -A PORT_OF
sluice_start_variants() {
    local size="$1" user="$2" password="$3" v mode consistency
    PORT_OF[direct]="$PRIMARY_PORT"
    {
        printf '[admin]\nlisten = "127.0.0.1:%s"\n' "$ADMIN_PORT"
        for v in "${SELECTED[@]}"; do
            PORT_OF[$v]="$(free_port)"
            read -r mode consistency <<<"$(variant_settings "$v")"
            sluice_cluster_table "$v" "${PORT_OF[$v]}" "$mode" "$consistency" "$size" "$user" "$password"
        done
    } >"$OUT/sluice.toml"
    [ "${#SELECTED[@]}" -gt 0 ] || return 0
    sluice_start "$SLUICE_BIN" "$OUT/sluice.toml" "$ADMIN_PORT" "$OUT/sluice.log"
    log "sluice $("$SLUICE_BIN" --version 2>/dev/null | awk '{print $NF}') (admin $ADMIN_PORT): $(for v in "${SELECTED[@]}"; do printf '%s=%s ' "$v" "${PORT_OF[$v]}"; done)"
}

# compare_variants LABEL KNOWN_FILE: each variant's run ($OUT/<variant>) against $OUT/direct,
# with the accepted failures of KNOWN_FILE; `status=1` when one has an unexpected failure.
compare_variants() {
    local label="$1" known="$2" v
    for v in "${SELECTED[@]}"; do
        echo
        echo "$label, PostgreSQL $PG_VERSION, sluice $v"
        if ! "$PY" "$HERE/psycopg2_suite.py" compare "$OUT/direct" "$OUT/$v" --variant "$v" \
                --known "$known" | tee "$OUT/comparison-$v.txt"; then
            status=1
        fi
    done
}

# sluice_start BIN CONFIG ADMIN_PORT [LOG]: waits (30 s) until every cluster of CONFIG has a
# primary and a replica in /topology (saved next to the log as topology.json).
sluice_start() {
    local bin="$1" config="$2" admin="$3" logf="${4:-$OUT/sluice.log}" clusters i topo
    clusters="$(grep -c '^\[\[clusters\]\]' "$config")"
    RUST_LOG="${RUST_LOG:-sluice=info}" "$bin" --config "$config" >>"$logf" 2>&1 &
    SLUICE_PID=$!
    for i in $(seq 1 150); do
        topo="$(curl -s --max-time 2 "http://127.0.0.1:$admin/topology" || true)"
        if [ "$(grep -o '"replica"' <<<"$topo" | wc -l)" -ge "$clusters" ] \
            && [ "$(grep -o '"primary"' <<<"$topo" | wc -l)" -ge "$clusters" ]; then
            break
        fi
        kill -0 "$SLUICE_PID" 2>/dev/null || { tail -30 "$logf" >&2; die "sluice exited"; }
        [ "$i" -eq 150 ] && { echo "$topo" >&2; die "sluice did not see a primary and a replica in 30 s"; }
        sleep 0.2
    done
    echo "$topo" >"$(dirname "$logf")/topology.json"
}

hold_for() { # seconds
    sleep "$1" & HOLD_PID=$!
    wait "$HOLD_PID" || true
    HOLD_PID=""
}
