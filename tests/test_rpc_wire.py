"""The rpc codec, sans-io: streams split at every byte, garbage, descriptors."""

from __future__ import annotations

import os
import pickle
import socket
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anyfork import ProtocolError
from anyfork import _rpc_wire as W


def stream() -> bytes:
    frames = [W.hello(b"config"), W.header(W.CALL, 1, 3) + b"abc", W.header(W.CLOSE, 0, 0),
              W.header(W.CALL, 0xFFFFFFFF, 0)]
    return b"".join(frames)


WANT = [(W.HELLO, 0), (W.CALL, 1, b"abc"), (W.CLOSE, 0, b""), (W.CALL, 0xFFFFFFFF, b"")]


def decode_all(chunks: list[bytes], accept: frozenset[int] = W.FROM_CALLER) -> list[W.Frame]:
    d = W.Decoder(accept)
    out: list[W.Frame] = []
    for c in chunks:
        d.feed(c)
        out.extend(d.frames())
    return out


def check(frames: list[W.Frame]) -> None:
    assert [(f.kind, f.id) for f in frames] == [w[:2] for w in WANT]
    assert W.hello_config(frames[0]) == b"config"
    assert [f.payload for f in frames[1:]] == [w[2] for w in WANT[1:]]


def test_a_stream_decodes_the_same_split_at_every_byte() -> None:
    data = stream()
    for i in range(len(data) + 1):
        check(decode_all([data[:i], data[i:]]))


def test_a_stream_decodes_the_same_fed_a_byte_at_a_time() -> None:
    data = stream()
    check(decode_all([data[i:i + 1] for i in range(len(data))]))


def test_a_stream_received_into_one_reused_buffer_decodes_the_same_split_at_every_byte() -> None:
    """The decoder borrows what it is fed (a view of the receiver's buffer)
    until frames(): what it keeps of a partial frame must be its own copy."""
    data = stream()
    scratch = bytearray(len(data))
    for i in range(len(data) + 1):
        d = W.Decoder(W.FROM_CALLER)
        out: list[W.Frame] = []
        for chunk in (data[:i], data[i:]):
            scratch[:] = b"\xee" * len(scratch)  # the receiver reuses its buffer
            scratch[:len(chunk)] = chunk
            d.feed(memoryview(scratch)[:len(chunk)] if chunk else b"")
            out.extend(d.frames())
        check(out)


def test_two_feeds_before_frames_keep_both() -> None:
    data = stream()
    for i in range(len(data) + 1):
        d = W.Decoder(W.FROM_CALLER)
        d.feed(bytearray(data[:i]))
        d.feed(bytearray(data[i:]))
        check(d.frames())


def test_eof_inside_a_frame_is_a_protocol_error() -> None:
    data = stream()
    d = W.Decoder(W.FROM_CALLER)
    d.feed(data[:-3])
    d.frames()
    d.feed(b"")
    with pytest.raises(ProtocolError, match="ended inside"):
        d.frames()


def test_a_peer_that_does_not_speak_rpc_is_refused_before_anything_else() -> None:
    d = W.Decoder(W.FROM_WORKER)
    d.feed(b"Traceback (most recent call last):\n")
    with pytest.raises(ProtocolError, match="does not speak anyfork rpc"):
        d.frames()


def test_a_hello_of_another_version_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(W, "VERSION", 7)
    hello = W.hello()
    monkeypatch.undo()
    d = W.Decoder(W.FROM_WORKER)
    d.feed(hello)
    with pytest.raises(ProtocolError, match=f"version 7; this end speaks version {W.VERSION}"):
        d.frames()


def test_a_kind_the_reader_does_not_take_is_a_protocol_error() -> None:
    d = W.Decoder(W.FROM_WORKER)
    d.feed(W.hello() + W.header(W.CALL, 1, 0))
    with pytest.raises(ProtocolError, match="unexpected rpc frame kind"):
        d.frames()


