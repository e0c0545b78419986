"""_fds: descriptor ownership across a fork of the caller and at exit."""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING

import pytest

from helpers import run_program

if TYPE_CHECKING:
    from collections.abc import Callable

    import anyfork

    Make = Callable[[], anyfork.Process]

pytestmark = pytest.mark.usefixtures("check_leaks")

MiB = 1 << 20


# Pins d04: in a child of os.fork, inherited Processes used closed descriptor numbers.


def test_inherited_process_in_a_forked_child_refuses_and_signals_nothing() -> None:
    facts = run_program("caller_inherited_after_fork.py", timeout=45).facts
    assert not facts["victim_killed"], f"kill() in the child signalled an unrelated process: {facts}"
    calls = {k: v for k, v in facts.items() if k.startswith(("p.", "c."))}
    assert len(calls) == 8, f"{facts}"
    # returncode never raises (issue 14): None there, and nothing touched.
    expected = {k: "returned" if k.endswith(".returncode") else "ProcessStateError" for k in calls}
    assert calls == expected, f"in the child: {calls}"
    assert facts["p_alive_in_parent"], f"{facts}"
    assert facts["p_status"] == -signal.SIGTERM, f"{facts}"
    assert facts["reused"], f"setup: the stale pidfd number was never reused, so nothing was shown: {facts}"


# Pins issue 15 #9: after os.fork() of a threaded caller, an inherited Process whose lock
# another thread held at the fork deadlocked the child; it must say ProcessStateError.
def test_an_inherited_process_refuses_even_if_another_thread_was_writing_at_the_fork() -> None:
    facts = run_program("caller_fork_while_locked.py", timeout=45).facts
    assert facts["writing"], f"setup: the other thread was not writing at the fork: {facts}"
    assert facts["child_eval"] == "ProcessStateError", facts
