"""Local worker processes for blocks: one block's users, split into ranges, over the contract.

A standard calculation treats users independently (its per-user form has no other way; its
columnar form must keep to that, see ``Frame``), so a block over ``dates × users`` is the
concatenation of the same block over consecutive user ranges. ``BlockPool.run`` takes one
``BlockTask``, gives each worker the task restricted to one range (``slice_task``: the range's
slices of upstream and previous results), runs ``blocks.run_block`` there and joins the
outcomes (``merge_outcomes``): tables concatenated in user order, counts summed, the stored
failed users and the circuit breaker exactly a serial run's. The parent then validates,
writes and publishes as usual, so result hashes are a serial run's.

Workers are forked once per run, after the root matrices are built, so each holds them
copy-on-write and a task carries only the dataset's name; a task's upstream results travel
by pickle, sliced to its range. This is the contract a distributed executor implements:
``BlockTask`` in, ``BlockOutcome`` out, value types only.
"""

from __future__ import annotations

import dataclasses
import traceback
from collections.abc import Collection, Sequence
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from orchestrator.columns import Table, concat
from orchestrator.execution.blocks import (
    BlockOutcome,
    BlockTask,
    DateOutcome,
    RootMatrix,
    run_block,
)
from orchestrator.execution.workers import ForkedPool, Partition, WorkerError

if TYPE_CHECKING:
    from orchestrator.manifest import Manifest

# A block with fewer candidate users than this runs in the parent: splitting costs more.
MIN_SPLIT_USERS = 64


def _slice(table: Any, lo: str | None, hi: str | None) -> Any:
    """The users ``lo <= user < hi`` of a standard result (a Table; None stays None)."""
    return None if table is None else table.between(lo, hi)


def slice_task(task: BlockTask, lo: str | None, hi: str | None) -> BlockTask:
    """``task`` restricted to the users ``lo <= user < hi`` (None: unbounded): its standard
    upstream and previous results hold only those users, and the circuit breaker is left
    to ``merge_outcomes``."""
    memo: dict[int, Any] = {}  # a window's tables recur date after date

    def cut(table: Any) -> Any:
        key = id(table)
        if key not in memo:
            memo[key] = _slice(table, lo, hi)
        return memo[key]

    upstream = {
        dep: up if up.meta else up._replace(results=[cut(t) for t in up.results])
        for dep, up in task.upstream.items()
    }
    previous = cut(task.previous) if isinstance(task.previous, Table) else task.previous
    return dataclasses.replace(
        task, upstream=upstream, previous=previous, user_range=(lo, hi), breaker=False
    )


def _capped(entries: Sequence[dict[str, str]], limit: int) -> list[dict[str, str]]:
    """The first ``limit`` failed users of each kind, in user order (a serial run keeps)."""
    seen: dict[str, int] = {}
    out = []
    for entry in entries:
        kind = entry["kind"]
        if seen.get(kind, 0) < limit:
            seen[kind] = seen.get(kind, 0) + 1
            out.append(entry)
    return out


def merge_dates(
    parts: Sequence[DateOutcome], limit: int, breaker: tuple[int, float] | None
) -> DateOutcome:
    """One date's outcome from its user ranges' (ascending, each computed with
    ``breaker=False``).

    Args:
        parts: the ranges' outcomes of the date, in user order.
        limit: failed users kept per kind.
        breaker: the per-user form's (breaker_min_users, max_failure_rate): the date is
            aborted at the first own failure where a serial run's would trip; None for the
            columnar form (its rate is checked over the whole date afterwards).
    """
    processed = failures = inherited = 0
    failed_users: list[dict[str, str]] = []
    tables: list[Table] = []
    for part in parts:
        if breaker is not None:
            min_users, max_rate = breaker
            for p, f, ih, n_failed in part.events:
                at, fails = processed + p, failures + f
                if at >= min_users and fails / at > max_rate:
                    aborted = (
                        f"circuit breaker: {fails} of {at} users failed "
                        f"({fails / at:.0%} > {max_rate:.0%})"
                    )
                    kept = _capped(failed_users + part.failed_users[:n_failed], limit)
                    table = concat(tables) if tables else Table([], {})
                    return DateOutcome(table, at, fails, inherited + ih, kept, aborted)
        processed += part.processed
        failures += part.failures
        inherited += part.inherited
        failed_users += part.failed_users
        if len(part.table):
            tables.append(part.table)
    table = concat(tables) if tables else parts[0].table
    return DateOutcome(table, processed, failures, inherited, _capped(failed_users, limit))


