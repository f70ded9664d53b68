#!/usr/bin/env python3
"""Judges pg_regress runs through sluice against the direct run (used by pg_regress.sh).

    pg_regress_classify.py --out DIR --variants v1,v2,... [--known FILE] [--sql-dir DIR]

DIR/<variant>/ holds, per run, pg_regress.out (the per-test `ok` / `FAILED` / `failed
(ignored)` lines), regression.diffs and run.json (exit status, seconds); DIR/direct/ is the
run directly against the primary. Printed: a pass/fail table per run, then for each variant the
tests that fail through sluice but pass directly, with the decisive line of their diff.

A sluice-only failure is accepted when
  * FILE lists it for that variant with a decisive diff line that occurs in its diff (a listed
    test that now fails with a diff lacking that line fails differently: not accepted), or
  * the variant is transaction-eventual and its diff is a stale read by design (rules below).
In transaction-eventual, a diff that shows a write reaching the replica is never accepted, even
when listed. Exit status 1 when some sluice-only failure is not accepted or a run did not
complete (pg_regress exit status other than 0/1, or tests missing from its output).

Classification of transaction-eventual diffs (conservative: anything else is "unexplained"):
  write-on-replica  any added (+) line says the statement ran on a standby: "read-only
                    transaction", "recovery is in progress", "during recovery", "hot standby",
                    SQLSTATE 25006. Always a failure: sluice must send writes to the primary.
  stale-read        every hunk of the diff is one of
                      (a) added lines that are only `ERROR:  <kind> "NAME" does not exist` (kind:
                          relation, function, procedure, type, schema, sequence, collation,
                          operator, domain) or psql's `Did not find any relation named "NAME"`,
                          with their LINE/caret/HINT/CONTEXT lines and smaller row counts, where
                          NAME is created, not as TEMP, by a CREATE statement in the test's own
                          SQL file (an object the test just made that the replica has not
                          replayed yet; temp tables never reach a replica, so a missing temp
                          table is a pinning bug, and prepared statements, cursors, portals or
                          savepoints are session state sluice must keep: not accepted);
                      (b) rows missing: removed (-) lines that are data rows (no NOTICE/WARNING/
                          ERROR lines), and at most a row count line `(M rows)` added in place of
                          a larger `(N rows)`.
  unexplained       everything else (needs a line in FILE with its reason, or is a bug).
"""

import argparse
import json
import os
import re
import sys

STATUS_RE = re.compile(r"^(?:test |     |ok \d+\s+[-+] |not ok \d+\s+[-+] )\s*(\S+)\s+\.\.\. "
                       r"(ok|FAILED|failed \(ignored\))")
DIFF_HEAD_RE = re.compile(r"^diff (?:-\S+ )*(\S+) (\S+)$")
WRITE_ON_REPLICA = re.compile(
    r"read-only transaction|recovery is in progress|during recovery|hot standby|\b25006\b",
    re.I)
MISSING_RE = re.compile(
    r'^ERROR:  (?:relation|function|procedure|type|schema|sequence|collation|operator|domain)'
    r' "?([^"]+?)"? does not exist|^Did not find any relation named "([^"]+)"')
CONTEXT_RE = re.compile(r"^(LINE \d+: |\s*\^\s*$|HINT:  |CONTEXT:  |QUERY:  )")
ROWS_RE = re.compile(r"^\((\d+) rows?\)$")


def parse_status(path):
    """{test: "ok" | "failed" | "ignored"} from pg_regress's output."""
    out = {}
    if not os.path.exists(path):
        return out
    with open(path, errors="replace") as f:
        for line in f:
            m = STATUS_RE.match(line.rstrip("\n"))
            if m:
                out[m.group(1)] = {"ok": "ok", "FAILED": "failed"}.get(m.group(2), "ignored")
    return out


