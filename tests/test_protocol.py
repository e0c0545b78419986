"""The sans-io wire format: encoders, Decoder and Outbox, with no sockets."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anyfork import _protocol as wire
from helpers import is_open

ITEMS: list[bytes | str] = [
    b"",
    "",
    b"\x00\xff" * 3,
    "plain",
    "caf\u00e9 \U0001f600",
    "lone \udcff and \ud800 surrogates",
    b"x" * 65535,
    b"y" * 65536,
    b"z" * 65537,
]


def decode_all(stream: bytes, kinds: frozenset[int] = wire.COMMANDS) -> list[tuple[int, bytes]]:
    dec = wire.Decoder(kinds)
    dec.feed(stream)
    frames = []
    while (f := dec.next_frame()) is not None:
        frames.append((f.kind, f.payload))
    dec.eof()
    return frames


def joined(parts: list[wire.Buffer]) -> bytes:
    return b"".join(bytes(p) for p in parts)


@pytest.fixture
def pipe_fds() -> list[int]:
    """Four real descriptors to feed a decoder; closed afterwards if it didn't."""
    fds: list[int] = []
    for _ in range(2):
        fds.extend(os.pipe())
    yield fds
    for fd in fds:
        if is_open(fd):
            os.close(fd)


# --- round trips ------------------------------------------------------------------------


@pytest.mark.parametrize("item", ITEMS, ids=lambda i: f"{type(i).__name__}{len(i)}")
def test_items_round_trip_keep_value_and_type(item: bytes | str) -> None:
    [(kind, payload)] = decode_all(joined(wire.items_frame(wire.ARG, [item])))
    assert kind == wire.ARG
    [back] = wire.decode_items(payload)
    assert type(back) is type(item)
    assert back == item


def test_several_items_in_one_frame_keep_their_order() -> None:
    [(_, payload)] = decode_all(joined(wire.items_frame(wire.EVAL, ITEMS)))
    assert wire.decode_items(payload) == ITEMS


def test_bytes_like_items_are_encoded_without_changing_them() -> None:
    parts = wire.items_frame(wire.ARG, [bytes(bytearray(b"ab")), bytes(memoryview(b"cd"))])
    [(_, payload)] = decode_all(joined(parts))
    assert wire.decode_items(payload) == [b"ab", b"cd"]


def test_command_frames_round_trip() -> None:
    stream = b"".join([
        joined(wire.run_frame("pkg.mod:Class.method")),
        joined(wire.kill_frame(7, 9)),
        joined(wire.spawn_frame(3, False)),
        joined(wire.items_frame(wire.PATH, ["/a", ""])),
        joined(wire.items_frame(wire.REQUIRE, ["os", "json"])),
    ])
    frames = decode_all(stream)
    assert [k for k, _ in frames] == [wire.RUN, wire.KILL, wire.SPAWN, wire.PATH, wire.REQUIRE]
    assert wire.decode_text(frames[0][1]) == "pkg.mod:Class.method"
    assert wire.decode_kill(frames[1][1]) == (7, 9)
    assert wire.decode_fork(frames[2][1]) == (3, False)
    assert wire.decode_strs(frames[3][1]) == ["/a", ""]
    assert wire.decode_strs(frames[4][1]) == ["os", "json"]


def test_fork_frame_round_trips_with_its_descriptors(pipe_fds: list[int]) -> None:
    dec = wire.Decoder(wire.COMMANDS)
    dec.feed(joined(wire.fork_frame(5, True)), pipe_fds[:2])
    f = dec.next_frame()
    assert f is not None
    assert f.kind == wire.FORK
    assert f.fds == pipe_fds[:2]
    assert wire.decode_fork(f.payload) == (5, True)
    dec.feed(joined(wire.fork_frame(6, False)), pipe_fds[2:3])
    g = dec.next_frame()
    assert g is not None
    assert g.fds == pipe_fds[2:3]
    assert wire.decode_fork(g.payload) == (6, False)
    f.close()
    g.close()
    assert not any(is_open(fd) for fd in pipe_fds[:3])


