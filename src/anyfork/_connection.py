"""The caller's end of a remote connection: one ssh process, its hub, a relay thread.

Theory of operation
-------------------
``Connection(command)`` starts ``command`` (``ssh ... host python3``) with
anyfork's first stage appended, its stdin and stdout both one end of a
socketpair and its stderr a pipe.  It writes the sources of the hub's
modules (``_exec.pipe_bootstrap``), then waits for the hub's HELLO, which
names the protocol version, the hub's pid and its Python.  OpenSSH does the
transport and the authentication; nothing listens anywhere.

From then on one thread, the relay, carries the mux (``_relay``): each
process on the remote host is a channel the caller opens (``serve``), tied
here to a local socketpair whose other end the caller's ``Process`` owns.
(An rpc client of such a process writes and waits past the relay thread,
under the same lock: see ``Writer``.)
The hub is the parent of each such process and reports its pid and exit
status as CONTROL messages; ``Remote`` records them for the caller.

What ssh writes on stderr (its own messages, and what remote processes
print there) is passed to this process's stderr as it comes, and the last
few kilobytes are kept, so that a connection that fails (a wrong host key,
no such host, no python3 there) fails with ssh's own words.

The ssh process is this process's child: it is reaped by pidfd like any
process anyfork spawns.  When the caller exits or is killed, ssh sees EOF
on its stdin, the remote hub sees the end of the connection, and ends
everything it started.
"""

from __future__ import annotations

import os
import shlex
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from . import _exec, _failures
from . import _mux as M
from . import _relay as R
from ._backend import Notifier
from ._errors import Error, ProtocolError, TimeoutExpired

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

VERSION = 1
HUB_MODULES = ("_protocol", "_serve", "_mux", "_relay", "_importer", "_hub")
_STDERR_KEPT = 8192


class Remote:
    """What the hub reports of one process it runs for the caller."""

    __slots__ = ("channel", "failed", "pid", "returncode", "seq")

    def __init__(self, channel: int) -> None:
        self.channel = channel
        self.seq = channel  # what a Process calls it before its pid is known
        self.pid: int | None = None
        self.returncode: int | None = None
        self.failed: str | None = None  # the hub could not start it, or the connection ended: why


def remote_argv(command: Sequence[str], program: str) -> list[str]:
    """``command`` with the first stage appended.

    ssh joins the words after the host into one line for the remote shell,
    so each is quoted for it; a command that is not ssh gets them as they are.
    """
    argv = [str(c) for c in command]
    words = ["-S", "-c", program]
    if os.path.basename(argv[0]).startswith("ssh"):
        words = [shlex.quote(w) for w in words]
    return argv + words


