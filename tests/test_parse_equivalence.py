"""The parse of an in-memory dataset (``FileSource.load``) equals the straightforward reading it
replaced (kept below as ``reference_load``: the csv / str.split reader, the per-value typing,
Python lists and one hash update per row), on generated files: quoted and plain CSV, gzip,
blank lines, empty fields, ints and floats mixing, big and signed integers, text, malformed
values, short and long rows, bad dates and missing users, several files per folder.

Equal means: the same per-date ``DateEntry`` (hashes, counts, schemas), schema, malformed
count, problems, bad rows, typed columns (values, Python types, None), kept rows, their dates
and users, the rows a per-user reader sees (``by_date``) and the user sample.
"""

from __future__ import annotations

import bisect
import csv
import datetime as dt
import gzip
import io
import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator import rootdata
from orchestrator.config import RootDataConfig
from orchestrator.errors import RootDataError
from orchestrator.rootdata import (
    DateHasher,
    FileSource,
    Schema,
    files_of,
    parse_int,
    read_error_types,
    readings,
    skip_problem,
    unowned_problem,
    width_problem,
)

# --- the reference: the reader as it was before the columnar parse (commit a64cf01) ---------


class _ReferenceHasher(DateHasher):
    """One hash update per row text, as the hasher did."""

    def extend(self, schema: Schema, texts: list[str]) -> None:
        for text in texts:
            self.add(schema, text)


def _ref_read_csv(path: Path) -> tuple[list[str], list[list[str]], list[str], list[int]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", newline="", encoding="utf-8") as f:  # type: ignore[operator]
        text = f.read()
    if not text.strip():
        return [], [], [], []
    rows: list[list[str]] = []
    numbers: list[int] = []
    if '"' not in text and "\r" not in text:
        lines = text.split("\n")
        texts = []
        for number, line in enumerate(lines[1:], 2):
            if line:
                rows.append(line.split(","))
                texts.append(line)
                numbers.append(number)
        return lines[0].split(","), rows, texts, numbers
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader)
    start = reader.line_num + 1
    for fields in reader:
        if fields:
            rows.append(fields)
            numbers.append(start)
        start = reader.line_num + 1
    return header, rows, [json.dumps(r) for r in rows], numbers


def _ref_kind(values: list[Any]) -> str:
    for value in values:
        if value is not None:
            return "int" if type(value) is int else "float" if type(value) is float else "str"
    return "str"


def _ref_to_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _ref_type_columns(header, columns, keep, path, numbers, rows) -> dict[int, str]:
    bad: dict[int, str] = {}
    for c, name in enumerate(header):
        if c in keep:
            continue
        values = columns[c]
        try:
            columns[c] = list(map(int, values))
            continue
        except ValueError:
            pass
        try:
            columns[c] = list(map(float, values))
            continue
        except ValueError:
            pass
        parsed = [_ref_to_float(v) if v else None for v in values]
        filled = sum(1 for v in values if v)
        failures = [i for i, (v, p) in enumerate(zip(values, parsed)) if v and p is None]
        if filled == 0 or len(failures) > 0.1 * filled:
            columns[c] = [v if v else None for v in values]
            continue
        if all(parse_int(v) is not None for v, p in zip(values, parsed) if p is not None):
            parsed = [None if p is None else int(v) for v, p in zip(values, parsed)]
        columns[c] = parsed
        for i in failures:
            row = rows[i]
            bad.setdefault(row, f"{path.name}:{numbers[row]}: {name}={values[i]!r} is not a number")
    return bad


