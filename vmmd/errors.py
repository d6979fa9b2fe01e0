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


class InvalidSpecError(VmmError):
    """A caller-supplied value is wrong.  `field` names it (dotted path)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


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
