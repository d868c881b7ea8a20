"""The ``orchestrator`` command line: a thin click layer over ``app.Orchestrator``.

Exit codes:

====  =============================================================
0     all good: every cell of the range is complete and clean
1     not clean: a cell failed, users failed (their traceback is
      stored: ``orchestrator failures``), a dead letter, or a cell
      blocked by a failure upstream — one summary line per kind
2     usage or configuration error: a one-line message, no traceback
====  =============================================================

``--debug`` re-raises errors with their traceback. JSON output goes to stdout alone; progress
and messages go to stderr.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from orchestrator.app import Orchestrator
from orchestrator.errors import ConfigError, OrchestratorError
from orchestrator.planning import decision_json
from orchestrator.results import describe_failure, failure_of


class DateType(click.ParamType):
    """An ISO date ``YYYY-MM-DD`` (normalised once, here at the boundary)."""

    name = "date"

    def convert(self, value: Any, param: Any, ctx: Any) -> dt.date:
        if isinstance(value, dt.date):
            return value
        try:
            return dt.date.fromisoformat(value)
        except ValueError:
            self.fail(f"{value!r} is not a date in the form YYYY-MM-DD", param, ctx)


DATE = DateType()


def _handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The single error handler: an ``OrchestratorError`` is printed as one ``Error: ...``
    line with its family's exit code; any other exception (a bug) as one line too, exit 1,
    pointing at ``--debug``; ``--debug`` re-raises with the traceback. click's own exits and
    usage errors pass through."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        try:
            return fn(*args, **kwargs)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except BrokenPipeError:
            # The reader went away (``orchestrator plan | head``): nothing to say to it; the
            # exit status is a shell's for SIGPIPE. Further writes to stdout are dropped, so
            # the interpreter's own flush at exit does not fail again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            ctx.exit(141)
        except OrchestratorError as e:
            _log_error(e)
            if ctx.obj.get("debug"):
                raise
            click.echo(f"Error: {_one_line(e)}", err=True)
            ctx.exit(e.exit_code)
        except Exception as e:  # an unexpected error (a bug): still one line for cron
            _log_error(e)
            if ctx.obj.get("debug"):
                raise
            click.echo(
                f"Error: unexpected {type(e).__name__}: {_one_line(e)} (run again with --debug "
                "for the traceback)",
                err=True,
            )
            ctx.exit(1)

    return wrapper


def _log_error(error: BaseException) -> None:
    """The command's error in the log file too (stderr shows its one line already)."""
    logging.getLogger("orchestrator.cli").error(
        "%s: %s", type(error).__name__, _one_line(error), extra={"echoed": True}
    )