def test_descriptors_go_to_the_frames_that_count_them_in_order() -> None:
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    try:
        d = W.Decoder(W.FROM_WORKER)
        d.feed(W.hello() + W.header(W.RESULT, 1, 1, 1) + b"a", [r1])
        d.feed(W.header(W.RESULT, 2, 0) + W.header(W.EVENT, 3, 1, 1) + b"b", [r2])
        frames = d.frames()
        assert [(f.id, f.fds) for f in frames[1:]] == [(1, [r1]), (2, []), (3, [r2])]
    finally:
        for fd in (r1, w1, r2, w2):
            os.close(fd)


def test_a_frame_claiming_descriptors_that_never_came_is_a_protocol_error() -> None:
    d = W.Decoder(W.FROM_WORKER)
    d.feed(W.hello() + W.header(W.RESULT, 1, 0, 2))
    with pytest.raises(ProtocolError, match="claims 2 descriptors"):
        d.frames()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(min_value=1, max_value=50))
def test_garbage_after_a_hello_gives_frames_or_a_protocol_error_and_nothing_else(
        garbage: bytes, step: int) -> None:
    d = W.Decoder(W.FROM_WORKER)
    data = W.hello() + garbage
    try:
        for i in range(0, len(data), step):
            d.feed(data[i:i + step])
            for f in d.frames():
                assert f.kind in W.FROM_WORKER
                assert not f.fds
        d.feed(b"")
        d.frames()
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=100))
def test_garbage_first_never_passes_for_a_hello(garbage: bytes) -> None:
    d = W.Decoder(W.FROM_WORKER)
    d.feed(garbage)
    try:
        frames = d.frames()
    except ProtocolError:
        return
    # Only a true prefix of a well-formed HELLO may be waited on.
    assert all(f.kind == W.HELLO and f.payload.startswith(W.MAGIC) for f in frames)


def test_the_outbox_sends_descriptors_with_the_first_byte_only_and_closes_them() -> None:
    r, w = os.pipe()
    os.close(w)
    ob = W.Outbox()
    ob.add(b"aaaa")
    ob.add(b"bbbb", [r])
    ob.add(b"cc")
    bufs, fds = ob.pending()
    assert [bytes(b) for b in bufs] == [b"aaaa"]  # a frame with descriptors starts a send of its own
    assert fds == []
    ob.sent(4)
    bufs, fds = ob.pending()
    assert [bytes(b) for b in bufs] == [b"bbbb", b"cc"]
    assert fds == [r]
    ob.sent(2)  # a partial send: the descriptors went with its first byte
    with pytest.raises(OSError):
        os.fstat(r)
    bufs, fds = ob.pending()
    assert [bytes(b) for b in bufs] == [b"bb", b"cc"]
    assert fds == []
    ob.sent(4)
    assert not ob


def test_errors_round_trip_and_malformed_ones_are_protocol_errors() -> None:
    payload = W.encode_error("builtins.ValueError", "m\udcff", "tb", b"PICKLE")
    assert W.decode_error(payload) == ("builtins.ValueError", "m\udcff", "tb", b"PICKLE")
    with pytest.raises(ProtocolError):
        W.decode_error(payload[:6])


@pytest.mark.parametrize("name", ["pickle", "json", "bytes"])
def test_each_codec_round_trips_calls_and_values(name: str) -> None:
    codec = W.serializer(name)
    args: tuple[object, ...] = (b"x", "y") if name == "bytes" else (1, "two", [3])
    kwargs = {} if name == "bytes" else {"k": "v"}
    data, fds = codec.dumps_call(args, kwargs)
    assert fds == []
    got_args, got_kwargs = codec.loads_call(data, [])
    assert list(got_args) == list(args)
    assert got_kwargs == kwargs
    value = b"v" if name == "bytes" else {"a": [1]}
    assert codec.loads(codec.dumps(value)[0], []) == value


def test_arguments_shaped_like_args_and_kwargs_decode_as_they_were() -> None:
    codec = W.serializer("pickle")
    first = (1,)
    for args, kwargs in [((first, {}), {}), ((first, {"k": 2}), {}), ((first,), {"k": 2}), ((), {})]:
        got_args, got_kwargs = codec.loads_call(codec.dumps_call(args, kwargs)[0], [])
        assert (list(got_args), got_kwargs) == (list(args), kwargs)


