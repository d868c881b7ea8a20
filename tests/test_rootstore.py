"""The root store streams exactly what the in-memory parse holds.

For tricky sources (quoting, gzip, empty fields, malformed values, bad dates, missing users,
signed integers, several files with different types, an unreadable file of a folder, Parquet,
short and long rows, blank and multi-line rows) the store's rows, per-date index (content
hashes and schemas), schema, malformed counts and locations equal ``FileSource.load``'s — and
so they do for random small CSV files (a Hypothesis property test); its stream comes in user order with worker ranges, and its history
window equals the in-memory one. Memory flatness itself is measured by
``scripts/bench_stream.py``, not here.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator import rootstore
from orchestrator.config import RootDataConfig
from orchestrator.errors import RootDataError
from orchestrator.execution.blocks import RootMatrix
from orchestrator.rootdata import Dataset, FileSource
from orchestrator.rootstore import StoredDataset, build_store
from tests.conftest import gzip_csv


def both(folder: Path, path: Path, **options: Any) -> tuple[Dataset, StoredDataset]:
    config = RootDataConfig(name="src", path=path, **options)
    source = FileSource(config)
    memory = source.load()
    saved = rootstore.PART_USERS
    rootstore.PART_USERS = 2  # several column parts per date, whatever the file
    try:
        stored = StoredDataset(build_store(config, source.digest(), folder / "store"))
    finally:
        rootstore.PART_USERS = saved
    return memory, stored


def _columns(matrix: RootMatrix, names: list[str]) -> dict[str, Any]:
    """Each column's values as a printable list, or the error building it."""
    out: dict[str, Any] = {}
    for name in names:
        try:
            out[name] = repr(matrix.column(name).tolist())
        except (TypeError, ValueError) as e:
            out[name] = type(e).__name__
    return out


def assert_same_matrices(memory: Dataset, stored: StoredDataset) -> None:
    """The matrix read from the store's column parts, for the whole store and for user
    ranges cut at and between the part bounds, equals the one built from the in-memory
    parse (restricted to the range): users, presence, malformed rows and every column."""
    names = sorted(memory.schema)
    whole = RootMatrix.build(memory, memory.dates)
    users = whole.users.tolist()
    cuts = sorted({*stored.part_bounds, *users[1::3]})
    ranges = [(None, None), *zip([None, *cuts], [*cuts, None], strict=True)]
    assert stored.part_bounds == sorted(stored.part_bounds)
    for lo, hi in ranges:
        keep = np.array(
            [(lo is None or u >= lo) and (hi is None or u < hi) for u in users], dtype=bool
        )
        keep &= (whole.present | whole.bad).any(axis=0) if len(users) else keep
        read = RootMatrix.from_store(stored, memory.dates, lo, hi)
        assert read.users.tolist() == whole.users[keep].tolist()
        assert read.present.tolist() == whole.present[:, keep].tolist()
        assert read.bad.tolist() == whole.bad[:, keep].tolist()
        position = {u: k for k, u in enumerate(read.users.tolist())}
        expected_where = {
            (d, position[users[u]]): w for (d, u), w in whole.where.items() if keep[u]
        }
        assert read.where == expected_where
        expected = _columns(whole, names)
        for name, value in _columns(read, names).items():
            if isinstance(value, str) and value.startswith("["):
                full = whole.column(name)[:, keep]
                assert value == repr(full.tolist()), name
            else:
                assert value == expected[name], name


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
                assert stored.window_problems(user, d, lookback) == memory.window_problems(
                    user, d, lookback
                )
    assert stored.user_sample() == memory.user_sample()
    assert_same_matrices(memory, stored)


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


def test_lines_count_blank_and_multiline_rows_and_wrong_widths_are_bad(tmp_path: Path) -> None:
    path = tmp_path / "q.csv"
    path.write_text(
        "date,user,v,memo\n"
        '2024-06-03,A,1,"two\nlines"\n'  # lines 2-3
        "\n"  # line 4: blank
        "2024-06-03,B,-1\n"  # line 5: short
        "2024-06-03,C,+3,x,y\n"  # line 6: long
        "2024-06-04,A,2,\n"
        "2024-06-04,D,3\n"  # line 8: short, D has no row of the right width: skipped
        "2024-06-04,B,4,\n"
        "2024-06-04,C,5,\n"
    )
    memory, stored = both(tmp_path, path)
    assert_same(memory, stored)
    assert memory.schema["v"] == "int"  # -1 and +3 would be; the short/long rows are not read
    assert memory.bad_rows == {
        (dt.date(2024, 6, 3), "B"): ["q.csv:5: 3 fields, the header has 4"],
        (dt.date(2024, 6, 3), "C"): ["q.csv:6: 5 fields, the header has 4"],
    }
    assert memory.problems == [
        (
            "q.csv:8: 3 fields, the header has 4, and no single known user and date can be "
            "read from it; row skipped"
        )
    ]
    assert [u for u, _ in stored.stream(dt.date(2024, 6, 3))] == ["A", "B", "C"]