def test_reports_round_trip() -> None:
    stream = wire.pid_report(1, 4242) + wire.exit_report(1, -9) + wire.failed_report(2, "fork failed: EAGAIN")
    frames = decode_all(stream, wire.REPORTS)
    assert [k for k, _ in frames] == [wire.PID, wire.EXIT, wire.FAILED]
    assert wire.decode_seq_int(frames[0][1]) == (1, 4242)
    assert wire.decode_seq_int(frames[1][1]) == (1, -9)
    assert wire.decode_failed(frames[2][1]) == (2, "fork failed: EAGAIN")


def test_frame_header_carries_version_kind_fds_and_64_bit_length() -> None:
    header = joined(wire.frame(wire.FH, (), 3))
    assert header == struct.pack("<BBHQ", wire.VERSION, wire.FH, 3, 0)
    parts = wire.frame(wire.ARG, [b"x" * 10, b"y" * 5])
    assert struct.unpack("<BBHQ", bytes(parts[0])) == (wire.VERSION, wire.ARG, 0, 15)


# --- split at every byte boundary -------------------------------------------------------

STREAM = b"".join([
    joined(wire.items_frame(wire.PATH, ["/x", "/y"])),
    joined(wire.items_frame(wire.EVAL, ["def f(sock): pass", b"arg"])),
    joined(wire.items_frame(wire.ARG, ["s\udcff", b"", b"\x01" * 300])),
    joined(wire.kill_frame(1, 15)),
    joined(wire.run_frame("f")),
])


def test_stream_split_at_every_byte_boundary_decodes_the_same() -> None:
    expected = decode_all(STREAM)
    assert len(expected) == 5
    for cut in range(len(STREAM) + 1):
        dec = wire.Decoder(wire.COMMANDS)
        frames = []
        for piece in (STREAM[:cut], STREAM[cut:]):
            dec.feed(piece)
            while (f := dec.next_frame()) is not None:
                frames.append((f.kind, f.payload))
        dec.eof()
        assert frames == expected, f"split at {cut}"


def test_stream_fed_one_byte_at_a_time_decodes_the_same() -> None:
    dec = wire.Decoder(wire.COMMANDS)
    frames = []
    for i in range(len(STREAM)):
        dec.feed(STREAM[i : i + 1])
        while (f := dec.next_frame()) is not None:
            frames.append((f.kind, f.payload))
    dec.eof()
    assert frames == decode_all(STREAM)


def test_wanted_never_asks_past_the_current_frame() -> None:
    """The serve loop reads exactly wanted() bytes so it never takes bytes
    after RUN that belong to the user's function."""
    run = joined(wire.run_frame("f"))
    dec = wire.Decoder(wire.COMMANDS)
    pos = 0
    while True:
        n = dec.wanted()
        assert n > 0
        dec.feed(run[pos : pos + n])
        pos += n
        f = dec.next_frame()
        if f is not None:
            break
    assert pos == len(run)
    assert f.kind == wire.RUN
    assert dec.idle()


def test_descriptors_sent_with_a_frames_first_byte_go_to_that_frame(pipe_fds: list[int]) -> None:
    """Descriptors arrive with the first byte of the sendmsg that carried
    them; wherever the stream is split, they end up on the FH frame."""
    arg = joined(wire.items_frame(wire.ARG, [b"before"]))
    fh = joined(wire.fh_frame(2))
    tail = joined(wire.items_frame(wire.ARG, [b"after"]))
    stream = arg + fh + tail
    for cut in range(len(stream) + 1):
        fds = [os.dup(pipe_fds[0]), os.dup(pipe_fds[1])]
        dec = wire.Decoder(wire.COMMANDS)
        frames = []
        for start, piece in ((0, stream[:cut]), (cut, stream[cut:])):
            # The fds ride on the piece holding the FH frame's first byte.
            with_fds = start <= len(arg) < start + len(piece)
            dec.feed(piece, fds if with_fds else ())
            while (f := dec.next_frame()) is not None:
                frames.append(f)
        dec.eof()
        assert [f.kind for f in frames] == [wire.ARG, wire.FH, wire.ARG], f"split at {cut}"
        assert frames[1].fds == fds
        assert frames[0].fds == frames[2].fds == []
        frames[1].close()
        assert not any(is_open(fd) for fd in fds)