@pytest.mark.parametrize("name", ["pickle", "bytes"])
def test_the_quick_paths_say_exactly_what_dumps_call_and_loads_say(name: str) -> None:
    # rpc's caller takes quick_args and quick_loads when it can: the worker
    # must not tell the difference, and a value must come out the same.
    codec = W.serializer(name)
    calls: list[tuple[object, ...]] = ([(b"x",), (b"",), ("s",), (b"a", "b"), ()] if name == "bytes"
                                       else [(0,), (1, "two", [3]), (), (None, b"x" * 1000)])
    for args in calls:
        assert codec.quick_args(args) == codec.dumps_call(args, {})[0], args
        assert codec.loads_call(codec.quick_args(args), []) == (args, {})
    if name == "bytes":
        # A call with one bytes-like argument is made by a C call, no Python frame.
        assert not isinstance(codec.quick_one, types.FunctionType | types.MethodType)
        for arg in [b"x", b"", bytearray(b"ba"), memoryview(b"mv")]:
            assert codec.quick_one(arg) == codec.dumps_call((arg,), {})[0]
            assert codec.loads_call(codec.quick_one(arg), []) == ((bytes(arg),), {})
        for other in ["s", 3, memoryview(b"abcdef")[::2]]:
            with pytest.raises(TypeError):
                codec.quick_one(other)  # (the caller then takes quick_args)
        # Broke: a memoryview with gaps (no C call takes it) failed the call.
        gaps = memoryview(b"abcdef")[::2]
        assert codec.loads_call(codec.quick_args((gaps,)), []) == ((b"ace",), {})
        with pytest.raises(ProtocolError, match="malformed"):
            codec.loads_call(b"Zx", [])
    else:
        assert codec.quick_one is None
    values: list[object] = [b"v", b"", "text\udcff"] if name == "bytes" else [0, {"a": [1]}, b"x"]
    for value in values:
        data = codec.dumps(value)[0]
        assert codec.quick_loads(data) == codec.loads(data, []) == value
        # The caller takes a message that starts with bytes_tag as the bytes after it.
        tag = codec.bytes_tag
        assert (tag is not None and data[:1] == tag) == (name == "bytes" and type(value) is bytes)
        if tag is not None and data[:1] == tag:
            assert data[1:] == value
    bad = 3 if name == "bytes" else socket.socket()  # bytes takes no int; pickle's quick path no socket
    with pytest.raises(TypeError):
        codec.quick_args((bad,))  # (the caller then takes dumps_call, which says why)
    if isinstance(bad, socket.socket):
        bad.close()


def test_a_codec_whose_methods_are_overridden_has_no_quick_paths() -> None:
    # A remote host's pickle codec restricts what it unpickles (_results):
    # pickle.loads must never be taken in its place.
    class Restricted(W._Pickle):
        def loads(self, data: bytes, fds: list[int]) -> object:
            raise pickle.UnpicklingError("restricted")

    class Tagged(W._Bytes):
        def dumps_call(self, args: tuple[object, ...], kwargs: dict[str, object]) -> tuple[bytes, list[int]]:
            return b"tagged", []

    assert Restricted().quick_loads is None and Restricted().quick_args is not None
    assert Tagged().quick_args is None and Tagged().quick_loads is None and Tagged().quick_one is None
    assert W.serializer("json").quick_args is None


