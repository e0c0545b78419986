"""The same API on other hosts, over OpenSSH: ``anyfork.remote``.

``new_exec(command)`` starts a Python on another host through ``command``
(the argv of an ssh that ends with the remote interpreter, e.g.
``["ssh", "-F", cfg, "host", "python3"]``) and returns a :class:`Process`
that works as a local one does: ``require``, ``eval``, ``send_arg``,
``fork``, ``run`` (which returns a local ``socket.socket`` whose bytes reach
the remote function's socket unchanged), ``pid`` (the remote pid),
``kill``, ``wait``, ``returncode`` and ``close``.  ``template(command)`` is
the same process, meant to be forked from: each ``fork()`` makes a process
on that host without another ssh connection.

Nothing is installed on the remote host and nothing is written to its
disk: anyfork sends a short first stage on ssh's command line and the
sources of its serve loop and hub on the connection (see ``_hub``,
``_relay``, ``_mux``).  Modules that exist only on the caller's side are
sent on demand (``_importer``).  OpenSSH authenticates and encrypts;
anyfork adds no daemon, no port and no socket file.

Results are decoded with a restricted unpickler (``_results``): a host
that is compromised must not be able to run code in the caller through a
crafted pickle.  ``allow=`` widens it.

What does not work: ``send_fh`` (a descriptor can't cross to another host;
it raises ``anyfork.UnsupportedError``).  The caller's ``sys.path`` is not
sent: the remote host has its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import _connection as C
from ._backend import Op, Wait, deadline_after, run_blocking, time_left
from ._errors import Error, ProcessExitedError, TemplateDiedError

if TYPE_CHECKING:
    import socket
    from collections.abc import Iterable, Sequence

    from ._process import Process

__all__ = ("new_exec", "template")


class _Hub:
    """The parent of the processes one connection's hub runs (see _process.Parent)."""

    def __init__(self, conn: C.Connection) -> None:
        self.conn = conn

    def describe(self) -> str:
        return f"the hub on {self.conn.host}"

    def flush_op(self, deadline: float | None) -> Op[bool]:
        return True
        yield  # nothing is written on a remote process's behalf

    def _until(self, done: Any, deadline: float | None) -> Op[bool]:
        notifier = self.conn.notifier
        while True:
            epoch = notifier.epoch
            if done():
                return True
            if time_left(deadline) == 0:
                return False
            yield Wait(notifier=notifier, epoch=epoch, deadline=deadline)

    def pid_op(self, child: C.Remote, deadline: float | None) -> Op[None]:
        yield from self._until(lambda: child.pid is not None or child.failed is not None, deadline)

    def exit_op(self, child: C.Remote, deadline: float | None) -> Op[bool]:
        return (yield from self._until(lambda: child.returncode is not None or child.failed is not None,
                                       deadline))

    def status(self, child: C.Remote, what: str) -> int | None:
        if child.returncode is None and child.failed is not None:
            raise TemplateDiedError(f"{what} on {self.conn.host}: {child.failed}, so its exit status "
                                    "can't be known")
        return child.returncode

    def kill(self, child: C.Remote, sig: int, what: str) -> None:
        self.conn.kill(child, sig)

    def broken(self, child: C.Remote, what: str, e: OSError) -> Error:
        run_blocking(self.exit_op(child, deadline_after(1.0)))
        if child.returncode is None and child.failed is not None:
            return TemplateDiedError(f"{what} on {self.conn.host}: {child.failed}")
        rc = child.returncode
        status = "" if rc is None else f" with status {rc}"
        return ProcessExitedError(f"{what} on {self.conn.host} exited{status} before it took every command "
                                  f"({e.strerror or e}); its stderr says why", rc)


def new_exec(command: Sequence[str], *, timeout: float = 60.0, allow: Iterable[str] = ()) -> Process:
    """A new process on the host ``command`` reaches, over one ssh connection.

    Args:
        command: the argv that starts a Python 3 on the far side, e.g.
            ``["ssh", "host", "python3"]``; anyfork appends ``-S -c PROGRAM``
            (quoted for the remote shell when the command is ssh).
        timeout: seconds to wait for the far side to answer.
        allow: what pickled results, events and exceptions from this host
            (through ``anyfork.rpc``, ``pool`` and ``Executor``) may name
            besides built-in values and exceptions and a few standard value
            types: ``"module.name"``, ``"module.*"`` (a module and its
            submodules), or ``"*"`` for anything (plain pickle: only for a
            host you trust as much as this process).  See ``_results``.

    Raises:
        TypeError, ValueError: ``command`` is not a list of str, or an
            ``allow`` entry is not one of the forms above.
        anyfork.Error: ssh failed (its message is in the error).
        anyfork.ProtocolError: the far side speaks another protocol version.
    """
    from ._process import check_supported, remote_process
    from ._results import Host

    check_supported()
    Host("", allow)  # a bad entry fails here, before ssh starts
    conn = C.Connection(command, timeout=timeout)
    try:
        remote, sock = conn.serve()
    except BaseException:
        conn.close()
        raise
    hub = _Hub(conn)
    host = Host(conn.host, allow)
    host.connection = conn  # (why one of its processes failed before its function ran: see _process)
    proc = remote_process(sock, hub, remote, host)
    # The connection lives as long as the process is of use: it ends (and
    # the hub ends everything it started) once the process has exited, or
    # its Process object is gone.
    _connections[id(proc)] = conn
    import weakref

    weakref.finalize(proc, _end, id(proc))
    return proc


_connections: dict[int, C.Connection] = {}


def _writer(proc: Process, sock: socket.socket) -> C.Writer | socket.socket:
    """What to write ``proc``'s command socket ``sock`` with once it runs:
    for a process the hub started (``new_exec``), the connection's writer,
    which skips the relay thread; for one a remote template forked (whose
    channel the relay opened for a descriptor), ``sock`` itself."""
    from ._process import parent_of

    parent, child = parent_of(proc)
    if isinstance(parent, _Hub) and isinstance(child, C.Remote):
        return parent.conn.writer(child, sock)
    return sock


def _end(key: int) -> None:
    conn = _connections.pop(key, None)
    if conn is not None:
        conn.close()


def template(command: Sequence[str], *, timeout: float = 60.0, allow: Iterable[str] = ()) -> Process:
    """A template on the host ``command`` reaches: its ``fork()`` makes
    processes there without another connection (they share its ``allow``).
    See :func:`new_exec`."""
    return new_exec(command, timeout=timeout, allow=allow)
