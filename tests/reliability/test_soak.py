"""Load (issue 5, item 13): many mixed creations, and nothing left behind.

The default run makes ~300 processes; ``ANYFORK_SLOW=1`` runs the full
10,000 and, if ``ANYFORK_SOAK_OUT`` names a file, writes the figures there
as JSON (rate, p50/p99 creation latency) for docs/benchmarks.md.

Creation latency is measured from the call that makes the process (new,
fork, new_exec) to the first byte of its reply: each process echoes one
argument back over its socket and exits, so that is the time until the
function is running.  (``run`` itself returns sooner: it does not wait for
the process to start.)  The soak checks the reply and exit status of every
process.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import statistics
import time
from typing import TYPE_CHECKING

import pytest

import anyfork
from anyfork import _runtime

if TYPE_CHECKING:
    import socket

# A stdlib function as the worker: socket.socket.sendall(sock, b"ok").
FUNC = "socket:socket.sendall"
MSG = b"ok"
ASYNC_WIDTH = 64
# One round: 64-way concurrent run_async, then sync new, template forks, new_exec.
ROUND = {"async": ASYNC_WIDTH, "new": 15, "fork_exec_tpl": 10, "fork_new_tpl": 8, "new_exec": 3}
PER_ROUND = sum(ROUND.values())


def _rest(h, sock: socket.socket) -> bytes:
    with sock:
        return h.recv_all(sock, 10)


def _first_byte(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    return sock.recv(1)


class Soak:
    def __init__(self, h) -> None:
        self.h = h
        self.latencies: dict[str, list[float]] = {mode: [] for mode in ROUND}
        self.count = 0
        self.exec_tpl = anyfork.new_exec().require("socket")
        self.new_tpl = anyfork.new().require("socket")

    def one_sync(self, mode: str, factory) -> anyfork.Process:
        t0 = time.perf_counter()
        p = factory().send_arg(MSG)
        s = p.run(FUNC)
        first = _first_byte(s)
        self.latencies[mode].append(time.perf_counter() - t0)
        assert first + _rest(self.h, s) == MSG
        return p

    async def one_async(self) -> anyfork.Process:
        t0 = time.perf_counter()
        p = anyfork.new().send_arg(MSG)
        s = await asyncio.wait_for(p.run_async(FUNC), 10)
        loop = asyncio.get_running_loop()
        with s:
            data = await asyncio.wait_for(loop.sock_recv(s, 1), 10)
            self.latencies["async"].append(time.perf_counter() - t0)
            while chunk := await asyncio.wait_for(loop.sock_recv(s, 16), 10):
                data += chunk
        assert data == MSG
        return p

    def round(self) -> None:
        async def burst() -> list[anyfork.Process]:
            return await asyncio.gather(*(self.one_async() for _ in range(ROUND["async"])))

        procs = list(asyncio.run(burst()))
        procs += [self.one_sync("new", anyfork.new) for _ in range(ROUND["new"])]
        procs += [self.one_sync("fork_exec_tpl", self.exec_tpl.fork) for _ in range(ROUND["fork_exec_tpl"])]
        procs += [self.one_sync("fork_new_tpl", self.new_tpl.fork) for _ in range(ROUND["fork_new_tpl"])]
        procs += [self.one_sync("new_exec", anyfork.new_exec) for _ in range(ROUND["new_exec"])]
        for p in procs:
            assert p.wait(10) == 0
        self.count += len(procs)

    def close(self) -> None:
        self.exec_tpl.close()
        self.new_tpl.close()


def _caller_fds() -> dict[int, str]:
    """The caller's descriptors and what each is, but the default
    template's: the processes it keeps forked ahead are replaced as new()
    hands them out, so their sockets come and go by design."""
    found = {fd: _readlink(fd) for fd in map(int, os.listdir("/proc/self/fd"))}
    default = _runtime.runtime.default
    for fd in (set() if default is None else default._descriptors()):
        found.pop(fd, None)
    return found


def _new_fds(before: dict[int, str]) -> dict[int, str]:
    """Descriptors open now that were not before (a number reused for
    another socket counts): what the soak left open.  Ones that closed are
    not counted: on free-threaded CPython, objects an earlier test dropped
    may be freed only now (their last reference went in another thread)."""
    gc.collect()
    return {fd: link for fd, link in _caller_fds().items()
            if before.get(fd) != link and link != "?"}


def _snapshot(h, templates: list[int]) -> dict[str, object]:
    gc.collect()
    return {
        "caller_fds": _caller_fds(),
        "tpl_fds": {t: h.fd_count(t) for t in templates},
        "tpl_rss": {t: h.rss_kib(t) for t in templates},
        "caller_zombies": set(h.zombies(os.getpid())),
    }


def soak(h, total: int) -> dict[str, float]:
    s = Soak(h)
    try:
        s.round()  # warm up: templates, spares, imports, caches
        templates = [_runtime.runtime.default.pid, s.exec_tpl.pid, s.new_tpl.pid]
        before = _snapshot(h, templates)
        for lat in s.latencies.values():
            lat.clear()
        s.count = 0
        t0 = time.perf_counter()
        while s.count < total:
            s.round()
        elapsed = time.perf_counter() - t0
        assert _runtime.runtime.default.pid == templates[0], "the default template was replaced mid-soak"

        def settled() -> bool:
            return (not _new_fds(before["caller_fds"])
                    and all(h.fd_count(t) == n for t, n in before["tpl_fds"].items())
                    and set(h.zombies(os.getpid())) <= before["caller_zombies"]
                    and not any(h.zombies(t) for t in templates))

        try:
            h.until(settled, 5, "descriptors back at baseline and no zombies")
        except pytest.fail.Exception:
            after = _snapshot(h, templates)
            links = _new_fds(before["caller_fds"])
            raise AssertionError(
                f"after {s.count} processes: caller fds {len(before['caller_fds'])} -> "
                f"{len(after['caller_fds'])} (new: {links}); template fds {before['tpl_fds']} -> "
                f"{after['tpl_fds']}; caller zombies {after['caller_zombies']}; template zombies "
                f"{ {t: h.zombies(t) for t in templates} }") from None
        after = _snapshot(h, templates)
        for t in templates:
            growth = after["tpl_rss"][t] - before["tpl_rss"][t]
            assert growth < 5 * 1024, f"template {t} RSS grew by {growth} KiB"
        figures = {
            "processes": s.count,
            "seconds": round(elapsed, 3),
            "rate_per_s": round(s.count / elapsed, 1),
            **_percentiles([x for lat in s.latencies.values() for x in lat]),
            "by_mode": {mode: _percentiles(lat) for mode, lat in s.latencies.items()},
            "mix_per_round": ROUND,
            "template_rss_growth_kib": {str(t): after["tpl_rss"][t] - before["tpl_rss"][t]
                                        for t in templates},
        }
        print(f"\nsoak: {json.dumps(figures)}")
        return figures
    finally:
        s.close()


def _percentiles(latencies: list[float]) -> dict[str, float]:
    lat = sorted(latencies)
    return {
        "n": len(lat),
        "p50_ms": round(statistics.median(lat) * 1e3, 3),
        "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3, 3),
    }


def _readlink(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


def test_concurrent_run_async_on_one_template(h):
    """Two tasks awaiting run_async on the same template's report channel
    both finish: neither one's wake-up is lost to the other's."""

    async def one() -> anyfork.Process:
        p = anyfork.new().send_arg(MSG)
        s = await p.run_async(FUNC)
        with s:
            while await asyncio.get_running_loop().sock_recv(s, 16):
                pass
        return p

    async def main() -> list[anyfork.Process]:
        return await asyncio.wait_for(asyncio.gather(*(one() for _ in range(8))), 10)

    for _ in range(5):
        for p in asyncio.run(main()):
            assert p.wait(5) == 0


@pytest.mark.heavy
def test_soak_small(h):
    soak(h, 3 * PER_ROUND)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_soak_full(h):
    figures = soak(h, 10_000)
    out = os.environ.get("ANYFORK_SOAK_OUT")
    if out:
        with open(out, "w") as f:
            json.dump(figures, f, indent=2)
            f.write("\n")
