"""Blocks on a dask.distributed cluster: two kinds of task.

**Per-user blocks over datasets held in memory** (``run``): one task per user range of a
block, the same split as the forked ``BlockPool`` (``blockpool.slice_task`` in,
``merge_outcomes`` out), so a block's outcome, and therefore every result hash, is a serial
run's. The root matrices are scattered once per run to every worker (``Client.scatter(...,
broadcast=True)``) and a task names them; upstream and previous results travel with the
task, sliced to its user range. Such a task is pure (no I/O).

**Columnar blocks over root stores** (``submit``): one task per user range of a ranged pass
(``ranged.RangeOrder``). Its worker reads the range's upstream and previous results from the
shared ledger, its root data from the root store files (a ``LocalCluster``: the same machine)
or from the order (a remote cluster: read by the run), computes the pass's blocks and writes
their shards to the ledger under the dates' unpublished generations. Only the run's process
publishes, atomically, after reading the payloads back for the result hashes in user order.
A range computed again replaces its first attempt's shards (``Ledger.write_shard_span``).

Either way the calculation's class travels by value (``cloudpickle``, its package registered
by value), so a worker needs ``orchestrator`` installed but not the user's calculations. When
a worker dies dask runs its task again on another (``distributed.scheduler.allowed-failures``);
when it cannot (every worker lost, ``KilledWorker``) the block fails the run with
``WorkerError`` and nothing of it is published, as with the forked pool. Without a
``scheduler`` address a ``LocalCluster`` of ``workers`` processes is started for the run and
closed after it.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import TYPE_CHECKING, Any, Self

import cloudpickle

from orchestrator.errors import ConfigError
from orchestrator.execution.blockpool import (
    _candidates,
    merge_outcomes,
    slice_task,
    splits,
)
from orchestrator.execution.blocks import BlockOutcome, BlockTask, run_block
from orchestrator.execution.ranged import RangeOrder, WrittenBlock, compute_written
from orchestrator.execution.workers import Partition, WorkerError

if TYPE_CHECKING:
    from orchestrator.execution.blocks import RootMatrix
    from orchestrator.manifest import Manifest

# How long a run waits for a scheduler to answer before it aborts (exit 2, nothing ran).
CONNECT_TIMEOUT = "20s"

# User ranges per worker and block: a little more than one, so a slow or lost worker's
# share is rebalanced.
RANGES_PER_WORKER = 2


def _compute_written(order: RangeOrder, classes: list[bytes]) -> list[WrittenBlock]:
    """On a worker: one user range of a ranged pass, its classes put back, computed and its
    shards written to the ledger (``ranged.compute_written``)."""
    return compute_written(order, [cloudpickle.loads(blob) for blob in classes])


def _compute(task: BlockTask, calculation: bytes, matrices: dict[str, Any]) -> BlockOutcome:
    """On a worker: the task with its class and root matrices put back, run."""
    task = dataclasses.replace(
        task,
        calculation=cloudpickle.loads(calculation),
        root={ds: (matrices[ds], lb) for ds, (_, lb) in task.root.items()},
    )
    return run_block(task)


class DaskBlocks:
    """A ``BlockRunner`` on a dask.distributed cluster. Use as a context manager.

    Args:
        matrices: every root matrix a block of the run may read (scattered to the workers).
        manifest: the calculations (their classes travel by value).
        scheduler: a running scheduler's address ("tcp://host:8786"), or None for a
            ``LocalCluster`` of ``workers`` processes, one thread each.
        workers: the ``LocalCluster``'s processes (without ``scheduler``).

    Raises:
        ConfigError: (entering) the scheduler cannot be reached, or no worker joined.
    """

    def __init__(
        self,
        matrices: dict[str, RootMatrix],
        manifest: Manifest,
        scheduler: str | None,
        workers: int,
    ):
        self.matrices = matrices
        self.manifest = manifest
        self.scheduler = scheduler
        self.workers = max(1, workers)
        self.cluster: Any = None
        self.client: Any = None
        self._scattered: dict[str, Any] = {}
        self._classes: dict[str, bytes] = {}
        self._workers: int | None = None

    def __enter__(self) -> Self:
        try:
            from distributed import Client, LocalCluster
        except ImportError as e:  # found by ``Dask.unavailable`` but broken
            raise ConfigError(f"dask.distributed cannot be imported: {e}") from e

        try:
            if self.scheduler:
                self.client = Client(self.scheduler, timeout=CONNECT_TIMEOUT)
            else:
                self.cluster = LocalCluster(
                    n_workers=self.workers,
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=None,
                    silence_logs=logging.ERROR,
                )
                self.client = Client(self.cluster)
            self.client.wait_for_workers(1, timeout=60)
        except (OSError, TimeoutError) as e:
            self.__exit__(None, None, None)
            where = self.scheduler or "a LocalCluster"
            raise ConfigError(
                f"cannot start or reach the dask cluster ({where}): {e}; is the scheduler "
                "running (dask scheduler) and its address right?"
            ) from e
        for name, matrix in self.matrices.items():
            self._scattered[name] = self.client.scatter(matrix, broadcast=True, hash=False)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None

    def _count(self) -> int:
        """Workers of the cluster (asked once per run: the scheduler is a round trip)."""
        if self._workers is None:
            self._workers = max(1, len(self.client.scheduler_info().get("workers", {})))
        return self._workers

    def _class(self, name: str) -> bytes:
        blob = self._classes.get(name)
        if blob is None:
            cls = self.manifest.calcs[name].cls
            package = sys.modules[cls.__module__.split(".")[0]]
            if package.__name__ != "orchestrator":
                cloudpickle.register_pickle_by_value(package)
            blob = self._classes[name] = cloudpickle.dumps(cls)
        return blob

    # Whole ranged blocks (a calculation over a root store, a user range per task) are
    # submitted one range at a time (``Executor._compute_ranges_on``).
    submits_ranges = True

    @property
    def in_flight(self) -> int:
        """Ranges out at once: enough to keep every worker busy while this process reads
        the next range's inputs and writes the last one's shards."""
        return 2 * self._count()

    @property
    def local_files(self) -> bool:
        """Whether the workers share this machine's files (a ``LocalCluster``): they then
        open the root stores themselves; a remote cluster's get each range's root matrices,
        read here."""
        return self.scheduler is None

    def submit(self, order: RangeOrder) -> Any:
        """Start one user range of a ranged pass (``ranged.compute_written``: its worker
        reads the inputs from the ledger and writes the shards) as one task on the cluster;
        ``result`` waits for it. A task that dies is run again elsewhere and replaces the
        shards its first attempt wrote."""
        classes = [self._class(block.name) for block in order.blocks]
        return self.client.submit(_compute_written, order, classes, pure=False)

    def result(self, handle: Any) -> list[WrittenBlock]:
        """What a ``submit``ted range's blocks wrote, in its order's blocks' order.

        Raises:
            WorkerError: as ``run``.
        """
        return self._gathered("a user range", [handle])[0]  # type: ignore[return-value]

    def takes(self, task: BlockTask) -> bool:
        """A per-user standard block over enough users, whose root matrices were scattered
        (as the forked pool: a columnar block is cheaper in the run's process than its
        inputs and outputs are to send)."""
        return splits(task, self._scattered)

    def run(self, task: BlockTask, breaker: tuple[int, float] | None) -> BlockOutcome:
        """``run_block(task)``, its users split into ranges computed on the cluster.

        Raises:
            WorkerError: a range could not be computed (its workers kept dying: ``KilledWorker``)
                or failed outside user code.
        """
        users = _candidates(task)
        parts = min(len(users), self._count() * RANGES_PER_WORKER)
        partition = Partition(tuple(users[len(users) * k // parts] for k in range(1, parts)))
        blob = self._class(task.name)
        roots = {ds: self._scattered[ds] for ds in task.root}
        futures = []
        for index in range(parts):
            part = slice_task(task, *partition.span(index))
            # (the class and the matrices travel apart: by value, and scattered)
            root: dict[str, Any] = {ds: (None, lb) for ds, (_, lb) in part.root.items()}
            portable = dataclasses.replace(part, calculation=type(None), root=root)
            futures.append(self.client.submit(_compute, portable, blob, roots, pure=False))
        return merge_outcomes(task, self._gathered(task.name, futures), breaker)

    def _gathered(self, name: str, futures: list[Any]) -> list[Any]:
        from distributed import KilledWorker

        try:
            return list(self.client.gather(futures))
        except KilledWorker as e:
            raise WorkerError(
                f"the dask workers computing {name} kept dying ({e}); nothing of its block "
                "was published; run again to resume"
            ) from e
        except Exception as e:  # (run_block catches user code's errors: this is not one)
            raise WorkerError(f"a dask task of {name} failed: {type(e).__name__}: {e}") from e