def _one_line(error: BaseException) -> str:
    """The error's message as one line (a worker's traceback, an SQL statement, ... are
    cut to their first line, the last of a traceback)."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if len(lines) > 1 and lines[1].startswith("Traceback"):
        return f"{lines[0]} {lines[-1].strip()}"
    return lines[0]


def _orch(ctx: click.Context, progress: bool = False) -> Orchestrator:
    obj = ctx.obj
    return Orchestrator.from_config(obj["config"], obj["db"], progress=progress)


def _version_message() -> str:
    """``--version``: the package version and the formats a ledger or store depends on."""
    from importlib.metadata import version

    from orchestrator.fingerprint import RESULT_FORMAT
    from orchestrator.ledger.store import SCHEMA_HEAD
    from orchestrator.rootstore import STORE_FORMAT

    return (
        f"orchestrator {version('orchestrator')} (ledger schema {SCHEMA_HEAD}, result format "
        f"{RESULT_FORMAT}, root store format {STORE_FORMAT}; Python {sys.version.split()[0]})"
    )


def _show_version(ctx: click.Context, param: Any, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(_version_message())
        ctx.exit(0)


@click.group()
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_show_version,
    help="Show the version and the storage formats, then exit.",
)
@click.option(
    "--config",
    "config",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The TOML config file [default: orchestrator.toml, else pyproject.toml's "
    "[tool.orchestrator] table].",
)
@click.option(
    "--db", "db", default=None, help="Database URL; overrides the config and ORCHESTRATOR_DB_URL."
)
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.option(
    "-v",
    "--verbose",
    count=True,
    help="Log to stderr: -v a line per executed cell and per run (INFO), -vv also DEBUG.",
)
@click.option("-q", "--quiet", is_flag=True, help="Log only errors to stderr.")
@click.option(
    "--log-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also append the log (INFO and above; DEBUG with -vv) to this file.",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="json: one object per line (ts in UTC, level, logger, message, fields).",
)
@click.pass_context
def main(
    ctx: click.Context,
    config: Path,
    db: str | None,
    debug: bool,
    verbose: int,
    quiet: bool,
    log_file: Path | None,
    log_format: str,
) -> None:
    """Incremental orchestrator for nightly calculations over dates."""
    ctx.obj = {"config": config, "db": db, "debug": debug}
    from orchestrator import logs

    try:
        logs.configure(verbose, quiet, log_file, log_format)
    except OSError as e:
        raise click.UsageError(f"cannot open the log file {log_file}: {e.strerror or e}") from e


def _measured(orch: Orchestrator, override: Path | None, call: Callable[[], Any]) -> Any:
    """``call()`` (a run), then its Prometheus textfile (``orchestrator.metrics``) at
    ``override`` or the config's ``metrics_file``, also when the run raises (then marked
    aborted, with the error's exit code, and the error re-raised).

    Raises:
        ConfigError: the metrics file cannot be written (after a run that did not raise).
    """
    path = override or orch.config.metrics_file
    if path is None:
        return call()
    from orchestrator import metrics

    started = time.perf_counter()
    try:
        summary = call()
    except BaseException as e:
        code = e.exit_code if isinstance(e, OrchestratorError) else 1
        with contextlib.suppress(OSError):  # the run's own error is the one to report
            metrics.write_textfile(
                path,
                metrics.aborted(
                    dt.datetime.now(dt.UTC),
                    time.perf_counter() - started,
                    code,
                    metrics.previous_success(path),
                ),
            )
        raise
    try:
        metrics.write_textfile(
            path,
            metrics.from_summary(summary, dt.datetime.now(dt.UTC), metrics.previous_success(path)),
        )
    except OSError as e:
        raise ConfigError(f"cannot write the metrics file {path}: {e}") from e
    return summary


def _write_report(text: str, output: Path | None) -> None:
    """A report to ``output``, else to stdout.

    Raises:
        ConfigError: the file cannot be written.
    """
    if output:
        try:
            output.write_text(text)
        except OSError as e:
            raise ConfigError(f"cannot write the report to {output}: {e.strerror or e}") from e
        click.echo(f"wrote {output}", err=True)
    else:
        click.echo(text, nl=not text.endswith("\n"))


def _executor_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--executor`` and ``--scheduler`` (run, backfill)."""
    fn = click.option(
        "--scheduler",
        default=None,
        metavar="ADDRESS",
        help="With --executor dask: a running scheduler (tcp://host:8786); default: the "
        "config's scheduler, else a LocalCluster of --workers processes.",
    )(fn)
    return click.option(
        "--executor",
        default=None,
        metavar="NAME",
        help="Where blocks are computed: serial, processes, dask or a plug-in (default: the "
        "config's executor; `orchestrator executors` lists them).",
    )(fn)