def reference_load(config: RootDataConfig) -> dict[str, Any]:
    """The dataset as the old ``FileSource._load`` made it, as plain data."""
    texts: dict[dt.date, dict[Schema, list[str]]] = {}
    locations: dict[dt.date, list[str]] = {}
    malformed = 0
    problems: list[str] = []
    schema: dict[str, str] = {}
    bad: dict[tuple[dt.date, str], list[tuple[int, int, str]]] = {}
    known: set[str] = set()
    pending: list[Any] = []
    files_rows: list[dict[str, Any]] = []

    def parse_date(text: str) -> dt.date | None:
        try:
            return dt.date.fromisoformat(text)
        except ValueError:
            return None

    def add_bad(date, user, f, line, where) -> None:
        bad.setdefault((date, user), []).append((f, line, where))
        locations.setdefault(date, []).append(where)

    files = files_of(config.path)
    for f, path in enumerate(files):
        try:
            try:
                header, raw_rows, row_texts, numbers = _ref_read_csv(path)
            except read_error_types as e:
                raise RootDataError(f"cannot read root data file {path}: {e}") from e
        except RootDataError as e:
            if len(files) == 1:
                raise
            problems.append(f"{path.name}: unreadable, skipped ({e})")
            continue
        for column in (config.date_column, config.user_column):
            if column not in header:
                raise RootDataError(
                    f"{path}: column '{column}' not found (columns: {', '.join(header)}); "
                    f"fix date_column / user_column of [root_data.{config.name}]"
                )
        width = len(header)
        di = header.index(config.date_column)
        ui = header.index(config.user_column)
        fitting = [i for i, r in enumerate(raw_rows) if len(r) == width]
        wrong = [
            (i, len(raw_rows[i]), readings(raw_rows[i], di, ui, width))
            for i in range(len(raw_rows))
            if len(raw_rows[i]) != width
        ]
        good = [raw_rows[i] for i in fitting]
        columns = [list(c) for c in zip(*good)] if good else [[] for _ in header]
        bad_cells = _ref_type_columns(header, columns, (di, ui), path, numbers, fitting)
        kinds = [
            "date" if c == di else "user" if c == ui else _ref_kind(columns[c])
            for c in range(width)
        ]
        for name, kind in zip(header, kinds):
            if schema.get(name) in (None, "int") or kind == "str":
                schema[name] = kind
        file_schema: Schema = tuple(zip(header, kinds))
        pending.extend(
            (f, file_schema, row_texts[i], path.name, numbers[i], n, width, options)
            for i, n, options in wrong
        )
        date_texts, user_texts = columns[di], columns[ui]
        skipped: set[int] = set()
        for j, (text, user) in enumerate(zip(date_texts, user_texts)):
            date = parse_date(text)
            if date is None or not user:
                skipped.add(j)
                malformed += 1
                if len(problems) < 20:
                    problems.append(
                        skip_problem(path.name, numbers[fitting[j]], text, date is not None)
                    )
                continue
            known.add(user)
            texts.setdefault(date, {}).setdefault(file_schema, []).append(row_texts[fitting[j]])
        failed: set[int] = set()
        position = {i: j for j, i in enumerate(fitting)}
        for i in sorted(bad_cells):
            j = position[i]
            if j in skipped:
                continue
            malformed += 1
            failed.add(j)
            add_bad(parse_date(date_texts[j]), user_texts[j], f, numbers[i], bad_cells[i])
        kept = [j for j in range(len(fitting)) if j not in skipped and j not in failed]
        files_rows.append(
            {
                "header": list(header),
                "columns": columns,
                "kept": kept,
                "dates": [parse_date(date_texts[j]) for j in kept],
                "users": [user_texts[j] for j in kept],
            }
        )
    for f, file_schema, text, name, line, n, width, options in pending:
        malformed += 1
        owners = {
            (date, user)
            for text_date, user in options
            if user in known and (date := parse_date(text_date)) is not None
        }
        if len(owners) != 1:
            if len(problems) < 20:
                problems.append(unowned_problem(name, line, n, width))
            continue
        ((date, user),) = owners
        texts.setdefault(date, {}).setdefault(file_schema, []).append(text)
        add_bad(date, user, f, line, width_problem(name, line, n, width))
    index = {}
    for date, per_schema in texts.items():
        hasher = _ReferenceHasher()
        for group_schema, group in per_schema.items():
            group.sort()
            hasher.extend(group_schema, group)
        index[date] = hasher.finish(locations.get(date, ()))
    dates = sorted(texts)
    by_date: dict[dt.date, dict[str, list[dict[str, Any]]]] = {d: {} for d in dates}
    for part in files_rows:
        for j, date, user in zip(part["kept"], part["dates"], part["users"]):
            by_date[date].setdefault(user, []).append(
                dict(zip(part["header"], [column[j] for column in part["columns"]]))
            )
    by_date = {d: dict(sorted(by_date[d].items())) for d in dates}
    users = sorted({u for per_user in by_date.values() for u in per_user})
    return {
        "dates": dates,
        "index": index,
        "malformed": malformed,
        "problems": problems[:20],
        "schema": schema,
        "bad_rows": {key: [w for *_, w in sorted(found)] for key, found in bad.items()},
        "files": files_rows,
        "by_date": by_date,
        "users": users,
    }


