"""``python -m anyfork bench``: the seed's PERFORMANCE section, side by side.

Theory of operation
-------------------
The parent (:func:`run`) plans *jobs* and runs each in a fresh interpreter
(``python -c "from anyfork._bench import child; child()" PARAMS``), so that one
job's ballast, imports, forkserver or default template never colours
another's.  A job prints its samples as one JSON line on stdout; progress goes
to stderr.  The parent then takes medians, computes ratios, prints the report
and, if asked, writes JSON and a plot.

Every creation row is the seed's loop: create a process, let it exit at once,
wait until the caller reads EOF on its socket (``recv`` returns ``b""``), and
reap it where the caller is its parent.  A round repeats that for at least
``seconds`` and ``min_count`` times; its figure is count / elapsed.  Rows
measured in one job alternate round by round, so a slow drift of the machine
hits them alike.  Nothing here is a pass/fail test: the figures are noisy and
only ratios from one run mean much.

Memory workers import this module (so that every flavour of worker has the
same code loaded), which is why its top-level imports are kept small.
"""

from __future__ import annotations

import gc
import os
import socket
import sys
import time
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

#: What the memory rows preload (issue 3's list).
MODULES = (
    "asyncio", "json", "email.parser", "decimal", "http.server", "xml.dom.minidom", "argparse", "typing",
)
#: What the template of the ``tpl.fork()`` row requires.
TEMPLATE_MODULES = ("json", "decimal", "email.parser")

_MARK = "ANYFORK-BENCH-RESULT "
_MIB = 1 << 20

# A small function for the time-to-first-result row, defined in the process by
# eval so that the process imports nothing for it (the pool's side submits
# os.getpid, which needs no import either).
_REPLY_CODE = "import os\ndef _bench_reply(sock):\n    sock.sendall(b'%d\\n' % os.getpid())\n"


class Config(NamedTuple):
    """What one run measures, and how long it spends on each figure."""

    quick: bool
    rounds: int  # samples per row (rounds of the timed loop, fresh processes for TTFR)
    sizes: tuple[int, ...]  # caller sizes in MB; 0 means "as started"
    seconds: float  # minimum length of one timed round
    min_count: int  # minimum creations in one timed round
    concurrency: int  # N for the "many at once" rows
    mem_workers: int  # idle workers alive at once, per memory round
    mem_rounds: int
    ttfr_warm: int  # warm time-to-first-result samples per fresh process


FULL_SIZES = (0, 20, 200, 2000)
QUICK_SIZES = (0, 200)


def make_config(quick: bool, rounds: int | None = None, sizes: Sequence[int] | None = None) -> Config:
    """The defaults for a full or ``--quick`` run, with overrides."""
    if quick:
        cfg = Config(quick=True, rounds=3, sizes=QUICK_SIZES, seconds=0.15, min_count=3,
                     concurrency=16, mem_workers=2, mem_rounds=1, ttfr_warm=2)
    else:
        cfg = Config(quick=False, rounds=5, sizes=FULL_SIZES, seconds=1.0, min_count=5,
                     concurrency=64, mem_workers=4, mem_rounds=3, ttfr_warm=5)
    if rounds is not None:
        cfg = cfg._replace(rounds=rounds, mem_rounds=max(1, min(rounds, cfg.mem_rounds)))
    if sizes is not None:
        cfg = cfg._replace(sizes=tuple(sorted(set(sizes))))
    return cfg


# === the measured operations (run in the job processes) ==================================


def _expect_eof(sock: socket.socket) -> None:
    try:
        data = sock.recv(1)
    finally:
        sock.close()
    if data:
        raise RuntimeError(f"expected EOF, got {data!r}")


def _manual_fork() -> None:
    """The seed's baseline: socketpair, fork, child exits, parent sees EOF, reaps."""
    mine, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    theirs.close()
    _expect_eof(mine)
    os.waitpid(pid, 0)


def _anyfork_new() -> None:
    import anyfork

    # builtins:id exists in every process without an import; it is called as
    # id(sock) and returns at once, so the process exits.
    _expect_eof(anyfork.new().run("builtins:id"))


def _anyfork_new_dotted() -> None:
    import anyfork

    # The same call with a function named the seed's way, a dotted path: the
    # process must find the module "socket" in it without trying to import
    # "socket.socket.close" or "socket.socket" first.  socket.close returns
    # at once, so the process exits.
    _expect_eof(anyfork.new().run("socket.socket.close"))


def _anyfork_exec() -> None:
    import anyfork

    proc = anyfork.new_exec()
    _expect_eof(proc.run("builtins:id"))
    proc.wait()  # the caller is the parent: reap


