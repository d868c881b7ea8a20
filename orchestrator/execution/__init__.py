"""Execution: acting on a plan, block by block.

Modules:

* ``executor`` — the ``Executor``: the chunk / pass / date loop, decisions during the run,
  the scheduling of blocks (``_run_columnar``, ``_compute_block``) and their bookkeeping.
* ``blocks`` — the block runner, on value types only: ``run_block(BlockTask) -> BlockOutcome``
  (no ledger, no decider, no executor), in both calculation forms. This is the public
  contract an executor of blocks (a forked worker, a distributed one) depends on.
* ``walk`` — the per-user walk over users streamed from a root store, and meta cells.
* ``record`` — staging, publishing and recording finished cells.
* ``caches`` — results kept in memory for dependents.
* ``summary`` — ``RunSummary``.
* ``workers`` — forked local workers for the per-user walk (users split in ranges).

Import ``Executor`` and ``RunSummary`` from here.
"""

from orchestrator.execution.executor import BLOCK_DATES, Executor
from orchestrator.execution.summary import RunSummary

__all__ = ["BLOCK_DATES", "Executor", "RunSummary"]
