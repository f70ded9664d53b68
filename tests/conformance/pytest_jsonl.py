"""A pytest plugin that records one outcome per test in the results.jsonl format of
psycopg2_suite.py (`{"event": "start"|"end", "id", "outcome", "reason", "seconds"}`), so that
`psycopg2_suite.py compare` judges a pytest suite (pg8000's) like the unittest ones.

    python -m pytest -p pytest_jsonl --jsonl-out DIR/results.jsonl ...

The outcome of a test is the worst of its phases (setup, call, teardown): an error in setup or
teardown is `error`, a failing call `failure`, a skip `skip`, an xfail `expected_failure`, an
xpass `unexpected_success`. pytest-timeout's failures (its `--timeout`) are recorded as
`timeout`.
"""

import json
import time

SEVERITY = ["success", "expected_failure", "skip", "unexpected_success", "failure", "error",
            "timeout", "crash"]


def pytest_addoption(parser):
    parser.addoption("--jsonl-out", required=True, help="results.jsonl to append to")


_STATE = {}


def pytest_configure(config):
    _STATE.update(path=config.getoption("--jsonl-out"), tests={})


def _emit(rec):
    with open(_STATE["path"], "a") as f:
        f.write(json.dumps(rec) + "\n")


def pytest_runtest_protocol(item, nextitem):
    _STATE["tests"][item.nodeid] = {"outcome": "success", "reason": "",
                                    "started": time.monotonic()}
    _emit({"event": "start", "id": item.nodeid})


def _outcome(report):
    if report.passed:
        if hasattr(report, "wasxfail"):
            return "unexpected_success", "xpass: " + str(report.wasxfail)
        return "success", ""
    if report.skipped:
        if hasattr(report, "wasxfail"):
            return "expected_failure", str(report.wasxfail)
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        return "skip", reason
    text = str(report.longrepr)
    if "Failed: Timeout (>" in text or "+++ Timeout +++" in text:
        return "timeout", "pytest-timeout"
    lines = [line[2:].strip() for line in text.splitlines() if line.startswith("E ")]
    reason = " ".join(lines[:3]) or (text.splitlines() or [""])[-1]
    return ("failure" if report.when == "call" else "error"), reason[:300]


def pytest_runtest_logreport(report):
    state = _STATE["tests"].get(report.nodeid)
    if state is None:
        return
    outcome, reason = _outcome(report)
    if SEVERITY.index(outcome) > SEVERITY.index(state["outcome"]):
        state["outcome"], state["reason"] = outcome, reason
    if report.when == "teardown":
        _emit({"event": "end", "id": report.nodeid, "outcome": state["outcome"],
               "reason": state["reason"],
               "seconds": round(time.monotonic() - state["started"], 3)})
