#!/usr/bin/env python3
"""Judges pg_regress runs through sluice against the direct run (used by pg_regress.sh).

    pg_regress_classify.py --out DIR --variants v1,v2,... [--known FILE] [--sql-dir DIR]

DIR/<variant>/ holds, per run, pg_regress.out (the per-test `ok` / `FAILED` / `failed
(ignored)` lines), regression.diffs, results/ and run.json (exit status, seconds); DIR/direct/
is the run directly against the primary. --sql-dir is the suite's sql/ (its ../expected/ is read
too); default: the newest source under $SLUICE_CONFORMANCE_CACHE (~/.cache/sluice-conformance).
Printed: a pass/fail table per run, then for each variant the tests that fail through sluice but
pass directly, with the decisive line of their diff; for transaction-eventual also the count of
tests per class and a table of stale-read categories (change groups and tests).

A sluice-only failure is accepted when
  * FILE lists it for that variant with a decisive diff line that occurs in its diff (a listed
    test that now fails with a diff lacking that line fails differently: not accepted), or
  * the variant is transaction-eventual and its diff is a stale read by design (rules below).
In transaction-eventual, a diff that shows a write reaching the replica is never accepted, even
when listed. Exit status 1 when some sluice-only failure is not accepted or a run did not
complete (pg_regress exit status other than 0/1, or tests missing from its output).

Classification of transaction-eventual diffs. The discriminator: transaction-eventual differs
from transaction-primary / transaction-ryw (which pass the suite) only in that reads may be
served by a replica that has not replayed the client's last writes yet. So a difference in the
output of a *read* of something the test itself changed is a stale read; anything else (a write's
output, lost session state, a read of nothing the test changed) is not. Conservative: what no
rule below explains is "unexplained" and fails the run. pg_regress diffs an output against the
expected file closest to it, which for an output that stale reads cut short can be another
file than the one the direct run matched (a test's `_1` variant that skips itself); a diff that
is unexplained is therefore judged once more against the direct run's own output, and accepted
only if that diff is a stale read by the same rules. That second diff pairs the two outputs
statement by statement (`statement_diff`), so a change always stays under the statement that
printed it (GNU diff may slide a stale read's rows under a neighbouring write: CI, incremental_sort).

  write-on-replica  any added (+) line says the statement ran on a standby: "read-only
                    transaction", "recovery is in progress", "during recovery", "hot standby",
                    SQLSTATE 25006. Always a failure: sluice must send writes to the primary.
  stale-read        every change group of the diff (a run of -/+ lines) is explained below.
  unexplained       anything else, with the reason, the results line and the statement.

How a change group is judged:
  * Its statement is found in results/<test>.out: psql -a echoes every input line before the
    output, so it is the nearest line above the group that is a line of the test's SQL file,
    with the echoed lines above it back to the previous `;` (outside $$) or backslash command;
    `:name` alone runs the text of the test's `\set name '...'`. Its kind, by the first word:
    read (SELECT, VALUES, TABLE, SHOW, WITH without INSERT/UPDATE/DELETE/MERGE, COPY/\copy ...
    TO STDOUT), explain (EXPLAIN, unless ANALYZE of a write), describe (psql \d..., \z, \l,
    \sf, \sv, \lo_list), else write or meta (writes and psql commands run on the primary: their
    output cannot be stale).
  * The test's own changes: `defined` = every identifier of its CREATE / ALTER / GRANT / REVOKE /
    COMMENT / SECURITY LABEL / IMPORT / REINDEX statements and SELECT ... INTO targets; `written`
    = defined + targets of INSERT INTO / UPDATE / DELETE FROM / COPY / TRUNCATE / MERGE INTO /
    ANALYZE / VACUUM / CLUSTER / REINDEX / REFRESH MATERIALIZED VIEW; an implicit name
    (table_col_seq, table_pkey, table_col_key, _idx, _fkey, _check, _excl) of a name in
    `written` counts as written. `temps` = names the test creates only as TEMP.
  * A read "reads something the test changed" when an identifier of the statement (also inside
    its string literals: 'tab'::regclass, ts_stat('SELECT ... FROM tab')) is in `written`, or it
    reads the cumulative statistics (pg_stat*, pg_statio_*, pg_stat_get_*), or, in a test with
    DDL, it reads the catalogs (pg_*, information_schema, ::reg* casts) or is a describe command
    without an object argument or with a `*` pattern.

Session state a pooler must keep is never staleness; these added lines make the group
"session-state" (unexplained, a pooling bug): prepared statement / cursor / portal / savepoint
"..." does not exist, no such savepoint, ROLLBACK TO/RELEASE SAVEPOINT outside a transaction
block, there is no / already a transaction in progress, unrecognized configuration parameter,
currval/lastval not yet defined in this session, any line naming sluice, "current transaction is
aborted" with no added ERROR earlier in the diff (and savepoint "X" does not exist unless its
SAVEPOINT X failed earlier in the diff, see cascade-aborted), and a missing object (`... does not
exist`) that the test creates only as TEMP (temp objects never reach a replica: a pinning bug). A
read of
a setting (SHOW, current_setting(), pg_settings) that differs is unexplained (a SET not in effect),
as is any added or removed line about privileges ("permission denied", "must be owner", "must be
superuser", "must be a member", "must have ... privilege", "row-level security": a lost SET ROLE
looks the same as a GRANT not yet replayed).

Stale-read categories of a change group (cascades are differences that follow from an earlier
stale read of the same test):
  missing-object      a read, explain or describe whose added errors are `... does not exist`
                      (relation, type, function, schema, role, collation, text search object,
                      ...: any name in it, last name component, argument list dropped, the
                      multirange type of a range type counted as the range type, must be in
                      `written`), `cannot cast type A to B` (A or B in `written`), `operator does
                      not exist: ... OP ...` (the test has CREATE OPERATOR OP), with their
                      LINE/caret/DETAIL/HINT/CONTEXT lines; removed lines: the output the
                      statement had directly. The replica has not replayed the CREATE yet.
                      (psql's `Did not find any relation named "..."` is describe output.)
  stale-catalog-error a read of something the test changed whose added error is one of parse
                      analysis or object state that an older catalog gives: column ... does not
                      exist, ... is only a shell, materialized view ... has not been populated,
                      ORDER BY position N is not in select list, cannot subscript type,
                      could not find array type, could not identify an operator/function for
                      type, column ... is of type ... but expression is of type, operator/function
                      is not unique, could not determine polymorphic type, invalid input
                      value for enum (a label ALTER TYPE ... ADD VALUE just added).
  error-of-older-state a read of something the test changed whose added error occurs verbatim
                      in the test's expected output (an error the test provokes itself at
                      another step: the replica is still in that state, e.g. a domain
                      constraint dropped since).
  rows                a read of something the test changed with no added error: rows missing,
                      extra or changed, other row counts, column widths.
  error-not-raised    as rows, and the removed lines hold the ERROR the test expects (the
                      replica lacks the constraint, type or data that raises it).
  plan                an EXPLAIN of something the test changed whose plan differs (indexes,
                      ANALYZE statistics, constraints not replayed yet).
  describe            a describe command (\d ...) of something the test changed whose output
                      differs (the replica shows the object before the test's ALTER).
  replica-stats       a read of the cumulative statistics views/functions whose values differ:
                      a standby keeps its own statistics, not the primary's.
  catalog-race        a read or describe failing with `cache lookup failed for ...` or `could
                      not open relation with OID N`: the read saw a catalog row (pg_indexes, \d's
                      queries) of an object that the replica's replay of the test's DDL dropped
                      before the read opened it; or the planner's `could not find commutator
                      for operator N` (an internal planner error, seen in equivclass only on the
                      replica, planning over expression indexes it was still replaying).
  replay-conflict     a read cancelled by WAL replay: `canceling statement due to conflict with
                      recovery`, or `deadlock detected` where the client's process waits for an
                      AccessShareLock (a read's only lock; on a standby only the startup
                      process replaying an AccessExclusiveLock can be the other side).
  cascade-gset        a statement using a psql variable (:name, :'name') set by a \gset whose
                      group had an added ERROR or "no rows returned for \gset" (any added errors
                      accepted), or set by any \gset of the test when the added errors are all
                      `syntax error at or near ":..."` (the \gset read NULL from the replica and
                      psql unset the variable), or a write using a variable of any \gset of
                      the test whose output has no added or removed error.
  cascade-aborted     added errors are only `current transaction is aborted, commands ignored
                      until end of transaction block`, after an added ERROR earlier in the diff
                      (the statement that failed in that transaction block), or `savepoint "X"
                      does not exist` where `SAVEPOINT X` itself failed earlier in the diff (it
                      was ignored in the aborted transaction, so X was never made).
Removed NOTICE/WARNING/INFO lines are accepted only in a missing-object group (a statement that
failed prints none); anywhere else, and any added NOTICE/WARNING/other ERROR, they are unexplained.

  fresh-read-passes   staleness by elimination, the last resort: a read whose added error or
                      removed notice matches none of the patterns above ("unexplained-read"),
                      in a test that passes in the same run's transaction-ryw (the same pooling
                      and session tracking; only the freshness of reads differs), with no
                      write-on-replica marker and no session-state or other hard finding in
                      its diff. Counted apart, so that new patterns show and can get a rule.
"""

