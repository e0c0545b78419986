"""Descriptor ownership on the caller's side: who holds what, and what a
fork or the interpreter's exit does to it.

Theory of operation
-------------------
Every descriptor the caller side holds has exactly one owner that closes it
(a command channel, a report channel, a direct child's pidfd, a process
forked ahead waiting in a template's pool, a duplicate queued by
``send_fh``).  Each owner also lists it here, with :func:`own`, from the
moment it has it until it closes it or gives it away (:func:`disown`).

The list exists for two moments when the owners can't be asked one by one:

- **a fork of the caller** (the user's own ``os.fork``, multiprocessing,
  ``fork_template``).  The child inherits every descriptor, and a stray
  copy of a command socket would keep a template from ever seeing EOF.  So
  in the child every listed descriptor is closed at once, and the objects
  that referred to them are dead from then on (the runtime's generation
  moves on, see ``_runtime``): a ``socket`` object is detached first, so
  that its finalizer never closes the number again once it is reused.
- **the interpreter's exit**: everything still listed is closed, so
  templates and unrun processes see EOF now, rather than whenever module
  teardown reaches their objects (if it does).

Descriptors that are not listed one by one (an outbox's queue of ``send_fh``
duplicates) belong to a *holder*, registered with :func:`hold`; after a fork
its ``drop_inherited()`` closes them.

Hooks registered with :func:`on_fork` and :func:`on_exit` run *before* the
descriptors are closed, so that state which names them (a pidfd number) can
be forgotten first.

Between the call that makes a descriptor (``socketpair``, ``recvmsg``,
``dup``, ``pidfd_open``) and the owner's :func:`own`, it is on no list, and
another thread that forks then (``fork_template(allow_threads=True)``, the
user's ``os.fork``) would carry it into the child; so would a descriptor
taken off the list just before it is closed.  So those steps run under
:data:`fork_lock`, which a fork takes first (``register_at_fork``'s
*before* hook): it waits for such a step to end, and none starts until the
fork is done.  The steps never wait while they hold it.
"""

from __future__ import annotations

import atexit
import os
import threading
import weakref
from typing import TYPE_CHECKING, Protocol

from ._protocol import close_fd

if TYPE_CHECKING:
    import socket
    from collections.abc import Callable


class Holder(Protocol):
    """Something that holds descriptors it does not list one by one."""

    def drop_inherited(self) -> None:
        """In a forked child: close them, and forget them."""


#: Held from making a descriptor to listing it, and from unlisting one to
#: closing it (see the module's doc), and by a fork of this process.
#: Reentrant: a signal handler may fork.  Taken after a Process's lock; it
#: is also every report channel's lock (see _reports.ReportChannel).
fork_lock = threading.RLock()

_owned: dict[int, socket.socket | None] = {}
_holders: weakref.WeakSet[Holder] = weakref.WeakSet()
_fork_hooks: list[Callable[[], None]] = []
_exit_hooks: list[Callable[[], None]] = []


def own(obj: socket.socket | int) -> None:
    """List ``obj`` (a socket, or a bare descriptor number) as anyfork's."""
    if isinstance(obj, int):
        _owned[obj] = None
    else:
        _owned[obj.fileno()] = obj


def disown(obj: socket.socket | int) -> None:
    """Take ``obj`` off the list: it was closed, or handed to the user."""
    _owned.pop(obj if isinstance(obj, int) else obj.fileno(), None)


def owned() -> frozenset[int]:
    """The descriptor numbers listed now (for tests and leak checks)."""
    return frozenset(_owned)


def close_sock(sock: socket.socket | None) -> None:
    """Close an owned socket (None, or one already closed: nothing to do)."""
    if sock is not None and sock.fileno() >= 0:
        with fork_lock:  # off the list and closed, with no fork in between
            _owned.pop(sock.fileno(), None)
            sock.close()


