#!/usr/bin/env python3
"""End-to-end PostgreSQL benchmarks: direct vs PgBouncer vs sluice, on one machine, interleaved.

    python3 benches/pg-e2e.py                 # default subset (~15 min on 2 cores)
    python3 benches/pg-e2e.py --full          # every combination (much longer)
    python3 benches/pg-e2e.py memory          # RSS: 10,000 idle clients, and a client that never reads
    python3 benches/pg-e2e.py --help

Everything runs on 127.0.0.1 and every step has a timeout; everything started is stopped on exit.

pgbench (the default command)
  1. starts a PostgreSQL primary and one streaming replica in a temp dir (as the `postgres` OS
     user when run as root), creates role `bench` (SCRAM-SHA-256) and runs `pgbench -i -s SCALE`
     on the primary, then waits until the replica has replayed it;
  2. starts PgBouncer (Debian package; installed with apt-get if missing) in front of the primary:
     pool_mode = transaction, default_pool_size = POOL, auth_type = scram-sha-256 with the
     role's SCRAM verifier in userlist.txt (copied from pg_authid: no key derivation per login,
     as sluice; --pgbouncer-auth plain puts the password there instead), log_connections and
     log_disconnections off (sluice logs neither);
  3. starts three target/release/sluice processes (built with `cargo build --release` unless
     --no-build): "sluice" with consistency = "eventual" (select-only goes to the REPLICA),
     "sluice-primary" with consistency = "primary" (everything to the primary, like PgBouncer:
     the fair CPU comparison), and "sluice-primary-1t", the same with [runtime] threads = 1
     (one runtime thread, like PgBouncer's one process); all pool_mode = transaction,
     pool_size = POOL, SCRAM clients;
  4. runs pgbench against every target, interleaved (for each repetition, for each case: direct,
     pgbouncer, sluice, sluice-primary, sluice-primary-1t), each run bounded by -T DURATION
     (default 7 s), and records TPS, mean
     latency (pgbench), p50/p99 latency (from pgbench --log, sampled), the proxy process's CPU
     seconds (utime+stime from /proc/PID/stat before/after), pgbench's own CPU and the machine's
     busy fraction;
     The proxies are restarted before every repetition (a process instance can be a few per
     cent faster or slower than another of the same binary);
  5. prints medians per case and the ratios, writes runs.csv, summary.csv, results.json and
     tps-vs-clients.png (matplotlib; skipped with a note if it cannot be imported) to --out.

  --baseline PATH adds a "base-" target for every sluice target, run by the binary at PATH (for
  example one built from main before a change) and interleaved with the others; the ratio
  table then also compares each sluice target with its base- twin. Only the proxies of the
  selected --targets are started.

memory
  starts the same servers (no pgbench data), then for sluice and PgBouncer: opens N (10,000)
  authenticated clients (SCRAM; a small asyncio client in this file), holds them idle for a few
  seconds and reports RSS before/after and per connection (and the anonymous part of RSS, the
  process's own memory without the shared pages of its binary and libraries; with --baseline,
  the baseline binary's idle clients too, interleaved). Before that (on the fresh processes),
  one client sends a query with a ~2 GB result of 1 kB rows and does not read for a few seconds,
  and the proxy's RSS is sampled over time (it must stay bounded); then the same with a single
  64 MiB row, read afterwards (--slow-seconds 0 skips these). Writes memory.json to --out.
"""

