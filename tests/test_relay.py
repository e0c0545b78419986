"""The relays of a remote connection (_relay), both ends in this process over a socketpair."""

from __future__ import annotations

import os
import socket
import threading
from typing import TYPE_CHECKING

import pytest

from anyfork import _mux as M
from anyfork import _protocol as P
from anyfork import _relay as R

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

pytestmark = pytest.mark.usefixtures("check_leaks")


class End:
    """One relay in a thread of its own."""

    def __init__(self, conn: socket.socket, caller: bool) -> None:
        self.conn = conn
        self.opened: list[tuple[int, str, socket.socket]] = []  # what the peer opened, our user's ends
        self.controls: list[bytes] = []
        self.wake_r, self.wake_w = os.pipe()
        self.lock = threading.Lock()
        self.relay = R.Relay(M.Mux(caller), conn.fileno(), conn.fileno(), self._on_open, self.controls.append)
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _on_open(self, ch: int, what: str) -> socket.socket:
        mine, user = socket.socketpair()
        self.opened.append((ch, what, user))
        return mine

    def _run(self) -> None:
        R.run(self.relay, self.wake_r, lambda: self.stop, lock=self.lock)

    def open(self, what: str) -> socket.socket:
        """A channel to the peer; the user's end of it."""
        mine, user = socket.socketpair()
        with self.lock:
            self.relay.open(what, mine)
        os.write(self.wake_w, b"x")
        return user

    def close(self) -> None:
        self.stop = True
        os.write(self.wake_w, b"x")
        self.thread.join(10)
        assert not self.thread.is_alive()
        self.relay.close()
        os.close(self.wake_r)
        os.close(self.wake_w)
        for _, _, user in self.opened:
            user.close()


@pytest.fixture
def ends() -> Iterator[tuple[End, End]]:
    a, b = socket.socketpair()
    caller, remote = End(a, True), End(b, False)
    yield caller, remote
    caller.close()
    remote.close()
    a.close()
    b.close()


def _until(pred: Callable[[], bool], what: str) -> None:
    """Wait (up to 10 s) until ``pred()`` holds."""
    for _ in range(2000):
        if pred():
            return
        threading.Event().wait(0.005)
    raise AssertionError(f"never: {what}")


def _peer_socket(end: End, index: int = 0) -> socket.socket:
    _until(lambda: len(end.opened) > index, "the peer opened the channel")
    return end.opened[index][2]


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    sock.settimeout(10)
    chunks = []
    while n:
        data = sock.recv(min(n, 1 << 20))
        assert data, "EOF too soon"
        chunks.append(data)
        n -= len(data)
    return b"".join(chunks)


def test_bytes_cross_both_ways_with_eof(ends: tuple[End, End]) -> None:
    caller, remote = ends
    with caller.open("raw") as user:
        peer = _peer_socket(remote)
        assert remote.opened[0][1] == "raw"
        user.sendall(b"ping")
        assert _recv_exactly(peer, 4) == b"ping"
        peer.sendall(b"pong")
        assert _recv_exactly(user, 4) == b"pong"
        user.shutdown(socket.SHUT_WR)
        peer.settimeout(10)
        assert peer.recv(10) == b""  # EOF crossed
        peer.sendall(b"after")  # the other direction still works
        assert _recv_exactly(user, 5) == b"after"
        peer.shutdown(socket.SHUT_WR)
        user.settimeout(10)
        assert user.recv(10) == b""


def test_a_large_stream_arrives_whole_with_both_directions_full(ends: tuple[End, End]) -> None:
    caller, remote = ends
    size = 8 * M.WINDOW + 12345
    blob = os.urandom(size)
    with caller.open("raw") as user:
        peer = _peer_socket(remote)
        got: dict[str, bytes] = {}

        def echo_back() -> None:
            got["peer"] = _recv_exactly(peer, size)
            peer.sendall(got["peer"][::-1])

        t = threading.Thread(target=echo_back)
        t.start()
        user.sendall(blob)
        assert _recv_exactly(user, size) == blob[::-1]
        t.join(20)
        assert got["peer"] == blob