def _mp_start(ctx: Any) -> None:
    # os.getpid is the no-op target: like builtins:id it needs no import in
    # the child, even under spawn.
    proc = ctx.Process(target=os.getpid)
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"multiprocessing child exited with {proc.exitcode}")


# The floor row: the least a Python template can be.  It receives a socket,
# forks, and the child exits; SIGCHLD is ignored, so the kernel reaps.  No
# reports, no statuses, no function: what anyfork.new() adds is the difference.
_FLOOR_CODE = """\
import os, signal, socket
signal.signal(signal.SIGCHLD, signal.SIG_IGN)
ctl = socket.socket(fileno=3)
while True:
    msg, fds, _, _ = socket.recv_fds(ctl, 1, 1)
    if not msg:
        os._exit(0)
    if os.fork() == 0:
        os._exit(0)
    for fd in fds:
        os.close(fd)
"""


class _Floor:
    """A minimal template (``python -S``, started like anyfork's), for the floor row."""

    def __init__(self) -> None:
        self.ctl, theirs = socket.socketpair()
        try:
            self.pid = os.posix_spawn(sys.executable, [sys.executable, "-S", "-c", _FLOOR_CODE],
                                      dict(os.environ),
                                      file_actions=[(os.POSIX_SPAWN_DUP2, theirs.fileno(), 3)])
        finally:
            theirs.close()

    def __call__(self) -> None:
        mine, theirs = socket.socketpair()
        try:
            socket.send_fds(self.ctl, [b"x"], [theirs.fileno()])
        finally:
            theirs.close()
        _expect_eof(mine)

    def close(self) -> None:
        self.ctl.close()
        os.waitpid(self.pid, 0)


def _rate(fn: Callable[[], None], seconds: float, min_count: int) -> float:
    n = 0
    t0 = time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds and n >= min_count:
            return n / elapsed


class _Job:
    """The job process's side: parameters in, samples out, progress to stderr."""

    def __init__(self, params: dict[str, Any]) -> None:
        self.params = params
        self.cfg = Config(**params["config"])
        self.title: str = params["title"]
        self.tty = sys.stderr.isatty()
        self.rows: dict[str, list[float]] = {}
        self.extra: dict[str, Any] = {"rss_mb": _rss_mb()}
        self.errors: list[str] = []

    def progress(self, what: str) -> None:
        if self.tty:
            sys.stderr.write(f"\r\x1b[K{self.title}: {what}")
            sys.stderr.flush()

    def add(self, row: str, value: float) -> None:
        self.rows.setdefault(row, []).append(value)

    def rates(self, fns: dict[str, Callable[[], None]], rounds: int | None = None) -> None:
        """Alternate the rows round by round; two untimed warm-up calls each first."""
        cfg = self.cfg
        rounds = cfg.rounds if rounds is None else rounds
        for fn in fns.values():
            fn()
            fn()
        for r in range(rounds):
            for row, fn in fns.items():
                self.progress(f"{row}, round {r + 1}/{rounds}")
                self.add(row, _rate(fn, cfg.seconds, cfg.min_count))

    def result(self) -> dict[str, Any]:
        return {"rows": self.rows, "errors": self.errors, **self.extra}


def _job_size(job: _Job) -> None:
    """Manual fork and anyfork.new() from a caller of a given size."""
    size = int(job.params["size_mb"])
    ballast = _ballast(size)
    job.extra["rss_mb"] = _rss_mb()
    fns = {f"fork@{size}": _manual_fork, f"new@{size}": _anyfork_new}
    floor = _Floor() if job.params.get("floor") else None
    if floor is not None:
        fns["new_dotted"] = _anyfork_new_dotted
        fns["floor"] = floor
    try:
        job.rates(fns)
    finally:
        if floor is not None:
            floor.close()
    del ballast


def _job_anyfork(job: _Job) -> None:
    import anyfork

    # The seed's pool template: it keeps two processes forked ahead (which a
    # user template used to start by itself after two unchanged forks).
    tpl = anyfork.new_exec().require(*TEMPLATE_MODULES).fork_ahead(2)

    def tplfork() -> None:
        _expect_eof(tpl.fork().run("builtins:id"))

    job.rates({"tplfork": tplfork, "new_exec": _anyfork_exec})
    tpl.close()


def _job_mp(job: _Job) -> None:
    import functools
    import multiprocessing

    fns: dict[str, Callable[[], None]] = {
        f"mp_{method}": functools.partial(_mp_start, multiprocessing.get_context(method))
        for method in ("fork", "forkserver", "spawn")
    }
    job.rates(fns)


