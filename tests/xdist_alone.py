"""Tests bound in time run alone under pytest-xdist.

README's test command runs the suite in four workers.  A test marked
``timing`` (a 10 ms ticker that may come late by 50 ms, no more) would then
measure the other workers' load, not anyfork.  So the workers of one run
share a lock file: every test holds it shared, a timing test holds it
alone.  A gate in front keeps a timing test from waiting for ever behind a
stream of shared holders (flock gives a waiting writer no precedence).
Standard library only; tests/conftest.py uses it as an autouse fixture.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator


def _open_locks() -> tuple[int, int] | None:
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if not run or not os.environ.get("PYTEST_XDIST_WORKER"):
        return None  # one process: nothing runs beside a test
    base = os.path.join(tempfile.gettempdir(), f"anyfork-tests-{run}")
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
    return os.open(base + ".gate", flags, 0o600), os.open(base + ".lock", flags, 0o600)


_LOCKS = _open_locks()


@contextlib.contextmanager
def turn(alone: bool) -> Iterator[None]:
    """Hold the run's lock for one test: shared, or alone."""
    if _LOCKS is None:
        yield
        return
    gate, lock = _LOCKS
    fcntl.flock(gate, fcntl.LOCK_EX)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
    finally:
        if not alone:
            fcntl.flock(gate, fcntl.LOCK_UN)
    try:
        yield
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        if alone:
            fcntl.flock(gate, fcntl.LOCK_UN)