def test_bytes_the_user_has_not_read_yet_survive_the_end_of_the_channel(ends: tuple[End, End]) -> None:
    # Both directions end while the user has read nothing: this relay holds what
    # the user's full socket can't take (the blob is a window more than a
    # socket's buffer, so all of it and the EOF can leave the far side).  The
    # far relay must not close the channel, which drops those bytes here,
    # before they were handed on.
    caller, remote = ends
    blob = os.urandom(M.WINDOW + (64 << 10))
    with caller.open("raw") as user:
        peer = _peer_socket(remote)
        ch = remote.opened[0][0]
        user.shutdown(socket.SHUT_WR)
        peer.settimeout(10)
        assert peer.recv(1) == b""

        def send_and_close() -> None:
            peer.sendall(blob)
            peer.close()

        t = threading.Thread(target=send_and_close)
        t.start()

        def far_side_sent_all() -> bool:
            loc = remote.relay.locals.get(ch)
            return loc is None or (loc.eof_in and remote.relay.mux.pending(ch) == 0)

        _until(far_side_sent_all, "the far relay read all and sent it, EOF too")
        user.settimeout(10)
        chunks = []
        while data := user.recv(1 << 20):
            chunks.append(data)
        t.join(10)
        got = b"".join(chunks)
        assert len(got) == len(blob)
        assert got == blob


def _fd(fd: int) -> list[tuple[int, int, bytes]]:
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd.to_bytes(4, "little"))]


def _frame_bytes(parts: list[P.Buffer]) -> bytes:
    return b"".join(bytes(p) for p in parts)


def test_a_socket_arrives_with_the_frame_it_was_sent_with(ends: tuple[End, End]) -> None:
    caller, remote = ends
    with caller.open("serve") as user:
        peer = _peer_socket(remote)
        keep, send = socket.socketpair()
        with keep:
            before = _frame_bytes(P.items_frame(P.ARG, [b"before" * 1000]))
            fh = _frame_bytes(P.fh_frame(1))
            after = _frame_bytes(P.items_frame(P.ARG, ["after"]))
            # Written before the relay reads, so its read glues `before` to the
            # frame the descriptor came with: it must still go with `fh`.
            user.sendall(before)
            user.sendmsg([fh, after], _fd(send.fileno()))
            send.close()  # the sender may close its copy at once
            # Read the way the serve loop reads, never past the frame at hand:
            # a descriptor that came early would show up in these reads.
            peer.settimeout(10)
            got = b""
            while len(got) < len(before):
                data, anc, _, _ = peer.recvmsg(len(before) - len(got), socket.CMSG_SPACE(4))
                assert data
                assert not anc, "the descriptor came with an earlier frame's bytes"
                got += data
            assert got == before
            data, anc, _, _ = peer.recvmsg(len(fh), socket.CMSG_SPACE(4))
            assert data == fh
            fds = [int.from_bytes(raw[:4], "little") for _, _, raw in anc]
            assert _recv_exactly(peer, len(after)) == after
            assert len(fds) == 1
            with socket.socket(fileno=fds[0]) as arrived:
                assert arrived.family == socket.AF_UNIX
                # It is connected to our `keep`, across the relays (and carries
                # anyfork's frames, as the sockets FORK and SPARE carry do).
                through = _frame_bytes(P.items_frame(P.ARG, ["through"]))
                arrived.sendall(through)
                assert _recv_exactly(keep, len(through)) == through
                back = _frame_bytes(P.run_frame("m:f")) + b"back"
                keep.sendall(back)
                assert _recv_exactly(arrived, len(back)) == back


def test_a_header_split_over_two_reads_still_gets_its_descriptor(ends: tuple[End, End]) -> None:
    caller, remote = ends
    with caller.open("serve") as user:
        peer = _peer_socket(remote)
        keep, send = socket.socketpair()
        with keep:
            fh = _frame_bytes(P.fh_frame(1))
            user.sendmsg([fh[:5]], _fd(send.fileno()))  # descriptors come with the header's first bytes
            send.close()
            threading.Event().wait(0.05)  # let the relay read the piece on its own
            user.sendall(fh[5:])
            peer.settimeout(10)
            data, anc, _, _ = peer.recvmsg(100, socket.CMSG_SPACE(4))
            assert len(anc) == 1
            while len(data) < len(fh):
                data += peer.recv(100)
            assert data == fh
            os.close(int.from_bytes(anc[0][2][:4], "little"))


