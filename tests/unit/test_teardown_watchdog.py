"""The teardown watchdog (``tests/teardown_watchdog.py``) stops a run whose teardown hangs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

HANGING = """
import time
import pytest

@pytest.fixture
def quick():
    yield

@pytest.fixture
def hangs():
    yield
    time.sleep(120)  # as uvloop's loop.close() waiting for a handle nobody closes

def test_passes(quick):
    pass

def test_fails_then_hangs(hangs):
    assert False, "the failure pytest-timeout would stop watching at"
"""


def test_a_failed_test_whose_teardown_hangs_stops_the_run(tmp_path: Path) -> None:
    (tmp_path / "test_hang.py").write_text(HANGING)
    began = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.teardown_watchdog", "-p",
         "no:cacheprovider", "-o", "teardown_timeout=1", "-c", os.devnull, "--rootdir",
         str(tmp_path), str(tmp_path / "test_hang.py")],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    took = time.monotonic() - began
    assert run.returncode == 1, run.stdout + run.stderr
    assert took < 30, f"the run took {took:.0f} s: the watchdog did not stop it"
    assert "the teardown of test_hang.py::test_fails_then_hangs took over 1 s" in run.stderr
    assert "call failed:" in run.stderr and "would stop watching at" in run.stderr
    assert "test_passes" not in run.stderr  # a quick teardown is left alone
    assert "line 12 in hangs" in run.stderr, run.stderr  # the stack shows where it hangs
