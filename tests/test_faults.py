"""Kill -9 at any moment, then run again: the ledger converges to the results of an
uninterrupted run, and no reader ever sees a partial cell (SQLite and PostgreSQL).

Each case runs ``orchestrator run`` as a real process that SIGKILLs itself at a chosen point
(``ORCHESTRATOR_FAULT``, see ``orchestrator/faults.py``): while computing a block's users,
after a block is staged, while a walk streams users from a root store and right after its
mid-cell shard flush, and inside the publishing transaction before its commit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil
import pytest

from orchestrator.planning import Reason
from orchestrator.results import _decompressor, hash_of_shards
from tests.conftest import Project, price_rows
from tests.test_scenarios import DATES, TARGET
from tests.test_streaming import ALL, SOURCE

SYMBOLS = [f"S{i:02d}" for i in range(30)]

# test_streaming's calculations read a history window: the prices are held in memory and the
# standard cells run in blocks (``root_memory_mb = 0`` streams them from the root store
# through the per-user walk).
CELLS = len(ALL) * len(DATES)


def _cli(project: Project, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator.cli",
            "--config",
            str(project.config),
            "run",
            "--date",
            TARGET.isoformat(),
        ],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def _published(project: Project) -> dict:
    """Every published result hash (a RUNNING or FAILED cell keeps its previous result
    published), after checking that its shards are whole: they decode and hash to exactly
    the recorded result hash."""
    orch = project.orchestrator()
    cells = orch.ledger.load_cells()
    out = {}
    for calc, per_date in cells.items():
        for date, cell in per_date.items():
            if cell.result_hash is None:  # nothing published (yet)
                continue
            payloads = orch.ledger.shard_payloads(calc, date)
            lines = [_decompressor.decompress(p) for p in payloads]
            assert hash_of_shards(lines) == cell.result_hash, (calc, date)
            out[(calc, date)] = cell.result_hash
    orch.close()
    return out


@pytest.fixture
def small(project: Project) -> Project:
    project.write_prices(price_rows(SYMBOLS, DATES))
    # small chunks: a publish per pass of every two dates, so the crash points fall mid-run
    project.extra_config = "flush_users = 7\nshard_bytes = 1024\nblock_dates = 2\n"
    project.write_calcs(SOURCE)
    return project


# (fault, root data streamed from its root store: the per-user walk instead of blocks)
FAULTS = [
    ("user:200", False),
    ("block:5", False),
    ("user:200", True),
    ("flush:9", True),
    ("publish:5", False),
    ("publish:9", False),
]


@pytest.mark.parametrize(("fault", "streamed"), FAULTS)
@pytest.mark.parametrize("mode", ["cold", "rerun"])
def test_kill_9_then_rerun_converges_to_the_uninterrupted_results(
    small: Project, fault: str, streamed: bool, mode: str, tmp_path
) -> None:
    if streamed:
        small.extra_config += "root_memory_mb = 0\n"
        small.write_config()
    if mode == "rerun":  # cells already published, re-run after a new code version
        assert _cli(small).returncode == 0
        small.write_calcs(SOURCE.replace("period = 3", "period = 4"))
    before = _published(small)
    killed = _cli(small, {"ORCHESTRATOR_FAULT": fault})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    partial = _published(small)  # whole cells only, whatever was committed before the kill
    orch = small.orchestrator()
    zombies = [
        d for d in orch.plan(TARGET).decisions.values() if d.reason is Reason.ZOMBIE_RECOVERED
    ]
    orch.close()
    if mode == "cold":  # nothing was stored before: interrupted cells are simply still NEW
        assert len(partial) < CELLS and not zombies
    else:  # the cells being computed were leased by the dead run: zombies, recovered next
        # (a block leases its cells once computed: killed while computing them, they are
        # simply decided again by their fingerprints)
        assert zombies or (fault.startswith("user") and not streamed)
        assert all("died while computing it" in d.detail for d in zombies)
        assert set(partial) == set(before)  # every old result stayed published meanwhile

    again = _cli(small)  # the dead run's lock is taken over at once (its process is gone)
    assert again.returncode == 0, again.stdout + again.stderr
    after = _published(small)
    assert len(after) == CELLS
    if mode == "cold":
        for key, value in partial.items():
            assert after[key] == value  # what was published stayed published, unchanged

    # The reference: the same project run once, uninterrupted, into a fresh SQLite ledger.
    reference = Project(small.root, f"sqlite:///{tmp_path / 'reference.db'}")
    reference.package = small.package
    reference.extra_config = small.extra_config
    reference.write_config()  # orchestrator.toml now points at the reference ledger
    assert _cli(reference).returncode == 0
    assert _published(reference) == after
    small.write_config()  # back to the faulted ledger

    # The killed attempt's unpublished shards were collected: only published ones remain.
    orch = small.orchestrator()
    published_shards = sum(len(p) for p in orch.ledger.shard_payloads_many(list(after)).values())
    retained = orch.ledger.retained_shards()  # superseded clean results, kept by fingerprint
    assert orch.ledger.count("result_shards") == published_shards + retained
    orch.close()


def test_kill_9_while_importing_root_data_leaves_no_store(small: Project) -> None:
    small.extra_config += "root_memory_mb = 0\n"  # imported into its root store
    small.write_config()
    store = small.root / ".orchestrator" / "root"
    killed = _cli(small, {"ORCHESTRATOR_FAULT": "import:1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not list(store.glob("*.sqlite"))  # only the dead import's temporary file
    assert list(store.glob(".*.tmp"))
    again = _cli(small)
    assert again.returncode == 0, again.stdout + again.stderr
    assert len(list(store.glob("prices-*.sqlite"))) == 1
    assert not list(store.glob(".*.tmp"))  # the dead import's file was collected
    assert len(_published(small)) == CELLS


def test_a_killed_worker_aborts_the_run_and_the_next_run_converges(
    small: Project, tmp_path
) -> None:
    small.extra_config += "workers = 2\nroot_memory_mb = 0\n"  # workers walk the root store
    small.write_config()
    killed = _cli(small, {"ORCHESTRATOR_FAULT": "user:100"})  # each worker, at its 100th user
    assert killed.returncode == 1, killed.stdout + killed.stderr
    assert "a worker process died" in killed.stderr
    assert "Traceback" not in killed.stderr
    partial = _published(small)  # whole cells only
    assert len(partial) < CELLS
    orch = small.orchestrator()
    (run,) = orch.ledger.recent_runs()
    orch.close()
    assert run.status == "ABORTED"
    again = _cli(small)
    assert again.returncode == 0, again.stdout + again.stderr
    after = _published(small)
    reference = Project(small.root, f"sqlite:///{tmp_path / 'reference.db'}")
    reference.package = small.package
    reference.extra_config = small.extra_config
    reference.write_config()
    assert _cli(reference).returncode == 0
    assert _published(reference) == after


def test_a_dead_holder_does_not_block_the_next_run(small: Project) -> None:
    import datetime as dt

    gone = psutil.Popen([sys.executable, "-c", "pass"])
    holder = f"{__import__('socket').gethostname()}:{gone.pid}:{int(gone.create_time())}:dead0001"
    gone.wait()
    orch = small.orchestrator()
    orch.ledger.acquire_lock(holder, dt.datetime.now(dt.UTC), dt.timedelta(hours=1))
    orch.close()
    result = small.cli("run", "--date", TARGET.isoformat())
    assert result.exit_code == 0, result.output


def test_a_live_runs_leased_cells_are_in_progress_not_zombies(small: Project) -> None:
    import datetime as dt

    from orchestrator.ledger.store import lock_holder

    orch = small.orchestrator()
    orch.run(TARGET)
    now = dt.datetime.now(dt.UTC)
    orch.ledger.acquire_lock(lock_holder("f" * 32), now, dt.timedelta(minutes=5))
    orch.ledger.lease([("rsi", TARGET)], "f" * 32, now + dt.timedelta(minutes=5))
    decisions = orch.plan(TARGET).decisions
    assert decisions[("rsi", TARGET)].reason is Reason.IN_PROGRESS
    assert decisions[("signal", TARGET)].reason is Reason.WAITING_ON_UPSTREAM
    orch.ledger.release_lock(lock_holder("f" * 32))
    assert orch.plan(TARGET).decisions[("rsi", TARGET)].reason is Reason.ZOMBIE_RECOVERED
    orch.close()
