"""anyfork's exceptions: one small tree rooted at ``Error``.

Bad arguments are not in the tree: they raise ``TypeError`` or ``ValueError``
at the call, before anything is queued.  Everything here is about a process
or a channel that did not do what was asked.
"""

from __future__ import annotations

# Not typing.TYPE_CHECKING: see __init__.py.
TYPE_CHECKING = False


class Error(Exception):
    """Root of every error anyfork raises about processes and channels."""


class ProcessStateError(Error):
    """The process can't do that now: it was already run or closed, or it
    belongs to the parent of a fork, or what is asked needs a template that
    has handed its children over to the function it runs."""


class ProcessExitedError(Error):
    """The process exited (or its socket broke) before it took every command.

    ``returncode`` holds its exit status when it is known; its own stderr
    says why it exited.
    """

    def __init__(self, message: str, returncode: int | None = None) -> None:
        super().__init__(message)
        self.returncode = returncode


class ProcessFailedError(ProcessExitedError):
    """The process failed in anyfork's work before its function ran: a
    ``require`` that raised, ``eval``'d code that raised, a function that
    could not be found, is not callable or takes other arguments.  Raised by
    ``wait`` (the exit status is 1, as ever), and by forks from a template
    that failed so.

    Attributes:
        returncode: 1.
        type_name: the exception's type in the process ("ModuleNotFoundError",
            "mymod.MyError").
        message: ``str()`` of it.
        traceback: its formatted traceback, without anyfork's own frames.
    """

    def __init__(self, message: str, type_name: str = "", error: str = "", traceback: str = "",
                 returncode: int | None = 1) -> None:
        super().__init__(message, returncode)
        self.type_name = type_name
        self.message = error
        self.traceback = traceback

    def __reduce__(self) -> tuple[object, ...]:
        return type(self), (str(self), self.type_name, self.message, self.traceback, self.returncode)


class TemplateDiedError(Error):
    """The template a process was forked from is gone, so its forks fail and
    its children's pids and exit statuses can no longer be reported."""


class ProtocolError(Error):
    """A peer sent a stream that is not a well-formed anyfork stream."""


class UnsupportedError(Error):
    """This platform lacks something anyfork needs (descriptor passing, fork)."""


class ExitStatusLostError(Error):
    """The exit status was collected by someone else (SIGCHLD set to SIG_IGN,
    or a SIGCHLD handler that reaps with ``waitpid(-1)``)."""


class TimeoutExpired(Error, TimeoutError):  # noqa: N818 - named like subprocess's
    """``wait(timeout)`` ran out of time; the process is still running."""


# WorkerDiedError subclasses concurrent.futures' BrokenProcessPool, whose
# module imports multiprocessing (about 18 ms): made on first use, so that
# ``import anyfork`` does not pay for it.
if TYPE_CHECKING:
    from concurrent.futures.process import BrokenProcessPool

    class WorkerDiedError(Error, BrokenProcessPool):
        pid: int
        returncode: int | None

        def __init__(self, pid: int, returncode: int | None, message: str = "") -> None: ...


def _worker_died_error() -> type:
    from concurrent.futures.process import BrokenProcessPool

    class WorkerDiedError(Error, BrokenProcessPool):
        """The worker exited or was killed with calls in flight (or before a
        call could be sent).  ``pid`` and ``returncode`` (negative: the signal
        that killed it; None if it closed its socket but had not exited within
        a second) say which worker and how."""

        def __init__(self, pid: int, returncode: int | None, message: str = "") -> None:
            if not message:
                how = ("still running, but it closed its socket" if returncode is None
                       else f"killed by signal {-returncode}" if returncode < 0
                       else f"exit status {returncode}")
                message = f"worker process {pid} died ({how})"
            super().__init__(message)
            self.pid = pid
            self.returncode = returncode

        def __reduce__(self) -> tuple[object, ...]:
            return type(self), (self.pid, self.returncode, str(self))

    WorkerDiedError.__module__ = "anyfork"
    return WorkerDiedError


def __getattr__(name: str) -> object:
    if name == "WorkerDiedError":
        # setdefault: two threads asking at once must get one class.
        return globals().setdefault("WorkerDiedError", _worker_died_error())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
