"""What a pool's worker runs before its first call, and the Executor's handler.

``init`` is the rpc ``init`` of every pool worker.  It gets the items
``run()`` would pass: the template's own (for the user's ``init``), then
the pool's three: the user's ``init`` name, how to find the caller's main
module, and the write end of a pipe for stack dumps ("" on a remote host:
there it dumps on its stderr).

- The worker makes a process group of its own, so that stopping a stuck
  call (the pool's ``timeout``) kills what the call started too.
- faulthandler dumps every thread's Python stack to the pipe on SIGUSR1,
  which the pool sends just before the kill, so the error says where the
  call was stuck.
- The caller's main module is made resolvable (``_mainmod``), so functions
  defined in the user's script unpickle here.
- Each reply is written before the next call starts (rpc's worker may
  otherwise keep a quick call's reply back to send it with the next ones).
  So when a worker dies, every call it held but the oldest never started,
  and the pool sends those to another worker instead of failing them.

Standard library only (and ``_rpc_worker`` for name lookup): rpc loads it
without the rest of anyfork.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

# At the top, while the boot's stand-in package is in place: in a function,
# after the boot, "from . import" would import the whole of anyfork.
from . import _rpc_worker

DUMP_SIGNAL = signal.SIGUSR1


def init(*items: Any) -> None:
    *user_items, user_init, main, dump = items
    try:
        os.setpgid(0, 0)
    except OSError:
        pass  # a session leader already (a template forked from a program)
    import faulthandler

    if dump == "":
        dump = sys.stderr  # a remote worker: the pipe can't cross, ssh brings its stderr back
    faulthandler.register(DUMP_SIGNAL, file=dump, all_threads=True, chain=False)
    _rpc_worker._QUICK = 0.0  # no call counts as quick: its reply is out before the next starts
    global _dump
    _dump = dump  # faulthandler needs it open for as long as the process lives
    if main:
        kind, _, value = main.partition(":")
        _rpc_worker.sibling("_mainmod").install(kind, value)
    if user_init:
        _rpc_worker.resolve(user_init)(*user_items)


_dump: Any = None


def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """The Executor's handler: the task is the function and its arguments."""
    return fn(*args, **kwargs)


def initialize_pickled(*items: Any) -> None:
    """An Executor's ``initializer(*initargs)``: the last item is the pair,
    pickled (base64, as ``send_arg`` carries str), unpickled here once the
    caller's main module resolves (so an initializer of the user's script works)."""
    import base64
    import pickle

    initializer, initargs = pickle.loads(base64.b64decode(items[-1]))
    initializer(*initargs)