import argparse
import difflib
import glob
import json
import os
import re
import sys

STATUS_RE = re.compile(r"^(?:test |     |ok \d+\s+[-+] |not ok \d+\s+[-+] )\s*(\S+)\s+\.\.\. "
                       r"(ok|FAILED|failed \(ignored\))")
DIFF_HEAD_RE = re.compile(r"^diff (?:-\S+ )*(\S+) (\S+)$")
HUNK_RE = re.compile(r"^@@ -(\d+)(?:,\d+)? \+(\d+)(?:,\d+)? @@")
WRITE_ON_REPLICA = re.compile(
    r"read-only transaction|recovery is in progress|during recovery|hot standby|\b25006\b",
    re.I)
# Session state a pooler must keep for its client: its loss is a pooling bug, never staleness.
SESSION_LOST = re.compile(
    r'^(?:ERROR|WARNING):  (?:prepared statement "[^"]*" does not exist|cursor "[^"]*" does not '
    r'exist|portal "[^"]*" does not exist|savepoint "[^"]*" does not exist|'
    r'(?:ROLLBACK TO|RELEASE) SAVEPOINT can only be used in transaction blocks|no such savepoint|'
    r'there is no transaction in progress|there is already a transaction in progress|'
    r'currval of sequence "[^"]*" is not yet defined in this session|lastval is not yet defined|'
    r'unrecognized configuration parameter)|sluice', re.I)
