"""Threads a test leaves running, named when the run ends instead of a hung exit.

Python waits at exit for every thread that is not a daemon. A test that leaves one running (an
aiortc receiver's decoder thread that was never stopped, a worker that never finishes) holds
pytest after its summary is printed, every test passed, until CI's time limit ends the job
with nothing said. This plugin notes which test each new non-daemon thread appeared in, and at
the end gives such threads ``GRACE_S`` to finish, then names those still running, each with its
test, and exits with a failure status instead of waiting for them.
"""

from __future__ import annotations

import concurrent.futures.thread
import os
import sys
import threading
import time
from collections.abc import Iterator

import pytest

#: How long the threads still running at the end may take to finish (s).
GRACE_S = 10.0

_started_in: dict[int | None, str] = {}
_exit_status = pytest.StashKey[int]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    before = {t.ident for t in threading.enumerate()}
    yield
    for thread in threading.enumerate():
        if thread.ident not in before and not thread.daemon:
            _started_in.setdefault(thread.ident, item.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[_exit_status] = int(exitstatus)


def pytest_unconfigure(config: pytest.Config) -> None:
    """After the summary: wait for the threads that would hold the exit, else name them."""
    deadline = time.monotonic() + GRACE_S
    for thread in _holding_the_exit():
        thread.join(max(0.0, deadline - time.monotonic()))
    left = _holding_the_exit()
    if not left:
        return
    named = "; ".join(
        f"{t.name!r}, started in {_started_in.get(t.ident, 'a fixture or collection')}"
        for t in left
    )
    sys.stderr.write(
        f"\nthreads left running would hold pytest at exit, so it stops here: {named}. "
        "Stop them in the test that starts them (or make them daemons).\n"
    )
    sys.stderr.flush()
    os._exit(config.stash.get(_exit_status, 0) or 1)


def _holding_the_exit() -> list[threading.Thread]:
    """Non-daemon threads other than this one, but for thread-pool workers: Python stops an
    idle pool's workers itself at exit (``concurrent.futures``' exit hook)."""
    return [
        t
        for t in threading.enumerate()
        if t is not threading.current_thread()
        and not t.daemon
        and t.is_alive()
        and getattr(t, "_target", None) is not concurrent.futures.thread._worker
    ]
