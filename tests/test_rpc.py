"""anyfork.rpc: calls, errors, events, death, flow control and descriptors,
under the blocking and the asyncio driver alike."""

from __future__ import annotations

import asyncio
import concurrent.futures
import concurrent.futures.process
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import anyfork
from anyfork import rpc
from helpers import wait_exited

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

pytestmark = pytest.mark.usefixtures("check_leaks")
TIMEOUT = 20.0
MIB = 1 << 20


class Driver:
    """One way of driving a client: the same calls, blocking or from asyncio."""

    name = ""

    def start(self, func: Any, proc: anyfork.Process | None = None, **kw: Any) -> Any:
        raise NotImplementedError

    def call(self, client: Any, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def calls(self, client: Any, arglists: list[tuple[Any, ...]]) -> list[Any]:
        """Many calls in flight at once; their results or exceptions, in order."""
        raise NotImplementedError

    def finish(self, client: Any) -> int:
        raise NotImplementedError

    def close(self) -> None:
        pass


class Blocking(Driver):
    name = "blocking"

    def start(self, func: Any, proc: anyfork.Process | None = None, **kw: Any) -> rpc.Client:
        return rpc.run(proc or anyfork.new(), func, **kw)

    def call(self, client: rpc.Client, *args: Any, **kwargs: Any) -> Any:
        return client.call(*args, **kwargs)

    def calls(self, client: rpc.Client, arglists: list[tuple[Any, ...]]) -> list[Any]:
        futures = [client.submit(*a) for a in arglists]
        concurrent.futures.wait(futures, timeout=TIMEOUT)
        return [f.exception() or f.result() for f in futures]

    def finish(self, client: rpc.Client) -> int:
        client.close()
        return client.wait(TIMEOUT)


class Async(Driver):
    name = "asyncio"

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, TIMEOUT))

    def start(self, func: Any, proc: anyfork.Process | None = None, **kw: Any) -> rpc.AsyncClient:
        return self.run(rpc.run_async(proc or anyfork.new(), func, **kw))

    def call(self, client: rpc.AsyncClient, *args: Any, **kwargs: Any) -> Any:
        return self.run(client.call(*args, **kwargs))

    def calls(self, client: rpc.AsyncClient, arglists: list[tuple[Any, ...]]) -> list[Any]:
        async def all_at_once() -> list[Any]:
            return await asyncio.gather(*(client(*a) for a in arglists), return_exceptions=True)

        return self.run(all_at_once())  # type: ignore[no-any-return]

    def finish(self, client: rpc.AsyncClient) -> int:
        self.run(client.aclose())
        return self.run(client.wait(TIMEOUT))  # type: ignore[no-any-return]

    def close(self) -> None:
        self.loop.close()


@pytest.fixture(params=["blocking", "asyncio"])
def drive(request: pytest.FixtureRequest) -> Iterator[Driver]:
    d: Driver = Blocking() if request.param == "blocking" else Async()
    yield d
    d.close()


# --- calls ------------------------------------------------------------------------------


def test_a_call_returns_the_handlers_result_from_every_kind_of_process(
        drive: Driver, make: Callable[[], anyfork.Process]) -> None:
    client = drive.start("rpc_handlers:echo", make())
    assert drive.call(client, 42) == 42
    assert drive.call(client, 1, 2, key="v") == [[1, 2], {"key": "v"}]
    assert client.process.pid != os.getpid()
    assert drive.finish(client) == 0


def test_arguments_that_look_like_args_and_kwargs_arrive_as_they_were_passed(drive: Driver) -> None:
    # With pickle, a call f(x, y) with x a tuple and y a dict was taken for
    # the (args, kwargs) of a call with keywords: f(*x, **y) ran.
    client = drive.start("rpc_handlers:echo", anyfork.new())
    first = (1, 2)
    assert drive.call(client, first, {"k": 3}) == [first, {"k": 3}]
    assert drive.call(client, first, {}) == [first, {}]
    assert drive.call(client, first) == first
    assert drive.call(client, [first, {"k": 3}]) == [first, {"k": 3}]
    assert drive.finish(client) == 0


def test_the_handler_may_be_given_as_a_function(drive: Driver) -> None:
    import rpc_handlers

    client = drive.start(rpc_handlers.pid)
    assert drive.call(client) == client.process.pid
    assert drive.finish(client) == 0


def test_many_calls_in_flight_each_get_their_own_reply_in_any_order(drive: Driver) -> None:
    client = drive.start("rpc_handlers:asleep")
    # Later calls sleep less, so their replies come first.
    results = drive.calls(client, [(0.05 * (5 - i), i) for i in range(6)])
    assert results == list(range(6))
    assert drive.finish(client) == 0


def test_a_client_serves_many_threads_at_once() -> None:
    client = rpc.run(anyfork.new(), "rpc_handlers:echo")
    got: dict[int, list[Any]] = {}

    def worker(t: int) -> None:
        got[t] = [client.call((t, i)) if i % 2 else client.submit((t, i)).result(TIMEOUT)
                  for i in range(200)]

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(TIMEOUT)
    assert got == {t: [(t, i) for i in range(200)] for t in range(4)}
    client.close()
    assert client.wait(TIMEOUT) == 0


def test_futures_complete_with_nobody_waiting_in_result() -> None:
    """The reader thread reads for futures only callbacks and as_completed watch."""
    client = rpc.run(anyfork.new(), "rpc_handlers:echo")
    done = threading.Event()
    seen: list[int] = []
    futures = [client.submit(i) for i in range(50)]
    futures[-1].add_done_callback(lambda f: (seen.append(f.result()), done.set()))
    assert done.wait(TIMEOUT)
    assert seen == [49]
    assert sorted(f.result() for f in concurrent.futures.as_completed(futures, TIMEOUT)) == list(range(50))
    with client:
        pass
    assert client.process.returncode == 0


