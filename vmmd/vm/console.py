"""Reading a VM's console for streams: history from the C ring, then live.

Each reader keeps its own absolute position in the VM's console output; the
C core keeps the last 256 KiB.  A reader that falls behind the ring is told
how many bytes it lost.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from vmmd.errors import NotFoundError
from vmmd.vm.vm import Vm

CHUNK = 16 * 1024
POLL_S = 0.5  # how often a blocked reader looks at `cancelled`


def follow_console(vm: Vm, *, from_start: bool, follow: bool,
                   cancelled: threading.Event) -> Iterator[tuple[bytes, int, int]]:
    """Yield (data, offset, lost_bytes); stop at the end of output when not
    following, once the VM stopped and everything was read, once it was
    deleted, or on cancel."""
    try:
        pos = 0 if from_start else vm.console_head()
        while not cancelled.is_set():
            # Looked at before reading: once stopped, every byte is readable,
            # so an empty read after it really is the end.
            stopped = vm.stop_info is not None
            data, new_pos = vm.console_read(pos, CHUNK)
            if data:
                start = new_pos - len(data)
                yield data, start, start - pos
                pos = new_pos
                continue
            if not follow or stopped:
                return
            vm.wait_console(pos, POLL_S)
    except NotFoundError:  # deleted under us: its output ended
        return
