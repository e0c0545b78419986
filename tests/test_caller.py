"""The sans-io caller core: a template's state, fed reports as the kernel could split them."""

from __future__ import annotations

import os
import signal

import pytest

from anyfork import _caller as C
from anyfork import _protocol as wire
from helpers import is_open


@pytest.fixture
def fds() -> list[int]:
    """Real descriptors to stand for the sockets SPARE reports carry."""
    made: list[int] = []
    for _ in range(3):
        made.extend(os.pipe())
    yield made
    for fd in made:
        if is_open(fd):
            os.close(fd)


def frames_of(parts: list[wire.Buffer]) -> list[tuple[int, int, bytes]]:
    """(kind, number of descriptors, payload) of each frame in ``parts``."""
    data = b"".join(bytes(p) for p in parts)
    out = []
    while data:
        version, kind, nfds, length = wire.HEADER.unpack_from(data)
        assert version == wire.VERSION
        end = wire.HEADER.size + length
        out.append((kind, nfds, data[wire.HEADER.size : end]))
        data = data[end:]
    return out


def feed_split(state: C.TemplateState, stream: bytes, fd_at: dict[int, list[int]],
               cut: int) -> list[C.Event]:
    """Feed ``stream`` in two reads split at ``cut``; descriptors arrive with
    the read holding the first byte of their frame, as the kernel delivers them."""
    events: list[C.Event] = []
    for start, end in ((0, cut), (cut, len(stream))):
        if start == end:
            continue
        attached = [fd for at, some in sorted(fd_at.items()) if start <= at < end for fd in some]
        events.extend(state.receive(stream[start:end], attached))
    return events


# --- intents ---------------------------------------------------------------------------


def test_fork_spawn_and_kill_return_the_frames_to_send() -> None:
    state = C.TemplateState()
    child, frame = state.fork(True)
    assert (child.seq, child.pid, child.done) == (1, None, False)
    assert frames_of(frame) == [(wire.FORK, 2, wire.FORK_PAYLOAD.pack(1, wire.FORK_NEW_REPORTS))]
    seq, frame = state.spawn(False)
    assert seq == 2
    assert frames_of(frame) == [(wire.SPAWN, 0, wire.FORK_PAYLOAD.pack(2, 0))]
    killed = frames_of(state.kill(child, signal.SIGTERM))
    assert [(k, n, wire.decode_kill(p)) for k, n, p in killed] == [(wire.KILL, 0, (1, signal.SIGTERM))]
    assert state.missing(3) == 2  # one is on its way


def test_a_closed_or_run_template_forks_nothing_and_kills_nothing() -> None:
    state = C.TemplateState()
    child, _ = state.fork(True)
    assert state.close(handed_over=True) == []
    for intent in (lambda: state.fork(False), lambda: state.spawn(False), lambda: state.kill(child, 9)):
        with pytest.raises(C.ProcessStateError, match="run"):
            intent()
    assert state.missing(3) == 0
    assert state.receive_eof() == [C.Ended("ran a function, which now owns its children")]


def test_a_closed_template_forks_nothing_but_still_kills_its_children() -> None:
    """Issue 14: a template the caller closed stays alive for its children,
    so KILL still goes to it; a template that ended kills nothing."""
    state = C.TemplateState()
    child, _ = state.fork(True)
    assert state.close() == []
    with pytest.raises(C.ProcessStateError, match="closed"):
        state.fork(False)
    (kind, _, payload), = frames_of(state.kill(child, 9))
    assert (kind, wire.decode_kill(payload)) == (wire.KILL, (child.seq, 9))
    state.receive_eof()
    with pytest.raises(C.ProcessStateError, match="exited"):
        state.kill(child, 9)


# --- reports ---------------------------------------------------------------------------


def test_every_split_of_a_report_stream_gives_the_same_events(fds: list[int]) -> None:
    spare_fd = fds[0]
    stream = b""
    fd_at: dict[int, list[int]] = {}
    reports = [wire.pid_report(1, 101), wire.spare_report(2, 102), wire.exit_report(1, -9),
               wire.failed_report(3, "no memory"), wire.lost_report(4, 104), wire.pid_report(5, 105)]
    for r in reports:
        if r[1] == wire.SPARE:
            fd_at[len(stream)] = [spare_fd]
        stream += r
    for cut in range(len(stream) + 1):
        state = C.TemplateState()
        one, _ = state.fork(True)
        state.spawn(False)
        three, _ = state.fork(False)
        four, _ = state.fork(False)
        five, _ = state.fork(False)
        events = feed_split(state, stream, fd_at, cut)
        assert [type(e) for e in events] == [C.Forked, C.SpareArrived, C.Exited, C.ForkFailed,
                                             C.Lost, C.Forked], cut
        assert (one.pid, one.returncode, one.done) == (101, -9, True)
        assert (three.failed, four.lost, five.pid) == ("no memory", True, 105)
        assert list(state.children) == [5]  # the others are gone; their records say how
        taken = state.take()
        assert taken is not None
        assert (taken[0].seq, taken[0].pid, taken[1]) == (2, 102, spare_fd)
        assert state.take() is None
        assert is_open(spare_fd)  # the caller's now


def test_the_record_outlives_whoever_asked_for_the_process() -> None:
    state = C.TemplateState()
    child, _ = state.fork(True)
    held = child  # what a pool keeps; the Process that asked may be gone
    del child
    state.receive(wire.pid_report(1, 50) + wire.exit_report(1, 3))
    assert (held.pid, held.returncode) == (50, 3)
    assert state.children == {}


