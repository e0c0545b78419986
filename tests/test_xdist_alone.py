"""xdist_alone: under pytest-xdist, a test marked ``timing`` runs while no
other test does (README's test command runs four workers)."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

TESTS = os.path.dirname(os.path.abspath(__file__))

CONFTEST = '''
import pytest
import xdist_alone

def pytest_configure(config):
    config.addinivalue_line("markers", "timing: runs alone")

@pytest.fixture(autouse=True)
def _alone(request):
    with xdist_alone.turn(request.node.get_closest_marker("timing") is not None):
        yield
'''

# Each test marks itself running with a file; the timing test (first, so that
# it starts beside the others) looks for anyone else's file while it runs.
TESTS_SOURCE = '''
import os, time
import pytest

RUNNING = os.environ["RUNNING_DIR"]

def _running(name):
    path = os.path.join(RUNNING, name)
    open(path, "w").close()
    return path

@pytest.mark.timing
def test_0_alone():
    mine = _running("alone")
    seen = set()
    try:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            seen |= set(os.listdir(RUNNING)) - {"alone"}
            time.sleep(0.01)
    finally:
        os.unlink(mine)
    assert not seen, f"ran beside {sorted(seen)}"

@pytest.mark.parametrize("i", range(16))
def test_1_beside(i):
    mine = _running(f"beside{i}")
    try:
        time.sleep(0.2)
    finally:
        os.unlink(mine)
'''


def test_a_timing_test_runs_while_no_other_test_does(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # not this project's settings
    (tmp_path / "test_x.py").write_text(TESTS_SOURCE)
    running = tmp_path / "running"
    running.mkdir()
    env = dict(os.environ, RUNNING_DIR=str(running),
               PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
    env.pop("PYTEST_XDIST_WORKER", None)  # (this suite's own worker's: the run below has its own)
    env.pop("PYTEST_XDIST_TESTRUNUID", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "3", "-c",
         str(tmp_path / "pytest.ini"), "--rootdir", str(tmp_path), str(tmp_path / "test_x.py")],
        capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "17 passed" in proc.stdout, proc.stdout