def _selection_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--select`` and ``--exclude`` (dbt style, ``orchestrator.selection``)."""
    fn = click.option(
        "--exclude",
        "exclude",
        multiple=True,
        help="Leave these out (same terms as --select; repeatable).",
    )(fn)
    return click.option(
        "--select",
        "select",
        multiple=True,
        help="Only these calculations: NAME, +NAME (with its upstream), NAME+ (with its "
        "downstream), product_line:X, category:Y; space-separated terms and repeats are a union.",
    )(fn)


def _selected(orch: Orchestrator, select: tuple[str, ...], exclude: tuple[str, ...]) -> Any:
    from orchestrator.selection import resolve_selection

    return resolve_selection(orch.manifest, select, exclude)


def _print_summary(summary: Any) -> None:
    click.echo(summary.headline())
    for note in summary.notes[:20]:
        click.echo(f"  note: {note}", err=True)
    for calc, date, error in summary.failed[:20]:
        click.echo(f"  FAILED {calc} {date}: {error}", err=True)
    if len(summary.failed) > 20:
        click.echo(f"  ... and {len(summary.failed) - 20} more failures", err=True)
    for line in summary.lines():
        click.echo(f"  {line}")
    if not summary.ok:
        click.echo(f"  not clean: exit 1 (orchestrator runs --run {summary.run_id[:8]})")


@main.command()
@click.option(
    "--date", "date", type=DATE, default=None, help="Target date (default: yesterday, UTC)."
)
@click.option(
    "--trigger", type=click.Choice(["manual", "cron"]), default="manual", show_default=True
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Processes for standard cells (default: the config's workers).",
)
@click.option(
    "--metrics-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write a Prometheus textfile here after the run (default: the config's metrics_file).",
)
@click.option(
    "--plan",
    "plan_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Run exactly this saved plan (plan --save); refused (exit 2) if anything it was "
    "decided from changed since.",
)
@_selection_options
@_executor_options
@click.pass_context
@_handle_errors
def run(
    ctx: click.Context,
    date: dt.date | None,
    trigger: str,
    workers: int | None,
    executor: str | None,
    scheduler: str | None,
    metrics_file: Path | None,
    plan_file: Path | None,
    select: tuple[str, ...],
    exclude: tuple[str, ...],
) -> None:
    """The nightly job: index root data, plan, execute everything due up to DATE."""
    reviewed = None
    if plan_file is not None:
        from orchestrator import saved_plan

        if date is not None or select or exclude:
            raise click.UsageError(
                "--plan runs the saved plan's date and selection: drop --date, --select and --exclude"
            )
        reviewed = saved_plan.read(plan_file)
        date = dt.date.fromisoformat(reviewed.target)
    orch = _orch(ctx, progress=sys.stderr.isatty())
    try:
        selection = (
            _selected(orch, select, exclude)
            if reviewed is None
            else (frozenset(reviewed.selection) if reviewed.selection is not None else None)
        )
        summary = _measured(
            orch,
            metrics_file,
            lambda: orch.run(
                date,
                trigger=trigger,
                workers=workers,
                selection=selection,
                reviewed=reviewed,
                executor=executor,
                scheduler=scheduler,
            ),
        )
    finally:
        orch.close()
    _print_summary(summary)
    ctx.exit(summary.exit_code)


@main.command()
@click.option(
    "--date", "date", type=DATE, default=None, help="Target date (default: yesterday, UTC)."
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "markdown", "html", "json"]),
    default="text",
    show_default=True,
)
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the report to this file instead of stdout.",
)
@click.option(
    "--save",
    "save",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also save the plan, with everything it was decided from, for run --plan.",
)
@_selection_options
@click.pass_context
@_handle_errors
def plan(
    ctx: click.Context,
    date: dt.date | None,
    fmt: str,
    output: Path | None,
    save: Path | None,
    select: tuple[str, ...],
    exclude: tuple[str, ...],
) -> None:
    """The dry-run analysis report: what would run and why. Executes nothing."""
    from orchestrator.reporting import render

    if output is not None and not output.parent.is_dir():  # before the work of planning
        raise ConfigError(
            f"cannot write the report to {output}: folder {output.parent} does not exist; "
            "create it or pass another --output"
        )
    orch = _orch(ctx)
    try:
        selection = _selected(orch, select, exclude)
        if save is None:
            text = render(orch.plan(date, selection=selection), fmt, orch.manifest)
        else:
            from orchestrator import saved_plan

            whole, reviewable = orch.saved_plan(date, selection)
            saved_plan.write(save, reviewable)
            click.echo(
                f"saved the plan to {save} (run it with: orchestrator run --plan {save})", err=True
            )
            shown = orch.plan(date, selection=selection) if selection is not None else whole
            text = render(shown, fmt, orch.manifest)
    finally:
        orch.close()
    _write_report(text, output)


@main.command()
@click.option(
    "--date", "date", type=DATE, default=None, help="Last date (default: yesterday, UTC)."
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "json", "html"]),
    default="text",
    show_default=True,
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the report to this file instead of stdout.",
)
@_selection_options
@click.pass_context
@_handle_errors
def status(
    ctx: click.Context,
    date: dt.date | None,
    fmt: str,
    output: Path | None,
    select: tuple[str, ...],
    exclude: tuple[str, ...],
) -> None:
    """Per calculation: complete through which date, cells by state, unclean cells, the last
    run. Exit 0 when every cell up to DATE is complete and clean, else 1. Executes nothing."""
    from orchestrator.status import render_status

    orch = _orch(ctx)
    try:
        found = orch.status(date, selection=_selected(orch, select, exclude))
    finally:
        orch.close()
    text = render_status(found, fmt)
    _write_report(text, output)
    ctx.exit(found.exit_code)


@main.command()
@click.option("--start", type=DATE, required=True, help="First date (inclusive).")
@click.option("--end", type=DATE, required=True, help="Last date (inclusive).")
@click.option(
    "--calc", "calcs", multiple=True, help="Only this calculation (repeatable), with its upstream."
)
@click.option(
    "--force", is_flag=True, help="Re-run the cells even when up to date (reason FORCED)."
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Processes for standard cells (default: the config's workers).",
)
@click.option(
    "--metrics-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write a Prometheus textfile here after the run (default: the config's metrics_file).",
)
@_selection_options
@_executor_options
@click.pass_context
@_handle_errors
def backfill(
    ctx: click.Context,
    start: dt.date,
    end: dt.date,
    calcs: tuple[str, ...],
    force: bool,
    workers: int | None,
    executor: str | None,
    scheduler: str | None,
    metrics_file: Path | None,
    select: tuple[str, ...],
    exclude: tuple[str, ...],
) -> None:
    """Compute a date range (inclusive), optionally forcing a re-run."""
    if end < start:
        raise click.UsageError(f"--end {end} is before --start {start}")
    orch = _orch(ctx, progress=sys.stderr.isatty())  # a bar only on a terminal, not in cron logs
    try:
        summary = _measured(
            orch,
            metrics_file,
            lambda: orch.run(
                end,
                trigger="backfill",
                start=start,
                calculations=calcs,
                force=force,
                workers=workers,
                selection=_selected(orch, select, exclude),
                executor=executor,
                scheduler=scheduler,
            ),
        )
    finally:
        orch.close()
    _print_summary(summary)
    ctx.exit(summary.exit_code)


@main.group()
def epoch() -> None:
    """The system epoch: a global salt of every fingerprint."""


@epoch.command("bump")
@click.option("--calc", "calc", default=None, help="Bump only this calculation's epoch.")
@click.option("--reason", default="", help="Why; stored and shown in the plan.")
@click.pass_context
@_handle_errors
def epoch_bump(ctx: click.Context, calc: str | None, reason: str) -> None:
    """Force a re-run: every cell (or CALC's) becomes RUNNABLE (EPOCH_CHANGED)."""
    orch = _orch(ctx)
    try:
        old, new = orch.bump_epoch(calc, reason)
    finally:
        orch.close()
    where = f"epoch of {calc}" if calc else f"system epoch in {orch.config.epoch_file}"
    click.echo(f"{where}: {old} -> {new}" + (f" ({reason})" if reason else ""))


@epoch.command("list")
@click.pass_context
@_handle_errors
def epoch_list(ctx: click.Context) -> None:
    """Every epoch bump with its reason."""
    orch = _orch(ctx)
    try:
        for bump in orch.ledger.epoch_bumps():
            scope = bump.calculation or "(global)"
            click.echo(
                f"{bump.bumped_at:%Y-%m-%d %H:%M:%S} {scope:24} {bump.epoch:4} {bump.reason}"
            )
    finally:
        orch.close()


@main.command()
@click.argument("calc")
@click.argument("date", type=DATE)
@click.option("--user", default=None, help="Only this user's result.")
@click.pass_context
@_handle_errors
def show(ctx: click.Context, calc: str, date: dt.date, user: str | None) -> None:
    """Print a stored result as JSON."""
    orch = _orch(ctx)
    try:
        if user is not None:  # one shard read, however many users the cell has
            result = orch.load_user_result(calc, date, user)
            if result is None and orch.ledger.shard_index(calc, date) is not None:
                click.echo(f"Error: {calc} on {date} has no result for user {user!r}", err=True)
                ctx.exit(1)
        else:
            result = orch.load_result(calc, date)
    finally:
        orch.close()
    origin = failure_of(result) if user is not None else None
    if user is not None and origin is not None:
        click.echo(f"Error: {calc} on {date}: {describe_failure(user, origin)}", err=True)
        ctx.exit(1)
    if user is None and isinstance(result, dict):
        failed = sum(1 for value in result.values() if failure_of(value) is not None)
        if failed:  # shown as markers ({"__failed__": ...}), and said once on stderr
            click.echo(
                f"note: {failed} user(s) failed in {calc} on {date}; their results are failure "
                f"markers (orchestrator failures {calc} {date})",
                err=True,
            )
    if result is None:
        click.echo(
            f"Error: no published result for {calc} on {date}; see `orchestrator plan`", err=True
        )
        ctx.exit(1)
    click.echo(json.dumps(result, indent=2, sort_keys=True))


@main.command()
@click.argument("calc")
@click.argument("date", type=DATE)
@click.option(
    "--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True
)
@click.pass_context
@_handle_errors
def why(ctx: click.Context, calc: str, date: dt.date, fmt: str) -> None:
    """Explain a cell's status from the fingerprint parts it was built from."""
    orch = _orch(ctx)
    try:
        decision, stored, parts = orch.why(calc, date)
        attempts = orch.ledger.attempts(calc, date) if stored is not None else []
    finally:
        orch.close()
    last = attempts[-1] if attempts else None
    if fmt == "json":
        rows = [
            {"part": p.part, "stored": p.stored, "current": p.current, "same": p.same}
            for p in parts
        ]
        attempt = None
        if last is not None:
            attempt = {
                "run_id": last.run_id,
                "status": last.status,
                "reason": last.reason,
                "detail": last.detail,
                "finished_at": last.finished_at.isoformat(),
            }
        click.echo(json.dumps({**decision_json(decision), "parts": rows, "last_attempt": attempt}))
        return
    click.echo(
        f"{calc} on {date}: {decision.status.value} ({decision.reason.value})"
        + (f" - {decision.detail}" if decision.detail else "")
    )
    if stored is None:
        click.echo("never computed: no stored fingerprint to compare")
    else:
        click.echo(
            f"stored: {stored.status}, result {stored.result_hash}, attempts {stored.attempts}"
        )
    if last is not None:
        click.echo(
            f"last attempt: run {last.run_id[:8]} at {last.finished_at:%Y-%m-%d %H:%M:%S} UTC, "
            f"{last.status} ({last.reason})" + (f" - {last.detail}" if last.detail else "")
        )
    click.echo(f"  {'part':36} {'stored':34} {'current':34}")
    for p in parts:
        mark = "" if p.same else "  <- differs"
        click.echo(f"  {p.part:36} {str(p.stored)[:32]:34} {str(p.current)[:32]:34}{mark}")


@main.command()
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "json", "dot", "mermaid"]),
    default="text",
    show_default=True,
    help="dot: Graphviz (dot -Tsvg); mermaid: a Mermaid flowchart.",
)
@click.pass_context
@_handle_errors
def graph(ctx: click.Context, fmt: str) -> None:
    """The calculations' passes and dependency edges."""
    manifest = _orch(ctx).manifest
    if fmt in ("dot", "mermaid"):
        from orchestrator.reporting import pictures

        click.echo(pictures.dot(manifest) if fmt == "dot" else pictures.mermaid(manifest), nl=False)
        return
    if fmt == "json":
        click.echo(
            json.dumps(
                {
                    "passes": [list(p) for p in manifest.passes],
                    "edges": [
                        [d, n] for n in manifest.order for d in manifest.calcs[n].dependencies
                    ],
                }
            )
        )
        return
    for i, members in enumerate(manifest.passes):
        click.echo(f"pass {i}:")
        for name in members:
            spec = manifest.calcs[name]
            inputs = [*spec.dependencies, *(f"root:{r}" for r in spec.root_data)]
            flags = [spec.kind] + (["historical"] if spec.historical else [])
            if spec.lookback > 1:
                flags.append(f"lookback {spec.lookback}")
            click.echo(f"  {name} [{', '.join(flags)}] <- {', '.join(inputs) or '(nothing)'}")


