"""Reading a VM's console for streams: history from the C ring, then live.

Each reader keeps its own absolute position in the VM's console output; the
C core keeps the last 256 KiB.  A reader that falls behind the ring is told
how many bytes it lost.  Reading never blocks: a stream asks for what is
there, and waits (on its own terms: an asyncio event, a thread event) for
the VM's console watcher to say more may have come.
"""

from __future__ import annotations

from collections.abc import Callable

from vmmd.errors import NotFoundError
from vmmd.vm.vm import Vm

CHUNK = 16 * 1024


class ConsoleCursor:
    """One reader's place in a VM's console output."""

    def __init__(self, vm: Vm, *, from_start: bool) -> None:
        self._vm = vm
        self._ended = False
        try:
            self._pos = 0 if from_start else vm.console_head()
        except NotFoundError:  # deleted already: nothing to read
            self._pos, self._ended = 0, True

    def watch(self, fn: Callable[[], None]) -> Callable[[], None]:
        """fn() is called (from another thread) when more may be readable or
        the output ended; returns the function ending the watch."""
        return self._vm.watch_console(fn)

    def read(self) -> tuple[bytes, int, int] | None:
        """(data, offset, lost_bytes) of what is readable now; None when
        nothing is (see ended)."""
        if self._ended:
            return None
        try:
            # Looked at before reading: once stopped, every byte is readable,
            # so an empty read after it really is the end.
            stopped = self._vm.stop_info is not None
            data, new_pos = self._vm.console_read(self._pos, CHUNK)
        except NotFoundError:  # deleted under us: its output ended
            self._ended = True
            return None
        if not data:
            self._ended = stopped
            return None
        start = new_pos - len(data)
        lost, self._pos = start - self._pos, new_pos
        return data, start, lost

    @property
    def ended(self) -> bool:
        """The VM stopped (or was deleted) and everything was read."""
        return self._ended
