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
from dataclasses import dataclass, field


class EventKind(enum.Enum):
    CREATED = "created"
    STARTED = "started"
    PAUSED = "paused"
    RESUMED = "resumed"
    STOPPED = "stopped"
    DELETED = "deleted"
    SNAPSHOT_TAKEN = "snapshot_taken"
    RESTORED = "restored"


class ApiStopReason(enum.Enum):
    POWEROFF = "poweroff"
    REBOOT = "reboot"
    CRASH = "crash"
    STOPPED_BY_API = "stopped_by_api"


@dataclass(frozen=True)
class LifecycleEvent:
    vm_id: str
    kind: EventKind
    time: float = field(default_factory=time.time)
    reason: ApiStopReason | None = None
    message: str = ""


class Subscription:
    def __init__(self, hub: EventHub, vm_id: str | None, maxsize: int = 1024) -> None:
        self.vm_id = vm_id
        self._hub = hub
        self.closed = False  # the hub ended this subscription
        self._q: queue.Queue[LifecycleEvent | None] = queue.Queue(maxsize)

    def offer(self, ev: LifecycleEvent) -> None:
        if self.vm_id is not None and ev.vm_id != self.vm_id:
            return
        while True:
            try:
                self._q.put_nowait(ev)
                return
            except queue.Full:
                try:
                    self._q.get_nowait()  # drop the oldest
                except queue.Empty:
                    pass

    def get(self, timeout: float | None = None) -> LifecycleEvent | None:
        """The next event; None on timeout or once closed."""
        try:
            ev = self._q.get(timeout=timeout)
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


class EventHub:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subs: list[Subscription] = []

    def subscribe(self, vm_id: str | None = None) -> Subscription:
        sub = Subscription(self, vm_id)
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
