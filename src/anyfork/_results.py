"""What a result from a remote host may build in the caller: the restricted unpickler.

The hazard
----------
Unpickling runs code: a pickle names globals (``module.name``) that the
unpickler imports, and calls them with arguments the pickle chooses, so
``os.system`` is as easy to reach as ``int``.  A local worker is code the
caller started on its own machine, as trusted as the caller.  A remote host
is another machine: if it is compromised, a crafted pickle in a result, an
event or an exception would turn that into code running in the caller, with
the caller's keys and files.  (mitogen refuses the same way.)

So the rpc client of a remote process (``anyfork.rpc``, ``anyfork.pool``,
``anyfork.Executor``) unpickles what comes from it with a ``find_class`` that
allows only:

- the builtins that are plain values: ``int``, ``str``, ``bytes``, ``list``,
  ``dict``, ``set``, ... and the built-in exception classes (not ``eval``,
  ``getattr``, ``__import__`` or any other function);
- a few value types of the standard library (:data:`DEFAULT`);
- what the caller names with ``allow=`` when it starts the connection
  (``anyfork.remote.new_exec`` or ``template``): ``"module.name"`` for one
  global, ``"module.*"`` for every global of a module and its submodules,
  or ``"*"`` for everything (plain pickle: for a host trusted as much as the
  caller itself).

Anything else fails that call with ``pickle.UnpicklingError`` naming the
global and the option.  json, bytes, msgpack and cbor2 build no objects of
their own choosing and need none of this; a custom serializer is the
caller's own code and is used as it is.
"""

from __future__ import annotations

import builtins
import io
import pickle
import re
from typing import TYPE_CHECKING, Any

from . import _rpc_wire as W
from ._errors import ProtocolError

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ._connection import Connection

#: Built-in values a pickle may name: types whose instances are only data
#: (calling them builds a value and runs nothing of the pickle's choosing).
_BUILTIN_VALUES = frozenset({
    "bool", "bytearray", "bytes", "complex", "dict", "float", "frozenset", "int", "list",
    "range", "set", "slice", "str", "tuple", "Ellipsis", "NotImplemented",
})
_BUILTIN_ERRORS = frozenset(
    name for name, value in vars(builtins).items()
    if isinstance(value, type) and issubclass(value, BaseException))

#: Standard library value types allowed by default (besides the builtins).
DEFAULT = (
    "collections.OrderedDict", "collections.defaultdict", "collections.deque", "collections.Counter",
    "datetime.date", "datetime.datetime", "datetime.time", "datetime.timedelta", "datetime.timezone",
    "decimal.Decimal", "fractions.Fraction", "uuid.UUID",
)


class Host:
    """A remote host as its processes know it: its name (for messages) and
    what results from it may unpickle to (``allow``)."""

    __slots__ = ("allow_all", "connection", "modules", "name", "names")

    def __init__(self, name: str, allow: Iterable[str] = ()) -> None:
        if isinstance(allow, (str, bytes)):
            raise TypeError("allow is a list of 'module.name', 'module.*' or '*', not one string")
        self.name = name
        # Its connection, where why one of its processes failed before its
        # function ran can be asked (``Connection.failure``).
        self.connection: Connection | None = None
        self.names: set[tuple[str, str]] = set()
        self.modules: set[str] = set()
        self.allow_all = False
        for entry in (*DEFAULT, *allow):
            if not isinstance(entry, str):
                raise TypeError(f"allow takes str entries ('module.name'), not {type(entry).__name__}")
            module, _, name = entry.rpartition(".")
            if entry == "*":
                self.allow_all = True
            elif name == "*" and module:
                self.modules.add(module)
            elif module and name:
                self.names.add((module, name))
            else:
                raise ValueError(f"allow entry {entry!r} is not 'module.name', 'module.*' or '*'")

    def __str__(self) -> str:
        return self.name

    def allows(self, module: str, name: str) -> bool:
        if self.allow_all or (module, name) in self.names:
            return True
        if module == "builtins" and (name in _BUILTIN_VALUES or name in _BUILTIN_ERRORS):
            return True
        return any(module == m or module.startswith(m + ".") for m in self.modules)


#: The bytes of the pickle opcodes that name a global: c (GLOBAL), i (INST),
#: \x82-\x84 (EXT1, EXT2, EXT4), \x93 (STACK_GLOBAL).
_NAMING = re.compile(rb"[ci\x82-\x84\x93]")


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, host: Host) -> None:
        super().__init__(io.BytesIO(data))
        self.host = host

    def find_class(self, module: str, name: str) -> Any:
        if not self.host.allows(module, name):
            raise pickle.UnpicklingError(
                f"what {self.host} sent names {module}.{name}, which anyfork does not unpickle from a "
                f"remote host unless asked to: pass allow=[{f'{module}.{name}'!r}] (or "
                f"[{f'{module}.*'!r}]) to anyfork.remote.new_exec() or template() if you trust it")
        return super().find_class(module, name)


class Pickle(W._Pickle):
    """The pickle codec for a remote process: restricted loads, no descriptors."""

    def __init__(self, host: Host) -> None:
        super().__init__()
        self.host = host
        self.quick_loads = pickle.loads if host.allow_all else self._quick_loads

    def _quick_loads(self, data: bytes) -> Any:
        # Only the opcodes that name a global (GLOBAL, INST, STACK_GLOBAL and
        # the copyreg extensions EXT1, EXT2, EXT4) reach find_class, and
        # nothing else in a pickle gets hold of a callable.  A pickle in
        # which none of their bytes occurs anywhere (not even inside a
        # string: this looks at every byte, not at opcodes) names no global,
        # so the C unpickler builds only built-in values from it: a tiny
        # result costs one scan, not a restricted Unpickler made for it.
        if _NAMING.search(data) is None:
            return pickle.loads(data)
        return _Unpickler(data, self.host).load()

    def loads(self, data: bytes, fds: list[int]) -> Any:
        if fds:
            W.close_fds(fds)
            raise ProtocolError(f"descriptors arrived from a process on {self.host}")
        if self.host.allow_all:
            return pickle.loads(data)
        return _Unpickler(data, self.host).load()


def codec_for(codec: W._Codec, host: Host | None) -> W._Codec:
    """The codec to decode what a process sends: ``codec``, or for pickle
    from a remote host, the restricted one."""
    if host is None or type(codec) is not W._Pickle:
        return codec
    return Pickle(host)
