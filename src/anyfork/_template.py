"""Forking the calling program on purpose: ``fork_template`` (and ``anyfork.early``).

The seed's AnyEvent::Fork::Template, in Python terms.  The caller forks
itself once, at a moment it chooses (modules and data loaded, no threads or
event loop yet); the child runs the ordinary serve loop with the program's
own ``__main__`` and is a template like any other: ``fork``, ``require``,
``eval``, ``send_*`` and ``run`` all work on the Process the caller gets.

What the child must not keep from the program:

- anyfork's own descriptors (command sockets, report channels, pidfds of
  other processes): ``_fds`` closes them, because a
  stray copy would keep another template from ever seeing EOF;
- the caller's end of this very socketpair (closed here, for the same
  reason: the template exits when the caller's end closes);
- the program's atexit handlers: cleared, and every exit from the serve loop
  is an ``os._exit`` that skips destructors;
- Ctrl-C: ignored until ``run``, like every template;
- the program's signal wakeup fd (an event loop's self-pipe): a signal
  delivered to the template must not wake the program's loop.

The child freezes its heap (``gc.freeze``) first thing, so that the
template's collections, and those of the processes forked from it, leave the
objects it shares with the program alone.  Freezing in the child, not the
caller, leaves the program's collector exactly as it was: a caller that froze
and unfroze again would have to tell its own frozen objects from those it
froze for the fork, and can't (``gc.unfreeze`` takes them all, and
``gc.get_freeze_count`` is not 0 at start-up on every Python: 3.12.1 starts
with 375 objects frozen).  The collector is off across the fork, so that no
collection runs in the child before the freeze.
"""

from __future__ import annotations

import atexit
import gc
import os
import signal
import socket
import sys
import threading
from typing import TYPE_CHECKING, Any

from . import _failures, _fds, _process, _serve
from ._errors import Error
from ._runtime import runtime

if TYPE_CHECKING:
    from typing import NoReturn

    from ._process import Process


class LateImportWarning(UserWarning):
    """``anyfork.early`` was imported after other modules or threads started.

    It still works, but the early process carries whatever was loaded (and
    any lock another thread held) into every process forked from it.
    """


def fork_template(*, allow_threads: bool = False) -> Process:
    """Fork the calling program now and return the child as a template.

    The child serves commands like any anyfork process: functions given to
    ``run`` (and names used in ``eval``) are looked up in the program's own
    ``__main__``, and everything the program has loaded or built so far is
    shared copy-on-write with every process forked from the template.  Call
    it after loading modules and data and before starting threads or an
    event loop.

    The template exits when the caller closes or drops the returned Process,
    or exits itself.  The program's atexit handlers never run in it or in the
    processes forked from it (theirs, registered after the fork, do).

    Args:
        allow_threads: fork even though other threads are running.  Only the
            calling thread exists in the child; a lock another thread held at
            the fork stays locked there forever.  Python 3.12+ also warns
            (DeprecationWarning) about forking a multi-threaded process.

    Returns:
        The template, a direct child of the caller (its pid is known at once).

    Raises:
        anyfork.Error: other threads are running and ``allow_threads`` is
            false, or the fork failed.
        anyfork.UnsupportedError: the platform can't fork or pass descriptors.
    """
    _process.check_supported()
    others = threading.active_count() - 1
    if others > 0 and not allow_threads:
        raise Error(
            f"fork_template() refuses to fork: {others} other thread(s) running, and a forked "
            "copy of a threaded process can deadlock on a lock one of them held; call it before "
            "starting threads, or pass allow_threads=True")
    runtime.reap_directs()
    with _fds.fork_lock:  # listed at once: another thread's fork closes its copies
        try:
            mine, theirs = socket.socketpair()
        except OSError as e:
            raise Error(f"fork_template(): no socketpair for the template: {e}") from e
        _fds.own(mine)
        _fds.own(theirs)
    _fds.plain(mine, theirs)
    try:
        # The child's copy of the failure sink's sending end: _fds closes
        # the caller's own in every fork of it.
        failure = os.dup(_failures.sink().sender.fileno())
    except BaseException:
        mine.close()
        theirs.close()
        raise
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()  # or the child flushes the same buffered text again
        except Exception:
            pass
    collecting = gc.isenabled()
    gc.disable()  # until the child has frozen what it shares (see the module's doc)
    # A signal between the fork and the child's set-up would reach the
    # program's handlers there: Ctrl-C would raise KeyboardInterrupt inside
    # the after-fork hooks, and any handled signal would be written to the
    # program's wakeup fd (an event loop's self-pipe, which the child shares).
    # So hold every signal back across the fork.  The caller gets what came
    # as soon as its mask is restored; the child, once it is set up.
    mask = _block_signals()
    # Under the lock, so that no other thread's fork comes between: ours
    # must keep them (the after-fork handler closes what is listed).
    with _fds.fork_lock:
        _fds.disown(mine)
        _fds.disown(theirs)
        try:
            # Found here, not in the child: iterating sys.modules takes its
            # lock on free-threaded CPython, and there a lock another thread
            # was handed at the fork stays held for good (gh-133130).
            importing = _importing()
            pid = os.fork()
        except BaseException as e:
            _restore_mask(mask)
            if collecting:
                gc.enable()
            mine.close()
            theirs.close()
            os.close(failure)
            if isinstance(e, OSError):
                raise Error(f"fork_template() could not fork: {e}") from e
            raise
        if pid == 0:
            _fds.fork_lock.release()  # this block never ends here: other threads may need it
            _serve_forked(theirs, mine, failure, collecting, importing)
    os.close(failure)
    _restore_mask(mask)
    if collecting:
        gc.enable()
    theirs.close()
    return _process.adopt(mine, pid)


def _block_signals() -> set[signal.Signals] | None:
    sigmask = getattr(signal, "pthread_sigmask", None)
    return None if sigmask is None else sigmask(signal.SIG_BLOCK, signal.valid_signals())


def _restore_mask(mask: set[signal.Signals] | None) -> None:
    if mask is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _importing() -> list[Any]:
    """The specs of the modules being imported now (by this thread, or by
    others, whose imports never finish in a child either)."""
    specs = (getattr(module, "__spec__", None) for module in list(sys.modules.values()))
    return [spec for spec in specs if getattr(spec, "_initializing", False)]


def _serve_forked(sock: socket.socket, callers_end: socket.socket, failure: int,
                  collecting: bool, importing: list[Any]) -> NoReturn:
    """In the forked child: become a template; never return into the program."""
    try:
        gc.freeze()  # the template's collections must not touch what it shares
        if collecting:
            gc.enable()
        callers_end.close()
        _serve.failure_fd = failure
        atexit._clear()  # the program's handlers are not ours to run
        signal.set_wakeup_fd(-1)
        # The program's handlers must not run here (a SIGTERM handler that only
        # sets a flag would make the template unkillable): defaults, as in a
        # fresh interpreter, except SIGINT, ignored until run() like every
        # template's.  Signals that arrived since the fork then get those.
        _serve._fresh_signals(True, ignore_sigint=True)
        # Modules this thread was in the middle of importing (anyfork.early,
        # a module that called fork_template at import) never finish here:
        # mark them done, or another thread importing one would wait forever
        # for their import lock.
        for spec in importing:
            spec._initializing = False
        server = _serve.Server(sock)
        server.inherited_signals = True  # the program's handlers: run() resets them all
    except BaseException:
        sys.__excepthook__(*sys.exc_info())
        os._exit(1)
    server.serve()
