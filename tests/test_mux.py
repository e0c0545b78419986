"""The channel multiplexer a remote connection runs (_mux): sans-io, so no processes here."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anyfork import _mux as M


def wire(src: M.Mux, dst: M.Mux, split: int | None = None) -> list[M.Event]:
    """Move what ``src`` has to send into ``dst`` (in pieces of ``split`` bytes); dst's events."""
    data = b"".join(bytes(b) for b in src.data_to_send())
    step = split or max(1, len(data))
    for i in range(0, len(data), step):
        dst.receive_data(data[i : i + step])
    return list(dst.events())


def test_open_send_eof_close_round_trip() -> None:
    caller, remote = M.Mux(caller=True), M.Mux(caller=False)
    ch = caller.open("command")
    caller.send(ch, b"hello")
    caller.eof(ch)
    assert wire(caller, remote) == [M.Event(M.OPEN, ch, b"command"), M.Event(M.DATA, ch, b"hello"),
                                    M.Event(M.EOF, ch, b"")]
    remote.send(ch, b"back")
    remote.close(ch)
    assert wire(remote, caller) == [M.Event(M.DATA, ch, b"back"), M.Event(M.CLOSE, ch, b"")]
    assert caller.channels() == []  # it answered the CLOSE and forgot the channel
    assert wire(caller, remote) == []
    assert remote.channels() == []


def test_each_side_opens_its_own_numbers() -> None:
    caller, remote = M.Mux(caller=True), M.Mux(caller=False)
    a, b = caller.open("x"), caller.open("y")
    c = remote.open("z")
    assert (a % 2, b % 2, c % 2) == (1, 1, 0)
    assert a != b
    wire(caller, remote)
    wire(remote, caller)
    assert sorted(caller.channels()) == sorted(remote.channels()) == sorted([a, b, c])


@pytest.mark.parametrize("split", [1, 2, 3, 7, 9, 64])
def test_any_split_of_the_stream_gives_the_same_events(split: int) -> None:
    caller = M.Mux(caller=True)
    ch = caller.open("s")
    for chunk in (b"a", b"bc" * 100, b"", b"def"):
        caller.send(ch, chunk)
    caller.control(b"ctl")
    caller.eof(ch)
    stream = b"".join(bytes(b) for b in caller.data_to_send())
    whole = M.Mux(caller=False)
    whole.receive_data(stream)
    expected = list(whole.events())
    pieces = M.Mux(caller=False)
    for i in range(0, len(stream), split):
        pieces.receive_data(stream[i : i + split])
    assert list(pieces.events()) == expected
    assert b"".join(e.data for e in expected if e.kind == M.DATA) == b"a" + b"bc" * 100 + b"def"


