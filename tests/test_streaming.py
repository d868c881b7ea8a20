"""Memory flat in the number of users, with the same results (SQLite and PostgreSQL).

Root data is streamed from its root store (``root_memory_mb = 0``, or any dataset read without
history windows) and results past ``KEEP_LIMIT`` users are read back shard by shard
(``StoredResult``): the published result hashes must equal those of holding everything in
memory, serial and with workers. The memory figures themselves come from
``scripts/bench_stream.py``.
"""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator.execution import caches, walk
from orchestrator.results import StoredResult
from orchestrator.rootdata import Dataset
from orchestrator.rootstore import StoredDataset
from tests.conftest import Project, price_rows
from tests.test_scenarios import BASE, CALCS, DATES, TARGET, run

SYMBOLS = [f"S{i:02d}" for i in range(25)]

# BASE plus a calculation reading a history window and one without root data fed by two
# standard upstreams (its users are the union of theirs).
SOURCE = (
    BASE
    + """

class Momentum(StandardCalculation):
    name = "momentum"
    root_data = ["prices"]
    lookback = 3

    def process(self, ctx):
        closes = [row["close"] for row in ctx.history["prices"]]
        return {"change": closes[-1] - closes[0], "days": len(closes)}


class Blend(StandardCalculation):
    name = "blend"
    dependencies = ["momentum", "signal"]

    def process(self, ctx):
        momentum = ctx.upstream["momentum"]
        signal = ctx.upstream["signal"]
        return {"change": momentum and momentum["change"], "hot": bool(signal and signal["overbought"])}
"""
)
ALL = [*CALCS, "momentum", "blend"]


def setup(project: Project, config: str) -> None:
    # a gap: S03 has no row on the third date (history windows and previous results skip it)
    project.write_prices(price_rows(SYMBOLS, DATES, skip={("S03", DATES[2])}))
    project.extra_config = config
    project.write_calcs(SOURCE)


def test_streamed_root_data_gives_the_in_memory_results(project: Project) -> None:
    setup(project, "root_memory_mb = 1000\n")
    orch = project.orchestrator()
    assert orch.holds_in_memory("prices")  # read with history windows, and small
    assert isinstance(orch.dataset("prices"), Dataset)
    orch.close()
    assert run(project).ok
    in_memory = project.result_hashes()
    assert len(in_memory) == len(ALL) * len(DATES)

    project.extra_config = "root_memory_mb = 0\n"
    project.write_config()
    orch = project.orchestrator()
    assert not orch.holds_in_memory("prices")
    assert isinstance(orch.dataset("prices"), StoredDataset)
    orch.close()
    forced = run(project, calculations=ALL, force=True)
    assert forced.ok and len(forced.executed) == len(ALL) * len(DATES)
    assert project.result_hashes() == in_memory
    assert list((project.root / ".orchestrator" / "root").glob("prices-*.sqlite"))


@pytest.mark.parametrize("workers", [1, 2])
def test_results_past_the_keep_limit_are_read_shard_by_shard(
    project: Project, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    setup(project, "flush_users = 4\nshard_bytes = 1024\n")
    assert run(project).ok
    in_memory = project.result_hashes()
    # the per-user walk over the root store (in memory, the cells would run in blocks)
    project.extra_config += "root_memory_mb = 0\n"
    project.write_config()

    streamed: list[int] = []
    items = StoredResult.items

    def counting(self: StoredResult, *args: Any) -> Any:
        streamed.append(len(self.shards))
        return items(self, *args)

    monkeypatch.setattr(StoredResult, "items", counting)
    monkeypatch.setattr(caches, "KEEP_LIMIT", 3)  # every standard result is "too big"
    forced = run(project, calculations=ALL, force=True, workers=workers)
    assert forced.ok and len(forced.executed) == len(ALL) * len(DATES)
    assert project.result_hashes() == in_memory
    if workers == 1:  # (workers are forked: their calls are not counted here)
        # upstream results (rsi, signal, momentum) and previous results (rsi) were streamed
        assert len(streamed) >= 4 * (len(DATES) - 1) and min(streamed) > 1


def test_one_user_is_read_from_one_shard(project: Project) -> None:
    setup(project, "flush_users = 4\nshard_bytes = 1024\n")
    assert run(project).ok
    orch = project.orchestrator()
    fetched: list[int] = []
    shard_data = orch.ledger.shard_data
    orch.ledger.shard_data = lambda *a: fetched.append(1) or shard_data(*a)
    whole = orch.load_result("rsi", TARGET)
    fetched.clear()
    for user in ("S00", "S13", "S24"):
        assert orch.load_user_result("rsi", TARGET, user) == whole[user]
    assert len(fetched) == 3  # one shard each, of the cell's many
    assert len(orch.ledger.shard_index("rsi", TARGET)) > 3
    assert orch.load_user_result("rsi", TARGET, "nobody") is None
    orch.close()


def test_workers_that_write_their_own_shards_publish_the_serial_results(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup(project, "flush_users = 4\nshard_bytes = 1024\n")
    assert run(project).ok
    serial = project.result_hashes()
    orch = project.orchestrator()
    serial_shards = len(orch.ledger.shard_index("rsi", TARGET) or [])
    orch.close()
    # Workers walk the users of the root store (held in memory, cells run in blocks), and
    # every worker writes its shards itself instead of handing them over in memory.
    project.extra_config += "root_memory_mb = 0\n"
    project.write_config()
    monkeypatch.setattr(walk, "WORKER_INLINE_BYTES", 0)
    forced = run(project, calculations=ALL, force=True, workers=2)
    assert forced.ok and len(forced.executed) == len(ALL) * len(DATES)
    assert project.result_hashes() == serial
    orch = project.orchestrator()
    shards = orch.ledger.shard_index("rsi", TARGET) or []
    attempt = orch.ledger.attempts("rsi", TARGET)[-1]
    assert orch.load_result("rsi", TARGET).keys() == set(SYMBOLS)
    assert orch.ledger.count("result_shards") == orch.ledger.retained_shards() + sum(
        len(orch.ledger.shard_index(c, d) or [])
        for c, d in serial  # nothing unpublished left
    )
    orch.close()
    assert [s.seq for s in shards] == sorted(s.seq for s in shards)
    assert attempt.shards == len(shards) >= serial_shards
    assert {s.seq // 10_000_000 for s in shards} == {0, 1}  # both workers' spans