def test_out_of_order_and_duplicate_reports_are_absorbed() -> None:
    state = C.TemplateState()
    child, _ = state.fork(True)
    events = state.receive(wire.exit_report(1, 0))  # before its pid
    assert events == [C.Exited(child)]
    assert (child.pid, child.returncode) == (None, 0)
    # The pid, and the exit again, late: nothing changes, nothing is raised.
    assert state.receive(wire.pid_report(1, 7) + wire.exit_report(1, 5) + wire.lost_report(1, 7)) == []
    assert (child.pid, child.returncode, child.lost) == (None, 0, False)
    other, _ = state.fork(False)
    assert state.receive(wire.pid_report(2, 8) + wire.pid_report(2, 8)) == [C.Forked(other)]
    assert state.ended is None


@pytest.mark.parametrize(
    ("garbage", "what"),
    [
        (wire.pid_report(9, 1), "never asked for"),
        (wire.exit_report(0, 1), "never asked for"),
        (wire.pid_report(1, 10) + wire.pid_report(1, 11), "two pids"),
        (b"".join(bytes(p) for p in wire.run_frame("x:y")), "unexpected frame kind"),
        (b"\x09" + wire.pid_report(1, 1)[1:], "protocol version"),
    ],
)
def test_garbage_ends_the_channel_as_corrupt_and_lets_the_pool_go(garbage: bytes, what: str,
                                                                   fds: list[int]) -> None:
    state = C.TemplateState()
    child, _ = state.fork(True)
    state.spawn(False)
    state.receive(wire.spare_report(2, 20), [fds[0]])
    events = [e for e in state.receive(garbage) if not isinstance(e, C.Forked)]
    assert events[0] == C.Discard(fds[0])  # the caller closes it: its process sees EOF
    assert isinstance(events[-1], C.Ended)
    assert events[-1].corrupt
    assert what in events[-1].reason
    assert state.corrupt
    assert state.closed
    assert state.children == {}
    # Whatever comes after is dropped, its descriptors closed.
    assert state.receive(wire.spare_report(2, 20), [fds[1]]) == []
    assert not is_open(fds[1])
    assert state.receive_eof() == []
    assert child.done is False  # the state can't know; the driver says "template gone"


def test_descriptors_of_a_corrupt_frame_are_closed(fds: list[int]) -> None:
    state = C.TemplateState()
    events = state.receive(wire.pid_report(1, 1), [fds[2]])  # a PID never carries one
    assert isinstance(events[-1], C.Ended)
    assert events[-1].corrupt
    assert not is_open(fds[2])


def test_a_spare_of_an_old_state_is_discarded_never_pooled(fds: list[int]) -> None:
    state = C.TemplateState()
    state.spawn(False)
    state.spawn(False)
    state.receive(wire.spare_report(1, 11), [fds[0]])
    assert state.changed() == [C.Discard(fds[0])]  # pooled, from the old state
    assert state.receive(wire.spare_report(2, 12), [fds[1]]) == [C.Discard(fds[1])]  # on its way
    assert state.take() is None
    assert state.missing(2) == 2


def test_a_spare_that_exited_while_it_waited_is_never_handed_out(fds: list[int]) -> None:
    state = C.TemplateState()
    state.spawn(False)
    state.spawn(False)
    state.receive(wire.spare_report(1, 11) + wire.spare_report(2, 12), [fds[0], fds[1]])
    assert state.receive(wire.exit_report(1, -9)) == [C.Discard(fds[0])]
    taken = state.take()
    assert taken is not None
    assert taken[0].pid == 12
    # An exit reported before its SPARE (a template never does that): it stays dead.
    state.spawn(False)
    state.receive(wire.exit_report(3, -9))
    assert state.receive(wire.spare_report(3, 13), [fds[2]]) == [C.Discard(fds[2])]


def test_a_spare_lost_in_transit_and_a_duplicate_spare(fds: list[int]) -> None:
    state = C.TemplateState()
    state.spawn(False)
    assert state.receive(wire.spare_report(1, 11), [-1]) == []  # the kernel dropped its socket
    assert state.missing(1) == 1
    seq, _ = state.spawn(False)
    state.receive(wire.spare_report(seq, 12), [fds[0]])
    assert state.receive(wire.spare_report(seq, 12), [fds[1]]) == [C.Discard(fds[1])]
    assert state.missing(1) == 0


def test_closing_lets_the_pool_and_what_is_on_its_way_go(fds: list[int]) -> None:
    state = C.TemplateState()
    state.spawn(False)
    state.spawn(False)
    state.receive(wire.spare_report(1, 11), [fds[0]])
    assert state.close() == [C.Discard(fds[0])]
    assert state.receive(wire.spare_report(2, 12), [fds[1]]) == [C.Discard(fds[1])]
    assert state.take() is None


def test_stop_ahead_lets_the_pool_go_but_forks_on() -> None:
    state = C.TemplateState()
    state.spawn(False)
    assert state.stop_ahead() == []
    assert state.missing(1) == 1
    state.fork(False)  # still a template


def test_eof_inside_a_report_and_after_it() -> None:
    state = C.TemplateState()
    child, _ = state.fork(True)
    state.receive(wire.pid_report(1, 5)[:7])
    assert state.receive_eof() == [C.Ended("exited")]
    assert state.ended == "exited"
    assert state.children == {}
    assert child.pid is None
