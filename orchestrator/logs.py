"""Logging for cron and log shippers: the standard ``logging`` module, set up once by the CLI.

Everything logs under the ``orchestrator`` logger. On stderr, by default, only warnings and
errors (the run's summary is printed, not logged); ``-v`` adds INFO (a line when a run starts,
one per executed cell, one when it ends), ``-vv`` DEBUG (also the skipped cells' counts by
reason); ``-q`` keeps errors only. ``--log-file FILE`` appends INFO and above (DEBUG with
``-vv``) to FILE whatever stderr shows. ``--log-format json`` writes one JSON object per line:
``ts`` (UTC, ISO 8601 with ``Z``), ``level``, ``logger``, ``message`` and the record's fields
(``run_id``, ``calc``, ``date``, ``status``, ``reason``, ``seconds``, ``users``,
``failed_users``, ``counts``) where it has them. Text lines state UTC:
``2026-12-02T02:30:14Z INFO orchestrator.run: score 2024-03-04 COMPLETED (NEW) in 0.12 s ...``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from pathlib import Path
from typing import Any

LOGGER = "orchestrator"
# the structured fields a record may carry (``extra=``), in the order JSON lines show them
FIELDS = (
    "run_id",
    "calc",
    "date",
    "status",
    "reason",
    "seconds",
    "users",
    "failed_users",
    "counts",
)


def _utc(record: logging.LogRecord) -> str:
    return dt.datetime.fromtimestamp(record.created, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class TextFormatter(logging.Formatter):
    """``<UTC time>Z LEVEL logger: message``."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_utc(record)} {record.levelname} {record.name}: {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JSONFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _utc(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            if hasattr(record, name):
                value = getattr(record, name)
                out[name] = value.isoformat() if isinstance(value, dt.date) else value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure(verbosity: int, quiet: bool, log_file: Path | None, fmt: str) -> None:
    """Set up the ``orchestrator`` logger's handlers (replacing earlier ones: the CLI may be
    invoked several times in one process, as tests do).

    Args:
        verbosity: 0 (warnings on stderr), 1 (INFO), 2 or more (DEBUG).
        quiet: errors only on stderr (wins over ``verbosity`` for stderr).
        log_file: append records of INFO and above (DEBUG at verbosity 2) there.
        fmt: ``text`` or ``json``.

    Raises:
        OSError: the log file cannot be opened.
    """
    logger = logging.getLogger(LOGGER)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    formatter: logging.Formatter = JSONFormatter() if fmt == "json" else TextFormatter()
    levels = {0: logging.WARNING, 1: logging.INFO}
    stderr_level = logging.ERROR if quiet else levels.get(verbosity, logging.DEBUG)
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setLevel(stderr_level)
    # (a record the CLI prints itself, e.g. the one-line error of an aborted run, goes to the
    # log file only: stderr keeps its one line)
    stderr.addFilter(lambda record: not getattr(record, "echoed", False))
    stderr.setFormatter(formatter)
    logger.addHandler(stderr)
    lowest = stderr_level
    if log_file is not None:
        file_level = logging.DEBUG if verbosity >= 2 else logging.INFO
        to_file = logging.FileHandler(log_file, encoding="utf-8")
        to_file.setLevel(file_level)
        to_file.setFormatter(formatter)
        logger.addHandler(to_file)
        lowest = min(lowest, file_level)
    logger.setLevel(lowest)
    logger.propagate = False
