"""Configuration: a TOML file, overridden by the environment and by command-line flags.

Precedence for the database URL: ``--db`` flag > ``ORCHESTRATOR_DB_URL`` > ``database_url`` in
the file > an SQLite file ``orchestrator.db`` next to the config file. Relative paths (and
relative SQLite URLs) resolve against the config file's folder, never the working directory,
so a cron job and a developer see the same files.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.errors import ConfigError

DB_ENV = "ORCHESTRATOR_DB_URL"


@dataclass(frozen=True, slots=True)
class RootDataConfig:
    """One ``[root_data.NAME]`` table: a file or folder of CSV / gzipped CSV / Parquet files."""

    name: str
    path: Path
    date_column: str = "date"
    user_column: str = "user"
    format: str | None = None  # "csv" or "parquet"; None: from the file suffix
    # A file holding the last complete date (YYYY-MM-DD), written by whoever delivers the data
    # once a day is whole: later dates are held back (not available). None: every date counts.
    complete_marker: Path | None = None


@dataclass(frozen=True, slots=True)
class Config:
    """The resolved configuration.

    Attributes:
        path: the config file (its folder anchors relative paths).
        database_url: SQLAlchemy URL of the ledger.
        calculations: importable package name or absolute folder path.
        epoch_file: path of the ``system_epoch.py`` holding ``SYSTEM_EPOCH``.
        root_data: dataset name -> source configuration.
        calendar: "data" (dates on which some dataset has data) or "daily" (every day).
        flush_users: results are flushed to a shard every this many users.
        shard_bytes: upper bound of one shard's uncompressed payload, in bytes.
        workers: local processes for standard cells (1: run in this process).
        max_attempts: consecutive failed attempts of a cell (one retry happens in the same
            run's reconciliation) before it becomes a dead letter.
        lease_seconds: how long a RUNNING cell's lease lasts without a heartbeat.
        memory_budget_mb / memory_fraction: result buffers are flushed early once the
            process's resident memory passes this fraction of the budget (MEMORY_PRESSURE);
            without a budget, only the thresholds flush.
        packages: distributions whose versions make up every calculation's infrastructure
            hash; None: those each calculation imports (traced through the AST).
        work_dir: local working files (the root stores under ``root/``); default
            ``.orchestrator`` next to the config file.
        root_memory_mb: a dataset read with history windows (``lookback > 1``) and at most
            this many MiB uncompressed is parsed into memory (about 20 times its size) for
            speed; every other dataset is streamed from its root store, so memory does not
            grow with the number of users. 0: always stream.
        cosmetic_verdict: how a code change may be judged cosmetic (skipped, not re-run):
            "proof" (default) only when the normalised AST is equal up to a consistent
            renaming of local variables; "simulation" also accepts an equal simulation hash
            (a heuristic, opt-in; see ``simulation.py``). A calculation's own
            ``cosmetic_verdict`` attribute wins over this.
        columnar: run the calculations that have a columnar form (``compute``) in it, in
            blocks of dates × users (default); false: every calculation per user
            (``process``). Both forms give the same results, so switching re-runs nothing.
        block_dates: the most dates a columnar block computes at once (its arrays are
            block_dates × users × fields).
        metrics_file: after each ``run`` / ``backfill``, write a Prometheus textfile there
            (``orchestrator.metrics``, for node_exporter's textfile collector); None: none.
        retain_results: superseded clean results kept per cell, by fingerprint, so that a
            revert re-points cells to them instead of recomputing (``ledger.retention``);
            ``orchestrator gc`` prunes further; 0: superseded results are deleted at once.
        executor: where blocks are computed (``orchestrator.executors``): "serial",
            "processes" (default: ``workers`` forked processes) or "dask", or a plug-in's name.
        scheduler: with ``executor = "dask"``, a running scheduler's address
            ("tcp://host:8786"); None: a ``LocalCluster`` of ``workers`` processes.
    """

    path: Path
    database_url: str
    calculations: str
    epoch_file: Path
    root_data: dict[str, RootDataConfig] = field(default_factory=dict)
    calendar: str = "data"
    flush_users: int = 5000
    shard_bytes: int = 4 * 1024 * 1024
    workers: int = 1
    max_attempts: int = 3
    lease_seconds: int = 600
    memory_budget_mb: int | None = None
    memory_fraction: float = 0.7
    packages: tuple[str, ...] | None = None
    work_dir: Path = Path(".orchestrator")
    root_memory_mb: int = 64
    cosmetic_verdict: str = "proof"
    columnar: bool = True
    block_dates: int = 256
    metrics_file: Path | None = None
    retain_results: int = 3
    executor: str = "processes"
    scheduler: str | None = None


COSMETIC_VERDICTS = ("proof", "simulation")


def _resolve_db_url(url: str, base: Path) -> str:
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith("sqlite:////"):
        rest = url[len(prefix) :]
        if rest and rest != ":memory:" and not Path(rest).is_absolute():
            return prefix + str((base / rest).resolve())
    return url


def _has_tool_table(path: Path) -> bool:
    try:
        return "orchestrator" in tomllib.loads(path.read_text()).get("tool", {})
    except (OSError, tomllib.TOMLDecodeError):
        return False


# Every key the file may hold: anything else is a typo (``workres``) to refuse, never to
# ignore silently (the default would then be used without a word).
TOP_KEYS = (
    "database_url",
    "calculations",
    "system_epoch",
    "root_data",
    "calendar",
    "flush_users",
    "shard_bytes",
    "workers",
    "max_attempts",
    "lease_seconds",
    "memory_budget_mb",
    "memory_fraction",
    "packages",
    "work_dir",
    "root_memory_mb",
    "cosmetic_verdict",
    "columnar",
    "block_dates",
    "metrics_file",
    "retain_results",
    "executor",
    "scheduler",
)
ROOT_DATA_KEYS = ("path", "date_column", "user_column", "format", "complete_marker")

# TOML's names for the types a key may hold (the messages speak TOML, not Python).
_TOML_TYPES = {
    bool: "boolean",
    int: "integer",
    float: "number",
    str: "string",
    list: "array",
    dict: "table",
}


def _toml_type(value: object) -> str:
    return next((n for t, n in _TOML_TYPES.items() if type(value) is t), type(value).__name__)


class _Checker:
    """Typed access to one table of the file; each error names the file and the dotted key."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, message: str) -> ConfigError:
        return ConfigError(f"{self.where}: {message}")

    def known(self, table: dict[str, Any], keys: tuple[str, ...], prefix: str = "") -> None:
        """Refuse a key not in ``keys``, with the closest known key as a hint.

        Raises:
            ConfigError: an unknown key.
        """
        for key in sorted(set(table) - set(keys)):
            import difflib  # here: only a config with an unknown key needs a hint

            close = difflib.get_close_matches(key, keys, n=1)
            hint = (
                f"did you mean '{prefix}{close[0]}'?" if close else "known keys: " + ", ".join(keys)
            )
            raise self.fail(f"unknown key '{prefix}{key}'; {hint}")

    def get(self, table: dict[str, Any], key: str, kind: type, default: Any, name: str = "") -> Any:
        """``table[key]`` (or ``default`` when absent) checked to be exactly of TOML type
        ``kind``: a boolean is not an integer (``workers = true`` is refused); an integer is
        a number.

        Raises:
            ConfigError: the value has another type.
        """
        if key not in table:
            return default
        value = table[key]
        ok = (
            isinstance(value, (int, float)) and not isinstance(value, bool)
            if kind is float
            else isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        )
        if not ok:
            wanted = _TOML_TYPES.get(kind, kind.__name__)
            article = "an" if wanted[0] in "aeiou" else "a"
            raise self.fail(
                f"'{name or key}' must be {article} {wanted}, found {_toml_type(value)} {value!r}"
            )
        return value


def load_config(path: str | os.PathLike[str] | None = None, db_url: str | None = None) -> Config:
    """Read and validate a TOML config file.

    Args:
        path: the file (``orchestrator.toml``, or a ``pyproject.toml`` whose
            ``[tool.orchestrator]`` table holds the same keys); default ``./orchestrator.toml``,
            else ``./pyproject.toml`` when it has that table.
        db_url: a ``--db`` override (wins over the environment and the file).

    Raises:
        ConfigError: the file is missing or is not valid TOML; a key is unknown (the message
            suggests the closest known key), has a wrong type or an invalid value (the message
            names the key).
    """
    cfg_path = Path(path or "orchestrator.toml").resolve()
    if path is None and not cfg_path.is_file() and _has_tool_table(Path("pyproject.toml")):
        cfg_path = Path("pyproject.toml").resolve()
    if not cfg_path.is_file():
        raise ConfigError(
            f"config file {cfg_path} not found; pass --config PATH or create orchestrator.toml "
            "(or a [tool.orchestrator] table in pyproject.toml)"
        )
    try:
        raw: dict[str, Any] = tomllib.loads(cfg_path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read config file {cfg_path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{cfg_path} is not UTF-8 text: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{cfg_path} is not valid TOML: {e}") from e
    where = str(cfg_path)
    if cfg_path.name == "pyproject.toml":
        raw = raw.get("tool", {}).get("orchestrator")
        if not isinstance(raw, dict):
            raise ConfigError(f"{cfg_path} has no [tool.orchestrator] table")
        where = f"{cfg_path} [tool.orchestrator]"
    base = cfg_path.parent
    check = _Checker(where)
    check.known(raw, TOP_KEYS)

    def get(key: str, kind: type, default: Any) -> Any:
        return check.get(raw, key, kind, default)

    # The file's value is checked even when the environment or --db wins over it.
    file_url = get("database_url", str, None)
    url = db_url or os.environ.get(DB_ENV) or file_url or "sqlite:///orchestrator.db"
    url = _resolve_db_url(url, base)

    calcs = get("calculations", str, "calculations")
    if "/" in calcs or calcs.startswith("."):  # a folder path, not a dotted package name
        calcs = str((base / calcs).resolve())

    epoch_file = base / get("system_epoch", str, "system_epoch.py")

    roots: dict[str, RootDataConfig] = {}
    for name, table in get("root_data", dict, {}).items():
        key = f"root_data.{name}"
        if not isinstance(table, dict):
            raise check.fail(
                f"'{key}' must be a table ([root_data.{name}] with a 'path'), "
                f"found {_toml_type(table)} {table!r}"
            )
        check.known(table, ROOT_DATA_KEYS, f"{key}.")

        def field_(option: str, default: Any, table: dict[str, Any] = table, key: str = key) -> Any:
            return check.get(table, option, str, default, f"{key}.{option}")

        if "path" not in table:
            raise check.fail(f"[root_data.{name}] needs a 'path'")
        fmt = field_("format", None)
        if fmt not in (None, "csv", "parquet"):
            raise check.fail(f"'{key}.format' must be 'csv' or 'parquet', found {fmt!r}")
        marker = field_("complete_marker", None)
        roots[name] = RootDataConfig(
            name=name,
            path=(base / field_("path", None)).resolve(),
            date_column=field_("date_column", "date"),
            user_column=field_("user_column", "user"),
            format=fmt,
            complete_marker=(base / marker).resolve() if marker is not None else None,
        )

    calendar = get("calendar", str, "data")
    if calendar not in ("data", "daily"):
        raise check.fail(f"'calendar' must be 'data' or 'daily', found {calendar!r}")
    flush_users = get("flush_users", int, 5000)
    if flush_users < 1:
        raise check.fail(f"'flush_users' must be >= 1, found {flush_users}")
    shard_bytes = get("shard_bytes", int, 4 * 1024 * 1024)
    if shard_bytes < 1024:
        raise check.fail(f"'shard_bytes' must be >= 1024, found {shard_bytes}")
    packages = get("packages", list, None)
    for i, package in enumerate(packages or ()):
        if not isinstance(package, str):
            raise check.fail(
                f"'packages' must be an array of distribution names, found {_toml_type(package)} "
                f"{package!r} at position {i}"
            )
    workers = get("workers", int, 1)
    if workers < 1:
        raise check.fail(f"'workers' must be >= 1, found {workers}")
    max_attempts = get("max_attempts", int, 3)
    if max_attempts < 1:
        raise check.fail(f"'max_attempts' must be >= 1, found {max_attempts}")
    lease_seconds = get("lease_seconds", int, 600)
    if lease_seconds < 10:
        raise check.fail(f"'lease_seconds' must be >= 10, found {lease_seconds}")
    budget = get("memory_budget_mb", int, None)
    if budget is not None and budget < 1:
        raise check.fail(f"'memory_budget_mb' must be a positive integer, found {budget}")
    fraction = get("memory_fraction", float, 0.7)
    if not 0 < fraction <= 1:
        raise check.fail(f"'memory_fraction' must be in (0, 1], found {fraction!r}")
    root_memory_mb = get("root_memory_mb", int, 64)
    if root_memory_mb < 0:
        raise check.fail(f"'root_memory_mb' must be >= 0, found {root_memory_mb}")
    work_dir = base / get("work_dir", str, ".orchestrator")
    verdict = get("cosmetic_verdict", str, "proof")
    if verdict not in COSMETIC_VERDICTS:
        raise check.fail(f"'cosmetic_verdict' must be 'proof' or 'simulation', found {verdict!r}")
    columnar = get("columnar", bool, True)
    block_dates = get("block_dates", int, 256)
    if block_dates < 1:
        raise check.fail(f"'block_dates' must be >= 1, found {block_dates}")
    metrics_file = get("metrics_file", str, None)
    retain_results = get("retain_results", int, 3)
    if retain_results < 0:
        raise check.fail(f"'retain_results' must be >= 0, found {retain_results}")
    executor = get("executor", str, "processes")
    scheduler = get("scheduler", str, None)
    return Config(
        path=cfg_path,
        database_url=url,
        calculations=calcs,
        epoch_file=epoch_file.resolve(),
        root_data=roots,
        calendar=calendar,
        flush_users=flush_users,
        shard_bytes=shard_bytes,
        workers=workers,
        max_attempts=max_attempts,
        lease_seconds=lease_seconds,
        memory_budget_mb=budget,
        memory_fraction=float(fraction),
        packages=tuple(packages) if packages is not None else None,
        work_dir=work_dir.resolve(),
        root_memory_mb=root_memory_mb,
        cosmetic_verdict=verdict,
        columnar=bool(columnar),
        block_dates=block_dates,
        metrics_file=(base / metrics_file).resolve() if metrics_file else None,
        retain_results=retain_results,
        executor=executor,
        scheduler=scheduler or None,
    )