@main.command()
@click.option("--limit", default=20, show_default=True)
@click.option("--run", "run_id", default=None, help="List this run's cell attempts (id prefix).")
@click.pass_context
@_handle_errors
def runs(ctx: click.Context, limit: int, run_id: str | None) -> None:
    """Recent runs, or the cell attempts of one run."""
    orch = _orch(ctx)
    try:
        if run_id is not None:
            record = orch.ledger.run(run_id)
            if record is None:
                raise ConfigError(
                    f"no run with id {run_id!r}; `orchestrator runs` lists the recent runs"
                )
            run_id = record.run_id  # the whole id: a prefix may match older runs too
            code = "-" if record.exit_code is None else record.exit_code
            click.echo(
                f"run {record.run_id[:8]} {record.status} exit {code}: "
                f"{record.cells_completed} completed, {record.cells_failed} failed, "
                f"{record.cells_skipped} skipped"
            )
            for line in (record.summary or "").splitlines():
                click.echo(f"  {line}")
            for a in orch.ledger.attempts_of_run(run_id):
                took = (a.finished_at - a.started_at).total_seconds()
                reasons = ", ".join(f"{k} {v}" for k, v in sorted((a.flush_reasons or {}).items()))
                click.echo(
                    f"{a.calculation:20} {a.date} {a.status:9} {a.reason:20} users {a.users} "
                    f"failed {a.users_failed} flushes {a.flushes} ({reasons or '-'}) shards "
                    f"{a.shards} bytes {a.bytes_raw}->{a.bytes_compressed} "
                    f"peak {a.peak_memory / 2**20:.0f} MiB {took:.2f}s {a.worker}"
                    + (f"\n    {a.error.strip().splitlines()[-1]}" if a.error else "")
                )
            _print_failures(orch.ledger.user_failures(run_id=run_id))
            return
        for r in orch.ledger.recent_runs(limit):
            took = (r.finished_at - r.started_at).total_seconds() if r.finished_at else None
            click.echo(
                f"{r.run_id[:8]} {r.started_at:%Y-%m-%d %H:%M:%S} {r.trigger:8} {r.status:9} "
                f"target {r.target_date} completed {r.cells_completed} failed {r.cells_failed} "
                f"skipped {r.cells_skipped}" + (f" ({took:.1f}s)" if took is not None else "")
            )
    finally:
        orch.close()