def test_a_remote_hosts_quick_loads_takes_the_restricted_unpickler_for_any_global() -> None:
    # The remote pickle codec's quick path (plain pickle.loads for a pickle
    # that names no global) must see every opcode that names one.
    import os
    import pickletools

    from anyfork import _results

    naming = {"GLOBAL", "INST", "STACK_GLOBAL", "EXT1", "EXT2", "EXT4"}
    codes = {op.code.encode("latin-1") for op in pickletools.opcodes if op.name in naming}
    assert len(codes) == len(naming)
    assert all(_results._NAMING.fullmatch(c) for c in codes)
    # Only those: a byte of another opcode is not taken for one.
    others = {op.code.encode("latin-1") for op in pickletools.opcodes if op.name not in naming}
    assert not any(_results._NAMING.fullmatch(c) for c in others)

    codec = _results.Pickle(_results.Host("far"))
    for proto in range(pickle.HIGHEST_PROTOCOL + 1):  # GLOBAL/INST at 0-3, STACK_GLOBAL from 4
        for value in (os.system, [os.system], {"k": os.system}):
            with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system"):
                codec.quick_loads(pickle.dumps(value, proto))
        plain: list[object] = [0, 1.5, None, True, "ci\x93", (1, 2), {"a": [3]}]
        if proto >= 4:  # (before, sets and bytes pickle as calls of globals)
            plain += [{4}, b"\x82\x83", bytearray(b"x")]
        assert codec.quick_loads(pickle.dumps(plain, proto)) == plain
    copyreg = __import__("copyreg")
    copyreg.add_extension("os", "system", 0x7F00)  # EXT2
    try:
        with pytest.raises(pickle.UnpicklingError, match="system"):
            codec.quick_loads(pickle.dumps(os.system, 2))
    finally:
        copyreg.remove_extension("os", "system", 0x7F00)
    trusting = _results.Pickle(_results.Host("far", allow=["*"]))
    assert trusting.quick_loads(pickle.dumps(os.system)) is os.system


def test_pickle_carries_sockets_as_descriptors_and_the_receiver_owns_them() -> None:
    codec = W.serializer("pickle")
    a, b = socket.socketpair()
    with a, b:
        data, fds = codec.dumps({"s": [a]})
        assert len(fds) == 1
        assert fds[0] != a.fileno()  # a duplicate: the sender may close its own
        got = codec.loads(data, fds)
        with got["s"][0] as s:
            assert isinstance(s, socket.socket)
            s.sendall(b"hi")
            assert b.recv(2) == b"hi"


def test_a_descriptor_reference_outside_a_message_fails() -> None:
    import pickle

    codec = W.serializer("pickle")
    a, b = socket.socketpair()
    with a, b:
        data, fds = codec.dumps(a)
        W.close_fds(fds)
        with pytest.raises(pickle.UnpicklingError):
            pickle.loads(data)


def test_the_worker_answers_a_bytes_call_with_a_bytes_result_without_the_codecs_methods(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Speed: bytes, the serializer meant to be the fastest, paid two Python
    # methods per call in the worker (loads_call, dumps) where pickle's work is C.
    from types import SimpleNamespace

    from anyfork import _rpc_worker

    codec = W.serializer("bytes")
    conn = SimpleNamespace(codec=codec)
    call = codec.quick_one(b"abc")

    def frame(payload: bytes) -> W.Frame:
        return W.Frame(W.CALL, 9, payload, [])

    def expected(value: object) -> bytes:
        payload = codec.dumps(value)[0]
        return W.header(W.RESULT, 9, len(payload)) + payload

    for name in ("loads_call", "dumps"):
        monkeypatch.setattr(codec, name, lambda *a: pytest.fail(f"{name} was called"))
    assert _rpc_worker.reply(conn, 9, bytes.upper, frame(call)) == (b"".join(  # type: ignore[arg-type]
        (W.header(W.RESULT, 9, 4), b"bABC")), [])
    monkeypatch.undo()
    # Anything else takes the codec's way, with the same bytes as before.
    assert _rpc_worker.reply(conn, 9, bytes.decode, frame(call)) == (expected("abc"), [])  # type: ignore[arg-type]
    two = codec.dumps_call((b"a", b"b"), {})[0]
    assert _rpc_worker.reply(conn, 9, bytes.__add__, frame(two)) == (expected(b"ab"), [])  # type: ignore[arg-type]
    data, _ = _rpc_worker.reply(conn, 9, lambda b: 1 / 0, frame(call))  # type: ignore[arg-type]
    assert W.HEADER.unpack_from(data)[2] == W.ERROR
