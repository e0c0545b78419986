"""_reports: a template's report channel, read by either backend, and the template as a parent."""

from __future__ import annotations

import asyncio
import os
import select
import socket
import struct
from typing import TYPE_CHECKING

import pytest

import anyfork
from anyfork import _protocol as wire
from anyfork._backend import deadline_after, run_blocking
from anyfork._caller import TemplateState
from anyfork._reports import ReportChannel
from helpers import run_program, small_socket_buffers, wait_exited

if TYPE_CHECKING:
    from collections.abc import Callable

    Make = Callable[[], anyfork.Process]

pytestmark = pytest.mark.usefixtures("check_leaks")

MiB = 1 << 20


# Pins d12: a corrupt report surfaced as TemplateDiedError, never ProtocolError.
_SEND_CORRUPT_REPORT = (
    "import sys\n"
    "f = sys._getframe()\n"
    "while f is not None and type(f.f_locals.get('self')).__name__ != 'Server':\n"
    "    f = f.f_back\n"
    "f.f_locals['self'].template.reports.sendall(b'\\xff' * 16)\n"
)


def test_corrupt_report_raises_protocol_error_from_wait() -> None:
    tpl = anyfork.new_exec()
    c = tpl.fork()
    sock = c.run("helpers:wait_eof")
    extra = None
    try:
        tpl.eval(_SEND_CORRUPT_REPORT)
        extra = tpl.fork()  # writes the eval; the template then sends garbage
        with pytest.raises(anyfork.ProtocolError):
            c.wait(3)
    finally:
        sock.close()
        if extra is not None:
            extra.close()
        tpl.close()
        assert tpl.wait(5) == 0


# Pins d03: a waiter whose status another thread dispatched blocked as the next reader.
# The seam: ReportChannel.read_now is wrapped so that thread Y, past until_op's
# done() check, is held until another thread has dispatched its exit status.


def test_waiter_whose_status_was_dispatched_by_another_thread_returns() -> None:
    facts = run_program("caller_lost_wakeup.py", timeout=30).facts
    assert facts["hook_hit"], f"setup: Y never read the channel, so the seam was not exercised: {facts}"
    assert facts["b_status"] == 0, facts
    assert not facts["y_blocked"], f"wait() missed a status another thread dispatched: {facts}"


# Pins d10: a malformed SPARE report leaked the descriptor it carried.
@pytest.mark.parametrize("report", [
    # a SPARE whose payload is the wrong size (first review)
    wire.HEADER.pack(wire.VERSION, wire.SPARE, 1, 8) + bytes(8),
    # a well-formed SPARE whose descriptor is a pipe, not a socket (second review)
    wire.spare_report(1, 12345),
], ids=["short-payload", "pipe-not-socket"])
def test_malformed_spare_report_is_corrupt_and_closes_the_descriptor_it_carried(report: bytes) -> None:
    mine, theirs = socket.socketpair()
    r, w = os.pipe()
    reports = None
    state = TemplateState()
    state.spawn(False)  # so that a SPARE for #1 is expected
    try:
        reports = ReportChannel(mine, state)
        theirs.sendmsg([report], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", w))])
        os.close(w)
        w = -1
        run_blocking(reports.until_op(lambda: state.ended is not None, deadline_after(1)))
        assert state.ended is not None, "the malformed SPARE was accepted"
        assert state.corrupt, f"the channel ended, but not as corrupt: {state.ended}"
        os.set_blocking(r, False)
        try:
            data = os.read(r, 1)
        except BlockingIOError:
            pytest.fail("the pipe's write end, received with the report, is still open")
        assert data == b""
    finally:
        if reports is not None:
            reports.end("test over")
        mine.close()
        theirs.close()
        os.close(r)
        if w >= 0:
            os.close(w)


# Pins r2-ctrunc: out of descriptors as a SPARE arrived ended the default template's report channel.


def test_report_channel_survives_running_out_of_descriptors_as_a_spare_arrives() -> None:
    facts = run_program("caller_spare_while_out_of_fds.py", timeout=30).facts
    assert facts["queued"], f"setup: no SPARE report was waiting: {facts}"
    assert facts["ended"] is None, f"the report channel ended: {facts}"
    assert facts["after"] == 0, f"wait() once descriptors were freed: {facts}"


# Pins d08/d15, restated: a template once blocked writing reports to a caller blocked writing
# to it; it now keeps a backlog.  What must hold is that a full channel loses nothing and
# holds nothing up.
def test_a_full_report_channel_loses_no_report_and_holds_nothing_up(
        monkeypatch: pytest.MonkeyPatch) -> None:
    tpl = anyfork.new_exec().eval("def quick(s):\n    pass\ndef g(s, *a):\n    pass\n")
    small_socket_buffers(monkeypatch)
    kids = [tpl.fork() for _ in range(48)]
    monkeypatch.undo()
    try:
        for k in kids:
            k.run("quick").close()
        for k in kids:
            assert wait_exited(k.pid), "setup: a process did not exit"
        # Their exit reports, unread, fill the tiny channel (when the template has
        # reaped them: not asserted, since a loaded machine may be slower; the
        # assertions below hold either way).
        select.select([tpl._tpl.reports.fileno()], [], [], 2)
        late = tpl.fork()  # forks, though the template can't write its reports
        tpl.send_arg(b"x" * (8 * MiB))  # a write the template must read while its channel is full

        async def main() -> None:
            (await asyncio.wait_for(tpl.run_async("g"), 10)).close()

        asyncio.run(main())
        assert [k.wait(5) for k in kids] == [0] * len(kids)  # every status, from the backlog
        late.close()
    finally:
        for k in kids:
            k.close()
        tpl.close()
    assert tpl.wait(5) == 0