def _print_failures(rows: list[Any]) -> None:
    """Stored failed users with their errors (the whole traceback for an error of its own)."""
    for r in rows:
        click.echo(f"{r.calculation} {r.date} user {r.user} ({r.kind}, run {r.run_id[:8]}):")
        for line in r.error.rstrip().splitlines():
            click.echo(f"    {line}")


@main.command()
@click.argument("calc", required=False)
@click.argument("date", type=DATE, required=False)
@click.pass_context
@_handle_errors
def failures(ctx: click.Context, calc: str | None, date: dt.date | None) -> None:
    """Users that failed in the last attempt of each cell (optionally of CALC, on DATE):
    user, date, calculation and the error — the traceback ending at the calculation's line,
    the malformed rows' file:line, or the upstream cell where the user failed first. The
    first 20 users of each kind are stored per cell; the count covers them all."""
    orch = _orch(ctx)
    try:
        if calc is not None:
            orch._known(calc)
        counts = orch.ledger.failure_counts(calc, date)
        rows = orch.ledger.user_failures(calc, date)
    finally:
        orch.close()
    if not counts:
        click.echo("no failed users")
        return
    shown: dict[tuple[str, dt.date], int] = {}
    for r in rows:
        shown[(r.calculation, r.date)] = shown.get((r.calculation, r.date), 0) + 1
    for c in counts:
        stored = shown.get((c.calculation, c.date), 0)
        click.echo(
            f"{c.calculation} {c.date} {c.status}: {c.users_failed} user(s) failed"
            + (f" ({stored} stored)" if stored < c.users_failed else "")
        )
    _print_failures(rows)


