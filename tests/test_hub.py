"""The remote host's hub (_hub), run here from its sources over a socketpair instead of ssh.

The caller's end is a relay in a thread (what anyfork.remote runs); the
tests speak anyfork's frames on the sockets it ties to channels.
"""

from __future__ import annotations

import ast
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from anyfork import _exec
from anyfork import _mux as M
from anyfork import _protocol as P
from anyfork import _relay as R
from helpers import wait_exited

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = pytest.mark.usefixtures("check_leaks")

TESTS = str(Path(__file__).resolve().parent)
HUB_MODULES = ("_protocol", "_serve", "_mux", "_relay", "_importer", "_hub")


class Connection:
    """A hub in a fresh ``python -S`` that has no anyfork on its path."""

    def __init__(self, tmp: Path) -> None:
        program, preamble = _exec.pipe_bootstrap(HUB_MODULES, "_hub:main")
        self.conn, theirs = socket.socketpair()
        self.stderr = tmp / "hub.stderr"
        with self.stderr.open("wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-S", "-c", program], stdin=theirs, stdout=theirs,
                                         stderr=err, cwd=tmp, env={"PATH": os.environ.get("PATH", "")})
        theirs.close()
        self.conn.sendall(preamble)
        self.controls: list[bytes] = []
        self.changed = threading.Condition()
        self.relay = R.Relay(M.Mux(caller=True), self.conn.fileno(), self.conn.fileno(),
                             lambda ch, what: None, self._control)
        self.wake_r, self.wake_w = os.pipe()
        self.thread = threading.Thread(target=R.run, args=(self.relay, self.wake_r), daemon=True)
        self.thread.start()

    def _control(self, data: bytes) -> None:
        with self.changed:
            self.controls.append(data)
            self.changed.notify_all()

    def control(self, word: bytes, timeout: float = 10.0) -> bytes:
        """The first control message that starts with ``word``."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for c in self.controls:
                    if c.startswith(word):
                        return c
                left = deadline - time.monotonic()
                assert left > 0, f"no {word!r} in {self.controls}; hub stderr: {self.stderr.read_text()}"
                self.changed.wait(left)

    def serve(self) -> tuple[int, socket.socket]:
        """A new process on the hub: its channel, and the socket to prepare it over."""
        mine, user = socket.socketpair()
        ch = self.relay.mux.open("serve")  # opened from this thread: the relay's loop is woken below
        self.relay.tie(ch, mine, "serve")
        os.write(self.wake_w, b"x")
        return ch, user

    def send_control(self, data: bytes) -> None:
        self.relay.mux.control(data)
        os.write(self.wake_w, b"x")

    def close(self) -> None:
        self.conn.shutdown(socket.SHUT_RDWR)
        self.proc.wait(10)
        self.thread.join(10)
        self.relay.close()
        self.conn.close()
        os.close(self.wake_r)
        os.close(self.wake_w)


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Connection]:
    c = Connection(tmp_path)
    yield c
    if c.proc.poll() is None:
        c.close()


def send(sock: socket.socket, parts: list[P.Buffer], fds: list[int] | tuple[int, ...] = ()) -> None:
    sock.sendmsg([b"".join(bytes(p) for p in parts)], P.ancillary(fds, socket.SOL_SOCKET, socket.SCM_RIGHTS))


def read_reply(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    chunks = []
    while data := sock.recv(65536):
        chunks.append(data)
    return b"".join(chunks)


def test_hello_says_version_pid_and_python(hub: Connection) -> None:
    _word, version, pid, py, host = hub.control(b"HELLO").split()
    assert version == b"1"
    assert int(pid) == hub.proc.pid
    assert py.decode() == ".".join(map(str, sys.version_info[:3]))
    assert host.decode() == socket.gethostname()


def test_a_process_on_the_hub_runs_a_function_and_reports_its_exit(hub: Connection) -> None:
    ch, sock = hub.serve()
    with sock:
        send(sock, P.items_frame(P.PATH, [TESTS, *sys.path]))
        send(sock, P.run_frame("helpers:pids"))
        pid, ppid = ast.literal_eval(read_reply(sock).decode())
    assert hub.control(b"PID").split() == [b"PID", str(ch).encode(), str(pid).encode()]
    assert ppid == hub.proc.pid  # the hub is its parent, so it alone reaps it
    assert hub.control(b"EXIT").split() == [b"EXIT", str(ch).encode(), b"0"]


def test_a_template_on_the_hub_forks_through_the_relays(hub: Connection) -> None:
    _ch, tpl = hub.serve()
    with tpl:
        send(tpl, P.items_frame(P.PATH, [TESTS, *sys.path]))
        child, child_theirs = socket.socketpair()
        reports, reports_theirs = socket.socketpair()
        send(tpl, P.fork_frame(1, True), [child_theirs.fileno(), reports_theirs.fileno()])
        child_theirs.close()
        reports_theirs.close()
        with child, reports:
            dec = P.Decoder(P.REPORT_TABLE)
            reports.settimeout(10)
            dec.feed(reports.recv(100))
            frame = dec.next_frame()
            assert frame is not None
            assert frame.kind == P.PID
            _, child_pid = P.decode_seq_int(frame.payload)
            send(child, P.run_frame("helpers:pids"))
            pid, ppid = ast.literal_eval(read_reply(child).decode())
            assert pid == child_pid
            hub_pid = int(hub.control(b"PID").split()[2])
            assert ppid == hub_pid  # forked by the template on the remote host
            dec.feed(reports.recv(100))
            frame = dec.next_frame()
            assert frame is not None
            assert frame.kind == P.EXIT
            assert P.decode_seq_int(frame.payload) == (1, 0)


def test_kill_reaches_the_process_and_its_status_comes_back(hub: Connection) -> None:
    ch, sock = hub.serve()
    with sock:
        pid = int(hub.control(b"PID").split()[2])
        hub.send_control(f"KILL {ch} {int(signal.SIGKILL)}".encode())
        assert hub.control(b"EXIT").split() == [b"EXIT", str(ch).encode(), str(-signal.SIGKILL).encode()]
    assert wait_exited(pid, 5)


def test_the_end_of_the_connection_ends_everything_the_hub_started(hub: Connection) -> None:
    # Processes that will never read their sockets again, forked from a
    # template on the hub: EOF alone would never end them.
    _ch, tpl = hub.serve()
    with tpl:
        send(tpl, P.items_frame(P.PATH, [TESTS, *sys.path]))
        child, child_theirs = socket.socketpair()
        reports, reports_theirs = socket.socketpair()
        send(tpl, P.fork_frame(1, True), [child_theirs.fileno(), reports_theirs.fileno()])
        child_theirs.close()
        reports_theirs.close()
        with child, reports:
            send(child, P.items_frame(P.EVAL, ["import time\nwhile True: time.sleep(1)"]))
            dec = P.Decoder(P.REPORT_TABLE)
            reports.settimeout(10)
            dec.feed(reports.recv(100))
            frame = dec.next_frame()
            assert frame is not None
            _, child_pid = P.decode_seq_int(frame.payload)
            tpl_pid = int(hub.control(b"PID").split()[2])
            stuck, stuck_theirs = socket.socketpair()
            send(tpl, P.fork_frame(2, False), [stuck_theirs.fileno()])
            stuck_theirs.close()
            with stuck:
                send(stuck, P.items_frame(P.EVAL, ["import signal, time\nsignal.signal(signal.SIGHUP, "
                                                   "signal.SIG_IGN)\nwhile True: time.sleep(1)"]))
                dec.feed(reports.recv(100))
                frame = dec.next_frame()
                assert frame is not None
                _, stuck_pid = P.decode_seq_int(frame.payload)
                hub.close()  # the connection drops
                for pid in (hub.proc.pid, tpl_pid, child_pid, stuck_pid):
                    assert wait_exited(pid, 5), f"process {pid} outlived its connection"


def test_a_failure_record_reaches_the_caller_before_the_exit_and_any_later_sync(hub: Connection) -> None:
    # The hub is this host's failure sink: what a process sends there before
    # it exits goes to the caller, ahead of its EXIT, and ahead of the
    # answer to a SYNC asked after it.
    ch, sock = hub.serve()
    with sock:
        send(sock, P.items_frame(P.EVAL, ["raise LookupError('raised on the hub')"]))
        send(sock, P.run_frame("os:getpid"))
        read_reply(sock)
    exit_msg = hub.control(b"EXIT")
    assert exit_msg.split() == [b"EXIT", str(ch).encode(), b"1"]
    hub.send_control(b"SYNC 7")
    hub.control(b"SYNCED 7")
    words = [c.split(b" ", 1)[0] for c in hub.controls]
    assert words.index(b"FAILURE") < words.index(b"EXIT") < words.index(b"SYNCED")
    from anyfork import _failures

    records = _failures.Records()
    records.add(hub.control(b"FAILURE").split(b" ", 1)[1])
    pid = int(hub.control(b"PID").split()[2])
    type_name, message, _ = records.find(pid, hub.proc.pid, 0) or ("", "", "")
    assert (type_name, message) == ("LookupError", "raised on the hub")
