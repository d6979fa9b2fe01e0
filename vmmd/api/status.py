"""The one table from vmmd exceptions to gRPC status codes (DESIGN: Errors)."""

from __future__ import annotations

import grpc

from vmmd import errors

_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (errors.InvalidSpecError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFoundError, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (errors.StateError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.BusyError, grpc.StatusCode.ABORTED),
    (errors.ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.DataLossError, grpc.StatusCode.DATA_LOSS),
    (errors.NativeError, grpc.StatusCode.INTERNAL),
    (errors.VmmError, grpc.StatusCode.INTERNAL),
)


# A status message travels in the response trailers; gRPC refuses trailers
# over 8 KiB (the client then sees RESOURCE_EXHAUSTED instead of our code).
# Messages quote client values shortened (errors.shown); this caps the rest.
MAX_MESSAGE = 1024


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code, _capped(str(exc))
    return grpc.StatusCode.INTERNAL, _capped(f"internal error: {type(exc).__name__}: {exc}")


def _capped(message: str) -> str:
    if len(message) <= MAX_MESSAGE:
        return message
    return message[:MAX_MESSAGE] + f"... ({len(message)} characters)"