# --- comparison ----------------------------------------------------------------------------


def _exact(values: list[Any]) -> list[str]:
    # repr tells 1 from 1.0 from "1", -0.0 from 0.0, and shows NaN equal to NaN.
    return [repr(v) for v in values]


def assert_same(config: RootDataConfig) -> rootdata.Dataset | None:
    """``FileSource(config).load()`` equals ``reference_load(config)`` in every respect (an
    error included: the same message)."""
    try:
        want = reference_load(config)
    except RootDataError as e:
        with pytest.raises(RootDataError) as raised:
            FileSource(config).load()
        assert str(raised.value) == str(e)
        return None
    got = FileSource(config).load()
    assert got.dates == want["dates"]
    assert got.index == want["index"]
    assert got.malformed == want["malformed"]
    assert got.problems == want["problems"]
    assert got.schema == want["schema"]
    assert got.bad_rows == want["bad_rows"]
    assert len(got.files) == len(want["files"])
    for part, ref in zip(got.files, want["files"], strict=True):
        assert part.header == ref["header"]
        columns = part.columns
        assert len(columns) == len(ref["columns"])
        for c, column in enumerate(ref["columns"]):
            assert _exact(columns[c]) == _exact(column), part.header[c]
            typed = part.typed[c]
            if typed.kind != "str":
                floats = [float("nan") if v is None else float(v) for v in column]
                assert _exact(typed.floats().tolist()) == _exact(floats)
        assert list(part.kept) == ref["kept"]
        assert part.dates == ref["dates"]
        assert part.users == ref["users"]
    assert {d: {u: _exact(r) for u, r in p.items()} for d, p in got.by_date.items()} == {
        d: {u: _exact(r) for u, r in p.items()} for d, p in want["by_date"].items()
    }
    assert got.user_sample() == want["users"]
    # the vectorised view of the kept rows (what a columnar reader takes)
    date_pos, users, user_pos = got.kept_rows()
    parts = want["files"]
    assert [got.dates[i] for i in date_pos.tolist()] == [d for p in parts for d in p["dates"]]
    assert [users[i] for i in user_pos.tolist()] == [u for p in parts for u in p["users"]]
    assert users == want["users"]
    for name, kind in want["schema"].items():
        values = []
        for p in parts:
            if name in p["header"]:
                column = p["columns"][p["header"].index(name)]
                values += [column[j] for j in p["kept"]]
            else:
                values += [None] * len(p["kept"])
        if kind in ("int", "float"):
            values = [float("nan") if v is None else float(v) for v in values]
        assert _exact(got.kept_values(name).tolist()) == _exact(values), name
    return got


# --- generated files -----------------------------------------------------------------------

