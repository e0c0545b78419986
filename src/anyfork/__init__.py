"""anyfork: everything you wanted to use fork() for, but couldn't.

A Python take on Perl's AnyEvent::Fork.  A big, threaded, event-loop-driven
program should not fork itself, and exec'ing a fresh interpreter is slow.
anyfork keeps a small *template* process that forks new processes on request;
the caller prepares each one over a private socketpair (``require``,
``eval``, ``send_fh``, ``send_arg``, ``fork``) and then ``run``s a function
in it.

Layout: ``_protocol`` is the sans-io wire format both ends share;
``_serve`` is the serve loop every new process runs (stdlib only, imports
nothing else of anyfork's); ``_exec`` starts fresh interpreters.  The
caller's side: ``_caller`` is a template's state, sans-io (intents in,
frames out; reports in, events out); ``_backend`` is how operations wait
(``run_blocking``, ``run_async``); ``_channel`` (the command queue and its
flush), ``_reports`` (a template's report channel, and the template as a
parent) and ``_direct`` (processes the caller spawned) are those operations;
``_process`` is ``Process`` and the constructors, ``_aio`` runs its
operations in asyncio, ``_template`` and ``early`` fork the program itself;
``_fds`` owns the descriptors, ``_runtime`` the module state,
``_failures`` the failure sink (why a process failed before its function),
``_mainmod`` finds functions of the caller's main script in other
processes, and ``_errors`` holds the exception tree.  ``rpc`` (a public submodule, imported
on use) calls functions in processes over ``_rpc_wire``, with ``_rpc_worker``
as the worker side; ``pool`` runs pools of them (``_pool_core`` is its
scheduling, ``_pool_worker`` its worker side); both hand out ``_futures``'
futures, which make a condition only for a waiter.  ``remote`` (public too)
runs processes on other hosts over ssh: ``_connection`` and ``_relay`` on
the caller's side, ``_hub`` at the far end, over ``_mux``; ``_importer``
forwards modules, ``_results`` restricts what results unpickle to.
Everything public is re-exported here.
"""

from __future__ import annotations

from ._errors import Error as Error
from ._errors import ExitStatusLostError as ExitStatusLostError
from ._errors import ProcessExitedError as ProcessExitedError
from ._errors import ProcessFailedError as ProcessFailedError
from ._errors import ProcessStateError as ProcessStateError
from ._errors import ProtocolError as ProtocolError
from ._errors import TemplateDiedError as TemplateDiedError
from ._errors import TimeoutExpired as TimeoutExpired
from ._errors import UnsupportedError as UnsupportedError
from ._exec import freeze_support as freeze_support
from ._process import Process as Process
from ._process import new as new
from ._process import new_async as new_async
from ._process import new_exec as new_exec
from ._template import LateImportWarning as LateImportWarning
from ._template import fork_template as fork_template

# Not typing.TYPE_CHECKING: importing typing here would load it into every
# process anyfork.early forks.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from ._errors import WorkerDiedError as WorkerDiedError
    from ._executor import Executor as Executor
del TYPE_CHECKING

__version__ = "0.1.0"

#: Set to the path of a Python interpreter to override the one anyfork finds.
#: The ``ANYFORK_PYTHON`` environment variable does the same; this wins.
#: (Defined here alone: ``_exec.find_python`` reads it from this module.)
PYTHON: str | None = None

__all__ = (
    "PYTHON",
    "Error",
    "Executor",
    "ExitStatusLostError",
    "LateImportWarning",
    "Process",
    "ProcessExitedError",
    "ProcessFailedError",
    "ProcessStateError",
    "ProtocolError",
    "TemplateDiedError",
    "TimeoutExpired",
    "UnsupportedError",
    "WorkerDiedError",
    "fork_template",
    "freeze_support",
    "new",
    "new_async",
    "new_exec",
)


# Public names made on first use: WorkerDiedError's base class, and the
# Executor's, live in modules that import multiprocessing (see _errors.py),
# which a program that only creates processes need not pay for.
_LAZY = ("Executor", "WorkerDiedError")


def __getattr__(name: str) -> object:
    if name == "WorkerDiedError":
        from . import _errors

        return _errors.WorkerDiedError
    if name == "Executor":
        from ._executor import Executor

        return Executor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