def test_a_future_nobody_waits_on_makes_no_condition(monkeypatch: pytest.MonkeyPatch) -> None:
    """submit(...).result() and callbacks-free futures take no lock of their own:
    a Condition per call was a quarter of a pipelined call's time."""
    client = rpc.run(anyfork.new(), "rpc_handlers:echo")
    assert client.submit(0).result(TIMEOUT) == 0  # starts the reader thread (an Event: a Condition)
    made: list[object] = []
    real = threading.Condition

    def counting(*args: Any) -> threading.Condition:
        made.append(None)
        return real(*args)

    monkeypatch.setattr(threading, "Condition", counting)
    futures = [client.submit(i) for i in range(100)]
    assert [f.result(TIMEOUT) for f in futures] == list(range(100))
    assert made == []
    monkeypatch.undo()
    with client:
        pass


def test_threads_waiting_on_a_running_future_are_woken() -> None:
    """Waiters that come before the reply (result() in another thread, wait,
    as_completed, a callback) each see it, however the setting interleaves."""
    client = rpc.run(anyfork.new(), "rpc_handlers:recv_one")
    ours, theirs = socket.socketpair()
    fut = client.submit(theirs)
    theirs.close()
    seen: list[Any] = []
    called = threading.Event()
    fut.add_done_callback(lambda f: (seen.append(("callback", f.result())), called.set()))
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        waiters = [pool.submit(fut.result, TIMEOUT),
                   pool.submit(lambda: concurrent.futures.wait([fut], TIMEOUT).done == {fut}),
                   pool.submit(lambda: [f.result() for f in concurrent.futures.as_completed([fut], TIMEOUT)])]
        time.sleep(0.05)  # let them start waiting (they pass either way)
        ours.sendall(b"!")
        got = [w.result(TIMEOUT) for w in waiters]
    ours.close()
    assert called.wait(TIMEOUT)
    assert got == [b"!", True, [b"!"]]
    assert seen == [("callback", b"!")]
    with client:
        pass


def test_init_is_called_first_with_what_send_arg_and_send_fh_queued(drive: Driver) -> None:
    a, b = socket.socketpair()
    with a, b:
        proc = anyfork.new().send_arg(b"one", "two").send_fh(a)
        client = drive.start("rpc_handlers:get_init", proc, init="rpc_handlers:record_init")
        assert drive.call(client) == [b"one", "two", "socket"]
        assert drive.finish(client) == 0


class _Missing:
    """A poller that never has anything, counting its polls."""

    def __init__(self) -> None:
        self.polls = 0
        self.has = False

    def poll(self, timeout: int) -> list[tuple[int, int]]:
        self.polls += 1
        return [(0, 1)] if self.has else []


def test_waits_back_off_from_spinning_while_spins_miss(monkeypatch: pytest.MonkeyPatch) -> None:
    # Broke (CPU): a wait spun 100 us before every sleep even when the
    # replies never came that soon (slow handlers, remote workers), taking a
    # CPU from the workers.
    from types import SimpleNamespace

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    core = SimpleNamespace(spin_skip=0, spin_backoff=1)
    poller = _Missing()
    spun = []
    for _ in range(8):
        before = poller.polls
        assert rpc._spin(poller, core) is False  # type: ignore[arg-type]
        spun.append(poller.polls > before)
    assert spun == [True, False, True, False, False, True, False, False]  # skips 1, then 2, then 4
    while core.spin_skip:
        rpc._spin(poller, core)  # type: ignore[arg-type]
    poller.has = True
    assert rpc._spin(poller, core) is True  # type: ignore[arg-type]
    assert (core.spin_skip, core.spin_backoff) == (0, 1)  # a hit: spinning pays again


def test_close_lets_the_worker_finish_its_calls_then_exit_0() -> None:
    client = rpc.run(anyfork.new(), "rpc_handlers:sleep")
    futures = [client.submit(0.05) for _ in range(3)]
    client.close()
    assert [f.result(TIMEOUT) for f in futures] == [0.05] * 3
    assert client.wait(TIMEOUT) == 0
    with pytest.raises(anyfork.ProcessStateError):
        client.call(0)


def test_async_context_manager_closes_and_waits() -> None:
    async def main() -> rpc.AsyncClient:
        async with await rpc.run_async(anyfork.new(), "rpc_handlers:asleep") as client:
            assert await client(0.01, "x") == "x"
        return client

    assert asyncio.run(asyncio.wait_for(main(), TIMEOUT)).process.returncode == 0


# --- errors -----------------------------------------------------------------------------


def test_an_exception_is_raised_as_its_type_with_the_remote_traceback(drive: Driver) -> None:
    client = drive.start("rpc_handlers:raise_value")
    with pytest.raises(ValueError, match=r"^no good$") as info:
        drive.call(client, "no good")
    cause = info.value.__cause__
    assert isinstance(cause, rpc.RemoteTraceback)
    assert "raise_value" in str(cause)
    assert "ValueError: no good" in str(cause)
    # The worker keeps serving.
    with pytest.raises(ValueError, match="again"):
        drive.call(client, "again")
    assert drive.finish(client) == 0


@pytest.mark.parametrize(("serializer", "handler"),
                         [("json", "raise_value"), ("pickle", "raise_unpicklable")])
