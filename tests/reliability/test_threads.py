"""Thread safety under real parallelism (issue 10).

Sixteen threads at once each make processes every way: ``new()`` from the
default template, ``fork()`` of one template they all share, and
``new_exec()``.  Each process gets ``send_arg`` and ``send_fh`` payloads
unique to its thread and round, and sends them all back: what returns is
checked byte for byte.  Afterwards the caller's descriptors
(``/proc/self/fd``) and those of both templates are back at their
baseline, and nobody has zombies.

On a free-threaded CPython (3.13t) those threads really run at the same
time, which is where a missing lock shows; with the GIL they still
interleave at every blocking call.  The test is cheap, so it runs on every
interpreter.  ``.ci/run`` sets ANYFORK_TEST_FREE_THREADED=1 for its 3.13t
run, and then the test first checks that the GIL really is off, so that a
run with the GIL can never pass for the free-threaded one.
"""

from __future__ import annotations

import os
import socket
import sys
import sysconfig
import threading
import time
import traceback
from typing import TYPE_CHECKING

import pytest

import anyfork
from anyfork import _runtime

if TYPE_CHECKING:
    from collections.abc import Callable

pytestmark = pytest.mark.usefixtures("check_leaks")

THREADS = 16
WAYS = ("new", "fork", "new_exec")
# What each thread does, round by round.  In a round "together", all sixteen
# start each way at the same moment (a barrier): the most contention on one
# template, its socket and its reports.  In the last, each thread goes round
# the ways from a different one: every way at once, beside the others.  The
# middle rounds leave out new_exec, which costs a whole interpreter and
# shares the least.
ROUNDS = (("together", WAYS), ("together", ("new", "fork")), ("together", ("fork", "new")),
          ("apart", WAYS))
PROCESSES = THREADS * sum(len(ways) for _, ways in ROUNDS)
# Sizes of the send_arg octets; send_fh payloads stay under a pipe's 64 KiB,
# so the test can fill the pipe before the process reads it.
ARG_SIZES = (0, 1, 4096, 100_003)
FH_SIZES = (0, 7, 65_000)  # after a tag of at most 20 octets
DEADLINE = 40.0  # for all the threads together; the test's own timeout is 60 s
WAIT = 10.0  # for any one read or exit


def free_threaded_expected() -> bool:
    return os.environ.get("ANYFORK_TEST_FREE_THREADED") == "1"


def payloads(thread: int, rnd: int, way: str) -> tuple[bytes, bytes, str]:
    """(send_fh octets, send_arg octets, send_arg text): different for every process."""
    n = thread * len(ROUNDS) * len(WAYS) + rnd * len(WAYS) + WAYS.index(way)
    tag = f"{thread}/{rnd}/{way}".encode()
    fh = tag + os.urandom(FH_SIZES[n % len(FH_SIZES)])
    arg = os.urandom(ARG_SIZES[n % len(ARG_SIZES)])
    text = f"{tag.decode()} \u00e9\u20ac\U0001f600 \udc80" * (1 + n % 5)  # a lone surrogate too
    return fh, arg, text


def unframe(data: bytes) -> list[bytes | str]:
    """The inverse of helpers.mirror's framing."""
    out: list[bytes | str] = []
    while data:
        kind, data = data[:1], data[1:]
        length, _, data = data.partition(b":")
        raw, data = data[: int(length)], data[int(length):]
        assert len(raw) == int(length), "a frame cut short"
        out.append(raw.decode("utf-8", "surrogatepass") if kind == b"s" else raw)
    return out


def recv_all(sock: socket.socket) -> bytes:
    sock.settimeout(WAIT)
    chunks = []
    while data := sock.recv(1 << 16):
        chunks.append(data)
    return b"".join(chunks)


