"""Call functions in a process and get results, errors and events back.

AnyEvent::Fork::RPC, in Python::

    client = anyfork.rpc.run(anyfork.new(), "mymod:handler")
    client(1, 2)                      # the handler's result, or its exception
    future = client.submit(3, 4)      # many in flight at once
    client.close(); client.wait()     # the worker finishes, exits 0

Theory of operation
-------------------
A call is a small record (id, done, value or error, and for ``submit`` a
future) in ``_Core.calls`` from the moment its frame is queued until its
reply is read.  All socket I/O is written once, as ``_backend`` operations
(generators that yield ``Wait``), and run by ``run_blocking`` for
``Client`` and by ``run_async`` for ``AsyncClient``: neither has a loop of
its own.

Reading is a role, not a thread (leader/follower).  Whoever needs a reply
and finds nobody reading becomes the *leader*: it reads, completes every
call whose reply comes (its own and other threads'), and wakes the others
through a ``Notifier``.  The others wait on that notifier, except that a
thread whose frame is not yet fully written waits for the socket to become
writable and writes it itself: writes are short, non-blocking and under
the lock, so anyone may make them, and the leader is always reading while
they do, so a full socket in both directions cannot deadlock.

Futures that nobody waits on in ``result()`` (callbacks, ``as_completed``)
are read for by one shared reader thread, ``_Reactor``, started on first
use: it takes the leader role when it is free and the socket is readable,
and steps back when another thread holds it (which re-arms it on leaving).

Death is EOF: the leader that reads it collects the exit status (waiting up
to a second for it) and fails every call in flight with WorkerDiedError.
"""

from __future__ import annotations

import os
import pickle
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

from . import _backend
from . import _rpc_wire as W
from ._backend import Notifier, Op, Wait, deadline_after, run_blocking, time_left
from ._errors import Error, ProcessStateError, ProtocolError, TimeoutExpired
from ._rpc_io import _ANC, _CTRUNC, _RECV_FLAGS, DONTWAIT, recv, send
from ._rpc_io import _RECV as _FULL
from ._rpc_io import feed as _feed
from ._rpc_worker import event

if TYPE_CHECKING:
    import asyncio
    import concurrent.futures
    import socket
    from collections.abc import AsyncIterator, Callable
    from types import TracebackType

    from ._process import Process

__all__ = ("AsyncClient", "Client", "RemoteError", "RemoteTraceback", "event", "run", "run_async")

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
def _boot(*names: str) -> str:
    """Code for ``eval`` that imports ``names`` (modules of anyfork's that
    import only the standard library) without the rest of the library, as
    the serve loop itself is imported, unless the process has anyfork
    already (a fork of a template that loaded it).

    Locally they come from this package's directory.  On a remote host that
    directory is the caller's, not the host's (or, worse, a different
    anyfork's): a process there that forwards modules from the caller
    (``_importer``) gets them through it instead, the same sources as the
    caller's."""
    lines = [
        "import sys",
        "imp = sys.modules.get('_anyfork_remote._importer')",
        "forwarded = imp is not None and any(isinstance(f, imp.Finder) for f in sys.meta_path)",
        f"path = [imp.MARK] if forwarded else [{_PKG_DIR!r}]",
        f"for name in {names!r}:",
        "    if name in sys.modules:",
        "        continue",
        "    if 'anyfork' in sys.modules:",
        "        __import__(name)",
        "        continue",
        "    m = type(sys)('anyfork'); m.__path__ = path",
        "    sys.modules['anyfork'] = m",
        "    try:",
        "        __import__(name)",
        "    finally:",
        "        del sys.modules['anyfork']",
    ]
    code = "\n".join(lines) + "\n"
    return f"exec(compile({code!r}, '<anyfork.rpc>', 'exec'), {{}})"


_BOOT = _boot("anyfork._rpc_worker")
#: What a worker imports of anyfork (a remote host's fetch them from the caller).
WORKER_MODULES = ("anyfork._rpc_worker", "anyfork._rpc_wire", "anyfork._rpc_io", "anyfork._errors")

_WORKER = "anyfork._rpc_worker:serve"
_HEADER = W.HEADER.pack
_CALL = W.CALL
_UNPACK_HEADER = W.HEADER.unpack_from
_HSIZE = W.HSIZE
_HOLD_MAX = 1 << 16  # a call this small may wait for the batch (see _Core._begin)
# A batch held back is written once it is this big, reply or not (see
# _Core._begin).  Writing only when a reply came left the worker idle while
# the caller queued the next batch: pipelined tiny calls went from about 40%
# of the bench's limit row to 50-70%.  About ten tiny calls: one write, and
# one wake-up of the worker, for each ten.  Not for a pool's workers
# (hold_batch=_NO_BATCH): the pool sends each a burst sized by its own
# pipeline, and its caller, the pool's bottleneck, then pays one write a
# burst (split, the Executor's map and submit lost 10-20%).
_HOLD_BATCH = 256
# A full window (max_in_flight unanswered) waits until half of it is
# answered, then the next batch goes; for a worker on a remote host, once a
# quarter is (_Core.refill).  There a batch's round trip is long (ssh, sshd
# and the hub, both ways), and the window left half empty meanwhile held
# pipelined calls to about execnet's channel rate (0.98x, median of twelve,
# interleaved), 1.09x with a quarter.  Locally, half: smaller batches there
# mean more wake-ups of the worker for the same calls.
_REMOTE_REFILL = 3 / 4
_NO_BATCH = 1 << 62
_EXIT_GRACE = 1.0
_STEP_ASIDE = 0.001  # the reactor leaves a socket alone this long after another reader
_READ_EVERY = 0.001  # a thread that keeps submitting reads this often (see read_now)
_DROP, _DEFER, _REARM = 0, 1, 2
_OK, _BROKEN, _EOF = 0, 1, 2  # how long a worker whose socket ended has to show its exit status
_POLLIN, _POLLOUT = 1, 4  # the POSIX values