def test_an_exception_that_cant_be_carried_is_a_remote_error(drive: Driver, serializer: str,
                                                              handler: str) -> None:
    client = drive.start(f"rpc_handlers:{handler}", serializer=serializer)
    args = ("bad",) if handler == "raise_value" else ()
    with pytest.raises(rpc.RemoteError) as info:
        drive.call(client, *args)
    err = info.value
    assert isinstance(err, anyfork.Error)
    want = "builtins.ValueError" if handler == "raise_value" else "rpc_handlers.Unpicklable"
    assert err.type_name == want
    assert err.message in ("bad", "left right")
    assert handler in err.traceback
    assert isinstance(err.__cause__, rpc.RemoteTraceback)
    assert drive.finish(client) == 0


def test_an_unserializable_argument_fails_the_call_and_sends_nothing(drive: Driver) -> None:
    import pickle

    client = drive.start("rpc_handlers:echo_count")
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        drive.call(client, lambda: None)
    # The worker counts what it is sent: it was sent nothing for that call.
    assert drive.call(client, "a") == ["a", 1]
    assert drive.finish(client) == 0


def test_an_unserializable_result_fails_the_call_clearly_and_the_worker_goes_on(drive: Driver) -> None:
    client = drive.start("rpc_handlers:bad_result")
    with pytest.raises(rpc.RemoteError, match="result can't be serialized"):
        drive.call(client)
    with pytest.raises(rpc.RemoteError, match="result can't be serialized"):
        drive.call(client)
    assert drive.finish(client) == 0


def test_a_handler_that_cant_be_found_fails_the_calls(drive: Driver) -> None:
    client = drive.start("rpc_handlers:no_such_function")
    with pytest.raises(AttributeError, match="no_such_function"):
        drive.call(client)
    with pytest.raises(AttributeError):
        drive.call(client)
    assert client.process.wait(TIMEOUT) == 1
    if isinstance(client, rpc.Client):
        assert client.wait(TIMEOUT) == 1
    else:
        assert drive.run(client.wait(TIMEOUT)) == 1  # type: ignore[attr-defined]


def test_handler_names_are_found_as_run_finds_them() -> None:
    """The worker looks names up with the serve loop's resolve: a bare name
    is __main__'s only, and one missing there says so, as run() does."""
    client = rpc.run(anyfork.new(), "print")
    with pytest.raises(NameError, match="not defined in the process's __main__; a builtin is named"):
        client.call()
    assert client.wait(TIMEOUT) == 1
    client = rpc.run(anyfork.new(), "os.path.join")  # a dotted walk through modules to a function
    assert client.call("a", "b") == os.path.join("a", "b")
    with client:
        pass


def test_bad_arguments_fail_at_the_call() -> None:
    with pytest.raises(ValueError, match="serializer"):
        rpc.run(anyfork.new(), "rpc_handlers:echo", serializer="nope")
    with pytest.raises(ValueError, match="max_in_flight"):
        rpc.run(anyfork.new(), "rpc_handlers:echo", max_in_flight=0)
    with pytest.raises(TypeError, match="importable"):
        rpc.run(anyfork.new(), lambda: None)
    with pytest.raises(TypeError, match="dumps"):
        rpc.run(anyfork.new(), "rpc_handlers:echo", serializer=object())


# --- events -----------------------------------------------------------------------------


@pytest.mark.parametrize("handler", ["events", "aevents"])
def test_events_reach_on_event_before_the_reply(drive: Driver, handler: str) -> None:
    log: list[Any] = []
    client = drive.start(f"rpc_handlers:{handler}", on_event=lambda *a: log.append(a))
    log.append(drive.call(client, 3))
    assert log == [("tick", 0), ("tick", 1), ("tick", 2), "done"]
    assert drive.finish(client) == 0


def test_an_on_event_that_raises_fails_the_call_that_sent_the_event(drive: Driver) -> None:
    # The worker marks each event with the call it serves (also when it
    # answers a lone call at once, without its decoder).
    def boom(*args: Any) -> None:
        raise ValueError(f"on_event refused {args}")

    client = drive.start("rpc_handlers:events", on_event=boom)
    assert drive.call(client, 0) == "done"  # (the first call may come with the HELLO)
    with pytest.raises(ValueError, match="refused"):
        drive.call(client, 1)
    assert drive.call(client, 0) == "done"  # the error went with its call only
    assert drive.finish(client) == 0


def test_a_worker_that_retires_during_a_lone_call_answers_it_then_says_so() -> None:
    client = rpc.run(anyfork.new(), "rpc_handlers:retire_on")
    try:
        assert client.call("first") == "first"  # (it may come with the HELLO)
        assert client.call("retire") == "retire"
        with pytest.raises(rpc.RetiredError):
            client.call("after")
    finally:
        client.close()
    assert client.wait(TIMEOUT) == 0


def test_events_come_through_the_async_iterator_too() -> None:
    async def main() -> list[Any]:
        client = await rpc.run_async(anyfork.new(), "rpc_handlers:events")
        assert await client(2) == "done"
        await client.aclose()
        return [e async for e in client.events()]

    assert asyncio.run(asyncio.wait_for(main(), TIMEOUT)) == [("tick", 0), ("tick", 1)]


def test_event_outside_a_worker_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="rpc worker"):
        rpc.event("x")


# --- death ------------------------------------------------------------------------------


def test_worker_died_error_is_an_anyfork_error_and_a_broken_pool() -> None:
    assert issubclass(anyfork.WorkerDiedError, anyfork.Error)
    assert issubclass(anyfork.WorkerDiedError, concurrent.futures.process.BrokenProcessPool)
    e = anyfork.WorkerDiedError(12, -9)
    assert (e.pid, e.returncode) == (12, -9)
    assert "signal 9" in str(e)