import argparse
import asyncio
import base64
import csv
import datetime
import hashlib
import hmac
import json
import os
import platform
import pwd
import re
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
PASSWORD = "bench-secret"
USER = "bench"
DB = "bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def log(msg):
    print(f"[pg-e2e {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def die(msg):
    log("error: " + msg)
    sys.exit(1)


# --- processes -------------------------------------------------------------------------------------


def pg_bindir():
    if os.environ.get("SLUICE_PG_BINDIR"):
        return os.environ["SLUICE_PG_BINDIR"]
    best = None
    for v in os.listdir("/usr/lib/postgresql") if os.path.isdir("/usr/lib/postgresql") else []:
        if v.isdigit() and os.path.exists(f"/usr/lib/postgresql/{v}/bin/initdb"):
            if best is None or int(v) > int(best):
                best = v
    if best:
        return f"/usr/lib/postgresql/{best}/bin"
    try:
        d = subprocess.check_output(["pg_config", "--bindir"], text=True).strip()
        if os.path.exists(os.path.join(d, "initdb")):
            return d
    except (OSError, subprocess.CalledProcessError):
        pass
    die("no PostgreSQL server binaries (apt-get install postgresql)")


IS_ROOT = os.geteuid() == 0


def as_pg(args):
    """A command line run as the postgres OS user when we are root (initdb refuses root)."""
    if IS_ROOT:
        return ["runuser", "-u", "postgres", "--", "env", "LC_ALL=C"] + args
    return ["env", "LC_ALL=C"] + args


def run(cmd, timeout=120, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if r.returncode != 0:
        die(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r.stdout


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def raise_nofile(n=65536):
    """Raises the open-file limit to n, or as far as the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(n, soft)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
    except (ValueError, OSError):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def cpu_seconds(pid):
    """utime + stime of one process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    # rest[0] is field 3 (state); utime is field 14, stime field 15.
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def rss_kib(pid, field="VmRSS"):
    """Resident memory in KiB: all of it (`VmRSS`), or its private, anonymous part (`RssAnon`:
    heap, stacks; without the shared pages of the binary and its libraries)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def machine_cpu():
    """(busy, total) jiffies of the whole machine."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v) - idle, sum(v)


class Env:
    """The servers and proxies of one benchmark run; `close()` stops everything."""

    def __init__(self, args):
        self.args = args
        self.pgbin = pg_bindir()
        self.work = tempfile.mkdtemp(prefix="sluice-bench-")
        os.chmod(self.work, 0o755)
        if IS_ROOT:
            pw = pwd.getpwnam("postgres")
            os.chown(self.work, pw.pw_uid, pw.pw_gid)
        self.nodes = []
        self.procs = {}  # name -> Popen
        self.ports = {}

    # PostgreSQL ------------------------------------------------------------------------------
    def psql(self, port, sql, db="postgres", user="postgres"):
        return run(
            [f"{self.pgbin}/psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
             "-p", str(port), "-U", user, "-d", db, "-c", sql],
            timeout=120,
        ).strip()

    def start_node(self, name, port):
        with open(f"{self.work}/{name}/postgresql.conf", "a") as f:
            f.write(f"port = {port}\n")
        self.nodes.append(name)
        run(as_pg([f"{self.pgbin}/pg_ctl", "-w", "-t", "60", "-D", f"{self.work}/{name}",
                   "-l", f"{self.work}/{name}.log", "start"]), timeout=90)

    def start_postgres(self, scale):
        a = self.args
        self.ports["primary"] = free_port()
        self.ports["replica"] = free_port()
        ver = re.search(r"\(PostgreSQL\) (\S+)", run([f"{self.pgbin}/postgres", "--version"])).group(1)
        self.pg_version = ver
        log(f"PostgreSQL {ver}: primary 127.0.0.1:{self.ports['primary']}, "
            f"replica 127.0.0.1:{self.ports['replica']}")
        run(as_pg([f"{self.pgbin}/initdb", "-D", f"{self.work}/node0", "-U", "postgres", "-N",
                   "-E", "UTF8", "--locale=C", "--auth=trust"]), timeout=120)
        with open(f"{self.work}/node0/pg_hba.conf", "w") as f:
            f.write("local all all trust\n"
                    "host all postgres 127.0.0.1/32 trust\n"
                    "host replication all 127.0.0.1/32 trust\n"
                    "host all all 127.0.0.1/32 scram-sha-256\n")
        with open(f"{self.work}/node0/postgresql.conf", "a") as f:
            f.write(f"""
# sluice benchmark
listen_addresses = '127.0.0.1'
unix_socket_directories = '{self.work}'
wal_level = replica
max_wal_senders = 10
hot_standby = on
fsync = off
synchronous_commit = off
full_page_writes = off
shared_buffers = 256MB
max_connections = {a.max_connections}
log_line_prefix = '%m [%p] %q%u@%d '
""")
        self.start_node("node0", self.ports["primary"])
        self.psql(self.ports["primary"],
                  f"SET password_encryption = 'scram-sha-256'; "
                  f"CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'")
        self.psql(self.ports["primary"], f"CREATE DATABASE {DB} OWNER {USER}")
        if scale:
            log(f"pgbench -i -s {scale}")
            env = dict(os.environ, PGPASSWORD=PASSWORD)
            run([f"{self.pgbin}/pgbench", "-i", "-q", "-s", str(scale), "-h", "127.0.0.1", "-p",
                 str(self.ports["primary"]), "-U", USER, DB], timeout=900, env=env)
        run(as_pg([f"{self.pgbin}/pg_basebackup", "-h", "127.0.0.1", "-p",
                   str(self.ports["primary"]), "-U", "postgres", "-D", f"{self.work}/node1", "-R",
                   "-X", "stream", "-c", "fast"]), timeout=600)
        self.start_node("node1", self.ports["replica"])
        deadline = time.time() + 120
        while True:
            lsn = self.psql(self.ports["primary"], "SELECT pg_current_wal_lsn()")
            caught = self.psql(
                self.ports["replica"],
                f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn")
            if caught == "t":
                break
            if time.time() > deadline:
                die("the replica did not catch up within 120 s")
            time.sleep(0.2)
        if scale:
            # Warm both servers' caches the same way.
            for p in (self.ports["primary"], self.ports["replica"]):
                self.psql(p, "SELECT count(*) FROM pgbench_accounts", db=DB)

    # PgBouncer -------------------------------------------------------------------------------
    def start_pgbouncer(self, pool_size):
        exe = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        if not os.path.exists(exe):
            log("installing pgbouncer (apt-get install -y pgbouncer)")
            subprocess.run(["apt-get", "install", "-y", "pgbouncer"], capture_output=True,
                           timeout=600)
            exe = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
            if not os.path.exists(exe):
                die("pgbouncer is not installed and apt-get could not install it")
        self.pgbouncer_version = subprocess.run(
            [exe, "--version"], capture_output=True, text=True).stdout.split("\n")[0].split()[-1]
        port = self.ports["pgbouncer"] = free_port()
        d = f"{self.work}/pgbouncer"
        os.makedirs(d, exist_ok=True)
        # The role's SCRAM verifier, as PostgreSQL stores it: PgBouncer then checks clients
        # without deriving a key per login (as sluice, which derives its secret once at start),
        # and logs in to the server with the client's proof (SCRAM pass-through). A plaintext
        # password here costs PgBouncer a 4096-round PBKDF2 per client login.
        secret = PASSWORD
        if self.args.pgbouncer_auth == "verifier":
            secret = self.psql(self.ports["primary"],
                               f"SELECT rolpassword FROM pg_authid WHERE rolname = '{USER}'")
        with open(f"{d}/userlist.txt", "w") as f:
            f.write(f'"{USER}" "{secret}"\n')
        with open(f"{d}/pgbouncer.ini", "w") as f:
            f.write(f"""[databases]
{DB} = host=127.0.0.1 port={self.ports['primary']} dbname={DB}
postgres = host=127.0.0.1 port={self.ports['primary']} dbname=postgres

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {d}/userlist.txt
pool_mode = transaction
default_pool_size = {pool_size}
max_client_conn = 12000
max_db_connections = 0
logfile = {d}/pgbouncer.log
pidfile = {d}/pgbouncer.pid
log_connections = 0
log_disconnections = 0
ignore_startup_parameters = extra_float_digits
""")
        if IS_ROOT:
            pw = pwd.getpwnam("postgres")
            for p in (d, f"{d}/userlist.txt", f"{d}/pgbouncer.ini"):
                os.chown(p, pw.pw_uid, pw.pw_gid)
            os.chmod(f"{d}/userlist.txt", 0o600)
        kw = {"user": "postgres", "group": "postgres", "extra_groups": []} if IS_ROOT else {}
        proc = subprocess.Popen([exe, f"{d}/pgbouncer.ini"], stdout=subprocess.DEVNULL,
                                stderr=open(f"{d}/stderr.log", "w"), preexec_fn=raise_nofile,
                                **kw)
        self.procs["pgbouncer"] = proc
        self.wait_port(port, proc, f"{d}/pgbouncer.log")
        log(f"PgBouncer {self.pgbouncer_version} on 127.0.0.1:{port} (pid {proc.pid})")

    # sluice ----------------------------------------------------------------------------------
    def start_sluice(self, name, consistency, pool_size, threads=None, binary=None):
        port = self.ports[name] = free_port()
        admin = self.ports[name + "-admin"] = free_port()
        cfg = f"{self.work}/{name}.toml"
        runtime = f"[runtime]\nthreads = {threads}\n\n" if threads else ""
        with open(cfg, "w") as f:
            f.write(f"""{runtime}[admin]
listen = "127.0.0.1:{admin}"

[[clusters]]
name = "bench"
protocol = "postgres"
listen = "127.0.0.1:{port}"
pool_mode = "transaction"
consistency = "{consistency}"
pool_size = {pool_size}
max_client_connections = 12000
backend_tls = "disable"

[clusters.discovery]
static = ["127.0.0.1:{self.ports['primary']}", "127.0.0.1:{self.ports['replica']}"]

[[clusters.users]]
name = "{USER}"
password = "{PASSWORD}"
""")
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "info")
        proc = subprocess.Popen([binary or self.args.sluice, "--config", cfg],
                                stdout=subprocess.DEVNULL,
                                stderr=open(f"{self.work}/{name}.log", "w"),
                                preexec_fn=raise_nofile, env=env)
        self.procs[name] = proc
        self.wait_port(port, proc, f"{self.work}/{name}.log")
        # Wait until it has probed both nodes (a primary and a replica).
        deadline = time.time() + 30
        while True:
            try:
                topo = http_get("127.0.0.1", admin, "/topology")
                if '"primary"' in topo and '"replica"' in topo:
                    break
            except OSError:
                pass
            if time.time() > deadline or proc.poll() is not None:
                die(f"{name} did not see a primary and a replica in 30 s")
            time.sleep(0.2)
        log(f"{name} (consistency = {consistency}, "
            f"{f'{threads} worker thread' if threads else 'one worker thread per core'}) "
            f"on 127.0.0.1:{port} (pid {proc.pid}, {binary or self.args.sluice})")

    def wait_port(self, port, proc, logfile):
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                try:
                    sys.stderr.write(open(logfile).read()[-3000:])
                except OSError:
                    pass
                die(f"process on port {port} did not come up")
            time.sleep(0.1)

    def restart(self, name):
        """Stops a proxy and starts a fresh one (same settings, new ports): memory figures are
        taken on a process whose heap has not already grown."""
        p = self.procs.pop(name)
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=5)
        self.start_proxy(name)

    def start_proxy(self, name):
        """Starts PgBouncer or one of the SLUICES with its settings."""
        if name == "pgbouncer":
            self.start_pgbouncer(self.args.pool_size)
        else:
            consistency, threads, base = SLUICE_SETTINGS[name]
            self.start_sluice(name, consistency, self.args.pool_size, threads,
                              self.args.baseline if base else None)

    def close(self):
        for name, p in self.procs.items():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for name, p in self.procs.items():
            try:
                p.wait(timeout=12)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        for node in self.nodes:
            subprocess.run(as_pg([f"{self.pgbin}/pg_ctl", "stop", "-w", "-t", "20", "-m",
                                  "immediate", "-D", f"{self.work}/{node}"]),
                           capture_output=True, timeout=30)
        if self.args.keep:
            log(f"kept {self.work}")
        else:
            shutil.rmtree(self.work, ignore_errors=True)


def http_get(host, port, path):
    with socket.create_connection((host, port), timeout=2) as s:
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        while True:
            b = s.recv(65536)
            if not b:
                break
            data += b
    return data.decode(errors="replace")


# --- pgbench -------------------------------------------------------------------------------------

TARGETS = ["direct", "pgbouncer", "sluice", "sluice-primary", "sluice-primary-1t"]
# Each sluice target's (consistency, runtime threads (None = one per core), run by the
# --baseline binary).
SLUICE_SETTINGS = {
    "sluice": ("eventual", None, False),
    "sluice-primary": ("primary", None, False),
    "sluice-primary-1t": ("primary", 1, False),
}
SLUICES = list(SLUICE_SETTINGS)
BASE = "base-"


def add_baseline_targets():
    """--baseline: a base- twin of every sluice target, run by the baseline binary."""
    for name in list(SLUICES):
        consistency, threads, _ = SLUICE_SETTINGS[name]
        SLUICE_SETTINGS[BASE + name] = (consistency, threads, True)
        SLUICES.append(BASE + name)
        TARGETS.append(BASE + name)


class Case:
    def __init__(self, workload, mode, clients, churn=False):
        self.workload, self.mode, self.clients, self.churn = workload, mode, clients, churn

    @property
    def key(self):
        return f"{self.workload}/{self.mode}/c{self.clients}" + ("/C" if self.churn else "")

    def targets(self):
        t = list(TARGETS)
        if self.workload == "tpcb":
            # Every TPC-B transaction writes: both sluice configurations route it the same way.
            t = [x for x in t if x not in ("sluice-primary", BASE + "sluice-primary")]
        if self.mode == "prepared":
            # PgBouncer 1.18 cannot pool named prepared statements in transaction mode (1.21+).
            t.remove("pgbouncer")
        return t


def default_cases():
    return [
        Case("select", "simple", 1),
        Case("select", "simple", 16),
        Case("select", "simple", 256),
        Case("select", "extended", 16),
        Case("select", "extended", 256),
        Case("select", "prepared", 16),
        Case("tpcb", "simple", 16),
        Case("select", "simple", 16, churn=True),
    ]


def full_cases():
    out = []
    for w in ("select", "tpcb"):
        for m in ("simple", "extended", "prepared"):
            for c in (1, 16, 256):
                out.append(Case(w, m, c))
    for w in ("select", "tpcb"):
        for m in ("simple", "extended"):
            out.append(Case(w, m, 16, churn=True))
    return out


def parse_pgbench(out):
    r = {}
    m = re.search(r"number of transactions actually processed: (\d+)", out)
    r["transactions"] = int(m.group(1)) if m else 0
    m = re.search(r"number of failed transactions: (\d+)", out)
    r["failed"] = int(m.group(1)) if m else 0
    m = re.search(r"latency average = ([\d.]+) ms", out)
    r["lat_mean_ms"] = float(m.group(1)) if m else None
    m = re.search(r"tps = ([\d.]+)", out)
    r["tps"] = float(m.group(1)) if m else None
    m = re.search(r"initial connection time = ([\d.]+) ms", out)
    r["conn_ms"] = float(m.group(1)) if m else None
    r["aborted"] = "aborted" in out or "Run was aborted" in out
    return r


def log_percentiles(prefix_dir):
    lat = []
    for name in os.listdir(prefix_dir):
        if not name.startswith("tx"):
            continue
        with open(os.path.join(prefix_dir, name)) as f:
            for line in f:
                p = line.split()
                if len(p) >= 3 and p[2].isdigit():
                    lat.append(int(p[2]))
    if not lat:
        return None, None, None, 0
    lat.sort()

    def q(x):
        return lat[min(len(lat) - 1, int(x * len(lat)))] / 1000.0

    return q(0.50), q(0.99), sum(lat) / len(lat) / 1000.0, len(lat)


def run_pgbench(env, case, target, rep, args):
    port = env.ports["primary" if target == "direct" else target]
    d = tempfile.mkdtemp(prefix="log-", dir=env.work)
    jobs = min(args.jobs, case.clients)
    # Sample enough transactions for a p99 without writing a line per transaction.
    rate = 1.0 if case.clients == 1 or case.churn else args.sampling_rate
    cmd = [f"{env.pgbin}/pgbench", "-n", "-h", "127.0.0.1", "-p", str(port), "-U", USER,
           "-c", str(case.clients), "-j", str(jobs), "-T", str(args.duration),
           "-M", case.mode, "--log", f"--log-prefix={d}/tx", f"--sampling-rate={rate}"]
    if case.workload == "select":
        cmd.append("-S")
    if case.churn:
        cmd.append("-C")
    cmd.append(DB)
    proxy = env.procs.get(target)
    cpu0 = cpu_seconds(proxy.pid) if proxy else None
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    m0 = machine_cpu()
    t0 = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.duration + 90,
                           cwd=d, env=dict(os.environ, PGPASSWORD=PASSWORD))
        out, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = str(e.stdout or "") + str(e.stderr or "") + "\ntimed out", -1
    wall = time.time() - t0
    m1 = machine_cpu()
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu1 = cpu_seconds(proxy.pid) if proxy else None
    r = parse_pgbench(out)
    p50, p99, logmean, samples = log_percentiles(d)
    shutil.rmtree(d, ignore_errors=True)
    r.update({
        "case": case.key, "workload": case.workload, "mode": case.mode,
        "clients": case.clients, "churn": case.churn, "target": target, "rep": rep,
        "rc": rc, "wall_s": round(wall, 2),
        "lat_p50_ms": p50, "lat_p99_ms": p99, "lat_log_mean_ms": logmean,
        "log_samples": samples,
        "proxy_cpu_s": round(cpu1 - cpu0, 3) if proxy else None,
        "pgbench_cpu_s": round((ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime), 3),
        "machine_busy": round((m1[0] - m0[0]) / max(1, m1[1] - m0[1]), 3),
    })
    if r["transactions"] and proxy:
        r["proxy_cpu_us_per_tx"] = round(r["proxy_cpu_s"] / r["transactions"] * 1e6, 2)
    else:
        r["proxy_cpu_us_per_tx"] = None
    if rc != 0 or r["tps"] is None or r["aborted"]:
        r["error"] = out.strip().splitlines()[-3:] if out.strip() else ["no output"]
    return r


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(runs):
    rows = []
    by = {}
    for r in runs:
        by.setdefault((r["case"], r["target"]), []).append(r)
    cases = []
    for r in runs:
        if r["case"] not in cases:
            cases.append(r["case"])
    for c in cases:
        for t in TARGETS:
            rs = [r for r in by.get((c, t), []) if "error" not in r]
            errs = len(by.get((c, t), [])) - len(rs)
            if not by.get((c, t)):
                continue
            rows.append({
                "case": c, "target": t, "runs": len(rs), "errors": errs,
                "tps": median([r["tps"] for r in rs]),
                "lat_mean_ms": median([r["lat_mean_ms"] for r in rs]),
                "lat_p50_ms": median([r["lat_p50_ms"] for r in rs]),
                "lat_p99_ms": median([r["lat_p99_ms"] for r in rs]),
                "proxy_cpu_s": median([r["proxy_cpu_s"] for r in rs]),
                "proxy_cpu_us_per_tx": median([r["proxy_cpu_us_per_tx"] for r in rs]),
                "machine_busy": median([r["machine_busy"] for r in rs]),
                "clients": by[(c, t)][0]["clients"],
                "workload": by[(c, t)][0]["workload"],
                "mode": by[(c, t)][0]["mode"],
                "churn": by[(c, t)][0]["churn"],
            })
    return rows


def ratios(rows):
    """Per case: sluice / PgBouncer TPS and CPU per transaction; added latency at 1 client."""
    out = []
    get = {(r["case"], r["target"]): r for r in rows}
    cases = []
    for r in rows:
        if r["case"] not in cases:
            cases.append(r["case"])
    for c in cases:
        b = get.get((c, "pgbouncer"))
        d = get.get((c, "direct"))
        for s in SLUICES:
            x = get.get((c, s))
            if not x:
                continue
            e = {"case": c, "sluice": s}
            if b and b["tps"] and x["tps"]:
                e["tps_ratio"] = x["tps"] / b["tps"]
            if b and b["proxy_cpu_us_per_tx"] and x["proxy_cpu_us_per_tx"]:
                e["cpu_per_tx_ratio"] = x["proxy_cpu_us_per_tx"] / b["proxy_cpu_us_per_tx"]
            base = get.get((c, BASE + s))
            if base and base["tps"] and x["tps"]:
                e["tps_vs_base"] = x["tps"] / base["tps"]
            if base and base["proxy_cpu_us_per_tx"] and x["proxy_cpu_us_per_tx"]:
                e["cpu_vs_base"] = x["proxy_cpu_us_per_tx"] / base["proxy_cpu_us_per_tx"]
            if x["clients"] == 1 and d and d["lat_p50_ms"] is not None:
                e["added_p50_us"] = (x["lat_p50_ms"] - d["lat_p50_ms"]) * 1000
                if b and b["lat_p50_ms"] is not None:
                    e["pgbouncer_added_p50_us"] = (b["lat_p50_ms"] - d["lat_p50_ms"]) * 1000
            out.append(e)
    return out


def fmt(x, nd=1):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.{nd}f}"
    return str(x)