class RemoteTraceback(Exception):  # noqa: N818 - named like concurrent.futures'
    """The worker's formatted traceback, as the ``__cause__`` of the error a
    call raises."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


class RetiredError(Error):
    """The worker retired (``anyfork.pool.retire()``) before it ran this
    call: nothing of it ran, so it may be sent to another worker."""

    def __init__(self, pid: int, last: int) -> None:
        super().__init__(f"worker process {pid} retired before it ran this call")
        self.pid = pid
        self.last = last


class RemoteError(Error):
    """The handler raised an exception that the serializer can't carry (any
    error, with "json" or "bytes"), or that would not unpickle here.

    Attributes:
        type_name: the exception's qualified type name in the worker.
        message: ``str()`` of it.
        traceback: the worker's formatted traceback.
    """

    def __init__(self, type_name: str, message: str, traceback: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.traceback = traceback

    def __reduce__(self) -> tuple[object, ...]:
        return type(self), (self.type_name, self.message, self.traceback)


def _name(func: object, what: str) -> str:
    if isinstance(func, str):
        mod, _, attrs = func.partition(":")
        parts = mod.split(".") + (attrs.split(".") if attrs else [])
        if not all(p.isidentifier() for p in parts):
            raise ValueError(f"not a function name anyfork can look up: {func!r}")
        return func
    if not callable(func):
        raise TypeError(f"{what} takes a function or its name, not {type(func).__name__}")
    module = getattr(func, "__module__", None)
    qualname = getattr(func, "__qualname__", None)
    if not module or not qualname or "<" in qualname:
        raise TypeError(f"{func!r} has no importable name (a lambda, closure or local function?); "
                        "pass a module-level function or its 'module:name'")
    return f"{module}:{qualname}"


def _exception(payload: bytes, codec: W._Codec) -> BaseException:
    """The exception an ERROR frame describes."""
    type_name, message, tb, pickled = W.decode_error(payload)
    if pickled and codec.carries_fds:
        try:
            exc = codec.loads(pickled, [])  # restricted for a remote host's (see _results)
        except Exception:
            exc = None
        if isinstance(exc, BaseException):
            exc.__cause__ = RemoteTraceback(tb)
            return exc
    err = RemoteError(type_name, message, tb)
    err.__cause__ = RemoteTraceback(tb)
    return err


def _encode(codec: W._Codec, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[bytes, list[int]]:
    """A call's payload and the descriptors it carries: the codec's quick
    path when it has one for these arguments, else ``dumps_call``."""
    if not kwargs:
        one = codec.quick_one
        if one is not None and len(args) == 1:
            try:
                return one(args[0]), []
            except TypeError:
                pass
        quick = codec.quick_args
        if quick is not None:
            try:
                return quick(args), []
            except Exception:
                pass  # dumps_call, next, carries the descriptors or says what is wrong
    payload, fds = codec.dumps_call(args, kwargs)
    if len(fds) > W.MAX_FDS:
        W.close_fds(fds)
        raise ValueError(f"a call carries at most {W.MAX_FDS} descriptors")
    return payload, fds


def _settle(plain: list[tuple[Any, Any, BaseException | None]]) -> None:
    """Settle ``plain``'s futures (nobody's callback among them), in one go, and empty it."""
    from ._futures import settle_all

    settle_all(plain)
    plain.clear()


def _spin(poller: Any, core: _Core) -> bool:
    """Poll without sleeping for up to ``_SPIN`` seconds; whether something
    came.  A tiny call's reply usually comes within tens of microseconds,
    and a thread that went to sleep in ``poll()`` takes about as long again
    to be woken (an idle CPU's wake-up, on a VM a hypervisor exit): waiting
    awake first roughly halves a round trip.

    Not where it can't pay: when this process may use one CPU only (it
    would keep the worker that is to answer off it), for a remote worker
    (its replies come through this process's relay thread, which a
    spinning thread keeps from the GIL), and, backing off, while spins keep
    missing (a handler slower than a spin: the CPU is the workers')."""
    if core.spin_skip:
        core.spin_skip -= 1
        return False
    affinity = getattr(os, "sched_getaffinity", None)  # (Linux; elsewhere, the machine's CPUs)
    if (len(affinity(0)) if affinity is not None else os.cpu_count() or 1) < 2:
        # Asked again after _ONE_CPU_WAITS waits (a thread may be pinned to a
        # CPU, or let go, at any time), not at each: a system call a wait.
        core.spin_skip = _ONE_CPU_WAITS
        return False
    end = time.perf_counter() + _SPIN
    while time.perf_counter() < end:
        if poller.poll(0):
            core.spin_backoff = 1
            return True
    core.spin_skip = core.spin_backoff
    core.spin_backoff = min(core.spin_backoff * 2, _SPIN_BACKOFF_MAX)
    return False


_SPIN = 100e-6
_ONE_CPU_WAITS = 64
_SPIN_BACKOFF_MAX = 1024  # calls without a spin, at most, after spins that missed
_NEVER = 1 << 62


def _spins(proc: Process) -> bool:
    """Whether waiting for ``proc``'s replies may spin at all (see ``_spin``)."""
    from ._process import host_of

    return host_of(proc) is None


def _writer(proc: Process, sock: socket.socket) -> Any:
    """What ``proc``'s calls are written with: ``sock``, or for a process a
    remote host's hub runs, the connection's writer (see _connection.Writer)."""
    from ._process import host_of

    if host_of(proc) is None:
        return sock
    from .remote import _writer as remote_writer

    return remote_writer(proc, sock)


class _Call:
    """A call in flight: made in ``_Core._begin``, without an ``__init__``
    (a Python frame per call), every field set there."""

    __slots__ = ("done", "error", "future", "id", "value")
    id: int
    future: concurrent.futures.Future[Any] | None
    done: bool
    value: Any
    error: BaseException | None


_new_call = object.__new__


class _Core:
    """One worker's calls and socket, shared by the blocking and async clients."""

    def __init__(self, proc: Process, sock: socket.socket, codec: W._Codec, max_in_flight: int,
                 on_event: Callable[..., Any] | None, *, hold_batch: int = _HOLD_BATCH) -> None:
        from ._process import host_of

        self.proc = proc
        self.hold_batch = hold_batch  # see _begin
        self.pid = proc.pid
        self.sock: socket.socket | None = sock
        self.fd = sock.fileno()
        # What calls are written with: the socket, or for a process on a
        # remote host, straight into the connection (see _connection.Writer).
        self.wsock: Any = _writer(proc, sock)
        # For a remote process: waits for a reply reading the connection
        # itself (see _connection.Writer.wait), or None.
        self.wait_direct: Callable[[int], bool | bytes] | None = getattr(self.wsock, "wait", None)
        # A local worker's socket blocks, and every operation on it but one
        # says DONTWAIT: the one is a lone call's wait for its reply, which
        # is then a receive, not a poll and a receive (see _lead_alone).
        self.blocking = bool(DONTWAIT) and self.wait_direct is None
        sock.setblocking(self.blocking)
        self.codec = codec
        self.max = max_in_flight
        # A full window waits until no more than this many are in flight (see op_begin).
        self.refill = (int(max_in_flight * _REMOTE_REFILL) if host_of(proc) is not None
                       else max_in_flight // 2)
        self.on_event = on_event
        self.lock = threading.Lock()
        self.changed = Notifier()
        self.decoder = W.Decoder(W.FROM_WORKER)
        self.outbox = W.Outbox()
        self.scratch = bytearray(_FULL)  # the leader's receive buffer
        self.scratch_view = memoryview(self.scratch)
        self.added = 0  # bytes queued, ever; and bytes written
        self.written = 0
        self.calls: dict[int, _Call] = {}
        self.next_id = 1
        self.leader = False
        self.error: BaseException | None = None  # set once: no more calls
        self.closed = False
        self.eof = False
        self.hello = False
        self.sequential = False  # the worker runs a call at a time (its HELLO says)
        self.unwaited = 0  # submit() futures in flight: the reactor reads for them
        self.armed = False  # the reactor reads for this core's futures
        self.active = 0.0  # when a leader last stopped reading, or a call was queued
        self.read_at = 0.0  # when a leader last read
        self.registered = False  # the reactor knows the descriptor
        self.event_errors: dict[int, BaseException] = {}
        self.write_failed = False  # a write found the worker gone
        self.on_end: Callable[[], None] | None = None  # the async client's end of events()
        self.poller: Any = None  # call_alone's, registered for fd
        self.spin_skip = 0 if _spins(proc) else _NEVER  # waits left that don't spin (see _spin)
        self.spin_backoff = 1

    # --- under the lock ------------------------------------------------------------------

    def _queue(self, data: bytes, fds: list[int] | None = None) -> int:
        self.added += len(data)
        if not self.outbox.size and not fds and self.sock is not None:
            # The common case, without the outbox's bookkeeping.
            try:
                n = self.wsock.send(data, DONTWAIT)
            except BlockingIOError:
                n = 0
            except OSError:
                self.written = self.added  # gone: its EOF, read next, says how
                self.write_failed = True
                return self.added
            self.written += n
            if n == len(data):
                return self.added
            data = data[n:]
        self.outbox.add(data, fds)
        self._flush()
        return self.added

    def _flush(self) -> None:
        sock = self.wsock if self.sock is not None else None
        try:
            while self.outbox.size and sock is not None:
                before = self.outbox.size
                send(sock, self.outbox, DONTWAIT)
                self.written += before - self.outbox.size
        except BlockingIOError:
            pass
        except OSError:
            # The worker is gone; its EOF, read next, says how.  Nothing more
            # will be written.
            self.written = self.added
            self.write_failed = True
            self.outbox.discard()

    def _check(self) -> None:
        if self.error is not None:
            raise self.error
        if self.closed:
            raise ProcessStateError("this rpc client is closed")

    def _begin(self, payload: bytes, fds: list[int],
               future: concurrent.futures.Future[Any] | None) -> tuple[_Call, int] | None:
        """Register and queue a call if fewer than max_in_flight are; the
        call and the byte count at which it is written (0: held back)."""
        if self.error is not None or self.closed:
            self._check()
        calls = self.calls
        if len(calls) >= self.max:
            return None
        size = len(payload)
        if size > W.MAX_PAYLOAD:
            raise ValueError(f"an rpc message is limited to 4 GiB; this one is {size} bytes")
        self.active = time.monotonic()  # the reactor stays out of a busy client's way
        call_id = self.next_id
        self.next_id = call_id % 0xFFFFFFFF + 1
        call = _new_call(_Call)
        call.id = call_id
        call.future = future
        call.done = False
        call.value = call.error = None
        if future is not None:
            future._anyfork_id = call_id  # type: ignore[attr-defined]  # (for the pool: see _fail)
            self.unwaited += 1
        # A worker that runs one call at a time can't start this one before the
        # calls in flight are done: hold a small one back until a reply comes
        # (whoever reads it writes the batch; see _rpc_wire), or until the
        # batch is _HOLD_BATCH bytes (then it goes with this one, and the
        # worker has work while the caller queues more).  A call in flight
        # is written, or itself held behind one that is, so a reply will come.
        hold = (self.sequential and bool(calls) and size < _HOLD_MAX and not fds
                and self.outbox.size < self.hold_batch)
        calls[call_id] = call
        data = _HEADER(size, call_id, _CALL, len(fds)) + payload
        if hold:
            self.added += len(data)  # (_queue's, for a call held back)
            self.outbox.add(data, fds)
            mark = 0
        else:
            mark = self._queue(data, fds)
        if self.write_failed:
            # The worker was gone before any of this call reached it: it fails
            # here, at once, and a pool knows it may send it elsewhere.
            self.calls.pop(call_id, None)
            if future is not None:
                self.unwaited -= 1
            from ._errors import WorkerDiedError

            try:
                returncode = self.proc._poll()
            except Error:
                returncode = None
            raise WorkerDiedError(self.pid, returncode)
        return call, mark

    # --- operations -----------------------------------------------------------------------

    def op_begin(self, payload: bytes, fds: list[int],
                 future: concurrent.futures.Future[Any] | None) -> Op[_Call]:
        """Queue a call once fewer than max_in_flight are, and write it."""
        try:
            while True:
                with self.lock:
                    got = self._begin(payload, fds, future)
                if got is not None:
                    fds = []
                    break
                # Full: read until half are answered (a quarter, for a remote
                # worker: see _REMOTE_REFILL), not just one, so that the
                # next calls go out as a batch, not one by one (each write
                # wakes the worker: one per batch, not per call).
                yield from self.op_progress(lambda: len(self.calls) <= self.refill)
        finally:
            W.close_fds(fds)
        call, mark = got
        if self.written < mark:
            yield from self.op_progress(lambda: self.written >= mark)
        return call

    def call_alone(self, payload: bytes) -> _Call | None:
        """``op_call`` without an operation's machinery, for the common case
        of a call on a client nobody else is using (None if someone is: then
        nothing was done).  One lock to begin, one send, then poll and
        receive until the reply; about half the Python calls of a round trip.
        Other threads that come meanwhile find a leader, as with op_call."""
        with self.lock:
            if self.leader or self.calls or self.outbox.size or self.sock is None:
                return None
            got = self._begin(payload, [], None)  # raises if broken or closed
            assert got is not None  # nothing in flight: below max_in_flight
            self.leader = True
        call = got[0]
        self._lead_alone(call, False)
        return call

    def drive_alone(self, future: concurrent.futures.Future[Any]) -> bool:
        """A future's ``result()`` without an operation's machinery, when its
        call is the only one in flight and nobody is reading: as
        ``call_alone`` after the send (False if that is not so: then nothing
        was done).  A pool's ``submit(...).result()`` is this case."""
        with self.lock:
            if self.leader or len(self.calls) != 1 or self.outbox.size or self.sock is None:
                return False
            call = next(iter(self.calls.values()))
            if call.future is not future:
                return False
            self.leader = True
        self._lead_alone(call, True)
        return True

    def _lead_alone(self, call: _Call, ready: bool) -> None:
        """(as leader) Poll and receive until ``call`` is complete or the
        client breaks, then resign.  ``ready``: the reply may be there
        already (the call was written a while ago), so receive first."""
        try:
            poller = self.poller
            if poller is None:
                import select

                poller = self.poller = select.poll()
                poller.register(self.fd, _POLLIN)
            events = _POLLIN
            while True:
                if ready:
                    ready = False
                    got = self._reply_now(call)
                    if got:
                        break
                    if got is None and not call.done:
                        continue  # nothing had come: poll, then receive
                else:
                    # The reply can't be there yet: poll first, not a receive that fails.
                    want = _POLLIN | _POLLOUT if self.outbox.size else _POLLIN
                    if want != events:
                        poller.modify(self.fd, want)
                        events = want
                    if _spin(poller, self):  # (which polls at once, if it spins)
                        got = self._reply_now(call)
                    elif self.blocking and events == _POLLIN and self._quick_reply():
                        got = self._reply_now(call, True)  # the wait is the receive
                    else:
                        wait = self.wait_direct
                        given = False if wait is None or events != _POLLIN else wait(self.fd)
                        if given is False:
                            poller.poll()
                        got = self._reply_now(call) if given is True or given is False else (
                            self._reply_given(call, given))
                    if got:
                        break
                state = self._pump_now()
                if state == _EOF:
                    run_blocking(self._op_eof())
                if state != _OK or call.done:
                    break
            if events != _POLLIN:
                poller.modify(self.fd, _POLLIN)
        finally:
            self._resign()

    def _quick_reply(self) -> bool:
        """Whether ``_reply_now`` would receive (else it returns False at once)."""
        return (self.sock is not None and self.hello and not self.event_errors and not self.outbox.size
                and not self.decoder.holding())

    def _reply_now(self, call: _Call, block: bool = False) -> bool | None:
        """``_lead_alone``'s receive; True once ``call`` is complete, None
        when nothing had come (the receive would block; ``block``: it
        waits for something to come, on a blocking socket; the caller
        has checked ``_quick_reply``).  When
        what came is exactly its reply, that is taken as it is.  Anything
        else (an event first, part of a frame, descriptors, EOF, a receive
        that would block) is given to the decoder and dispatched as
        ``_pump_now`` would: the general path goes on from there, with
        nothing read twice or lost.
        A tiny round trip spends most of its caller-side time in the
        general path's layers; this is one receive and one header check."""
        decoder = self.decoder
        sock = self.sock
        if sock is None or not (block or self._quick_reply()):  # (block: the caller asked)
            return False
        self.read_at = time.monotonic()
        scratch = self.scratch
        flags = _RECV_FLAGS if block else _RECV_FLAGS | DONTWAIT
        try:
            n, anc, flags, _ = sock.recvmsg_into([scratch], _ANC, flags)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            decoder.eof = True  # as _pump_now has it: its next turn finds EOF
            return False
        return self._reply_read(call, n, anc, flags)

    def _reply_given(self, call: _Call, data: bytes) -> bool:
        """``_reply_now`` for bytes read for it (a remote process's reply,
        taken off the connection by ``_connection.Writer.wait``), as if
        received from the socket."""
        self.read_at = time.monotonic()
        n = len(data)
        if n > len(self.scratch) or not self._quick_reply():
            self.decoder.feed(data, [])
            return self._decoded(call)
        self.scratch_view[:n] = data
        return self._reply_read(call, n, [], 0)

    def _reply_read(self, call: _Call, n: int, anc: list[tuple[int, int, bytes]], flags: int) -> bool:
        """``_reply_now`` once ``n`` bytes are in the scratch buffer."""
        decoder = self.decoder
        scratch = self.scratch
        if n > _HSIZE and not anc and not flags & _CTRUNC:
            length, call_id, kind, nfds = _UNPACK_HEADER(scratch)
            if kind == W.RESULT and call_id == call.id and not nfds and n == _HSIZE + length:
                payload = self.scratch_view[_HSIZE:n].tobytes()
                with self.lock:
                    self.calls.pop(call_id, None)
                    if call.future is not None:
                        self.unwaited -= 1
                    if self.outbox.size:
                        # Calls held back while this one was out (another
                        # thread's, meanwhile): whoever reads the reply writes them.
                        self._flush()
                value = error = None
                codec = self.codec
                tag = codec.bytes_tag
                if tag is not None and payload[:1] == tag:
                    value = payload[1:]  # (see _dispatch)
                else:
                    try:
                        quick = codec.quick_loads
                        value = quick(payload) if quick is not None else codec.loads(payload, [])
                    except Exception as e:
                        error = e
                self._complete(call, value, error)  # (_lead_alone's _resign notifies, next)
                return True
        try:
            _feed(decoder, scratch, n, anc, flags)
        except ProtocolError as e:
            return self._broke(e)
        return self._decoded(call)

    def _decoded(self, call: _Call) -> bool:
        """Dispatch what the decoder holds whole; whether ``call`` is complete
        (its reply may have come behind an event)."""
        try:
            frames = self.decoder.frames()
        except ProtocolError as e:
            return self._broke(e)
        if frames:
            self._dispatch(frames)
        return call.done

    def _broke(self, e: ProtocolError) -> bool:
        self._fail(ProtocolError(f"worker process {self.pid} broke the rpc protocol: {e}"))
        self._kill()
        return False

    def op_call(self, payload: bytes, fds: list[int]) -> Op[Any]:
        got = None
        if not fds:
            with self.lock:
                got = self._begin(payload, fds, None)
        if got is None:
            call = yield from self.op_begin(payload, fds, None)
        else:
            call, mark = got
            if self.written < mark:
                yield from self.op_progress(lambda: self.written >= mark)
        if not call.done:
            yield from self.op_progress(lambda: call.done)
        if call.error is not None:
            raise call.error
        return call.value

    def op_progress(self, done: Callable[[], bool], deadline: float | None = None) -> Op[bool]:
        """Drive the socket until ``done()`` or the client breaks (True), or
        until ``deadline`` (False)."""
        fd = self.fd
        while True:
            epoch = self.changed.epoch
            with self.lock:
                if done() or self.error is not None:
                    return True
                lead = not self.leader
                if lead:
                    self.leader = True
                writing = bool(self.outbox)
            if deadline is not None and time.monotonic() >= deadline:
                if lead:
                    self._resign()
                return False
            if not lead:
                # The leader reads; write what is ours, and wake for its news.
                yield Wait(writes=(fd,) if writing else (), notifier=self.changed, epoch=epoch,
                           deadline=deadline)
                if writing:
                    with self.lock:
                        self._flush()
                continue
            try:
                while True:
                    state = self._pump_now()
                    if state != _OK:
                        if state == _EOF:
                            yield from self._op_eof()
                        return True
                    with self.lock:
                        if done() or self.error is not None:
                            return True
                        writes = (fd,) if self.outbox.size else ()
                    if deadline is not None and time.monotonic() >= deadline:
                        return False
                    yield Wait(reads=(fd,), writes=writes, deadline=deadline)
            finally:
                self._resign()

    def _resign(self) -> None:
        with self.lock:
            self.leader = False
            self.active = time.monotonic()
        self.changed.notify()

    def _pump(self) -> Op[bool]:
        """As leader: write what is queued, read what has come, complete what
        it answers, write what was held back.  True once the client is
        broken (EOF included)."""
        state = self._pump_now()
        if state == _EOF:
            yield from self._op_eof()
            return True
        return state == _BROKEN

    def _pump_now(self) -> int:
        """``_pump`` without waiting: _OK, _BROKEN, or _EOF (the caller
        collects the exit status)."""
        sock = self.sock
        if sock is None:
            return _BROKEN
        if self.outbox.size:
            with self.lock:
                self._flush()
        decoder = self.decoder
        self.read_at = time.monotonic()
        try:
            for _ in range(16):  # then let the writes in
                n = recv(sock, decoder, self.scratch, _RECV_FLAGS | DONTWAIT)
                frames = decoder.frames()
                if frames:
                    self._dispatch(frames)
                if decoder.eof or n < _FULL:
                    break  # drained: don't pay for a receive that would block
        except BlockingIOError:
            pass
        except ProtocolError as e:
            self._broke(e)
            return _BROKEN
        except OSError:
            decoder.eof = True
        if decoder.eof:
            return _EOF
        if self.outbox.size:
            with self.lock:
                self._flush()
        return _BROKEN if self.error is not None else _OK

    def _dispatch(self, frames: list[W.Frame]) -> None:
        done: list[tuple[_Call | None, W.Frame]] = []
        with self.lock:
            for f in frames:
                kind = f.kind
                if kind in (W.RESULT, W.ERROR):
                    call = self.calls.pop(f.id, None)
                    if call is None:
                        if kind == W.ERROR and f.id == 0:
                            done.append((None, f))  # the worker could not start
                            continue
                        W.close_fds(f.fds)
                        raise ProtocolError(f"a reply to call {f.id}, which is not in flight")
                    if call.future is not None:
                        self.unwaited -= 1
                    done.append((call, f))
                elif kind == W.EVENT or (kind == W.RETIRE and self.hello):
                    done.append((None, f))
                elif not self.hello:
                    # The decoder checked its magic and version.
                    self.hello = True
                    flags = W.hello_config(f)[:1]
                    self.sequential = not (flags and flags[0] & W.CONCURRENT)
                else:
                    raise ProtocolError(f"an unexpected {W.describe(kind)} frame")
        codec = self.codec
        quick = codec.quick_loads
        tag = codec.bytes_tag
        # Futures without a callback: settled together at the end, under one
        # lock for those nobody waits on (see _futures.settle_all).
        plain: list[tuple[Any, Any, BaseException | None]] = []
        try:
            for call, f in done:
                if call is None:
                    if plain:  # the replies before it first: what runs now may look at them
                        _settle(plain)
                    if f.kind == W.EVENT:
                        self._event(f)
                    elif f.kind == W.RETIRE:
                        self._fail(RetiredError(self.pid, f.id))
                    else:
                        self._fail(_exception(f.payload, codec))
                    continue
                error = self.event_errors.pop(call.id, None) if self.event_errors else None
                value = None
                if f.kind == W.RESULT:
                    payload = f.payload
                    if tag is not None and payload[:1] == tag and not f.fds:
                        value = payload[1:]  # (the codec's bytes value: see bytes_tag)
                    else:
                        try:
                            value = (quick(payload) if quick is not None and not f.fds
                                     else codec.loads(payload, f.fds))
                        except Exception as e:
                            error = error or e
                else:
                    error = error or _exception(f.payload, codec)
                fut: Any = call.future
                call.done = True
                if fut is None:
                    call.value, call.error = value, error
                elif fut._anyfork_then is None:
                    fut._anyfork_owner = None  # (as _anyfork_set)
                    plain.append((fut, value, error))
                else:
                    if plain:  # (as for an event: its callback runs now)
                        _settle(plain)
                    fut._anyfork_set(value, error)  # _complete, inline
        finally:
            if plain:
                _settle(plain)
        self.changed.notify()

    @staticmethod
    def _complete(call: _Call, value: Any, error: BaseException | None) -> None:
        fut = call.future
        call.done = True  # (for a future too: _lead_alone looks)
        if fut is None:
            call.value, call.error = value, error
        else:
            fut._anyfork_set(value, error)  # type: ignore[attr-defined]

    def _event(self, f: W.Frame) -> None:
        try:
            args, _ = self.codec.loads_call(f.payload, f.fds)
            if self.on_event is not None:
                self.on_event(*args)
        except Exception as e:
            # Nowhere to raise it but in the call that sent the event.
            self.event_errors[f.id] = e

    def _fail(self, error: BaseException) -> None:
        with self.lock:
            if self.error is None:
                self.error = error
            error = self.error
            calls = list(self.calls.values())
            if calls and getattr(error, "_anyfork_oldest", None) is None:
                # The call written first of those unanswered (the dict keeps
                # that order): the one a worker that runs a call at a time
                # was running.  The pool sends the others elsewhere.
                error._anyfork_oldest = calls[0].id  # type: ignore[attr-defined]
            self.calls.clear()
            self.unwaited = 0
            self.outbox.discard()
            self.written = self.added
        self.decoder.close()
        for call in calls:
            self._complete(call, None, error)
        self.changed.notify()
        if self.on_end is not None:
            self.on_end()

    def _op_eof(self) -> Op[None]:
        """The worker's socket ended: normal after close() with nothing in
        flight, death otherwise.  Collect the exit status for the error."""
        self.eof = True
        with self.lock:
            normal = self.closed and not self.calls
        if normal:
            self._fail(ProcessStateError("this rpc client is closed"))
            return
        deadline = time.monotonic() + _EXIT_GRACE
        returncode = None
        lost: Error | None = None
        while True:
            try:
                returncode = self.proc._poll()
            except Error as e:
                lost = e  # a remote host's connection ended: its status can't be known
                break
            if returncode is not None or time.monotonic() >= deadline:
                break
            yield Wait(deadline=min(deadline, time.monotonic() + 0.005))
        from ._errors import WorkerDiedError

        self._fail(WorkerDiedError(self.pid, returncode,
                                   f"worker process {self.pid} is out of reach: {lost}" if lost else ""))

    def op_exit(self, deadline: float | None) -> Op[int]:
        """Wait for the exit status, reading meanwhile (the worker may be
        writing replies nobody else reads)."""
        if not (yield from self.op_progress(lambda: self.eof, deadline)):
            raise TimeoutExpired(f"worker process {self.pid} still running")
        while True:
            try:
                returncode = self.proc._poll()
            except Error:
                self.dispose()  # its status is lost (a remote connection ended): so is the socket's use
                raise
            if returncode is not None:
                self.dispose()
                return returncode
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutExpired(f"worker process {self.pid} still running")
            left = time_left(deadline)
            yield Wait(deadline=time.monotonic() + (0.005 if left is None else min(left, 0.005)))

    def close(self) -> Op[None]:
        with self.lock:
            if self.closed or self.error is not None:
                self.closed = True
                return
            self.closed = True
            mark = self._queue(W.header(W.CLOSE, 0, 0))
        yield from self.op_progress(lambda: self.written >= mark)

    def _kill(self) -> None:
        try:
            self.proc.kill()
        except Error:
            pass

    # --- the reactor's side, and ownership of the socket ----------------------------------

    def arm(self) -> None:
        """Make the reactor responsible for reading while submit() futures
        are in flight (it steps aside while others read: see _Reactor).

        A caller may skip this when it sees ``armed`` set after its
        ``_begin`` counted its future: the reactor clears ``armed`` only
        under the lock and only when it sees no future, so it will see
        that one."""
        with self.lock:
            if self.armed or self.unwaited == 0 or self.error is not None or self.sock is None:
                return
            self.armed = self.registered = True
        _reactor().add(self)

    def read_now(self) -> None:
        """Read what has come, if nobody is reading: a thread that keeps
        submitting keeps the reactor away (see _Reactor), so it reads itself
        now and then, and futures complete while it goes on."""
        with self.lock:
            if self.leader or self.sock is None or self.error is not None:
                return
            self.leader = True
        try:
            run_blocking(self._pump())
        finally:
            self._resign()

    def reactor_turn(self) -> int:
        """The socket is readable: read, unless someone else reads or did a
        moment ago.  _DROP, _DEFER or _REARM: what the reactor does next."""
        with self.lock:
            if self.sock is None or self.unwaited == 0 or self.error is not None:
                self.armed = False
                return _DROP
            if self.leader or time.monotonic() - self.active < _STEP_ASIDE:
                return _DEFER
            self.leader = True
        try:
            run_blocking(self._pump())
        finally:
            with self.lock:
                self.leader = False
                keep = self.unwaited > 0 and self.error is None and self.sock is not None
                if not keep:
                    self.armed = False
            self.changed.notify()
        return _REARM if keep else _DROP

    def dispose(self) -> None:
        """Close the socket, after the reactor forgets its descriptor (its
        number may be reused as soon as it is closed)."""
        with self.lock:
            sock, self.sock = self.sock, None
            registered = self.registered
        if sock is None:
            return
        if registered and _the_reactor is not None:
            _the_reactor.forget(self)
        self.decoder.close()
        with self.lock:
            self.outbox.discard()
        sock.close()


class _Reactor:
    """One thread reading for every client's submit() futures that nobody
    waits on in ``result()`` (callbacks, ``as_completed``).

    It stays out of the way of threads that read for themselves: two Python
    threads taking turns at one socket pass the GIL back and forth, and each
    hand-off can cost a switch interval.  So when a core's socket becomes
    readable (epoll, one-shot) and someone is reading it or did within
    ``_STEP_ASIDE``, the reactor looks again that much later instead.
    """

    def __init__(self) -> None:
        import select

        self.cores: dict[int, _Core] = {}
        self.lock = threading.Lock()
        self.epoll: Any = select.epoll() if hasattr(select, "epoll") else None
        self.thread = threading.Thread(target=self._run, name="anyfork-rpc-reader", daemon=True)
        self.thread.start()

    def add(self, core: _Core) -> None:
        with self.lock:
            self.cores[core.fd] = core
        self._arm(core.fd)

    def _arm(self, fd: int) -> None:
        if self.epoll is None:
            return  # the poll loop sees it within its slice
        import select

        flags = select.EPOLLIN | select.EPOLLONESHOT
        try:
            self.epoll.modify(fd, flags)
        except FileNotFoundError:
            try:
                self.epoll.register(fd, flags)
            except FileExistsError:  # armed meanwhile by another thread
                pass
            except OSError:
                pass  # closed between the two calls (EBADF): its core is gone
        except OSError:
            pass  # closed meanwhile: its core is gone

    def forget(self, core: _Core) -> None:
        with self.lock:
            if self.cores.get(core.fd) is core:
                del self.cores[core.fd]
        if self.epoll is not None:
            try:
                self.epoll.unregister(core.fd)
            except (OSError, ValueError):
                pass

    def _run(self) -> None:
        import select

        deferred: list[tuple[float, int]] = []
        while True:
            timeout = None if not deferred else max(0.0, min(t for t, _ in deferred) - time.monotonic())
            if self.epoll is not None:
                ready = [fd for fd, _ in self.epoll.poll(-1 if timeout is None else timeout)]
            else:  # no epoll: poll the armed ones, in slices
                with self.lock:
                    armed = [fd for fd, core in self.cores.items()
                             if core.armed and fd not in {d for _, d in deferred}]
                poller = select.poll()
                for fd in armed:
                    poller.register(fd, select.POLLIN)
                ready = [fd for fd, _ in poller.poll(20 if timeout is None else min(20, timeout * 1000))]
            now = time.monotonic()
            for t, fd in [d for d in deferred if d[0] <= now]:
                deferred.remove((t, fd))
                self._arm(fd)
            for fd in ready:
                with self.lock:
                    core = self.cores.get(fd)
                if core is None:
                    continue
                try:
                    what = core.reactor_turn()
                except BaseException:  # a bug: don't take every client's reader down
                    what = _DROP
                if what == _REARM:
                    self._arm(fd)
                elif what == _DEFER:
                    deferred.append((now + _STEP_ASIDE, fd))
                # _DROP: left registered but disarmed (one-shot), so that
                # add() can arm it again without racing an unregister.


_the_reactor: _Reactor | None = None
_reactor_lock = threading.Lock()


def _reactor() -> _Reactor:
    global _the_reactor
    r = _the_reactor
    if r is None:
        with _reactor_lock:
            r = _the_reactor
            if r is None:
                r = _the_reactor = _Reactor()
    return r


def _forget_reactor() -> None:
    # A forked child has no reader thread; its parent's clients are not its own.
    global _the_reactor
    _the_reactor = None


os.register_at_fork(after_in_child=_forget_reactor)


class _Future:
    """Made lazily (concurrent.futures is imported on first submit)."""

    cls: Any = None

    @classmethod
    def make(cls, core: _Core, owner: object = None, then: Callable[[Any], object] | None = None,
             tag: object = None) -> Any:
        """A future of a call of ``core``'s about to be sent, RUNNING; without
        an ``__init__`` (the fields that differ from the class's defaults are
        set here: see Future)."""
        kind = cls.cls
        if kind is None:
            kind = cls.cls = _future_class()
        fut = kind.__new__(kind)
        fut._state = "RUNNING"
        fut._anyfork_core = core
        if owner is not None:
            fut._anyfork_owner = owner
        if then is not None:
            fut._anyfork_then = then
        if tag is not None:
            fut._anyfork_tag = tag
        return fut


def _future_class() -> type:
    from concurrent.futures import _base

    from ._futures import LazyFuture, wait_left

    finished = "FINISHED"

    class Future(LazyFuture):
        """A future without a ``Condition`` until somebody waits on it (see
        ``_futures``), whose ``result()`` reads the socket itself when
        nobody else is reading (so ``submit(...).result()`` costs no thread
        hand-off).  It is sent at once, so it can't be cancelled: RUNNING
        from the start, and set once (``settle``), by whoever reads its reply.
        """

        # Made by _Future.make without an __init__ (a Python frame per call):
        # it sets _state to RUNNING and _anyfork_core (the client's _Core),
        # and the rest when they are not these defaults.
        _anyfork_core: _Core
        _result: Any = None
        _exception: BaseException | None = None
        _anyfork_then: Callable[[Any], object] | None = None  # the callback set before the send
        _anyfork_tag: object = None  # the callback's
        _anyfork_owner: object = None  # the client, while the call is in flight

        def __init__(self) -> None:
            raise TypeError("rpc futures come from Client.submit()")

        def _anyfork_set(self, value: Any, error: BaseException | None) -> None:
            self._anyfork_owner = None
            self.settle(value, error)
            then = self._anyfork_then
            if then is not None:
                # Let go of the callback, and of its tag once it ran: the
                # pool's tag (its call) holds the pool's future, which holds
                # this one.
                self._anyfork_then = None
                try:
                    then(self)
                except Exception:
                    _base.LOGGER.exception("exception calling callback for %r", self)
                self._anyfork_tag = None

        def result(self, timeout: float | None = None) -> Any:
            if self._state != finished:
                end = None if timeout is None else time.monotonic() + timeout
                self._drive(timeout)
                timeout = wait_left(end)  # (one timeout for both waits)
            elif self._exception is None:
                return self._result  # (the base class's, a frame less)
            return super().result(timeout)

        def exception(self, timeout: float | None = None) -> BaseException | None:
            if self._state != finished:
                end = None if timeout is None else time.monotonic() + timeout
                self._drive(timeout)
                timeout = wait_left(end)
            return super().exception(timeout)

        def _drive(self, timeout: float | None) -> None:
            if threading.current_thread() is getattr(_the_reactor, "thread", None):
                return
            core = self._anyfork_core
            if timeout is None and core.drive_alone(self):
                return
            run_blocking(core.op_progress(self.done, deadline_after(timeout)))

    return Future


def _finalize(core: _Core) -> None:
    core.dispose()


class Client:
    """A worker process serving calls, driven from blocking code.

    Made by :func:`run`.  Safe to use from many threads at once.
    """

    def __init__(self, core: _Core) -> None:
        self._core = core
        self._finalizer = weakref.finalize(self, _finalize, core)

    def __repr__(self) -> str:
        return f"<anyfork.rpc.Client of worker {self._core.pid}>"

    @property
    def process(self) -> Process:
        """The worker's Process: its pid, kill(), wait() and returncode."""
        return self._core.proc

    @property
    def broken(self) -> BaseException | None:
        """Why the client takes no more calls (the worker died, could not
        start, retired, or the client was closed), or None while it does."""
        return self._core.error

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the handler with these arguments and return its result."""
        return self.call(*args, **kwargs)

    def call(self, *args: Any, **kwargs: Any) -> Any:
        """Call the handler with these arguments and return its result.

        Raises:
            Exception: what the handler raised (same type, ``__cause__`` a
                RemoteTraceback), or RemoteError when it can't be carried.
            anyfork.WorkerDiedError: the worker exited or was killed.
            anyfork.ProtocolError: the worker sent something that is not rpc.
            anyfork.ProcessStateError: the client is closed.
            TypeError, pickle.PicklingError: an argument can't be serialized;
                nothing was sent.
        """
        core = self._core
        payload, fds = _encode(core.codec, args, kwargs)
        call = core.call_alone(payload) if not fds else None
        if call is None:
            return run_blocking(core.op_call(payload, fds))
        if not call.done:  # never, unless the socket was disposed of meanwhile
            run_blocking(core.op_progress(lambda: call.done))
        if call.error is not None:
            raise call.error
        return call.value

    def submit(self, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        """Send a call; a Future of its result.  Blocks while max_in_flight
        calls are unanswered, and until the call is written."""
        return self._submit(args, kwargs, None)

    def _submit(self, args: tuple[Any, ...], kwargs: dict[str, Any],
                then: Callable[[Any], object] | None, tag: object = None) -> concurrent.futures.Future[Any]:
        """``submit``, with ``then(future)`` called once the future is done,
        in the thread that completes it: as ``add_done_callback``, but set
        before the call is sent, so without taking the future's condition.
        ``tag``: the future's ``_anyfork_tag``, for ``then`` (the pool's
        call: one callback per pool, not a partial per call)."""
        core = self._core
        payload, fds = _encode(core.codec, args, kwargs)
        # A call in flight keeps its client (and so its worker) alive, as a
        # running task keeps its executor: ``run(...).submit(x).result()``
        # gets its result.  Let go once done (``_anyfork_set``).
        fut = _Future.make(core, self, then, tag)
        got = None
        if not fds:
            with core.lock:  # the common case, without an operation's machinery
                got = core._begin(payload, fds, fut)
        if got is None or core.written < got[1]:
            if got is None:
                run_blocking(core.op_begin(payload, fds, fut))
            else:
                mark = got[1]
                run_blocking(core.op_progress(lambda: core.written >= mark))
        if not core.armed:  # read after _begin counted this future: see arm()
            core.arm()
        if core.active - core.read_at > _READ_EVERY:  # (active: _begin's time.monotonic())
            core.read_now()
        return fut  # type: ignore[no-any-return]

    def close(self) -> None:
        """No more calls: the worker finishes those it has, then exits 0."""
        run_blocking(self._core.close())

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the worker to exit; its exit status.

        Raises:
            anyfork.TimeoutExpired: still running after ``timeout`` seconds.
        """
        return run_blocking(self._core.op_exit(deadline_after(timeout)))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
        self.wait()


class AsyncClient:
    """A worker process serving calls, driven from asyncio.  Made by
    :func:`run_async`."""

    def __init__(self, core: _Core, queue_events: bool) -> None:
        self._core = core
        self._finalizer = weakref.finalize(self, _finalize, core)
        self._events: asyncio.Queue[tuple[Any, ...] | None] | None = None
        if queue_events:
            import asyncio

            queue: asyncio.Queue[tuple[Any, ...] | None] = asyncio.Queue()
            self._events = queue
            core.on_event = lambda *args: queue.put_nowait(args)
            core.on_end = lambda: queue.put_nowait(None)

    def __repr__(self) -> str:
        return f"<anyfork.rpc.AsyncClient of worker {self._core.pid}>"

    @property
    def process(self) -> Process:
        """The worker's Process: its pid, kill(), wait() and returncode."""
        return self._core.proc

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the handler; its result (errors as for ``Client.call``)."""
        return await self.call(*args, **kwargs)

    async def call(self, *args: Any, **kwargs: Any) -> Any:
        """Call the handler; its result (errors as for ``Client.call``)."""
        core = self._core
        payload, fds = _encode(core.codec, args, kwargs)
        return await _backend.run_async(core.op_call(payload, fds))

    async def events(self) -> AsyncIterator[tuple[Any, ...]]:
        """The events handlers send, as tuples of ``event()``'s arguments,
        until the client is closed (only when ``on_event`` was not given)."""
        queue = self._events
        if queue is None:
            raise ProcessStateError("this client delivers its events to on_event")
        while True:
            item = await queue.get()
            if item is None:
                queue.put_nowait(None)  # for any other iterator
                return
            yield item

    async def aclose(self) -> None:
        """No more calls: the worker finishes those it has and exits 0; wait for it."""
        await _backend.run_async(self._core.close())
        await self.wait()

    async def wait(self, timeout: float | None = None) -> int:
        """Wait for the worker to exit; its exit status.

        Raises:
            anyfork.TimeoutExpired: still running after ``timeout`` seconds.
        """
        return await _backend.run_async(self._core.op_exit(deadline_after(timeout)))

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()


def _prepare(proc: Process, func: object, serializer: object, init: object,
             max_in_flight: int, *, boot: str | None = None) -> tuple[W._Codec, bytes]:
    from ._process import host_of
    from ._results import codec_for

    codec = codec_for(W.serializer(serializer), host_of(proc))
    if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 1:
        raise ValueError(f"max_in_flight must be a positive int, not {max_in_flight!r}")
    names = [_name(func, "rpc.run()"), "" if init is None else _name(init, "init"),
             serializer if isinstance(serializer, str) else "custom", str(max_in_flight)]
    config = b"\0".join(n.encode() for n in names) + b"\0"
    if not isinstance(serializer, str):
        try:
            config += pickle.dumps(serializer, pickle.HIGHEST_PROTOCOL)
        except Exception as e:
            raise TypeError(f"a custom serializer must pickle (it is sent to the worker): {e}") from e
    if boot != "":  # "": its template ran the boot before it was forked (the pool's)
        proc.eval(_BOOT if boot is None else boot)
    return codec, W.hello(config)


def run(proc: Process, func: str | Callable[..., Any], *, serializer: str | object = "pickle",
        init: str | Callable[..., Any] | None = None, on_event: Callable[..., Any] | None = None,
        max_in_flight: int = 64) -> Client:
    """Run an rpc worker in ``proc``, serving calls to ``func``.

    Args:
        proc: an unrun Process (``new``, ``new_exec``, ``fork``, ``fork_template``).
        func: the handler, or its name as ``Process.run`` takes it.  A
            coroutine function is served by an asyncio loop, up to
            ``max_in_flight`` calls at once; a plain one, a call at a time.
        serializer: "pickle", "json", "bytes", "msgpack", "cbor2", or an
            object with ``dumps(obj) -> bytes`` and ``loads(bytes)``.
        init: called once in the worker before the first call, with what
            ``send_arg`` and ``send_fh`` queued.
        on_event: called as ``on_event(*args)`` for each ``event(*args)``.
        max_in_flight: how many calls may be written and unanswered.

    Returns:
        The client.  Set-up errors in the worker (a handler that can't be
        found, an init that raises) fail its calls.
    """
    return _run(proc, func, serializer, init, on_event, max_in_flight)


def _run(proc: Process, func: object, serializer: object, init: object,  # noqa: PLR0917 - private
         on_event: Callable[..., Any] | None, max_in_flight: int, boot: str | None = None,
         hold_batch: int = _HOLD_BATCH) -> Client:
    """``run``, for anyfork's own callers too (the pool boots its worker
    module with the rpc worker's: ``boot``; and sends its own bursts:
    ``hold_batch``, see _HOLD_BATCH)."""
    codec, hello = _prepare(proc, func, serializer, init, max_in_flight, boot=boot)
    sock = proc.run(_WORKER)
    core = _Core(proc, sock, codec, max_in_flight, on_event, hold_batch=hold_batch)
    with core.lock:
        core._queue(hello)
    client = Client(core)
    if core.outbox:
        run_blocking(core.op_progress(lambda: core.written >= core.added))
    return client


async def run_async(proc: Process, func: str | Callable[..., Any], *, serializer: str | object = "pickle",
                    init: str | Callable[..., Any] | None = None,
                    on_event: Callable[..., Any] | None = None, max_in_flight: int = 64) -> AsyncClient:
    """:func:`run` for asyncio.  Events go to ``on_event`` (called in the
    loop) if given, else to ``client.events()``."""
    codec, hello = _prepare(proc, func, serializer, init, max_in_flight)
    sock = await proc.run_async(_WORKER)
    core = _Core(proc, sock, codec, max_in_flight, on_event)
    with core.lock:
        core._queue(hello)
    client = AsyncClient(core, on_event is None)
    if core.outbox:
        await _backend.run_async(core.op_progress(lambda: core.written >= core.added))
    return client
