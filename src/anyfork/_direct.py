"""Processes the caller spawned itself (``new_exec``, ``fork_template``): the caller is their parent.

A :class:`Direct` is both the record of such a process (pid, exit status)
and its parent's side (reaping it, signalling it), so that ``Process`` asks
it the same questions it asks a template about the processes that template
forked (see ``_reports.Template``).

The process is watched through a pidfd where the platform has one: it turns
readable when the process exits, so a wait needs no polling loop, and
``waitid(P_PIDFD)`` reaps exactly this process even if someone else reaped
ours and its number went to a stranger.  Without one, the wait polls with
a growing delay.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from . import _fds
from ._backend import Op, Wait, time_left
from ._errors import Error, ExitStatusLostError
from ._runtime import runtime

_P_PIDFD: int | None = getattr(os, "P_PIDFD", None)


class Direct:
    """A process the caller spawned itself, and so must reap."""

    __slots__ = ("__weakref__", "failed", "lock", "lost", "pid", "pidfd", "returncode")

    def __init__(self, pid: int) -> None:
        self.pid: int | None = pid
        # Never held across a wait: kill() from another thread, or from a
        # signal handler that interrupted a wait on this same thread (hence
        # an RLock), is never stuck behind one.
        self.lock = threading.RLock()
        self.returncode: int | None = None
        self.failed: str | None = None  # never: spawning it succeeded
        self.lost = False
        self.pidfd: _fds.Shared | None = None
        if hasattr(os, "pidfd_open"):
            try:
                with _fds.fork_lock:  # owned before a fork
                    self.pidfd = _fds.Shared(os.pidfd_open(pid))
            except OSError:
                pass
        runtime.directs[pid] = self

    @property
    def done(self) -> bool:
        return self.returncode is not None or self.lost

    def describe(self) -> str:
        return "the caller"

    def forget(self) -> None:
        """In a process forked from the caller: its pidfd is closed by _fds."""
        if self.pidfd is not None:
            self.pidfd.forget()

    def _reaped(self, returncode: int | None) -> None:
        if returncode is None:
            self.lost = True
        else:
            self.returncode = returncode
        if self.pidfd is not None:
            self.pidfd.close()  # when the last waiter on it leaves
        runtime.directs.pop(self.pid or 0, None)

    def poll(self) -> bool:
        """Reap it if it has exited; True once done.  Never blocks."""
        if self.done:
            return True
        if not self.lock.acquire(blocking=False):
            return False
        try:
            if self.done:
                return True
            assert self.pid is not None
            try:
                fd = self.pidfd.fd if self.pidfd is not None else -1
                if fd >= 0 and _P_PIDFD is not None:
                    # By pidfd, not by number: if someone else reaped ours and
                    # the number went to another child, waitpid(pid) would
                    # collect that stranger's status.
                    info = os.waitid(_P_PIDFD, fd, os.WEXITED | os.WNOHANG)
                    if info is None:
                        return False
                    code = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
                    self._reaped(code)
                    return True
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self._reaped(None)
                return True
            if pid:
                self._reaped(os.waitstatus_to_exitcode(status))
                return True
            return False
        finally:
            self.lock.release()

    # --- the parent's interface (see _reports.Template) --------------------------------

    def exit_op(self, child: Direct, deadline: float | None) -> Op[bool]:
        """Wait until it is reaped; False if ``deadline`` passed first."""
        delay = 0.0005
        while not child.poll():
            left = time_left(deadline)
            if left == 0:
                return False
            shared = child.pidfd
            fd = shared.enter() if shared is not None else -1
            if fd >= 0:
                assert shared is not None
                try:
                    yield Wait(reads=(fd,), deadline=deadline)
                finally:
                    shared.leave()
            else:
                yield Wait(deadline=time.monotonic() + (delay if left is None else min(delay, left)))
                delay = min(delay * 2, 0.05)
        return True

    def pid_op(self, child: Direct, deadline: float | None) -> Op[None]:
        return
        yield  # a generator that never waits: the pid is known from the start

    def flush_op(self, deadline: float | None) -> Op[bool]:
        return True
        yield  # nothing is written to the caller on a child's behalf

    def status(self, child: Direct, what: str) -> int | None:
        """Its exit status if known, None if it still runs.

        Raises:
            ExitStatusLostError: someone else reaped it.
        """
        child.poll()
        if child.lost:
            raise ExitStatusLostError(
                f"the exit status of {what} was collected by someone else "
                "(SIGCHLD ignored, or a handler reaping with waitpid(-1))")
        return child.returncode

    def kill(self, child: Direct, sig: int, what: str) -> None:
        with child.lock:
            if child.done:
                return
            fd = child.pidfd.fd if child.pidfd is not None else -1
            if fd >= 0:
                try:
                    signal.pidfd_send_signal(fd, sig)
                except ProcessLookupError:
                    pass  # exited, and reaped by someone else: nothing to signal
            else:
                # Not yet reaped, so the pid is still our child's: no reuse race.
                assert child.pid is not None
                os.kill(child.pid, sig)

    def broken(self, child: Direct, what: str, e: OSError) -> Error:
        """The error for a write to it that failed: it exited."""
        from ._backend import deadline_after, run_blocking
        from ._errors import ProcessExitedError

        run_blocking(self.exit_op(child, deadline_after(1.0)))
        rc = child.returncode
        status = "" if rc is None else f" with status {rc}"
        return ProcessExitedError(
            f"{what} exited{status} before it took every command "
            f"({e.strerror or e}); its stderr says why", rc)
