"""Domain exceptions of vmmd.

This module owns the exception vocabulary every layer raises.  It imports
nothing of vmmd.  The API layer translates these to gRPC status codes in one
table (api/status.py); the CLI prints them as one line.  Nothing else maps
errors.
"""

from __future__ import annotations

import errno as _errno
import os


class VmmError(Exception):
    """Base of every error vmmd raises on purpose."""


FieldPath = tuple[str | int, ...]


def render_path(path: FieldPath) -> str:
    """("config", "drives", 1, "path_on_host") -> "config.drives[1].path_on_host"."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


class InvalidSpecError(VmmError):
    """A caller-supplied value is wrong.  `path` names it, as a tuple of field
    names and list indexes in the API's own terms (internal names are the
    API's); each layer that knows more of the request prefixes it
    (`within`), and the gRPC edge renders it once (`field`)."""

    def __init__(self, path: FieldPath | str, problem: str) -> None:
        self.path: FieldPath = (path,) if isinstance(path, str) else tuple(path)
        self.problem = problem
        super().__init__(f"{self.field}: {problem}")

    @property
    def field(self) -> str:
        return render_path(self.path)

    def within(self, *prefix: str | int) -> InvalidSpecError:
        """The same error, one level further out: e.within("config")."""
        return type(self)(prefix + self.path, self.problem)

    def at(self, path: FieldPath) -> InvalidSpecError:
        """The same problem, reported at another field."""
        return type(self)(path, self.problem)


class NotFoundError(VmmError):
    """The named object (VM, snapshot, device) does not exist."""


class AlreadyExistsError(VmmError):
    """An object with that id exists already."""


class StateError(VmmError):
    """The verb is not allowed in the object's current state."""


class BusyError(VmmError):
    """Another operation holds what this one needs (a snapshot directory
    being written): nothing was changed; the caller may try again."""


class ResourceExhaustedError(VmmError):
    """A limit (VM count, memory, fds) would be exceeded."""


class DataLossError(VmmError):
    """Stored state (a snapshot) is truncated, altered or unreadable."""


class NativeError(VmmError):
    """The C core or KVM failed: `op` is what was attempted."""

    def __init__(self, op: str, err: int) -> None:
        self.op = op
        self.errno = err
        name = _errno.errorcode.get(err, str(err))
        super().__init__(f"{op}: {os.strerror(err)} ({name})")


MAX_ECHO = 100  # characters of a client's value an error message repeats


def shown(value: object) -> str:
    """A client's value as a message shows it: at most MAX_ECHO characters
    (a 100 000-character id must not come back in a status message)."""
    text = str(value)
    if len(text) <= MAX_ECHO:
        return text
    return f"{text[:MAX_ECHO]}... ({len(text)} characters)"


def quoted(value: str) -> str:
    """repr() of a client's string, shortened as shown() does."""
    if len(value) <= MAX_ECHO:
        return repr(value)
    return f"{value[:MAX_ECHO]!r}... ({len(value)} characters)"