ABORTED = "ERROR:  current transaction is aborted, commands ignored until end of transaction block"
MESSAGE_RE = re.compile(r"^(ERROR|WARNING|NOTICE|INFO|DETAIL|HINT|CONTEXT|QUERY|FATAL|PANIC|"
                        r"LOG|DEBUG\d?|STATEMENT|LOCATION):  ")
CONTEXT_RE = re.compile(r"^(LINE \d+: |\s*\^\s*$|DETAIL:  |HINT:  |CONTEXT:  |QUERY:  |"
                        r"(?:PL/pgSQL|SQL) function |SQL statement )")
ROWS_RE = re.compile(r"^\((\d+) rows?\)$")
# psql's own outcome lines of a read (part of its result, not a server message)
PSQL_RESULT_RE = re.compile(r"^(no rows returned for \\gset|more than one row returned for \\gset|"
                            r"\\crosstabview: |Did not find any relation named )")
MISSING_RE = re.compile(r"^ERROR:  (.*) does not exist(?:, skipping)?$|"
                        r"^Did not find any relation named \"(.*)\"\.?$")
CAST_RE = re.compile(r"^ERROR:  cannot cast type (.+) to (.+)$")
OPERATOR_RE = re.compile(r"^ERROR:  operator does not exist: (.*)$")
RACE_RE = re.compile(r"^ERROR:  (cache lookup failed for |could not open relation with OID \d+$|"
                     r"could not find commutator for operator \d+$)")
# a standby query cancelled by WAL replay (recovery conflict), or in a lock deadlock with the
# startup process (a read takes only AccessShareLock: on a standby only replay can block it)
REPLAY_CONFLICT_RE = re.compile(r"^ERROR:  (canceling statement due to conflict with recovery|"
                                r"deadlock detected)$")
# errors of parse analysis or of an object's state: a catalog older than the test's DDL
STALE_CATALOG_RE = re.compile(
    r"^ERROR:  (column .* does not exist|.* is only a shell|materialized view .* has not been "
    r"populated|ORDER BY position \d+ is not in select list|cannot subscript type .*|could not "
    r"find array type for data type .*|could not identify an? .*(operator|function) for type .*|"
    r"column .* is of type .* but expression is of type .*|operator is not unique: .*|"
    r"function .* is not unique|could not determine polymorphic type .*|"
    r"invalid input value for enum .*)$")
NAME = r"(?:\"[^\"]+\"|[\w$]+)(?:\.(?:\"[^\"]+\"|[\w$]+))?"  # an SQL name, maybe qualified
DDL_FIRST = {"create", "alter", "grant", "revoke", "comment", "security", "import", "reindex"}
STATS_RE = re.compile(r"\bpg_stat|\bpg_statio_|\bpg_stat_get_", re.I)
PRIVILEGE_RE = re.compile(r"permission denied|must be owner|must be superuser|must be a member|"
                          r"must have .* privilege|row-level security", re.I)
SETTING_RE = re.compile(r"^\s*show\b|\bcurrent_setting\s*\(|\bpg_settings\b", re.I)


def _words(text):
    """Identifiers in SQL text, lower case ("a""b" -> a"b)."""
    out = set()
    for q, w in re.findall(r'"((?:[^"]|"")+)"|([A-Za-z_][\w$]*)', text):
        out.add((q.replace('""', '"') if q else w).lower())
    return out


def _statements(sql):
    """The test's SQL split into statements (roughly: at a line ending with `;` and around psql
    backslash-command lines), comments dropped."""
    out, cur = [], []
    for line in sql.split("\n"):
        s = _strip_comment(line).strip()
        if s.startswith("\\"):
            out += ["\n".join(cur), s]
            cur = []
            continue
        cur.append(s)
        if s.endswith(";") or re.search(r"\\g\w*(\s+\w+)?$", s):
            out.append("\n".join(cur))
            cur = []
    out.append("\n".join(cur))
    return [s.strip() for s in out if s.strip()]