def test_a_killed_worker_fails_every_call_in_flight_and_every_later_call(drive: Driver) -> None:
    client = drive.start("rpc_handlers:asleep")
    pid = client.process.pid
    threading.Timer(0.2, os.kill, (pid, signal.SIGKILL)).start()
    started = time.monotonic()
    results = drive.calls(client, [(30, i) for i in range(4)])
    assert time.monotonic() - started < TIMEOUT
    for r in results:
        assert isinstance(r, anyfork.WorkerDiedError)
        assert (r.pid, r.returncode) == (pid, -signal.SIGKILL)
    with pytest.raises(anyfork.WorkerDiedError):
        drive.call(client, 0)
    assert client.process.returncode == -signal.SIGKILL
    assert drive.finish(client) == -signal.SIGKILL


def test_a_worker_that_exits_mid_call_reports_its_status(drive: Driver) -> None:
    client = drive.start("rpc_handlers:hard_exit")
    with pytest.raises(anyfork.WorkerDiedError) as info:
        drive.call(client, 7)
    assert info.value.returncode == 7
    assert info.value.pid == client.process.pid
    if isinstance(client, rpc.Client):
        assert client.wait(TIMEOUT) == 7


_GONE_CALLER = """
import os, sys, time
sys.path[:0] = {path!r}
import anyfork
from anyfork import rpc
client = rpc.run(anyfork.new(), "rpc_handlers:blob")
print(client.process.pid, flush=True)
client.submit(256 << 20)  # a reply far larger than the socket holds
time.sleep(0.3)           # the worker is writing it now
os._exit(0)               # and the caller goes, without reading
"""


def test_the_worker_exits_when_the_caller_goes_even_mid_reply(tmp_path: Path) -> None:
    code = _GONE_CALLER.format(path=[str(Path(__file__).parent), *sys.path])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=TIMEOUT, check=True)
    pid = int(out.stdout.split()[0])
    assert wait_exited(pid, TIMEOUT)


# --- flow control -----------------------------------------------------------------------


def test_at_most_max_in_flight_calls_are_in_the_worker_at_once(drive: Driver) -> None:
    client = drive.start("rpc_handlers:asleep_most", max_in_flight=3)
    # Each reply carries the most calls the worker ever had running at once.
    results = drive.calls(client, [(0.05, i) for i in range(12)])
    assert [value for value, _ in results] == list(range(12))
    assert max(most for _, most in results) == 3
    assert drive.finish(client) == 0


def test_submit_blocks_beyond_max_in_flight() -> None:
    client = rpc.run(anyfork.new(), "rpc_handlers:asleep", max_in_flight=2)
    a, b = client.submit(0.3, 1), client.submit(0.3, 2)
    blocked = threading.Event()
    third: list[concurrent.futures.Future[Any]] = []

    def submit_third() -> None:
        third.append(client.submit(0, 3))
        blocked.set()

    t = threading.Thread(target=submit_third)
    t.start()
    assert not blocked.wait(0.1)  # it waits for a slot: no timing claim, only "not yet"
    assert not a.done() or not b.done()
    t.join(TIMEOUT)
    assert [f.result(TIMEOUT) for f in (a, b, third[0])] == [1, 2, 3]
    client.close()
    assert client.wait(TIMEOUT) == 0


@pytest.mark.parametrize("handler", ["size_and_blob", "asize_and_blob"])
def test_a_64_mib_argument_and_a_64_mib_result_at_once(drive: Driver, handler: str) -> None:
    client = drive.start(f"rpc_handlers:{handler}")
    data = b"a" * (64 * MIB)
    results = drive.calls(client, [(data, 64 * MIB), (data, 64 * MIB)])
    for size, result in results:
        assert size == 64 * MIB
        assert result == b"r" * (64 * MIB)
    assert drive.finish(client) == 0


# --- descriptors ------------------------------------------------------------------------


def test_sockets_travel_both_ways_and_the_sender_may_close_at_once(drive: Driver) -> None:
    client = drive.start("rpc_handlers:use_socket")
    mine, theirs = socket.socketpair()
    with mine:
        if isinstance(client, rpc.Client):
            fut = client.submit(theirs, b"from the caller")
            theirs.close()  # ours to close at once: the call holds its own copy
            back = fut.result(TIMEOUT)
        else:
            back = drive.call(client, theirs, b"from the caller")
            theirs.close()
        mine.settimeout(TIMEOUT)
        assert mine.recv(100) == b"from the caller"
    with back:
        assert isinstance(back, socket.socket)
        back.settimeout(TIMEOUT)
        assert back.recv(100) == b"from the worker"
    assert drive.finish(client) == 0


def test_files_travel_as_files(drive: Driver) -> None:
    client = drive.start("rpc_handlers:read_file")
    with tempfile.TemporaryFile("w+") as f:
        f.write("hello file")
        f.seek(0)
        assert drive.call(client, f) == "hello file"
    assert drive.finish(client) == 0


@pytest.mark.parametrize("serializer", ["json", "bytes"])
def test_a_serializer_that_cant_carry_descriptors_says_so(drive: Driver, serializer: str) -> None:
    client = drive.start("rpc_handlers:echo", serializer=serializer)
    a, b = socket.socketpair()
    with a, b, pytest.raises(TypeError, match="descriptors"):
        drive.call(client, a)
    assert drive.finish(client) == 0


# --- serializers ------------------------------------------------------------------------


