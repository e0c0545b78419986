"""Shared by the tests and by the processes they start.

The functions in the first half run *inside* anyfork processes (``run``
names them as "helpers:name"), so this module imports the standard library
only and nothing heavy: every forked process that runs one imports it.  Each
reports back on its socket with ``reply`` (a ``repr`` the caller reads with
``ast.literal_eval``).  The second half is caller-side plumbing.
"""

from __future__ import annotations

import ast
import hashlib
import io
import os
import signal
import socket
import sys
import time

# --- in the process ---------------------------------------------------------------------


def reply(sock: socket.socket, obj: object) -> None:
    sock.sendall(repr(obj).encode())


def digest(item: object) -> tuple[str, int, str]:
    """What a bytes/str item is, compactly: type, length and sha256."""
    data = item.encode("utf-8", "surrogatepass") if isinstance(item, str) else bytes(item)  # type: ignore[call-overload]
    return (type(item).__name__, len(item), hashlib.sha256(data).hexdigest())  # type: ignore[arg-type]


def describe(item: object) -> object:
    if isinstance(item, socket.socket):
        return ("socket", item.getblocking(), os.get_inheritable(item.fileno()))
    if isinstance(item, io.FileIO):
        return ("FileIO", item.mode)
    if isinstance(item, int):
        return ("int", os.get_inheritable(item))
    if isinstance(item, (bytes, str)):
        return digest(item)
    return ("other", type(item).__name__)


def items(sock: socket.socket, *args: object) -> None:
    """Report what ``run`` passed: the socket, then every item in order."""
    reply(sock, [describe(sock), *(describe(a) for a in args)])


def pids(sock: socket.socket) -> None:
    reply(sock, (os.getpid(), os.getppid()))


def echo(sock: socket.socket, *args: object) -> None:
    """Send back everything read, once the caller shuts down its side."""
    chunks = []
    while data := sock.recv(1 << 20):
        chunks.append(data)
    sock.sendall(b"".join(chunks))


def mirror(sock: socket.socket, inbox: io.FileIO, outbox: socket.socket, *args: bytes | str) -> None:
    """Send everything back as it came: ``inbox`` (read to EOF) on ``outbox``,
    then each argument on ``sock``, framed as b"b" or b"s" (bytes or str),
    the length in octets, b":", and the octets."""
    outbox.sendall(b"".join(iter(lambda: inbox.read(1 << 16), b"")))
    outbox.close()
    for arg in args:
        raw = arg.encode("utf-8", "surrogatepass") if isinstance(arg, str) else arg
        sock.sendall(b"%s%d:%s" % (b"s" if isinstance(arg, str) else b"b", len(raw), raw))


def arg_length(sock: socket.socket, arg: bytes) -> None:
    sock.sendall(b"%d" % len(arg))


def timeout_of(sock: socket.socket, *args: object) -> None:
    reply(sock, sock.gettimeout())


def wait_eof(sock: socket.socket) -> None:
    """Keep running until the caller closes its end."""
    while sock.recv(4096):
        pass


def exit_with(sock: socket.socket, code: str) -> None:
    sys.exit(int(code))


def hard_exit(sock: socket.socket, code: str) -> None:
    os._exit(int(code))


def fail(sock: socket.socket) -> None:
    raise RuntimeError("failure raised by helpers.fail")


def interrupt(sock: socket.socket) -> None:
    raise KeyboardInterrupt


def exhaust_descriptors(limit: int = 64) -> list[int]:
    """Lower RLIMIT_NOFILE to ``limit`` and open descriptors until none is left.

    For callers run as a program of their own (never the test process):
    returns what it opened, so the caller can free exactly as many as it wants.
    """
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    held: list[int] = []
    try:
        while True:
            held.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass
    return held


def open_fds() -> dict[int, str]:
    """This process's descriptors and what they point at."""
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass  # the descriptor listdir used, closed by now
    return fds


def fds(sock: socket.socket, *args: object) -> None:
    """Report the open descriptors and the ones this process was given."""
    given = {0, 1, 2, sock.fileno()}
    for a in args:
        if isinstance(a, int):
            given.add(a)
        elif hasattr(a, "fileno"):
            given.add(a.fileno())  # type: ignore[union-attr]
    reply(sock, {"open": open_fds(), "given": sorted(given)})