def print_table(rows, rats, file=sys.stdout):
    hdr = ["case", "target", "TPS", "mean ms", "p50 ms", "p99 ms", "proxy CPU s", "CPU µs/tx",
           "busy", "runs"]
    lines = [hdr]
    for r in rows:
        lines.append([r["case"], r["target"], fmt(r["tps"], 0), fmt(r["lat_mean_ms"], 3),
                      fmt(r["lat_p50_ms"], 3), fmt(r["lat_p99_ms"], 3), fmt(r["proxy_cpu_s"], 2),
                      fmt(r["proxy_cpu_us_per_tx"], 1), fmt(r["machine_busy"], 2),
                      f"{r['runs']}" + (f" ({r['errors']} failed)" if r["errors"] else "")])
    w = [max(len(str(l[i])) for l in lines) for i in range(len(hdr))]
    print("| " + " | ".join(h.ljust(w[i]) for i, h in enumerate(hdr)) + " |", file=file)
    print("|" + "|".join("-" * (x + 2) for x in w) + "|", file=file)
    for l in lines[1:]:
        print("| " + " | ".join(str(v).ljust(w[i]) for i, v in enumerate(l)) + " |", file=file)
    print(file=file)
    hdr = ["case", "vs PgBouncer", "TPS ratio", "CPU/tx ratio", "added p50 µs (1 client)",
           "PgBouncer added p50 µs"]
    with_base = any("tps_vs_base" in e for e in rats)
    if with_base:
        hdr += ["TPS vs base-", "CPU/tx vs base-"]
    lines = [hdr]
    for e in rats:
        lines.append([e["case"], e["sluice"], fmt(e.get("tps_ratio"), 2),
                      fmt(e.get("cpu_per_tx_ratio"), 2), fmt(e.get("added_p50_us"), 0),
                      fmt(e.get("pgbouncer_added_p50_us"), 0)]
                     + ([fmt(e.get("tps_vs_base"), 2), fmt(e.get("cpu_vs_base"), 2)]
                        if with_base else []))
    w = [max(len(str(l[i])) for l in lines) for i in range(len(hdr))]
    print("| " + " | ".join(h.ljust(w[i]) for i, h in enumerate(hdr)) + " |", file=file)
    print("|" + "|".join("-" * (x + 2) for x in w) + "|", file=file)
    for l in lines[1:]:
        print("| " + " | ".join(str(v).ljust(w[i]) for i, v in enumerate(l)) + " |", file=file)


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not importable (pip install matplotlib): no plot")
        return False
    panels = []
    for w, m in (("select", "simple"), ("select", "extended"), ("select", "prepared"),
                 ("tpcb", "simple"), ("tpcb", "extended"), ("tpcb", "prepared")):
        pts = [r for r in rows if r["workload"] == w and r["mode"] == m and not r["churn"]]
        if len({r["clients"] for r in pts}) >= 2:  # a curve needs two client counts
            panels.append((w, m, pts))
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    style = {"direct": ("k", "o"), "pgbouncer": ("tab:blue", "s"), "sluice": ("tab:red", "^"),
             "sluice-primary": ("tab:orange", "v"), "sluice-primary-1t": ("tab:green", "D")}
    label = {"direct": "direct", "pgbouncer": "PgBouncer", "sluice": "sluice (reads→replica)",
             "sluice-primary": "sluice (consistency=primary)",
             "sluice-primary-1t": "sluice (primary, 1 worker thread)"}
    for ax, (w, m, pts) in zip(axes[0], panels):
        for t in TARGETS:
            p = sorted((r["clients"], r["tps"]) for r in pts if r["target"] == t and r["tps"])
            if p:
                c, s = style.get(t, ("tab:gray", "x"))
                ax.plot([x for x, _ in p], [y for _, y in p], color=c, marker=s,
                        label=label.get(t, t))
        ax.set_xscale("log")
        ax.set_xticks(sorted({r["clients"] for r in pts}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.minorticks_off()
        ax.set_xlabel("clients")
        ax.set_ylabel("TPS (median)")
        ax.set_title(f"{'select-only' if w == 'select' else 'TPC-B'}, -M {m}")
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def versions(env):
    v = {"postgresql": getattr(env, "pg_version", None),
         "pgbouncer": getattr(env, "pgbouncer_version", None)}
    try:
        v["sluice"] = subprocess.run([env.args.sluice, "--version"], capture_output=True,
                                     text=True).stdout.strip()
        if env.args.baseline:
            v["baseline"] = env.args.baseline
        v["sluice_commit"] = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                                            capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        if dirty:
            v["sluice_commit"] += " (+ uncommitted changes)"
    except OSError:
        pass
    v["pgbench"] = subprocess.run([f"{env.pgbin}/pgbench", "--version"], capture_output=True,
                                  text=True).stdout.strip()
    return v


def machine():
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"nproc": os.cpu_count(), "cpu": model, "kernel": platform.release(),
            "mem_gib": round(os.sysconf("SC_PHYS_PAGES") * PAGE / 2**30, 1)}


def cmd_pgbench(args):
    cases = full_cases() if args.full else default_cases()
    if args.cases:
        want = set(args.cases.split(","))
        cases = [c for c in cases if c.key in want]
    targets = set(args.targets.split(",")) if args.targets else set(TARGETS)
    os.makedirs(args.out, exist_ok=True)
    raise_nofile()
    proxies = [n for n in ["pgbouncer"] + SLUICES if n in targets]
    env = Env(args)
    runs = []
    try:
        env.start_postgres(args.scale)
        for name in proxies:
            env.start_proxy(name)
        total = sum(len([t for t in c.targets() if t in targets]) for c in cases) * args.reps
        log(f"{total} runs of {args.duration} s (+ connection setup) in {args.reps} interleaved "
            f"repetitions; uptime load: {open('/proc/loadavg').read().split()[:3]}")
        n = 0
        for rep in range(args.reps):
            if rep:
                # Fresh proxy processes for every repetition: one process instance can be a few
                # per cent faster or slower than another of the same binary (memory layout,
                # its backend connections), and that must not bias every run of a target.
                for name in proxies:
                    env.restart(name)
            for case in cases:
                for t in case.targets():
                    if t not in targets:
                        continue
                    n += 1
                    r = run_pgbench(env, case, t, rep, args)
                    runs.append(r)
                    log(f"[{n}/{total}] rep {rep} {case.key:24} {t:15} tps={fmt(r['tps'], 0):>8} "
                        f"p50={fmt(r['lat_p50_ms'], 3)} p99={fmt(r['lat_p99_ms'], 3)} ms "
                        f"cpu={fmt(r['proxy_cpu_us_per_tx'], 1)} µs/tx busy={r['machine_busy']}"
                        + (f" ERROR {r['error']}" if "error" in r else ""))
                    if args.pause:
                        time.sleep(args.pause)
        ver = versions(env)
    finally:
        env.close()
    rows = summarize(runs)
    rats = ratios(rows)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    result = {"date": stamp, "machine": machine(), "versions": ver,
              "settings": {"duration_s": args.duration, "reps": args.reps, "scale": args.scale,
                           "pool_size": args.pool_size, "jobs": args.jobs,
                           "sampling_rate": args.sampling_rate, "full": args.full},
              "runs": runs, "summary": rows, "ratios": rats}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    keys = ["case", "target", "rep", "tps", "lat_mean_ms", "lat_p50_ms", "lat_p99_ms",
            "transactions", "failed", "proxy_cpu_s", "proxy_cpu_us_per_tx", "pgbench_cpu_s",
            "machine_busy", "conn_ms", "wall_s", "rc", "error"]
    with open(os.path.join(args.out, "runs.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in runs:
            w.writerow(r)
    with open(os.path.join(args.out, "summary.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()) if rows else ["case"])
        w.writeheader()
        for r in rows:
            w.writerow(r)
    plotted = plot(rows, os.path.join(args.out, "tps-vs-clients.png"))
    m = result["machine"]
    print(f"\n{stamp}; {m['nproc']} × {m['cpu']}, Linux {m['kernel']}; "
          f"PostgreSQL {ver.get('postgresql')}, PgBouncer {ver.get('pgbouncer')}, "
          f"{ver.get('sluice')} @ {ver.get('sluice_commit')}")
    print(f"medians of {args.reps} interleaved runs of {args.duration} s, pool size "
          f"{args.pool_size}, pgbench -j {args.jobs}, scale {args.scale}; "
          f"'sluice' routes select-only to the replica, 'sluice-primary' and PgBouncer use the "
          f"primary only\n")
    print_table(rows, rats)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        print_table(rows, rats, file=f)
    print(f"\nresults: {args.out}/results.json, runs.csv, summary.csv, table.md"
          + (", tps-vs-clients.png" if plotted else ""))
    return 1 if any("error" in r for r in runs if r["target"] != "pgbouncer") else 0


# --- memory: many idle clients, and a client that never reads -------------------------------------


def startup_message(user, db):
    body = struct.pack("!i", 196608)
    for k, v in (("user", user), ("database", db), ("application_name", "pg-e2e-idle")):
        body += k.encode() + b"\0" + v.encode() + b"\0"
    body += b"\0"
    return struct.pack("!i", len(body) + 4) + body


class Scram:
    """Client side SCRAM-SHA-256; the salted password is cached per (salt, iterations), so
    10,000 logins cost one PBKDF2 (every login to sluice or PgBouncer uses the same secret)."""

    cache = {}

    def __init__(self, password):
        self.password = password.encode()
        self.nonce = base64.b64encode(os.urandom(18)).decode()
        self.first_bare = f"n=,r={self.nonce}"

    def first(self):
        return ("n,," + self.first_bare).encode()

    def final(self, server_first):
        attrs = dict(kv.split("=", 1) for kv in server_first.decode().split(","))
        salt, it, r = base64.b64decode(attrs["s"]), int(attrs["i"]), attrs["r"]
        key = (salt, it)
        if key not in Scram.cache:
            Scram.cache[key] = hashlib.pbkdf2_hmac("sha256", self.password, salt, it)
        salted = Scram.cache[key]
        client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
        stored = hashlib.sha256(client_key).digest()
        without_proof = f"c=biws,r={r}"
        auth = f"{self.first_bare},{server_first.decode()},{without_proof}".encode()
        sig = hmac.new(stored, auth, hashlib.sha256).digest()
        proof = bytes(a ^ b for a, b in zip(client_key, sig))
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()


async def read_msg(reader):
    hdr = await reader.readexactly(5)
    n = struct.unpack("!i", hdr[1:])[0]
    return hdr[:1], await reader.readexactly(n - 4)


async def pg_login(port, password=PASSWORD, user=USER, db=DB):
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 16)
    writer.write(startup_message(user, db))
    scram = Scram(password)
    while True:
        tag, body = await read_msg(reader)
        if tag == b"R":
            code = struct.unpack("!i", body[:4])[0]
            if code == 10:
                first = scram.first()
                mech = b"SCRAM-SHA-256\0"
                payload = mech + struct.pack("!i", len(first)) + first
                writer.write(b"p" + struct.pack("!i", len(payload) + 4) + payload)
            elif code == 11:
                fin = scram.final(body[4:])
                writer.write(b"p" + struct.pack("!i", len(fin) + 4) + fin)
            elif code in (0, 12):
                pass
            else:
                raise RuntimeError(f"unsupported auth {code}")
        elif tag == b"E":
            raise RuntimeError(f"login refused: {body!r}")
        elif tag == b"Z":
            return reader, writer


async def simple_query(reader, writer, sql):
    q = sql.encode() + b"\0"
    writer.write(b"Q" + struct.pack("!i", len(q) + 4) + q)
    while True:
        tag, _ = await read_msg(reader)
        if tag == b"Z":
            return


async def open_idle(port, n, concurrency, query=None):
    sem = asyncio.Semaphore(concurrency)
    conns, errors = [], []

    async def one():
        async with sem:
            try:
                r, w = await asyncio.wait_for(pg_login(port), 30)
                if query:
                    await asyncio.wait_for(simple_query(r, w, query), 30)
                conns.append((r, w))
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors.append(repr(e))

    await asyncio.gather(*(one() for _ in range(n)))
    return conns, errors


async def memory_idle(env, name, n, hold, concurrency, query=None):
    pid = env.procs[name].pid
    port = env.ports[name]
    # One login first so the proxy has its backend/server params cached.
    r, w = await pg_login(port)
    w.close()
    await asyncio.sleep(1)
    base = rss_kib(pid)
    anon_base = rss_kib(pid, "RssAnon")
    t0 = time.time()
    conns, errors = await open_idle(port, n, concurrency, query)
    opened = time.time() - t0
    samples = []
    for _ in range(max(1, int(hold))):
        await asyncio.sleep(1)
        samples.append((rss_kib(pid), rss_kib(pid, "RssAnon")))
    peak, anon_peak = max(samples)
    cpu = cpu_seconds(pid)
    for _, w in conns:
        w.close()
    await asyncio.sleep(2)
    after = rss_kib(pid)
    res = {"target": name, "query": query, "clients": len(conns), "errors": len(errors),
           "error_examples": errors[:3], "open_s": round(opened, 1),
           "rss_base_kib": base, "rss_idle_kib": peak, "rss_after_close_kib": after,
           "anon_base_kib": anon_base, "anon_idle_kib": anon_peak,
           "rss_idle_mib": round(peak / 1024, 1),
           "per_client_bytes": round((peak - base) * 1024 / max(1, len(conns))),
           "cpu_s_total": cpu}
    log(f"{name}: {len(conns)} idle clients ({len(errors)} failed; first ran {query!r}) in "
        f"{opened:.1f} s: RSS "
        f"{base / 1024:.1f} MiB -> {peak / 1024:.1f} MiB "
        f"({res['per_client_bytes']} B per client; anonymous {anon_base / 1024:.1f} -> "
        f"{anon_peak / 1024:.1f} MiB), {after / 1024:.1f} MiB after they left")
    return res


async def memory_slow_reader(env, name, sql, seconds, read_after):
    """One client sends `sql` and does not read for `seconds`; the proxy's RSS is sampled."""
    pid = env.procs[name].pid
    reader, writer = await pg_login(env.ports[name])
    base = rss_kib(pid)
    q = sql.encode() + b"\0"
    writer.write(b"Q" + struct.pack("!i", len(q) + 4) + q)
    await writer.drain()
    samples = []
    t0 = time.time()
    while time.time() - t0 < seconds:
        await asyncio.sleep(0.5)
        samples.append((round(time.time() - t0, 1), rss_kib(pid)))
    drained = None
    if read_after:
        # Now read everything, to show the stream was only paused.
        t1 = time.time()
        total = 0
        while True:
            tag, body = await asyncio.wait_for(read_msg(reader), 120)
            total += len(body) + 5
            if tag == b"Z":
                break
        drained = {"bytes": total, "seconds": round(time.time() - t1, 1)}
    writer.close()
    await asyncio.sleep(2)
    after = rss_kib(pid)
    peak = max(s for _, s in samples)
    res = {"target": name, "sql": sql, "rss_base_kib": base, "rss_peak_kib": peak,
           "rss_after_kib": after, "growth_kib": peak - base, "samples": samples,
           "drained": drained}
    log(f"{name}: slow reader of {sql[:60]!r}: RSS {base / 1024:.1f} MiB -> peak "
        f"{peak / 1024:.1f} MiB over {seconds} s (+{(peak - base) / 1024:.1f} MiB), "
        f"{after / 1024:.1f} MiB after; drained={drained}")
    return res


def cmd_memory(args):
    raise_nofile(4 * args.clients + 1000)
    os.makedirs(args.out, exist_ok=True)
    env = Env(args)
    out = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "machine": machine()}
    try:
        env.start_postgres(0)
        env.start_proxy("pgbouncer")
        env.start_proxy("sluice")
        # --baseline: the same idle-client runs with the baseline binary, interleaved.
        proxies = ("sluice", "pgbouncer")
        if args.baseline:
            env.start_proxy(BASE + "sluice")
            proxies = ("sluice", BASE + "sluice", "pgbouncer")
        out["versions"] = versions(env)
        # The slow readers first, while the proxies' heaps are small: growth is not hidden
        # by memory freed after the idle clients left. (--slow-seconds 0: none.)
        out["slow"] = []
        big_rows = "SELECT repeat('x', 1000) FROM generate_series(1, 2000000)"  # ~2 GB of rows
        one_row = "SELECT repeat('x', 64 * 1024 * 1024)"  # one 64 MiB DataRow
        for sql, read_after in ((big_rows, False), (one_row, True)):
            for name in ("sluice", "pgbouncer") if args.slow_seconds > 0 else ():
                out["slow"].append(asyncio.run(asyncio.wait_for(
                    memory_slow_reader(env, name, sql, args.slow_seconds, read_after), 300)))
        # Idle right after logging in, then idle after one query each (the usual state of an
        # application's pooled connections: buffers have been used once).
        out["idle"] = []
        for query in (None, "SELECT 1"):
            for name in proxies:
                env.restart(name)
                out["idle"].append(asyncio.run(asyncio.wait_for(
                    memory_idle(env, name, args.clients, args.hold, args.concurrency, query),
                    600)))
    finally:
        env.close()
    with open(os.path.join(args.out, "memory.json"), "w") as f:
        json.dump(out, f, indent=1)
    print()
    print("| proxy | idle clients | each ran first | RSS before | RSS with clients | per client "
          "| anonymous RSS before → with clients |")
    print("|---|---|---|---|---|---|---|")
    for r in out["idle"]:
        print(f"| {r['target']} | {r['clients']} ({r['errors']} failed) | "
              f"{r['query'] or '(nothing)'} | "
              f"{r['rss_base_kib'] / 1024:.1f} MiB | {r['rss_idle_mib']:.1f} MiB | "
              f"{r['per_client_bytes']} B | {r['anon_base_kib'] / 1024:.1f} → "
              f"{r['anon_idle_kib'] / 1024:.1f} MiB |")
    print()
    print("| proxy | slow reader of | RSS before | peak RSS | growth |")
    print("|---|---|---|---|---|")
    for r in out["slow"]:
        print(f"| {r['target']} | `{r['sql']}` | {r['rss_base_kib'] / 1024:.1f} MiB | "
              f"{r['rss_peak_kib'] / 1024:.1f} MiB | {r['growth_kib'] / 1024:.1f} MiB |")
    print(f"\nresults: {args.out}/memory.json")
    return 0


def cmd_replot(args):
    """Table and plot again from --out/results.json (e.g. after changing the plot)."""
    with open(os.path.join(args.out, "results.json")) as f:
        result = json.load(f)
    rows = summarize(result["runs"])
    print_table(rows, ratios(rows))
    plot(rows, os.path.join(args.out, "tps-vs-clients.png"))
    return 0


def cmd_hold(args):
    """Starts everything and waits (for profiling by hand)."""
    raise_nofile()
    env = Env(args)
    try:
        env.start_postgres(args.scale)
        for name in ["pgbouncer"] + SLUICES:
            env.start_proxy(name)
        info = {"ports": env.ports, "pids": {k: p.pid for k, p in env.procs.items()},
                "work": env.work, "password": PASSWORD, "user": USER, "db": DB}
        with open(os.path.join(args.out, "hold.json") if os.path.isdir(args.out)
                  else "/tmp/pg-e2e-hold.json", "w") as f:
            json.dump(info, f)
        print(json.dumps(info), flush=True)
        time.sleep(args.hold)
    finally:
        env.close()
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("command", nargs="?", default="pgbench", choices=["pgbench", "memory", "hold", "replot"])
    ap.add_argument("--full", action="store_true", help="every combination (long)")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions (default 3)")
    ap.add_argument("--duration", type=int, default=7, help="pgbench -T seconds (default 7)")
    ap.add_argument("--scale", type=int, default=10, help="pgbench -i -s (default 10)")
    ap.add_argument("--pool-size", type=int, default=20,
                    help="sluice pool_size = PgBouncer default_pool_size (default 20)")
    ap.add_argument("--jobs", type=int, default=2, help="pgbench -j (default 2)")
    ap.add_argument("--sampling-rate", type=float, default=0.1,
                    help="pgbench --sampling-rate for the latency log (default 0.1; 1 client "
                         "and -C runs log every transaction)")
    ap.add_argument("--max-connections", type=int, default=400,
                    help="PostgreSQL max_connections (direct runs need > clients)")
    ap.add_argument("--cases", help="comma-separated case keys, e.g. select/simple/c16")
    ap.add_argument("--targets", help="comma-separated subset of " + ",".join(TARGETS))
    ap.add_argument("--pause", type=float, default=0.5, help="seconds between runs")
    ap.add_argument("--out", default=os.path.join(ROOT, "target", "pg-e2e"),
                    help="result directory (default target/pg-e2e)")
    ap.add_argument("--sluice", default=os.path.join(ROOT, "target", "release", "sluice"))
    ap.add_argument("--baseline", help="another sluice binary: adds a base- twin of every sluice "
                    "target, interleaved (e.g. a copy built from main before a change)")
    ap.add_argument("--no-build", action="store_true", help="do not run cargo build --release")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, data)")
    ap.add_argument("--pgbouncer-auth", choices=["verifier", "plain"], default="verifier",
                    help="userlist.txt holds the SCRAM verifier (default) or the plaintext password")
    ap.add_argument("--clients", type=int, default=10000, help="memory: idle clients")
    ap.add_argument("--hold", type=float, default=5, help="memory: seconds to hold them")
    ap.add_argument("--concurrency", type=int, default=200, help="memory: logins in flight")
    ap.add_argument("--slow-seconds", type=float, default=8,
                    help="memory: seconds the slow client does not read (0: no slow client)")
    args = ap.parse_args()
    if args.baseline:
        if not os.path.exists(args.baseline):
            die(f"no baseline binary at {args.baseline}")
        add_baseline_targets()
    if args.command == "replot":
        return cmd_replot(args)
    if not args.no_build and args.sluice == os.path.join(ROOT, "target", "release", "sluice"):
        log("cargo build --release --bin sluice")
        r = subprocess.run(["cargo", "build", "--release", "--bin", "sluice"], cwd=ROOT,
                           timeout=3600)
        if r.returncode != 0:
            die("cargo build --release failed")
    if not os.path.exists(args.sluice):
        die(f"no sluice binary at {args.sluice}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.command == "memory":
        return cmd_memory(args)
    if args.command == "hold":
        return cmd_hold(args)
    return cmd_pgbench(args)


if __name__ == "__main__":
    sys.exit(main())