# --- malformed streams ------------------------------------------------------------------


def header(version: int = wire.VERSION, kind: int = wire.ARG, nfds: int = 0, length: int = 0) -> bytes:
    return struct.pack("<BBHQ", version, kind, nfds, length)


@pytest.mark.parametrize(
    ("data", "nfds", "match"),
    [
        (header(version=0), 0, "version"),
        (header(version=2), 0, "version"),
        (header(kind=200), 0, "kind"),
        (header(kind=wire.PID), 0, "kind"),  # a report is not a command
        (header(length=wire.MAX_PAYLOAD + 1), 0, "length"),
        (header(length=2**64 - 1), 0, "length"),
        (header(kind=wire.ARG, nfds=1), 1, "descriptors"),
        (header(kind=wire.RUN, nfds=2), 2, "descriptors"),
        (header(kind=wire.FH, nfds=0), 0, "descriptors"),
        (header(kind=wire.FH, nfds=1, length=4) + b"abcd", 1, "descriptors"),
        (header(kind=wire.FH, nfds=254), 0, "descriptors"),
        (header(kind=wire.FORK, nfds=3, length=9) + bytes(9), 3, "descriptors"),
        (header(kind=wire.FH, nfds=2), 1, "without its descriptors"),
        (joined(wire.items_frame(wire.ARG, [b"x"])), 1, "no frame"),  # fds on a frame that takes none
    ],
)
def test_malformed_header_is_a_protocol_error_and_closes_fds(
    data: bytes, nfds: int, match: str, pipe_fds: list[int]
) -> None:
    dec = wire.Decoder(wire.COMMANDS)
    fds = pipe_fds[:nfds]
    dec.feed(data, fds)
    with pytest.raises(wire.ProtocolError, match=match):
        dec.next_frame()
    assert not any(is_open(fd) for fd in fds)


def test_descriptors_with_no_bytes_at_all_are_an_error(pipe_fds: list[int]) -> None:
    dec = wire.Decoder(wire.COMMANDS)
    dec.feed(b"", pipe_fds[:1])
    with pytest.raises(wire.ProtocolError):
        dec.next_frame()
    assert not is_open(pipe_fds[0])


@pytest.mark.parametrize("cut", [1, wire.HEADER.size - 1, wire.HEADER.size, wire.HEADER.size + 3])
def test_stream_truncated_at_eof_is_a_protocol_error(cut: int, pipe_fds: list[int]) -> None:
    data = joined(wire.items_frame(wire.ARG, [b"payload"]))
    dec = wire.Decoder(wire.COMMANDS)
    dec.feed(data[:cut])
    assert dec.next_frame() is None
    with pytest.raises(wire.ProtocolError, match="inside a frame"):
        dec.eof()


def test_eof_inside_a_frame_closes_its_descriptors(pipe_fds: list[int]) -> None:
    dec = wire.Decoder(wire.COMMANDS)
    fork = joined(wire.fork_frame(1, True))
    dec.feed(fork[:-1], pipe_fds[:2])
    assert dec.next_frame() is None
    with pytest.raises(wire.ProtocolError):
        dec.eof()
    assert not any(is_open(fd) for fd in pipe_fds[:2])


def test_eof_at_a_frame_boundary_is_clean() -> None:
    dec = wire.Decoder(wire.COMMANDS)
    dec.feed(joined(wire.run_frame("f")))
    assert dec.next_frame() is not None
    dec.eof()  # no error


