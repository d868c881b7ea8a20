"""Fault injection for crash tests: ``ORCHESTRATOR_FAULT=point:n`` kills this process with
SIGKILL the n-th time execution reaches ``point`` ("import", "user", "flush", "publish").

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
