"""The caller's side of a template, sans-io: intents in, frames out; reports in, events out.

Theory of operation
-------------------
A template is a process the caller has forked from.  It reads commands on
its command socket and writes *reports* on its report channel: for each
``FORK`` the child's pid (``PID``) or why it could not fork (``FAILED``);
for each ``SPAWN`` (a fork *ahead*) the process and the caller's end of its
socket (``SPARE``); later, for each of them, its exit status (``EXIT``), or
``LOST`` if code run in the template collected it first.

:class:`TemplateState` is everything the caller knows about one template,
and nothing else: no socket, no lock, no waiting.  The driver tells it what
the caller wants and sends the frames it returns::

    child, frame = state.fork(new_channel)   # attach the child's socket
    frame = state.kill(child, SIGTERM)
    seq, frame = state.spawn(new_channel)    # fork one ahead

and feeds it what arrives on the report channel, acting on the events it
gets back (only :class:`Discard` and :class:`SpareArrived` carry something
the driver must do; the others tell who to wake)::

    for event in state.receive(data, fds): ...
    for event in state.receive_eof(): ...

Each process the template forked has a :class:`Child` record.  The state
holds it until the template reports the process gone (exited, lost, failed)
or the template ends; whoever asked for the process (a ``Process``, a pool)
holds it as long as it wants, so an exit status is never lost because the
object that asked for it was dropped first.

Processes forked ahead are kept in a pool, oldest first, each with the
*version* of the template's state it was forked from.  A command that
changes that state (``changed()``) moves the version on: those already
forked, and those still on their way, are let go (:class:`Discard`), never
handed out.  A process forked ahead that exits while it waits is let go as
soon as its ``EXIT`` arrives; :meth:`TemplateState.take` hands out only the
live ones, so a driver reads what has arrived before it takes one.

What a template may send is checked: a report about a sequence number the
caller never used, a second pid for the same process, a frame that is not
a report, ends the channel as corrupt (:class:`Ended`).  Reports that can
legitimately come late or twice (an exit after the caller let a process
forked ahead go, the ``SPARE`` of a SPAWN made stale) are absorbed.
"""

from __future__ import annotations

from . import _protocol as P
from ._errors import ProcessStateError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence


class Child:
    """What the caller knows of one process a template forked.

    ``pid`` is known once the template reported it; then exactly one of
    ``returncode`` (subprocess's convention), ``failed`` (the fork did not
    happen: why) and ``lost`` (someone in the template collected the
    status) ends it, unless the template ends first.
    """

    __slots__ = ("__weakref__", "failed", "lost", "pid", "returncode", "seq")

    def __init__(self, seq: int, pid: int | None = None) -> None:
        self.seq = seq
        self.pid = pid
        self.returncode: int | None = None
        self.failed: str | None = None
        self.lost = False

    @property
    def done(self) -> bool:
        """True once no more reports about it can come."""
        return self.returncode is not None or self.failed is not None or self.lost

    def __repr__(self) -> str:
        return (f"Child(seq={self.seq}, pid={self.pid}, returncode={self.returncode}, "
                f"failed={self.failed!r}, lost={self.lost})")


# --- events ------------------------------------------------------------------------------


class Event:
    """Something a report changed (see the subclasses)."""

    __slots__: tuple[str, ...] = ()

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and all(
            getattr(self, k) == getattr(other, k) for k in self.__slots__)

    def __hash__(self) -> int:
        return hash((type(self), *(getattr(self, k) for k in self.__slots__)))

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__)
        return f"{type(self).__name__}({fields})"


class Forked(Event):
    """The template forked ``child``; its pid is known."""

    __slots__ = ("child",)

    def __init__(self, child: Child) -> None:
        self.child = child


class ForkFailed(Event):
    """The template could not fork ``child`` (``child.failed`` says why)."""

    __slots__ = ("child",)

    def __init__(self, child: Child) -> None:
        self.child = child


class Exited(Event):
    """``child`` exited; ``child.returncode`` is its status."""

    __slots__ = ("child",)

    def __init__(self, child: Child) -> None:
        self.child = child


class Lost(Event):
    """``child`` exited, but code in the template collected its status."""

    __slots__ = ("child",)

    def __init__(self, child: Child) -> None:
        self.child = child