@pytest.mark.parametrize(("serializer", "args", "want"), [
    ("json", ({"a": [1, 2]},), {"a": [1, 2]}),
    ("bytes", (b"raw",), b"raw"),
    ("bytes", ("text",), "text"),
])
def test_serializers(drive: Driver, serializer: str, args: tuple[Any, ...], want: Any) -> None:
    client = drive.start("rpc_handlers:echo", serializer=serializer)
    assert drive.call(client, *args) == want
    assert drive.finish(client) == 0


def test_the_bytes_serializer_takes_bytes_and_str_only(drive: Driver) -> None:
    client = drive.start("rpc_handlers:echo", serializer="bytes")
    with pytest.raises(TypeError, match="bytes or str"):
        drive.call(client, 1)
    assert drive.finish(client) == 0


def test_a_custom_serializer(drive: Driver) -> None:
    import rpc_handlers

    client = drive.start("rpc_handlers:echo", serializer=rpc_handlers.Reverse())
    assert drive.call(client, {"x": 1}) == {"x": 1}
    assert drive.finish(client) == 0


@pytest.mark.parametrize("module", ["msgpack", "cbor2"])
def test_msgpack_and_cbor2_when_installed(drive: Driver, module: str) -> None:
    pytest.importorskip(module)
    client = drive.start("rpc_handlers:echo", serializer=module)
    assert drive.call(client, [1, "two"]) == [1, "two"]
    assert drive.finish(client) == 0


# --- the wire: handshake and garbage ----------------------------------------------------


def test_a_worker_of_another_version_fails_clearly(drive: Driver) -> None:
    proc = anyfork.new().eval("import anyfork._rpc_wire as w\nw.VERSION = 99")
    client = drive.start("rpc_handlers:echo", proc)
    with pytest.raises(anyfork.ProtocolError, match="version 99"):
        drive.call(client, 1)
    client.process.wait(TIMEOUT)


def test_garbage_from_the_worker_fails_the_client_and_never_hangs(drive: Driver) -> None:
    client = drive.start("rpc_handlers:garbage")
    with pytest.raises(anyfork.ProtocolError, match="broke the rpc protocol"):
        drive.call(client)
    with pytest.raises(anyfork.ProtocolError):
        drive.call(client)
    # The worker was killed: it is not to be trusted.
    assert client.process.wait(TIMEOUT) == -signal.SIGTERM


