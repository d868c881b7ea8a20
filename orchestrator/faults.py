"""Fault injection for crash tests: ``ORCHESTRATOR_FAULT=point:n`` kills this process with
SIGKILL the n-th time execution reaches ``point``: "import" (root data), "user" (a user
of a per-user cell, in a block or a walk), "flush" (a walk's mid-cell shards written),
"block" (a block's cells computed, leased and staged), "publish" (inside the transaction).

Used by ``tests/test_faults.py`` to prove that a kill at any of those moments loses nothing
published and never exposes a partial cell. Without the variable, ``reached`` is a dictionary
lookup and a return.
"""

from __future__ import annotations

import os
import signal

_point, _, _count = os.environ.get("ORCHESTRATOR_FAULT", "").partition(":")
_remaining = {_point: int(_count or 1)} if _point else {}


def reached(point: str) -> None:
    """Count a pass through ``point``; die on the configured one."""
    if point in _remaining:
        _remaining[point] -= 1
        if _remaining[point] <= 0:
            os.kill(os.getpid(), signal.SIGKILL)


def armed(point: str) -> bool:
    """Whether ``point`` is the configured one (a hot loop then skips ``reached``)."""
    return point in _remaining
