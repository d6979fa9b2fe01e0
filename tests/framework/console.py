"""A VM's console read through the daemon (vmmd.client), in a thread, for tests to wait on."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import Self

import pytest

from tests.framework import GUEST_HANG_S
from vmmd.client import Client, ClientError

TICK = re.compile(rb"^MG-TICK (\d+)$", re.MULTILINE)


class ConsoleReader:
    """Collects a VM's console (from the start) in a thread."""

    def __init__(self, client: Client, vm_id: str) -> None:
        self.vm_id = vm_id
        self._data = b""
        self._cond = threading.Condition()
        self.ended = False
        self.error: ClientError | None = None
        self._stream = client.console(vm_id)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for chunk in self._stream:
                with self._cond:
                    self._data += chunk
                    self._cond.notify_all()
        except ClientError as e:
            self.error = e
        with self._cond:
            self.ended = True
            self._cond.notify_all()

    @property
    def data(self) -> bytes:
        with self._cond:
            return self._data

    def wait(self, done: Callable[[bytes], bool], what: str) -> bytes:
        with self._cond:
            self._cond.wait_for(lambda: done(self._data) or self.ended, GUEST_HANG_S)
            if not done(self._data):
                why = self.error or ("the stream ended" if self.ended else "timeout")
                pytest.fail(f"{self.vm_id}: no {what} ({why}); console:\n{self._data!r}")
            return self._data

    def wait_for(self, marker: bytes) -> bytes:
        return self.wait(lambda data: marker in data, repr(marker))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stream.cancel()
        self._thread.join(GUEST_HANG_S)


def ticks(console: bytes) -> list[int]:
    """The counts of the `MG-TICK n` lines (mg=tick) in console output."""
    return [int(n) for n in TICK.findall(console)]
