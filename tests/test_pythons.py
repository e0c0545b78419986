"""What only newer CPythons do, checked on them for real (3.12 and later).

Python 3.12 added a ``DeprecationWarning`` to ``os.fork()`` in a process
that has more than one thread.  It counts the threads the kernel knows
(``/proc/self/stat`` on Linux), so threads ``threading`` never saw count too.
README promises that anyfork's own calls never trigger it, because they
never fork the caller, and that ``fork_template(allow_threads=True)``, which
does fork it on purpose, does.

These tests record warnings instead of relying on the suite's
``filterwarnings = error``: ``os.fork()`` warns in the parent after the fork
has happened, and if a filter turns the warning into an exception it
discards that exception and returns the pid anyway, so an error filter never
sees this warning.  The first test is the control: a plain ``os.fork()``
with the same threads running is caught by the same recording.

``fork_template`` forks whatever calls it, so those scenarios run as their
own programs (as in test_template.py), without pytest's threads.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import anyfork
from helpers import TIMEOUT, digest, outcome, wait_exited

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    Make = Callable[[], anyfork.Process]

pytestmark = [
    pytest.mark.skipif(sys.version_info < (3, 12),
                       reason="the fork-with-threads DeprecationWarning exists from Python 3.12 on"),
    pytest.mark.usefixtures("check_leaks"),
]

_SRC = str(Path(anyfork.__file__).resolve().parent.parent)

# The start of the warning's text; the rest names the pid and the call.
MULTI_THREADED = "is multi-threaded, use of "


def fork_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    """The fork-with-threads warnings among those recorded."""
    return [str(w.message) for w in caught
            if issubclass(w.category, DeprecationWarning) and MULTI_THREADED in str(w.message)]


@pytest.fixture
def other_threads() -> Iterator[None]:
    """Eight other threads, each holding a lock of its own, until the test ends."""
    stop = threading.Event()
    holding = threading.Barrier(9)

    def hold() -> None:
        lock = threading.Lock()
        with lock:
            holding.wait(TIMEOUT)
            stop.wait(30)

    threads = [threading.Thread(target=hold, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    holding.wait(TIMEOUT)
    yield
    stop.set()
    for t in threads:
        t.join(TIMEOUT)
    assert not any(t.is_alive() for t in threads)


@pytest.mark.usefixtures("other_threads")
def test_control_a_plain_fork_with_threads_running_is_recorded() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pid = os.fork()
        if pid == 0:
            os._exit(0)
    assert wait_exited(pid)
    os.waitpid(pid, 0)
    (message,) = fork_warnings(caught)
    assert "fork()" in message


@pytest.mark.usefixtures("other_threads")
def test_making_and_running_processes_never_forks_the_caller(make: Make) -> None:
    # make: anyfork.new(), anyfork.new_exec(), or fork() of a template the
    # test makes with new_exec() (inside the recording: that call counts too).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        procs = [make().send_arg(b"payload", "text") for _ in range(3)]
        for p in procs:
            assert outcome(p, "helpers:items") == [("socket", True, False), digest(b"payload"),
                                                   digest("text")]
            assert p.wait(TIMEOUT) == 0
    assert fork_warnings(caught) == []


@pytest.mark.usefixtures("other_threads")
def test_run_async_never_forks_the_caller(make: Make) -> None:
    async def main() -> object:
        p = make().send_arg(b"payload")
        sock = await p.run_async("helpers:items")
        loop = asyncio.get_running_loop()
        with sock:
            data = b""
            while chunk := await asyncio.wait_for(loop.sock_recv(sock, 4096), TIMEOUT):
                data += chunk
        assert p.wait(TIMEOUT) == 0
        return data

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = asyncio.run(asyncio.wait_for(main(), 2 * TIMEOUT))
    assert got == repr([("socket", True, False), digest(b"payload")]).encode()
    assert fork_warnings(caught) == []


# --- fork_template: forks the program itself --------------------------------------------------

PROGRAM = '''
import asyncio, json, os, threading, warnings
import anyfork

WORK = """
import os
def work(sock):
    sock.sendall(b"%d" % os.getppid())
"""

def ask(proc):
    with proc.eval(WORK).run("work") as sock:
        sock.settimeout(5)
        answer = sock.recv(64)
    return [int(answer), proc.wait(5)]

async def run_async():
    proc = anyfork.new().eval(WORK)
    with await proc.run_async("work") as sock:
        await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 64), 5)
    assert proc.wait(5) == 0

stop = threading.Event()
threads = [threading.Thread(target=stop.wait, daemon=True) for _ in range(THREADS)]
for t in threads:
    t.start()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    if BEFORE:
        # Every other call first: none may leave a thread behind.
        ask(anyfork.new())
        ask(anyfork.new_exec())
        ask(anyfork.new_exec().fork())
        asyncio.run(run_async())
    threads_at_fork = threading.active_count()
    template = anyfork.fork_template(allow_threads=ALLOW)
    ppid, status = ask(template.fork())
template.close()
stop.set()
for t in threads:
    t.join(5)
print(json.dumps({
    "threads_at_fork": threads_at_fork,
    "warnings": [[w.category.__name__, str(w.message)] for w in caught],
    "forked_by_template": ppid == template.pid,
    "status": status,
    "template_status": template.wait(5),
}))
'''


def run_program(tmp_path: Path, *, threads: int, allow: bool, before: bool) -> dict[str, object]:
    script = tmp_path / "main.py"
    script.write_text(textwrap.dedent(PROGRAM).replace("THREADS", str(threads))
                      .replace("ALLOW", str(allow)).replace("BEFORE", str(before)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([_SRC, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=30, env=env, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    facts: dict[str, object] = json.loads(proc.stdout)
    assert facts["forked_by_template"] is True
    assert facts["status"] == 0
    assert facts["template_status"] == 0
    return facts


def test_fork_template_without_threads_does_not_warn_even_after_every_other_call(tmp_path: Path) -> None:
    facts = run_program(tmp_path, threads=0, allow=False, before=True)
    assert facts["threads_at_fork"] == 1
    assert facts["warnings"] == []


def test_fork_template_allow_threads_with_threads_running_warns(tmp_path: Path) -> None:
    facts = run_program(tmp_path, threads=3, allow=True, before=False)
    assert facts["threads_at_fork"] == 4
    ((category, message),) = facts["warnings"]  # type: ignore[misc]
    assert category == "DeprecationWarning"
    assert MULTI_THREADED + "fork()" in message
