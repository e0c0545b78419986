"""The hub: what anyfork runs on a remote host, at the far end of ssh.

Theory of operation
-------------------
``_stage1`` builds this module (with ``_protocol``, ``_serve``, ``_mux`` and
``_relay``) from sources read on stdin, then calls :func:`main`.  The hub owns
ssh's stdin and stdout for the rest of its life: they carry the mux.

- It says HELLO first, on the connection's own channel: the protocol
  version, its pid, its Python and the host's name, so the caller fails clearly on a
  mismatch before anything else.
- Each channel the caller opens as ``serve`` is a new process: the hub
  forks a child that runs anyfork's ordinary serve loop on a socketpair
  whose other end the relay ties to that channel.  The child is a process
  like any local one: ``require``, ``eval``, ``run``; ``fork`` makes it a
  template, whose FORK and SPAWN sockets and SPARE reports the relays carry
  as channels of their own (see ``_relay``).  So a remote template forks
  without another ssh connection, and the caller's side runs its own code.
- The hub is the parent of each such process, so it alone can name its pid
  without racing reuse: it reports ``PID`` and ``EXIT`` for each (the
  caller's ``pid``, ``wait``, ``returncode``) and signals it on ``KILL``.
- Its processes send their FAILURE records (why one failed before its
  function ran) to the hub's own failure sink; the hub forwards them to the
  caller as CONTROL messages, each before the EXIT that follows it, and
  answers a SYNC once what is queued has gone (see ``Connection.failure``).
- When the connection ends (the caller exited or was killed, ssh died, the
  network dropped), the relay closes every channel, so each process sees
  EOF; then the hub signals its whole process group (everything it started
  and what they started, unless they left the group) with SIGTERM, and
  SIGKILL a moment later, and exits.

The hub never runs code of the user's; its children do, after they leave
it.  It imports the standard library and the modules above only.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time

from . import _mux as M
from . import _relay as R

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn

VERSION = 1


class Hub:
    def __init__(self, rfd: int, wfd: int) -> None:
        self.mux = M.Mux(caller=False)
        self.relay = R.Relay(self.mux, rfd, wfd, self.on_open, self.on_control)
        self.pids: dict[int, int] = {}  # channel -> pid of the process serving it, until reaped
        # Modules from the caller (see _importer): every process started here
        # asks on its end of this datagram pair; answers are cached by name.
        self.imports, self.imports_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.imports.setblocking(False)
        # This host's failure sink (see _failures): every process started
        # here sends its FAILURE record to it, and the hub forwards each to
        # the caller before it reports anything later (an EXIT, a SYNCED).
        self.failures, self.failures_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.failures.setblocking(False)
        self.sources: dict[str, bytes] = {}
        self.asking: dict[str, list[socket.socket]] = {}  # requests waiting for the caller
        self.answering: list[tuple[socket.socket, memoryview]] = []  # answers being written
        self.wake_r, self.wake_w = os.pipe()
        for fd in (self.wake_r, self.wake_w):
            os.set_blocking(fd, False)
        signal.signal(signal.SIGCHLD, lambda *a: None)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        self.gone = False

    def hello(self) -> None:
        py = ".".join(map(str, sys.version_info[:3]))
        self.mux.control(f"HELLO {VERSION} {os.getpid()} {py} {socket.gethostname()}".encode())

    def on_open(self, ch: int, what: str) -> socket.socket | None:
        if what != "serve":
            return None
        mine, theirs = socket.socketpair()
        try:
            pid = os.fork()
        except OSError as e:
            mine.close()
            theirs.close()
            self.mux.control(f"FAILED {ch} {e}".encode())
            return None
        if pid == 0:
            self._child(theirs, mine)
        theirs.close()
        self.pids[ch] = pid
        self.mux.control(f"PID {ch} {pid}".encode())
        return mine

    def _child(self, sock: socket.socket, mine: socket.socket) -> NoReturn:
        """In a new process: drop everything of the hub's, serve ``sock``."""
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            mine.close()
            keep = sock.fileno()
            self.imports.close()
            self.failures.close()
            for waiting in self.asking.values():
                for s in waiting:
                    s.close()
            for s, _ in self.answering:
                s.close()
            for fd in (self.relay.rfd, self.relay.wfd, self.wake_r, self.wake_w):
                if fd != keep:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            for loc in self.relay.locals.values():
                loc.sock.close()  # this process's copies only
            from . import _importer, _serve

            _importer.install(self.imports_child, socket.gethostname())
            # (Detached: the serve loop closes it before the function runs.
            # Not inherited by what the function execs.)
            _serve.failure_fd = self.failures_child.detach()
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # as any process being prepared
            server = _serve.Server(_serve.Sock(fileno=sock.detach()))
        except BaseException:
            sys.excepthook(*sys.exc_info())
            os._exit(1)
        server.serve()

    def on_control(self, data: bytes) -> None:
        word, _, rest = data.partition(b" ")
        if word == b"KILL":
            ch_text, _, sig_text = rest.partition(b" ")
            pid = self.pids.get(int(ch_text))
            if pid is not None:  # not reaped yet, so still our child's
                try:
                    os.kill(pid, int(sig_text))
                except OSError:
                    pass
        elif word == b"SOURCE":
            name_bytes, _, answer = rest.partition(b"\0")
            name = name_bytes.decode("utf-8", "surrogatepass")
            self.sources[name] = answer
            for s in self.asking.pop(name, []):
                self.answering.append((s, memoryview(answer)))
            self.write_answers()
        elif word == b"SYNC":
            # The caller saw a process exit with status 1: whatever record it
            # sent is queued here by now, and goes before the answer.
            self.read_failures()
            self.mux.control(b"SYNCED " + rest)
        elif word == b"DISCONNECTED":
            self.gone = True

    def read_failures(self) -> None:
        """Forward the FAILURE records queued on this host's sink."""
        while True:
            try:
                data = self.failures.recv(1 << 18)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            self.mux.control(b"FAILURE " + data)

    def read_request(self) -> None:
        """A process asks for a module (see _importer): answer from the cache, or ask the caller."""
        try:
            data, anc, _, _ = self.imports.recvmsg(4096, socket.CMSG_SPACE(4 * 4))
        except BlockingIOError:
            return
        fds: list[int] = []
        for level, kind, raw in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(memoryview(raw[: len(raw) - len(raw) % 4]).cast("i"))
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            return  # not a request of _importer's
        reply = socket.socket(fileno=fds[0])
        reply.setblocking(False)
        name = data.decode("utf-8", "surrogatepass")
        answer = self.sources.get(name)
        if answer is not None:
            self.answering.append((reply, memoryview(answer)))
            self.write_answers()
            return
        waiting = self.asking.setdefault(name, [])
        waiting.append(reply)
        if len(waiting) == 1:
            self.mux.control(b"IMPORT " + data)

    def write_answers(self) -> None:
        """Write what the answers' sockets take now; each closes when whole (its EOF ends it)."""
        still = []
        for s, answer in self.answering:
            view = answer
            try:
                while view:
                    view = view[s.send(view):]
            except BlockingIOError:
                still.append((s, view))
                continue
            except OSError:
                pass  # the process gave up asking
            s.close()
        self.answering = still

    def reap(self) -> None:
        try:
            os.read(self.wake_r, 4096)
        except OSError:
            pass
        self.read_failures()  # a child's record, sent before it exited, before its EXIT
        by_pid = {pid: ch for ch, pid in self.pids.items()}
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if not pid:
                return
            ch = by_pid.get(pid)
            if ch is not None:
                del self.pids[ch]
                code = os.waitstatus_to_exitcode(status)
                self.mux.control(f"EXIT {ch} {code}".encode())

    def serve(self) -> None:
        import select

        relay = self.relay
        poller = R.Poller()
        wake, imports, failures = self.wake_r, self.imports.fileno(), self.failures.fileno()
        own = ((wake, select.POLLIN), (imports, select.POLLIN), (failures, select.POLLIN))
        self.hello()
        while relay.connected:
            fds = relay.interest()
            fds.extend(own)
            if self.answering:
                fds.extend((s.fileno(), select.POLLOUT) for s, _ in self.answering)
            for fd, events in poller.poll(fds):
                if fd == wake:
                    self.reap()
                elif fd == imports:
                    self.read_request()
                elif fd == failures:
                    self.read_failures()
                elif events & select.POLLOUT and any(s.fileno() == fd for s, _ in self.answering):
                    self.write_answers()
                else:
                    relay.ready(fd, events)
            relay.flush()
        relay.close()


def _end_group() -> None:
    """Everything this hub started, and what they started: SIGTERM, and
    SIGKILL for what is still there a second later (this hub with it)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        os.killpg(0, signal.SIGTERM)
    except OSError:
        return
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline and _others_in_group():
        try:
            os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.02)
    if _others_in_group():
        os.killpg(0, signal.SIGKILL)


def _others_in_group() -> bool:
    """Whether a process other than this one is in this one's process group
    (True where /proc can't tell: then the group is killed to be sure)."""
    me, group = os.getpid(), os.getpgid(0)
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True
    for entry in entries:
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        if fields[0] != b"Z" and int(fields[2]) == group:
            return True
    return False


def main() -> NoReturn:
    """The hub's life: serve the connection on stdin/stdout, then end everything."""
    # Off 0 and 1: what the processes forked from here print must never land
    # in the connection, and what they read must not be taken from it.
    rfd, wfd = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    try:
        os.setsid()  # one group to end when the connection ends (sshd gives no pty)
    except OSError:
        pass
    code = 0
    try:
        Hub(rfd, wfd).serve()
    except BaseException:
        sys.excepthook(*sys.exc_info())  # ssh brings it to the caller's stderr
        code = 1
    _end_group()
    os._exit(code)
