"""Executors as plug-ins (serial, processes, dask): listed with their availability, refused
with a one-line error when unavailable or misconfigured, and the same result hashes on each,
with a dask ``LocalCluster`` on this machine (SQLite and PostgreSQL). A dask worker killed
in the middle of a block: its task runs again elsewhere and the run converges.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.execution.ranged import RANGE_SEQ_SPAN
from orchestrator.executors import dask_runner
from tests.conftest import Project, price_rows, scratch_project, weekdays

pytest.importorskip("distributed")

DATES = weekdays(dt.date(2024, 1, 1), 6)
TARGET = DATES[-1]
# More users than a block needs to be split (``blockpool.MIN_SPLIT_USERS``).
SYMBOLS = [f"S{i:03d}" for i in range(80)]
PID_LOG = "EXECUTOR_TEST_PIDS"

CALCS = f'''
import os

from orchestrator import MetaCalculation, StandardCalculation


def _seen(name):
    path = os.environ.get("{PID_LOG}")
    if path:
        with open(path, "a") as f:
            f.write(f"{{name}},{{os.getpid()}}\\n")


class Close(StandardCalculation):
    name = "close"
    root_data = ["prices"]
    lookback = 2

    def process(self, ctx):
        _seen(self.name)
        closes = [r["close"] for r in ctx.history["prices"]]
        return {{"close": closes[-1], "mean": sum(closes) / len(closes)}}


class Trend(StandardCalculation):
    name = "trend"
    dependencies = ["close"]
    historical = True

    def process(self, ctx):
        _seen(self.name)
        prev = ctx.previous or {{"ups": 0, "last": None}}
        now = ctx.upstream["close"]["close"]
        up = prev["last"] is not None and now > prev["last"]
        return {{"ups": prev["ups"] + int(up), "last": now}}


class Board(MetaCalculation):
    name = "board"
    dependencies = ["trend"]

    def process(self, ctx):
        return {{"ups": sum(r["ups"] for r in ctx.upstream["trend"].values())}}
'''

# On its first call anywhere, kills the worker process computing it (a marker file says
# it happened): the task must run again on another worker. A marker in a missing folder
# is never made: every call kills.
KILLER = CALCS.replace(
    "        _seen(self.name)\n        prev = ctx.previous",
    "        _seen(self.name)\n"
    '        marker = os.environ.get("EXECUTOR_TEST_KILL")\n'
    "        if marker and not os.path.exists(marker):\n"
    "            try:\n"
    '                open(marker, "w").close()\n'
    "            except OSError:\n"
    "                pass  # (a marker that cannot be made: every call kills)\n"
    "            os._exit(1)\n"
    "        prev = ctx.previous",
)


def _shard_numbers(url: str, calculation: str, date: dt.date) -> tuple[list[int], int]:
    """The shard numbers of the cell's published result, and how many shards of the
    calculation belong to no published cell (a run's leftovers)."""
    from sqlalchemy import text

    from orchestrator.ledger.store import make_engine

    engine = make_engine(url)
    with engine.connect() as conn:
        seqs = (
            conn.execute(
                text(
                    "SELECT s.seq FROM result_shards s JOIN cells c ON c.calculation = s.calculation"
                    " AND c.date = s.date AND c.generation = s.generation"
                    " WHERE s.calculation = :c AND s.date = :d ORDER BY s.seq"
                ),
                {"c": calculation, "d": date},
            )
            .scalars()
            .all()
        )
        leftover = conn.execute(
            text(
                "SELECT COUNT(*) FROM result_shards s WHERE s.calculation = :c AND NOT EXISTS"
                " (SELECT 1 FROM cells c WHERE c.calculation = s.calculation"
                " AND c.date = s.date AND c.generation = s.generation)"
            ),
            {"c": calculation},
        ).scalar_one()
    engine.dispose()
    return list(seqs), int(leftover)


def _project(project: Project, source: str = CALCS, extra: str = "") -> Project:
    project.extra_config = "columnar = false\n" + extra
    project.write_prices(price_rows(SYMBOLS, DATES))
    project.write_calcs(source)
    return project


def _pids(log: Path) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for line in log.read_text().splitlines() if log.exists() else []:
        name, pid = line.split(",")
        out.setdefault(name, set()).add(int(pid))
    return out


@pytest.fixture
def serial_hashes(tmp_path: Path) -> dict[tuple[str, dt.date], str | None]:
    twin = _project(scratch_project(tmp_path, "serial"), extra='executor = "serial"\n')
    assert twin.run(TARGET).ok
    return twin.result_hashes()


def test_executors_lists_every_executor_with_its_availability(project: Project) -> None:
    _project(project)
    listed = project.cli("executors")
    assert listed.exit_code == 0, listed.output
    lines = {line[2:].split()[0]: line for line in listed.output.splitlines()}
    assert set(lines) >= {"serial", "processes", "dask"}
    assert lines["processes"].startswith("*")  # the configured one (the default)
    assert all("available" in lines[n] and "unavailable" not in lines[n] for n in lines)


def test_a_missing_optional_dependency_is_reported_and_refused(project: Project) -> None:
    _project(project, extra='executor = "dask"\n')
    # A Python where ``distributed`` cannot be imported, as without orchestrator[dask].
    code = (
        "import sys; sys.modules['distributed'] = None\n"
        "from orchestrator.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    for args, want in (
        (["executors"], "dask       unavailable install orchestrator[dask]"),
        (["run", "--date", str(TARGET)], "Error: executor 'dask' is unavailable: install"),
    ):
        done = subprocess.run(
            [sys.executable, "-c", code, "--config", str(project.config), *args],
            capture_output=True,
            text=True,
            check=False,
        )
        assert want in done.stdout + done.stderr, done.stdout + done.stderr
        assert done.returncode == (0 if args == ["executors"] else 2)
        assert "Traceback" not in done.stderr


def test_an_in_memory_ledger_is_refused_for_dask() -> None:
    from orchestrator.errors import ConfigError
    from orchestrator.executors import Dask, Setting

    with pytest.raises(ConfigError, match="in-memory SQLite"):
        Dask().check(Setting(2, None, "sqlite:///:memory:"))
    Dask().check(Setting(2, None, "sqlite:////tmp/ledger.db"))  # a file: allowed


def test_unknown_and_misconfigured_executors_are_one_line_errors(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    _project(project)
    unknown = project.cli("run", "--date", str(TARGET), "--executor", "spark")
    assert unknown.exit_code == 2 and "unknown executor 'spark'; known: serial" in unknown.output
    stray = project.cli("run", "--date", str(TARGET), "--scheduler", "tcp://h:8786")
    assert stray.exit_code == 2 and 'is for executor = "dask"' in stray.output
    orch = project.orchestrator()
    try:
        assert orch.ledger.recent_runs() == []  # refused before anything was recorded
    finally:
        orch.close()
    monkeypatch.setattr(dask_runner, "CONNECT_TIMEOUT", "2s")
    remote = project.cli(
        "run", "--date", str(TARGET), "--executor", "dask", "--scheduler", "tcp://127.0.0.1:9"
    )
    assert remote.exit_code == 2, remote.output
    if project.db_url.startswith("sqlite"):
        assert "an SQLite ledger is a file on this machine" in remote.output
    else:  # PostgreSQL: allowed, but nobody answers there
        assert "cannot start or reach the dask cluster (tcp://127.0.0.1:9)" in remote.output
        assert project.result_hashes() == {}  # nothing ran


@pytest.mark.parametrize("executor", ["serial", "processes", "dask"])
def test_every_executor_publishes_the_serial_results(
    project: Project,
    tmp_path: Path,
    executor: str,
    serial_hashes: dict[tuple[str, dt.date], str | None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    log = tmp_path / "pids.log"
    monkeypatch.setenv(PID_LOG, str(log))
    _project(project, extra=f'executor = "{executor}"\nworkers = 2\n')
    summary = project.run(TARGET, workers=2)
    assert summary.ok
    assert project.result_hashes() == serial_hashes
    pids = _pids(log)
    if executor == "serial":
        assert pids["close"] == {os.getpid()}
    else:  # computed by other processes (two forked ones; a LocalCluster's workers)
        assert os.getpid() not in pids["close"]
        assert len(pids["close"]) == 2 if executor == "processes" else pids["close"]
    # An edit re-runs through the executor as well, with the same early cutoff.
    project.write_calcs(CALCS.replace("sum(closes) / len(closes)", "sum(closes) / len(closes) + 0"))
    again = project.run(TARGET, workers=2)
    assert again.ok and {k[0] for k in again.executed} == {"close"}
    assert project.result_hashes() == serial_hashes


def test_a_dask_worker_killed_mid_block_is_replaced_and_the_run_converges(
    project: Project,
    tmp_path: Path,
    serial_hashes: dict[tuple[str, dt.date], str | None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    marker = tmp_path / "killed"
    monkeypatch.setenv("EXECUTOR_TEST_KILL", str(marker))
    _project(project, KILLER, extra='executor = "dask"\nworkers = 2\n')
    summary = project.run(TARGET, workers=2)
    assert marker.exists()  # a worker did die
    assert summary.ok, summary.lines()
    assert project.result_hashes() == serial_hashes


STREAMED = f'''
import os

import numpy as np

from orchestrator import MetaCalculation, StandardCalculation


def _today(frame, column):
    return frame.root("prices", column)[frame.rows("prices")]


class Close(StandardCalculation):
    name = "close"
    root_data = ["prices"]

    def process(self, ctx):
        return {{"close": ctx.root["prices"][-1]["close"]}}

    def compute(self, frame):
        path = os.environ.get("{PID_LOG}")
        if path:
            with open(path, "a") as f:
                f.write(f"close,{{os.getpid()}}\\n")
        return {{"close": _today(frame, "close")}}


class Ratio(StandardCalculation):
    name = "ratio"
    root_data = ["prices"]
    dependencies = ["close"]

    def process(self, ctx):
        return {{"ratio": ctx.root["prices"][-1]["volume"] / ctx.upstream["close"]["close"]}}

    def compute(self, frame):
        return {{"ratio": _today(frame, "volume") / frame.upstream("close", "close")}}


class Count(StandardCalculation):
    name = "count"
    root_data = ["prices"]
    historical = True

    def process(self, ctx):
        return {{"n": (ctx.previous or {{"n": 0}})["n"] + 1}}

    def compute(self, frame):
        last = np.nan_to_num(frame.previous("n"))
        out = np.zeros(frame.present.shape)
        for i in range(len(frame.dates)):
            out[i] = last + 1
            last = np.where(frame.present[i], out[i], 0.0)
        return {{"n": out.astype(np.int64)}}


class Board(MetaCalculation):
    name = "board"
    dependencies = ["ratio"]

    def process(self, ctx):
        return {{"users": len(ctx.upstream["ratio"] or {{}})}}
'''


def test_columnar_blocks_over_a_root_store_run_range_by_range_on_dask(
    project: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestrator import rootstore
    from orchestrator.app import Orchestrator

    # The prices streamed from their root store in parts of 16 users: 5 ranges per block.
    monkeypatch.setattr(rootstore, "PART_USERS", 16)
    monkeypatch.setattr(Orchestrator, "holds_in_memory", lambda self, name: False)
    twin = scratch_project(tmp_path, "serial-streamed")
    for p, executor in ((twin, "serial"), (project, "dask")):
        p.extra_config = f'executor = "{executor}"\nworkers = 2\n'
        p.write_prices(price_rows(SYMBOLS, DATES))
        p.write_calcs(STREAMED)
    log = tmp_path / "pids.log"
    assert twin.run(TARGET).ok
    monkeypatch.setenv(PID_LOG, str(log))
    summary = project.run(TARGET, workers=2)
    assert summary.ok, summary.lines()
    assert project.result_hashes() == twin.result_hashes()
    pids = _pids(log)["close"]
    assert pids and os.getpid() not in pids  # every range computed by a dask worker
    # ... and written by it: each range's shards numbered in its own span, every one of
    # them published (nothing left over from the run).
    seqs, leftover = _shard_numbers(project.db_url, "close", TARGET)
    assert {seq // RANGE_SEQ_SPAN for seq in seqs} == set(range(5)), seqs
    assert leftover == 0
    # An attempt presumed lost that finishes after the publish writes nothing.
    from orchestrator.ledger.store import Ledger

    ledger = Ledger.open(project.db_url)
    shards = ledger.shard_index("close", TARGET)
    assert shards
    generation = shards[0].generation
    ledger.write_shard_span([("close", TARGET, generation)], (0, RANGE_SEQ_SPAN), [])
    assert ledger.shard_index("close", TARGET) == shards
    ledger.dispose()
    # A nightly date more: its ranges read the previous date's states by range.
    more = weekdays(DATES[0], len(DATES) + 1)
    for p in (twin, project):
        p.write_prices(price_rows(SYMBOLS, more))
    assert twin.run(more[-1]).ok and project.run(more[-1], workers=2).ok
    assert project.result_hashes() == twin.result_hashes()


def _streamed(project: Project, executor: str, source: str = STREAMED) -> Project:
    project.extra_config = f'executor = "{executor}"\nworkers = 2\n'
    project.write_prices(price_rows(SYMBOLS, DATES))
    project.write_calcs(source)
    return project


# Kills the dask worker computing the first range of close that reaches it (a marker file
# says it happened).
STREAMED_KILLER = STREAMED.replace(
    "    def compute(self, frame):\n        path = ",
    "    def compute(self, frame):\n"
    '        marker = os.environ.get("EXECUTOR_TEST_KILL")\n'
    "        if marker and not os.path.exists(marker):\n"
    '            open(marker, "w").close()\n'
    "            os._exit(1)\n"
    "        path = ",
)


def test_a_dask_worker_killed_mid_range_is_replaced_and_the_run_converges(
    project: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestrator import rootstore
    from orchestrator.app import Orchestrator

    monkeypatch.setattr(rootstore, "PART_USERS", 16)
    monkeypatch.setattr(Orchestrator, "holds_in_memory", lambda self, name: False)
    twin = _streamed(scratch_project(tmp_path, "serial-streamed"), "serial")
    assert twin.run(TARGET).ok
    assert STREAMED_KILLER != STREAMED
    _streamed(project, "dask", STREAMED_KILLER)
    marker = tmp_path / "killed"
    monkeypatch.setenv("EXECUTOR_TEST_KILL", str(marker))
    summary = project.run(TARGET, workers=2)
    assert marker.exists()  # a worker did die
    assert summary.ok, summary.lines()
    assert project.result_hashes() == twin.result_hashes()
    assert _shard_numbers(project.db_url, "close", TARGET)[1] == 0


def test_a_range_written_again_replaces_its_first_attempts_shards(db_url: str) -> None:
    """What a retried range task does: the same span written twice leaves the second
    attempt's shards alone; other spans and other generations are untouched."""
    from orchestrator.ledger.store import Ledger

    ledger = Ledger.open(db_url)
    day = dt.date(2024, 1, 2)

    def rows(generation: str, seqs: range, data: bytes) -> list[dict[str, object]]:
        return [
            {
                "calculation": "close",
                "date": day,
                "generation": generation,
                "seq": seq,
                "first_user": "a",
                "last_user": "b",
                "users": 2,
                "raw_bytes": 3,
                "data": data,
            }
            for seq in seqs
        ]

    cell = [("close", day, "g1")]
    span = (RANGE_SEQ_SPAN, 2 * RANGE_SEQ_SPAN)
    ledger.write_shards(rows("g1", range(2), b"range0") + rows("g2", range(5, 7), b"other"))
    ledger.write_shard_span(cell, span, rows("g1", range(span[0], span[0] + 3), b"first"))
    ledger.write_shard_span(cell, span, rows("g1", range(span[0], span[0] + 2), b"again"))
    try:
        assert list(ledger.unpublished_payloads("close", day, "g1", span)) == [b"again"] * 2
        assert (
            list(ledger.unpublished_payloads("close", day, "g1", (0, span[0]))) == [b"range0"] * 2
        )
        assert list(ledger.unpublished_payloads("close", day, "g2", (0, span[1]))) == [b"other"] * 2
        # Another process reaches this ledger with its URL (an SQLite path made absolute).
        other = Ledger.open(ledger.url(), migrate=False)
        assert list(other.unpublished_payloads("close", day, "g1", span)) == [b"again"] * 2
        other.dispose()
        if db_url.startswith("sqlite"):
            assert Path(ledger.url().split("///", 1)[1]).is_absolute()
    finally:
        ledger.dispose()


def test_a_block_whose_workers_keep_dying_aborts_the_run_with_nothing_partial(
    project: Project,
    tmp_path: Path,
    serial_hashes: dict[tuple[str, dt.date], str | None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import dask

    from orchestrator.execution.workers import WorkerError

    # Every attempt kills its worker (the marker is a folder, never a file: always absent).
    monkeypatch.setenv("EXECUTOR_TEST_KILL", str(tmp_path / "never" / "marker"))
    _project(project, KILLER, extra='executor = "dask"\nworkers = 2\n')
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 1}),
        pytest.raises(WorkerError, match="kept dying"),
    ):
        project.run(TARGET, workers=2)
    published = project.result_hashes()
    assert not any(name in ("trend", "board") for name, _ in published)  # nothing partial
    monkeypatch.delenv("EXECUTOR_TEST_KILL")
    assert project.run(TARGET, workers=2).ok  # the next run converges
    assert project.result_hashes() == serial_hashes


def test_a_revert_computes_nothing_and_starts_no_cluster(
    project: Project,
    serial_hashes: dict[tuple[str, dt.date], str | None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _project(project, extra='executor = "dask"\nworkers = 2\n')
    assert project.run(TARGET, workers=2).ok
    changed = CALCS.replace('prev["ups"] + int(up)', 'prev["ups"] + 2 * int(up)')
    assert changed != CALCS
    project.write_calcs(changed)
    assert project.run(TARGET, workers=2).ok
    project.write_calcs(CALCS)  # changed back: every cell has a retained result

    def no_cluster(self: object) -> None:
        raise AssertionError("a cluster was started for a run that computes nothing")

    monkeypatch.setattr(dask_runner.DaskBlocks, "__enter__", no_cluster)
    summary = project.run(TARGET, workers=2)
    assert summary.ok, summary.lines()
    assert summary.executed == {} and summary.reused > 0
    assert project.result_hashes() == serial_hashes


def test_the_per_user_walk_over_a_root_store_forks_local_workers_with_a_local_cluster(
    project: Project,
    tmp_path: Path,
    serial_hashes: dict[tuple[str, dt.date], str | None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Calculations without a columnar form over data too large to hold are walked, not run
    in blocks: with a LocalCluster the walk forks ``workers`` processes of this machine
    (before the cluster's client starts its threads), and the results are serial ones."""
    from orchestrator.app import Orchestrator

    monkeypatch.setattr(Orchestrator, "holds_in_memory", lambda self, name: False)
    log = tmp_path / "pids.log"
    monkeypatch.setenv(PID_LOG, str(log))
    _project(project, extra='executor = "dask"\nworkers = 2\n')
    summary = project.run(TARGET, workers=2)
    assert summary.ok, summary.lines()
    assert project.result_hashes() == serial_hashes
    walkers = _pids(log)["close"]
    assert len(walkers) == 2 and os.getpid() not in walkers


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[str]:
    """A dask cluster as an operator starts one: ``dask scheduler`` and two ``dask worker``
    processes, in a folder of their own, without the tests' or the projects' folders on
    their path (they get the calculations by value)."""
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    dask_exe = str(Path(sys.executable).parent / "dask")
    home = tmp_path / "cluster"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    procs = [
        subprocess.Popen(
            [
                dask_exe,
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--dashboard-address",
                ":0",
            ],
            cwd=home,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    try:
        from distributed import Client

        for _ in range(2):
            procs.append(
                subprocess.Popen(
                    [
                        dask_exe,
                        "worker",
                        address,
                        "--nthreads",
                        "1",
                        "--nworkers",
                        "1",
                        "--no-dashboard",
                    ],
                    cwd=home,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        with Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
        yield address
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)


def test_a_running_cluster_computes_the_serial_results_on_postgresql(
    project: Project,
    tmp_path: Path,
    cluster: str,
    serial_hashes: dict[tuple[str, dt.date], str | None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if project.db_url.startswith("sqlite"):
        pytest.skip("a remote cluster needs the PostgreSQL ledger (SQLite is refused above)")
    log = tmp_path / "pids.log"
    # Only this process has the log (the workers started before): a close cell computed
    # here would write its pid there.
    monkeypatch.setenv(PID_LOG, str(log))
    _project(project, extra=f'executor = "dask"\nscheduler = "{cluster}"\n')
    summary = project.run(TARGET)
    assert summary.ok, summary.lines()
    assert project.result_hashes() == serial_hashes
    assert os.getpid() not in _pids(log).get("close", set())


def test_a_running_cluster_computes_ranged_blocks_with_root_matrices_sent(
    project: Project,
    tmp_path: Path,
    cluster: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a cluster of its own the workers share no files with the run: each range's root
    matrices travel with its order; the upstream and previous results they read, and the
    shards they write, go through the PostgreSQL ledger."""
    if project.db_url.startswith("sqlite"):
        pytest.skip("a remote cluster needs the PostgreSQL ledger (SQLite is refused above)")
    from orchestrator import rootstore
    from orchestrator.app import Orchestrator

    monkeypatch.setattr(rootstore, "PART_USERS", 16)
    monkeypatch.setattr(Orchestrator, "holds_in_memory", lambda self, name: False)
    twin = _streamed(scratch_project(tmp_path, "serial-streamed"), "serial")
    assert twin.run(TARGET).ok
    _streamed(project, "dask")
    project.extra_config += f'scheduler = "{cluster}"\n'
    log = tmp_path / "pids.log"
    monkeypatch.setenv(PID_LOG, str(log))
    summary = project.run(TARGET)
    assert summary.ok, summary.lines()
    assert project.result_hashes() == twin.result_hashes()
    assert os.getpid() not in _pids(log).get("close", set())
    seqs, leftover = _shard_numbers(project.db_url, "close", TARGET)
    assert {seq // RANGE_SEQ_SPAN for seq in seqs} == set(range(5)) and leftover == 0
