#!/usr/bin/env python3
"""Writes src/link/order.txt: the functions a running sluice executes, hottest first, for the
linker to place together at the start of the binary's code (see build.rs).

    python3 benches/link-order.py [--sluice target/release/sluice]

Why: the kernel maps a program's code in 64 KiB windows around each page it touches
("fault-around"), and the code that a running sluice touches (start-up, login, the relay, the
pool, the probes, the admin endpoints) was spread over ~120 of the release binary's ~190
windows, between functions it never runs (Kubernetes and DNS discovery, config errors).
Each of those windows counts in RSS. Put together, they take about 35; the same code runs,
and what a Kubernetes- or DNS-discovery sluice runs besides is where it was before.

How: sluice runs under callgrind (`--demangle=no`, so the names are the linker's) with
`RUST_LOG=info`, twice. First it serves a PostgreSQL cluster alone (the primary and replica
that `pg-e2e.py hold` starts, static discovery); then also a CQL cluster (three nodes of
`sluice-cql-testcluster`, built in debug) and a PostgreSQL cluster discovered from a
Kubernetes API (`k8s-apiserver`, built in debug, serving the recorded CloudNativePG scenario
with the pods' addresses mapped to 127.0.0.11–13, where nothing listens: sluice watches the
endpoints and reports the nodes down). Meanwhile this script logs in with psql and runs
pgbench (select-only simple, extended and prepared, a read-write run, a run that reconnects
per transaction), reads the admin endpoints (what Kubernetes probes and Prometheus ask for),
and in the second run reads and writes through the CQL listener with the DataStax Python
driver. Every function of the sluice binary that ran is listed, by instructions spent in
it, most first: those of the first run, then those only the second ran (so a PostgreSQL
sluice finds what it runs in as few pages as possible). Names that a later build no longer
has are skipped by the linker (`--no-warn-symbol-ordering`), so a stale list costs only
locality; the names change with the crate's metadata (dependencies, toolchain), so run this
again after such a change (and after a large change of the code that runs).
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


def _pg_e2e():
    """benches/pg-e2e.py as a module (its name has a dash): its helpers, not copies of them."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("pg_e2e", os.path.join(ROOT, "benches", "pg-e2e.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PG_E2E = _pg_e2e()
free_port = PG_E2E.free_port


def http_get(port, path):
    """The response (status line, headers, body) to a GET of the admin listener, whatever its
    status (`/readyz` answers 503 while a cluster has no healthy node, as the one discovered
    from Kubernetes here)."""
    return PG_E2E.http_get("127.0.0.1", port, path)


def log(msg):
    print(f"[link-order {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def wait_port(port, timeout=120, proc=None, logfile=None):
    import socket
    end = time.time() + timeout
    while time.time() < end:
        if proc is not None and proc.poll() is not None:
            with open(logfile) as f:
                raise SystemExit(f"exited ({proc.returncode}) before listening on {port}:\n"
                                 + f.read()[-3000:])
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
    log("cargo build -p k8s-apiserver")
    subprocess.run(["cargo", "build", "-q", "-p", "k8s-apiserver"], cwd=ROOT, check=True,
                   timeout=1800)
    cql_nodes, api = free_port(), free_port()
    ring = subprocess.Popen([os.path.join(ROOT, "target", "debug", "sluice-cql-testcluster"),
                             "--nodes", "3", "--port", str(cql_nodes)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kubeconfig = os.path.join(work, "kubeconfig")
    rewrites = []
    for i, pod in enumerate(("10.244.1.11", "10.244.2.11", "10.244.3.11")):
        rewrites += ["--rewrite", f'"{pod}"="127.0.0.{11 + i}"']
    apiserver = subprocess.Popen(
        [os.path.join(ROOT, "target", "debug", "k8s-apiserver"), "--scenario", "cnpg-failover",
         "--listen", f"127.0.0.1:{api}", "--kubeconfig", kubeconfig] + rewrites,
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(api)
        return [profile_with(sluice, work, cql_nodes, kubeconfig, full) for full in (False, True)]
    finally:
        for p in (ring, apiserver):
            p.kill()
            p.wait()


def profile_with(sluice, work, cql_nodes, kubeconfig, full):
    """One profiled run: the PostgreSQL cluster alone (static discovery, as pg-e2e.py runs it),
    or (`full`) with the CQL and the Kubernetes-discovered clusters beside it."""
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
        text += "" if not full else f"""
[[clusters]]
name = "ring"
protocol = "cql"
listen = "127.0.0.1:{cql}"

[clusters.discovery]
static = [{seeds}]

[[clusters]]
name = "pg"
protocol = "postgres"
listen = "127.0.0.1:{free_port()}"
pool_mode = "transaction"

[clusters.discovery.kubernetes]
namespace = "db"
service = "pg-r"
port = "postgres"
roles = "cloudnative-pg"

[[clusters.users]]
name = "app"
password = "app-secret"
"""
        with open(cfg, "w") as f:
            f.write(text)
        out = os.path.join(work, "callgrind.full.out" if full else "callgrind.pg.out")
        log(f"sluice under callgrind on port {port} ({'all clusters' if full else 'PostgreSQL'})")
        sl = subprocess.Popen(["valgrind", "--tool=callgrind", "--demangle=no",
                               f"--callgrind-out-file={out}", sluice, "--config", cfg],
                              stdout=subprocess.DEVNULL, stderr=open(out + ".log", "w"),
                              env=dict(os.environ, RUST_LOG="info", KUBECONFIG=kubeconfig))
        try:
            wait_port(port, proc=sl, logfile=out + ".log")
            wait_port(admin)
            # As pg-e2e.py does before it measures: until both nodes have been probed.
            end = time.time() + 120
            while not all(r in http_get(admin, "/topology") for r in ('"primary"', '"replica"')):
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
            if not full:
                return out
            # The Kubernetes cluster's members, as its watch reported them.
            end = time.time() + 120
            while "127.0.0.11" not in http_get(admin, "/topology"):
                if time.time() > end:
                    raise SystemExit("sluice did not list the Kubernetes cluster's pods")
                time.sleep(0.5)
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
    ap.add_argument("--callgrind-out", nargs="+",
                    help="use these callgrind outputs (first the PostgreSQL-only run, then the "
                         "full one) instead of profiling")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="sluice-link-order-") as work:
        outs = args.callgrind_out or profile(args.sluice, work)
        # What a PostgreSQL sluice runs first (the common deployment, and what pg-e2e.py
        # measures), then what the CQL and Kubernetes clusters add: a sluice that runs only
        # the first part finds it in as few pages as possible.
        names, seen = [], set()
        for out in outs:
            for _, n in functions(out, args.sluice):
                if n and not n.startswith("0x") and n not in seen:
                    seen.add(n)
                    names.append(n)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        for n in names:
            f.write(n + "\n")
    log(f"{len(names)} functions written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
