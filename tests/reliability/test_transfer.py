"""Descriptors and arguments in bulk (issue 5, items 9 and 10)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import select
import socket
import subprocess
import sys

import pytest

import anyfork

KINDS = ["new", "new_exec", "fork"]

# --- 9. send_fh ----------------------------------------------------------------------------

MARK_EACH = """
def mark_each(s, *handles):
    for i, h in enumerate(handles):
        h.write(b'%d' % i)
        h.close()
    s.sendall(b'%d' % len(handles))
"""


@pytest.mark.parametrize("kind", KINDS)
def test_send_fh_300_descriptors_arrive_whole_and_in_order(h, make_proc, kind):
    pipes = [os.pipe() for _ in range(300)]
    open_w = [w for _, w in pipes]
    try:
        p = make_proc(kind).eval(MARK_EACH)
        p.send_fh(*open_w)
        while open_w:  # the library holds its own duplicates
            os.close(open_w.pop())
        with p.run("mark_each") as s:
            assert h.recv_all(s, 10) == b"300"
        assert p.wait(5) == 0
        for i, (r, _) in enumerate(pipes):
            assert os.read(r, 16) == b"%d" % i
    finally:
        # Each descriptor closed exactly once: a number closed twice may by
        # then belong to someone else (anyfork's own sockets, for one).
        for r, _ in pipes:
            os.close(r)
        for w in open_w:
            os.close(w)


REPORT_CLOEXEC = """
import json, os
def report(s, *handles):
    fds = [s.fileno()] + [h if isinstance(h, int) else h.fileno() for h in handles]
    s.sendall(json.dumps([os.get_inheritable(fd) for fd in fds]).encode())
"""


@pytest.mark.parametrize("kind", KINDS)
def test_every_received_descriptor_is_close_on_exec(h, make_proc, kind, tmp_path):
    a, b = socket.socketpair()
    r, w = os.pipe()
    os.set_inheritable(r, True)  # inheritable here: must not be there
    f = open(tmp_path / "file", "wb")
    d = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    os.set_inheritable(d, True)
    try:
        p = make_proc(kind).eval(REPORT_CLOEXEC).send_fh(a, r, w, f, d)
        with p.run("report") as s:
            flags = json.loads(h.recv_all(s, 5))
        assert flags == [False] * 6, "a descriptor arrived without close-on-exec"
        assert p.wait(5) == 0
    finally:
        a.close()
        b.close()
        os.close(r)
        os.close(w)
        f.close()
        os.close(d)


AT_RLIMIT = """
import os, resource
def _fill(errpath):
    fd = os.open(errpath, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 2)
    os.close(fd)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    held = []
    try:
        while True:
            held.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass
    os.close(held.pop())
    os.close(held.pop())  # two slots free: fewer than what comes next
    return held
_held = _fill(args[0])
def never(s, *a):
    os._exit(99)
"""


@pytest.mark.parametrize("kind", KINDS)
def test_receiver_at_rlimit_nofile_gets_ctrunc_and_fails_clearly(h, make_proc, kind, tmp_path):
    errpath = tmp_path / "stderr"
    pipes = [os.pipe() for _ in range(10)]
    open_w = [w for _, w in pipes]
    try:
        p = make_proc(kind).eval(AT_RLIMIT, str(errpath)).send_fh(*open_w)
        while open_w:
            os.close(open_w.pop())
        try:
            p.run("never").close()
        except anyfork.ProcessExitedError:
            pass
        assert p.wait(5) == 2
        err = errpath.read_text()
        assert "stream corrupted" in err, err
        assert "MSG_CTRUNC" in err or "descriptors lost" in err, err
        # Nothing it received stays open anywhere: every pipe sees EOF.
        for r, _ in pipes:
            ready, _, _ = select.select([r], [], [], 2)
            assert ready
            assert os.read(r, 1) == b""
    finally:
        # Each descriptor closed exactly once: a number closed twice may by
        # then belong to someone else (anyfork's own sockets, for one).
        for r, _ in pipes:
            os.close(r)
        for w in open_w:
            os.close(w)


# --- 10. send_arg -------------------------------------------------------------------------------

DIGEST = """
import hashlib
def digest(s, *items):
    out = []
    for it in items:
        b = it.encode('utf-8', 'surrogatepass') if isinstance(it, str) else it
        out.append('%s:%d:%s' % (type(it).__name__, len(b), hashlib.sha256(b).hexdigest()))
    s.sendall('\\n'.join(out).encode())