def test_names(sql):
    """(defined, temps, gset_vars, set_vars, written) of a test's SQL: `defined` holds every
    identifier of its CREATE/ALTER/GRANT/REVOKE/COMMENT/SECURITY/IMPORT/REINDEX statements and the
    targets of SELECT ... INTO (objects the test makes or changes); `temps` the names it creates
    only as TEMP; `gset_vars` the psql variables a `\\gset` sets ("*" or a prefix when the
    columns are not named with AS); `set_vars` {name: text} of `\\set name 'text'`; `written`:
    `defined` and the targets of INSERT/UPDATE/DELETE/COPY/TRUNCATE/MERGE/ANALYZE/VACUUM/CLUSTER/
    REINDEX/REFRESH."""
    defined, temps, plain = set(), set(), set()
    for st in _statements(sql):
        first = re.match(r"[A-Za-z]+", st.lstrip("( "))
        first = first.group(0).lower() if first else ""
        if first in DDL_FIRST:
            defined |= _words(st)
        m = re.search(r"\binto\s+(?:(?:temp|temporary|unlogged)\s+)?(?:table\s+)?(" + NAME + ")",
                      st, re.I)
        if first in ("select", "with") and m:
            defined |= _words(m.group(1))
    for m in re.finditer(
            r"\bcreate\s+(?:or\s+replace\s+)?((?:global\s+|local\s+)?(?:temp|temporary|unlogged)\s+)?"
            r"(?:recursive\s+)?(?:materialized\s+)?(?:table|view|sequence)\s+"
            r"(?:if\s+not\s+exists\s+)?(" + NAME + ")", sql, re.I):
        name = m.group(2).split(".")[-1].strip('"').lower()
        (temps if m.group(1) and re.search(r"temp", m.group(1), re.I) else plain).add(name)
    gset = set()
    for m in re.finditer(r"^(.*)\\gset(?:[ \t]+(\w+))?[ \t]*$", sql, re.M | re.I):
        prefix = (m.group(2) or "").lower()
        gset |= {prefix + w for w in re.findall(r"\bas\s+(\w+)", m.group(1), re.I)}
        gset.add(prefix or "*")  # a \gset with unnamed columns sets names we cannot see
    setv = {}
    for m in re.finditer(r"^\\set\s+(\w+)\s+'((?:[^']|'')*)'", sql, re.M):
        setv.setdefault(m.group(1), m.group(2).replace("''", "'"))
    written = set(defined)
    for m in re.finditer(
            r"\b(?:insert\s+into|update(?!\s+set\b)|delete\s+from|copy|truncate(?:\s+table)?|"
            r"merge\s+into|analy[sz]e|vacuum(?:\s*\([^)]*\))?(?:\s+(?:full|freeze|verbose|analyze))*|"
            r"cluster|reindex\s+\w+(?:\s+concurrently)?|"
            r"refresh\s+materialized\s+view(?:\s+concurrently)?)\s+(?:only\s+)?(" + NAME + ")",
            sql, re.I):
        written |= _words(m.group(1))
    return defined, temps - plain, gset, setv, written