@main.group()
def dlq() -> None:
    """Dead letters: cells that failed max_attempts times and stay out of the nightly loop."""


@dlq.command("list")
@click.pass_context
@_handle_errors
def dlq_list(ctx: click.Context) -> None:
    """Every dead-lettered cell with its attempts and last error."""
    orch = _orch(ctx)
    try:
        rows = orch.ledger.dead_letters()
    finally:
        orch.close()
    if not rows:
        click.echo("no dead letters")
    for calc, date, attempts, error in rows:
        last = (error or "").strip().splitlines()[-1:] or [""]
        click.echo(f"{calc:24} {date} attempts {attempts}: {last[0]}")


@dlq.command("retry")
@click.argument("calc", required=False)
@click.argument("date", type=DATE, required=False)
@click.option("--all", "everything", is_flag=True, help="Retry every dead letter.")
@click.pass_context
@_handle_errors
def dlq_retry(ctx: click.Context, calc: str | None, date: dt.date | None, everything: bool) -> None:
    """Put dead letters back in the loop; the next run retries them."""
    if calc is None and not everything:
        raise click.UsageError("name a calculation (and optionally a date), or pass --all")
    orch = _orch(ctx)
    try:
        count = orch.ledger.retry_dead_letters(calc, date)
    finally:
        orch.close()
    click.echo(f"{count} dead letter(s) will be retried by the next `orchestrator run`")


