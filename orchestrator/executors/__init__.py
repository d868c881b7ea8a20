"""Executors as plug-ins: where the blocks of a run are computed.

An executor is chosen by name — ``executor = "..."`` in the config or ``--executor NAME`` —
from the built-in ones and those other distributions register under the entry-point group
``orchestrator.executors`` (``importlib.metadata``; each entry point names a zero-argument
callable returning an ``ExecutorPlugin``):

==========  ==================================================================
serial      everything in the run's process
processes   forked local worker processes (``workers``); today's default
dask        a dask.distributed cluster: ``scheduler = "tcp://host:8786"``, or a
            ``LocalCluster`` of ``workers`` processes (``pip install orchestrator[dask]``)
==========  ==================================================================

The contract between the run and an executor is the block runner of the block engine
(``blockpool``): a ``BlockTask`` in (value types only: a calculation × dates × a user range
with every input it reads), a ``BlockOutcome`` out. Over root stores (too many users to
hold) a ``RangeRunner`` takes a ``ranged.RangeOrder`` instead: its worker reads the range's
inputs from the shared ledger and writes the shards under unpublished generations. The run
decides, validates and publishes, always in its own process, and result hashes stream in
user order there, so they do not depend on the executor.

An executor whose optional dependency is missing is reported, never crashed on:
``orchestrator executors`` lists each as available or not and why, and asking for an
unavailable one is a ``ConfigError`` (exit 2) with that line.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Protocol, Self

from orchestrator.errors import ConfigError

if TYPE_CHECKING:
    from orchestrator.execution.blocks import BlockOutcome, BlockTask, RootMatrix
    from orchestrator.execution.ranged import RangeOrder, WrittenBlock
    from orchestrator.manifest import Manifest

ENTRY_POINT_GROUP = "orchestrator.executors"
DEFAULT = "processes"


class BlockRunner(Protocol):
    """Computes blocks elsewhere than the run's process (a context manager: entered for
    the run, closed after it, also when it fails)."""

    def takes(self, task: BlockTask) -> bool:
        """Whether this runner computes ``task`` (else the run computes it itself)."""

    def run(self, task: BlockTask, breaker: tuple[int, float] | None) -> BlockOutcome:
        """``blocks.run_block(task)``'s outcome, computed by the runner.

        Raises:
            WorkerError: the runner lost the task (its workers died) or failed outside user
                code; nothing of the block is published.
        """

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> Any: ...


class RangeRunner(BlockRunner, Protocol):
    """A ``BlockRunner`` that also computes the user ranges of columnar blocks over root
    stores (its plug-in's ``submits_ranges``; ``Executor._compute_ranges_on``): its workers
    read a range's inputs from the shared ledger and write its shards there themselves
    (``ranged.compute_written``); the run reads the payloads back and publishes."""

    @property
    def in_flight(self) -> int:
        """User ranges the run may have out at once."""

    @property
    def local_files(self) -> bool:
        """Whether the workers share this machine's files (they open the root stores by
        path), else each range's root matrices travel with its order."""

    def submit(self, order: RangeOrder) -> Any:
        """Start ``ranged.compute_written(order)`` on a worker; returns a handle for
        ``result``. The task may run more than once (a lost worker): each attempt replaces
        the shards of the one before."""

    def result(self, handle: Any) -> list[WrittenBlock]:
        """What a submitted range's blocks wrote, in its order's blocks' order.

        Raises:
            WorkerError: the range could not be computed.
        """


@dataclass(frozen=True, slots=True)
class Setting:
    """What an executor is started with for one run.

    Attributes:
        workers: processes (``processes``, a ``LocalCluster``); 1: none.
        scheduler: a dask scheduler's address, or None.
        database_url: the ledger's URL (a remote executor needs one every worker reaches).
    """

    workers: int
    scheduler: str | None
    database_url: str


class ExecutorPlugin(Protocol):
    """An executor: its name, whether it can run here, and its block runner."""

    name: str
    summary: str  # one line for ``orchestrator executors``
    # its runner also computes the user ranges of columnar blocks over root stores
    submits_ranges: bool

    def unavailable(self) -> str | None:
        """Why it cannot run here ("install orchestrator[dask]"), or None."""

    def check(self, setting: Setting) -> None:
        """Refuse a setting it cannot run with.

        Raises:
            ConfigError: e.g. an SQLite ledger with a remote cluster.
        """

    def walk_workers(self, setting: Setting) -> int:
        """Local processes for the per-user walk over root stores (1: in the run's process)."""

    def block_runner(
        self, setting: Setting, matrices: dict[str, RootMatrix], manifest: Manifest
    ) -> AbstractContextManager[BlockRunner] | None:
        """The runner of the run's blocks (``matrices``: every root matrix a block may read),
        or None: the run computes its blocks itself."""


class _Here:
    """An executor of this machine alone: always available, no scheduler."""

    name: str
    submits_ranges = False

    def unavailable(self) -> str | None:
        return None

    def check(self, setting: Setting) -> None:
        if setting.scheduler:
            raise ConfigError(
                f'a scheduler ({setting.scheduler}) is for executor = "dask"; executor '
                f"{self.name!r} does not use one"
            )


