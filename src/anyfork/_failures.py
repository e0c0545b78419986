"""The failure sink, caller side: why a process failed before its function ran.

A process that fails in anyfork's own work before its function runs (see
``_protocol``'s "Failures before the function") sends one FAILURE record,
a datagram, to the sink and exits with status 1.  The sink is one
``AF_UNIX`` datagram socketpair per caller process, made on first use: the
caller keeps the receiving end; the sending end goes to every process the
caller spawns (``new_exec`` passes it on descriptor 4, ``fork_template``'s
child inherits a copy) and from them to everything they fork.

Nothing reads the sink until a process is seen to exit with status 1:
then what is queued is read, and the record that names that process is
taken.  So a process that does not fail costs nothing here, and the sink
is read in no one's hot path.  Records nobody asked for are kept (the
newest ``_KEEP``) until someone does.

A remote host has a sink of its own, its hub's: the hub forwards each
record to the caller on the connection, where ``Connection.failure`` finds
it (see ``_hub``).
"""

from __future__ import annotations

import socket
import threading

from . import _fds
from . import _protocol as P

_KEEP = 256
_MAX_DATAGRAM = 1 << 18

Ids = tuple[int, int, int]  # pid, parent pid, sequence number in that parent (0: spawned)
Texts = tuple[str, str, str]  # type name, message, traceback


class Records:
    """FAILURE records as they come, by (pid, parent pid, sequence number):
    the newest ``_KEEP``, and one per pid (a newer record for a pid means
    the older one's process is gone).  The sink's, and a remote
    connection's (its hub forwards what that host's processes send)."""

    __slots__ = ("records",)

    def __init__(self) -> None:
        self.records: dict[Ids, Texts] = {}

    def add(self, data: bytes) -> None:
        """One datagram; anything but one whole record is dropped (not from a serve loop of ours)."""
        dec = P.Decoder(P.FAILURE_TABLE)
        try:
            dec.feed(data)
            frame = dec.next_frame()
            if frame is None or not dec.idle():
                return
            ids, texts = P.decode_failure(frame.payload)
        except P.ProtocolError:
            return
        records = self.records
        for old in [k for k in records if k[0] == ids[0]]:
            del records[old]
        records[ids] = (texts[0], texts[1], texts[2])
        while len(records) > _KEEP:
            del records[next(iter(records))]

    def has(self, pid: int, ppid: int | None, seq: int) -> bool:
        return any(k[0] == pid and k[2] == seq and (ppid is None or k[1] == ppid) for k in self.records)

    def find(self, pid: int, ppid: int | None, seq: int) -> Texts | None:
        """Take the record of process ``pid`` (forked by ``ppid`` as number
        ``seq``; ``ppid`` None: any parent), if it is here."""
        for key in list(self.records):
            if key[0] == pid and key[2] == seq and (ppid is None or key[1] == ppid):
                return self.records.pop(key)
        return None


class Sink:
    """The two ends of the failure sink, and the records read from it."""

    __slots__ = ("lock", "receiver", "records", "sender")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        receiver, sender = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        _fds.plain(receiver, sender)
        receiver.setblocking(False)
        self.receiver = receiver
        self.sender = sender
        _fds.own(receiver)
        _fds.own(sender)
        self.records = Records()

    def _read(self) -> None:
        """Everything queued, into ``records`` (caller holds the lock)."""
        while True:
            try:
                data = self.receiver.recv(_MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # closed under us (a fork, the interpreter's exit)
            self.records.add(data)

    def take(self, pid: int, ppid: int | None, seq: int) -> Texts | None:
        """The record of process ``pid`` (forked by ``ppid`` as number
        ``seq``; ``ppid`` None: any parent), if it sent one."""
        with self.lock:
            self._read()
            return self.records.find(pid, ppid, seq)


def sink() -> Sink:
    """This process's sink, made on first use."""
    from ._runtime import runtime

    s = runtime.failures
    if s is None:
        with runtime.failures_lock:  # not runtime.lock: new_exec runs under it
            s = runtime.failures
            if s is None:
                s = runtime.failures = Sink()
    return s


def descriptors() -> set[int]:
    """The sink's descriptors, if it was made (for leak checks)."""
    from ._runtime import runtime

    s = runtime.failures
    return set() if s is None else {sock.fileno() for sock in (s.receiver, s.sender) if sock.fileno() >= 0}


def take(pid: int, ppid: int | None, seq: int) -> Texts | None:
    """The failure record of that process, if the sink exists and holds one."""
    from ._runtime import runtime

    s = runtime.failures
    return s.take(pid, ppid, seq) if s is not None else None
