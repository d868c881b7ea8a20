"""Operating a nightly run from cron (issue 10, items 7 and 8; SQLite and PostgreSQL).

The run's summary is one plain sentence with its times in UTC; ``--version`` names the
storage formats; a backfill draws no progress bar into a pipe; and a run can leave a
Prometheus textfile (``metrics_file``) that the textfile collector parses, written atomically,
with the last success kept across failing and aborted runs.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator import metrics
from orchestrator.app import Orchestrator
from tests.conftest import Project, price_rows, weekdays

DATES = weekdays(dt.date(2024, 3, 1), 4)
USERS = ["AAA", "BBB", "CCC"]

SOURCE = """
from orchestrator import StandardCalculation


class Double(StandardCalculation):
    name = "double"
    category = "risk"
    root_data = ["prices"]

    def process(self, ctx):
        if ctx.user in {FAILING!r}:
            raise ValueError("no quote")
        return {{"x": ctx.root["prices"][0]["close"] * 2}}


class Half(StandardCalculation):
    name = "half"
    category = "risk"
    dependencies = ["double"]

    def process(self, ctx):
        return {{"y": ctx.upstream["double"]["x"] / 4}}
"""

HEADLINE = re.compile(
    r"^Run (?P<run>[0-9a-f]{8}) finished in (?P<wall>[\d.]+) s "
    r"\((?P<start>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) to (?P<end>[\d: -]+) UTC\), "
    r"(?P<executing>[\d.]+) s of it executing: (?P<computed>[\d,]+) cells? computed, "
    r"(?P<failed>[\d,]+) failed(?:, (?P<users>[\d,]+) users? failed)?, "
    r"(?P<skipped>[\d,]+) skipped \(up to date\), (?P<blocked>[\d,]+) blocked, "
    r"(?P<impossible>[\d,]+) impossible; peak memory \d+ MiB\.$",
    re.MULTILINE,
)


def setup(project: Project, failing: tuple[str, ...] = ()) -> None:
    project.write_prices(price_rows(USERS, DATES))
    project.write_calcs(SOURCE.format(FAILING=set(failing)))


def parse_textfile(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A strict reader of the text exposition format as node_exporter's textfile collector
    takes it: every sample's metric has ``# HELP`` and ``# TYPE ... gauge`` lines before it,
    label values are quoted and escaped, values are numbers; returns ``{(name, labels):
    value}``."""
    assert text.endswith("\n")
    helped: set[str] = set()
    typed: set[str] = set()
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    sample = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$")
    label = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\[\\"n])*)"(,|$)')
    for line in text[:-1].split("\n"):  # the format's lines end in \n alone
        if line.startswith("# HELP "):
            helped.add(line.split()[2])
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert kind == "gauge"
            typed.add(name)
        else:
            m = sample.match(line)
            assert m, line
            name, _, body, value = m.groups()
            assert name in helped and name in typed, name
            labels = []
            rest = body or ""
            while rest:
                found = label.match(rest)
                assert found, rest
                labels.append((found.group(1), found.group(2)))
                rest = rest[found.end() :]
            samples[(name, tuple(labels))] = float(value)
    return samples


def test_the_summary_is_one_plain_sentence_with_utc_times(project: Project) -> None:
    setup(project)
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    result = project.cli("run", "--date", DATES[-1].isoformat())
    assert result.exit_code == 0, result.output
    assert "user-passes" not in result.output
    m = HEADLINE.search(result.output)
    assert m, result.output
    assert m["computed"] == str(2 * len(DATES)) and m["failed"] == "0" and m["users"] is None
    assert m["skipped"] == m["blocked"] == m["impossible"] == "0"
    start = dt.datetime.fromisoformat(m["start"]).replace(tzinfo=dt.UTC)
    assert before <= start <= dt.datetime.now(dt.UTC)
    assert float(m["executing"]) <= float(m["wall"]) + 0.01
    again = HEADLINE.search(project.cli("run", "--date", DATES[-1].isoformat()).output)
    assert again and again["computed"] == "0" and again["skipped"] == str(2 * len(DATES))


def test_version_names_the_package_and_its_storage_formats(project: Project) -> None:
    result = project.cli("--version")
    assert result.exit_code == 0
    assert result.output.startswith(f"orchestrator {version('orchestrator')} (ledger schema ")
    assert "result format" in result.output and "root store format" in result.output


def test_a_backfill_into_a_pipe_draws_no_progress_bar(project: Project) -> None:
    setup(project)
    start, end = DATES[0].isoformat(), DATES[-1].isoformat()
    result = project.cli("backfill", "--start", start, "--end", end)
    assert result.exit_code == 0, result.output
    assert "\r" not in result.output and "date/s" not in result.output
    assert "it/s" not in result.output


def test_a_reader_that_goes_away_ends_the_command_quietly(project: Project) -> None:
    setup(project)
    assert project.run(DATES[-1]).ok
    exe = Path(sys.executable).parent / "orchestrator"
    # ``| true`` exits without reading: the plan's first write meets a closed pipe.
    shell = f"'{exe}' --config '{project.config}' plan --date {DATES[-1]} | true"
    done = subprocess.run(
        ["bash", "-c", shell + "; echo ${PIPESTATUS[0]}"],
        check=True,
        capture_output=True,
        text=True,
    )
    assert done.stdout.strip() == "141"  # a shell's status for SIGPIPE, as `yes | true`
    assert done.stderr == ""  # no "unexpected BrokenPipeError", no traceback


def test_metrics_textfile_after_clean_failing_and_aborted_runs(
    project: Project, tmp_path: Path
) -> None:
    (tmp_path / "prom").mkdir()
    path = tmp_path / "prom" / "orchestrator.prom"
    setup(project)
    result = project.cli("run", "--date", DATES[-1].isoformat(), "--metrics-file", str(path))
    assert result.exit_code == 0, result.output
    clean = parse_textfile(path.read_text())
    last_run = clean[("orchestrator_last_run_timestamp_seconds", ())]
    assert clean[("orchestrator_last_success_timestamp_seconds", ())] == last_run
    assert abs(last_run - dt.datetime.now(dt.UTC).timestamp()) < 60
    assert clean[("orchestrator_last_run_exit_code", ())] == 0
    assert clean[("orchestrator_last_run_aborted", ())] == 0
    assert clean[("orchestrator_last_run_cells", (("state", "computed"),))] == 2 * len(DATES)
    assert clean[("orchestrator_last_run_cells_by_reason", (("reason", "NEW"),))] == 8
    assert clean[("orchestrator_failed_users", ())] == 0
    assert clean[("orchestrator_last_run_duration_seconds", ())] > 0

    # A failing run (one user raises in a new version of the code): exit 1, success kept.
    setup(project, failing=("BBB",))
    result = project.cli("run", "--date", DATES[-1].isoformat(), "--metrics-file", str(path))
    assert result.exit_code == 1, result.output
    failing = parse_textfile(path.read_text())
    assert failing[("orchestrator_last_run_exit_code", ())] == 1
    # (one user of three is past the failure rate: its cells fail as a whole)
    assert failing[("orchestrator_last_run_cells", (("state", "failed"),))] == len(DATES)
    assert failing[("orchestrator_last_success_timestamp_seconds", ())] == last_run
    assert failing[("orchestrator_last_run_timestamp_seconds", ())] >= last_run

    # An aborted run (another run holds the lock): exit 2, marked aborted, success kept.
    orch = Orchestrator.from_config(project.config)
    orch.ledger.acquire_lock("someone-else", dt.datetime.now(dt.UTC), dt.timedelta(minutes=5))
    try:
        result = project.cli("run", "--date", DATES[-1].isoformat(), "--metrics-file", str(path))
    finally:
        orch.ledger.release_lock("someone-else")
        orch.close()
    assert result.exit_code == 2, result.output
    stopped = parse_textfile(path.read_text())
    assert stopped[("orchestrator_last_run_aborted", ())] == 1
    assert stopped[("orchestrator_last_run_exit_code", ())] == 2
    assert stopped[("orchestrator_last_success_timestamp_seconds", ())] == last_run
    assert not any(name == "orchestrator_last_run_cells" for name, _ in stopped)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_metrics_file_from_the_config_resolves_next_to_it(project: Project) -> None:
    project.extra_config = 'metrics_file = "metrics/nightly.prom"\n'
    setup(project)
    (project.root / "metrics").mkdir()
    result = project.cli("run", "--date", DATES[-1].isoformat())
    assert result.exit_code == 0, result.output
    samples = parse_textfile((project.root / "metrics" / "nightly.prom").read_text())
    assert samples[("orchestrator_last_run_exit_code", ())] == 0


def test_an_unwritable_metrics_file_is_a_one_line_error(project: Project, tmp_path: Path) -> None:
    setup(project)
    missing = tmp_path / "no such folder" / "m.prom"
    result = project.cli("run", "--date", DATES[-1].isoformat(), "--metrics-file", str(missing))
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].startswith("Error: cannot write the metrics file")