CATEGORY_ORDER = ["missing-object", "stale-catalog-error", "error-of-older-state", "rows",
                  "error-not-raised", "plan", "describe", "replica-stats", "catalog-race",
                  "replay-conflict", "cascade-gset", "cascade-aborted"]


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
    """{test: [lines...]} from regression.diffs (one `diff -U3 expected results` block per failed
    test; the lines after its two file headers, @@ lines included)."""
    diffs, cur, heads = {}, None, 0
    if not os.path.exists(path):
        return diffs
    with open(path, errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            m = DIFF_HEAD_RE.match(line)
            if m:
                cur = os.path.splitext(os.path.basename(m.group(2)))[0]
                diffs[cur], heads = [], 2
            elif heads and line.startswith(("--- ", "+++ ")):
                heads -= 1
            elif cur is not None:
                heads = 0
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


def groups(lines):
    """Change groups: maximal runs of -/+ lines, with the results-file line number (1-based) where
    each starts ("new") and the expected-file one ("old")."""
    out, cur, old, new = [], None, 0, 0
    for line in lines:
        m = HUNK_RE.match(line)
        if m:
            old, new, cur = int(m.group(1)), int(m.group(2)), None
            continue
        if line[:1] in ("+", "-"):
            if cur is None:
                cur = {"old": old, "new": new, "removed": [], "added": []}
                out.append(cur)
            if line[0] == "+":
                cur["added"].append(line[1:])
                new += 1
            else:
                cur["removed"].append(line[1:])
                old += 1
        elif line.startswith(" ") or line == "":
            cur = None
            old += 1
            new += 1
    return out


def _blocks(lines, sqlset):
    """[(echoed input lines, output lines, 1-based line of the first output line)]: psql -a
    echoes every input line before running it, so an output file is a sequence of echoed
    statements (cut where a line ends one, as in `statement`), each followed by what it
    printed."""
    out = []
    for n, line in enumerate(lines, 1):
        if line.strip() and line.rstrip() in sqlset:
            if out and not out[-1][1] and out[-1][0] and not (
                    _ends(out[-1][0][-1]) and sum(x.count("$$") for x in out[-1][0]) % 2 == 0):
                out[-1][0].append(line)
                out[-1][2] = n + 1
                continue
            out.append([[line], [], n + 1])
        elif out:
            out[-1][1].append(line)
        else:
            out.append([[], [line], n])
    return out


def statement_diff(oracle, results, sql):
    """Unified-diff lines of `results` against `oracle` (two outputs of the same test), aligned
    statement by statement rather than line by line: both files are cut at their echoed input,
    the statements are paired by their text, and only the outputs of paired statements are
    diffed, one change group per statement. A line diff of two outputs that differ a lot (a
    stale read's rows) can pair lines of neighbouring statements and so put a read's change
    under a write that prints nothing; this cannot."""
    sqlset = {line.rstrip() for line in sql.split("\n") if line.strip()}
    a, b = _blocks(oracle, sqlset), _blocks(results, sqlset)
    out = []

    def group(old, new, removed, added):
        if removed or added:
            out.append(f"@@ -{old},{len(removed)} +{new},{len(added)} @@")
            out.extend("-" + r for r in removed)
            out.extend("+" + x for x in added)
    keys = difflib.SequenceMatcher(None, [tuple(x[0]) for x in a], [tuple(x[0]) for x in b],
                                   autojunk=False)
    for op, i1, i2, j1, j2 in keys.get_opcodes():
        if op != "equal":  # input echoed in one output only (an output line equal to an input line)
            old = a[i1][2] if i1 < len(a) else len(oracle) + 1
            new = b[j1][2] if j1 < len(b) else len(results) + 1
            group(old, new, [l for x in a[i1:i2] for l in x[0] + x[1]],
                  [l for x in b[j1:j2] for l in x[0] + x[1]])
            continue
        for x, y in zip(a[i1:i2], b[j1:j2]):
            if x[1] == y[1]:
                continue
            removed, added = [], []
            lines = difflib.SequenceMatcher(None, x[1], y[1], autojunk=False)
            for o, k1, k2, l1, l2 in lines.get_opcodes():
                if o != "equal":
                    removed += x[1][k1:k2]
                    added += y[1][l1:l2]
            group(x[2], y[2], removed, added)
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


def _strip_comment(line):
    """A line without its `/* */` comments and its trailing `--` comment (approximate: no quote
    may open before it)."""
    line = re.sub(r"/\*.*?\*/", " ", line)
    i = line.find("--")
    if i >= 0 and line[:i].count("'") % 2 == 0:
        return line[:i]
    return line


def _ends(line):
    """Whether an input line ends a statement: `;` or a psql backslash command (\\g...)."""
    s = _strip_comment(line).strip()
    return s.endswith(";") or s.startswith("\\") or re.search(r"\\(g\w*|crosstabview)\b", s)


def statement(results, start, sqlset):
    """The input (SQL statement or psql command) whose output holds the change group starting at
    results line `start`: psql -a echoes every input line before running it, so it is the
    nearest echoed input line above the group (a line of the test's SQL file) and the echoed
    lines above that one, back to the end of the previous statement (`;` outside $$, a psql
    backslash command) or to output. Comment lines are dropped."""
    i = start - 2
    while i >= 0 and not (results[i].strip() and results[i].rstrip() in sqlset):
        i -= 1
    if i < 0:
        return ""
    text, j = [results[i]], i
    while j > 0 and (not results[j - 1].strip() or results[j - 1].rstrip() in sqlset):
        if _ends(results[j - 1]) and sum(t.count("$$") for t in text) % 2 == 0:
            break
        j -= 1
        text.insert(0, results[j])
    return "\n".join(l for l in text if l.strip() and not l.lstrip().startswith("--"))


def stmt_kind(st):
    """read | explain | describe | write | meta | unknown (by its first word)."""
    s = "\n".join(_strip_comment(l) for l in st.split("\n")).strip()
    s = s.lower().lstrip("( \t\n")
    if not s:
        return "unknown"
    if s.startswith("\\"):
        if re.match(r"\\copy\b.*\bto\s+(stdout|pstdout)\b", s):
            return "read"
        return "describe" if re.match(r"\\(d|z\b|l\b|sf|sv|lo_list)", s) else "meta"
    first = re.match(r"[a-z_]+", s)
    first = first.group(0) if first else ""
    if first == "explain":
        return "write" if re.search(r"\banalyze\b", s) and re.search(
            r"\b(insert|update|delete|merge)\b", s) else "explain"
    if first in ("select", "values", "table", "show"):
        return "read"
    if first == "with":
        return "write" if re.search(r"\b(insert|update|delete|merge)\b", s) else "read"
    if first == "copy":
        return "read" if re.search(r"\bto\s+stdout\b", s) else "write"
    return "write"


def missing_names(line):
    """Object names an `... does not exist` line refers to (last name component, lower case,
    without an argument list)."""
    m = MISSING_RE.match(line)
    text = m.group(1) or m.group(2)
    names = [q.replace('""', '"') for q in re.findall(r'"((?:[^"]|"")+)"', text)]
    names += re.findall(r'"(.+)"', text)  # role "a"b" (the name is printed without doubled quotes)
    if not names:  # function f(integer) does not exist, column t.x does not exist
        names = [re.sub(r"\(.*\)$", "", text).split()[-1]]
    out = {re.sub(r"\(.*$", "", n).split(".")[-1].lower() for n in names if n}
    # the multirange type made with a range type: xrange -> xmultirange, x -> x_multirange
    out |= {re.sub(r"_?multirange", "range", n) for n in out if "multirange" in n}
    out |= {n[:-len("_multirange")] for n in out if n.endswith("_multirange")}
    return out


READ_KINDS = ("read", "explain", "describe")
IMPLICIT_SUFFIX = re.compile(r"^(.+?)_(?:\w+_)?(?:seq|pkey|key|idx|fkey|check|excl|not_null)$")


def test_made(names, ctx):
    """The names the test makes or changes: in ctx["written"], or an implicit name (sequence,
    index, constraint: table_col_seq, table_pkey, ...) of a table in it."""
    out = set()
    for n in names:
        m = IMPLICIT_SUFFIX.match(n)
        if n in ctx["written"] or m and any(n.startswith(w + "_") for w in ctx["written"]):
            out.add(n)
    return out


def statement_words(st):
    """Identifiers of a statement, also inside its string literals ('tab'::regclass, ts_stat('SELECT
    ...')), and their last dotted components."""
    words = _words(st.replace("'", " "))
    return words | {w.split(".")[-1] for w in words}


def classify_group(g, st, kind, ctx):
    """(category, why) of one change group; categories in the module docstring."""
    added, removed = g["added"], g["removed"]
    # a savepoint whose SAVEPOINT failed earlier in this diff (its transaction was aborted)
    lost_sp = set()
    for a in added:
        m = re.match(r'ERROR:  savepoint "([^"]*)" does not exist$', a)
        if m and m.group(1).lower() in ctx["failed_savepoints"]:
            lost_sp.add(a)
    for a in added:
        if SESSION_LOST.search(a) and a not in lost_sp:
            return "session-state", "+" + a
        if a == ABORTED and not ctx["errors"]:
            return "session-state", "+" + a + " (no earlier error in the diff)"
    errors_added = [a for a in added if MESSAGE_RE.match(a) and not CONTEXT_RE.match(a)]
    msgs_removed = [r for r in removed if MESSAGE_RE.match(r) and not CONTEXT_RE.match(r)]
    used = {v.lower() for v in re.findall(r"(?<![:\w]):(?![:=])['\"]?([A-Za-z_]\w*)", st)}
    if (ABORTED in added or lost_sp) and all(a == ABORTED or a in lost_sp for a in errors_added):
        return "cascade-aborted", ""
    failed = ctx["failed_gset"]
    if errors_added and (used & failed or ("*" in failed and used & ctx["gset"])):
        return "cascade-gset", ""
    if errors_added and (used & ctx["gset"] or "*" in ctx["gset"] and used) and all(
            re.match(r'ERROR:  syntax error at or near ":', a) for a in errors_added):
        return "cascade-gset", ""  # the \gset read a NULL: psql unset the variable
    if kind not in READ_KINDS:
        if used & ctx["gset"] and not errors_added and not msgs_removed:
            return "cascade-gset", ""
        return "unexplained", f"the output of a {kind} differs (writes run on the primary)"
    if SETTING_RE.search(st):
        return "unexplained", "a session setting read differs"
    for line in added + removed:
        if PRIVILEGE_RE.search(line):
            return "unexplained", ("+" if line in added else "-") + line
    words = statement_words(st)
    reads_changed = bool(test_made(words, ctx)) or bool(STATS_RE.search(st)) or bool(
        ctx["defined"] and (re.search(r"\bpg_\w+|information_schema|::reg\w+", st, re.I) or
                            kind == "describe" and (not re.search(r"\s\S", st.strip()) or
                                                    "*" in st)))
    category = None
    for a in errors_added:
        if MISSING_RE.match(a) and not re.match(r"ERROR:  column ", a):
            names = missing_names(a)
            if names & ctx["temps"]:
                return "session-state", "+" + a + " (a TEMP object)"
            if not test_made(names, ctx):
                return "unexplained", "+" + a + " (not an object the test makes or changes)"
            category = "missing-object"
        elif CAST_RE.match(a):
            types = {t.split(".")[-1].strip('"').lower() for t in CAST_RE.match(a).groups()}
            if not test_made(types, ctx):
                return "unexplained", "+" + a + " (no type of the test)"
            category = "missing-object"
        elif OPERATOR_RE.match(a):
            ops = re.findall(r"[-+*/<>=~!@#%^&|`?]+", OPERATOR_RE.match(a).group(1))
            if not any(re.search(r"\bcreate\s+operator\s+(?:\w+\.)?" + re.escape(o) + r"\s*\(",
                                 ctx["sql"], re.I) for o in ops):
                return "unexplained", "+" + a + " (no operator of the test)"
            category = "missing-object"
        elif RACE_RE.match(a):
            category = category or "catalog-race"
        elif REPLAY_CONFLICT_RE.match(a):
            detail = [x for x in added if x.startswith("DETAIL:  Process ")]
            if a.endswith("deadlock detected") and not (
                    detail and re.match(r"DETAIL:  Process \d+ waits for AccessShareLock ", detail[0])):
                return "unexplained", "+" + a + " (not a read waiting for AccessShareLock)"
            category = category or "replay-conflict"
        elif a in ctx["expected"] and reads_changed:
            category = category or "error-of-older-state"
        elif STALE_CATALOG_RE.match(a):
            if not reads_changed:
                return "unexplained", "+" + a + " (on nothing the test changes)"
            category = category or "stale-catalog-error"
        else:
            return "unexplained-read", "+" + a
    for r in msgs_removed:
        if not re.match(r"^(ERROR|DETAIL|HINT):  ", r):
            if category != "missing-object":  # a statement that failed prints no notices
                return "unexplained-read", "-" + r
    if category:
        return category, ""
    # the output can be stale only if it comes from something the test changed: a relation,
    # type or function it creates, alters or writes, the catalogs (after its DDL) or the
    # cumulative statistics views
    if not reads_changed:
        return "unexplained", f"the output of a {kind} of nothing the test changes differs"
    if kind == "explain":
        return "plan", ""
    if kind == "describe":
        return "describe", ""
    if any(r.startswith("ERROR:  ") for r in msgs_removed):
        return "error-not-raised", ""
    if STATS_RE.search(st):
        return "replica-stats", ""
    return "rows", ""


def classify(lines, sql, results, expected=()):
    """("write-on-replica" | "stale-read" | "unexplained", why, [group categories]); `expected`
    holds the lines of the test's expected output files."""
    for line in lines:
        if line.startswith("+") and WRITE_ON_REPLICA.search(line):
            return "write-on-replica", line, []
    if sql is None or results is None:
        return "unexplained", "no SQL file or results file to read the diff against", []
    defined, temps, gset, setv, written = test_names(sql)
    ctx = {"defined": defined, "temps": temps, "gset": gset, "failed_gset": set(),
           "written": written,
           "failed_savepoints": set(),
           "errors": 0, "sql": sql,
           "expected": {line for line in expected if line.startswith("ERROR:  ")}}
    sqlset = {line.rstrip() for line in sql.split("\n") if line.strip()}
    cats = []
    for g in groups(lines):
        st = statement(results, g["new"], sqlset)
        v = re.match(r"\s*:(\w+)", st)
        if v and v.group(1) in setv:  # :show_data; runs the text of \set show_data '...'
            st = setv[v.group(1)] + st[v.end():]
        kind = stmt_kind(st)
        cat, why = classify_group(g, st, kind, ctx)
        if cat == "unexplained-read":
            one = re.sub(r"\s+", " ", st)[:80]
            return "unexplained-read", f"{why} [results line {g['new']}: {one}]", cats
        if cat in ("unexplained", "session-state"):
            one = re.sub(r"\s+", " ", st)[:80]
            return "unexplained", f"{cat}: {why} [results line {g['new']}: {one}]", cats
        cats.append(cat)
        if any(a.startswith("ERROR:  ") for a in g["added"]):
            ctx["errors"] += 1
            sp = re.match(r"\s*savepoint\s+(\w+)", st, re.I)
            if sp:
                ctx["failed_savepoints"].add(sp.group(1).lower())
        if re.search(r"\\gset\b", st) and any(a.startswith("ERROR:  ") or
                                             a.startswith("no rows returned for") for a in g["added"]):
            m = re.search(r"\\gset(?:[ \t]+(\w+))?", st)
            prefix = (m.group(1) or "").lower()
            names = {prefix + w.lower() for w in re.findall(r"\bas\s+(\w+)", st, re.I)}
            ctx["failed_gset"] |= names or {"*"}
    return "stale-read", "", cats


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
    if not sql_dir:
        cache = os.environ.get("SLUICE_CONFORMANCE_CACHE",
                               os.path.expanduser("~/.cache/sluice-conformance"))
        found = sorted(glob.glob(os.path.join(cache, "src", "*", "src", "test", "regress", "sql")))
        sql_dir = found[-1] if found else None
    report = {}
    for v in variants:
        st, diffs = runs[v]["status"], runs[v]["diffs"]
        only = sorted(t for t in direct if direct[t] == "ok" and st.get(t, "missing") != "ok")
        accepted, rejected, counts = [], [], {}
        hunk_counts = {}  # transaction-eventual: category -> [change groups, tests]
        classes = {"stale-read": 0, "write-on-replica": 0, "unexplained": 0}
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
                results = None
                res_path = os.path.join(args.out, v, "results", t + ".out")
                if os.path.exists(res_path):
                    with open(res_path, errors="replace") as f:
                        results = f.read().split("\n")
                expected = []
                for path in glob.glob(os.path.join(sql_dir or "", "..", "expected", t + ".out")) + \
                        glob.glob(os.path.join(sql_dir or "", "..", "expected", t + "_[0-9].out")):
                    with open(path, errors="replace") as f:
                        expected += f.read().split("\n")
                kind, why, cats = classify(lines, sql, results, expected)
                if kind in ("unexplained", "unexplained-read") and results is not None:
                    # pg_regress diffs against the expected file closest to the output, which
                    # for an output that stale reads cut short can be another variant's (the
                    # `_1` file of a test that skipped itself): then its first hunk is that
                    # other variant's. The direct run's own output is the oracle: classified
                    # against it instead, the diff holds only what sluice changed.
                    direct_res = os.path.join(args.out, "direct", "results", t + ".out")
                    if os.path.exists(direct_res):
                        with open(direct_res, errors="replace") as f:
                            oracle = f.read().split("\n")
                        again = statement_diff(oracle, results, sql or "")
                        k2, why2, cats2 = classify(again, sql, results, expected)
                        if k2 == "stale-read":
                            kind, why, cats, lines = k2, why2, cats2, again
                            entry["line"] = decisive(again) + " (diffed against the direct run)"
                entry["class"] = kind
                for c in set(cats):
                    hunk_counts.setdefault(c, [0, 0])[1] += 1
                for c in cats:
                    hunk_counts[c][0] += 1
                if kind == "write-on-replica":
                    entry["line"] = why
                    verdict = "write reached a replica"
                    classes["write-on-replica"] += 1
                elif kind == "unexplained-read" and "transaction-ryw" in runs and \
                        runs["transaction-ryw"]["status"].get(t) == "ok":
                    # staleness by elimination: same pooling, reads that wait for the
                    # client's own writes, and the test passes
                    verdict = "accepted: stale read by elimination"
                    entry["categories"] = sorted(set(cats) | {"fresh-read-passes"})
                    entry["line"] = why
                    accepted.append(entry)
                    counts["stale-read"] = counts.get("stale-read", 0) + 1
                    classes["stale-read"] += 1
                    hunk_counts.setdefault("fresh-read-passes", [0, 0])
                    hunk_counts["fresh-read-passes"][0] += 1
                    hunk_counts["fresh-read-passes"][1] += 1
                    continue
                elif kind == "stale-read":
                    verdict = "accepted: stale read by design"
                    entry["categories"] = sorted(set(cats))
                    accepted.append(entry)
                    counts["stale-read"] = counts.get("stale-read", 0) + 1
                    classes["stale-read"] += 1
                    continue
                else:
                    entry["why"] = why
                    classes["unexplained"] += 1
            if verdict is None and k:
                if any(k[1] in line for line in lines):
                    accepted.append(dict(entry, cause=k[0]))
                    counts[k[0]] = counts.get(k[0], 0) + 1
                    continue
                verdict = f"listed ({k[0]}) but its diff lacks: {k[1]}"
            if verdict is None and entry.get("why"):
                verdict = entry["why"]
            rejected.append(dict(entry, verdict=verdict or "not listed"))
        print(f"\n{v}: {len(only)} tests pass directly and fail through sluice;"
              f" accepted {len(accepted)} ({', '.join(f'{c}: {n}' for c, n in sorted(counts.items())) or '-'}),"
              f" UNEXPECTED {len(rejected)}")
        for e in accepted:
            cause = e.get("cause") or "/".join(e.get("categories") or [e.get("class", "")])
            print(f"  accepted   {e['test']:<28} [{cause}] {e['line']}")
        for e in rejected:
            print(f"  UNEXPECTED {e['test']:<28} {e['line']}    <- {e['verdict']}")
        if v == "transaction-eventual" and only:
            ok = sum(1 for o in st.values() if o == "ok")
            print(f"\n  {v} classes: ok {ok}, stale-read {classes['stale-read']},"
                  f" write-on-replica {classes['write-on-replica']},"
                  f" unexplained {classes['unexplained']}")
            title = "stale-read category (change groups of classified diffs)"
            print(f"  {title:<58} {'groups':>6} {'tests':>6}")
            for c in CATEGORY_ORDER + sorted(set(hunk_counts) - set(CATEGORY_ORDER)):
                if c in hunk_counts:
                    print(f"  {c:<58} {hunk_counts[c][0]:>6} {hunk_counts[c][1]:>6}")
            report_classes = dict(classes, ok=ok, categories=hunk_counts)
        else:
            report_classes = None
        report[v] = {"sluice_only": only, "accepted": accepted, "rejected": rejected}
        if report_classes:
            report[v]["classes"] = report_classes
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


def self_test():
    """Checks of statement_diff on a small made-up test (run by pg_regress.sh before the suite)."""
    sql = "create table t (a int);\ninsert into t values (1), (2);\nselect a from t;\n" \
          "delete from t;\nselect a from t;\n"
    direct = ["create table t (a int);", "insert into t values (1), (2);", "select a from t;",
              " a ", "---", " 1", " 2", "(2 rows)", "", "delete from t;", "select a from t;",
              " a ", "---", "(0 rows)", ""]
    # the first read stale (no rows yet): a line diff may pair its lost rows with the second
    # read's output, under the DELETE between them; statement by statement they stay the read's
    stale = direct[:5] + ["(0 rows)", ""] + direct[9:]
    diff = statement_diff(direct, stale, sql)
    assert diff == ["@@ -4,3 +4,1 @@", "- 1", "- 2", "-(2 rows)", "+(0 rows)"], diff
    assert statement(stale, 4, {l for l in sql.split("\n") if l}) == "select a from t;"
    assert classify(diff, sql, stale)[:2] == ("stale-read", ""), classify(diff, sql, stale)
    # what a write prints is never a stale read
    failed = direct[:10] + ["ERROR:  deadlock detected"] + direct[10:]
    kind, why, _ = classify(statement_diff(direct, failed, sql), sql, failed)
    assert kind == "unexplained" and "delete from t;" in why, (kind, why)
    # an output line equal to an input line (a stray echo) cuts the output differently: what
    # lands under the write stays unexplained (conservative)
    odd = direct[:6] + ["delete from t;"] + direct[7:]
    assert classify(statement_diff(direct, odd, sql), sql, odd)[0] == "unexplained"
    print("pg_regress_classify self-test: ok")
    return 0


if __name__ == "__main__":
    sys.exit(self_test() if sys.argv[1:] == ["--self-test"] else main())