class Connection:
    """One remote host, through one ssh process.

    Raises:
        anyfork.Error: ssh failed (its message is in the error) or the far
            side is not anyfork's hub.
        anyfork.ProtocolError: the hub speaks another protocol version.
        anyfork.TimeoutExpired: no HELLO within ``timeout`` seconds.
    """

    def __init__(self, command: Sequence[str], *, timeout: float = 60.0) -> None:
        if isinstance(command, (str, bytes)) or not command or not all(isinstance(c, str) for c in command):
            raise TypeError("command is the argv that starts a Python on the far side, a list of str, "
                            "e.g. ['ssh', 'host', 'python3']")
        argv = remote_argv(command, _exec.stage1())
        self.command = list(command)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._released = False
        self.remotes: dict[int, Remote] = {}
        self.failures = _failures.Records()  # what the hub forwarded (see failure)
        self._syncs = self._synced = 0
        self._none: set[tuple[int, int | None, int]] = set()  # asked, and the hub had no record
        self.hello: tuple[int, str] | None = None  # the hub's pid and Python
        self.host = " ".join(command)  # what to call it in messages: the host's name once it said hello
        # Notified whenever the hub said something (pid, exit): operations
        # of _backend wait on it (see remote._Hub).
        self.notifier = Notifier()
        self.ended: str | None = None
        self._ssh_reaped = False  # (then its pid may be another process's: never waited on again)
        self._lent = False  # a Writer's caller reads the connection in the relay thread's place
        self._asleep = False  # and the relay thread no longer looks every LENT_MS (see R.run)
        self._stderr = bytearray()
        self.stderr_ended: bool | None = None  # once the relay ended: ssh's stderr ended (not a timeout)
        mine, theirs = socket.socketpair()
        err_r, err_w = os.pipe()
        try:
            self.pid = os.posix_spawnp(argv[0], argv, dict(os.environ), file_actions=[
                (os.POSIX_SPAWN_DUP2, theirs.fileno(), 0),
                (os.POSIX_SPAWN_DUP2, theirs.fileno(), 1),
                (os.POSIX_SPAWN_DUP2, err_w, 2),
            ], setpgroup=0)  # Ctrl-C at a terminal is the caller's to handle, not ssh's
        except OSError as e:
            mine.close()
            os.close(err_r)
            raise Error(f"anyfork could not start {argv[0]!r}: {e}") from e
        finally:
            theirs.close()
            os.close(err_w)
        self._err = err_r
        self._sock = mine
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)  # (see _wake)
        self.relay = R.Relay(M.Mux(caller=True), mine.fileno(), mine.fileno(), self._refuse, self._control)
        # Made while ssh connects (the first connection of a process compiles
        # the hub's modules here), and written by the relay: it is larger
        # than a socket holds, and ssh reads nothing before it has connected.
        try:
            self.relay.write_first(_exec.preamble(HUB_MODULES, "_hub:main"))
            rpc = sys.modules.get("anyfork.rpc")
            if rpc is not None:
                # Its workers will ask for these: compiled now and sent ahead into
                # the hub's cache (after the preamble), they cost no round trip then.
                from ._importer import answer

                for name in rpc.WORKER_MODULES:
                    self.relay.mux.control(b"SOURCE " + name.encode() + b"\0" + answer(name))
        except BaseException:
            import signal

            os.kill(self.pid, signal.SIGTERM)  # (not reaped yet: still our ssh)
            self._release()  # which reaps it, and closes all
            raise
        self._thread = threading.Thread(target=self._run, name=f"anyfork relay {command[-2:]}", daemon=True)
        self._thread.start()
        try:
            self._await_hello(timeout)
        except BaseException:
            self.close()
            raise

    # --- the relay thread ----------------------------------------------------------

    def _finished(self) -> bool:
        """(under the lock) Every process the hub ran for us has exited, and
        every channel is closed: nothing more can use the connection."""
        return bool(self.remotes) and not self.relay.locals and all(
            r.returncode is not None or r.failed is not None for r in self.remotes.values())

    def _run(self) -> None:
        try:
            R.run(self.relay, self._wake_r, self._finished, lock=self._lock,
                  others={self._err: self._read_stderr}, lent=self._is_lent)
        finally:
            if self._finished_unlocked():
                # Used up: ssh's stdin ends now, so that it exits and what it
                # still says ends with it (not after _drain_stderr's timeout).
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self.stderr_ended = self._drain_stderr()
            with self._changed:
                if self.ended is None:
                    self.ended = "the connection ended"
                for r in self.remotes.values():
                    if r.returncode is None and r.failed is None:
                        r.failed = self.ended
                self._changed.notify_all()
            self.notifier.notify()
            if self._finished_unlocked():
                self._release()  # used up: nobody need close it

    def _is_lent(self, waits: int) -> bool:
        """(the relay thread, under the lock; see R.run's ``lent``)"""
        self._asleep = self._lent and waits >= R.LENT_LOOKS
        return self._lent

    def _end_relay(self, why: str) -> None:
        """(under the lock) End the connection from this side: the relay's
        stream can't be trusted (see Writer._carry)."""
        if self.relay.connected:
            self.relay.end(why)
            try:
                self._sock.shutdown(socket.SHUT_RDWR)  # ssh sees EOF: the hub ends everything
            except OSError:
                pass
        self._wake()

    def _finished_unlocked(self) -> bool:
        with self._lock:
            return self._finished()

    def _read_stderr(self) -> None:
        try:
            data = os.read(self._err, 65536)
        except OSError:
            data = b""
        if not data:
            # ssh is gone or going: no more to read; the relay sees the rest.
            self.relay.connected = self.relay.connected and self._ssh_alive()
            return
        self._pass_stderr(data)  # (the relay holds the lock while it calls this)

    def _pass_stderr(self, data: bytes) -> None:
        """(under the lock) Keep the tail of what ssh says, and pass it on to our stderr."""
        self._stderr += data
        del self._stderr[:-_STDERR_KEPT]
        try:
            os.write(2, data)
        except OSError:
            pass

    def _drain_stderr(self, timeout: float = 2.0) -> bool:
        """What ssh still has to say as it exits (why the connection failed);
        True if its stderr ended, False if ``timeout`` did."""
        import select

        deadline = time.monotonic() + timeout
        p = select.poll()  # (not select(): a descriptor may be 1024 or more)
        p.register(self._err, select.POLLIN)
        while (left := deadline - time.monotonic()) > 0:
            if not p.poll(left * 1000):
                return False
            try:
                data = os.read(self._err, 65536)
            except OSError:
                return True
            if not data:
                return True
            with self._lock:
                self._pass_stderr(data)
        return False

    def _ssh_alive(self) -> bool:
        try:
            pid, _ = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return False
        if pid:
            self._ssh_reaped = True
        return pid == 0

    @staticmethod
    def _refuse(ch: int, what: str) -> socket.socket | None:
        return None  # the hub opens channels only for descriptors

    def _control(self, data: bytes) -> None:
        """(relay thread, under the lock) A message of the hub's."""
        word, _, rest = data.partition(b" ")
        fields = rest.split(b" ")
        if word == b"HELLO":
            try:
                version, pid, python = int(fields[0]), int(fields[1]), fields[2].decode()
                if len(fields) > 3:
                    self.host = b" ".join(fields[3:]).decode("utf-8", "replace")
            except (IndexError, ValueError):
                self.ended = f"the far side said {data[:80]!r}, not anyfork's HELLO"
            else:
                if version != VERSION:
                    self.ended = (f"the far side speaks anyfork's remote protocol {version}, "
                                  f"this side {VERSION}")
                else:
                    self.hello = (pid, python)
        elif word in (b"PID", b"EXIT", b"FAILED"):
            r = self.remotes.get(int(fields[0]))
            if r is not None:
                if word == b"PID":
                    r.pid = int(fields[1])
                elif word == b"EXIT":
                    r.returncode = int(fields[1])
                else:
                    r.failed = b" ".join(fields[1:]).decode("utf-8", "replace")
        elif word == b"IMPORT":
            # A remote process wants a module only this side has (see _importer).
            from ._importer import answer

            self.relay.mux.control(b"SOURCE " + rest + b"\0" + answer(rest.decode("utf-8", "surrogatepass")))
            return
        elif word == b"FAILURE":
            self.failures.add(rest)
            return
        elif word == b"SYNCED":
            self._synced = max(self._synced, int(fields[0]))
        elif word == b"DISCONNECTED":
            self.ended = rest.decode("utf-8", "replace")
        self._changed.notify_all()
        self.notifier.notify()

    # --- what callers do ---------------------------------------------------------------

    def _await_hello(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while self.hello is None:
                if self.ended is not None:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutExpired(f"{self._who()}: no answer within {timeout} s")
                self._changed.wait(left)
        if self.hello is None:
            self._thread.join(5)
            said = self.stderr().strip()
            why = self.ended or "the connection ended"
            if "speaks anyfork's remote protocol" in why:
                raise ProtocolError(f"{self._who()}: {why}")
            raise Error(f"{self._who()} failed: {why}" + (f"; it said: {said}" if said else ""))

    def _who(self) -> str:
        return " ".join(shlex.quote(c) for c in self.command)

    def stderr(self) -> str:
        """The last few kilobytes ssh (and what runs remotely) wrote on stderr."""
        with self._lock:
            return bytes(self._stderr).decode("utf-8", "replace")

    def serve(self) -> tuple[Remote, socket.socket]:
        """A new process on the remote host: its record, and the caller's end of its command socket.

        Raises:
            anyfork.Error: the connection has ended.
        """
        mine, theirs = socket.socketpair()
        with self._lock:
            if self.ended is not None or not self.relay.connected:
                mine.close()
                theirs.close()
                raise Error(f"{self._who()}: {self.ended or 'the connection ended'}")
            ch = self.relay.open("serve", theirs)
            r = self.remotes[ch] = Remote(ch)
            self._wake()
        return r, mine

    def _wake(self) -> None:
        """(under the lock) Wake the relay thread to look again.  Under the
        lock, so never after ``_release`` closed the pipe (its number may be
        another descriptor's by then); the pipe never blocks, and a full one
        wakes the relay as well."""
        if not self._released:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass

    def writer(self, r: Remote, sock: socket.socket) -> Writer:
        """What to write to the process ``serve`` gave ``r`` and ``sock`` for,
        in place of ``sock``: see ``Writer``."""
        return Writer(self, r.channel, sock)

    def kill(self, r: Remote, sig: int) -> None:
        """Signal a process the hub runs (its parent, so never a recycled pid)."""
        with self._lock:
            if r.returncode is not None or r.failed is not None or not self.relay.connected:
                return
            self.relay.mux.control(f"KILL {r.channel} {int(sig)}".encode())
            self._wake()

    def wait(self, r: Remote, timeout: float | None, what: str = "pid") -> None:
        """Until the hub reported ``what`` ("pid" or "exit") for ``r``, or it can't."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while True:
                if r.failed is not None or (r.pid is not None if what == "pid" else r.returncode is not None):
                    return
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutExpired(f"remote process {r.pid} still running after {timeout} s")
                self._changed.wait(left)

    def failure(self, pid: int, ppid: int | None, seq: int) -> _failures.Texts | None:
        """Take the FAILURE record of remote process ``pid`` (as
        ``_failures.take``), if the hub forwarded it.  The hub forwards a
        record before the EXIT that follows it, but the exit of a process a
        remote template forked comes on that template's channel: a caller
        that finds nothing asks the hub to forward what it holds
        (``sync_for``) and waits until that is ``settled``, then looks again
        (``Process._failed_op``)."""
        with self._lock:
            return self.failures.find(pid, ppid, seq)

    def sync_for(self, key: tuple[int, int | None, int]) -> int | None:
        """Ask the hub to forward what it holds, unless ``key``'s record is
        here or known to be absent; the SYNC to wait for (None: nothing to
        wait for)."""
        with self._lock:
            if (self.failures.has(*key) or key in self._none or self.ended is not None
                    or not self.relay.connected):
                return None
            self._syncs += 1
            n = self._syncs
            self.relay.mux.control(f"SYNC {n}".encode())
            self._wake()
        return n

    def settled(self, key: tuple[int, int | None, int], n: int) -> bool:
        """Whether SYNC ``n`` was answered (or can't be): ``key``'s record is
        here now if it ever will be."""
        with self._lock:
            return self._settled(key, n)

    def _settled(self, key: tuple[int, int | None, int], n: int) -> bool:
        if self._synced >= n:
            if not self.failures.has(*key):
                self._none.add(key)  # the hub had none for it: a plain status 1, asked once
            return True
        return self.ended is not None

    def _reap_ssh(self, timeout: float = 5.0) -> None:
        """ssh exits once its stdin ends; one that doesn't is killed."""
        import select
        import signal

        if self._ssh_reaped:
            return
        deadline = time.monotonic() + timeout
        pidfd_open = getattr(os, "pidfd_open", None)  # (Linux 5.3+: readable once it exited)
        if pidfd_open is not None:
            try:
                pidfd = pidfd_open(self.pid)
            except OSError:
                pass  # reaped already, or not permitted: the loop below
            else:
                try:
                    p = select.poll()  # (not select(): a descriptor may be 1024 or more)
                    p.register(pidfd, select.POLLIN)
                    p.poll(timeout * 1000)
                finally:
                    os.close(pidfd)
        while True:
            try:
                pid, _ = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return
            if pid:
                return
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)  # not reaped, so still ours
                deadline = float("inf")
                os.waitpid(self.pid, 0)
                return
            time.sleep(0.01)

    def close(self) -> None:
        """End the connection: every remote process sees EOF and the hub ends them."""
        with self._lock:
            if self.ended is None:
                self.ended = "the connection was closed"
            if self._released:
                return
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._wake()
        if threading.current_thread() is not self._thread:
            self._thread.join(10)
        self._release()

    def _release(self) -> None:
        """Let ssh go and close what this end holds (once)."""
        with self._lock:
            if self._released:
                return
            self._released = True
            self.relay.close()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # ssh's stdin ends: it exits
        except OSError:
            pass
        self._reap_ssh()
        for fd in (self._err, self._wake_r, self._wake_w):
            os.close(fd)
        self._sock.close()


class Writer:
    """Writes to one remote process from the calling thread: into the mux
    and onto ssh's socket, not through the relay thread.  A socket's
    ``send`` and ``sendmsg``, for rpc's caller side (``_rpc_io.send``), and
    ``wait``, for a caller waiting alone for a reply, which reads the
    connection itself meanwhile.

    Through the local socket, a write costs the relay thread a wake-up and
    three system calls more, and the GIL in between, and so does a reply:
    on a round trip, a good part of what the caller spends.  What can't go
    directly (a descriptor, a write larger than the channel's window, a
    channel whose window is full or that still carries anyfork's frames)
    goes to the local socket, and the relay carries it as before;
    ``Relay.send_direct`` keeps the two in order.  Either way the relay's
    work is done under the connection's lock, and ``_carry`` ends the
    connection if it is interrupted halfway.
    """

    __slots__ = ("_ch", "_conn", "_poller", "_sock", "_unread")

    def __init__(self, conn: Connection, ch: int, sock: socket.socket) -> None:
        self._conn = conn
        self._ch = ch
        self._sock = sock
        self._poller: Any = None
        self._unread: Any = None  # a poll of the caller's end alone (see _read)

    def wait(self, fd: int) -> bool | bytes:
        """Wait until ``fd`` (this channel's local socket, the caller's end)
        is readable, reading the connection meanwhile in the relay
        thread's place, so that a reply comes without the relay thread's
        wake-up and hand-over: True once ``fd`` is readable.  The bytes
        themselves, when what came for this channel can be handed over so
        (see ``Relay.take``): as if read from ``fd``, which then has
        nothing more to read than it had.  False, at once, if another
        thread reads it already or the connection has ended: then the
        caller waits on ``fd`` itself.

        Whatever comes is handled as the relay thread would (replies for
        other channels written to their sockets, the hub's messages
        recorded); the relay thread goes on with everything else, and is
        woken when what came gives it more to do.  The end of the
        connection, or of the process, closes the channel's socket, which
        makes ``fd`` readable: this never waits past it.
        """
        conn = self._conn
        relay = conn.relay
        with conn._lock:
            if conn._lent or conn._released or not relay.connected:
                return False
            conn._lent = True
        try:
            p = self._poller
            if p is None:
                import select

                p = self._poller = select.poll()
                p.register(fd, R._POLLIN)
                p.register(relay.rfd, R._POLLIN)
                self._unread = select.poll()
                self._unread.register(fd, R._POLLIN)
            rfd = relay.rfd
            while True:
                ready = p.poll()
                mine = any(f == fd for f, _ in ready)
                for f, events in ready:
                    if f != rfd:
                        continue
                    with conn._lock:
                        if conn._released or not relay.connected:
                            # (Its sockets are closed, so fd reads EOF; and
                            # the connection's number may be another's now.)
                            mine = True
                            continue
                        given: bytes | None = self._carry(self._read, f, events, mine)
                        if len(relay.locals) > 1 or relay.stalled() or any(
                                loc.out for loc in relay.locals.values()):
                            # What came gave the relay thread work it may not
                            # be waiting for (another channel's bytes to
                            # write, a new channel, the connection to
                            # write): it looks again now.
                            conn._wake()
                    if given is not None:
                        return given  # (mine: fd held bytes, so nothing was taken)
                if mine:
                    return True
        finally:
            with conn._lock:
                conn._lent = False
                if conn._asleep or len(relay.locals) > 1:
                    # The relay thread stopped looking every LENT_MS (a long
                    # wait), or what comes next may be others': it reads again now.
                    conn._wake()

    def _read(self, fd: int, events: int, unread: bool) -> bytes | None:
        """(under the lock) ``wait``'s read of the connection.  This
        channel's bytes it takes, rather than have them written to its
        socket and read back (a write, a wake-up and a read the fewer),
        unless they must go behind what is there: ``unread``, this poll
        found some, or it came since (see ``Relay.take``)."""
        relay = self._conn.relay
        # The hand-over (Relay.hold/take) is off: a remote call hung once in
        # 24 loaded runs with it (issue 13's note); replies go through the socket.
        relay.ready(fd, events)
        return None

    def _carry(self, step: Callable[..., Any], *args: Any) -> Any:
        """(under the lock) Run one step of the relay's work in this thread.

        The relay thread's steps can't be interrupted halfway, but a
        signal handler's exception (KeyboardInterrupt) can arrive here, in
        the main thread, between a write and its bookkeeping: the stream
        the mux follows would then be wrong (bytes written twice, or lost),
        for every process on the connection.  Rather than go on with it,
        the connection ends then, saying why; an error of the relay's own
        (which would have ended the relay thread) ends it too, and is not
        the caller's to see: its call fails as any call does when the
        connection ends."""
        relay = self._conn.relay
        try:
            got = step(*args)
            relay.flush()
        except BaseException as e:
            why = (f"interrupted ({type(e).__name__}) while this thread carried its bytes, "
                   "which left its stream untrustworthy")
            self._conn._end_relay(why)
            if not isinstance(e, Exception):
                raise
            return None
        return got

    def send(self, data: bytes | memoryview, flags: int = 0) -> int:
        conn = self._conn
        with conn._lock:
            relay = conn.relay
            # (False: it marked the socket as written to.)
            sent = not conn._released and self._carry(relay.send_direct, self._ch, data)
            if relay.stalled():
                conn._wake()
        return len(data) if sent else self._sock.send(data, flags)

    def sendmsg(self, bufs: list[bytes | memoryview], anc: object = (), flags: int = 0) -> int:
        if not anc and sum(len(b) for b in bufs) <= M.WINDOW:
            return self.send(b"".join(bufs), flags)
        with self._conn._lock:
            self._conn.relay.sent_around(self._ch)
        return self._sock.sendmsg(bufs, anc, flags)  # type: ignore[arg-type]
