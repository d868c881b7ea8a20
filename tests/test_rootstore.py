"""The root store streams exactly what the in-memory parse holds.

For tricky sources (quoting, gzip, empty fields, malformed values, bad dates, missing users,
signed integers, several files with different types, an unreadable file of a folder, Parquet)
the store's rows, per-date index, schema, malformed counts and locations equal
``FileSource.load``'s; its stream comes in user order with worker ranges, and its history
window equals the in-memory one. Memory flatness itself is measured by
``scripts/bench_stream.py``, not here.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from orchestrator import rootstore
from orchestrator.config import RootDataConfig
from orchestrator.errors import RootDataError
from orchestrator.rootdata import Dataset, FileSource
from orchestrator.rootstore import StoredDataset, build_store
from tests.conftest import gzip_csv


def both(folder: Path, path: Path, **options: Any) -> tuple[Dataset, StoredDataset]:
    config = RootDataConfig(name="src", path=path, **options)
    source = FileSource(config)
    memory = source.load()
    stored = StoredDataset(build_store(config, source.digest(), folder / "store"))
    return memory, stored


def everything(ds: Any) -> dict[dt.date, list[Any]]:
    return {d: list(ds.stream(d)) for d in ds.dates}


def assert_same(memory: Dataset, stored: StoredDataset) -> None:
    assert stored.dates == memory.dates
    assert stored.index == memory.index
    assert stored.schema == memory.schema
    assert stored.malformed == memory.malformed
    assert stored.problems == memory.problems
    assert stored.bad_count == memory.bad_count
    # repr, not ==: 3 and 3.0 are equal but hash differently in a result
    assert repr(everything(stored)) == repr(everything(memory))
    for d in memory.dates:
        assert repr(stored.rows_on(d)) == repr(memory.rows_on(d))
        for user in {u for u, _ in memory.stream(d)}:
            for lookback in (1, 2, 5):
                window = stored.history(user, d, lookback)
                assert repr(window) == repr(memory.history(user, d, lookback))
    assert stored.user_sample() == memory.user_sample()


def test_plain_csv_with_gaps_and_malformed_values(tmp_path: Path) -> None:
    path = tmp_path / "prices.csv"
    path.write_text(
        "date,user,close,volume,note\n"
        "2024-01-03,B,10.5,100,x\n"
        "2024-01-02,A,9.5,,\n"
        "2024-01-02,B,10,200,y\n"
        "2024-01-03,A,abc,300,z\n"  # malformed: A fails on 2024-01-03
        "2024-01-03,A,9.75,301,second row\n"
        "not-a-date,A,1,1,\n"
        "2024-01-04,,1,1,\n"
        "\n"
        "2024-01-04,C,11,+5,w\n"
        "2024-01-04,A,12,7\n"  # a short row: A fails on 2024-01-04 (line 11: blanks count)
        + "".join(f"2024-01-05,U{i:02d},{i}.5,{i},\n" for i in range(30))
    )
    memory, stored = both(tmp_path, path)
    assert memory.malformed == 4 and memory.bad_count == 2
    assert_same(memory, stored)
    a_on_3 = [entry for entry in stored.stream(dt.date(2024, 1, 3)) if entry[0] == "A"]
    assert a_on_3 and a_on_3[0][1][1] == ["prices.csv:5: close='abc' is not a number"]
    a_on_4 = [entry for entry in stored.stream(dt.date(2024, 1, 4)) if entry[0] == "A"]
    assert a_on_4 == [("A", ([], ["prices.csv:11: 4 fields, the header has 5"]))]


def test_quoted_gzip_folder_with_an_unreadable_file(tmp_path: Path) -> None:
    folder = tmp_path / "src"
    folder.mkdir()
    gzip_csv(
        folder / "a.csv.gz",
        ["date", "user", "amount", "memo"],
        [["2024-02-01", "X", "1", 'said "hi", twice'], ["2024-02-01", "Y", "-2", "plain"]],
    )
    (folder / "b.csv").write_text(
        "date,user,amount,memo\n2024-02-01,X,1.5,other\n2024-02-02,Z,3,\n"
    )
    (folder / "c.csv.gz").write_bytes(b"not gzip at all")
    memory, stored = both(tmp_path, folder)
    assert any("c.csv.gz: unreadable" in p for p in memory.problems)
    assert memory.schema["amount"] == "float"  # int in a.csv.gz, float in b.csv: widest wins
    assert_same(memory, stored)


def test_worker_ranges_partition_the_stream(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text("date,user,v\n" + "".join(f"2024-03-01,u{i:03d},{i}\n" for i in range(200)))
    _, stored = both(tmp_path, path)
    day = dt.date(2024, 3, 1)
    whole = [u for u, _ in stored.stream(day)]
    assert whole == sorted(whole) and len(whole) == 200
    parts = [
        [u for u, _ in stored.stream(day, lo, hi)]
        for lo, hi in ((None, "u050"), ("u050", "u150"), ("u150", None))
    ]
    assert [len(p) for p in parts] == [50, 100, 50]
    assert [u for part in parts for u in part] == whole


def test_import_is_chunked_and_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Chunks smaller than the file: typing decided per file over every chunk.
    monkeypatch.setattr(rootstore, "CHUNK_ROWS", 7)
    path = tmp_path / "p.csv"
    lines = [f"2024-04-0{1 + i % 3},u{i % 11},{i},{i * 0.5}\n" for i in range(100)]
    lines[60] = "2024-04-01,u3,,oops\n"  # late failure in a float column, late empty int
    path.write_text("date,user,n,x\n" + "".join(lines))
    memory, stored = both(tmp_path, path)
    assert memory.bad_count == 1
    assert_same(memory, stored)


def test_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table(
        {
            "date": [dt.date(2024, 5, 1), dt.date(2024, 5, 1), dt.date(2024, 5, 2)],
            "user": ["a", "b", "a"],
            "close": [1.5, None, 2.0],
        }
    )
    path = tmp_path / "p.parquet"
    pq.write_table(table, path)
    memory, stored = both(tmp_path, path)
    assert_same(memory, stored)


def test_missing_column_and_replaced_versions(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text("day,user,v\n2024-01-01,a,1\n")
    config = RootDataConfig(name="src", path=path)
    with pytest.raises(RootDataError, match="column 'date' not found"):
        build_store(config, FileSource(config).digest(), tmp_path / "store")
    assert not list((tmp_path / "store").iterdir())  # nothing half-built is left
    path.write_text("date,user,v\n2024-01-01,a,1\n")
    first = build_store(config, FileSource(config).digest(), tmp_path / "store")
    path.write_text("date,user,v\n2024-01-01,a,2\n")
    second = build_store(config, FileSource(config).digest(), tmp_path / "store")
    assert not first.exists() and second.exists()  # the older version is removed
    assert StoredDataset(second).rows_on(dt.date(2024, 1, 1)) == [
        {"date": "2024-01-01", "user": "a", "v": 2}
    ]


DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL = [
    ("prices", DATA / "sp500_daily_ohlcv_2013-02-08_2018-02-07.csv.gz", "Name"),
    ("transactions", DATA / "berka" / "trans_1993-01-01_1994-03-30.csv.gz", "account_id"),
]


@pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} is absent")
@pytest.mark.parametrize(("name", "path", "user_column"), REAL, ids=[r[0] for r in REAL])
def test_real_sources_stream_exactly_what_memory_holds(
    tmp_path: Path, name: str, path: Path, user_column: str
) -> None:
    config = RootDataConfig(name=name, path=path, user_column=user_column)
    source = FileSource(config)
    memory = source.load()
    stored = StoredDataset(build_store(config, source.digest(), tmp_path))
    assert stored.index == memory.index  # every date's content hash: what the planner sees
    assert (stored.schema, stored.malformed, stored.problems, stored.bad_count) == (
        memory.schema,
        memory.malformed,
        memory.problems,
        memory.bad_count,
    )
    for date in memory.dates[:: max(1, len(memory.dates) // 25)]:  # 25 dates across the file
        streamed = list(stored.stream(date))
        assert repr(streamed) == repr(list(memory.stream(date)))
        for user, _ in streamed[:: max(1, len(streamed) // 10)]:
            assert repr(stored.history(user, date, 20)) == repr(memory.history(user, date, 20))


def test_a_damaged_store_is_rebuilt(tmp_path: Path) -> None:
    from tests.conftest import Project, price_rows
    from tests.test_scenarios import BASE, DATES, SYMBOLS, run

    project = Project(tmp_path, f"sqlite:///{tmp_path / 'ledger.db'}")
    project.write_prices(price_rows(SYMBOLS, DATES))
    project.write_calcs(BASE)  # no history windows: the prices are streamed from a store
    assert run(project).ok
    (store,) = (tmp_path / ".orchestrator" / "root").glob("prices-*.sqlite")
    store.write_bytes(b"not a database")
    orch = project.orchestrator()
    assert orch.dataset("prices").rows_on(DATES[0])[0]["Name"] == "AAA"
    orch.close()
    assert StoredDataset(store).dates == DATES