INTS = ["0", "7", "-1", "+3", "007", "-0", "42", "123456789012345678", "9223372036854775807"]
BIG_INTS = ["9223372036854775808", "-99999999999999999999", "12345678901234567890123"]
FLOATS = ["1.5", "-2.25", ".5", "1.", "1e5", "1E-3", "+0.0", "-0.0", "109.65", "0.1", "3.0"]
ODD_NUMBERS = ["nan", "inf", "-Infinity", " 1 ", "1_000", "\u0663", "1e400", "1e-400", "0x10"]
LONG_FLOATS = ["123456789012345678901.5", "0.1234567890123456789012345", "1.5e123"]
TEXT = ["x", "abc", "n/a", "-", "1.2.3", "e5", "+", ".", "1e", "Ünïcode"]
QUOTING = ["a,b", 'say "hi"', "two\nlines", "cr\rhere", ""]
DATES = ["2024-01-02", "2024-01-03", "2024-01-04", "2024-01-05", "2024-02-29"]
BAD_DATES = ["2024-13-01", "", "not a date", "20240103", "2023-02-29"]
USERS = ["A", "B", "C", "d", "Zed", "ü"]

# Per numeric column, a leaning: the pool most values come from.
LEANINGS = {
    "int": INTS,
    "int_dot": INTS * 3 + ["1.", "2e0"],  # integers but for a few: a float column
    "plain_int": ["0", "7", "-1", "007", "-0", "42", "123456789012345678"],
    "plain": ["1.5", "-2.25", "109.65", "0.1", "3", "-0", "007", ".5", "1.", "-.0"],
    "bigint": INTS + BIG_INTS,
    "float": FLOATS + INTS,
    "odd": FLOATS + ODD_NUMBERS,
    "long": LONG_FLOATS + FLOATS,
    "text": TEXT,
    "empty": [""],
}
NOISE = ["", *TEXT, *ODD_NUMBERS, *BIG_INTS, "1.5", "2"]


@st.composite
def csv_files(draw: st.DrawFn, quoting: bool, name: str = "p.csv") -> tuple[str, str]:
    """(file name, content) of one CSV file with a date, a user and 0-3 value columns."""
    values = draw(
        st.lists(st.sampled_from(["open", "close", "volume", "note"]), max_size=3, unique=True)
    )
    header = draw(st.permutations(["date", "user", *values]))
    leanings = {c: draw(st.sampled_from(sorted(LEANINGS))) for c in values}
    noise = draw(st.sampled_from([0.0, 0.05, 0.3]))
    rows = []
    for _ in range(draw(st.integers(0, 25))):
        row = []
        for column in header:
            if column == "date":
                pool = BAD_DATES if draw(st.integers(0, 19)) == 0 else DATES
            elif column == "user":
                pool = [""] if draw(st.integers(0, 29)) == 0 else USERS
            elif noise and draw(st.floats(0, 1)) < noise:
                pool = NOISE + (QUOTING if quoting else [])
            else:
                pool = LEANINGS[leanings[column]]
            row.append(draw(st.sampled_from(pool)))
        shape = draw(st.integers(0, 24))
        if shape == 0 and row:
            row = row[:-1]  # a short row
        elif shape == 1:
            row = [*row, draw(st.sampled_from(["", "1", "x"]))]  # a long row
        rows.append(row)
    out = io.StringIO(newline="")
    if quoting:
        style = draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL]))
        writer = csv.writer(
            out, quoting=style, lineterminator=draw(st.sampled_from(["\n", "\r\n"]))
        )
        writer.writerow(header)
        writer.writerows(rows)
    else:
        out.write(",".join(header) + "\n")
        for row in rows:
            if draw(st.integers(0, 29)) == 0:
                out.write("\n")  # a blank line: no row, but it counts as a line
            out.write(",".join(row) + "\n")
    text = out.getvalue()
    if not quoting and draw(st.booleans()):
        text = text.rstrip("\n")  # no newline after the last line
    return name, text