def one_process(make: Callable[[], anyfork.Process], fh_data: bytes, arg: bytes, text: str) -> None:
    """Make a process, hand it the payloads, and check that each comes back whole."""
    r, w = os.pipe()
    back, theirs = socket.socketpair()
    try:
        os.write(w, fh_data)  # fits in the pipe: never blocks
        os.close(w)
        w = -1
        p = make().send_fh(r, theirs).send_arg(arg, text)
        os.close(r)  # anyfork holds its own duplicates
        r = -1
        theirs.close()
        with p.run("helpers:mirror") as sock:
            got_fh = recv_all(back)
            got_args = unframe(recv_all(sock))
        assert p.wait(WAIT) == 0
        assert got_fh == fh_data, f"send_fh payload changed: {len(fh_data)} -> {len(got_fh)} octets"
        assert len(got_args) == 2, f"{len(got_args)} arguments came back, not 2"
        assert got_args[0] == arg, f"send_arg octets changed: {len(arg)} -> {len(got_args[0])}"
        assert got_args[1] == text, "send_arg text changed"
    finally:
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)
        back.close()
        theirs.close()


@pytest.mark.heavy
def test_sixteen_threads_making_processes_every_way_at_once(h) -> None:
    if free_threaded_expected():
        assert sysconfig.get_config_var("Py_GIL_DISABLED") == 1, "not a free-threaded build"
        assert sys._is_gil_enabled() is False, "the GIL is on in this free-threaded build"  # type: ignore[attr-defined]

    shared = anyfork.new_exec().require("helpers")
    try:
        # Warm up: the default template and its processes forked ahead, the
        # shared template past its first forks; then take the baseline.
        for make in (anyfork.new, shared.fork, shared.fork, anyfork.new_exec):
            one_process(make, b"warm", b"up", "warm up")
        templates = [_runtime.runtime.default.pid, shared.pid]  # type: ignore[union-attr]
        h.until(lambda: not any(h.zombies(t) for t in templates), 5, "warm-up processes reaped")
        before = {t: h.fd_count(t) for t in templates}

        makers: dict[str, Callable[[], anyfork.Process]] = {
            "new": anyfork.new, "fork": shared.fork, "new_exec": anyfork.new_exec}
        step = threading.Barrier(THREADS)
        doing: dict[int, str] = {}
        errors: dict[int, str] = {}
        done: list[int] = []

        def worker(i: int) -> None:
            try:
                for rnd, (how, ways) in enumerate(ROUNDS):
                    for k in range(len(ways)):
                        if how == "together":
                            way = ways[k]
                            doing[i] = f"round {rnd}, waiting to start {way}"
                            step.wait(WAIT)
                        else:
                            way = ways[(i + k) % len(ways)]
                        doing[i] = f"round {rnd}, {way}"
                        one_process(makers[way], *payloads(i, rnd, way))
                        done.append(i)
                doing[i] = "finished"
            except BaseException:
                errors[i] = f"thread {i}, {doing.get(i)}:\n{traceback.format_exc()}"

        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(THREADS)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + DEADLINE
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        stuck = {i: doing.get(i) for i, t in enumerate(threads) if t.is_alive()}
        assert not stuck, f"threads still running after {DEADLINE} s: {stuck}"
        assert not errors, "\n".join(errors.values())
        assert len(done) == PROCESSES
        assert _runtime.runtime.default.pid == templates[0], "the default template was replaced"  # type: ignore[union-attr]

        h.until(lambda: {t: h.fd_count(t) for t in templates} == before
                and not any(h.zombies(t) for t in templates), 5,
                lambda: f"template descriptors {before} -> {({t: h.fd_count(t) for t in templates})}, "
                        f"zombies {({t: h.zombies(t) for t in templates})}")
    finally:
        shared.close()
    assert shared.wait(WAIT) == 0
    # check_leaks then compares the caller's /proc/self/fd with its baseline
    # and looks for zombie children.


# Issue 15 (minor): with fork_template(allow_threads=True) while other threads
# were inside anyfork calls, some templates inherited a socket another thread
# had just made, received or was closing, before it was on _fds's list.


@pytest.mark.heavy
def test_fork_template_with_threads_inside_anyfork_inherits_none_of_its_sockets() -> None:
    from helpers import run_program

    facts = run_program("caller_fork_template_threads_fds.py", "60", timeout=120).facts
    assert facts["errors"] == [], facts
    assert facts["extra"] == [], f"{len(facts['extra'])} of 60 templates inherited anyfork's: {facts}"
