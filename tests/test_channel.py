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