def test_a_failed_decoder_stays_failed_and_closes_what_it_is_fed(pipe_fds: list[int]) -> None:
    dec = wire.Decoder(wire.COMMANDS)
    dec.feed(header(version=9))
    with pytest.raises(wire.ProtocolError):
        dec.next_frame()
    with pytest.raises(wire.ProtocolError):
        dec.feed(joined(wire.fh_frame(1)), pipe_fds[:1])
    assert not is_open(pipe_fds[0])
    with pytest.raises(wire.ProtocolError):
        dec.next_frame()


def test_decoder_close_closes_descriptors_of_an_unfinished_frame(pipe_fds: list[int]) -> None:
    dec = wire.Decoder(wire.COMMANDS)
    fork = joined(wire.fork_frame(1, True))
    dec.feed(fork[:-2], pipe_fds[:2])
    assert dec.next_frame() is None
    dec.close()
    assert not any(is_open(fd) for fd in pipe_fds[:2])


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"b\x05", "truncated item header"),
        (struct.pack("<cQ", b"b", 5) + b"abc", "longer than its frame"),
        (struct.pack("<cQ", b"x", 0), "unknown item tag"),
        (struct.pack("<cQ", b"s", 1) + b"\xff", "not UTF-8"),
    ],
)
def test_malformed_items_are_protocol_errors(payload: bytes, match: str) -> None:
    with pytest.raises(wire.ProtocolError, match=match):
        wire.decode_items(payload)


def test_fixed_size_payloads_of_the_wrong_size_are_protocol_errors() -> None:
    for decode in (wire.decode_fork, wire.decode_kill, wire.decode_seq_int):
        with pytest.raises(wire.ProtocolError):
            decode(b"\x00" * 3)
    with pytest.raises(wire.ProtocolError, match="flags"):
        wire.decode_fork(struct.pack("<QB", 1, 0x80))
    with pytest.raises(wire.ProtocolError):
        wire.decode_strs(joined(wire.encode_items([b"bytes where text is expected"])))
    with pytest.raises(wire.ProtocolError):
        wire.decode_failed(b"\x01")


# --- fuzz ---------------------------------------------------------------------------------

_kinds = st.sampled_from(sorted(wire.COMMANDS | wire.REPORTS | {0, 10, 63, 67, 255}))
_headers = st.builds(
    header,
    version=st.sampled_from([wire.VERSION, wire.VERSION, wire.VERSION, 0, 2, 255]),
    kind=_kinds,
    nfds=st.integers(0, 4),
    length=st.one_of(
        st.integers(0, 40), st.sampled_from([wire.MAX_PAYLOAD, wire.MAX_PAYLOAD + 1, 2**64 - 1])
    ),
)
_valid = st.sampled_from([
    joined(wire.items_frame(wire.ARG, ["a", b"b"])),
    joined(wire.fh_frame(1)),
    joined(wire.fh_frame(2)),
    joined(wire.fork_frame(1, True)),
    joined(wire.fork_frame(2, False)),
    joined(wire.run_frame("f")),
    joined(wire.kill_frame(1, 15)),
])
_chunks = st.lists(st.one_of(st.binary(max_size=40), _headers, _valid), max_size=8)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=_chunks, fd_at=st.lists(st.integers(0, 8), max_size=4), splits=st.integers(1, 7))
def test_fuzz_garbage_only_raises_protocol_error_and_never_leaks_fds(
    chunks: list[bytes], fd_at: list[int], splits: int
) -> None:
    stream = b"".join(chunks)
    pieces = [stream[i : i + splits] for i in range(0, len(stream), splits)] or [b""]
    fed: list[int] = []
    by_piece: dict[int, list[int]] = {}
    for at in fd_at:
        r, w = os.pipe()
        os.close(w)
        fed.append(r)
        by_piece.setdefault(min(at, len(pieces) - 1), []).append(r)
    frames: list[wire.Frame] = []
    fed_so_far: list[int] = []
    dec = wire.Decoder(wire.COMMANDS)
    try:
        try:
            for i, piece in enumerate(pieces):
                given_now = by_piece.get(i, [])
                fed_so_far.extend(given_now)
                dec.feed(piece, given_now)
                while (f := dec.next_frame()) is not None:
                    frames.append(f)
                    # Payload decoders see garbage too.
                    for decode in (wire.decode_items, wire.decode_fork, wire.decode_kill,
                                   wire.decode_text, wire.decode_seq_int, wire.decode_failed):
                        try:
                            decode(f.payload)
                        except wire.ProtocolError:
                            pass
            dec.eof()
        except wire.ProtocolError:
            # On an error the decoder has closed everything it still held:
            # only the descriptors of frames already handed out are open.
            handed_out = {fd for f in frames for fd in f.fds}
            leaked = [fd for fd in fed_so_far if fd not in handed_out and is_open(fd)]
            assert not leaked
        else:
            # A clean end: every descriptor fed belongs to a frame.
            assert sorted(fd for f in frames for fd in f.fds) == sorted(fed)
    finally:
        for f in frames:
            f.close()
        dec.close()
        for fd in set(fed) - set(fed_so_far):
            os.close(fd)
    assert not any(is_open(fd) for fd in fed)


