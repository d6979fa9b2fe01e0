"""The VM lifecycle table: which verb is allowed in which state.

One table, used by Vm before it calls into the C core, so a verb in the
wrong state fails with StateError naming the state, and never reaches C.
"""

from __future__ import annotations

import enum

from vmmd.errors import StateError


class State(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    CRASHED = "crashed"


_ALLOWED: dict[str, frozenset[State]] = {
    "start": frozenset({State.CREATED}),
    "pause": frozenset({State.RUNNING, State.PAUSED}),
    "resume": frozenset({State.RUNNING, State.PAUSED}),
    "stop": frozenset({State.RUNNING, State.PAUSED}),
    "snapshot": frozenset({State.PAUSED}),
}


def check_verb(verb: str, state: State) -> None:
    if state not in _ALLOWED[verb]:
        raise StateError(f"cannot {verb} a VM that is {state.value}")