class Serial(_Here):
    """Everything in the run's process, whatever ``workers`` says."""

    name = "serial"
    summary = "every block and user in the run's own process"

    def walk_workers(self, setting: Setting) -> int:
        return 1

    def block_runner(
        self, setting: Setting, matrices: dict[str, RootMatrix], manifest: Manifest
    ) -> AbstractContextManager[BlockRunner] | None:
        return None


class Processes(_Here):
    """Forked local worker processes: blocks split by user ranges (``blockpool.BlockPool``)
    and the per-user walk over root stores (``workers.WorkerPool``); ``workers = 1`` is
    serial."""

    name = "processes"
    summary = "forked worker processes on this machine (workers = N; 1 runs in-process)"

    def walk_workers(self, setting: Setting) -> int:
        return setting.workers

    def block_runner(
        self, setting: Setting, matrices: dict[str, RootMatrix], manifest: Manifest
    ) -> AbstractContextManager[BlockRunner] | None:
        if setting.workers <= 1:
            return None
        from orchestrator.execution.blockpool import BlockPool

        return BlockPool(matrices, manifest, setting.workers)


class Dask:
    """A dask.distributed cluster (``executors.dask_runner``)."""

    name = "dask"
    summary = (
        "a dask.distributed cluster: scheduler = tcp://host:8786, or a LocalCluster of "
        "workers processes"
    )
    submits_ranges = True

    def unavailable(self) -> str | None:
        # Found, not imported: importing distributed costs every run ~0.3 s, also a no-op.
        try:
            found = importlib.util.find_spec("distributed") is not None
        except (ImportError, ValueError):  # (ValueError: blocked in sys.modules)
            found = False
        return None if found else "install orchestrator[dask] (no module named 'distributed')"

    def check(self, setting: Setting) -> None:
        url = setting.database_url
        if url.startswith("sqlite") and (":memory:" in url or url.rstrip("/") == "sqlite:"):
            raise ConfigError(
                "an in-memory SQLite ledger cannot be shared with dask workers (each would "
                "open a database of its own); use an SQLite file or PostgreSQL"
            )
        if setting.scheduler and url.startswith("sqlite"):
            raise ConfigError(
                f"an SQLite ledger is a file on this machine, which the workers of the cluster "
                f"at {setting.scheduler} cannot share; use a PostgreSQL database_url, or no "
                "scheduler (a LocalCluster here)"
            )

    def walk_workers(self, setting: Setting) -> int:
        # The per-user walk over root stores (calculations without a columnar form) is not
        # a block: with a LocalCluster it forks ``workers`` local processes, as
        # ``processes`` does (this machine is the cluster); with a cluster elsewhere it
        # stays in the run's process.
        return setting.workers if setting.scheduler is None else 1

    def block_runner(
        self, setting: Setting, matrices: dict[str, RootMatrix], manifest: Manifest
    ) -> AbstractContextManager[BlockRunner] | None:
        from orchestrator.executors.dask_runner import DaskBlocks

        return DaskBlocks(matrices, manifest, setting.scheduler, setting.workers)


BUILT_IN: dict[str, Callable[[], ExecutorPlugin]] = {
    "serial": Serial,
    "processes": Processes,
    "dask": Dask,
}


@functools.cache
def registry() -> dict[str, Callable[[], ExecutorPlugin]]:
    """Executor name -> factory: the built-in ones, then entry points of other
    distributions (a built-in name is not replaced)."""
    found: dict[str, Callable[[], ExecutorPlugin]] = dict(BUILT_IN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, functools.partial(_load, ep))
    return found


def _load(ep: Any) -> ExecutorPlugin:
    factory = ep.load()
    return factory()  # type: ignore[no-any-return]


def describe() -> list[tuple[str, str | None, str]]:
    """(name, why it is unavailable or None, its summary) of every executor, in order."""
    out: list[tuple[str, str | None, str]] = []
    for name, factory in registry().items():
        try:
            plugin = factory()
        except Exception as e:  # noqa: BLE001 - a broken plug-in is listed, not crashed on
            out.append((name, f"cannot be loaded: {type(e).__name__}: {e}", ""))
            continue
        out.append((name, plugin.unavailable(), plugin.summary))
    return out


def get(name: str) -> ExecutorPlugin:
    """The available executor ``name``.

    Raises:
        ConfigError: unknown, cannot be loaded, or unavailable here (its reason).
    """
    factory = registry().get(name)
    if factory is None:
        raise ConfigError(
            f"unknown executor {name!r}; known: {', '.join(registry())} "
            "(orchestrator executors lists them)"
        )
    try:
        plugin = factory()
    except Exception as e:
        raise ConfigError(f"executor {name!r} cannot be loaded: {type(e).__name__}: {e}") from e
    why = plugin.unavailable()
    if why is not None:
        raise ConfigError(f"executor {name!r} is unavailable: {why}")
    return plugin