# --- the command table ------------------------------------------------------------------


def test_every_kind_has_a_shape_and_the_kind_sets_are_the_tables() -> None:
    assert set(wire.COMMAND_TABLE) == wire.COMMANDS
    assert set(wire.REPORT_TABLE) == wire.REPORTS
    assert not wire.COMMANDS & wire.REPORTS
    assert not (wire.COMMANDS | wire.REPORTS) & set(wire.FAILURE_TABLE)
    assert set(wire.NAMES) == wire.COMMANDS | wire.REPORTS | set(wire.FAILURE_TABLE)


@pytest.mark.parametrize(
    ("kind", "nfds", "length", "ok"),
    [
        (wire.FORK, 1, 9, True), (wire.FORK, 2, 9, True), (wire.FORK, 0, 9, False), (wire.FORK, 1, 8, False),
        (wire.SPAWN, 0, 9, True), (wire.SPAWN, 1, 9, True), (wire.SPAWN, 2, 9, False),
        (wire.KILL, 0, 12, True), (wire.KILL, 0, 13, False),
        (wire.FH, wire.MAX_FDS, 0, True), (wire.FH, 1, 1, False),
        (wire.RUN, 0, 5000, True), (wire.EVAL, 1, 3, False),
    ],
)
def test_the_decoder_enforces_the_command_tables_shapes(
    kind: int, nfds: int, length: int, ok: bool
) -> None:
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(nfds)]
    dec = wire.Decoder(wire.COMMAND_TABLE)
    dec.feed(header(kind=kind, nfds=nfds, length=length) + bytes(length), fds)
    try:
        if ok:
            frame = dec.next_frame()
            assert frame is not None
            assert (frame.kind, len(frame.fds), len(frame.payload)) == (kind, nfds, length)
            frame.close()
        else:
            with pytest.raises(wire.ProtocolError):
                dec.next_frame()
            assert not any(is_open(fd) for fd in fds)
    finally:
        dec.close()


def test_a_table_without_fds_refuses_every_kind_that_carries_them_at_its_header() -> None:
    table = wire.without_fds(wire.COMMAND_TABLE, "a pipe pair")
    refused = {kind for kind, shape in table.items() if shape.refused}
    assert refused == {wire.FH, wire.FORK, wire.SPAWN}
    for kind in refused:
        dec = wire.Decoder(table)
        dec.feed(header(kind=kind, length=9))  # no descriptors can come: refused on the header alone
        with pytest.raises(wire.RefusedError, match=f"{wire.NAMES[kind]} carries descriptors"):
            dec.next_frame()
    dec = wire.Decoder(table)
    dec.feed(joined(wire.run_frame("f")))
    frame = dec.next_frame()
    assert frame is not None
    assert frame.kind == wire.RUN


