"""Local worker processes for standard cells: the users of a pass, split into ranges.

Standard calculations are independent per user, and a historical one only needs the same
user's previous result. So each worker owns a fixed, contiguous range of user ids
(``Partition``, stable for the whole run): it walks its users through every standard cell of a
pass, keeps its users' results for the next passes and dates, and returns its shards (cut and
compressed) with their raw payloads — or, past ``WORKER_INLINE_BYTES`` of a cell, writes them
itself under the cell's generation, in its own range of shard numbers, still unpublished. The
ranges ascend, so the parent only concatenates: the result hash is exactly a serial run's, and
shards differ only in where they are cut. The parent then decides, validates and publishes as
usual. Meta cells and publishing stay in the parent.

Workers are forked after the root data is opened — a dataset held in memory is shared
copy-on-write (no re-read, no pickling of the rows); a root store is read through the worker's
own connection, only its range — and before any result is cached, so they start from the
parent's exact state. A worker reads published results it has not computed itself (meta
results, earlier runs) from the ledger with its own connections.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, NamedTuple, Self

from orchestrator import validation
from orchestrator.errors import OrchestratorError
from orchestrator.execution.record import _CellRun
from orchestrator.execution.walk import STORED_FAILURES
from orchestrator.rootdata import Dataset

if TYPE_CHECKING:
    from orchestrator.execution.walk import UserWalk
    from orchestrator.planning import Decision


class Partition(NamedTuple):
    """Contiguous ranges of user ids, one per worker: ``boundaries[k-1] <= user <
    boundaries[k]`` belongs to worker k. Ranges, not hashes, so the workers' outputs
    concatenate in user order (no merge) and each worker cuts and compresses its own shards.

    There are always ``count - 1`` boundaries, however few users were sampled: every worker
    has a span (possibly empty) and every user id belongs to exactly one of them."""

    boundaries: tuple[str, ...]

    @classmethod
    def balanced(cls, users: set[str], count: int) -> Partition:
        """Ranges holding about as many of ``users`` each.

        Args:
            users: a sample of the user ids (any sample gives correct results; a
                representative one balances the work). May be empty: then the last worker
                takes every user (boundaries ``""`` sort before every id).
            count: number of workers, >= 1.

        Returns:
            A partition with ``count`` spans.

        Raises:
            ValueError: ``count`` < 1.
        """
        if count < 1:
            raise ValueError(f"a partition needs at least one worker, not {count}")
        ordered = sorted(users)
        if not ordered:
            return cls(("",) * (count - 1))
        return cls(tuple(ordered[len(ordered) * k // count] for k in range(1, count)))

    @property
    def size(self) -> int:
        """Number of spans (workers)."""
        return len(self.boundaries) + 1

    def span(self, index: int) -> tuple[str | None, str | None]:
        """Worker ``index``'s users: ``lo <= user < hi`` (None: unbounded).

        Raises:
            IndexError: ``index`` is not in ``0 .. size - 1``.
        """
        if not 0 <= index < self.size:
            raise IndexError(f"worker {index} is outside a partition of {self.size}")
        b = self.boundaries
        return (b[index - 1] if index > 0 else None, b[index] if index < len(b) else None)


# Shard numbers of worker k start at k * SEQ_SPAN (within the ledger's 32-bit seq column).
SEQ_SPAN = 10_000_000


class _Part(NamedTuple):
    """One worker's share of one cell."""

    processed: int
    failures: int
    inherited: int
    failed_users: list[dict[str, str]]  # its first STORED_FAILURES of each kind, user order
    aborted: str | None
    flushes: int
    raws: list[bytes]
    rows: list[dict[str, Any]]
    keep: dict[str, Any] | None
    stats: validation.Stats
    flush_reasons: dict[str, int]
    spilled: bool
    written: bool  # the worker wrote its shards itself: ``raws`` and ``rows`` are empty
    counts: tuple[int, int, int]  # users, raw bytes, compressed bytes of its shards


def _stats(run: _CellRun) -> validation.Stats:
    """A worker's validation statistics of one cell: what its flushes folded in, plus the
    results since."""
    stats = run.stats or validation.Stats()
    stats.merge(validation.collect(run.recent))
    run.recent.clear()
    return stats


class WorkerError(OrchestratorError):
    """A worker process failed outside user code (a bug, or it was killed, e.g. out of
    memory). Nothing of its pass was published; running again resumes (exit code 1)."""

    exit_code = 1


def _serve(
    executor: UserWalk, conn: Connection, index: int, partition: Partition, send_results: set[str]
) -> None:
    # The parent's pooled connections must not be shared: drop them here, open our own.
    executor.ledger.engine.dispose(close=False)
    executor.pool = None
    executor.in_worker = True
    while True:
        message = conn.recv()
        if message is None:
            return
        date, cells, handed, generations = message
        for key, value in handed.items():  # upstream results not published yet
            executor.cache.put(key, value)
        try:
            runs = executor._prepare(
                date, [(executor.manifest.calcs[name], decision) for name, decision in cells]
            )
            for run, generation in zip(runs, generations, strict=True):
                run.writer.keep_raw = True
                run.writer.generation = generation  # the parent's: one cell, one generation
                run.writer.seq = index * SEQ_SPAN  # worker ranges ascend, and so do their seqs
            for ds in {ds for run in runs for ds in run.spec.root_data}:
                dataset = executor.dataset(ds)
                if isinstance(dataset, Dataset):  # index only this worker's users' histories
                    dataset.focus(*partition.span(index))
            before = executor.summary.users_processed
            executor._walk(date, runs, partition.span(index))
            parts = []
            for run in runs:
                rows = run.writer.cut()
                executor.hand_over(run, rows)
                writer = run.writer
                parts.append(
                    _Part(
                        run.processed,
                        run.failures,
                        run.inherited,
                        run.failed_users,
                        run.aborted,
                        run.flushes + (1 if rows else 0),
                        writer.raws,
                        run.pending,
                        run.keep if run.spec.name in send_results else None,
                        _stats(run),
                        {**run.flush_reasons, **({"FINAL": 1} if rows else {})},
                        run.spilled,
                        run.written,
                        (writer.users, writer.bytes_raw, writer.bytes_compressed),
                    )
                )
                # This worker's users' results, for its later passes and dates.
                if run.keep is not None:
                    executor.cache.put((run.spec.name, date), run.keep)
            conn.send(("ok", parts, executor.summary.users_processed - before))
        except BaseException:  # noqa: BLE001 - reported to the parent, which raises
            conn.send(("error", traceback.format_exc(), 0))
            return