@main.command()
@click.option(
    "--keep",
    type=click.IntRange(min=0),
    default=None,
    help="Retained results to keep per cell, newest first  [default: retain_results, 3].",
)
@click.option(
    "--older-than",
    "older_than",
    type=click.FloatRange(min=0),
    default=None,
    metavar="DAYS",
    help="Also prune results superseded more than DAYS ago.",
)
@click.option("--dry-run", is_flag=True, help="Say what would be pruned; delete nothing.")
@click.pass_context
@_handle_errors
def gc(ctx: click.Context, keep: int | None, older_than: float | None, dry_run: bool) -> None:
    """Prune retained results: superseded clean results kept by fingerprint, so that a
    reverted change (code, data, epoch) re-points cells to them instead of recomputing
    (REUSED). Never prunes a current result; takes the run lock."""
    orch = _orch(ctx)
    try:
        report = orch.gc(keep, older_than, dry_run)
    finally:
        orch.close()
    verb = "would prune" if report.dry_run else "pruned"
    click.echo(
        f"{verb} {report.pruned:,} retained result(s) ({report.pruned_bytes / 2**20:.1f} MiB "
        f"compressed); {report.kept:,} stay retained"
        + (f"; removed {report.orphans:,} orphaned shard(s)" if report.orphans else "")
    )


@main.command("executors")
@click.pass_context
@_handle_errors
def executors_(ctx: click.Context) -> None:
    """Every executor (built in, or a plug-in under the entry-point group
    orchestrator.executors): available here or not, and why; the configured one marked."""
    from orchestrator import executors

    configured = _orch(ctx).config.executor
    for name, why, summary in executors.describe():
        mark = "*" if name == configured else " "
        state = "available" if why is None else "unavailable"
        click.echo(f"{mark} {name:10} {state:11} {why if why is not None else summary}")


@main.group()
def db() -> None:
    """The ledger database."""


@db.command("upgrade")
@click.pass_context
@_handle_errors
def db_upgrade(ctx: click.Context) -> None:
    """Apply the Alembic migrations up to the newest schema."""
    from orchestrator.ledger.store import Ledger, current_revision

    orch = _orch(ctx)
    ledger = Ledger.open(orch.config.database_url, migrate=True)
    click.echo(f"ledger schema at {current_revision(ledger.engine)}")
    ledger.dispose()


if __name__ == "__main__":  # pragma: no cover
    main()