def _job_ttfr(job: _Job) -> None:
    """Time to first result from a fresh caller ("cold"), then again ("warm")."""
    import concurrent.futures
    import multiprocessing

    import anyfork

    kind = job.params["kind"]

    def pool() -> float:
        ctx = multiprocessing.get_context("forkserver")
        t0 = time.perf_counter()
        ex = concurrent.futures.ProcessPoolExecutor(mp_context=ctx)
        ex.submit(os.getpid).result()
        elapsed = time.perf_counter() - t0
        ex.shutdown()
        return elapsed * 1000

    def ours() -> float:
        t0 = time.perf_counter()
        sock = anyfork.new().eval(_REPLY_CODE).run("_bench_reply")
        buf = b""
        while not buf.endswith(b"\n"):
            data = sock.recv(64)
            if not data:
                raise RuntimeError("anyfork process sent no result")
            buf += data
        elapsed = time.perf_counter() - t0
        int(buf)
        sock.close()
        return elapsed * 1000

    fn = pool if kind == "pool" else ours
    job.progress(f"{kind}, cold")
    job.add(f"ttfr_{kind}_cold", fn())
    warm: list[float] = []
    for i in range(job.cfg.ttfr_warm):
        job.progress(f"{kind}, warm {i + 1}/{job.cfg.ttfr_warm}")
        warm.append(fn())
    # One sample per fresh process, like the cold one: the median of its warm calls.
    job.add(f"ttfr_{kind}_warm", _median(warm))


