"""RemoteNativeVm's own rules (vmmd/cell/remote.py), on a fake channel."""

from __future__ import annotations

import os
from typing import Any

from vmmd.cell import wire
from vmmd.cell.remote import RemoteNativeVm


class _Channel:
    """A worker that made VM 1 and answers every other call with nothing."""

    def call(self, vm: int, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        if method == "create":
            efd, cfd = (os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(2))
            return [1, wire.Fd(efd), wire.Fd(cfd)]
        return [None]


def test_a_worker_lost_after_close_writes_to_no_reused_fd() -> None:
    """The zygote reader tells a VM its worker died (lost()) while DeleteVm closes it:
    the VM's event fd number may already be another file's, which must not be written."""
    native = RemoteNativeVm(_Channel(), "/dev/null", "c")  # type: ignore[arg-type]
    numbers = {native.event_fd, native.console_notify_fd}
    native.close()
    reused: list[int] = []
    spare: list[int] = []  # lower free numbers taken on the way
    while len(reused) < 2 and len(spare) < 16:
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        (reused if fd in numbers else spare).append(fd)
    for fd in spare:
        os.close(fd)
    try:
        assert set(reused) == numbers  # the VM's old numbers, another file's now
        native.lost("the worker died")
        for fd in reused:
            try:
                os.eventfd_read(fd)
                raise AssertionError(f"lost() wrote fd {fd}, another file's since close()")
            except BlockingIOError:
                pass
    finally:
        for fd in reused:
            os.close(fd)
