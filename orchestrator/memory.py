"""Memory helpers for the bulk steps (root data parsing, ledger snapshot, planning).

Those steps allocate hundreds of thousands of small objects that all stay alive; CPython's
cyclic garbage collector would rescan them again and again as they accumulate (measured: it
doubled root data parsing and added ~0.9 s to loading a 365,000-cell ledger). None of them
form cycles, so the collector is paused while they are built, and then frozen: moved to the
permanent generation, which later collections skip. Freezing never keeps acyclic objects
alive — reference counting still frees them — it only spares the collector's rescans.
"""

from __future__ import annotations

import gc
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psutil


@contextmanager
def paused_gc(freeze: bool = False) -> Iterator[None]:
    """Pause the cyclic GC for the block; with ``freeze``, move everything alive afterwards to
    the permanent generation so later collections skip it too (for long-lived data)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if freeze:
            gc.freeze()
        if enabled:
            gc.enable()


def tree_pss(process: psutil.Process, each: dict[int, int] | None = None) -> int:
    """Proportional set size in bytes of ``process`` and its children: forked workers' shared
    copy-on-write pages count once. Read from /proc/PID/smaps_rollup (cheap, unlike a full
    smaps read, which would load the machine being measured); RSS where unavailable.
    ``each``: also record each process's peak there (pid -> bytes)."""
    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            with open(f"/proc/{member.pid}/smaps_rollup") as f:
                size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration):
            try:
                size = member.memory_info().rss
            except psutil.Error:
                continue
        total += size
        if each is not None:
            each[member.pid] = max(each.get(member.pid, 0), size)
    return total


def run_measured(
    args: list[str],
    cwd: str | object,
    poll_seconds: float = 1.0,
    each: dict[int, int] | None = None,
) -> tuple[float, int, subprocess.CompletedProcess[str]]:
    """Run a command to completion; returns (wall seconds, peak ``tree_pss`` in bytes, the
    completed process). Memory is polled every ``poll_seconds`` (each poll reads every
    process's smaps_rollup: too often would load the machine being measured); the wall time
    is not rounded to a poll, since the wait returns as soon as the process ends. ``each``:
    also each process's peak PSS (pid -> bytes; the command's own pid included)."""
    start = time.perf_counter()
    proc = psutil.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while True:
        try:
            peak = max(peak, tree_pss(proc, each))
        except psutil.Error:
            pass
        try:
            proc.wait(timeout=poll_seconds)
            break
        except psutil.TimeoutExpired:
            continue
    out, err = proc.communicate()
    return (
        time.perf_counter() - start,
        peak,
        subprocess.CompletedProcess(args, proc.returncode or 0, out, err),
    )