def test_new_without_rpc_loads_nothing_of_it() -> None:
    code = ("import sys, anyfork; anyfork.new().close(); "
            "print(sorted(m for m in sys.modules if 'rpc' in m or m == 'concurrent.futures.process'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=TIMEOUT, check=True,
                         text=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(("handler", "absent"), [("pool_handlers:loaded", ("anyfork", "inspect")),
                                                 ("pool_handlers:loaded_async", ("anyfork",))])
def test_a_worker_imports_neither_the_package_nor_inspect(drive: Driver, handler: str,
                                                           absent: tuple[str, ...]) -> None:
    """A worker runs the serve loop's modules and rpc's, and no more: not
    the package (all of anyfork, ~8 ms in each new worker), nor inspect
    (5 ms) to tell a coroutine function.  (An async worker's asyncio
    imports inspect itself.)  The handlers' module imports neither."""
    client = drive.start(handler)
    assert drive.call(client, *absent) == []
    assert drive.finish(client) == 0


def _plain_function() -> None:
    pass


async def _coroutine(x: int, y: int = 0) -> int:
    return x + y


class _Handlers:
    def plain(self) -> None:
        pass

    async def coroutine(self) -> None:
        pass

    async def __call__(self) -> None:
        pass


def test_the_coroutine_test_without_inspect_agrees_with_inspect() -> None:
    import functools
    import inspect

    from anyfork import _rpc_worker

    h = _Handlers()
    cases = [_plain_function, _coroutine, h.plain, h.coroutine, h, _Handlers.coroutine, len, lambda: None,
             functools.partial(_coroutine, 1), functools.partial(functools.partial(_coroutine, 1), y=2),
             functools.partial(_plain_function), functools.partial(h.coroutine)]
    want = [inspect.iscoroutinefunction(c) for c in cases]
    assert want.count(True) == 6  # the cases cover both answers
    assert [_rpc_worker.by_code_flags(c) for c in cases] == want
    assert [_rpc_worker.coroutine_function(c) for c in cases] == want


def test_events_read_together_with_their_reply_are_delivered_first() -> None:
    """Deterministic: the worker's HELLO, two events and the reply arrive in
    one read (written here, as a worker would), and the events go first."""
    import pickle

    from anyfork import _backend
    from anyfork import _rpc_wire as W

    class FakeProcess:
        pid = 1
        returncode = None
        _host = None

    ours, worker = socket.socketpair()
    log: list[Any] = []
    core = rpc._Core(FakeProcess(), ours, W.serializer("pickle"), 8,  # type: ignore[arg-type]
                     lambda *args: log.append(args))
    future = rpc._Future.make(core)
    future.add_done_callback(lambda f: log.append(f.result()))  # called as the reply is taken
    with worker:
        with core.lock:
            got = core._begin(pickle.dumps((1,)), [], future)
        assert got is not None
        call, _ = got
        event = pickle.dumps(("tick",))
        result = pickle.dumps("done")
        worker.sendall(W.hello(b"\0") + W.header(W.EVENT, call.id, len(event)) + event
                       + W.header(W.EVENT, call.id, len(event)) + event
                       + W.header(W.RESULT, call.id, len(result)) + result)
        _backend.run_blocking(core.op_progress(future.done))
    core.dispose()
    assert log == [("tick",), ("tick",), "done"]


def test_calls_held_for_a_sequential_worker_go_out_in_batches_before_any_reply() -> None:
    """Deterministic: a worker that runs one call at a time gets tiny calls
    held back and written together, and a batch goes out once it is
    _HOLD_BATCH bytes, before any reply came: the worker is not left idle
    while the caller queues the next ones (pipelined throughput)."""
    import pickle

    from anyfork import _rpc_wire as W

    class FakeProcess:
        pid = 1
        returncode = None
        _host = None

    ours, worker = socket.socketpair()
    core = rpc._Core(FakeProcess(), ours, W.serializer("pickle"), 1000, None)  # type: ignore[arg-type]
    try:
        worker.sendall(W.hello(b"\0"))  # flags 0: one call at a time
        assert core._pump_now() == rpc._OK and core.hello and core.sequential
        payload = pickle.dumps((0,))
        frame = W.HSIZE + len(payload)
        n = 100  # some ten batches
        with core.lock:
            for _ in range(n):
                assert core._begin(payload, [], None) is not None
        worker.setblocking(False)
        got = b""
        with contextlib.suppress(BlockingIOError):
            while True:
                got += worker.recv(65536)
        # The first call at once, then batches of _HOLD_BATCH bytes or so;
        # only the last batch, not yet that big, is still held.
        assert len(got) % frame == 0
        assert len(got) > frame, "only the first call went out"
        assert n * frame - len(got) < rpc._HOLD_BATCH + frame, (len(got), n * frame)
        assert core.outbox.size == n * frame - len(got)
    finally:
        worker.close()
        core.dispose()


def test_replies_read_together_complete_in_order_before_an_event_or_a_callback_runs() -> None:
    """Deterministic: two replies, an event of a third call, then the third
    call's reply (with a callback) arrive in one read.  The event handler
    and the callback see the first two futures done, as they would have,
    one read per reply."""
    import pickle

    from anyfork import _backend
    from anyfork import _rpc_wire as W

    class FakeProcess:
        pid = 1
        returncode = None
        _host = None

    seen: list[tuple[str, list[bool]]] = []
    futures: list[Any] = []
    ours, worker = socket.socketpair()
    core = rpc._Core(FakeProcess(), ours, W.serializer("pickle"), 8,  # type: ignore[arg-type]
                     lambda *args: seen.append(("event", [f.done() for f in futures[:2]])))
    try:
        futures += [rpc._Future.make(core), rpc._Future.make(core)]
        futures.append(rpc._Future.make(
            core, then=lambda _: seen.append(("then", [f.done() for f in futures[:2]]))))
        ids = []
        for fut in futures:
            with core.lock:
                got = core._begin(pickle.dumps((1,)), [], fut)
            assert got is not None
            ids.append(got[0].id)
        value, event = pickle.dumps("v"), pickle.dumps(("tick",))
        worker.sendall(W.hello(b"\0")
                       + W.header(W.RESULT, ids[0], len(value)) + value
                       + W.header(W.RESULT, ids[1], len(value)) + value
                       + W.header(W.EVENT, ids[2], len(event)) + event
                       + W.header(W.RESULT, ids[2], len(value)) + value)
        _backend.run_blocking(core.op_progress(futures[2].done))
        assert [f.result(0) for f in futures] == ["v", "v", "v"]
        assert seen == [("event", [True, True]), ("then", [True, True])]
    finally:
        worker.close()
        core.dispose()


def test_a_client_dropped_without_close_lets_its_worker_go() -> None:
    import gc

    client = rpc.run(anyfork.new(), "rpc_handlers:echo")
    assert client.submit(1).result(TIMEOUT) == 1
    proc = client.process
    del client
    gc.collect()
    # Its socket is closed: the worker sees EOF and exits (check_leaks then
    # finds no descriptor and no zombie left).
    assert proc.wait(TIMEOUT) == 0


# Pins a race a full run hit once (test_terminate_and_kill_workers): a socket
# closed between the reactor's epoll.modify (ENOENT: not armed yet) and its
# epoll.register (EBADF) raised out of _arm, into the caller's submit().
def test_the_reactor_arms_a_socket_closed_under_it_without_raising() -> None:
    import errno

    from anyfork.rpc import _Reactor

    class ClosedMeanwhile:
        def modify(self, fd: int, flags: int) -> None:
            raise FileNotFoundError(errno.ENOENT, "not registered")

        def register(self, fd: int, flags: int) -> None:
            raise OSError(errno.EBADF, "closed")

    reactor = _Reactor.__new__(_Reactor)  # no thread: only _arm is under test
    reactor.epoll = ClosedMeanwhile()
    reactor._arm(1000)


# --- a lone call's receive (the round trip's fast path) ------------------------------------


class _FakeWorker:
    """The worker's end of a _Core's socket, played by a thread: it answers
    the one call it reads with ``answer(call_id)``, a list of byte strings
    written one by one, 50 ms apart."""

    class Process:
        pid = 1
        returncode = None
        _host = None  # (a local process)
        killed = False

        def kill(self) -> None:
            self.killed = True

    def __init__(self, answer: Any) -> None:
        import pickle

        from anyfork import _backend
        from anyfork import _rpc_wire as W

        self.W = W
        self.log: list[Any] = []
        ours, self.sock = socket.socketpair()
        self.core = rpc._Core(self.Process(), ours, W.serializer("pickle"), 8,  # type: ignore[arg-type]
                              lambda *args: self.log.append(args))
        self.sock.sendall(W.hello(b"\0"))
        _backend.run_blocking(self.core.op_progress(lambda: self.core.hello))
        self.pickle = pickle
        self.thread = threading.Thread(target=self._serve, args=(answer,), daemon=True)
        self.thread.start()

    def _serve(self, answer: Any) -> None:
        W = self.W
        head = self.sock.recv(W.HSIZE, socket.MSG_WAITALL)
        length, call_id, kind, _ = W.HEADER.unpack(head)
        assert kind == W.CALL
        self.sock.recv(length, socket.MSG_WAITALL)
        for i, part in enumerate(answer(call_id)):
            if i:
                time.sleep(0.05)
            self.sock.sendall(part)

    def frame(self, kind: int, call_id: int, value: object) -> bytes:
        payload = self.pickle.dumps(value)
        return self.W.header(kind, call_id, len(payload)) + payload

    def close(self) -> None:
        self.thread.join(TIMEOUT)
        self.core.dispose()
        self.sock.close()


def test_a_lone_calls_reply_in_one_piece_skips_the_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    from anyfork import _rpc_wire as W

    calls = []
    real = W.Decoder.frames
    monkeypatch.setattr(W.Decoder, "frames", lambda self: calls.append(1) or real(self))
    w = _FakeWorker(lambda cid: [w.frame(W.RESULT, cid, "done")])
    calls.clear()  # (the HELLO went through it)
    try:
        call = w.core.call_alone(w.pickle.dumps((1,)))
        assert call is not None and call.done and call.value == "done"
        assert calls == [], "the reply went through the decoder"
        assert not w.core.calls
    finally:
        w.close()


def test_a_lone_calls_reply_split_or_after_events_still_arrives_whole_and_in_order() -> None:
    from anyfork import _rpc_wire as W

    def split(cid: int) -> list[bytes]:
        whole = w.frame(W.RESULT, cid, "x" * 1000)
        return [whole[:5], whole[5:600], whole[600:]]

    for answer, events in (
            (split, []),
            (lambda cid: [w.frame(W.EVENT, cid, ("tick",)) + w.frame(W.RESULT, cid, "x" * 1000)],
             [("tick",)]),
            (lambda cid: [w.frame(W.EVENT, cid, ("tick",)), w.frame(W.RESULT, cid, "x" * 1000)],
             [("tick",)])):
        w = _FakeWorker(answer)
        try:
            call = w.core.call_alone(w.pickle.dumps((1,)))
            assert call is not None and call.done and call.error is None
            assert call.value == "x" * 1000
            assert w.log == events
        finally:
            w.close()


def test_a_lone_call_answered_with_garbage_fails_clearly() -> None:
    w = _FakeWorker(lambda cid: [b"\xff" * 64])
    try:
        with pytest.raises(anyfork.ProtocolError, match="broke the rpc protocol"):
            call = w.core.call_alone(w.pickle.dumps((1,)))
            if call is not None and call.error is not None:
                raise call.error
            w.core._check()
    finally:
        w.close()


def test_a_futures_lone_reply_is_read_by_result_without_the_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    # submit(...).result() with nothing else in flight (a pool's round trip):
    # the caller reads the reply itself, in one receive, as call() does.
    from anyfork import _rpc_wire as W

    calls = []
    real = W.Decoder.frames
    monkeypatch.setattr(W.Decoder, "frames", lambda self: calls.append(1) or real(self))
    # (b"" first: the reply comes 50 ms after the call, once result() waits.)
    w = _FakeWorker(lambda cid: [b"", w.frame(W.RESULT, cid, "done")])
    calls.clear()  # (the HELLO went through it)
    try:
        client = rpc.Client(w.core)
        done: list[object] = []
        fut = client._submit((1,), {}, done.append)
        assert fut.result() == "done"
        assert calls == [], "the reply went through the decoder"
        assert done == [fut], "the callback set at submit ran once, with the future"
        assert not w.core.calls and w.core.unwaited == 0
    finally:
        w.close()


@pytest.mark.parametrize("how", ["split", "event in the same write", "event in a write before"])
def test_a_futures_lone_reply_split_or_after_events_arrives_whole_and_in_order(how: str) -> None:
    from anyfork import _rpc_wire as W

    def answer(cid: int) -> list[bytes]:
        whole = w.frame(W.RESULT, cid, "x" * 1000)
        event = w.frame(W.EVENT, cid, ("tick",))
        if how == "split":
            return [whole[:5], whole[5:600], whole[600:]]
        if how == "event in the same write":
            return [event + whole]
        return [event, whole]

    w = _FakeWorker(answer)
    try:
        client = rpc.Client(w.core)
        fut = client.submit(1)
        assert fut.result() == "x" * 1000
        assert w.log == ([] if how == "split" else [("tick",)])
        assert not w.core.calls
    finally:
        w.close()


class _CountingPoller:
    def __init__(self, ready_after: int) -> None:
        self.polls = 0
        self.ready_after = ready_after

    def poll(self, timeout: float | None = None) -> list[tuple[int, int]]:
        assert timeout == 0, "a spin never sleeps"
        self.polls += 1
        return [(3, 1)] if self.polls > self.ready_after else []


def test_a_lone_call_waits_awake_for_a_moment_before_it_sleeps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    from types import SimpleNamespace

    poller = _CountingPoller(ready_after=3)
    assert rpc._spin(poller, SimpleNamespace(spin_skip=0, spin_backoff=1)) is True  # type: ignore[arg-type]
    assert poller.polls == 4
    never = _CountingPoller(ready_after=10**9)
    assert rpc._spin(never, SimpleNamespace(spin_skip=0, spin_backoff=1)) is False, \
        "the spin is bounded in time"  # type: ignore[arg-type]
    assert never.polls >= 1


def test_a_lone_call_on_one_cpu_sleeps_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # Spinning there would keep the worker that is to answer off the CPU.
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    from types import SimpleNamespace

    poller = _CountingPoller(ready_after=0)
    core = SimpleNamespace(spin_skip=0, spin_backoff=1)
    assert rpc._spin(poller, core) is False  # type: ignore[arg-type]
    assert poller.polls == 0
    assert core.spin_backoff == 1  # not a miss: no backing off
    # Asked again only after _ONE_CPU_WAITS waits (a system call each time,
    # in every wait, before), and it spins again once it may.
    asked: list[int] = []
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: asked.append(pid) or {0}, raising=False)
    for _ in range(2 * rpc._ONE_CPU_WAITS):
        assert rpc._spin(poller, core) is False  # type: ignore[arg-type]
    assert len(asked) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    for _ in range(rpc._ONE_CPU_WAITS):
        rpc._spin(poller, core)  # type: ignore[arg-type]
    assert poller.polls > 0


