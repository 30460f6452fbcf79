"""A test's teardown that hangs ends the run with every thread's stack, instead of CI's limit.

A failing test on uvloop's loop that leaves a server open holds ``loop.close()`` for ever (uvloop
0.23 waits there for a handle that nothing closes), in the fixture teardown that closes the
test's loop: CI then sat silent until its 90 minutes ran out. pytest-timeout does not reach
this case, since it stops its timer as soon as a test fails (its ``pytest_exception_interact``).
So each teardown runs under ``faulthandler``'s watchdog, which is C: it needs neither the GIL
nor the main thread, prints every thread's stack and exits with status 1 after
``teardown_timeout`` seconds (an ini option; 0 turns it off).
"""

from __future__ import annotations

import faulthandler
import os
import threading
from collections.abc import Generator, Iterator

import pytest

#: Seconds a test's teardown may take: closing servers, loops and engines takes seconds.
TEARDOWN_S = 120.0
_stderr = pytest.StashKey[int]()
_failure = pytest.StashKey[str]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "teardown_timeout", "seconds a test's teardown may take before the run stops (0: off)",
        default=str(TEARDOWN_S),
    )  # fmt: skip


def pytest_configure(config: pytest.Config) -> None:
    # A copy of the terminal's stderr, taken while pytest does not capture it: during a test's
    # teardown descriptor 2 goes to pytest's capture file, which an exit would never show.
    config.stash[_stderr] = os.dup(2)


def pytest_unconfigure(config: pytest.Config) -> None:
    if (fd := config.stash.get(_stderr, None)) is not None:
        os.close(fd)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item,
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:  # the run stops before its summary: the watchdog prints this instead
        item.stash[_failure] = f"{report.when} failed:\n{report.longreprtext}\n"
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    seconds = float(item.config.getini("teardown_timeout"))
    if seconds <= 0:
        return (yield)
    fd = item.config.stash[_stderr]
    # The test's name first, from a thread (a hang that holds the GIL goes without it), then
    # the stacks and the exit from faulthandler's.
    line = f"\nthe teardown of {item.nodeid} took over {seconds:g} s: stopping the run\n"
    line += item.stash.get(_failure, "")
    name = threading.Timer(seconds, os.write, (fd, line.encode()))
    name.daemon = True
    name.start()
    faulthandler.dump_traceback_later(seconds + 1, file=fd, exit=True)
    try:
        return (yield)
    finally:
        faulthandler.cancel_dump_traceback_later()
        name.cancel()