@given(st.text())
def test_label_values_are_escaped_so_that_they_read_back(value: str) -> None:
    m = metrics.RunMetrics(
        finished_at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        seconds=1.5,
        exit_code=0,
        reasons={value: 3},
    )
    samples = parse_textfile(metrics.render(m))
    ((labels, count),) = [
        (labels, v)
        for (name, labels), v in samples.items()
        if name == "orchestrator_last_run_cells_by_reason"
    ]
    assert count == 3
    ((key, escaped),) = labels
    unescaped = re.sub(r"\\(.)", lambda g: {"n": "\n"}.get(g[1], g[1]), escaped)
    assert key == "reason" and unescaped == value


@pytest.mark.parametrize("content", ["", "orchestrator_last_success_timestamp_seconds x\n"])
def test_a_previous_success_is_only_read_from_a_sample(tmp_path: Path, content: str) -> None:
    path = tmp_path / "m.prom"
    assert metrics.previous_success(path) is None
    path.write_text(content)
    assert metrics.previous_success(path) is None


def test_json_log_lines_one_per_executed_cell_to_stderr_and_file(project: Project) -> None:
    setup(project)
    log = project.root / "run.log"
    target = DATES[-1].isoformat()
    result = project.cli(
        "-v", "--log-format", "json", "--log-file", str(log), "run", "--date", target
    )
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert records == [json.loads(line) for line in log.read_text().splitlines()]
    cells = [r for r in records if "calc" in r]
    assert sorted((r["calc"], r["date"]) for r in cells) == sorted(
        (c, d.isoformat()) for c in ("double", "half") for d in DATES
    )
    for r in cells:
        assert r["ts"].endswith("Z") and r["level"] == "INFO" and r["logger"] == "orchestrator.run"
        assert r["status"] == "COMPLETED" and r["reason"] == "NEW" and r["users"] == len(USERS)
        assert r["failed_users"] == 0 and r["seconds"] >= 0 and r["run_id"]
    assert records[0]["message"].startswith("run ") and "started" in records[0]["message"]
    assert records[-1]["message"].startswith("Run ") and records[-1]["status"] == "CLEAN"

    # A no-op night: no line per skipped cell at INFO, their counts at DEBUG (-vv).
    quiet_night = project.cli("-v", "--log-format", "json", "run", "--date", target)
    assert not [line for line in quiet_night.stderr.splitlines() if '"calc"' in line]
    debug = project.cli("-vv", "run", "--date", target)
    line = next(x for x in debug.stderr.splitlines() if "DEBUG orchestrator.run: run " in x)
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ DEBUG ", line)
    assert f"skipped {2 * len(DATES)} cells: {2 * len(DATES)} UP_TO_DATE" in line


