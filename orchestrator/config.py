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


def load_config(path: str | os.PathLike[str] | None = None, db_url: str | None = None) -> Config:
    """Read and validate a TOML config file.

    Args:
        path: the file (``orchestrator.toml``, or a ``pyproject.toml`` whose
            ``[tool.orchestrator]`` table holds the same keys); default ``./orchestrator.toml``,
            else ``./pyproject.toml`` when it has that table.
        db_url: a ``--db`` override (wins over the environment and the file).

    Raises:
        ConfigError: the file is missing, is not valid TOML, or a key has a wrong type.
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
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{cfg_path} is not valid TOML: {e}") from e
    if cfg_path.name == "pyproject.toml":
        raw = raw.get("tool", {}).get("orchestrator")
        if not isinstance(raw, dict):
            raise ConfigError(f"{cfg_path} has no [tool.orchestrator] table")
    base = cfg_path.parent

    def need(key: str, value: Any, kind: type) -> Any:
        if not isinstance(value, kind):
            raise ConfigError(
                f"{cfg_path}: '{key}' must be a {kind.__name__}, found {type(value).__name__}"
            )
        return value

    url = db_url or os.environ.get(DB_ENV) or raw.get("database_url") or "sqlite:///orchestrator.db"
    url = _resolve_db_url(need("database_url", url, str), base)

    calcs = need("calculations", raw.get("calculations", "calculations"), str)
    if "/" in calcs or calcs.startswith("."):  # a folder path, not a dotted package name
        calcs = str((base / calcs).resolve())

    epoch_file = base / need("system_epoch", raw.get("system_epoch", "system_epoch.py"), str)

    roots: dict[str, RootDataConfig] = {}
    for name, table in need("root_data", raw.get("root_data", {}), dict).items():
        need(f"root_data.{name}", table, dict)
        if "path" not in table:
            raise ConfigError(f"{cfg_path}: [root_data.{name}] needs a 'path'")
        fmt = table.get("format")
        if fmt not in (None, "csv", "parquet"):
            raise ConfigError(f"{cfg_path}: [root_data.{name}] format must be 'csv' or 'parquet'")
        roots[name] = RootDataConfig(
            name=name,
            path=(base / need(f"root_data.{name}.path", table["path"], str)).resolve(),
            date_column=need("date_column", table.get("date_column", "date"), str),
            user_column=need("user_column", table.get("user_column", "user"), str),
            format=fmt,
            complete_marker=(
                (base / need(f"root_data.{name}.complete_marker", marker, str)).resolve()
                if (marker := table.get("complete_marker")) is not None
                else None
            ),
        )

    calendar = need("calendar", raw.get("calendar", "data"), str)
    if calendar not in ("data", "daily"):
        raise ConfigError(f"{cfg_path}: calendar must be 'data' or 'daily', found {calendar!r}")
    flush_users = need("flush_users", raw.get("flush_users", 5000), int)
    shard_bytes = need("shard_bytes", raw.get("shard_bytes", 4 * 1024 * 1024), int)
    if flush_users < 1 or shard_bytes < 1024:
        raise ConfigError(f"{cfg_path}: flush_users must be >= 1 and shard_bytes >= 1024")
    packages = raw.get("packages")
    if packages is not None and (
        not isinstance(packages, list) or not all(isinstance(p, str) for p in packages)
    ):
        raise ConfigError(f"{cfg_path}: packages must be a list of distribution names")
    workers = need("workers", raw.get("workers", 1), int)
    max_attempts = need("max_attempts", raw.get("max_attempts", 3), int)
    lease_seconds = need("lease_seconds", raw.get("lease_seconds", 600), int)
    budget = raw.get("memory_budget_mb")
    if budget is not None and (not isinstance(budget, int) or budget < 1):
        raise ConfigError(f"{cfg_path}: memory_budget_mb must be a positive int, found {budget!r}")
    fraction = raw.get("memory_fraction", 0.7)
    if not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ConfigError(f"{cfg_path}: memory_fraction must be in (0, 1], found {fraction!r}")
    if lease_seconds < 10:
        raise ConfigError(f"{cfg_path}: lease_seconds must be >= 10, found {lease_seconds}")
    if max_attempts < 1:
        raise ConfigError(f"{cfg_path}: max_attempts must be >= 1, found {max_attempts}")
    if workers < 1:
        raise ConfigError(f"{cfg_path}: workers must be >= 1, found {workers}")
    root_memory_mb = need("root_memory_mb", raw.get("root_memory_mb", 64), int)
    if root_memory_mb < 0:
        raise ConfigError(f"{cfg_path}: root_memory_mb must be >= 0, found {root_memory_mb}")
    work_dir = base / need("work_dir", raw.get("work_dir", ".orchestrator"), str)
    verdict = need("cosmetic_verdict", raw.get("cosmetic_verdict", "proof"), str)
    if verdict not in COSMETIC_VERDICTS:
        raise ConfigError(
            f"{cfg_path}: cosmetic_verdict must be 'proof' or 'simulation', found {verdict!r}"
        )
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
    )
