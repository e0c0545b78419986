"""_channel: the command queue and the one operation that writes it."""

from __future__ import annotations

import os
import select
import signal
import socket
import sys
import threading
import types
from typing import Any, Callable

import pytest

from anyfork import _channel
from anyfork import _protocol as P
from anyfork._channel import CommandChannel
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


def _new_run() -> None:
    """One new().run() of a function that returns at once, to its EOF."""
    import anyfork

    sock = anyfork.new().run("builtins:id")
    sock.recv(1)
    sock.close()


def test_the_callers_part_of_new_run_stays_small() -> None:
    import statistics

    for _ in range(10):
        _new_run()
    counts = [_python_calls(_new_run) for _ in range(15)]
    # ~150 on 3.11 when this was written; the regression above made it 1,500.
    assert statistics.median(counts) < 400, counts


class Interrupt(Exception):  # noqa: N818 - stands for a handler's KeyboardInterrupt
    pass


def _raise_interrupt(signum: int, frame: object) -> None:
    raise Interrupt


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="no pthread_sigmask")
def test_a_handler_raising_while_a_frame_is_queued_queues_all_of_it_or_none() -> None:
    # Pins issue 10 #3: on 3.10 a SIGALRM handler raised between a FORK frame's
    # header and its payload in Outbox.put; the template read the next header
    # as this payload, and died of "descriptors arrived with no frame".  In a
    # program of its own: with no other thread, signals held on the main
    # thread wait until the frame is queued (a test runner's threads would
    # take the signal instead; the threaded case is the next test).
    facts = run_program("caller_handler_inside_put.py", timeout=30).facts
    assert facts["sent"] and facts["threads"] == 1, facts
    assert facts["queued"] in (0, facts["whole"]), facts  # never the header alone
    assert facts["queued"] == facts["whole"] and facts["interrupted"], facts  # queued, then it ran


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="no pthread_sigmask")
def test_a_frame_is_queued_whole_or_not_at_all_in_a_threaded_program() -> None:
    # Holding signals on the main thread keeps them from it, not from the
    # process: with another thread there, the kernel gives that thread the
    # signal, and Python runs its handler on the main thread all the same,
    # at the next bytecode boundary, in the middle of Outbox.put.  The header
    # was queued without its payload (seen under pytest-xdist, whose workers
    # have a thread of their own).  Here the trace function waits until the
    # other thread has taken the signal (its C handler writes the wakeup fd).
    idle = threading.Event()
    other = threading.Thread(target=idle.wait, daemon=True)
    other.start()
    a, b = socket.socketpair()
    chan = CommandChannel(a)
    r, w = os.pipe()
    os.set_blocking(w, False)
    old = signal.signal(signal.SIGUSR1, _raise_interrupt)
    old_fd = signal.set_wakeup_fd(w)
    frame = P.fork_frame(7, False)
    sent = False

    def trace(f: types.FrameType, event: str, arg: object) -> Any:
        nonlocal sent
        if f.f_code is P.Outbox.put.__code__ and event == "line" and not sent \
                and f.f_locals.get("first") is False:
            sent = True
            os.kill(os.getpid(), signal.SIGUSR1)
            assert select.select([r], [], [], 5)[0], "no thread took the signal"
        return trace

    try:
        sys.settrace(trace)
        try:
            with chan.lock:
                chan.put(frame, [os.dup(b.fileno())])
        except Interrupt:
            pass
        finally:
            sys.settrace(None)
        assert sent
        assert len(chan.out) in (0, sum(len(p) for p in frame))  # never the header alone
    finally:
        signal.set_wakeup_fd(old_fd)
        signal.signal(signal.SIGUSR1, old)
        os.close(r)
        os.close(w)
        idle.set()
        other.join(5)
        chan.close()
        b.close()


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="no pthread_sigmask")
def test_a_handler_raising_as_signals_are_held_leaves_the_mask_as_it_was(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # pthread_sigmask runs the handlers due after it changed the mask; one
    # that raised there left every signal blocked on the main thread for good
    # (and in every process spawned from it afterwards).
    real = signal.pthread_sigmask
    raised = False

    def sigmask_then_a_handler_due(how: int, mask: Any) -> Any:
        nonlocal raised
        previous = real(how, mask)
        if how == signal.SIG_BLOCK and set(mask) and not raised:
            raised = True
            raise Interrupt  # as a handler due would, in the same call
        return previous

    before = real(signal.SIG_BLOCK, ())
    monkeypatch.setattr(_channel, "_SIGMASK", sigmask_then_a_handler_due)
    held: list[Any] = []
    try:
        with pytest.raises(Interrupt):
            _channel.hold_signals(held)
        assert real(signal.SIG_BLOCK, ()) == before
        assert held == []
    finally:
        real(signal.SIG_SETMASK, before)


def _count_sigmask_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Each call of the C pthread_sigmask _channel makes from now on, by its ``how``."""
    real = _channel._SIGMASK
    assert real is not None
    calls: list[int] = []

    def counting(how: int, mask: Any) -> Any:
        calls.append(how)
        return real(how, mask)

    monkeypatch.setattr(_channel, "_SIGMASK", counting)
    return calls


# Holds nest (queue_fork's around its put, a batch of reads): within one,
# every signal is blocked already, and the inner hold must not ask the
# kernel again (three rt_sigprocmask calls a hold, ~22 per new().run()),
# nor unblock anything as it ends.
def test_a_hold_inside_a_hold_makes_no_system_call_and_unblocks_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    real = _channel._SIGMASK
    assert real is not None
    calls = _count_sigmask_calls(monkeypatch)
    before = real(signal.SIG_BLOCK, ())
    outer: list[Any] = []
    inner: list[Any] = []
    try:
        _channel.hold_signals(outer)
        blocked = real(signal.SIG_BLOCK, ())
        assert signal.SIGINT in blocked
        n = len(calls)
        _channel.hold_signals(inner)
        _channel.release_signals(inner)
        assert len(calls) == n, "the inner hold asked the kernel"
        assert real(signal.SIG_BLOCK, ()) == blocked, "the inner release unblocked signals"
        _channel.release_signals(outer)
        assert real(signal.SIG_BLOCK, ()) == before
        _channel.hold_signals(inner)  # and a hold after them all is a full one again
        assert signal.SIGINT in real(signal.SIG_BLOCK, ())
        _channel.release_signals(inner)
        assert real(signal.SIG_BLOCK, ()) == before
    finally:
        real(signal.SIG_SETMASK, before)


# A hold costs ~2.5 us here (three rt_sigprocmask calls and the conversion
# of every signal number, both ways), more than the rest of a put: new().run()
# held 7.4 times (22.7 calls), which was a third of its caller-side regression
# against the code before issue 9's rework.  Now: a put without descriptors
# holds nothing (the outbox queues a frame with one C call), and fork() holds
# once for its whole first step.  Counted, not timed.
def test_a_new_run_holds_signals_back_at_most_three_times(monkeypatch: pytest.MonkeyPatch) -> None:
    for _ in range(5):
        _new_run()
    calls = _count_sigmask_calls(monkeypatch)
    counts = []
    for _ in range(10):
        calls.clear()
        _new_run()
        counts.append(len(calls))
    assert sorted(counts)[len(counts) // 2] <= 9, counts  # three calls a hold


def test_a_frame_without_descriptors_is_queued_without_holding_signals(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_sigmask_calls(monkeypatch)
    mine, theirs = socket.socketpair()
    ch = CommandChannel(mine)
    try:
        with ch.lock:
            ch.put(P.run_frame("builtins:id"))
        assert calls == []
        assert ch.out
    finally:
        ch.close()
        theirs.close()