def close_owned_fd(fd: int) -> None:
    """Close an owned bare descriptor."""
    if fd >= 0:
        with fork_lock:
            _owned.pop(fd, None)
            close_fd(fd)


def plain(*socks: socket.socket) -> None:
    """Make sockets blocking, with no timeout, whatever socket.setdefaulttimeout()
    said: the ends a process serves, and the caller's, which run() returns
    blocking and on which anyfork's own writes must not time out."""
    for sock in socks:
        if sock.gettimeout() is not None:  # else it is, and its descriptor too
            sock.setblocking(True)


def hold(holder: Holder) -> None:
    """Register a holder of unlisted descriptors (see the module's doc)."""
    _holders.add(holder)


def on_fork(hook: Callable[[], None]) -> None:
    """Run ``hook`` in every child forked from the caller, before the closing."""
    _fork_hooks.append(hook)


def on_exit(hook: Callable[[], None]) -> None:
    """Run ``hook`` at interpreter exit, before the closing."""
    _exit_hooks.append(hook)


def _after_fork_in_child() -> None:
    fork_lock.release()  # taken by this thread, before the fork
    for hook in _fork_hooks:
        hook()
    for fd, sock in list(_owned.items()):
        if sock is not None:
            sock.detach()  # its finalizer must not close a reused number later
        close_fd(fd)
    _owned.clear()
    for holder in list(_holders):
        holder.drop_inherited()
    _holders.clear()


def _close_all_at_exit() -> None:
    for hook in _exit_hooks:
        hook()
    for fd, sock in list(_owned.items()):
        if sock is not None:
            sock.close()
        else:
            close_fd(fd)
    _owned.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=fork_lock.acquire, after_in_parent=fork_lock.release,
                        after_in_child=_after_fork_in_child)
atexit.register(_close_all_at_exit)


class Shared:
    """An owned descriptor that operations wait on, possibly several at once.

    A backend registers the descriptor for as long as an operation waits on
    it (in an asyncio loop's selector, in a ``poll()`` set).  Closing it
    under such a registration would leave a stale entry for a number the
    next ``open()`` may reuse, so :meth:`close` closes it at once only when
    no one waits; otherwise the last waiter to :meth:`leave` does.
    """

    __slots__ = ("_closing", "_lock", "_on_close", "_waiters", "fd", "sock")

    def __init__(self, fd: int, sock: socket.socket | None = None) -> None:
        self.fd = fd
        self.sock = sock
        self._lock = threading.Lock()
        self._waiters = 0
        self._closing = False
        self._on_close: list[Callable[[], None]] = []
        own(sock if sock is not None else fd)

    def on_close(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` when a close is asked for while this waiter (one that
        waits for a long time, such as an event loop's reader) is entered:
        it unregisters the descriptor and leaves."""
        self._on_close.append(hook)

    def enter(self) -> int:
        """The descriptor, for one waiter to register; -1 once closed (then don't leave)."""
        with self._lock:
            if self.fd < 0 or self._closing:
                return -1
            self._waiters += 1
            return self.fd

    def leave(self) -> None:
        """That waiter has unregistered it."""
        with self._lock:
            self._waiters -= 1
            last = self._waiters == 0 and self._closing
        if last:
            self._close_now()

    def close(self) -> None:
        """Close it now, or when the last waiter leaves.  Idempotent."""
        with self._lock:
            if self.fd < 0 or self._closing:
                return
            self._closing = True
            now = self._waiters == 0
            hooks, self._on_close = self._on_close, []
        if now:
            self._close_now()
        else:
            for hook in hooks:
                hook()

    def forget(self) -> None:
        """In a forked child (``_fds`` closes the number itself): never touch it."""
        self.fd = -1
        self.sock = None

    def _close_now(self) -> None:
        fd, self.fd = self.fd, -1
        sock, self.sock = self.sock, None
        if sock is not None:
            close_sock(sock)
        elif fd >= 0:
            close_owned_fd(fd)