"""

SIZES = [0, 65535, 65536, 65537, 64 << 20]


def _payloads(size: int) -> list[bytes | str]:
    if size > 1 << 20:
        data = os.urandom(1 << 16) * (size >> 16)
        return [data]
    text = ("é\udcff\U0001f600x" * (size // 4 + 1))[:size]
    return [os.urandom(size), text]


def _expected(items: list[bytes | str]) -> str:
    lines = []
    for it in items:
        b = it.encode("utf-8", "surrogatepass") if isinstance(it, str) else it
        lines.append(f"{type(it).__name__}:{len(b)}:{hashlib.sha256(b).hexdigest()}")
    return "\n".join(lines)


@pytest.mark.parametrize("kind", ["new", "new_exec"])
@pytest.mark.parametrize("size", SIZES, ids=["0", "64K-1", "64K", "64K+1", "64M"])
def test_send_arg_sizes_intact_sync(h, make_proc, kind, size):
    items = _payloads(size)
    p = make_proc(kind).eval(DIGEST).send_arg(*items)
    with p.run("digest") as s:
        assert s.getblocking()
        assert h.recv_all(s, 20).decode() == _expected(items)
    assert p.wait(5) == 0


async def _read_all(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    chunks = []
    while data := await loop.sock_recv(sock, 1 << 16):
        chunks.append(data)
    return b"".join(chunks)


@pytest.mark.parametrize("kind", ["new", "new_exec"])
@pytest.mark.parametrize("size", SIZES, ids=["0", "64K-1", "64K", "64K+1", "64M"])
def test_send_arg_sizes_intact_async(make_proc, kind, size):
    items = _payloads(size)
    p = make_proc(kind).eval(DIGEST).send_arg(*items)

    async def main() -> tuple[str, int]:
        ticks = 0
        done = False

        async def ticker() -> None:
            nonlocal ticks
            while not done:
                ticks += 1
                await asyncio.sleep(0)

        t = asyncio.create_task(ticker())
        try:
            s = await asyncio.wait_for(p.run_async("digest"), 20)
        finally:
            done = True
            await t
        with s:
            assert not s.getblocking()
            reply = await asyncio.wait_for(_read_all(s), 20)
        return reply.decode(), ticks

    reply, ticks = asyncio.run(main())
    assert reply == _expected(items)
    if size > 1 << 20:
        assert ticks > 2, "run_async blocked the event loop while writing 64 MiB"
    assert p.wait(5) == 0


EPIPE_CALLER = r'''
import asyncio, signal
import anyfork
signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # a write to a dead peer would kill us
big = b"x" * (16 << 20)
keep = []
for kind in ("new", "new_exec", "fork"):
    for driver in ("sync", "async"):
        if kind == "fork":
            tpl = anyfork.new_exec()
            keep.append(tpl)
            p = tpl.fork()
        else:
            p = getattr(anyfork, kind)()
        p.eval("import os; os._exit(0)").send_arg(big)
        try:
            if driver == "sync":
                s = p.run("os:getpid")
            else:
                s = asyncio.run(p.run_async("os:getpid"))
        except anyfork.Error as e:
            print(f"{kind}/{driver} {type(e).__name__}", flush=True)
        except BaseException as e:
            print(f"{kind}/{driver} NOT-ANYFORK {type(e).__name__}: {e}", flush=True)
        else:
            s.close()
            print(f"{kind}/{driver} no-error", flush=True)
'''


def test_peer_closing_mid_write_is_an_anyfork_error_not_sigpipe():
    res = subprocess.run([sys.executable, "-c", EPIPE_CALLER], capture_output=True, text=True,
                         timeout=60, check=False)
    assert res.returncode == 0, f"caller died (status {res.returncode}): {res.stdout}{res.stderr}"
    lines = res.stdout.split("\n")[:-1]
    assert len(lines) == 6, res.stdout
    for line in lines:
        _, what = line.split(" ", 1)
        cls = getattr(anyfork, what, None)
        assert isinstance(cls, type), line
        assert issubclass(cls, anyfork.Error), line