def test_after_run_the_stream_is_the_users(ends: tuple[End, End]) -> None:
    caller, remote = ends
    with caller.open("serve") as user:
        peer = _peer_socket(remote)
        run = _frame_bytes(P.run_frame("m:f"))
        user.sendall(run + b"ab")  # not a header: the user's bytes, passed on at once
        assert _recv_exactly(peer, len(run) + 2) == run + b"ab"


def test_a_descriptor_that_is_not_a_unix_stream_socket_breaks_the_channel(ends: tuple[End, End]) -> None:
    caller, remote = ends
    with caller.open("serve") as user:
        peer = _peer_socket(remote)
        r, w = os.pipe()
        try:
            user.sendmsg([_frame_bytes(P.fh_frame(1))], _fd(r))
        finally:
            os.close(r)
            os.close(w)
        peer.settimeout(10)
        assert peer.recv(10) == b""  # broken, not delivered without its descriptor


def test_the_end_of_the_connection_closes_every_channel(ends: tuple[End, End]) -> None:
    caller, remote = ends
    user = caller.open("raw")
    with user:
        peer = _peer_socket(remote)
        caller.conn.shutdown(socket.SHUT_RDWR)
        peer.settimeout(10)
        user.settimeout(10)
        assert peer.recv(10) == b""
        assert user.recv(10) == b""
    assert any(c.startswith(b"DISCONNECTED") for c in remote.controls)


def test_a_reader_that_never_reads_bounds_what_the_relays_hold(ends: tuple[End, End]) -> None:
    caller, remote = ends
    with caller.open("raw") as user:
        _peer_socket(remote)  # opened, and never read
        user.setblocking(False)
        chunk = b"z" * 65536
        written = 0
        for _ in range(2000):  # a bound: the kernel's buffers are far smaller than this
            try:
                written += user.send(chunk)
            except BlockingIOError:
                threading.Event().wait(0.05)  # let the relay take what it will
                try:
                    written += user.send(chunk)
                except BlockingIOError:
                    break
        (ch,) = caller.relay.locals
        # Held in the caller's relay: at most one read beyond the window.
        assert caller.relay.mux.pending(ch) <= M.WINDOW + (1 << 16)
        assert written < 100 * (1 << 20)  # the user was made to wait, not buffered without end


def test_a_channel_closed_with_unread_bytes_reads_as_eof_and_frees_their_descriptors() -> None:
    # The connection dropping closes every local socket, whatever the user
    # wrote that the relay had not read yet (a RUN frame, say): the user
    # must see a plain EOF, not ECONNRESET, and a descriptor sent along
    # must be closed, not kept in a socket nobody reads.
    conn_a, conn_b = socket.socketpair()
    mine, user = socket.socketpair()
    carried, kept = socket.socketpair()
    try:
        relay = R.Relay(M.Mux(True), conn_a.fileno(), conn_a.fileno(), lambda ch, what: None, lambda m: None)
        relay.open("serve", mine)
        socket.send_fds(user, [b"x" * 4096], [carried.fileno()])
        carried.close()
        relay.close()  # never read: as when the connection drops
        user.settimeout(5)
        assert user.recv(100) == b""
        kept.settimeout(5)
        assert kept.recv(100) == b""  # its peer, sent along, was closed
    finally:
        for s in (conn_a, conn_b, user, kept):
            s.close()


# --- an owner that sends on a channel itself (Relay.send_direct) ----------------------------------


def _channel(end: End) -> int:
    (ch,) = end.relay.locals
    return ch


@pytest.mark.parametrize("role", ["serve", "raw"])
def test_a_direct_send_goes_after_what_the_socket_holds(ends: tuple[End, End], role: str) -> None:
    caller, remote = ends
    with caller.open(role) as user:
        peer = _peer_socket(remote)
        ch = _channel(caller)
        run = _frame_bytes(P.run_frame("m:f")) if role == "serve" else b""
        with caller.lock:  # (the relay thread can't read the socket before send_direct does)
            user.sendall(run + b"socket ")
            assert caller.relay.send_direct(ch, b"direct")
        assert _recv_exactly(peer, len(run) + 13) == run + b"socket direct"


