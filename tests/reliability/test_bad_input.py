"""Bad input (issue 5, item 8): a malformed stream is never executed.

The serve loop of a real child gets garbage, truncated frames, a wrong
version, absurd lengths and descriptors where none belong, each followed by
(or wrapped around) a frame that would create a marker file if it ran.  The
sans-io decoders get the same treatment in-process, with hypothesis and with
every split point of a valid stream; the caller's report reader too.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anyfork import _protocol as P
from anyfork._backend import deadline_after, run_blocking
from anyfork._caller import TemplateState
from anyfork._reports import ReportChannel

HDR = struct.Struct("<BBHQ")


def _frame_bytes(parts) -> bytes:
    return b"".join(bytes(p) for p in parts)


def _marker_eval(marker) -> bytes:
    return _frame_bytes(P.items_frame(P.EVAL, [f"open({str(marker)!r}, 'w').close()"]))


def _is_closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


class ServeChild:
    """A real serve loop (``anyfork._boot.main``) in a child, stderr to a file."""

    def __init__(self, tmp_path) -> None:
        self.sock, theirs = socket.socketpair()
        self.errpath = tmp_path / "stderr"
        with open(self.errpath, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", f"from anyfork._boot import main; main({theirs.fileno()})"],
                pass_fds=[theirs.fileno()], stderr=err, cwd=tmp_path)
        theirs.close()

    def send(self, data: bytes, fds=()) -> None:
        anc = P.ancillary(list(fds), socket.SOL_SOCKET, socket.SCM_RIGHTS)
        self.sock.sendmsg([data], anc)

    def finish(self, close: bool) -> tuple[int, str]:
        if close:
            self.sock.shutdown(socket.SHUT_WR)
        try:
            # Bounded, and generous: the child is a fresh interpreter that
            # imports the package (compiled from source where bytecode isn't
            # written), and the suite's other workers share the machine.
            rc = self.proc.wait(20)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(5)
            self.sock.close()
        return rc, self.errpath.read_text(errors="replace")


def _valid_require() -> bytes:
    return _frame_bytes(P.items_frame(P.REQUIRE, ["os"]))


# Each case: (name, list of (bytes, nfds) sends, close after sending?).  The
# marker frame is appended to the last send unless the case embeds it.
def _cases(marker):
    ev = _marker_eval(marker)
    payload = ev[HDR.size :]
    return {
        "garbage": ([(b"\xde\xad\xbe\xef" * 8 + ev, 0)], True),
        "garbage_after_valid": ([(_valid_require() + b"\x00" * 12 + ev, 0)], True),
        "version_0": ([(HDR.pack(0, P.EVAL, 0, len(payload)) + payload, 0)], True),
        "version_2": ([(HDR.pack(2, P.EVAL, 0, len(payload)) + payload, 0)], True),
        "unknown_kind": ([(HDR.pack(1, 200, 0, 0) + ev, 0)], True),
        "report_kind_as_command": ([(HDR.pack(1, P.PID, 0, 16) + b"\x00" * 16 + ev, 0)], True),
        # An absurd length must be refused at once, not waited for: the
        # socket stays open and the child must still exit.
        "oversized": ([(HDR.pack(1, P.ARG, 0, 1 << 62) + ev, 0)], False),
        "oversized_eval": ([(HDR.pack(1, P.EVAL, 0, (1 << 40) + 1) + payload, 0)], False),
        "truncated_payload": ([(ev[:-1], 0)], True),
        "truncated_header": ([(ev[:5], 0)], True),
        "bad_item_tag": ([(HDR.pack(1, P.EVAL, 0, len(payload)) + b"x" + payload[1:], 0)], True),
        "item_longer_than_frame": (
            [(HDR.pack(1, P.EVAL, 0, len(payload)) + payload[:1] + struct.pack("<Q", 1 << 20)
              + payload[9:], 0)], True),
        "eval_code_not_utf8": (
            [(HDR.pack(1, P.EVAL, 0, 9 + 2) + b"s" + struct.pack("<Q", 2) + b"\xff\xfe", 0), (ev, 0)],
            True),
        "eval_code_as_bytes": ([(HDR.pack(1, P.EVAL, 0, len(payload)) + b"b" + payload[1:], 0)], True),
        # Descriptors where none belong.
        "fd_on_eval": ([(ev, 1)], True),
        "fd_claimed_by_eval": ([(HDR.pack(1, P.EVAL, 1, len(payload)) + payload, 1)], True),
        "fd_missing_for_fh": ([(HDR.pack(1, P.FH, 3, 0) + ev, 0)], True),
        "fh_with_payload": ([(HDR.pack(1, P.FH, 1, 4) + b"abcd" + ev, 1)], True),
        "fd_count_short": ([(HDR.pack(1, P.FH, 3, 0) + ev, 2)], True),
        "fork_without_fd": ([(HDR.pack(1, P.FORK, 0, 9) + struct.pack("<QB", 1, 1) + ev, 0)], True),
        "fork_bad_flags": ([(HDR.pack(1, P.FORK, 1, 9) + struct.pack("<QB", 1, 0x80) + ev, 1)], True),
        "run_name_not_utf8": ([(HDR.pack(1, P.RUN, 0, 2) + b"\xff\xfe", 0)], True),
        "spawn_bad_size": ([(HDR.pack(1, P.SPAWN, 0, 3) + b"\x01\x00\x00" + ev, 0)], True),
    }


CASES = sorted(_cases("x"))


def test_marker_frame_runs_when_valid(tmp_path):
    """Control: the marker frame the cases below carry does run when well-formed."""
    marker = tmp_path / "marker"
    child = ServeChild(tmp_path)
    child.send(_valid_require() + _marker_eval(marker))
    rc, err = child.finish(close=True)
    assert rc == 0, err
    assert marker.exists()


@pytest.mark.parametrize("case", CASES)
def test_serve_loop_rejects_bad_stream(tmp_path, case):
    marker = tmp_path / "marker"
    sends, close = _cases(marker)[case]
    child = ServeChild(tmp_path)
    r, w = os.pipe()
    try:
        for data, nfds in sends:
            try:
                child.send(data, [w] * nfds)
            except (BrokenPipeError, ConnectionResetError):
                break  # it already gave up on the stream
        os.close(w)
        w = -1
        rc, err = child.finish(close=close)
        assert rc == 2, f"exit status {rc}, stderr: {err}"
        if case.startswith("truncated"):
            assert err == "", "a stream cut short by its writer is no news to it"
        else:
            assert "stream corrupted" in err
        assert "Traceback" not in err
        assert not marker.exists(), "a frame after (or inside) the corruption was executed"
        # Whatever descriptors it received are closed: the pipe sees EOF.
        os.set_blocking(r, False)
        assert os.read(r, 1) == b""
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


# --- the sans-io decoders, in-process --------------------------------------------------------


def _devnull_fds(n: int) -> list[int]:
    return [os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC) for _ in range(n)]


def _valid_stream() -> tuple[list[tuple[bytes, int]], list[tuple[int, bytes, int]]]:
    """A valid command stream: [(frame bytes, nfds)] and the expected frames."""
    frames = [
        (P.items_frame(P.PATH, ["/a", "/b\udcff"]), 0),
        (P.items_frame(P.REQUIRE, ["os", "json"]), 0),
        (P.items_frame(P.EVAL, ["x = args", b"\x00" * 70, "é"]), 0),
        (P.items_frame(P.ARG, [b"", "", b"\x01" * 300]), 0),
        (P.fh_frame(2), 2),
        (P.fork_frame(7, True), 2),
        (P.fh_frame(1), 1),
        (P.kill_frame(7, 15), 0),
        (P.spawn_frame(3, False), 0),
        (P.run_frame("mod:func"), 0),
    ]
    out = []
    expected = []
    for parts, nfds in frames:
        data = _frame_bytes(parts)
        out.append((data, nfds))
        expected.append((data[1], data[HDR.size :], nfds))
    return out, expected


def _feed_split(chunks_at: list[int]) -> None:
    """Feed the valid stream cut at the given offsets; check every frame."""
    stream, expected = _valid_stream()
    data = b"".join(d for d, _ in stream)
    # Each frame's descriptors travel with its first byte.
    starts, pos = [], 0
    fds_by_frame = []
    for d, nfds in stream:
        starts.append(pos)
        fds_by_frame.append(_devnull_fds(nfds))
        pos += len(d)
    cuts = [0, *sorted(set(chunks_at)), len(data)]
    dec = P.Decoder(P.COMMANDS)
    got = []
    try:
        for a, b in itertools.pairwise(cuts):
            if a == b:
                continue
            fds = [fd for s, fs in zip(starts, fds_by_frame, strict=True) if a <= s < b for fd in fs]
            dec.feed(data[a:b], fds)
            while (f := dec.next_frame()) is not None:
                got.append(f)
        dec.eof()
        assert [(f.kind, f.payload, len(f.fds)) for f in got] == expected
        assert [f.fds for f in got] == fds_by_frame
    finally:
        for f in got:
            f.close()
        dec.close()
    for fs in fds_by_frame:
        for fd in fs:
            assert _is_closed(fd)


def test_decoder_every_split_point_of_a_valid_stream():
    stream, _ = _valid_stream()
    total = sum(len(d) for d, _ in stream)
    for cut in range(1, total):
        _feed_split([cut])


def test_decoder_byte_by_byte():
    stream, _ = _valid_stream()
    total = sum(len(d) for d, _ in stream)
    _feed_split(list(range(1, total)))


_kinds = st.sampled_from(sorted(P.COMMANDS | P.REPORTS | {0, 10, 63, 67, 255}))
_header = st.builds(
    HDR.pack,
    st.sampled_from([0, 1, 1, 1, 2, 255]),
    _kinds,
    st.sampled_from([0, 0, 1, 2, 3, 254, 65535]),
    st.one_of(st.integers(0, 64), st.sampled_from([P.MAX_PAYLOAD, P.MAX_PAYLOAD + 1, (1 << 64) - 1])),
)
_frame_like = st.one_of(
    st.binary(min_size=1, max_size=48),
    st.tuples(_header, st.binary(max_size=48)).map(lambda t: t[0] + t[1]),
    st.tuples(_header, st.sampled_from([b"s", b"b", b"x"]), st.integers(0, 40), st.binary(max_size=40)).map(
        lambda t: t[0] + t[1] + struct.pack("<Q", t[2]) + t[3]),
)
_chunks = st.lists(st.tuples(_frame_like, st.integers(0, 3)), min_size=1, max_size=8)


def _decode_payload(frame: P.Frame) -> None:
    """What the serve loop does with each payload (without executing it)."""
    k, pl = frame.kind, frame.payload
    if k in (P.PATH, P.REQUIRE):
        P.decode_strs(pl)
    elif k in (P.EVAL, P.ARG):
        P.decode_items(pl)
    elif k == P.RUN:
        P.decode_text(pl)
    elif k in (P.FORK, P.SPAWN):
        P.decode_fork(pl)
    elif k == P.KILL:
        P.decode_kill(pl)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_chunks)
def test_command_decoder_fuzz_raises_only_protocol_error_and_closes_fds(chunks):
    dec = P.Decoder(P.COMMANDS)
    frames: list[P.Frame] = []
    all_fds: list[int] = []
    try:
        for data, nfds in chunks:
            fds = _devnull_fds(nfds)
            all_fds += fds
            dec.feed(data, fds)
            while (f := dec.next_frame()) is not None:
                frames.append(f)
                _decode_payload(f)
        dec.eof()
    except P.ProtocolError:
        pass
    finally:
        dec.close()
    for f in frames:
        f.close()
    leaked = [fd for fd in all_fds if not _is_closed(fd)]
    for fd in leaked:
        os.close(fd)
    assert not leaked, "descriptors fed to the decoder were left open"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_payload_decoders_fuzz_raise_only_protocol_error(payload):
    for decode in (P.decode_items, P.decode_strs, P.decode_text, P.decode_fork, P.decode_kill,
                   P.decode_seq_int, P.decode_failed):
        try:
            decode(payload)
        except P.ProtocolError:
            pass


# --- the caller's report reader --------------------------------------------------------------


_reports = st.lists(
    st.one_of(
        st.binary(min_size=1, max_size=40),
        st.tuples(st.integers(1, 3), st.integers(-(1 << 63), (1 << 63) - 1)).map(
            lambda t: P.pid_report(*t)),
        st.tuples(st.integers(1, 3), st.integers(-(1 << 63), (1 << 63) - 1)).map(
            lambda t: P.exit_report(*t)),
        st.tuples(st.integers(1, 3), st.text(max_size=10)).map(lambda t: P.failed_report(*t)),
        st.tuples(_header, st.binary(max_size=24)).map(lambda t: t[0] + t[1]),
    ),
    max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(_reports)
def test_report_reader_fuzz_ends_cleanly(reports):
    """The caller's side of a report channel (``ReportChannel``) fed anything:
    it dispatches what is valid, and ends the channel on garbage or EOF,
    without raising and without leaking its socket."""
    mine, theirs = socket.socketpair()
    state = TemplateState()
    kids = [state.fork(False)[0] for _ in range(3)]
    reader = ReportChannel(mine, state)
    try:
        theirs.sendall(b"".join(reports))
        theirs.close()
        for _ in range(len(reports) + 2):
            if state.ended is not None:
                break
            run_blocking(reader.until_op(lambda: False, deadline_after(1.0)))
        assert state.ended is not None, "the reader did not end at EOF"
        assert mine.fileno() == -1
        assert all(k.pid is None or isinstance(k.pid, int) for k in kids)
    finally:
        theirs.close()
        reader.end("test over")