def test_default_and_quiet_stderr_carry_no_info_lines(project: Project) -> None:
    setup(project)
    target = DATES[-1].isoformat()
    for args in ([], ["-q"]):
        result = project.cli(*args, "run", "--date", target)
        assert result.exit_code == 0
        assert " INFO " not in result.stderr and "{" not in result.stderr
    log = project.root / "quiet.log"
    result = project.cli("-q", "--log-file", str(log), "run", "--date", target)
    assert result.exit_code == 0 and " INFO orchestrator.run: Run " in log.read_text()


def test_a_refused_run_keeps_its_one_line_error_and_logs_it(project: Project) -> None:
    setup(project)
    log = project.root / "abort.log"
    orch = Orchestrator.from_config(project.config)
    orch.ledger.acquire_lock("someone-else", dt.datetime.now(dt.UTC), dt.timedelta(minutes=5))
    try:
        result = project.cli("-v", "--log-file", str(log), "run", "--date", DATES[-1].isoformat())
    finally:
        orch.ledger.release_lock("someone-else")
        orch.close()
    assert result.exit_code == 2
    assert [x for x in result.stderr.splitlines() if x.strip()] == [
        next(x for x in result.stderr.splitlines() if x.startswith("Error: "))
    ]
    assert " ERROR orchestrator.cli: RunLockedError: another run (someone-else)" in log.read_text()


def test_an_unopenable_log_file_is_a_usage_error(project: Project) -> None:
    result = project.cli("--log-file", str(project.root / "no" / "x.log"), "status")
    assert result.exit_code == 2 and "cannot open the log file" in result.output