def test_integers_parse_as_integers(tmp_path: Path) -> None:
    path = tmp_path / "n.csv"
    path.write_text(
        "date,user,neg,signed,mixed,empty_int,floaty\n"
        "2024-07-01,A,-1,+3,1,,1e3\n"
        "2024-07-01,B,-20,-0,1.5,7,2\n"
    )
    memory, stored = both(tmp_path, path)
    assert_same(memory, stored)
    assert memory.schema == {
        "date": "date",
        "user": "user",
        "neg": "int",
        "signed": "int",
        "mixed": "float",
        "empty_int": "int",
        "floaty": "float",
    }
    a, b = (rows[0] for rows in memory.by_date[dt.date(2024, 7, 1)].values())
    assert repr(a) == (
        "{'date': '2024-07-01', 'user': 'A', 'neg': -1, 'signed': 3, 'mixed': 1.0, "
        "'empty_int': None, 'floaty': 1000.0}"
    )
    assert (b["signed"], b["mixed"], b["empty_int"]) == (0, 1.5, 7)


# --- the property: both parsers agree on any small CSV ------------------------------------

VALUES = st.one_of(
    st.sampled_from(["1", "-1", "+3", "007", "1.5", "-0.25", "1e3", "", "abc", "1.2.3", "nan"]),
    st.integers(-1000, 1000).map(str),
    st.floats(-1e6, 1e6, allow_nan=False).map(repr),
)
DATE_TEXTS = st.sampled_from(["2024-01-01", "2024-01-02", "2024-01-03", "2024-13-01", ""])
USERS = st.sampled_from(["A", "B", "C", "", "-1"])


@st.composite
def csv_files(draw: st.DrawFn) -> list[tuple[str, str]]:
    """One or two files: a header (the date and user columns anywhere among 0-3 others),
    rows of mostly the right width, some short or long, blank lines, quoted fields (some
    spanning lines), LF or CRLF line ends."""
    files = []
    for name in draw(st.sampled_from([["a.csv"], ["a.csv", "b.csv"]])):
        others = draw(st.lists(st.sampled_from(["x", "y", "z", "w"]), max_size=3, unique=True))
        header = draw(st.permutations(["date", "user", *others]))
        quoted = draw(st.booleans())
        end = draw(st.sampled_from(["\n", "\r\n"])) if quoted else "\n"
        lines = [",".join(header)]
        for _ in range(draw(st.integers(0, 12))):
            fields = []
            for column in header:
                value = draw(
                    DATE_TEXTS if column == "date" else USERS if column == "user" else VALUES
                )
                if quoted and draw(st.integers(0, 5)) == 0:
                    value = '"' + value + draw(st.sampled_from(["", ",", '""', "\n"])) + '"'
                fields.append(value)
            width = draw(st.sampled_from([0, 0, 0, 0, -1, 1, -2]))
            if width < 0:
                fields = fields[:width]
            else:
                fields += ["9"] * width
            lines.append(",".join(fields))
            if draw(st.integers(0, 8)) == 0:
                lines.append("")
        files.append((name, end.join(lines) + end))
    return files


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(files=csv_files(), chunk=st.sampled_from([2, 5, 50_000]))
def test_memory_and_store_agree_on_random_csv_files(
    tmp_path_factory: pytest.TempPathFactory, files: list[tuple[str, str]], chunk: int
) -> None:
    root = tmp_path_factory.mktemp("random")
    folder = root / "src"
    folder.mkdir()
    for name, text in files:
        (folder / name).write_bytes(text.encode())
    saved = rootstore.CHUNK_ROWS
    rootstore.CHUNK_ROWS = chunk  # typing over several chunks must equal typing at once
    try:
        memory, stored = both(root, folder)
    finally:
        rootstore.CHUNK_ROWS = saved
    assert_same(memory, stored)
    # Every row is typed or malformed, never padded: a date's rows plus its malformed rows
    # are its row count.
    for d, entry in memory.index.items():
        bad = sum(len(w) for (day, _), w in memory.bad_rows.items() if day == d)
        assert len(memory.rows_on(d)) + bad == entry.row_count


@given(users=st.lists(st.text(min_size=1), unique=True).map(sorted))
def test_part_users_round_trip(users: list[str]) -> None:
    # NumPy's fixed-width strings drop trailing NULs: such ids go as JSON, and the list
    # (the tables' users) stays exact; the str array (matrix positions, as in the in-memory
    # matrix) is NumPy's as ever
    listed, array = rootstore._users_of(rootstore._users_blob(users))
    assert listed == users
    assert array.tolist() == np.array(users, dtype=str).tolist()