def test_a_channel_that_still_carries_frames_is_not_sent_on_directly(ends: tuple[End, End]) -> None:
    caller, remote = ends
    with caller.open("serve") as user:
        peer = _peer_socket(remote)
        ch = _channel(caller)
        arg = _frame_bytes(P.items_frame(P.ARG, [b"x"]))
        with caller.lock:
            user.sendall(arg)
            # Not past RUN: what follows is frames the relay must follow, so
            # it goes through the socket.
            assert not caller.relay.send_direct(ch, b"more")
        assert _recv_exactly(peer, len(arg)) == arg


def test_a_full_window_sends_through_the_socket_instead(ends: tuple[End, End]) -> None:
    caller, remote = ends
    with caller.open("raw") as user:
        _peer_socket(remote)  # opened, and never read: the window fills
        ch = _channel(caller)
        chunk = b"w" * 65536
        sent = 0
        with caller.lock:
            while caller.relay.send_direct(ch, chunk):
                sent += len(chunk)
                assert sent < 100 * M.WINDOW, "send_direct never stopped"
        # Direct until the window is used up (the relay thread, kept out by
        # the lock, reads no credit meanwhile), and what the mux holds for
        # the peer beyond it stays within one window.
        assert sent >= M.WINDOW
        assert caller.relay.mux.pending(ch) <= M.WINDOW
        user.setblocking(False)
        assert user.send(b"x") == 1  # the socket takes what can't go directly


def test_the_kept_poller_waits_on_exactly_what_it_is_given_each_time() -> None:
    # Kept from one wait to the next (R.Poller): a descriptor left out of
    # the list must not be reported from an earlier registration, and a
    # changed interest must be the one waited on.
    import select

    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    try:
        p = R.Poller()
        os.write(w1, b"x")
        os.write(w2, b"x")
        assert sorted(fd for fd, _ in p.poll([(r1, select.POLLIN), (r2, select.POLLIN)], 0)) == sorted([r1, r2])
        assert [fd for fd, _ in p.poll([(r2, select.POLLIN)], 0)] == [r2]  # r1 is no longer asked about
        assert p.poll([(w2, select.POLLIN)], 0) == []  # (a pipe's write end is never readable)
        assert p.poll([(w2, select.POLLIN), (w2, select.POLLOUT)], 0) == [(w2, select.POLLOUT)]
        assert p.poll([], 0) == []
    finally:
        for fd in (r1, w1, r2, w2):
            os.close(fd)


class _Holder:
    """A caller's relay worked by hand (as ``_connection.Writer.wait`` works
    it, holding one channel's bytes), and a bare mux for the far side."""

    def __init__(self) -> None:
        self.conn, self.far = socket.socketpair()
        self.controls: list[bytes] = []
        self.relay = R.Relay(M.Mux(True), self.conn.fileno(), self.conn.fileno(),
                             lambda ch, what: None, self.controls.append)
        self.peer = M.Mux(False)
        self.unsent = b""
        self.users: list[socket.socket] = []
        self.ch = self.open()
        self.other = self.open()

    def open(self) -> int:
        mine, user = socket.socketpair()
        user.settimeout(10)
        self.users.append(user)
        ch = self.relay.open("raw", mine)
        self.deliver_back()
        return ch

    def deliver_back(self) -> None:
        """What the relay wrote, to the far side's mux."""
        self.relay.flush()
        self.far.setblocking(False)
        try:
            while data := self.far.recv(1 << 20):
                self.peer.receive_data(data)
        except BlockingIOError:
            pass
        list(self.peer.events())

    def say(self) -> None:
        """What the far side's mux has to say, onto the connection (as much
        as it takes now: the rest next time)."""
        self.unsent += b"".join(self.peer.data_to_send())
        self.far.setblocking(False)
        try:
            while self.unsent:
                self.unsent = self.unsent[self.far.send(self.unsent):]
        except BlockingIOError:
            pass

    def read(self, unread: bool = False) -> bytes | None:
        """One read of the connection holding ``ch``, then the take."""
        relay = self.relay
        relay.hold(self.ch)
        relay.ready(self.conn.fileno(), R._POLLIN)
        got = relay.take(self.ch, lambda: unread)
        relay.flush()
        return got

    def close(self) -> None:
        self.relay.close()
        for s in (self.conn, self.far, *self.users):
            s.close()