def _handler_name(handler: object) -> str:
    if handler is signal.default_int_handler:
        return "default_int_handler"
    if handler == signal.SIG_DFL:
        return "SIG_DFL"
    if handler == signal.SIG_IGN:
        return "SIG_IGN"
    return repr(handler)


def signals(sock: socket.socket) -> None:
    """Report signal dispositions, the mask and whether SIGINT interrupts."""
    interrupted = False
    try:
        signal.raise_signal(signal.SIGINT)
        time.sleep(0)  # the handler runs at the next bytecode boundary
    except KeyboardInterrupt:
        interrupted = True
    reply(sock, {
        "SIGINT": _handler_name(signal.getsignal(signal.SIGINT)),
        "SIGCHLD": _handler_name(signal.getsignal(signal.SIGCHLD)),
        "SIGPIPE": _handler_name(signal.getsignal(signal.SIGPIPE)),
        "SIGUSR1": _handler_name(signal.getsignal(signal.SIGUSR1)),
        "mask": sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])),
        "wakeup_fd": signal.set_wakeup_fd(-1),
        "interrupted": interrupted,
    })


def main_names(sock: socket.socket, *names: str) -> None:
    """Report repr() of names in __main__ (None when missing)."""
    ns = sys.modules["__main__"].__dict__
    reply(sock, {n: repr(ns[n]) if n in ns else None for n in names})


def imported(sock: socket.socket, *names: str) -> None:
    reply(sock, {n: n in sys.modules for n in names})


def syspath(sock: socket.socket) -> None:
    reply(sock, sys.path)


def no_site(sock: socket.socket) -> None:
    reply(sock, sys.flags.no_site)


def write_to(sock: socket.socket, target: object, data: bytes) -> None:
    """Write ``data`` to a handle passed with send_fh."""
    if isinstance(target, socket.socket):
        target.sendall(data)
    elif isinstance(target, int):
        os.write(target, data)
    else:
        target.write(data)  # type: ignore[attr-defined]
    reply(sock, "written")


def reap_any(sock: socket.socket) -> None:
    """In a template that was run: reap one of the children it handed over."""
    pid, status = os.waitpid(-1, 0)
    reply(sock, (pid, os.waitstatus_to_exitcode(status)))


def print_and_return(sock: socket.socket, text: str) -> None:
    # No newline and no flush: only the exit path's flush gets it out.
    print(text, end="")


class Greeter:
    @staticmethod
    def hello(sock: socket.socket, *args: object) -> None:
        reply(sock, ("Greeter.hello", len(args)))


# --- in the caller ----------------------------------------------------------------------

TIMEOUT = 5.0


def read_all(sock: socket.socket, timeout: float = TIMEOUT) -> bytes:
    """Everything until EOF, within a deadline."""
    deadline = time.monotonic() + timeout
    chunks = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no EOF before the deadline")
        sock.settimeout(left)
        data = sock.recv(1 << 20)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def result(sock: socket.socket, timeout: float = TIMEOUT) -> object:
    """What a helper ``reply``-ed, once it closed its end."""
    data = read_all(sock, timeout)
    if not data:
        raise EOFError("the process replied nothing (it failed: see its stderr)")
    return ast.literal_eval(data.decode())


def outcome(proc: object, func: object, timeout: float = TIMEOUT) -> object:
    """Run ``func`` and return what it replied."""
    with proc.run(func) as sock:  # type: ignore[attr-defined]
        return result(sock, timeout)


def finish(proc: object, func: object, timeout: float = TIMEOUT) -> int:
    """Run ``func``, close our end, and return the exit status."""
    proc.run(func).close()  # type: ignore[attr-defined]
    return proc.wait(timeout)  # type: ignore[attr-defined, no-any-return]


def zombie_children() -> list[int]:
    """Our children that exited but were not reaped."""
    pids: set[int] = set()
    try:
        for task in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{task}/children") as f:
                    pids.update(int(p) for p in f.read().split())
            except OSError:
                pass
    except OSError:
        return []
    zombies = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ...": comm may hold spaces and parentheses.
        if stat[stat.rindex(")") + 2 :].startswith("Z"):
            zombies.append(pid)
    return zombies


def wait_exited(pid: int, timeout: float = TIMEOUT) -> bool:
    """Whether ``pid`` (any process, not only a child) exits within ``timeout``."""
    import select

    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        return bool(ready)
    finally:
        os.close(fd)
