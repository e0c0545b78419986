"""_direct: processes the caller spawned itself, reaped and signalled through a pidfd."""

from __future__ import annotations

import signal
import socket
from typing import TYPE_CHECKING

import pytest

import anyfork
from helpers import run_program, wait_exited, zombie_children

if TYPE_CHECKING:
    from collections.abc import Callable

    Make = Callable[[], anyfork.Process]

pytestmark = pytest.mark.usefixtures("check_leaks")

MiB = 1 << 20


# Pins d02: kill() blocked on the lock wait() held in a blocking waitid.



@pytest.mark.parametrize("where", ["other_thread", "signal_handler"])
def test_kill_while_waiting_signals_promptly(where: str) -> None:
    if where == "other_thread":
        facts = run_program("caller_kill_from_thread.py", timeout=20).facts
        assert facts["kill_returned"], f"kill() blocked while another thread waits: {facts}"
        assert facts["exited"], f"the process was not signalled: {facts}"
        assert facts["status"] == -signal.SIGTERM, facts
    else:
        facts = run_program("caller_kill_from_handler.py", timeout=20).facts
        assert not facts["rescued"], f"kill() in the handler did not signal the process: {facts}"
        assert facts["status"] == -signal.SIGTERM, facts
        assert facts["elapsed"] < 3, facts


# Pins d11: an exited new_exec child stayed a zombie across most calls into anyfork.
_CALLS: dict[str, Callable[[anyfork.Process], object]] = {
    "send_arg": lambda q: q.send_arg("x"),
    "eval": lambda q: q.eval("pass"),
    "require": lambda q: q.require("os"),
    "fork": lambda q: q.fork(),
    "run": lambda q: q.run("helpers:wait_eof"),
    "close": lambda q: q.close(),
}


@pytest.mark.parametrize("call", list(_CALLS))
def test_exited_new_exec_child_is_reaped_by_the_next_call(call: str) -> None:
    q = anyfork.new_exec()  # made first: making a process reaps
    p = anyfork.new_exec()
    pid = p.pid
    p.send_arg("3").run("helpers:exit_with").close()
    assert wait_exited(pid), "setup: the process did not exit"
    assert pid in zombie_children(), "setup: something reaped it already"
    made = _CALLS[call](q)
    try:
        assert pid not in zombie_children(), f"still a zombie after another process's {call}()"
    finally:
        if isinstance(made, socket.socket) or (isinstance(made, anyfork.Process) and made is not q):
            made.close()
        q.close()
        q.wait(5)
    assert p.wait(5) == 3
