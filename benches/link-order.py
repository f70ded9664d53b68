#!/usr/bin/env python3
"""Writes src/link/order.txt: the functions a PostgreSQL sluice runs, hottest first, for the
linker to place together at the start of the binary's code (see build.rs).

    python3 benches/link-order.py [--sluice target/release/sluice]

Why: the kernel maps a program's code in 64 KiB windows around each page it touches
("fault-around"), and the code that a running sluice touches (start-up, login, the relay, the
pool, the probes) was spread over ~120 of the release binary's ~190 windows, between
functions it never runs (Kubernetes and DNS discovery, the CQL path, config errors). Each of
those windows counts in RSS. Put together, they take a few windows; the same code runs, and
what a CQL or Kubernetes-discovery sluice runs besides is where it was before.

How: sluice runs under callgrind (`--demangle=no`, so the names are the linker's) with
`RUST_LOG=info`, serving a PostgreSQL cluster (the primary and replica that `pg-e2e.py hold`
starts) and a CQL cluster (three nodes of `sluice-cql-testcluster`, built in debug), while
this script logs in with psql and runs pgbench (select-only simple, extended and prepared, a
read-write run, a run that reconnects per transaction), reads the admin endpoints (what
Kubernetes probes and Prometheus ask for), and runs reads and writes through the CQL listener
with the DataStax Python driver. Every function of the sluice binary that ran is listed, by
instructions spent in it, most first. Names that a later build no longer has are skipped by
the linker (`--no-warn-symbol-ordering`), so a stale list costs only locality; the names
change with the crate's metadata (dependencies, toolchain), so run this again after such a
change (and after a large change of the code that runs).
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "src", "link", "order.txt")


def log(msg):
    print(f"[link-order {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=120):
    import socket
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"nothing listens on {port} after {timeout} s")


def run(cmd, env):
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {r.stderr[-2000:]}")


def http_get(port, path):
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as r:
        return r.read()


def cql_workload(port):
    """Schema, writes, reads and prepared statements through sluice's CQL listener."""
    from cassandra.cluster import Cluster
    from cassandra.policies import RoundRobinPolicy
    cluster = Cluster(["127.0.0.1"], port=port, load_balancing_policy=RoundRobinPolicy(),
                      protocol_version=4, connect_timeout=60, control_connection_timeout=60)
    try:
        s = cluster.connect()
        s.default_timeout = 60
        s.execute("CREATE KEYSPACE IF NOT EXISTS lo WITH replication = "
                  "{'class': 'SimpleStrategy', 'replication_factor': 2}")
        s.execute("CREATE TABLE IF NOT EXISTS lo.kv (k int PRIMARY KEY, v text)")
        insert = s.prepare("INSERT INTO lo.kv (k, v) VALUES (?, ?)")
        select = s.prepare("SELECT v FROM lo.kv WHERE k = ?")
        for i in range(300):
            s.execute(insert, (i, f"v{i}"))
            assert s.execute(select, (i,)).one().v == f"v{i}"
        for i in range(50):
            s.execute("SELECT v FROM lo.kv WHERE k = %s", (i,))
    finally:
        cluster.shutdown()