def _write(folder: Path, files: list[tuple[str, str]], gz: list[bool]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for (name, text), zipped in zip(files, gz, strict=True):
        if zipped:
            with gzip.open(folder / f"{name}.gz", "wt", newline="", encoding="utf-8") as f:
                f.write(text)
        else:
            (folder / name).write_text(text, encoding="utf-8", newline="")
    return folder


def _config(path: Path) -> RootDataConfig:
    return RootDataConfig(name="p", path=path, date_column="date", user_column="user")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_the_parse_equals_the_reference_on_generated_files(tmp_path_factory, data) -> None:
    count = data.draw(st.integers(1, 3))
    files = [
        data.draw(csv_files(quoting=data.draw(st.booleans()), name=f"p{k}.csv"))
        for k in range(count)
    ]
    gz = [data.draw(st.booleans()) for _ in files]
    folder = _write(tmp_path_factory.mktemp("src"), files, gz)
    path = folder if count > 1 else next(folder.iterdir())
    assert_same(_config(path))


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.lists(
            st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=6),
            min_size=3,
            max_size=3,
        ),
        max_size=12,
    )
)
def test_any_field_text_types_as_the_reference(tmp_path_factory, rows) -> None:
    """Arbitrary field texts (Unicode digits and blanks, signs, exponents ...) in one numeric
    leaning column: the same types and values as Python's ``int`` / ``float`` give."""
    out = io.StringIO(newline="")
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["date", "user", "v"])
    for a, b, c in rows:
        writer.writerow(["2024-01-02", "U" + a[:1], c])
        writer.writerow(["2024-01-03", "V", b])
    folder = tmp_path_factory.mktemp("any")
    path = folder / "p.csv"
    path.write_text(out.getvalue(), encoding="utf-8", newline="")
    assert_same(_config(path))


def test_plain_files_take_the_fast_reader_and_others_do_not(tmp_path: Path) -> None:
    plain = tmp_path / "plain.csv"
    plain.write_text("date,user,v\n2024-01-02,A,1.5\n2024-01-02,B,\n")
    assert rootdata._read_plain_csv(plain, ("date", "user")) is not None
    for name, text in {
        "quoted.csv": 'date,user,v\n2024-01-02,"A",1\n',
        "crlf.csv": "date,user,v\r\n2024-01-02,A,1\r\n",
        "blank.csv": "date,user,v\n\n2024-01-02,A,1\n",
        "short.csv": "date,user,v\n2024-01-02,A\n",
        "long.csv": "date,user,v\n2024-01-02,A,1,2\n",
        "nocolumn.csv": "day,user,v\n2024-01-02,A,1\n",
    }.items():
        path = tmp_path / name
        path.write_text(text, newline="")
        assert rootdata._read_plain_csv(path, ("date", "user")) is None, name
        assert_same(_config(path))  # the general reader, by the same rules
    bad = tmp_path / "latin1.csv"
    bad.write_bytes("date,user,v\n2024-01-02,\xe9,1\n".encode("latin-1"))
    assert rootdata._read_plain_csv(bad, ("date", "user")) is None
    with pytest.raises(RootDataError, match="cannot read"):
        FileSource(_config(bad)).load()


def test_a_large_plain_file_equals_the_reference(tmp_path: Path) -> None:
    """Several Arrow blocks, every column kind, and per-user reading through ``history``."""
    lines = ["user,date,open,volume,note,big"]
    for d in range(40):
        for u in range(300):
            open_ = "" if (d * u) % 97 == 0 else f"{(d * 31 + u * 17) % 1000 / 8}"
            big = str(2**63 + u) if u == 5 and d == 3 else str(u - 150)
            lines.append(
                f"S{u:03d},2024-{1 + d // 28:02d}-{1 + d % 28:02d},{open_},{d * u},n{u % 7},{big}"
            )
    path = tmp_path / "big.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n".join(lines) + "\n")
    got = assert_same(_config(path))
    assert got is not None
    assert got.schema == {
        "user": "user",
        "date": "date",
        "open": "float",
        "volume": "int",
        "note": "str",
        "big": "int",
    }
    day = got.dates[10]
    history = got.history("S007", day, 3)
    assert [r["date"] for r in history] == [d.isoformat() for d in got.dates[8:11]]
    assert bisect.bisect_left(got.dates, day) == 10


