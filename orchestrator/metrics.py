"""A run's figures as a Prometheus textfile, for node_exporter's textfile collector.

The usual way to watch a cron job: after each ``run`` or ``backfill`` (``metrics_file`` in the
config, or ``--metrics-file``), the file is rewritten atomically (a temporary file in the same
folder, then ``os.replace``: the collector never reads half a file) in the text exposition
format (https://prometheus.io/docs/instrumenting/exposition_formats/). Every metric is a
gauge:

======================================================  ===========================================
``orchestrator_last_run_timestamp_seconds``             when the last run ended (Unix time, UTC)
``orchestrator_last_success_timestamp_seconds``         when a run last ended complete and clean;
                                                        kept from the previous file by a run that
                                                        was not (absent until the first success)
``orchestrator_last_run_duration_seconds``              the last run's wall time
``orchestrator_last_run_exit_code``                     what cron saw: 0 clean, 1 not clean or
                                                        aborted, 2 a usage or configuration error
``orchestrator_last_run_cells{state="..."}``            the last run's cells: computed, failed,
                                                        skipped, reused, blocked, impossible, outside
``orchestrator_last_run_cells_by_reason{reason="..."}``  the same cells by their final reason
``orchestrator_failed_users``                           failed users of the range's published cells
``orchestrator_dead_letters``                           dead-lettered cells of the range
``orchestrator_last_run_aborted``                       1 when the last run stopped short (raised)
======================================================  ===========================================

An alert on ``time() - orchestrator_last_success_timestamp_seconds > 26 * 3600`` catches both a
failing and a missing nightly run.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.execution.summary import RunSummary

PREFIX = "orchestrator_"
LAST_SUCCESS = f"{PREFIX}last_success_timestamp_seconds"


@dataclass(frozen=True, slots=True)
class RunMetrics:
    """What one run leaves in the textfile.

    ``finished_at`` is an aware UTC datetime; ``seconds`` the run's wall time; ``cells`` and
    ``reasons`` count cells by state and by final reason; ``success_at`` is when a run last
    ended complete and clean (this one, or an earlier one; None: never known).
    """

    finished_at: dt.datetime
    seconds: float
    exit_code: int
    aborted: bool = False
    cells: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)
    failed_users: int = 0
    dead_letters: int = 0
    success_at: dt.datetime | None = None


def from_summary(
    summary: RunSummary, finished_at: dt.datetime, previous_success: dt.datetime | None
) -> RunMetrics:
    """The metrics of a run that ended with ``summary`` at ``finished_at`` (aware UTC);
    ``previous_success`` is kept as the last success unless this run is clean."""
    return RunMetrics(
        finished_at=finished_at,
        seconds=summary.wall_seconds,
        exit_code=summary.exit_code,
        cells={
            "computed": summary.completed,
            "failed": len(summary.failed),
            "skipped": summary.skipped,
            "reused": summary.reused,
            "blocked": summary.blocked,
            "impossible": summary.impossible,
            "outside": summary.not_in_scope,
        },
        reasons=dict(summary.reasons),
        failed_users=sum(n for *_, n in summary.users_failed),
        dead_letters=len(summary.dead_letters),
        success_at=finished_at if summary.ok else previous_success,
    )


def aborted(
    finished_at: dt.datetime, seconds: float, exit_code: int, previous_success: dt.datetime | None
) -> RunMetrics:
    """The metrics of a run that raised (stopped short): no counts, the last success kept."""
    return RunMetrics(
        finished_at=finished_at,
        seconds=seconds,
        exit_code=exit_code,
        aborted=True,
        success_at=previous_success,
    )


def escape_label(value: str) -> str:
    """A label value as the exposition format writes it: backslash, double quote and line
    feed escaped (``\\\\``, ``\\"``, ``\\n``)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(m: RunMetrics) -> str:
    """The textfile's content: HELP and TYPE lines, then the samples, ``\\n``-terminated."""
    out: list[str] = []

    def gauge(name: str, help_: str, samples: list[tuple[str, float]]) -> None:
        out.append(f"# HELP {PREFIX}{name} {help_}")
        out.append(f"# TYPE {PREFIX}{name} gauge")
        out.extend(f"{PREFIX}{name}{labels} {_number(value)}" for labels, value in samples)

    gauge(
        "last_run_timestamp_seconds",
        "When the last run ended (Unix time, UTC).",
        [("", m.finished_at.timestamp())],
    )
    if m.success_at is not None:
        gauge(
            "last_success_timestamp_seconds",
            "When a run last ended with every cell of its range complete and clean.",
            [("", m.success_at.timestamp())],
        )
    gauge("last_run_duration_seconds", "The last run's wall time.", [("", m.seconds)])
    gauge(
        "last_run_exit_code",
        "The last run's exit code (0 clean, 1 not clean or aborted, 2 usage error).",
        [("", m.exit_code)],
    )
    gauge("last_run_aborted", "1 when the last run stopped short.", [("", int(m.aborted))])
    if m.cells:
        gauge(
            "last_run_cells",
            "The last run's cells by state.",
            [(f'{{state="{escape_label(k)}"}}', v) for k, v in m.cells.items()],
        )
    if m.reasons:
        gauge(
            "last_run_cells_by_reason",
            "The last run's cells by final reason.",
            [(f'{{reason="{escape_label(k)}"}}', v) for k, v in sorted(m.reasons.items())],
        )
    if not m.aborted:
        gauge(
            "failed_users",
            "Failed users of the range's published cells.",
            [("", m.failed_users)],
        )
        gauge("dead_letters", "Dead-lettered cells of the range.", [("", m.dead_letters)])
    return "\n".join(out) + "\n"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def previous_success(path: Path) -> dt.datetime | None:
    """The last success recorded in an existing textfile at ``path`` (None: no file, or no
    such sample in it)."""
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == LAST_SUCCESS:
            try:
                return dt.datetime.fromtimestamp(float(value), dt.UTC)
            except (ValueError, OverflowError):
                return None
    return None


def write_textfile(path: Path, metrics: RunMetrics) -> None:
    """Replace ``path`` with ``render(metrics)`` atomically (a temporary file in the same
    folder, flushed, then ``os.replace``).

    Raises:
        OSError: the folder does not exist or is not writable.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(render(metrics))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # node_exporter runs as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
