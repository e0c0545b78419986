"""_channel: the command queue and the one operation that writes it."""

from __future__ import annotations

import pytest

from helpers import run_program

pytestmark = pytest.mark.usefixtures("check_leaks")


# Pins issue 15 #5: an exception raised by a signal handler in the middle of fork(), run() or
# wait() made the template get a command twice (a KeyError in its reaper, "stream corrupted"),
# or left the reader flag set or a lock held: the caller then hung.
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_calls_interrupted_at_random_moments_never_hang_or_corrupt_the_stream(seed: int) -> None:
    ran = run_program("caller_interrupted_calls.py", str(seed), timeout=40)
    facts = ran.facts
    assert facts["interrupted"] > 0, f"setup: no call was interrupted: {facts}"
    # The template's own errors would show as a traceback (a KeyError in its reaper); a
    # process let go in the middle of a frame says "stream corrupted", which is fine, and the
    # only tracebacks allowed are the handler's own exception, ignored in a finalizer.
    assert "KeyError" not in ran.stderr, ran.stderr
    tracebacks = ran.stderr.split("Traceback (most recent call last):")[1:]
    assert all(t.split("\n", 1)[0] == "" and "raise Interrupt" in t for t in tracebacks), ran.stderr
    assert set(facts["errors"]) <= {"ProcessStateError"}, facts
    # Afterwards the template works, or, if an exception came between a send and its
    # bookkeeping, it was let go and says so.
    assert facts["after"] == ("ProcessStateError" if facts["poisoned"] else 0), facts


def _python_calls(fn: object) -> int:
    """How many Python functions run while ``fn()`` runs (C functions not counted)."""
    import sys

    calls = 0

    def count(frame: object, event: str, arg: object) -> None:
        nonlocal calls
        if event == "call":
            calls += 1

    sys.setprofile(count)
    try:
        fn()  # type: ignore[operator]
    finally:
        sys.setprofile(None)
    return calls - 1  # fn itself


# Pins a speed regression of the caller-side rework (a872bd9): signals were
# held with signal.pthread_sigmask, whose Python wrapper turns the old mask
# into Signals members one enum lookup at a time.  Done twice per send and per
# read, that made the caller's part of new().run() ~6x dearer than before
# (1,500 Python calls per process instead of ~150).  Counted, not timed.
def test_holding_signals_back_runs_no_python_code() -> None:
    from anyfork._channel import hold_signals, release_signals

    def hold_and_release() -> None:
        held: list[set[int]] = []
        hold_signals(held)
        release_signals(held)

    assert _python_calls(hold_and_release) == 2  # the two functions themselves


def test_the_callers_part_of_new_run_stays_small() -> None:
    import statistics

    import anyfork

    def one() -> None:
        sock = anyfork.new().run("builtins:id")
        sock.recv(1)
        sock.close()

    for _ in range(10):
        one()
    counts = [_python_calls(one) for _ in range(15)]
    # ~150 on 3.11 when this was written; the regression above made it 1,500.
    assert statistics.median(counts) < 400, counts
