"""The VM lifecycle table: which verb is allowed in which phase.

One table, used by Vm (and the manager) before anything reaches the C
core, so a verb in the wrong phase fails with StateError naming the phase.
"""

from __future__ import annotations

from vmmd.errors import StateError
from vmmd.info import Phase

_ALLOWED: dict[str, frozenset[Phase]] = {
    "start": frozenset({Phase.CREATED}),
    "pause": frozenset({Phase.RUNNING, Phase.PAUSED}),
    "resume": frozenset({Phase.RUNNING, Phase.PAUSED}),
    "stop": frozenset({Phase.RUNNING, Phase.PAUSED}),
    "shut down": frozenset({Phase.RUNNING}),
    "snapshot": frozenset({Phase.PAUSED}),
    "write to the console of": frozenset({Phase.CREATED, Phase.RUNNING, Phase.PAUSED}),
}


def check_verb(verb: str, phase: Phase) -> None:
    if phase not in _ALLOWED[verb]:
        raise StateError(f"cannot {verb} a VM that is {phase.value}")


def allows(verb: str, phase: Phase) -> bool:
    return phase in _ALLOWED[verb]