class SpareArrived(Event):
    """A process forked ahead is ready in the pool; the state holds ``fd``,
    the caller's end of its socket, until ``take`` or a ``Discard``."""

    __slots__ = ("child", "fd")

    def __init__(self, child: Child, fd: int) -> None:
        self.child = child
        self.fd = fd


class Discard(Event):
    """The caller must close ``fd``: a process forked ahead that is stale,
    dead, or no longer wanted (it sees EOF and exits)."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd


class Ended(Event):
    """No more reports will come; ``reason`` says why (for error messages)."""

    __slots__ = ("corrupt", "reason")

    def __init__(self, reason: str, corrupt: bool = False) -> None:
        self.reason = reason
        self.corrupt = corrupt


# --- the state -------------------------------------------------------------------------


class TemplateState:
    """Everything the caller knows about one template (see the module's doc)."""

    __slots__ = (
        "_decoder",
        "_spawning",
        "children",
        "closed",
        "corrupt",
        "ended",
        "handed_over",
        "next_seq",
        "pool",
        "version",
    )

    def __init__(self) -> None:
        self._decoder = P.Decoder(P.REPORTS)
        self.next_seq = 1
        self.children: dict[int, Child] = {}  # forked and not yet gone
        self.pool: dict[int, tuple[Child, int]] = {}  # forked ahead, ready: seq -> (record, fd)
        self._spawning: dict[int, int] = {}  # SPAWN sent, no SPARE yet: seq -> version
        self.version = 0  # of the template's state, moved on by changed()
        self.closed = False  # closed or run: nothing more is forked or handed out
        self.handed_over = False  # it ran a function, which now owns its children
        self.ended: str | None = None  # why no more reports will come
        self.corrupt = False

    # --- intents -----------------------------------------------------------------

    def fork(self, new_channel: bool) -> tuple[Child, list[P.Buffer]]:
        """Fork now: the record, and the FORK frame (the driver attaches the
        child's socket, and the report channel's other end if ``new_channel``)."""
        self._check_open()
        seq = self._seq()
        child = self.children[seq] = Child(seq)
        return child, P.fork_frame(seq, new_channel)

    def spawn(self, new_channel: bool) -> tuple[int, list[P.Buffer]]:
        """Fork one ahead, from the current state: its number and the SPAWN frame."""
        self._check_open()
        seq = self._seq()
        self._spawning[seq] = self.version
        return seq, P.spawn_frame(seq, new_channel)

    def missing(self, ahead: int) -> int:
        """How many SPAWNs would bring the processes forked ahead up to ``ahead``."""
        if self.closed or self.ended is not None:
            return 0
        return max(0, ahead - len(self.pool) - len(self._spawning))

    def take(self) -> tuple[Child, int] | None:
        """The oldest process forked ahead (its record and the caller's end of
        its socket, now the caller's), or None.  A driver reads the reports
        that have arrived first, so that one that exited is not handed out."""
        if self.closed or not self.pool:
            return None
        seq = next(iter(self.pool))
        child, fd = self.pool.pop(seq)
        self.children[seq] = child
        return child, fd

    def changed(self) -> list[Event]:
        """The template's state changed: let go of what was forked ahead from the old one."""
        self.version += 1
        self._spawning.clear()  # their SPARE reports find no version, and are discarded
        return self._drop_pool()

    def stop_ahead(self) -> list[Event]:
        """No more forking ahead for now: let go of the pool and what is on its way."""
        self._spawning.clear()
        return self._drop_pool()

    def kill(self, child: Child, sig: int) -> list[P.Buffer]:
        """The KILL frame for ``child``.

        Raises:
            ProcessStateError: the template can't be asked any more.
        """
        if self.handed_over or self.ended is not None:
            # (A closed template is still asked, while it stays alive for its children.)
            raise ProcessStateError("its template " + ("was run: the function it runs owns its children"
                                                       if self.handed_over
                                                       else f"stopped reporting: it {self.ended}"))
        return P.kill_frame(child.seq, sig)

    def close(self, handed_over: bool = False) -> list[Event]:
        """The template was closed, or ran a function (``handed_over``):
        nothing more is forked or handed out, reports still are read."""
        self.closed = True
        self.handed_over = self.handed_over or handed_over
        self._spawning.clear()
        return self._drop_pool()

    # --- reports -----------------------------------------------------------------

    def receive(self, data: bytes, fds: Sequence[int] = ()) -> list[Event]:
        """Reports read from the channel (with the descriptors that came with
        them, which the state owns from here on); what they changed.

        An empty ``data`` with descriptors is what a read that lost its
        bytes to a full descriptor table looks like: use ``receive_eof``
        for the end of the stream.
        """
        events: list[Event] = []
        if self.ended is not None:
            P.close_fds(fd for fd in fds if fd >= 0)
            return events
        try:
            self._decoder.feed(data, fds)
            while (frame := self._decoder.next_frame()) is not None:
                try:
                    self._dispatch(frame, events)
                finally:
                    frame.close()  # whatever descriptors the frame still holds
        except P.ProtocolError as e:
            events.extend(self._end(f"sent a corrupt report ({e})", corrupt=True))
        return events

    def receive_eof(self, reason: str | None = None) -> list[Event]:
        """The channel ended (``reason``: why, if not a plain EOF)."""
        if self.ended is not None:
            return []
        try:
            self._decoder.eof()
        except P.ProtocolError:
            pass
        if reason is None:
            reason = "ran a function, which now owns its children" if self.handed_over else "exited"
        return self._end(reason)

    def end(self, reason: str, corrupt: bool = False) -> list[Event]:
        """Stop: no more reports will be read (the caller closed the channel,
        or it sent something the driver refused)."""
        if self.ended is not None:
            return []
        return self._end(reason, corrupt)

    def drop_inherited(self) -> None:
        """In a process forked from the caller: close the descriptors of a
        frame still being received (the others are the driver's to close)."""
        self._decoder.close()

    # --- inside ------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed or self.ended is not None:
            raise ProcessStateError("the template can't fork any more: it was "
                                    + ("run" if self.handed_over else "closed" if self.closed else "lost"))

    def _seq(self) -> int:
        seq = self.next_seq
        self.next_seq = seq + 1
        return seq

    def _drop_pool(self) -> list[Event]:
        pool, self.pool = self.pool, {}
        return [Discard(fd) for _, fd in pool.values()]

    def _end(self, reason: str, corrupt: bool = False) -> list[Event]:
        self.ended = reason
        self.corrupt = corrupt
        self.closed = True
        self._spawning.clear()
        self._decoder.close()
        self.children.clear()  # their records say what they know; no more will come
        events = self._drop_pool()
        events.append(Ended(reason, corrupt))
        return events

    def _dispatch(self, frame: P.Frame, events: list[Event]) -> None:
        kind = frame.kind
        if kind == P.FAILED:
            seq, reason = P.decode_failed(frame.payload)
        else:
            seq, value = P.decode_seq_int(frame.payload)
        if not 0 < seq < self.next_seq:
            raise P.ProtocolError(f"a report about a process the caller never asked for (number {seq})")
        if kind == P.SPARE:
            fd = frame.fds.pop()
            version = self._spawning.pop(seq, None)
            if fd < 0:  # lost in transit (the caller was out of descriptors)
                return
            if version != self.version or self.closed:
                events.append(Discard(fd))  # stale, duplicate, or no longer wanted
                return
            spare = Child(seq, value)
            self.pool[seq] = (spare, fd)
            events.append(SpareArrived(spare, fd))
            return
        if kind == P.PID:
            forked = self.children.get(seq)
            if forked is None:
                return  # about a process the caller let go already: late, harmless
            if forked.pid is None:
                forked.pid = value
                events.append(Forked(forked))
            elif forked.pid != value:
                raise P.ProtocolError(f"two pids for one process: {forked.pid} and {value}")
            return
        # It is gone (exited, lost, not forked).
        self._spawning.pop(seq, None)  # should its SPARE still come, it is dead: discarded
        pooled = self.pool.pop(seq, None)
        if pooled is not None:
            # A process forked ahead ended while it waited: never hand it out.
            events.append(Discard(pooled[1]))
            return
        gone = self.children.pop(seq, None)
        if gone is None:
            return  # about a process the caller let go, or already gone: late, harmless
        if kind == P.EXIT:
            gone.returncode = value
            events.append(Exited(gone))
        elif kind == P.LOST:
            gone.lost = True
            events.append(Lost(gone))
        else:
            gone.failed = reason
            events.append(ForkFailed(gone))