def _job_concurrent(job: _Job) -> None:
    """N processes at once: run_async under asyncio, and multiprocessing forkserver."""
    import asyncio
    import multiprocessing

    import anyfork

    n = job.cfg.concurrency

    async def one() -> None:
        loop = asyncio.get_running_loop()
        sock = await anyfork.new().run_async("builtins:id")
        try:
            data = await loop.sock_recv(sock, 1)
        finally:
            sock.close()
        if data:
            raise RuntimeError(f"expected EOF, got {data!r}")

    async def many(count: int) -> None:
        await asyncio.gather(*(one() for _ in range(count)))

    ctx = multiprocessing.get_context("forkserver")

    def mp_many(count: int) -> None:
        procs = [ctx.Process(target=os.getpid) for _ in range(count)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
            if p.exitcode != 0:
                raise RuntimeError(f"multiprocessing child exited with {p.exitcode}")

    # A hang here would be anyfork's bug; report it as a failed row rather
    # than stall the whole run.
    limit = 10.0 if job.cfg.quick else 60.0

    def ours(count: int) -> None:
        async def bounded() -> None:
            await asyncio.wait_for(many(count), limit)

        try:
            asyncio.run(bounded())
        except TimeoutError:
            raise RuntimeError(f"{count} concurrent run_async() calls did not finish in {limit} s") from None

    runners: dict[str, Callable[[int], None]] = {"conc_anyfork": ours, "conc_mp_forkserver": mp_many}
    for row, fn in list(runners.items()):
        try:
            fn(2)  # warm up: start the template / the forkserver
        except RuntimeError as e:
            job.errors.append(f"{row}: {e}")
            del runners[row]
    for r in range(job.cfg.rounds):
        for row, fn in list(runners.items()):
            job.progress(f"{row}, round {r + 1}/{job.cfg.rounds}")
            t0 = time.perf_counter()
            try:
                fn(n)
            except RuntimeError as e:
                job.errors.append(f"{row}: {e}")
                del runners[row]
                job.rows.pop(row, None)
                continue
            job.add(row, n / (time.perf_counter() - t0))


# --- memory ---------------------------------------------------------------------------


def _settle() -> None:
    """In a memory worker: have the modules loaded, collect once."""
    for name in MODULES:
        __import__(name)
    gc.collect()


def idle_anyfork(sock: socket.socket) -> None:
    """An idle anyfork worker: report ready, wait for the caller to let go."""
    _settle()
    sock.sendall(b"r")
    sock.recv(1)


def idle_mp(conn: Any) -> None:
    """An idle multiprocessing worker: report ready, wait for the caller to let go."""
    _settle()
    conn.send_bytes(b"r")
    conn.recv_bytes()


def _smaps(pid: int) -> tuple[float, float]:
    """(USS, PSS) of a process in MiB, from /proc/PID/smaps_rollup."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB":
                fields[key] = int(parts[0])
    uss = fields["Private_Clean"] + fields["Private_Dirty"]
    return uss / 1024, fields["Pss"] / 1024


def _job_memory(job: _Job) -> None:
    method = job.params["method"]
    k = job.cfg.mem_workers
    if method == "anyfork":
        import anyfork

        tpl = anyfork.new_exec().require(*MODULES, __name__)
        for r in range(job.cfg.mem_rounds):
            job.progress(f"round {r + 1}/{job.cfg.mem_rounds}")
            procs = [tpl.fork() for _ in range(k)]
            socks = [p.run(f"{__name__}:idle_anyfork") for p in procs]
            for s in socks:
                if s.recv(1) != b"r":
                    raise RuntimeError("anyfork worker did not report ready")
            for p in procs:
                uss, pss = _smaps(p.pid)
                job.add("mem_uss_anyfork", uss)
                job.add("mem_pss_anyfork", pss)
            for s in socks:
                s.close()
            for p in procs:
                p.wait()
        tpl.close()
        return

    import multiprocessing

    ctx: Any = multiprocessing.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload([*MODULES, __name__])
    elif method == "fork":
        for name in MODULES:  # "preloaded": the caller has them, the workers inherit them
            __import__(name)
    for r in range(job.cfg.mem_rounds):
        job.progress(f"round {r + 1}/{job.cfg.mem_rounds}")
        pipes = [ctx.Pipe() for _ in range(k)]
        workers = [ctx.Process(target=idle_mp, args=(theirs,)) for _, theirs in pipes]
        for w in workers:
            w.start()
        for (mine, theirs), w in zip(pipes, workers, strict=True):
            theirs.close()
            if mine.recv_bytes() != b"r":
                raise RuntimeError("multiprocessing worker did not report ready")
            uss, pss = _smaps(w.pid)
            job.add(f"mem_uss_mp_{method}", uss)
            job.add(f"mem_pss_mp_{method}", pss)
        for (mine, _), w in zip(pipes, workers, strict=True):
            mine.send_bytes(b"x")
            w.join()
            mine.close()


def _job_bare(job: _Job) -> None:
    """Manual fork from an interpreter that never imported anyfork (see _BARE_RUNNER)."""
    job.extra["loaded"] = [name for name in ("anyfork", "threading") if name in sys.modules]
    job.rates({"fork_bare": _manual_fork})


_JOBS: dict[str, Callable[[_Job], None]] = {
    "bare": _job_bare,
    "size": _job_size,
    "anyfork": _job_anyfork,
    "mp": _job_mp,
    "ttfr": _job_ttfr,
    "concurrent": _job_concurrent,
    "memory": _job_memory,
}


def child() -> None:
    """Entry point of a job process: ``sys.argv[1]`` is the job as JSON."""
    import json

    job = _Job(json.loads(sys.argv[1]))
    _JOBS[job.params["job"]](job)
    if job.tty:
        sys.stderr.write("\r\x1b[K")
        sys.stderr.flush()
    sys.stdout.write(_MARK + json.dumps(job.result()) + "\n")
    sys.stdout.flush()


# === helpers ===============================================================================


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _ballast(size_mb: int) -> bytearray | None:
    """Grow this process to about ``size_mb`` MB of RSS, every page touched."""
    need = int(size_mb * _MIB - _rss_mb() * _MIB)
    if size_mb == 0 or need <= 0:
        return None
    ballast = bytearray(need)
    ballast[::4096] = b"\x01" * len(range(0, need, 4096))  # one write per page
    return ballast


def _meminfo() -> dict[str, int]:
    """/proc/meminfo in MB (empty where there is none)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts:
                    out[key] = int(parts[0]) // 1024
    except OSError:
        pass
    return out


def _stale_bytecode() -> list[str]:
    """The serve loop's modules whose bytecode a fresh interpreter can't use.

    Every new_exec() (and every template start) imports them; without
    up-to-date bytecode, which PYTHONDONTWRITEBYTECODE can leave missing in a
    source checkout, each one compiles them from source again.
    """
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    stale = []
    for name in ("_boot", "_serve", "_protocol"):
        src = os.path.join(here, name + ".py")
        try:
            st = os.stat(src)
            with open(importlib.util.cache_from_source(src), "rb") as f:
                header = f.read(16)
        except OSError:
            stale.append(src)
            continue
        flags = int.from_bytes(header[4:8], "little")
        mtime = int.from_bytes(header[8:12], "little")
        size = int.from_bytes(header[12:16], "little")
        if flags == 0 and (mtime != int(st.st_mtime) & 0xFFFFFFFF or size != st.st_size & 0xFFFFFFFF):
            stale.append(src)
    return stale


def _median(xs: Sequence[float]) -> float:
    import statistics

    return float(statistics.median(xs))


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return "?"


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import platform

    import anyfork

    model = "?"
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            model = line.partition(":")[2].strip()
            break
    mem = _meminfo()
    affinity = getattr(os, "sched_getaffinity", None)
    return {
        "cores": os.cpu_count(),
        "usable_cores": len(affinity(0)) if affinity is not None else os.cpu_count(),
        "cpu": model,
        "kernel": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "executable": sys.executable,
        "mem_total_mb": mem.get("MemTotal"),
        "mem_available_mb": mem.get("MemAvailable"),
        "transparent_hugepage": _read("/sys/kernel/mm/transparent_hugepage/enabled"),
        "loadavg": list(os.getloadavg()),
        "anyfork": anyfork.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


# === the parent: plan, run, report ==============================================================


class _Row(NamedTuple):
    id: str
    section: str
    label: str
    unit: str
    higher_is_better: bool
    fork_ref: str | None  # the row it is compared with as "manual fork, same size"
    mp_ref: str | None  # ... and as "multiprocessing forkserver"


_CREATION = "creation"
_TTFR = "ttfr"
_CONC = "concurrent"
_MEMORY = "memory"


def _rows(cfg: Config, sizes: Sequence[int]) -> list[_Row]:
    base = f"fork@{sizes[0]}" if sizes else None
    mpfs = "mp_forkserver"

    def rate(rid: str, label: str, fork_ref: str | None = base) -> _Row:
        return _Row(rid, _CREATION, label, "/s", True, fork_ref, mpfs)

    rows: list[_Row] = []
    for s in sizes:
        rows.append(rate(f"fork@{s}", "manual socketpair + os.fork()", f"fork@{s}"))
        rows.append(rate(f"new@{s}", "anyfork.new().run()", f"fork@{s}"))
        if s == sizes[0]:
            rows.append(rate("new_dotted", 'anyfork.new().run("socket.socket.close"): a dotted name',
                             f"fork@{s}"))
            rows.append(rate("floor", "floor: a 20-line template, no reports (not a library)", f"fork@{s}"))
            rows.append(rate("fork_bare", "manual fork from a bare python -S: no anyfork, no threading",
                             f"fork@{s}"))
    rows += [
        rate("tplfork", f"tpl.fork().run(), tpl required {', '.join(TEMPLATE_MODULES)}"),
        rate("new_exec", "anyfork.new_exec().run()"),
        rate("mp_fork", "multiprocessing fork: start(); join()"),
        rate("mp_forkserver", "multiprocessing forkserver: start(); join()"),
        rate("mp_spawn", "multiprocessing spawn: start(); join()"),
    ]
    for temp, what in (("cold", "fresh caller"), ("warm", "pool/template already up")):
        ref = f"ttfr_pool_{temp}"
        rows += [
            _Row(ref, _TTFR, f"ProcessPoolExecutor(forkserver), {what}", "ms", False, None, ref),
            _Row(f"ttfr_anyfork_{temp}", _TTFR, f"anyfork.new().eval().run(), {what}", "ms", False, None,
                 ref),
        ]
    n = cfg.concurrency
    ref = "conc_mp_forkserver"
    rows += [
        _Row("conc_anyfork", _CONC, f"{n} x run_async under asyncio.gather", "/s", True, None, ref),
        _Row(ref, _CONC, f"{n} x multiprocessing forkserver start(), then join()", "/s", True, None, ref),
    ]
    for kind in ("uss", "pss"):
        ref = f"mem_{kind}_mp_forkserver"
        for rid, what in (("anyfork", "anyfork template.fork()"), ("mp_fork", "multiprocessing fork"),
                          ("mp_forkserver", "multiprocessing forkserver, preloaded"),
                          ("mp_spawn", "multiprocessing spawn")):
            label = f"{kind.upper()}: {what}"
            rows.append(_Row(f"mem_{kind}_{rid}", _MEMORY, label, "MiB", False, None, ref))
    return rows


class _Plan(NamedTuple):
    jobs: list[tuple[str, dict[str, Any]]]  # (title, params)
    sizes: list[int]  # the sizes that will run
    notes: list[str]


def _plan(cfg: Config) -> _Plan:
    notes: list[str] = []
    sizes: list[int] = []
    avail = _meminfo().get("MemAvailable")
    for s in cfg.sizes:
        # The ballast, plus the page tables and headroom a fork of it needs.
        if avail is not None and s + 256 > avail:
            notes.append(f"skipped the {s} MB caller: MemAvailable is only {avail} MB")
        else:
            sizes.append(s)
    jobs: list[tuple[str, dict[str, Any]]] = [("manual fork, bare interpreter", {"job": "bare"})]
    for s in sizes:
        what = "as started" if s == 0 else f"{s} MB"
        jobs.append((f"manual fork and anyfork.new(), caller {what}",
                     {"job": "size", "size_mb": s, "floor": s == sizes[0]}))
    jobs.append(("tpl.fork() and new_exec()", {"job": "anyfork"}))
    jobs.append(("multiprocessing fork, forkserver, spawn", {"job": "mp"}))
    jobs.append((f"{cfg.concurrency} at once", {"job": "concurrent"}))
    for r in range(cfg.rounds):
        for kind in ("pool", "anyfork"):
            jobs.append((f"time to first result, {kind}, fresh caller {r + 1}/{cfg.rounds}",
                         {"job": "ttfr", "kind": kind}))
    for method in ("anyfork", "fork", "forkserver", "spawn"):
        jobs.append((f"idle worker memory, {method}", {"job": "memory", "method": method}))
    return _Plan(jobs, sizes, notes)


# The "bare" job loads this file alone, not the anyfork package, in a python -S:
# no anyfork, so no at-fork handler of its and no threading (which anyfork
# imports, as most programs do) runs in each manually forked child.
_BARE_RUNNER = """\
import importlib.util, sys
spec = importlib.util.spec_from_file_location("_anyfork_bench_alone", sys.argv.pop(1))
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
bench.child()
"""


def _run_job(cfg: Config, title: str, params: dict[str, Any], timeout: float) -> dict[str, Any]:
    import json
    import subprocess

    import anyfork

    params = {**params, "config": cfg._asdict(), "title": title}
    env = dict(os.environ)
    # The job must import this very anyfork, installed or not.
    root = os.path.dirname(os.path.dirname(os.path.abspath(anyfork.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    runner = ["-S", "-c", _BARE_RUNNER, __file__] if params["job"] == "bare" else \
        ["-c", "from anyfork._bench import child; child()"]
    proc = subprocess.run(
        [sys.executable, *runner, json.dumps(params)],
        stdout=subprocess.PIPE, env=env, timeout=timeout, check=False,
    )
    out = proc.stdout.decode(errors="replace")
    for line in reversed(out.splitlines()):
        if line.startswith(_MARK):
            if proc.returncode == 0:
                result: dict[str, Any] = json.loads(line[len(_MARK):])
                return result
            break
    raise RuntimeError(f"exited with status {proc.returncode}")


def _summary(samples: Sequence[float]) -> dict[str, Any]:
    return {"median": _median(samples), "min": min(samples), "max": max(samples),
            "samples": list(samples)}


def _targets(fig: dict[str, float], sizes: Sequence[int]) -> list[dict[str, Any]]:
    def ratio(a: str, b: str) -> float | None:
        if a in fig and b in fig and fig[a] > 0 and fig[b] > 0:
            return fig[a] / fig[b]
        return None

    small = sizes[0] if sizes else 0
    big = 2000
    out: list[dict[str, Any]] = []

    def target(name: str, value: float | None, goal: float, why_missing: str) -> None:
        out.append({"target": name, "goal": goal, "value": value,
                    "met": None if value is None else value >= goal,
                    "note": why_missing if value is None else ""})

    where = "as started" if small == 0 else f"of {small} MB"
    target(f"anyfork.new() >= 2x manual fork, caller {where}",
           ratio(f"new@{small}", f"fork@{small}"), 2.0, "not measured")
    out[-1]["floor"] = ratio("floor", f"fork@{small}")
    target(f"anyfork.new() >= 50x manual fork, caller {big} MB",
           ratio(f"new@{big}", f"fork@{big}"), 50.0, f"not measured: --sizes has no {big}, or it was skipped")
    target("anyfork.new() >= 6x multiprocessing forkserver",
           ratio(f"new@{small}", "mp_forkserver"), 6.0, "not measured")
    target("anyfork.new_exec() >= 4x multiprocessing spawn",
           ratio("new_exec", "mp_spawn"), 4.0, "not measured")
    target("idle worker USS >= 4x below multiprocessing forkserver",
           ratio("mem_uss_mp_forkserver", "mem_uss_anyfork"), 4.0, "not measured")
    return out


def measure(cfg: Config, command: str) -> dict[str, Any]:
    """Run every job and return the whole result (what ``--json`` writes)."""
    plan = _plan(cfg)
    info = machine()
    notes = list(plan.notes)
    stale = _stale_bytecode()
    if stale and sys.dont_write_bytecode:
        notes.append(
            "PYTHONDONTWRITEBYTECODE is set and the bytecode of " + ", ".join(map(os.path.basename, stale))
            + " is missing or stale, so every new_exec() and template start compiles it from source "
            "(several ms each): run `python -m compileall " + os.path.dirname(stale[0])
            + "` once (without that variable) for the figures an installed anyfork gets")
    samples: dict[str, list[float]] = {}
    caller_mb: dict[str, float] = {}
    failed: list[str] = []
    started = time.monotonic()
    timeout = 30.0 if cfg.quick else 1200.0
    for i, (what, params) in enumerate(plan.jobs, 1):
        title = f"[{i}/{len(plan.jobs)}] {what}"
        sys.stderr.write(f"bench: {title}\n")
        sys.stderr.flush()
        try:
            result = _run_job(cfg, title, params, timeout)
        except Exception as e:
            failed.append(f"{title}: {e}")
            continue
        failed.extend(f"{title}: {e}" for e in result["errors"])
        for row, values in result["rows"].items():
            samples.setdefault(row, []).extend(values)
            caller_mb[row] = result["rss_mb"]
    rows: list[dict[str, Any]] = []
    fig: dict[str, float] = {}
    for spec in _rows(cfg, plan.sizes):
        if spec.id not in samples:
            if not any(spec.id in f for f in failed):
                failed.append(f"{spec.id}: no figure")
            continue
        summary = _summary(samples[spec.id])
        fig[spec.id] = summary["median"]
        rows.append({**spec._asdict(), **summary, "caller_mb": round(caller_mb[spec.id], 1)})
    for row in rows:
        for key, ref in (("vs_fork", row["fork_ref"]), ("vs_mp", row["mp_ref"])):
            v, r = fig.get(row["id"]), fig.get(ref) if ref else None
            if v and r:
                row[key] = v / r if row["higher_is_better"] else r / v
            else:
                row[key] = None
    # The "Calls" section (anyfork.rpc against its peers): one job of its own.
    from . import _bench_calls

    sys.stderr.write("bench: calls\n")
    calls = _bench_calls.measure(cfg.quick, cfg.rounds)
    failed.extend(calls["failed"])
    # The "Pools" section (anyfork.Executor against its peers): jobs of its own.
    from . import _bench_pools

    pools = _bench_pools.measure(cfg.quick, cfg.rounds)
    failed.extend(pools["failed"])
    # The "Remote" section (anyfork.remote over a loopback sshd): its own job too.
    from . import _bench_remote

    sys.stderr.write("bench: remote\n")
    remote = _bench_remote.measure(cfg.quick, cfg.rounds)
    failed.extend(remote["failed"])
    return {
        "calls": calls,
        "pools": pools,
        "remote": remote,
        "command": command,
        "machine": info,
        "config": cfg._asdict(),
        "modules_preloaded": list(MODULES),
        "template_modules": list(TEMPLATE_MODULES),
        "sizes_run": plan.sizes,
        "rows": rows,
        "targets": _targets(fig, plan.sizes),
        "notes": notes,
        "failed": failed,
        "seconds": round(time.monotonic() - started, 1),
    }


# --- the report -------------------------------------------------------------------------


def _num(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    if unit == "/s" or abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def _x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _size(row: dict[str, Any]) -> str:
    return f"{row['caller_mb']:.0f} MB"


def _table(headers: Sequence[str], lines: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)]

    def fmt(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return "  " + "  ".join([first, *rest]).rstrip()

    return [fmt(headers), "  " + "  ".join("-" * w for w in widths), *(fmt(line) for line in lines)]


def report(result: dict[str, Any]) -> str:
    """The human-readable report."""
    m = result["machine"]
    cfg = result["config"]
    out = [
        f"anyfork {m['anyfork']} benchmark: {result['command']}",
        f"machine: {m['cores']} cores ({m['usable_cores']} usable), {m['cpu']}; {m['kernel']}; "
        f"{m['python']}; {m['mem_total_mb']} MB RAM, {m['mem_available_mb']} MB available; "
        f"load {m['loadavg'][0]:.2f}; {m['date']}",
        f"each figure: median of {cfg['rounds']} rounds (min..max); a timed round lasts >= "
        f"{cfg['seconds']} s. These figures are NOISY (shared machine, CPU frequency, page cache): "
        "compare ratios within one run, not absolute numbers across runs.",
        "ratios: how many times better than the reference (>1 is better); "
        "'vs fork' = manual fork from a caller of the same size, 'vs mp' = multiprocessing forkserver "
        "(for time to first result: the pool at the same temperature).",
    ]
    rows = result["rows"]

    def section(name: str, title: str, unit_header: str, ref_header: str) -> None:
        chosen = [r for r in rows if r["section"] == name]
        if not chosen:
            return
        creation = name == _CREATION
        headers = ["what", *(["caller"] if creation else []), unit_header, "min..max",
                   *(["vs fork"] if creation else []), ref_header]
        lines = []
        for r in chosen:
            lines.append([
                r["label"], *([_size(r)] if creation else []), _num(r["median"], r["unit"]),
                f"{_num(r['min'], r['unit'])}..{_num(r['max'], r['unit'])}",
                *([_x(r["vs_fork"])] if creation else []), _x(r["vs_mp"]),
            ])
        out.append("")
        out.append(title)
        out.extend(_table(headers, lines))

    section(_CREATION, "Process creation: create, exit at once, caller sees EOF, reaped (higher is better)",
            "per s", "vs mp")
    section(_TTFR, "Time to first result: start, submit a function, get what it returns (lower is better)",
            "ms", "vs pool")
    section(_CONC, f"Many at once: {cfg['concurrency']} processes created concurrently (higher is better)",
            "per s", "vs mp")
    section(_MEMORY, "Memory per idle worker after gc.collect(), with "
            f"{', '.join(result['modules_preloaded'])} loaded (MiB, lower is better)", "MiB", "vs mp")
    if "calls" in result:
        from . import _bench_calls

        out.extend(_bench_calls.report(result["calls"]))
    if "pools" in result:
        from . import _bench_pools

        out.extend(_bench_pools.report(result["pools"]))
    if "remote" in result:
        from . import _bench_remote

        out.extend(_bench_remote.report(result["remote"]))
    out.append("")
    out.append("Summary (ratios from this run, >1x: anyfork is ahead; the project's targets are in "
               "docs/benchmarks.md):")
    for t in result["targets"]:
        if t["value"] is not None:
            floor = t.get("floor")
            beside = f" (the floor row: {floor:.2f}x)" if floor else ""
            out.append(f"  {_summary_phrase(t['target'])}: {t['value']:.2f}x{beside}")
    if "pools" in result:
        out.extend(_bench_pools.summary(result["pools"], result.get("calls")))
    for n in result["notes"]:
        out.append(f"note: {n}")
    for f in result["failed"]:
        out.append(f"FAILED: {f}")
    out.append(f"({result['seconds']} s)")
    return "\n".join(out)


def _summary_phrase(target: str) -> str:
    """A target's name as a plain comparison, without its goal:
    "anyfork.new() >= 2x manual fork" reads "anyfork.new() vs manual fork"."""
    name, _, rest = target.partition(" >= ")
    what = rest.partition(" ")[2]
    if what.startswith("below "):
        return f"{name}, {what[len('below '):]}'s over anyfork's"
    return f"{name} vs {what}" if what else target


def plot(result: dict[str, Any], path: str) -> None:
    """Rates against caller size, log scale (needs matplotlib)."""
    import importlib

    matplotlib: Any = importlib.import_module("matplotlib")
    matplotlib.use("Agg")
    plt: Any = importlib.import_module("matplotlib.pyplot")
    rows = {r["id"]: r for r in result["rows"]}
    sizes = result["sizes_run"]
    fig, ax = plt.subplots(figsize=(8, 5))
    for prefix, label, style in (("fork@", "manual socketpair + os.fork()", "o-"),
                                 ("new@", "anyfork.new().run()", "s-")):
        pts = [(rows[f"{prefix}{s}"]["caller_mb"], rows[f"{prefix}{s}"]["median"])
               for s in sizes if f"{prefix}{s}" in rows]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
    for rid, style in (("tplfork", ":"), ("new_exec", "--"), ("mp_fork", "-."),
                       ("mp_forkserver", "--"), ("mp_spawn", ":")):
        if rid in rows:
            ax.axhline(rows[rid]["median"], linestyle=style, linewidth=1, color="gray")
            ax.annotate(rows[rid]["label"].split(":")[0].split(",")[0], (0.01, rows[rid]["median"]),
                        xycoords=("axes fraction", "data"), fontsize=7, va="bottom")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ticker: Any = importlib.import_module("matplotlib.ticker")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(ticker.NullFormatter())
    measured = sorted({rows[f"fork@{s}"]["caller_mb"] for s in sizes if f"fork@{s}" in rows})
    if measured:
        ax.set_xticks([round(mb) for mb in measured])
    ax.set_xlabel("caller size (RSS, MB)")
    ax.set_ylabel("processes per second (create, exit, EOF)")
    ax.set_title(f"anyfork bench: {result['machine']['cores']} cores, {result['machine']['python']}")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def have_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def run(cfg: Config, json_path: str | None, plot_path: str | None, command: str) -> int:
    """Measure, print the report, write the files; 0 unless a job failed."""
    result = measure(cfg, command)
    print(report(result))
    if json_path:
        import json

        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    if plot_path:
        plot(result, plot_path)
    return 1 if result["failed"] else 0
