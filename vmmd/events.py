"""Lifecycle events of the daemon and their fan-out to watchers.

The manager publishes one LifecycleEvent per transition (created, started,
paused, resumed, stopped with its reason, deleted); each WatchEvents stream
holds a Subscription, a bounded queue filtered by VM id.  A slow watcher
loses its oldest events, never blocks the publisher.
"""

from __future__ import annotations

import enum
import queue
import threading
import time
from collections.abc import Callable

from vmmd.info import StopKind
from vmmd.record import Record, field


class EventKind(enum.Enum):
    CREATED = "created"
    STARTED = "started"
    PAUSED = "paused"
    RESUMED = "resumed"
    STOPPED = "stopped"
    DELETED = "deleted"
    SNAPSHOT_TAKEN = "snapshot_taken"
    RESTORED = "restored"


class LifecycleEvent(Record):
    vm_id: str
    kind: EventKind
    time: float = field(default_factory=time.time)
    reason: StopKind | None = None  # STOPPED only
    message: str = ""


class Subscription:
    """notify, if given, is called (from the publisher's thread; it must not
    block) after each event is queued, and at the end."""

    def __init__(self, hub: EventHub, vm_id: str | None, maxsize: int = 1024,
                 notify: Callable[[], None] | None = None) -> None:
        self.vm_id = vm_id
        self._hub = hub
        self._notify = notify
        self.closed = False  # the hub ended this subscription
        self._q: queue.Queue[LifecycleEvent | None] = queue.Queue(maxsize)

    def offer(self, ev: LifecycleEvent) -> None:
        if self.vm_id is not None and ev.vm_id != self.vm_id:
            return
        while True:
            try:
                self._q.put_nowait(ev)
                break
            except queue.Full:
                try:
                    self._q.get_nowait()  # drop the oldest
                except queue.Empty:
                    pass
        if self._notify is not None:
            self._notify()

    def get(self, timeout: float | None = None) -> LifecycleEvent | None:
        """The next event; None on timeout (0: none queued) or once closed."""
        try:
            ev = self._q.get(timeout=timeout) if timeout != 0 else self._q.get_nowait()
        except queue.Empty:
            return None
        if ev is None:
            self.closed = True
        return ev

    def close(self) -> None:
        self._hub.unsubscribe(self)
        self.offer_end()

    def offer_end(self) -> None:
        try:
            self._q.put_nowait(None)
        except queue.Full:
            pass
        if self._notify is not None:
            self._notify()


class EventHub:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subs: list[Subscription] = []

    def subscribe(self, vm_id: str | None = None,
                  notify: Callable[[], None] | None = None) -> Subscription:
        sub = Subscription(self, vm_id, notify=notify)
        with self._lock:
            self._subs.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)

    def publish(self, ev: LifecycleEvent) -> None:
        with self._lock:
            subs = list(self._subs)
        for sub in subs:
            sub.offer(ev)

    def close_all(self) -> None:
        with self._lock:
            subs, self._subs = self._subs, []
        for sub in subs:
            sub.offer_end()
