"""The one table from vmmd's exceptions to gRPC status codes (vmmd/api/status.py)."""

from __future__ import annotations

import errno
import inspect

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmmd import errors
from vmmd.api.status import MAX_MESSAGE, status_for

C = grpc.StatusCode
# Written out here, not read from the table: the contract of the API (vmm.proto's header).
EXPECTED = {
    errors.InvalidSpecError: C.INVALID_ARGUMENT,
    errors.NotFoundError: C.NOT_FOUND,
    errors.AlreadyExistsError: C.ALREADY_EXISTS,
    errors.StateError: C.FAILED_PRECONDITION,
    errors.BusyError: C.ABORTED,
    errors.ResourceExhaustedError: C.RESOURCE_EXHAUSTED,
    errors.DataLossError: C.DATA_LOSS,
    errors.NativeError: C.INTERNAL,
    errors.VmmError: C.INTERNAL,
}


def example(cls: type[errors.VmmError]) -> errors.VmmError:
    if issubclass(cls, errors.InvalidSpecError):
        return cls(("drives", 0, "path_on_host"), "no such file")
    if issubclass(cls, errors.NativeError):
        return cls("create VM", errno.ENOENT)
    return cls("the message")


def test_every_error_class_is_in_the_table() -> None:
    classes = {c for _, c in inspect.getmembers(errors, inspect.isclass)
               if issubclass(c, errors.VmmError)}
    assert classes == set(EXPECTED)


@pytest.mark.parametrize("cls", list(EXPECTED), ids=lambda c: c.__name__)
def test_each_error_class_has_its_code_and_its_own_message(cls: type[errors.VmmError]) -> None:
    exc = example(cls)
    assert status_for(exc) == (EXPECTED[cls], str(exc))


def test_messages_say_the_field_and_the_errno() -> None:
    assert status_for(example(errors.InvalidSpecError))[1] == \
        "drives[0].path_on_host: no such file"
    assert status_for(example(errors.NativeError))[1] == \
        "create VM: No such file or directory (ENOENT)"


@pytest.mark.parametrize("cls", [c for c in EXPECTED if c is not errors.VmmError],
                         ids=lambda c: c.__name__)
def test_a_subclass_keeps_its_base_class_code(cls: type[errors.VmmError]) -> None:
    sub = type(f"Sub{cls.__name__}", (cls,), {})
    assert status_for(example(sub))[0] == EXPECTED[cls]


@pytest.mark.parametrize("exc", [ValueError("boom"), KeyError("k"), OSError(5, "I/O error"),
                                 AssertionError(), RuntimeError("x" * 5000)],
                         ids=lambda e: type(e).__name__)
def test_an_unexpected_exception_is_internal_and_says_what_it_was(exc: Exception) -> None:
    code, message = status_for(exc)
    assert code == C.INTERNAL
    assert message.startswith(f"internal error: {type(exc).__name__}: ")
    assert len(message) <= MAX_MESSAGE + 40


@given(st.sampled_from(list(EXPECTED)), st.text(max_size=3 * MAX_MESSAGE))
def test_a_message_is_capped_at_max_message(cls: type[errors.VmmError], text: str) -> None:
    if cls is errors.InvalidSpecError:
        exc: errors.VmmError = cls("f", text)
    elif cls is errors.NativeError:
        exc = cls(text, errno.EIO)
    else:
        exc = cls(text)
    full = str(exc)
    _, message = status_for(exc)
    if len(full) <= MAX_MESSAGE:
        assert message == full
    else:
        assert message == full[:MAX_MESSAGE] + f"... ({len(full)} characters)"