def merge_outcomes(
    task: BlockTask, outcomes: Sequence[BlockOutcome], breaker: tuple[int, float] | None
) -> BlockOutcome:
    """The outcome of ``task`` from the outcomes of its user ranges (``slice_task``),
    ascending: the first range's error fails the block as a whole, as ``compute`` raising
    over all users would."""
    users = sum(o.users for o in outcomes)
    for outcome in outcomes:
        if outcome.error is not None:
            return BlockOutcome(outcome.error, users)
    dates = [
        merge_dates([o.tables[i] for o in outcomes], task.stored_failures, breaker)  # type: ignore[index]
        for i in range(len(task.dates))
    ]
    processed = (
        sum(d.processed for d in dates) if task.per_user else sum(o.processed for o in outcomes)
    )
    return BlockOutcome(None, users, processed, tables=dates)


def _candidates(task: BlockTask) -> list[str]:
    """Sorted user ids the block may hold (for balanced ranges; any ranges are correct)."""
    for matrix, _ in task.root.values():
        return matrix.users.tolist()
    for up in task.upstream.values():
        if not up.meta:
            for table in up.results:
                if table is not None and len(table):
                    return table.users
    return []


def splits(task: BlockTask, held: Collection[str]) -> bool:
    """Whether a runner holding the root matrices ``held`` splits ``task`` by user ranges:
    a per-user standard block over enough users (``MIN_SPLIT_USERS``) whose root data it
    holds."""
    return (
        task.per_user
        and not task.meta
        and all(ds in held for ds in task.root)
        and len(_candidates(task)) >= MIN_SPLIT_USERS
    )


def _portable(task: BlockTask) -> BlockTask:
    """``task`` as it travels: the workers hold the matrices and classes (forked)."""
    root: dict[str, tuple[Any, int]] = {ds: (None, lb) for ds, (_, lb) in task.root.items()}
    return dataclasses.replace(task, calculation=type(None), root=root)


def _serve(matrices: dict[str, RootMatrix], manifest: Manifest, conn: Connection) -> None:
    while True:
        message = conn.recv()
        if message is None:
            return
        try:
            task = dataclasses.replace(
                message,
                calculation=manifest.calcs[message.name].cls,
                root={ds: (matrices[ds], lb) for ds, (_, lb) in message.root.items()},
            )
            conn.send(("ok", run_block(task)))
        except BaseException:  # noqa: BLE001 - reported to the parent, which raises
            conn.send(("error", traceback.format_exc()))
            return


class BlockPool(ForkedPool):
    """``count`` forked workers computing standard blocks by user ranges. Use as a context
    manager.

    Args:
        matrices: every root matrix a block of the run may read (built before the fork, so
            the workers share them copy-on-write).
        manifest: the calculations (a task names its class).
        count: number of worker processes, >= 2.
    """

    def __init__(self, matrices: dict[str, RootMatrix], manifest: Manifest, count: int):
        self.count = count
        self.matrices = matrices
        self._fork(
            count,
            _serve,
            lambda _, child: (matrices, manifest, child),
            "orchestrator-block-worker",
        )

    def takes(self, task: BlockTask) -> bool:
        """Whether ``task`` is split over the workers: a per-user block over enough users
        whose root matrices the workers hold. A columnar block stays in the parent: its
        NumPy work is cheaper than sending its inputs and outputs (WORKLOAD large A: 1.3 s
        in one process, 2.2 s over two)."""
        return splits(task, self.matrices)

    def run(self, task: BlockTask, breaker: tuple[int, float] | None) -> BlockOutcome:
        """``run_block(task)``, its users split over the workers (``takes`` must hold).

        Args:
            breaker: the per-user form's (breaker_min_users, max_failure_rate), else None.

        Raises:
            WorkerError: a worker died or failed outside user code.
        """
        users = _candidates(task)
        partition = Partition(
            tuple(users[len(users) * k // self.count] for k in range(1, self.count))
        )
        for index, conn in enumerate(self.connections):
            conn.send(_portable(slice_task(task, *partition.span(index))))
        outcomes = []
        for conn in self.connections:
            try:
                status, payload = conn.recv()
            except EOFError as e:
                raise WorkerError(
                    "a block worker process died (killed, or out of memory?); nothing of its "
                    "block was published; run again to resume"
                ) from e
            if status != "ok":
                raise WorkerError(f"a block worker process failed:\n{payload}")
            outcomes.append(payload)
        return merge_outcomes(task, outcomes, breaker)