# --- matchers: the serve loop's fast paths against the Decoder ----------------------------------

# The verdicts: the frame taken (kind, descriptors, payload), "incomplete"
# (the stream ended first), "error", or None (a matcher declines it).
Verdict = tuple[int, int, object] | str | None


def by_decoder(data: bytes, nfds: int) -> Verdict:
    """What a Decoder on the command table makes of ``data``, read the way
    the serve loop reads: a header with whatever descriptors came with it,
    then what the decoder wants, never past the frame."""
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(nfds)]
    dec = wire.Decoder(wire.COMMAND_TABLE)
    try:
        dec.feed(data[: wire.HEADER.size], fds)
        frame = dec.next_frame()
        if frame is None and dec.wanted() > 0 and len(data) > wire.HEADER.size:
            dec.feed(data[wire.HEADER.size : wire.HEADER.size + dec.wanted()])
            frame = dec.next_frame()
        if frame is None:
            return "incomplete"
        got_fds = len(frame.fds)
        frame.close()
        if frame.kind in (wire.FORK, wire.SPAWN):
            return frame.kind, got_fds, wire.decode_fork(frame.payload)  # what the handler serves
        return frame.kind, got_fds, frame.payload
    except wire.ProtocolError:
        return "error"
    finally:
        dec.close()
        assert not any(is_open(fd) for fd in fds)


def by_run_matcher(data: bytes, nfds: int) -> Verdict:
    """What Server._first_command takes."""
    length = wire.match_run(data[: wire.HEADER.size])
    if length < 0 or nfds:
        return None
    payload = data[wire.HEADER.size : wire.HEADER.size + length]
    return (wire.RUN, 0, payload) if len(payload) == length else "incomplete"


def by_fork_matcher(data: bytes, nfds: int) -> Verdict:
    """What Server._template_loop takes."""
    want = wire.match_fork(data[: wire.HEADER.size])
    if want < 0 or nfds != want:
        return None
    seq = wire.match_fork_payload(data[wire.HEADER.size : wire.HEADER.size + wire.FORK_PAYLOAD.size])
    if seq < 0:
        return None
    return (wire.FORK if want else wire.SPAWN), want, (seq, False)  # served on the current channel


_VALID_FRAMES = [
    (joined(wire.run_frame("helpers:echo")), 0),
    (joined(wire.run_frame("")), 0),
    (joined(wire.run_frame("x" * 300)), 0),
    (joined(wire.fork_frame(7, False)), 1),
    (joined(wire.fork_frame(2**64 - 1, False)), 1),
    (joined(wire.fork_frame(3, True)), 2),
    (joined(wire.spawn_frame(9, False)), 0),
    (joined(wire.spawn_frame(0, True)), 1),
    (joined(wire.items_frame(wire.ARG, ["a", b"b"])), 0),
    (joined(wire.items_frame(wire.EVAL, ["pass"])), 0),
    (joined(wire.fh_frame(2)), 2),
    (joined(wire.kill_frame(1, 15)), 0),
]


@st.composite
def _mutated(draw: st.DrawFn) -> tuple[bytes, int]:
    data, nfds = draw(st.sampled_from(_VALID_FRAMES))
    buf = bytearray(data)
    for _ in range(draw(st.integers(0, 3))):
        how = draw(st.sampled_from(["flip", "length", "nfds-field", "fds", "cut", "extend", "kind"]))
        if how == "flip" and buf:
            i = draw(st.integers(0, len(buf) - 1))
            buf[i] ^= draw(st.integers(1, 255))
        elif how == "length":
            n = draw(st.one_of(st.integers(0, 40), st.sampled_from([wire.MAX_PAYLOAD, wire.MAX_PAYLOAD + 1])))
            buf[4:12] = n.to_bytes(8, "little")
        elif how == "nfds-field":
            buf[2:4] = draw(st.integers(0, 3)).to_bytes(2, "little")
        elif how == "fds":
            nfds = draw(st.integers(0, 3))
        elif how == "cut":
            del buf[draw(st.integers(0, len(buf))) :]
        elif how == "extend":
            buf += draw(st.binary(min_size=1, max_size=12))
        elif how == "kind" and len(buf) > 1:
            buf[1] = draw(st.sampled_from(sorted(wire.COMMANDS | {0, 200})))
    return bytes(buf), nfds