class ForkedPool:
    """Forked worker processes, one pipe each (``connections[i]`` talks to
    ``processes[i]``); a worker stops when it receives None. Use as a context manager."""

    connections: list[Connection]
    processes: list[Any]

    def _fork(
        self,
        count: int,
        target: Callable[..., None],
        args: Callable[[int, Connection], tuple[Any, ...]],
        label: str,
    ) -> None:
        """Start ``count`` processes running ``target(*args(index, pipe end))``."""
        context = multiprocessing.get_context("fork")
        self.connections, self.processes = [], []
        for index in range(count):
            parent, child = context.Pipe()
            process = context.Process(
                target=target, args=args(index, child), daemon=True, name=f"{label}-{index}"
            )
            process.start()
            child.close()
            self.connections.append(parent)
            self.processes.append(process)

    def close(self) -> None:
        for conn in self.connections:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for process in self.processes:
            process.join(timeout=5)
            if process.is_alive():
                process.terminate()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class WorkerPool(ForkedPool):
    """``count`` forked workers serving one executor. Use as a context manager.

    Args:
        executor: the executor to fork (its root datasets already parsed).
        count: number of worker processes.
        users: user ids the run may see, or an evenly spaced sample of them (for balanced
            ranges; any ranges give the same results).
    """

    def __init__(self, executor: UserWalk, count: int, users: set[str]):
        self.partition = Partition.balanced(users, count)
        # Standard results the parent needs whole: those a meta calculation reads.
        send = {
            d for s in executor.manifest.calcs.values() if not s.is_standard for d in s.dependencies
        }
        self._fork(
            count,
            _serve,
            lambda index, child: (executor, child, index, self.partition, send),
            "orchestrator-worker",
        )

    def compute(self, date: dt.date, runs: list[_CellRun], executor: UserWalk) -> None:
        """Run the standard cells ``runs`` of ``date`` on every worker and gather their parts
        into ``runs``: shards in user order (worker ranges ascend), counts, whole results
        where a meta calculation needs them.

        Raises:
            WorkerError: a worker died or failed outside user code.
        """
        cells: list[tuple[str, Decision]] = [(r.spec.name, r.decision) for r in runs]
        # Meta upstream results of this date come with the task: they are not published yet
        # (a date is published as a whole), and the workers do not compute them.
        handed = {
            (dep, date): executor.cache.get((dep, date))
            for run in runs
            for dep in run.spec.dependencies
            if not executor.manifest.calcs[dep].is_standard
        }
        generations = [r.writer.generation for r in runs]
        for conn in self.connections:
            conn.send((date, cells, handed, generations))
        replies = []
        for conn in self.connections:
            try:
                status, payload, users = conn.recv()
            except EOFError as e:
                raise WorkerError(
                    "a worker process died (killed, or out of memory?); nothing of its pass "
                    "was published; run again to resume"
                ) from e
            if status != "ok":
                raise WorkerError(f"a worker process failed:\n{payload}")
            replies.append(payload)
            executor.summary.users_processed += users
        for i, run in enumerate(runs):
            parts: list[_Part] = [reply[i] for reply in replies]
            run.processed = sum(p.processed for p in parts)
            run.failures = sum(p.failures for p in parts)
            run.inherited = sum(p.inherited for p in parts)
            run.flushes = sum(p.flushes for p in parts)
            # Worker order is user order: the first of each kind are a serial run's.
            run.failed_users = [
                f
                for kind in ("own", "upstream")
                for f in [f for p in parts for f in p.failed_users if f["kind"] == kind][
                    :STORED_FAILURES
                ]
            ]
            run.aborted = next((p.aborted for p in parts if p.aborted), None)
            run.spilled = any(p.spilled for p in parts)
            run.stats = validation.Stats()
            for k, p in enumerate(parts):  # worker order is user order
                for reason, count in p.flush_reasons.items():
                    run.flush_reasons[reason] = run.flush_reasons.get(reason, 0) + count
                if p.written:
                    run.writer.absorb_written(
                        executor.ledger.unpublished_payloads(
                            run.spec.name,
                            date,
                            run.writer.generation,
                            (k * SEQ_SPAN, (k + 1) * SEQ_SPAN),
                        ),
                        *p.counts,
                    )
                else:
                    run.writer.absorb(p.raws, p.rows)
                run.stats.merge(p.stats)
            if run.keep is not None and all(p.keep is not None for p in parts):
                for p in parts:
                    run.keep.update(p.keep or {})
            else:
                run.keep = None  # not needed whole by the parent; readers load it if ever