def parse_diffs(path):
    """{test: [hunk lines...]} from regression.diffs (one `diff -U3 expected results` block
    per failed test)."""
    diffs, cur = {}, None
    if not os.path.exists(path):
        return diffs
    with open(path, errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            m = DIFF_HEAD_RE.match(line)
            if m:
                cur = os.path.splitext(os.path.basename(m.group(2)))[0]
                diffs[cur] = []
            elif cur is not None and not line.startswith(("--- ", "+++ ")):
                diffs[cur].append(line)
    return diffs


def hunks(lines):
    out = []
    for line in lines:
        if line.startswith("@@"):
            out.append([])
        elif out:
            out[-1].append(line)
    return out


def decisive(lines):
    """The first added error line of the first hunk that has one, else the first changed line."""
    for hunk in hunks(lines):
        for line in hunk:
            if line.startswith("+") and re.match(r"^\+(ERROR|FATAL|WARNING|PANIC):", line):
                return line
    for line in lines:
        if line[:1] in "+-" and not line.startswith(("+++", "---")):
            return line
    return "(no diff)"


def created_names(sql):
    """Names created, not as TEMP, by the test's SQL (lower case, last name component)."""
    names, temps = set(), set()
    for m in re.finditer(
            r"\bcreate\s+(?:or\s+replace\s+)?((?:global\s+|local\s+)?(?:temp|temporary|unlogged)\s+)?"
            r"(?:recursive\s+)?(?:materialized\s+)?(?:trusted\s+)?(?:procedural\s+)?"
            r"(?:table|view|sequence|index|function|procedure|type|schema|collation|operator|"
            r"domain|aggregate)\s+(?:concurrently\s+)?(?:if\s+not\s+exists\s+)?"
            r"((?:\"[^\"]+\"|[\w$]+)(?:\.(?:\"[^\"]+\"|[\w$]+))?)", sql, re.I):
        name = m.group(2).split(".")[-1].strip('"').lower()
        (temps if m.group(1) and re.search(r"temp", m.group(1), re.I) else names).add(name)
    return names - temps


def classify(lines, sql):
    """("write-on-replica" | "stale-read" | "unexplained", why)."""
    for line in lines:
        if line.startswith("+") and WRITE_ON_REPLICA.search(line):
            return "write-on-replica", line
    created = created_names(sql) if sql is not None else set()
    for hunk in hunks(lines):
        added = [line[1:] for line in hunk if line.startswith("+")]
        removed = [line[1:] for line in hunk if line.startswith("-")]
        missing = [MISSING_RE.match(a) for a in added]
        removed_rows = [int(m.group(1)) for m in map(ROWS_RE.match, removed) if m]
        kind_a = False
        for a, m in zip(added, missing):
            if m:
                name = (m.group(1) or m.group(2)).split(".")[-1].strip('"').lower()
                name = re.sub(r"\(.*$", "", name)  # function "f(integer)"
                if name not in created:
                    return "unexplained", f"missing object {name!r} is not created by the test"
                kind_a = True
            elif CONTEXT_RE.match(a):
                continue
            elif ROWS_RE.match(a):
                if not removed_rows or int(ROWS_RE.match(a).group(1)) >= max(removed_rows):
                    return "unexplained", "+" + a
            else:
                return "unexplained", "+" + a
        if not kind_a:
            # (b): only data rows removed (plus a smaller row count)
            for r in removed:
                if re.match(r"^(NOTICE|WARNING|ERROR|INFO|DETAIL|HINT|CONTEXT|FATAL):", r):
                    return "unexplained", "-" + r
            if not removed:
                return "unexplained", "hunk without removed rows"
    return "stale-read", ""


def load_known(path):
    """{(variant, test): (cause, decisive line)}; variant may be `*`."""
    known = {}
    if not path or not os.path.exists(path):
        return known
    with open(path) as f:
        for raw in f:
            if not raw.strip() or raw.lstrip().startswith("#"):
                continue
            parts = raw.rstrip("\n").split(None, 3)
            if len(parts) < 4:
                raise SystemExit(f"{path}: bad line (need: variant test cause diff-line): {raw!r}")
            for v in parts[0].split(","):
                known[(v, parts[1])] = (parts[2], parts[3].strip())
    return known


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--variants", default="")
    p.add_argument("--known")
    p.add_argument("--sql-dir", help="the suite's sql/ (default: OUT/../sql or the cache)")
    args = p.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    known = load_known(args.known)

    runs = {}
    for name in ["direct"] + variants:
        d = os.path.join(args.out, name)
        try:
            with open(os.path.join(d, "run.json")) as f:
                meta = json.load(f)
        except OSError:
            meta = {"exit": None, "seconds": None}
        runs[name] = {"status": parse_status(os.path.join(d, "pg_regress.out")),
                      "diffs": parse_diffs(os.path.join(d, "regression.diffs")), "meta": meta}

    direct = runs["direct"]["status"]
    print(f"{'run':<22} {'tests':>6} {'ok':>5} {'failed':>7} {'ignored':>8} {'time':>6}  exit")
    for name, r in runs.items():
        s = list(r["status"].values())
        print(f"{name:<22} {len(s):>6} {s.count('ok'):>5} {s.count('failed'):>7}"
              f" {s.count('ignored'):>8} {str(r['meta'].get('seconds')) + 's':>6}"
              f"  {r['meta'].get('exit')}")

    status = 0
    for name, r in runs.items():
        if r["meta"].get("exit") not in (0, 1):
            print(f"\n{name}: pg_regress did not complete (exit {r['meta'].get('exit')}):"
                  f" see {name}/pg_regress.out")
            status = 1
    direct_failed = sorted(t for t, o in direct.items() if o != "ok")
    if direct_failed:
        print(f"\nfailing directly too (not judged): {' '.join(direct_failed)}")

    sql_dir = args.sql_dir
    report = {}
    for v in variants:
        st, diffs = runs[v]["status"], runs[v]["diffs"]
        only = sorted(t for t in direct if direct[t] == "ok" and st.get(t, "missing") != "ok")
        accepted, rejected, counts = [], [], {}
        for t in only:
            lines = diffs.get(t, [])
            line = decisive(lines) if st.get(t) != "missing" and t in st else "(no result: run incomplete)"
            entry = {"test": t, "outcome": st.get(t, "missing"), "line": line}
            k = known.get((v, t)) or known.get(("*", t))
            verdict = None
            if v == "transaction-eventual" and lines:
                sql = None
                if sql_dir and os.path.exists(os.path.join(sql_dir, t + ".sql")):
                    with open(os.path.join(sql_dir, t + ".sql"), errors="replace") as f:
                        sql = f.read()
                kind, why = classify(lines, sql)
                entry["class"] = kind
                if kind == "write-on-replica":
                    entry["line"] = why
                    verdict = "write reached a replica"
                elif kind == "stale-read":
                    verdict = "accepted: stale read by design"
                    accepted.append(entry)
                    counts["stale-read"] = counts.get("stale-read", 0) + 1
                    continue
            if verdict is None and k:
                if any(k[1] in line for line in lines):
                    accepted.append(dict(entry, cause=k[0]))
                    counts[k[0]] = counts.get(k[0], 0) + 1
                    continue
                verdict = f"listed ({k[0]}) but its diff lacks: {k[1]}"
            rejected.append(dict(entry, verdict=verdict or "not listed"))
        report[v] = {"sluice_only": only, "accepted": accepted, "rejected": rejected}
        print(f"\n{v}: {len(only)} tests pass directly and fail through sluice;"
              f" accepted {len(accepted)} ({', '.join(f'{c}: {n}' for c, n in sorted(counts.items())) or '-'}),"
              f" UNEXPECTED {len(rejected)}")
        for e in accepted:
            print(f"  accepted   {e['test']:<28} [{e.get('cause', e.get('class'))}] {e['line']}")
        for e in rejected:
            print(f"  UNEXPECTED {e['test']:<28} {e['line']}    <- {e['verdict']}")
        stale = [(vv, t) for (vv, t) in known if vv == v and t not in only]
        for vv, t in sorted(stale):
            print(f"  listed but passing now (remove from the list): {t}")
        if rejected:
            status = 1
    with open(os.path.join(args.out, "comparison.json"), "w") as f:
        json.dump(report, f, indent=1)
    print("\nno unexpected sluice-only failures" if status == 0 else
          "\nFAILED: unexpected sluice-only failures or incomplete runs (see above)")
    return status


if __name__ == "__main__":
    sys.exit(main())
