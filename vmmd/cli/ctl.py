"""`vmmctl`: the client CLI of the vmmd daemon.

The daemon and its gRPC API arrive with the daemon issue; until then this
entry point exists so packaging is complete, and says so plainly.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    print("vmmctl: the vmmd daemon API is not available in this version; use `vmmd run`",
          file=sys.stderr)
    return 2
