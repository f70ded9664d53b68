#!/usr/bin/env python3
"""Runs a driver's own unittest suite (psycopg2's or asyncpg's, from its sdist) and records
one outcome per test.

    psycopg2_suite.py run --tests-dir SDIST --out DIR [--per-test-timeout S] [--total-timeout S]
                          [--suite psycopg2|asyncpg] [--per-file-timeout S] [--exclude ID=WHY]
    psycopg2_suite.py compare DIRECT_DIR SLUICE_DIR [MORE_RUN_DIRS...] [--known FILE]
                          [--variant NAME]

`run` starts a worker process that executes the suite (psycopg2: tests.test_suite(), exactly
what `python -m tests` runs; asyncpg: tests.suite(), what `python -m unittest tests` runs, with
the installed asyncpg, so SDIST must hold only tests/) and appends one JSON line per finished
test to DIR/results.jsonl; the unittest verbose output goes to DIR/unittest.log. --exclude
(repeatable; an id, or a prefix ending in `.`/`*`) records tests as skipped with the reason
given, without running them. --per-file-timeout bounds the time of one test module: when it
runs out, the running test is recorded as `timeout` and the module's other unfinished tests too. A test that runs longer than the per-test
timeout is recorded as `timeout` and the worker exits; a worker that dies (segfault, ...)
leaves its current test recorded as `crash`. Either way a new worker continues with the tests
not run yet, so one hanging test never hides the rest. The database is configured the way the
suite documents it: PSYCOPG2_TESTDB, PSYCOPG2_TESTDB_HOST, _PORT, _USER, _PASSWORD.

`compare` prints the total/passed/failed/errors/skipped table for both runs and every test
whose outcome differs, most importantly those that pass directly but not through sluice.
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import traceback

PASS = ("success", "expected_failure")
FAIL = ("failure", "unexpected_success")
ERROR = ("error", "timeout", "crash")
SKIP = ("skip",)
# When a test reports several outcomes (a failing subtest and an error in tearDown, ...),
# the worst one counts.
SEVERITY = ["success", "expected_failure", "skip", "unexpected_success", "failure",
            "error", "timeout", "crash"]


def short_reason(text, limit=300):
    """The exception line of a traceback (the first unindented line after the last stack),
    or the text itself when it is no traceback (a skip reason), on one line, trimmed."""
    lines = str(text).strip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent")]
    if starts:
        rest = [line for line in lines[starts[-1] + 1:] if line and not line[0].isspace()]
        lines = rest[:1] or lines[-1:]
    text = " ".join(line.strip() for line in lines if line.strip())
    return text if len(text) <= limit else text[:limit] + "..."


# --------------------------------------------------------------------------------------------
# worker: runs in its own process, imports the suite, skips what is already recorded.

def worker(args):
    sys.path.insert(0, os.path.abspath(args.tests_dir))
    import unittest

    import tests  # noqa: E402  (the sdist's tests package; turns warnings into errors)

    done = set()
    if os.path.exists(args.results):
        with open(args.results) as f:
            for line in f:
                rec = json.loads(line)
                if rec.get("event") == "end":
                    done.add(rec["id"])

    def flatten(suite):
        for item in suite:
            if isinstance(item, unittest.TestSuite):
                yield from flatten(item)
            else:
                yield item

    loaded = tests.suite() if args.suite == "asyncpg" else tests.test_suite()
    todo = [t for t in flatten(loaded) if t.id() not in done]

    out = open(args.results, "a", buffering=1)
    lock = threading.Lock()

    def emit(rec):
        with lock:
            out.write(json.dumps(rec) + "\n")
            out.flush()

    excluded = [x.split("=", 1) + [""] for x in args.exclude or []]

    def exclusion(tid):
        for pattern, why, *_ in excluded:
            p = pattern.rstrip("*")
            if tid == pattern or (pattern.endswith(("*", ".")) and tid.startswith(p)):
                return why or "excluded"
        return None

    kept = []
    for t in todo:
        why = exclusion(t.id())
        if why is None:
            kept.append(t)
        else:
            emit({"event": "end", "id": t.id(), "outcome": "skip", "reason": "excluded: " + why,
                  "seconds": 0.0})
    todo = kept
    suite = unittest.TestSuite(todo)

    def module_of(tid):
        return tid.rsplit(".", 2)[0]

    state = {"id": None, "since": 0.0, "module": None, "module_since": 0.0}

    class Recorder(unittest.TextTestResult):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self._outcomes = {}

        def _note(self, test, outcome, detail=""):
            tid = test.id()
            prev = self._outcomes.get(tid)
            if prev is None or SEVERITY.index(outcome) > SEVERITY.index(prev[0]):
                self._outcomes[tid] = (outcome, short_reason(detail))
            # Errors outside a test (setUpClass, module setup) never see startTest/stopTest.
            if tid != state["id"]:
                emit({"event": "end", "id": tid, "outcome": outcome,
                      "reason": short_reason(detail), "seconds": 0.0})

        def startTest(self, test):
            super().startTest(test)
            state["id"] = test.id()
            state["since"] = time.monotonic()
            if module_of(test.id()) != state["module"]:
                state["module"] = module_of(test.id())
                state["module_since"] = state["since"]
            emit({"event": "start", "id": test.id()})

        def stopTest(self, test):
            super().stopTest(test)
            tid = test.id()
            outcome, reason = self._outcomes.get(tid, ("success", ""))
            emit({"event": "end", "id": tid, "outcome": outcome, "reason": reason,
                  "seconds": round(time.monotonic() - state["since"], 3)})
            state["id"] = None

        def addSuccess(self, test):
            super().addSuccess(test)
            self._note(test, "success")

        def addFailure(self, test, err):
            super().addFailure(test, err)
            self._note(test, "failure", self._exc_info_to_string(err, test))

        def addError(self, test, err):
            super().addError(test, err)
            self._note(test, "error", self._exc_info_to_string(err, test))

        def addSkip(self, test, reason):
            super().addSkip(test, reason)
            self._note(test, "skip", reason)

        def addExpectedFailure(self, test, err):
            super().addExpectedFailure(test, err)
            self._note(test, "expected_failure")

        def addUnexpectedSuccess(self, test):
            super().addUnexpectedSuccess(test)
            self._note(test, "unexpected_success")

        def addSubTest(self, test, subtest, err):
            super().addSubTest(test, subtest, err)
            if err is not None:
                kind = "failure" if issubclass(err[0], test.failureException) else "error"
                self._note(test, kind, self._exc_info_to_string(err, test))

    def watchdog():
        while True:
            time.sleep(0.5)
            tid, since = state["id"], state["since"]
            if tid is not None and time.monotonic() - since > args.per_test_timeout:
                emit({"event": "end", "id": tid, "outcome": "timeout",
                      "reason": f"no result after {args.per_test_timeout} s",
                      "seconds": round(time.monotonic() - since, 3)})
                sys.stderr.write(f"\n*** {tid}: timed out after {args.per_test_timeout} s\n")
                sys.stderr.flush()
                os._exit(3)
            mod, msince = state["module"], state["module_since"]
            if (tid is not None and args.per_file_timeout
                    and time.monotonic() - msince > args.per_file_timeout):
                ended = set()
                with open(args.results) as f:
                    for line in f:
                        rec = json.loads(line)
                        if rec.get("event") == "end":
                            ended.add(rec["id"])
                for t in [tid] + [t.id() for t in todo]:
                    if module_of(t) == mod and t not in ended:
                        ended.add(t)
                        emit({"event": "end", "id": t, "outcome": "timeout",
                              "reason": f"{mod}: file time limit {args.per_file_timeout} s",
                              "seconds": round(time.monotonic() - since, 3) if t == tid else 0})
                sys.stderr.write(f"\n*** {mod}: file time limit {args.per_file_timeout} s\n")
                sys.stderr.flush()
                os._exit(3)

    threading.Thread(target=watchdog, daemon=True).start()
    runner = unittest.TextTestRunner(stream=sys.stderr, verbosity=2, resultclass=Recorder)
    runner.run(suite)
    out.close()
    return 0


# --------------------------------------------------------------------------------------------
# run: restarts workers until every test has an outcome, within the total timeout.

def load(results):
    """{test id: (outcome, reason)} from a results.jsonl, plus the id of a test that started
    and never ended (the one running when a worker died)."""
    outcomes, running = {}, None
    if not os.path.exists(results):
        return outcomes, running
    with open(results) as f:
        for line in f:
            rec = json.loads(line)
            if rec["event"] == "start":
                running = rec["id"]
            else:
                outcomes[rec["id"]] = (rec["outcome"], rec.get("reason", ""))
                if running == rec["id"]:
                    running = None
    return outcomes, running


def run(args):
    os.makedirs(args.out, exist_ok=True)
    results = os.path.join(args.out, "results.jsonl")
    log_path = os.path.join(args.out, "unittest.log")
    for path in (results, log_path):
        if os.path.exists(path):
            os.remove(path)
    deadline = time.monotonic() + args.total_timeout
    started = time.monotonic()
    status = "complete"
    for attempt in range(args.max_restarts + 1):
        left = deadline - time.monotonic()
        if left <= 0:
            status = f"stopped: total timeout {args.total_timeout} s"
            break
        cmd = [sys.executable, os.path.abspath(__file__), "worker",
               "--tests-dir", args.tests_dir, "--results", results,
               "--per-test-timeout", str(args.per_test_timeout),
               "--per-file-timeout", str(args.per_file_timeout), "--suite", args.suite]
        for x in args.exclude or []:
            cmd += ["--exclude", x]
        with open(log_path, "a") as log:
            try:
                code = subprocess.run(cmd, stdout=log, stderr=log, timeout=left,
                                      cwd=args.tests_dir).returncode
            except subprocess.TimeoutExpired:
                code = None
        outcomes, running = load(results)
        if code is None:
            status = f"stopped: total timeout {args.total_timeout} s"
            if running:
                with open(results, "a") as f:
                    f.write(json.dumps({"event": "end", "id": running, "outcome": "timeout",
                                        "reason": "total timeout", "seconds": 0}) + "\n")
            break
        if code == 0:
            break
        if code != 3:
            if running is None:
                status = f"worker exited with {code} outside any test (see unittest.log)"
                break
            with open(results, "a") as f:
                f.write(json.dumps({"event": "end", "id": running, "outcome": "crash",
                                    "reason": f"worker exited with {code}",
                                    "seconds": 0}) + "\n")
    else:
        status = f"stopped after {args.max_restarts} worker restarts"
    outcomes, _ = load(results)
    summary = counts(outcomes)
    summary["status"] = status
    summary["seconds"] = round(time.monotonic() - started, 1)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"{args.out}: {summary}")
    return 0 if status == "complete" else 1


def counts(outcomes):
    kinds = [o for o, _ in outcomes.values()]
    return {
        "total": len(kinds),
        "passed": sum(k in PASS for k in kinds),
        "failed": sum(k in FAIL for k in kinds),
        "errors": sum(k in ERROR for k in kinds),
        "skipped": sum(k in SKIP for k in kinds),
    }


# --------------------------------------------------------------------------------------------
# compare

def compare(args):
    sluice_label = args.variant or "sluice"
    runs = [("direct", args.direct), (sluice_label, args.sluice)] + \
        [(os.path.basename(os.path.normpath(d)), d) for d in args.extra]
    results = {name: load(os.path.join(d, "results.jsonl"))[0] for name, d in runs}

    def meta(d):
        try:
            with open(os.path.join(d, "summary.json")) as f:
                return json.load(f)
        except OSError:
            return {}

    print(f"{'run':<16} {'total':>6} {'passed':>7} {'failed':>7} {'errors':>7} {'skipped':>8}"
          f" {'time':>7}  status")
    for name, d in runs:
        c, m = counts(results[name]), meta(d)
        print(f"{name:<16} {c['total']:>6} {c['passed']:>7} {c['failed']:>7} {c['errors']:>7}"
              f" {c['skipped']:>8} {str(m.get('seconds', '?')) + 's':>7}  {m.get('status', '?')}")

    def cls(o):
        if o == "missing":
            return "missing"
        return "pass" if o in PASS else "skip" if o in SKIP else "fail"

    direct, sluice = results["direct"], results[sluice_label]
    extra = [name for name, _ in runs[2:]]
    only_sluice, other = [], []
    for tid in sorted(set(direct) | set(sluice)):
        d = direct.get(tid, ("missing", ""))
        s = sluice.get(tid, ("missing", ""))
        if d[0] == s[0] or cls(d[0]) == cls(s[0]):
            continue
        # "missing" directly: e.g. a setUpClass error that only happens through sluice.
        if cls(d[0]) in ("pass", "missing") and cls(s[0]) == "fail":
            only_sluice.append((tid, s))
        else:
            other.append((tid, d, s))
    print()
    print(f"tests that pass directly and fail through sluice"
          f"{' (' + args.variant + ')' if args.variant else ''}: {len(only_sluice)}")
    for tid, (outcome, reason) in only_sluice:
        also = "".join(f" ({name}: {results[name].get(tid, ('missing',))[0]})" for name in extra)
        print(f"  {tid}  [{outcome}]{also} {reason}")
    if other:
        print()
        print(f"other differences (direct -> sluice): {len(other)}")
        for tid, d, s in other:
            print(f"  {tid}  {d[0]} -> {s[0]}  {s[1] or d[1]}")
    status = 0
    if args.known:
        known = {}
        with open(args.known) as f:
            for line in f:
                line = line.split("#", 1)[0].split()
                # `<test id> <cause>`, or `<variant,...> <test id> <cause>` (the first field has
                # no dot) for one --variant only
                if line and "." not in line[0]:
                    if args.variant not in line[0].split(","):
                        continue
                    line = line[1:]
                if line:
                    known[line[0]] = line[1] if len(line) > 1 else "?"
        failing = {tid for tid, _ in only_sluice}
        unexpected = sorted(failing - set(known))
        fixed = sorted(tid for tid in known if tid in sluice and cls(sluice[tid][0]) == "pass")
        print()
        print(f"known limitations ({os.path.basename(args.known)}): "
              f"{len(failing & set(known))} of {len(known)} listed tests fail through sluice")
        by_cause = {}
        for tid in sorted(failing & set(known)):
            by_cause[known[tid]] = by_cause.get(known[tid], 0) + 1
        for cause, n in sorted(by_cause.items()):
            print(f"  {cause}: {n}")
        if fixed:
            print(f"listed but passing through sluice this run (a racy cause, or fixed: check): {len(fixed)}")
            for tid in fixed:
                print(f"  {tid}")
        if unexpected:
            status = 1
            print(f"UNEXPECTED: failing only through sluice and not listed: {len(unexpected)}")
            for tid in unexpected:
                print(f"  {tid}  [{sluice[tid][0]}] {sluice[tid][1]}")
        else:
            print("no unexpected sluice-only failures")
    for name in extra:
        diff = [tid for tid in sorted(results[name])
                if cls(direct.get(tid, ("missing",))[0]) in ("pass", "missing")
                and cls(results[name][tid][0]) == "fail"]
        print()
        print(f"tests that pass directly and fail in {name}: {len(diff)}")
        for tid in diff:
            outcome, reason = results[name][tid]
            print(f"  {tid}  [{outcome}] {reason}")
    return status


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--tests-dir", required=True, help="the unpacked psycopg2 sdist")
    r.add_argument("--out", required=True)
    r.add_argument("--per-test-timeout", type=float, default=60)
    r.add_argument("--total-timeout", type=float, default=900)
    r.add_argument("--max-restarts", type=int, default=20)
    w = sub.add_parser("worker")
    w.add_argument("--tests-dir", required=True)
    w.add_argument("--results", required=True)
    w.add_argument("--per-test-timeout", type=float, default=60)
    for q in (r, w):
        q.add_argument("--suite", choices=("psycopg2", "asyncpg"), default="psycopg2")
        q.add_argument("--per-file-timeout", type=float, default=0,
                       help="seconds one test module may take (0: no limit)")
        q.add_argument("--exclude", action="append", metavar="ID=WHY",
                       help="record the test (or prefix ending in . or *) as skipped")
    c = sub.add_parser("compare")
    c.add_argument("direct")
    c.add_argument("sluice")
    c.add_argument("extra", nargs="*", help="more run directories to show (e.g. sluice-primary)")
    c.add_argument("--known", help="file listing the accepted sluice-only failures; "
                   "exit 1 when another test fails only through sluice")
    c.add_argument("--variant", help="name of the sluice run (its label, and the variant whose "
                   "lines of --known apply)")
    args = p.parse_args()
    try:
        return {"run": run, "worker": worker, "compare": compare}[args.cmd](args)
    except Exception:
        traceback.print_exc()
        return 2


if __name__ == "__main__":
    sys.exit(main())