def test_a_slow_reader_bounds_what_is_in_flight() -> None:
    caller, remote = M.Mux(caller=True), M.Mux(caller=False)
    ch = caller.open("big")
    wire(caller, remote)
    caller.send(ch, b"x" * (3 * M.WINDOW))
    got = wire(caller, remote)
    assert sum(len(e.data) for e in got) == M.WINDOW  # the window, and no more
    assert caller.pending(ch) == 2 * M.WINDOW  # the rest waits on the caller's side
    assert all(len(e.data) <= M.MAX_FRAME for e in got)
    remote.consumed(ch, M.WINDOW // 2)
    wire(remote, caller)  # the credit
    assert sum(len(e.data) for e in wire(caller, remote)) == M.WINDOW // 2
    assert caller.pending(ch) == 2 * M.WINDOW - M.WINDOW // 2


def test_eof_waits_behind_pending_data() -> None:
    caller, remote = M.Mux(caller=True), M.Mux(caller=False)
    ch = caller.open("big")
    wire(caller, remote)
    caller.send(ch, b"y" * (M.WINDOW + 10))
    caller.eof(ch)
    kinds = [e.kind for e in wire(caller, remote)]
    assert M.EOF not in kinds
    remote.consumed(ch, M.WINDOW)
    wire(remote, caller)
    tail = wire(caller, remote)
    assert [e.kind for e in tail] == [M.DATA, M.EOF]
    assert len(tail[0].data) == 10
    with pytest.raises(M.MuxError):
        caller.send(ch, b"late")


def test_credit_is_granted_in_lumps_not_per_message() -> None:
    # Broke (speed): a CREDIT for every DATA doubled the frames of each
    # request and reply over ssh, and woke the far side's relay for each.
    caller, remote = M.Mux(caller=True), M.Mux(caller=False)
    ch = caller.open("calls")
    wire(caller, remote)
    for _ in range(M.GRANT // 1024 - 1):
        caller.send(ch, b"m" * 1024)
        wire(caller, remote)
        remote.consumed(ch, 1024)
        assert not remote.has_output()  # no frame back for a message
    caller.send(ch, b"m" * 1024)
    wire(caller, remote)
    remote.consumed(ch, 1024)
    assert remote.has_output()  # a lump's worth: granted, in one CREDIT
    assert wire(remote, caller) == []
    caller.send(ch, b"n" * M.WINDOW)
    assert caller.pending(ch) == 0  # the lump was credited back: the window is whole again


def test_the_peers_eof_grants_what_was_held_back() -> None:
    # The lumps must not keep sent_all false for ever: bytes consumed
    # before the EOF came are credited as soon as it comes.
    caller, remote = M.Mux(caller=True), M.Mux(caller=False)
    ch = caller.open("out")
    caller.send(ch, b"z" * 100)
    wire(caller, remote)
    remote.consumed(ch, 100)
    assert not remote.has_output()
    caller.eof(ch)
    wire(caller, remote)
    wire(remote, caller)
    assert caller.sent_all(ch)


def test_a_channel_has_sent_all_only_once_the_peer_handed_every_byte_on() -> None:
    # Closing a channel drops what the peer still holds for its local socket,
    # so "sent" must mean "handed on", not "on the wire".
    caller, remote = M.Mux(caller=True), M.Mux(caller=False)
    ch = caller.open("out")
    caller.send(ch, b"z" * 100)
    caller.eof(ch)
    assert not caller.sent_all(ch)
    assert [e.kind for e in wire(caller, remote)] == [M.OPEN, M.DATA, M.EOF]
    assert not caller.sent_all(ch)  # on the wire, EOF too, but not handed on
    remote.consumed(ch, 60)
    wire(remote, caller)
    assert not caller.sent_all(ch)
    remote.consumed(ch, 40)
    wire(remote, caller)
    assert caller.sent_all(ch)


def test_one_stalled_channel_does_not_stop_another() -> None:
    caller, remote = M.Mux(caller=True), M.Mux(caller=False)
    slow, fast = caller.open("slow"), caller.open("fast")
    wire(caller, remote)
    caller.send(slow, b"s" * (2 * M.WINDOW))
    caller.send(fast, b"f" * 100)
    got = wire(caller, remote)
    assert b"".join(e.data for e in got if e.channel == fast) == b"f" * 100


def test_frames_after_a_local_close_are_dropped_until_the_answer() -> None:
    caller, remote = M.Mux(caller=True), M.Mux(caller=False)
    ch = caller.open("x")
    wire(caller, remote)
    remote.send(ch, b"in flight")
    caller.close(ch)  # crosses remote's DATA
    assert wire(remote, caller) == []  # dropped, no error
    assert [e.kind for e in wire(caller, remote)] == [M.CLOSE]
    wire(remote, caller)  # remote's answering CLOSE
    assert caller.channels() == remote.channels() == []


def test_crossing_closes() -> None:
    caller, remote = M.Mux(caller=True), M.Mux(caller=False)
    ch = caller.open("x")
    wire(caller, remote)
    caller.close(ch)
    remote.close(ch)
    assert wire(caller, remote) == []
    assert wire(remote, caller) == []
    assert caller.channels() == remote.channels() == []


def _raw(ch: int, kind: int, payload: bytes = b"") -> bytes:
    return M.HEADER.pack(ch, kind, len(payload)) + payload


@pytest.mark.parametrize(("stream", "why"), [
    (_raw(1, 99), "unknown frame kind"),
    (_raw(5, M.DATA, b"x"), "unknown channel"),
    (_raw(2, M.OPEN, b"x"), "not the peer's to open"),  # even numbers are the remote side's own
    (_raw(0, M.DATA, b"x"), "only CONTROL"),
    (_raw(3, M.CONTROL, b"x"), "CONTROL on channel"),
    (M.HEADER.pack(1, M.DATA, M.MAX_PAYLOAD + 1), "absurd"),
    (_raw(1, M.OPEN) + _raw(1, M.CREDIT, b"xy"), "wrong size"),
    (_raw(1, M.OPEN) + _raw(1, M.CREDIT, (1).to_bytes(4, "little")), "beyond the window"),
    (_raw(1, M.OPEN) + _raw(1, M.EOF) + _raw(1, M.DATA, b"x"), "after its EOF"),
    (_raw(1, M.OPEN) + _raw(1, M.OPEN), "not the peer's to open"),
])
def test_garbage_is_refused(stream: bytes, why: str) -> None:
    remote = M.Mux(caller=False)  # receives from a caller, who opens odd channels
    with pytest.raises(M.MuxError, match=why):
        remote.receive_data(stream)
    with pytest.raises(M.MuxError):
        remote.receive_data(b"more")  # dead from then on


def test_sending_beyond_the_window_is_refused() -> None:
    remote = M.Mux(caller=False)
    remote.receive_data(_raw(1, M.OPEN))
    flood = _raw(1, M.DATA, b"z" * M.MAX_FRAME) * (M.WINDOW // M.MAX_FRAME + 1)
    with pytest.raises(M.MuxError, match="beyond its window"):
        remote.receive_data(flood)


def test_the_end_of_the_connection_inside_a_frame_is_an_error() -> None:
    remote = M.Mux(caller=False)
    remote.receive_data(_raw(1, M.OPEN)[:5])
    with pytest.raises(M.MuxError, match="inside a frame"):
        remote.receive_data(b"")
    clean = M.Mux(caller=False)
    clean.receive_data(_raw(1, M.OPEN))
    clean.receive_data(b"")  # at a frame boundary: fine


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(1, 16))
def test_fuzz_garbage_never_raises_anything_but_muxerror(data: bytes, split: int) -> None:
    remote = M.Mux(caller=False)
    try:
        for i in range(0, len(data), split):
            remote.receive_data(data[i : i + split])
        list(remote.events())
    except M.MuxError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.binary(max_size=3000)), max_size=30),
       st.integers(1, 5000))
def test_fuzz_every_byte_arrives_in_order_per_channel(sends: list[tuple[int, bytes]], split: int) -> None:
    caller, remote = M.Mux(caller=True), M.Mux(caller=False)
    chans = [caller.open(str(i)) for i in range(3)]
    for i, data in sends:
        caller.send(chans[i], data)
    received: dict[int, bytearray] = {ch: bytearray() for ch in chans}
    for _ in range(100):
        for e in wire(caller, remote, split):
            if e.kind == M.DATA:
                received[e.channel] += e.data
                remote.consumed(e.channel, len(e.data))
        wire(remote, caller)
        if not any(caller.pending(ch) for ch in chans) and not caller.has_output():
            break
    for i, ch in enumerate(chans):
        assert bytes(received[ch]) == b"".join(d for j, d in sends if j == i)