def test_history_reader_reads_what_history_reads(tmp_path: Path) -> None:
    """``Dataset.history_reader(date, lookback)(user)`` is ``history(user, date, lookback)``
    for users with gaps and several rows a date, unknown users, a date between available
    ones and past the last, inside and outside a ``focus`` span."""
    lines = ["user,date,value"]
    for d in range(1, 13):
        for u in range(6):
            if (d + u) % 4 == 0:
                continue  # a gap in the user's dates
            lines.extend(f"U{u},2024-01-{d:02d},{d * 10 + u + k}" for k in range(1 + u % 2))
    path = tmp_path / "gaps.csv"
    path.write_text("\n".join(lines) + "\n")
    data = assert_same(_config(path))
    assert data is not None
    users = [f"U{u}" for u in range(6)] + ["nobody"]
    dates = [dt.date(2024, 1, d) for d in range(1, 16)]
    for span in ((None, None), ("U2", "U4")):
        data.focus(*span)
        for date in dates:
            for lookback in (1, 2, 5, 20):
                read = data.history_reader(date, lookback)
                for user in users:
                    want = data.history(user, date, lookback)
                    data.focus(*span)  # history may re-index past the span: read as before
                    assert read(user) == want, (span, date, lookback, user)
    # U1 has no row on the 3rd: a 2-date window up to the 4th holds the 4th's two rows only
    window = data.history_reader(dt.date(2024, 1, 4), 2)("U1")
    assert [r["value"] for r in window] == [41, 42]


def test_a_parquet_file_equals_its_csv(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table(
        {
            "date": ["2024-01-02", "2024-01-02", "2024-01-03", "bad"],
            "user": ["A", "B", "A", "A"],
            "v": [1.5, None, 2.0, 3.0],
            "n": [1, 2, None, 4],
        }
    )
    pq.write_table(table, tmp_path / "p.parquet")
    got = FileSource(_config(tmp_path / "p.parquet")).load()
    assert got.schema == {"date": "date", "user": "user", "v": "float", "n": "int"}
    rows = got.by_date[dt.date(2024, 1, 2)]
    assert rows["A"][0] == {"date": "2024-01-02", "user": "A", "v": 1.5, "n": 1}
    assert rows["B"][0]["v"] is None
    assert got.malformed == 1


def _python(read: Any, text: str) -> Any:
    try:
        return repr(read(text))
    except ValueError:
        return None


def _arrow(to: Any, text: str) -> Any:
    pa = pytest.importorskip("pyarrow")
    try:
        return repr(pa.compute.cast(pa.array([text]), to).to_pylist()[0])
    except pa.ArrowInvalid:
        return None


def test_arrow_reads_every_short_plain_text_as_python_does() -> None:
    """``rootdata._plain_column`` relies on it: over digits, "-" and ".", Arrow's int64 and
    float64 casts accept exactly the texts ``int`` / ``float`` accept, with equal values."""
    pa = pytest.importorskip("pyarrow")
    for size in range(1, 7):
        for chars in itertools.product("09-.", repeat=size):
            text = "".join(chars)
            assert _arrow(pa.float64(), text) == _python(float, text), text
            if "." not in text:
                assert _arrow(pa.int64(), text) == _python(int, text), text


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.text("0123456789-.", min_size=1, max_size=40),
        st.from_regex(r"-?[0-9]{0,20}\.?[0-9]{0,19}", fullmatch=True).filter(bool),
    )
)
def test_arrow_reads_plain_texts_up_to_40_bytes_as_python_does(text: str) -> None:
    pa = pytest.importorskip("pyarrow")
    assert _arrow(pa.float64(), text) == _python(float, text)
    if "." not in text and len(text) <= 18:
        assert _arrow(pa.int64(), text) == _python(int, text)


@pytest.mark.parametrize("text", ["", "\n", "\n\n", " \n", "date,user\n", "date,user", "\x1c\n"])
def test_empty_and_header_only_files_read_as_before(tmp_path: Path, text: str) -> None:
    path = tmp_path / "p.csv"
    path.write_text(text, newline="")
    assert_same(_config(path))