def profile(sluice, work):
    """Runs the workload against a callgrind-run sluice; returns the callgrind output path."""
    log("cargo build -p sluice-cql-testcluster")
    subprocess.run(["cargo", "build", "-q", "-p", "sluice-cql-testcluster"], cwd=ROOT, check=True,
                   timeout=1800)
    cql_nodes = free_port()
    ring = subprocess.Popen([os.path.join(ROOT, "target", "debug", "sluice-cql-testcluster"),
                             "--nodes", "3", "--port", str(cql_nodes)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return profile_with(sluice, work, cql_nodes)
    finally:
        ring.kill()
        ring.wait()


def profile_with(sluice, work, cql_nodes):
    hold = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "benches", "pg-e2e.py"), "hold", "--no-build",
         "--sluice", sluice, "--scale", "1", "--hold", "3600", "--out", work],
        stdout=subprocess.PIPE, text=True)
    try:
        info = None
        for line in hold.stdout:
            if line.startswith("{"):
                info = json.loads(line)
                break
        if info is None:
            raise SystemExit("pg-e2e.py hold did not start")
        port, admin, cql = free_port(), free_port(), free_port()
        cfg = os.path.join(work, "profiled.toml")
        with open(os.path.join(info["work"], "sluice.toml")) as f:
            text = f.read()
        text = re.sub(r'(\[admin\]\nlisten = "127.0.0.1:)\d+', rf"\g<1>{admin}", text)
        text = re.sub(r'(protocol = "postgres"\nlisten = "127.0.0.1:)\d+', rf"\g<1>{port}", text)
        seeds = ", ".join(f'"127.0.0.{i}:{cql_nodes}"' for i in (1, 2, 3))
        text += f"""
[[clusters]]
name = "ring"
protocol = "cql"
listen = "127.0.0.1:{cql}"

[clusters.discovery]
static = [{seeds}]
"""
        with open(cfg, "w") as f:
            f.write(text)
        out = os.path.join(work, "callgrind.out")
        log(f"sluice under callgrind on port {port}")
        sl = subprocess.Popen(["valgrind", "--tool=callgrind", "--demangle=no",
                               f"--callgrind-out-file={out}", sluice, "--config", cfg],
                              stdout=subprocess.DEVNULL, stderr=open(out + ".log", "w"),
                              env=dict(os.environ, RUST_LOG="info"))
        try:
            wait_port(port)
            wait_port(admin)
            # As pg-e2e.py does before it measures: until both nodes have been probed.
            end = time.time() + 120
            while not all(r in http_get(admin, "/topology") for r in (b'"primary"', b'"replica"')):
                if time.time() > end:
                    raise SystemExit("sluice did not see a primary and a replica")
                time.sleep(0.5)
            env = dict(os.environ, PGPASSWORD=info["password"], PGHOST="127.0.0.1",
                       PGPORT=str(port), PGUSER=info["user"], PGDATABASE=info["db"])
            run(["psql", "-X", "-c", "SELECT 1", "-c", "SHOW server_version"], env)
            for mode in ("simple", "extended", "prepared"):
                log(f"pgbench -S -M {mode}")
                run(["pgbench", "-n", "-S", "-M", mode, "-c", "4", "-j", "1", "-t", "300"], env)
            log("pgbench read-write, and with a login per transaction")
            run(["pgbench", "-n", "-c", "2", "-j", "1", "-t", "100"], env)
            run(["pgbench", "-n", "-S", "-C", "-c", "2", "-j", "1", "-t", "30"], env)
            log("admin endpoints")
            for _ in range(3):
                for path in ("/", "/metrics", "/healthz", "/readyz", "/topology"):
                    http_get(admin, path)
            log("CQL through sluice")
            wait_port(cql)
            cql_workload(cql)
        finally:
            sl.send_signal(signal.SIGINT)
            sl.wait(timeout=120)
        return out
    finally:
        hold.send_signal(signal.SIGINT)
        try:
            hold.wait(timeout=60)
        except subprocess.TimeoutExpired:
            hold.kill()


def functions(callgrind_out, binary):
    """(self instructions, name) of every function of `binary` that ran."""
    names, objects = {}, {}
    cost = {}
    ob = fn = None
    skip_next = False
    binary = os.path.realpath(binary)

    def define(table, ref):
        m = re.match(r"\((\d+)\)(?: (.*))?", ref)
        if not m:
            return ref
        if m.group(2) is not None:
            table[m.group(1)] = m.group(2)
        return table.get(m.group(1), "")

    with open(callgrind_out) as f:
        for line in f:
            line = line.rstrip("\n")
            if skip_next:
                skip_next = False
                continue
            if line.startswith("ob="):
                ob = define(objects, line[3:])
            elif line.startswith(("cob=", "cfi=", "cfl=")):
                if line.startswith("cob="):
                    define(objects, line[4:])
            elif line.startswith("cfn="):
                define(names, line[4:])
            elif line.startswith("fn="):
                fn = define(names, line[3:])
                if os.path.realpath(ob or "") == binary:
                    cost.setdefault(fn, 0)
            elif line.startswith("calls="):
                skip_next = True  # the inclusive cost of the call, not this function's
            elif line[:1].isdigit() or line[:1] in "+-*":
                parts = line.split()
                if len(parts) >= 2 and fn in cost:
                    try:
                        cost[fn] += int(parts[1])
                    except ValueError:
                        pass
    return sorted(((c, n) for n, c in cost.items()), reverse=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sluice", default=os.path.join(ROOT, "target", "release", "sluice"))
    ap.add_argument("--callgrind-out", help="use this callgrind output instead of profiling")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="sluice-link-order-") as work:
        out = args.callgrind_out or profile(args.sluice, work)
        fns = functions(out, args.sluice)
    names = [n for _, n in fns if n and not n.startswith("0x")]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        for n in names:
            f.write(n + "\n")
    log(f"{len(names)} functions written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
