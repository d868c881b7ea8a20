"""Strict configuration (issue 8, item 7): an unknown key is an error with a "did you mean"
hint, a wrong type is an error naming the key — in ``orchestrator.toml`` and in
``pyproject.toml``'s ``[tool.orchestrator]`` table alike, top level and ``[root_data.NAME]``."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.config import ROOT_DATA_KEYS, TOP_KEYS, load_config
from orchestrator.errors import ConfigError

ROOT = '[root_data.prices]\npath = "data/prices.csv"\nuser_column = "Name"\n'


def write(tmp_path: Path, style: str, top: str = "", root: str = "") -> Path:
    """A config file of ``style`` "toml" or "pyproject" with ``top`` keys and ``root`` keys
    added to ``[root_data.prices]``."""
    if "calculations" not in top:
        top = f'calculations = "calculations.prices"\n{top}'
    if style == "toml":
        path = tmp_path / "orchestrator.toml"
        path.write_text(f"{top}{ROOT}{root}")
    else:
        path = tmp_path / "pyproject.toml"
        body = ROOT.replace("[root_data.", "[tool.orchestrator.root_data.")
        path.write_text(f'[project]\nname = "x"\n[tool.orchestrator]\n{top}{body}{root}')
    return path


STYLES = ["toml", "pyproject"]


@pytest.mark.parametrize("style", STYLES)
def test_a_valid_file_loads_with_every_key(tmp_path: Path, style: str) -> None:
    top = (
        'database_url = "sqlite:///x.db"\nsystem_epoch = "e.py"\ncalendar = "daily"\n'
        "flush_users = 10\nshard_bytes = 2048\nworkers = 2\nmax_attempts = 2\n"
        "lease_seconds = 60\nmemory_budget_mb = 100\nmemory_fraction = 1\n"
        'packages = ["zstandard"]\nwork_dir = "w"\nroot_memory_mb = 0\n'
        'cosmetic_verdict = "simulation"\ncolumnar = false\nblock_dates = 16\n'
        'metrics_file = "m.prom"\nretain_results = 5\nexecutor = "dask"\n'
        'scheduler = "tcp://h:8786"\n'
    )
    root = 'date_column = "d"\nformat = "csv"\ncomplete_marker = "m"\n'
    config = load_config(write(tmp_path, style, top, root))
    assert config.workers == 2 and config.memory_fraction == 1.0
    assert config.root_data["prices"].date_column == "d"
    assert config.cosmetic_verdict == "simulation"
    assert config.columnar is False and config.block_dates == 16
    assert config.metrics_file is not None and config.metrics_file.name == "m.prom"
    assert config.retain_results == 5
    assert config.executor == "dask" and config.scheduler == "tcp://h:8786"
    # (the test above names every key: a new key must be added there and to TOP_KEYS)
    named = {line.split(" = ")[0] for line in (top + "calculations = x\nroot_data = x").split("\n")}
    assert named - {""} == set(TOP_KEYS)
    assert {line.split(" = ")[0] for line in (root + "path = x\nuser_column = x").split("\n")} - {
        ""
    } == set(ROOT_DATA_KEYS)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize(
    ("top", "root", "message"),
    [
        ("workres = 4\n", "", "unknown key 'workres'; did you mean 'workers'?"),
        ('databse_url = "sqlite:///x.db"\n', "", "did you mean 'database_url'?"),
        ('database_ur = "sqlite:///x.db"\n', "", "did you mean 'database_url'?"),
        ("zzz = 1\n", "", "unknown key 'zzz'; known keys: database_url, calculations"),
        ("", 'user_colum = "Name"\n', "'root_data.prices.user_colum'; did you mean "),
        ("", 'formta = "csv"\n', "did you mean 'root_data.prices.format'?"),
    ],
)
def test_an_unknown_key_is_an_error_with_a_hint(
    tmp_path: Path, style: str, top: str, root: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("?", r"\?").replace(".", r"\.")):
        load_config(write(tmp_path, style, top, root))


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize(
    ("top", "root", "message"),
    [
        ("workers = true\n", "", "'workers' must be an integer, found boolean True"),
        ("workers = 2.5\n", "", "'workers' must be an integer, found number 2.5"),
        ('flush_users = "10"\n', "", "'flush_users' must be an integer, found string '10'"),
        ("shard_bytes = false\n", "", "'shard_bytes'"),
        ("max_attempts = true\n", "", "'max_attempts'"),
        ("lease_seconds = true\n", "", "'lease_seconds'"),
        ("memory_budget_mb = true\n", "", "'memory_budget_mb'"),
        ("memory_fraction = true\n", "", "'memory_fraction' must be a number, found boolean"),
        ("root_memory_mb = true\n", "", "'root_memory_mb'"),
        ("database_url = 5\n", "", "'database_url' must be a string, found integer 5"),
        ("calculations = []\n", "", "'calculations' must be a string, found array"),
        ("system_epoch = 1\n", "", "'system_epoch'"),
        ("calendar = 1\n", "", "'calendar'"),
        ("work_dir = 1\n", "", "'work_dir'"),
        ("cosmetic_verdict = true\n", "", "'cosmetic_verdict'"),
        ('packages = "numpy"\n', "", "'packages' must be an array, found string"),
        ("packages = [1]\n", "", "'packages' must be an array of distribution names"),
        ("", "date_column = 1\n", "'root_data.prices.date_column' must be a string"),
        (
            "",
            "date_column = true\n",
            "'root_data.prices.date_column' must be a string, found boolean",
        ),
        ("", "format = 1\n", "'root_data.prices.format' must be a string"),
        ("", "complete_marker = 1\n", "'root_data.prices.complete_marker' must be a string"),
        ("", 'format = "xls"\n', "'root_data.prices.format' must be 'csv' or 'parquet'"),
    ],
)
def test_a_wrong_type_is_an_error_naming_the_key(
    tmp_path: Path, style: str, top: str, root: str, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, style, top, root))
    assert message in str(info.value)
    assert "pyproject.toml [tool.orchestrator]" in str(info.value) or style == "toml"


def test_root_data_tables_must_be_tables(tmp_path: Path) -> None:
    path = tmp_path / "orchestrator.toml"
    path.write_text('root_data = "prices.csv"\n')
    with pytest.raises(ConfigError, match="'root_data' must be a table"):
        load_config(path)
    path.write_text("[root_data]\nprices = 3\n")
    with pytest.raises(ConfigError, match=r"'root_data\.prices' must be a table"):
        load_config(path)
    path.write_text('[root_data.prices]\nuser_column = "Name"\n')
    with pytest.raises(ConfigError, match=r"\[root_data\.prices\] needs a 'path'"):
        load_config(path)


def test_the_file_database_url_is_checked_even_when_the_environment_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ORCHESTRATOR_DB_URL", "sqlite:///env.db")
    with pytest.raises(ConfigError, match="'database_url' must be a string"):
        load_config(write(tmp_path, "toml", "database_url = 1\n"))


@pytest.mark.parametrize("style", STYLES)
def test_the_cli_prints_one_line_and_exits_2(tmp_path: Path, style: str) -> None:
    path = write(tmp_path, style, "workres = 4\n")
    result = CliRunner().invoke(main, ["--config", str(path), "plan"])
    assert result.exit_code == 2
    where = f"{path.resolve()}{' [tool.orchestrator]' if style == 'pyproject' else ''}"
    assert result.output.strip().splitlines() == [
        f"Error: {where}: unknown key 'workres'; did you mean 'workers'?"
    ]
    assert "Traceback" not in result.output