@pytest.fixture
def holder() -> Iterator[_Holder]:
    h = _Holder()
    yield h
    h.close()


def _nothing_to_read(sock: socket.socket) -> bool:
    import select

    return not select.select([sock], [], [], 0)[0]


def test_held_bytes_are_taken_instead_of_written_to_the_socket(holder: _Holder) -> None:
    holder.peer.send(holder.ch, b"a reply")
    holder.say()
    assert holder.read() == b"a reply"
    assert _nothing_to_read(holder.users[0])


def test_taken_bytes_are_credited_so_the_window_reopens(holder: _Holder) -> None:
    holder.peer.send(holder.ch, b"w" * (2 * M.WINDOW))
    assert holder.peer.pending(holder.ch) == M.WINDOW  # the window lets one through
    taken = 0
    for _ in range(1000):
        holder.say()
        got = holder.read()
        if got is None and not holder.unsent:
            break
        taken += len(got or b"")
    assert taken == M.WINDOW
    holder.deliver_back()
    assert holder.peer.pending(holder.ch) == 0  # its credit came back: the rest went


def test_held_bytes_go_behind_what_the_socket_holds_unread(holder: _Holder) -> None:
    holder.peer.send(holder.ch, b"first ")
    holder.say()
    holder.relay.ready(holder.conn.fileno(), R._POLLIN)  # the relay thread's way: written
    holder.peer.send(holder.ch, b"second")
    holder.say()
    assert holder.read(unread=True) is None
    assert _recv_exactly(holder.users[0], 12) == b"first second"


@pytest.mark.parametrize("then", ["eof", "close", "the connection ends"])
def test_what_ends_a_channel_comes_after_its_held_bytes(holder: _Holder, then: str) -> None:
    holder.peer.send(holder.ch, b"last words")
    if then == "eof":
        holder.peer.eof(holder.ch)
    elif then == "close":
        holder.peer.close(holder.ch)
    holder.say()
    if then == "the connection ends":
        relay = holder.relay
        relay.hold(holder.ch)
        relay.ready(holder.conn.fileno(), R._POLLIN)
        relay.end("gone")  # (as an error halfway through Writer.wait's read does)
        assert relay.take(holder.ch, lambda: False) is None
        assert holder.controls == [b"DISCONNECTED gone"]
    else:
        assert holder.read() is None  # (in the same read: written, then the end)
    user = holder.users[0]
    assert _recv_exactly(user, 10) == b"last words"
    assert user.recv(1) == b""


def test_other_channels_bytes_are_written_while_one_is_held(holder: _Holder) -> None:
    holder.peer.send(holder.other, b"theirs")
    holder.peer.send(holder.ch, b"mine")
    holder.say()
    assert holder.read() == b"mine"
    assert _recv_exactly(holder.users[1], 6) == b"theirs"
    assert holder.relay.holding is None
    holder.peer.send(holder.ch, b"later")
    holder.say()
    holder.relay.ready(holder.conn.fileno(), R._POLLIN)  # not held: written as usual
    assert _recv_exactly(holder.users[0], 5) == b"later"


def test_the_loop_asks_whether_to_stop_under_the_owners_lock() -> None:
    # Broke: until() ran outside the lock, so Connection._finished read the
    # processes and channels other threads change under it (a dict changed
    # during iteration ends the relay thread, and the connection with it).
    lock = threading.Lock()
    held: list[bool] = []

    def until() -> bool:
        held.append(lock.locked())
        return len(held) >= 3

    a, b = socket.socketpair()
    mine, user = socket.socketpair()
    with a, b, user:
        relay = R.Relay(M.Mux(True), a.fileno(), a.fileno(), lambda ch, what: None, lambda data: None)
        relay.open("raw", mine)  # a channel: the loop would go on (the relay owns it now)
        r, w = os.pipe()
        try:
            done = threading.Thread(target=R.run, args=(relay, r, until), kwargs={"lock": lock})
            done.start()
            for _ in range(1000):  # (each wake makes it loop without waiting for the peer)
                os.write(w, b"x")
                done.join(0.01)
                if not done.is_alive():
                    break
            assert not done.is_alive()
        finally:
            relay.close()
            os.close(r)
            os.close(w)
    assert held == [True, True, True]
