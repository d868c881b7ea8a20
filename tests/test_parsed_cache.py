"""The parsed copy of an in-memory dataset (``FileSource.load_cached``): an unchanged source
is read from the copy, a changed one is parsed again, a damaged copy is replaced."""

from __future__ import annotations

from pathlib import Path

from orchestrator.config import RootDataConfig
from orchestrator.rootdata import FileSource


def _source(tmp_path: Path, body: str) -> FileSource:
    path = tmp_path / "prices.csv"
    path.write_text("date,close,Name\n" + body)
    return FileSource(
        RootDataConfig(name="prices", path=path, date_column="date", user_column="Name")
    )


def _rows(dataset) -> dict:
    return {d: dict(per_user) for d, per_user in dataset.by_date.items()}


def test_the_copy_serves_an_unchanged_source_and_never_a_changed_one(tmp_path: Path) -> None:
    folder = tmp_path / "parsed"
    source = _source(tmp_path, "2024-01-02,1.5,A\n2024-01-02,2.5,B\n")
    first = source.load_cached(folder, source.digest())
    (copy,) = folder.glob("prices-*.pickle")
    again = source.load_cached(folder, source.digest())
    assert _rows(again) == _rows(first) == _rows(source.load())
    assert again.index == first.index
    changed = _source(tmp_path, "2024-01-02,1.5,A\n2024-01-02,9.5,B\n")
    fresh = changed.load_cached(folder, changed.digest())
    assert fresh.by_date[next(iter(fresh.dates))]["B"][0]["close"] == 9.5
    assert not copy.exists()  # the old version's copy is gone
    assert len(list(folder.glob("prices-*.pickle"))) == 1


def test_a_damaged_copy_is_parsed_again(tmp_path: Path) -> None:
    folder = tmp_path / "parsed"
    source = _source(tmp_path, "2024-01-02,1.5,A\n")
    source.load_cached(folder, source.digest())
    (copy,) = folder.glob("prices-*.pickle")
    copy.write_bytes(b"not a pickle")
    dataset = source.load_cached(folder, source.digest())
    assert dataset.by_date[dataset.dates[0]]["A"][0]["close"] == 1.5
    assert copy.read_bytes() != b"not a pickle"