def _check_matchers(data: bytes, nfds: int) -> None:
    decoded = by_decoder(data, nfds)
    for matcher, kinds in ((by_run_matcher, {wire.RUN}), (by_fork_matcher, {wire.FORK, wire.SPAWN})):
        taken = matcher(data, nfds)
        if taken is not None:
            # What a fast path takes, the decoder takes the same way.
            assert taken == decoded, (matcher.__name__, data, nfds)
        elif isinstance(decoded, tuple) and decoded[0] in kinds:
            # What a fast path declines is not a frame of the shape it serves.
            kind, got_fds, meaning = decoded
            if kind == wire.RUN:
                assert got_fds, (data, nfds)
            else:
                new_reports = meaning[1]  # type: ignore[index]
                assert got_fds != (kind == wire.FORK) or new_reports, (data, nfds)


@pytest.mark.parametrize(("data", "nfds"), _VALID_FRAMES)
def test_matchers_agree_with_the_decoder_on_every_valid_frame(data: bytes, nfds: int) -> None:
    _check_matchers(data, nfds)
    taken = by_run_matcher(data, nfds) or by_fork_matcher(data, nfds)
    kind = data[1]
    fast = kind == wire.RUN or (kind in (wire.FORK, wire.SPAWN) and not wire.decode_fork(data[12:])[1])
    assert (taken is not None) == fast  # and each fast path takes every frame of its shape


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_mutated())
def test_matchers_agree_with_the_decoder_on_mutated_frames(case: tuple[bytes, int]) -> None:
    _check_matchers(*case)


def test_match_fork_payload_takes_only_a_plain_payload() -> None:
    assert wire.match_fork_payload(wire.FORK_PAYLOAD.pack(5, 0)) == 5
    assert wire.match_fork_payload(wire.FORK_PAYLOAD.pack(5, wire.FORK_NEW_REPORTS)) == -1
    assert wire.match_fork_payload(wire.FORK_PAYLOAD.pack(5, 0)[:-1]) == -1


# --- outbox -------------------------------------------------------------------------------


class FakeKernel:
    """Takes at most ``step`` bytes per sendmsg and records what it got."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.data = bytearray()
        self.fds_at: list[tuple[int, list[int]]] = []  # (stream offset, fds)

    def send(self, out: wire.Outbox) -> None:
        while out:
            buffers, fds = out.chunk()
            n = min(self.step, sum(len(b) for b in buffers))
            if fds:
                self.fds_at.append((len(self.data), list(fds)))
            taken = b"".join(bytes(b) for b in buffers)[:n]
            self.data += taken
            out.sent(n)


@pytest.fixture
def closes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record every descriptor the protocol module closes (without closing)."""
    closed: list[int] = []
    monkeypatch.setattr(wire, "close_fd", closed.append)
    return closed


def _outbox_load(out: wire.Outbox) -> tuple[bytes, dict[int, list[int]]]:
    a = wire.items_frame(wire.ARG, [b"first", "second"])
    fh1 = wire.fh_frame(2)
    b = wire.items_frame(wire.ARG, [b"x" * 100])
    fh2 = wire.fh_frame(1)
    run = wire.run_frame("f")
    out.put(a)
    out.put(fh1, [1001, 1002])
    out.put(b)
    out.put(fh2, [1003])
    out.put(run)
    offsets = {}
    stream = b""
    for parts, fds in ((a, None), (fh1, [1001, 1002]), (b, None), (fh2, [1003]), (run, None)):
        if fds:
            offsets[len(stream)] = fds
        stream += joined(parts)
    return stream, offsets


