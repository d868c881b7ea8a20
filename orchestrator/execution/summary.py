"""What a run did: ``RunSummary``, its verdict and its report lines."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field


@dataclass(slots=True)
class RunSummary:
    """What a run did, and whether the range it covered is complete and clean.

    ``failed`` lists (calculation, date, error's last line) of the cells this run could not
    publish; ``executed`` maps every cell that ran (successfully or not) to the reason it ran;
    ``reasons`` counts final reasons; ``notes`` are problems of the root data this run uses
    (skipped rows and unreadable files, as stored with each dataset's index, whether or not
    this run re-read it; users failed by malformed rows), each with its location.

    The verdict covers the whole range after the run, not only what ran: ``users_failed``
    lists (calculation, date, status, failed users) of the published cells whose last attempt
    had failed users (status PARTIAL: errors of their own; COMPLETED: failures inherited from
    upstream or from the previous date); ``dead_letters`` the dead-lettered
    cells; ``blocked_by_failure`` the cells blocked by a failure, each with the failed or dead-lettered
    cell at the top of its chain; ``waiting`` the selected cells left waiting on an upstream
    cell outside the selection. ``ok`` (exit code 0) only when all of these are empty.
    """

    run_id: str
    completed: int = 0
    skipped: int = 0
    reused: int = 0  # re-pointed to a retained result of the same fingerprint (REUSED)
    failed: list[tuple[str, dt.date, str]] = field(default_factory=list)
    blocked: int = 0
    impossible: int = 0
    not_in_scope: int = 0
    users_processed: int = 0
    seconds: float = 0.0
    started_at: dt.datetime | None = None  # UTC
    finished_at: dt.datetime | None = None  # UTC
    peak_memory: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    executed: dict[tuple[str, dt.date], str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    users_failed: list[tuple[str, dt.date, str, int]] = field(default_factory=list)
    dead_letters: list[tuple[str, dt.date]] = field(default_factory=list)
    blocked_by_failure: list[tuple[tuple[str, dt.date], tuple[str, dt.date]]] = field(
        default_factory=list
    )
    waiting: list[tuple[str, dt.date]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every cell of the range is complete and clean."""
        return not (
            self.failed
            or self.users_failed
            or self.dead_letters
            or self.blocked_by_failure
            or self.waiting
        )

    @property
    def exit_code(self) -> int:
        """What ``run`` exits with: 0 when ``ok``, else 1 (see the CLI's exit-code table)."""
        return 0 if self.ok else 1

    @property
    def wall_seconds(self) -> float:
        """The whole run's wall time (indexing and planning included), else ``seconds``."""
        if self.started_at is not None and self.finished_at is not None:
            return (self.finished_at - self.started_at).total_seconds()
        return self.seconds

    def headline(self) -> str:
        """The run in one plain sentence, for a person reading a cron mail or a log:
        ``Run 1a2b3c4d finished in 13.02 s (2026-12-02 22:00:01 to 22:00:14 UTC), 12.34 s of
        it executing: 1,234 cells computed, 0 failed, 8,838 skipped (up to date), 0 blocked,
        0 impossible; peak memory 312 MiB.`` Failed users (of published cells: ``orchestrator
        failures``) and cells outside the range are named only when there are some."""
        users = sum(n for *_, n in self.users_failed)
        when = ""
        if self.started_at is not None and self.finished_at is not None:
            start, end = (t.astimezone(dt.UTC) for t in (self.started_at, self.finished_at))
            end_format = "%H:%M:%S" if end.date() == start.date() else "%Y-%m-%d %H:%M:%S"
            when = f" ({start:%Y-%m-%d %H:%M:%S} to {end.strftime(end_format)} UTC)"
        parts = [
            f"{self.completed:,} {'cell' if self.completed == 1 else 'cells'} computed",
            f"{len(self.failed):,} failed",
            *([f"{users:,} {'user' if users == 1 else 'users'} failed"] if users else []),
            f"{self.skipped:,} skipped (up to date)",
            *(
                [f"{self.reused:,} reused (stored results of the same fingerprint)"]
                if self.reused
                else []
            ),
            f"{self.blocked:,} blocked",
            f"{self.impossible:,} impossible",
        ]
        if self.not_in_scope:
            parts.append(f"{self.not_in_scope:,} outside the range or selection")
        return (
            f"Run {self.run_id[:8]} finished in {self.wall_seconds:.2f} s{when}, "
            f"{self.seconds:.2f} s of it executing: {', '.join(parts)}; "
            f"peak memory {self.peak_memory / 2**20:.0f} MiB."
        )

    def lines(self) -> list[str]:
        """One line per kind of problem, each naming the command that shows more."""
        out = []
        if self.failed:
            out.append(
                f"{_count(len(self.failed), 'cell')} failed: {_cells([(c, d) for c, d, _ in self.failed])}"
                " (orchestrator runs --run ID)"
            )
        own = [f for f in self.users_failed if f[2] != "COMPLETED"]
        inherited = [f for f in self.users_failed if f[2] == "COMPLETED"]
        if own:
            out.append(
                f"{_count(sum(f[3] for f in own), 'user')} failed in {_count(len(own), 'cell')}: "
                f"{_cells([(c, d) for c, d, _, _ in own])} (orchestrator failures)"
            )
        if inherited:
            out.append(
                f"{_count(sum(f[3] for f in inherited), 'user')} failed upstream or on an "
                f"earlier date in {_count(len(inherited), 'more cell')}: "
                f"{_cells([(c, d) for c, d, _, _ in inherited])} (orchestrator failures)"
            )
        if self.dead_letters:
            out.append(
                f"{_count(len(self.dead_letters), 'dead letter')}: {_cells(self.dead_letters)}"
                " (orchestrator dlq list)"
            )
        if self.blocked_by_failure:
            causes = list(dict.fromkeys(cause for _, cause in self.blocked_by_failure))
            out.append(
                f"{_count(len(self.blocked_by_failure), 'cell')} blocked by a failure upstream, caused by "
                f"{_cells(causes)} (orchestrator plan)"
            )
        if self.waiting:
            out.append(
                f"{_count(len(self.waiting), 'cell')} not computed: an upstream cell outside the "
                f"selection must run first: {_cells(self.waiting)} (select it too, e.g. +NAME)"
            )
        return out


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _cells(keys: list[tuple[str, dt.date]], limit: int = 3) -> str:
    shown = ", ".join(f"{c} {d}" for c, d in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
