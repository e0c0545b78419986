"""anyfork's exceptions: one small tree rooted at ``Error``.

Bad arguments are not in the tree: they raise ``TypeError`` or ``ValueError``
at the call, before anything is queued.  Everything here is about a process
or a channel that did not do what was asked.
"""

from __future__ import annotations


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
