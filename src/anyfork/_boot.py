"""The exec bootstrap: what a fresh interpreter runs before the serve loop.

``new_exec`` (``_exec.command``) starts ``python -c`` with a short line
that runs the bootstrap it finds in the environment (``_exec.boot_code``:
so that ``ps`` shows "python3 -S -c exec(...) anyfork process of PID"),
which puts a stand-in ``anyfork`` package in sys.modules, so that importing
this module imports neither the package's ``__init__`` nor anything of the
caller's side, and calls ``main``.  What is particular to being exec'd this
way lives here: closing descriptors the exec let through, undoing
``LD_BIND_NOW``, and removing the stand-in.  The loop itself (``_serve``)
knows nothing of it, so it can run over another transport, or be loaded
from source where there is no anyfork on disk (see ``_stage1``).

Imports the standard library, ``_serve`` and (through it) ``_protocol``.
"""

from __future__ import annotations

import _socket
import os
import sys

from . import _serve

# Not "from typing import ...", and the C signal module: see _serve.py.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal
    from typing import NoReturn
else:
    import _signal

BIND_MARK = "ANYFORK_UNSET_BIND_NOW"  # set by _exec.spawn


def main(fd: int, failure_fd: int = -1) -> NoReturn:
    """Entry point of an exec'd process: serve the command socket on ``fd``;
    ``failure_fd``, if set, is the sending end of the caller's failure sink
    (see ``_protocol``), kept for this process and those it forks."""
    os.set_inheritable(fd, False)
    os.set_blocking(fd, True)
    # "anyfork process of PID", after -c: for ps, not for the code run here.
    if len(sys.argv) == 2 and sys.argv[0] == "-c" and sys.argv[1].startswith("anyfork process of "):
        del sys.argv[1:]
    if os.environ.pop(BIND_MARK, "0") == "1":
        os.environ.pop("LD_BIND_NOW", None)  # set by _exec.spawn for this process only
    # Whatever else the exec let through is not ours: close it.
    keep = sorted({fd, failure_fd} - {-1})
    low = 3
    for n in keep:
        os.closerange(low, n)
        low = n + 1
    os.closerange(low, _max_fd())
    if failure_fd >= 0:
        os.set_inheritable(failure_fd, False)  # a program the function execs gets no copy
        _serve.failure_fd = failure_fd
    # Ctrl-C in a terminal reaches the whole process group; a process that is
    # still being prepared must not die of it with a traceback.  run()
    # restores the default before calling the user's function.
    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)
    # The one-line bootstrap put a stand-in 'anyfork' package in sys.modules
    # so that importing this module did not import the whole library.  Remove
    # it: code run here that imports anyfork must get the real one.
    stub = sys.modules.get("anyfork")
    if stub is not None and getattr(stub, "__anyfork_stub__", False):
        del sys.modules["anyfork"]
    server = _serve.Server(_socket.socket(fileno=fd))
    # Whatever ran before us (site, sitecustomize, a frozen program) may have
    # left output in stdio's buffers: out with it now, once.  From here only
    # anyfork's code runs, unless site or the program left threads or
    # signal handlers behind: then flush before every fork as well.
    _serve._flush_stdio()
    server.user_code = not sys.flags.no_site or bool(getattr(sys, "frozen", False))
    server.serve()


def _max_fd() -> int:
    try:
        return max(os.sysconf("SC_OPEN_MAX"), 256)
    except (OSError, ValueError):
        return 65536