class _PollCounter:
    """A core's poller, counting its polls."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.polls = 0

    def poll(self, *timeout: float) -> Any:
        self.polls += 1
        return self.real.poll(*timeout)

    def modify(self, fd: int, events: int) -> None:
        self.real.modify(fd, events)


def test_a_lone_calls_wait_for_its_reply_is_one_receive(monkeypatch: pytest.MonkeyPatch) -> None:
    # Speed: the wait was a poll, then a receive: a system call more per
    # round trip, where it doesn't spin (one CPU).
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    with rpc.run(anyfork.new(), "operator:pos") as client:
        assert client(0) == 0  # (the first reads the worker's HELLO too)
        core = client._core
        assert core.blocking and core.sock.getblocking()
        counter = core.poller = _PollCounter(core.poller)
        assert [client(i) for i in range(50)] == list(range(50))
        assert counter.polls == 0
        assert [f.result(10) for f in [client.submit(i) for i in range(20)]] == list(range(20))


def test_without_msg_dontwait_the_socket_stays_non_blocking_and_calls_work(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Where the platform has no MSG_DONTWAIT, the caller's socket is
    # non-blocking and a lone call polls before it receives, as before.
    monkeypatch.setattr(rpc, "DONTWAIT", 0)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    with rpc.run(anyfork.new(), "builtins:len") as client:
        assert client(b"") == 0
        core = client._core
        assert not core.blocking and not core.sock.getblocking()
        counter = core.poller = _PollCounter(core.poller)
        assert [client(b"x" * i) for i in range(20)] == list(range(20))
        assert counter.polls >= 20
        assert [f.result(10) for f in [client.submit(b"y" * i) for i in range(20)]] == list(range(20))
        assert client(b"x" * (8 << 20)) == 8 << 20  # larger than the socket takes: written in parts


def test_a_call_in_flight_keeps_its_dropped_client_until_it_is_done() -> None:
    # rpc.run(...).submit(x).result() gets its result; the client (and its
    # worker) may go once the future is done, held or not.
    import gc
    import weakref

    client = rpc.run(anyfork.new(), "time:sleep")
    ref = weakref.ref(client)
    fut = client.submit(0.2)
    del client
    gc.collect()
    assert ref() is not None, "the client went with a call in flight"
    assert fut.result(timeout=TIMEOUT) is None
    gc.collect()
    assert ref() is None, "a done future keeps its client"


def test_a_call_held_back_while_a_lone_reply_is_read_is_written_by_that_reader() -> None:
    # A worker that runs a call at a time gets the next small call only once
    # a reply came (it is held back meanwhile), and whoever reads that reply
    # writes it.  Here another caller submits while the reader is in its one
    # receive of the lone reply (as a pool's callback does from rpc's reader).
    import pickle

    from anyfork import _backend
    from anyfork import _rpc_wire as W

    ours, theirs = socket.socketpair()
    core = rpc._Core(_FakeWorker.Process(), ours, W.serializer("pickle"), 8, None)  # type: ignore[arg-type]
    theirs.sendall(W.hello(b"\0"))  # (a worker that runs one call at a time)
    _backend.run_blocking(core.op_progress(lambda: core.hello))
    client = rpc.Client(core)
    core.armed = True  # (rpc's shared reader stays away: this thread is the only one to read)
    theirs.settimeout(5)

    def read_call() -> tuple[int, object]:
        length, call_id, kind, _ = W.HEADER.unpack(theirs.recv(W.HSIZE, socket.MSG_WAITALL))
        assert kind == W.CALL
        return call_id, pickle.loads(theirs.recv(length, socket.MSG_WAITALL))

    try:
        first = client.submit(1)
        first_id, _ = read_call()
        reply = pickle.dumps(10)
        theirs.sendall(W.header(W.RESULT, first_id, len(reply)) + reply)
        real = core.sock
        second: list[object] = []

        class Receiving:
            def __getattr__(self, name: str) -> object:
                return getattr(real, name)

            def recvmsg_into(self, *args: object) -> object:
                if not second:
                    second.append(client.submit(2))  # held: the first is still out
                return real.recvmsg_into(*args)  # type: ignore[union-attr]

        core.sock = Receiving()  # type: ignore[assignment]
        assert first.result() == 10
        assert second, "the reply was not read through the lone call's receive"
        assert read_call()[1] == (2,), "the held call was never written"
    finally:
        core.sock = real
        core.dispose()
        theirs.close()
