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

# Not "from typing import ...": every process that runs a helper imports this
# module, and typing would be one more module in each (tests check that).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any

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


def wait_failed(proc: Any, timeout: float = TIMEOUT) -> Any:
    """``proc.wait()`` of a process that failed before its function ran: it
    raises ProcessFailedError (returned), and the exit status is 1."""
    import pytest

    import anyfork

    with pytest.raises(anyfork.ProcessFailedError) as info:
        proc.wait(timeout)
    assert info.value.returncode == proc.returncode == 1
    return info.value


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


def pump(tpl: object, seconds: float) -> None:
    """Read a template's reports for up to ``seconds`` (fills its pool of
    processes forked ahead, dispatches exits), as any call into anyfork would."""
    from anyfork._backend import deadline_after, run_blocking

    channel = tpl._tpl.reports  # type: ignore[attr-defined]
    run_blocking(channel.until_op(lambda: False, deadline_after(seconds)))


# --- running a program of its own --------------------------------------------------------

SCENARIOS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scenarios")


class Ran:
    """What a program run by ``run_program`` printed: ``facts`` (its one
    JSON line; ``ran[key]`` reads one), ``stdout`` (lines) and ``stderr``.
    Unpacks as ``facts, stderr``."""

    def __init__(self, facts: dict[str, Any], stdout: str, stderr: str) -> None:
        self.facts = facts
        self.stdout = stdout.splitlines()
        self.stderr = stderr

    def __getitem__(self, key: str) -> Any:
        return self.facts[key]

    def __iter__(self) -> Iterator[Any]:
        return iter((self.facts, self.stderr))


def run_program(program: str, *args: str, python_args: tuple[str, ...] = (), timeout: float = 30.0,
                cwd: str | None = None, quiet: bool = False) -> Ran:
    """Run ``program`` (a path, or the name of a file in tests/scenarios) as a
    caller of its own, and read the one JSON line of facts it printed.

    ``args`` go to the program (``sys.argv[1:]``); ``python_args`` to the
    interpreter (``-m mod`` runs a module instead).  anyfork's source and
    this directory are on its path.  Output goes to files, not pipes: a
    process left behind must not keep the test waiting for EOF.  A program
    that hangs is killed at ``timeout``; with ``check``, one that exits
    with a status other than 0 fails the test.
    """
    import json
    import subprocess
    import tempfile

    import pytest

    path = program if os.path.isabs(program) else os.path.join(SCENARIOS, program)
    src = os.path.dirname(os.path.dirname(os.path.abspath(__import__("anyfork").__file__)))
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, tests, os.environ.get("PYTHONPATH", "")]))
    argv = [sys.executable, *python_args]
    if "-m" not in python_args:
        argv.append(path)
    argv.extend(args)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env, cwd=cwd)
        try:
            rc: int | None = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = None
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    if rc is None:
        pytest.fail(f"{program} hung for {timeout} s\nstdout: {stdout}\nstderr: {stderr}")
    assert rc == 0, f"{program} exited with {rc}\nstdout: {stdout}\nstderr: {stderr}"
    if quiet:
        assert stderr == "", stderr
    facts = [line for line in stdout.splitlines() if line.startswith("{")]
    assert len(facts) == 1, f"stdout: {stdout}\nstderr: {stderr}"
    return Ran(json.loads(facts[0]), stdout, stderr)


def run_source(tmp_path: Any, source: str, *python_args: str, name: str = "main.py",
               quiet: bool = False, timeout: float = 20.0) -> Ran:
    """``run_program`` of ``source``, written to ``tmp_path / name`` and run there."""
    import textwrap

    script = tmp_path / name
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(textwrap.dedent(source))
    return run_program(str(script), python_args=python_args, cwd=str(tmp_path), quiet=quiet,
                       timeout=timeout)


def small_socket_buffers(monkeypatch: Any) -> None:
    """Make the next socketpairs (a template's report channel among them)
    hold a few KiB, so that a template's reports fill its channel at once."""
    real = socket.socketpair

    def small(*args: Any) -> tuple[socket.socket, socket.socket]:
        a, b = real(*args)
        for s in (a, b):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        return a, b

    monkeypatch.setattr(socket, "socketpair", small)


def read_exactly(sock: socket.socket, n: int) -> bytes:
    """``n`` bytes, or fewer at EOF, within 10 s."""
    sock.settimeout(10)
    data = b""
    while len(data) < n and (more := sock.recv(n - len(data))):
        data += more
    return data


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True
