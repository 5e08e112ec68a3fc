"""pytest hooks for a student copy of sagan (course/make_copy.py appends them to its conftest.py).

Each blank raises NotImplementedError("exercise NAME: ..."). The checks of exercise NAME are the
tests marked NAME (`python -m pytest -q test_sagan.py -m NAME`): when one of them stops at a blank
of its own, it fails, and the message names the exercise. Every other test that stops at a blank,
of a later exercise or of one the check builds on, is not wrong, only waiting: it is reported as
skipped, naming the exercise it needs. So the whole suite fails only on the checks of exercises
still blank (or done wrong), and once every blank is filled in, nothing is skipped. A check that
fails on a wrong answer shows its message alone: the exercise and the likely mistake; one that
the student's code makes raise shows the error and the line, in one line.

The teaching kit's own tests (marker `course`) are left out: the kit is not part of this copy.
"""

import os
import re
from collections import Counter

import pytest

BLANK = re.compile(r"NotImplementedError: exercise (\w+):")
waiting = Counter()  # exercise -> tests skipped until it is done


def exercises(config):
    """The exercise markers: those pytest.ini describes as exercise checks."""
    return {line.split(":")[0].strip() for line in config.getini("markers") if "exercise check" in line}


def pytest_collection_modifyitems(config, items):
    kit = [item for item in items if item.get_closest_marker("course")]
    if kit:
        config.hook.pytest_deselected(items=kit)
        items[:] = [item for item in items if not item.get_closest_marker("course")]


def blank_hit(call, report):
    """The exercise whose blank stopped the test, or None: from the exception itself, else from
    the report's text (a blank hit in a subprocess shows up in the output it printed)."""
    if call.excinfo is not None and call.excinfo.errisinstance(NotImplementedError):
        found = re.match(r"exercise (\w+):", str(call.excinfo.value))
        if found:
            return found.group(1)
    texts = [report.longreprtext] + [text for _, text in report.sections]
    found = [m.group(1) for text in texts for m in BLANK.finditer(text)]
    return found[-1] if found else None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if not report.failed:
        return
    name = blank_hit(call, report)
    checks = [mark.name for mark in item.iter_markers() if mark.name in exercises(item.config)]
    if name is None and checks and call.excinfo is not None:
        if call.excinfo.errisinstance(AssertionError):
            # A check's assertion: its message alone, which names the exercise and the likely
            # mistake, without pytest's listing of the values it compared.
            message = str(call.excinfo.value).split("\nassert ")[0]
            if message.startswith(f"{checks[0]}: "):
                report.longrepr = message
        elif call.excinfo.errisinstance(Exception):
            # The student's code raised: one line, the error and where, not a long traceback.
            error = call.excinfo.value
            where = [e for e in call.excinfo.traceback if not os.path.basename(str(e.path)).startswith("test_")
                     and os.path.dirname(str(e.path)) == str(item.config.rootpath)]
            place = f" at {os.path.basename(str(where[-1].path))}:{where[-1].lineno + 1}" if where else ""
            first = (str(error).strip().splitlines() or [""])[0]
            report.longrepr = f"{checks[0]}: your code raised {type(error).__name__}{place}: {first}"
    if name is None or item.get_closest_marker(name):  # a wrong answer, or the check's own blank
        return
    path, line = item.reportinfo()[:2]
    report.outcome = "skipped"
    report.longrepr = (str(path), (line or 0) + 1, f"Skipped: needs exercise {name}")
    waiting[name] += 1


def pytest_terminal_summary(terminalreporter):
    if waiting:
        terminalreporter.write_line("tests waiting for an exercise (skipped until it is done): " +
                                    ", ".join(f"{name} {n}" for name, n in sorted(waiting.items())))