@pytest.mark.parametrize("step", [1, 2, 3, 7, 16, 17, 64, 1000])
def test_outbox_partial_sends_keep_order_and_close_each_fd_once(step: int, closes: list[int]) -> None:
    out = wire.Outbox()
    stream, offsets = _outbox_load(out)
    assert len(out) == len(stream)
    kernel = FakeKernel(step)
    kernel.send(out)
    assert bytes(kernel.data) == stream
    # Each set of descriptors went with the first byte of its own frame...
    assert dict(kernel.fds_at) == offsets
    # ...and was closed exactly once, after the kernel took it.
    assert sorted(closes) == [1001, 1002, 1003]
    out.close()
    assert sorted(closes) == [1001, 1002, 1003]
    assert not out
    assert len(out) == 0


def test_outbox_sent_with_every_n_leaves_the_exact_rest(closes: list[int]) -> None:
    reference = wire.Outbox()
    stream, _ = _outbox_load(reference)
    first_chunk, _ = reference.chunk()
    size = sum(len(b) for b in first_chunk)
    for n in range(size + 1):
        out = wire.Outbox()
        _outbox_load(out)
        out.sent(n)
        rest = FakeKernel(10**9)
        rest.send(out)
        assert bytes(rest.data) == stream[n:], f"sent({n})"


def test_outbox_chunk_never_mixes_descriptors_of_two_frames() -> None:
    out = wire.Outbox()
    out.put(wire.fh_frame(1), [1001])
    out.put(wire.fh_frame(1), [1002])
    buffers, fds = out.chunk()
    assert fds == [1001]
    assert b"".join(bytes(b) for b in buffers) == joined(wire.fh_frame(1))
    out.sent(sum(len(b) for b in buffers))
    _, fds = out.chunk()
    assert fds == [1002]


def test_outbox_close_closes_only_unsent_descriptors_once(closes: list[int]) -> None:
    out = wire.Outbox()
    out.put(wire.fh_frame(1), [1001])
    out.put(wire.fh_frame(1), [1002])
    out.sent(1)  # the first frame's descriptors went with its first byte
    assert closes == [1001]
    out.close()
    out.close()
    assert closes == [1001, 1002]
    assert not out


def test_outbox_sent_zero_changes_nothing(closes: list[int]) -> None:
    out = wire.Outbox()
    out.put(wire.fh_frame(1), [1001])
    out.sent(0)
    assert closes == []
    assert len(out) == wire.HEADER.size


def test_outbox_keeps_large_payloads_as_views_not_copies() -> None:
    big = b"q" * (1 << 20)
    out = wire.Outbox()
    out.put(wire.items_frame(wire.ARG, [big]))
    buffers, _ = out.chunk()
    assert any(b.obj is big for b in buffers)


# --- ancillary data helpers -------------------------------------------------------------------


def test_ancillary_and_unpack_fds_round_trip() -> None:
    anc = wire.ancillary([3, 4, 5], 1, 1)
    assert wire.unpack_fds(anc, 1, 1) == [3, 4, 5]
    assert wire.ancillary([], 1, 1) == []
    assert wire.unpack_fds([(2, 1, anc[0][2])], 1, 1) == []  # another level


def test_unpack_fds_takes_the_whole_descriptors_of_a_truncated_record() -> None:
    data = struct.pack("3i", 7, 8, 9)[:10]
    assert wire.unpack_fds([(1, 1, data)], 1, 1) == [7, 8]


def test_protocol_module_does_no_socket_io() -> None:
    import ast as pyast
    import inspect

    tree = pyast.parse(inspect.getsource(wire))
    imported = {a.name for n in pyast.walk(tree) if isinstance(n, (pyast.Import, pyast.ImportFrom))
                for a in n.names}
    imported |= {n.module for n in pyast.walk(tree) if isinstance(n, pyast.ImportFrom) and n.module}
    assert not imported & {"socket", "select", "selectors", "asyncio"}
