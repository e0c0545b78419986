"""Failures before the function: ProcessFailedError, the failure sink (_failures).

A process that fails in anyfork's work before its function runs (require,
eval, looking the function up, calling it) exits 1 and tells the caller
why; one that fails in its function exits 1 as before, and wait() returns 1.
"""

from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING

import pytest

import anyfork
from anyfork import _exec, _failures, _fds, _serve
from anyfork import _protocol as wire
from helpers import TIMEOUT, run_source

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    Make = Callable[[], anyfork.Process]

pytestmark = pytest.mark.usefixtures("check_leaks")


@pytest.fixture
def broken_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A module that raises when imported, on the path new processes see."""
    (tmp_path / "af_broken_mod.py").write_text("x = 1\nraise RuntimeError('broken at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "af_broken_mod"


# kind -> (how to prepare, the function to run, type name, words of the message)
KINDS: dict[str, tuple[Callable[[anyfork.Process], anyfork.Process], str, str, str]] = {
    "require-missing": (lambda p: p.require("af_no_such_module"), "helpers:wait_eof",
                        "ModuleNotFoundError", "af_no_such_module"),
    "require-broken": (lambda p: p.require("af_broken_mod"), "helpers:wait_eof",
                       "RuntimeError", "broken at import"),
    "eval": (lambda p: p.eval("raise LookupError('raised by eval')"), "helpers:wait_eof",
             "LookupError", "raised by eval"),
    "name": (lambda p: p, "helpers:no_such_function", "AttributeError", "no_such_function"),
    "bare-name": (lambda p: p, "af_nowhere", "NameError", "af_nowhere"),
    "not-callable": (lambda p: p, "os:sep", "TypeError", "is not callable"),
    "arity": (lambda p: p, "helpers:exit_with", "TypeError", "missing 1 required positional argument"),
}


def _run_anyway(proc: anyfork.Process, func: str) -> None:
    """run(), which may find the process gone already (it failed early)."""
    try:
        proc.run(func).close()
    except anyfork.ProcessExitedError:
        pass


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.usefixtures("broken_module")
def test_a_failure_before_the_function_raises_process_failed_error(make: Make, kind: str) -> None:
    prepare, func, type_name, words = KINDS[kind]
    proc = prepare(make())
    _run_anyway(proc, func)
    with pytest.raises(anyfork.ProcessFailedError) as info:
        proc.wait(TIMEOUT)
    e = info.value
    assert isinstance(e, anyfork.ProcessExitedError)
    assert e.returncode == 1
    assert proc.returncode == 1  # the status is kept
    assert e.type_name == type_name
    assert words in e.message
    assert type_name in e.traceback
    assert words in e.traceback
    assert f"process {proc.pid}" in str(e)
    assert type_name in str(e)
    if kind == "require-broken":
        assert "af_broken_mod.py" in e.traceback  # the user's frame is there
    assert "_serve.py" not in e.traceback  # anyfork's own frames are not
    with pytest.raises(anyfork.ProcessFailedError):
        proc.wait(TIMEOUT)  # every time


@pytest.mark.parametrize("code", [
    "def f(sock):\n    raise TypeError('raised inside f')",
    "def g():\n    pass\ndef f(sock):\n    g(sock)",  # a wrong call made by the function itself
    "def f(sock):\n    raise ValueError('raised inside f')",
])
def test_a_failure_inside_the_function_is_a_plain_status(make: Make, code: str) -> None:
    proc = make().eval(code)
    proc.run("f").close()
    assert proc.wait(TIMEOUT) == 1


def test_wait_async_raises_it(make: Make) -> None:
    proc = make().eval("raise LookupError('raised by eval')")
    _run_anyway(proc, "helpers:wait_eof")

    async def main() -> None:
        with pytest.raises(anyfork.ProcessFailedError) as info:
            await proc.wait_async(TIMEOUT)
        assert info.value.type_name == "LookupError"

    asyncio.run(main())


def test_forks_from_a_template_whose_require_failed_raise_it(make: Make) -> None:
    tpl = make().require("af_no_such_module")

    def fork_and_run() -> None:
        child = tpl.fork()  # may be written before the template is seen to be gone
        try:
            child.run("helpers:wait_eof").close()
        finally:
            child.close()

    with pytest.raises(anyfork.ProcessFailedError) as info:
        fork_and_run()
    assert info.value.type_name == "ModuleNotFoundError"
    assert f"process {tpl.pid}" in str(info.value)
    assert "no pid" not in str(info.value)
    with pytest.raises(anyfork.ProcessFailedError):
        tpl.wait(TIMEOUT)


def test_a_process_that_exits_well_reads_nothing(monkeypatch: pytest.MonkeyPatch, make: Make) -> None:
    """The sink is read only for a status 1: a process that does not fail costs nothing there."""
    proc = make()
    proc.run("helpers:wait_eof").close()

    def take(*args: object) -> None:
        raise AssertionError("the failure sink was read")

    monkeypatch.setattr(_failures, "take", take)
    assert proc.wait(TIMEOUT) == 0


def test_fork_template_processes_report_failures_too(tmp_path: Path) -> None:
    facts = run_source(tmp_path, """
        import json
        import anyfork

        def kinds(f):
            try:
                f()
                return "no error"
            except anyfork.ProcessFailedError as e:
                return e.type_name
            except Exception as e:
                return "other: " + repr(e)

        def wait_for(p, func):
            def f():
                try:
                    p.run(func).close()
                except anyfork.ProcessExitedError:
                    pass
                p.wait(10)
            return f

        def fork_and_run(t):
            def f():
                c = t.fork()
                try:
                    c.run("ok").close()
                finally:
                    c.close()
            return f

        def ok(sock):
            pass

        if __name__ == "__main__":
            facts = {}
            t = anyfork.fork_template()
            facts["direct"] = kinds(wait_for(t, "no_such_name"))
            t = anyfork.fork_template()
            facts["forked"] = kinds(wait_for(t.fork().eval("1/0"), "ok"))
            c = t.fork()
            c.run("ok").close()
            facts["fine"] = c.wait(10)
            t.close()
            t = anyfork.fork_template().require("af_no_such_module")
            facts["fork from failed"] = kinds(fork_and_run(t))
            facts["template"] = kinds(lambda: t.wait(10))
            print(json.dumps(facts))
    """)
    assert facts.facts == {"direct": "NameError", "forked": "ZeroDivisionError", "fine": 0,
                           "fork from failed": "ModuleNotFoundError", "template": "ModuleNotFoundError"}


# --- the sink and the record, without processes -----------------------------------------


@pytest.fixture
def sink() -> Iterator[_failures.Sink]:
    """A sink of the test's own (not the one this process's processes use)."""
    sink = _failures.Sink()
    yield sink
    for s in (sink.receiver, sink.sender):
        _fds.disown(s)
        s.close()


def test_a_record_names_exactly_one_process(sink: _failures.Sink) -> None:
    """A record nobody collected never passes for another process with the same pid."""
    texts = ("KeyError", "'k'", "Traceback ...\nKeyError: 'k'\n")
    sink.sender.send(wire.failure_record((4242, 17, 3), texts))
    assert sink.take(4242, 17, 4) is None  # another fork of the same template
    assert sink.take(4242, 18, 3) is None  # another template's
    assert sink.take(4243, 17, 3) is None
    assert sink.take(4242, 17, 3) == texts
    assert sink.take(4242, 17, 3) is None  # taken


def test_a_newer_record_for_a_pid_replaces_the_older(sink: _failures.Sink) -> None:
    sink.sender.send(wire.failure_record((4242, 17, 3), ("A", "old", "")))
    sink.sender.send(wire.failure_record((4242, 17, 9), ("A", "new", "")))
    assert sink.take(4242, 17, 3) is None
    assert sink.take(4242, None, 9) == ("A", "new", "")


def test_garbage_on_the_sink_is_ignored(sink: _failures.Sink) -> None:
    sink.sender.send(b"not a record")
    sink.sender.send(b"".join(bytes(b) for b in wire.run_frame("x:y")))  # a frame of another kind
    sink.sender.send(wire.failure_record((1, 2, 3), ("A", "b", "c")))
    assert sink.take(1, 2, 3) == ("A", "b", "c")


def test_the_failure_record_round_trips_and_is_cut_to_fit_a_datagram() -> None:
    big = "x" * (wire.FAILURE_TEXT_MAX * 3)
    data = wire.failure_record((-1, 2**40, 2**63), ("T", "é\udcff", big))
    dec = wire.Decoder(wire.FAILURE_TABLE)
    dec.feed(data)
    frame = dec.next_frame()
    assert frame is not None
    assert frame.kind == wire.FAILURE
    assert dec.idle()
    ids, texts = wire.decode_failure(frame.payload)
    assert ids == (-1, 2**40, 2**63)
    assert texts[:2] == ["T", "é\udcff"]
    assert texts[2].startswith("...")
    assert len(texts[2]) == wire.FAILURE_TEXT_MAX + 3
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        a.send(wire.failure_record((0, 0, 0), (big, big, big)))  # the worst case still fits


@pytest.mark.parametrize("payload", [b"", b"\0" * 23, b"\0" * 24,
                                     b"\0" * 24 + b"".join(wire.encode_items(["a", "b"])),  # type: ignore[arg-type]
                                     b"\0" * 24 + b"".join(wire.encode_items(["a", "b", b"c"]))])  # type: ignore[arg-type]
def test_a_malformed_failure_record_is_a_protocol_error(payload: bytes) -> None:
    with pytest.raises(wire.ProtocolError):
        wire.decode_failure(payload)


def test_a_process_without_a_sink_sends_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where there is no sink (a remote host), _send_failure does nothing, and never raises."""
    monkeypatch.setattr(_serve, "failure_fd", -1)
    _serve._send_failure(ValueError("x"), 0, False)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        monkeypatch.setattr(_serve, "failure_fd", a.fileno())
        b.close()  # a sink nobody reads any more
        _serve._send_failure(ValueError("x"), 0, False)


def test_the_exec_bootstrap_keeps_the_sink() -> None:
    assert "main(3, 4)" in _exec.boot_code(True)
    assert "main(3)" in _exec.boot_code(False)
