"""The one way this project reads a user's CSV table (a source's tables in `prepare`, a reports file in `embed`).

Tables come from PhysioNet downloads, hospital exports and Excel, so the reader expects their faults:
- a UTF-8 byte-order mark (Excel's "CSV UTF-8") is dropped, not glued to the first column's name;
- a record holding bytes that are not UTF-8, or a malformed line (more fields than the header), is handed to
  `skip` with the physical line the record starts on, and the rest of the table is read: batch jobs skip and
  count bad rows, they do not stop;
- a quoted field that is never closed would swallow every later row into one field (Python's csv module does
  so silently, then stops at its 131,072-character field limit): the table is refused as a whole, naming the
  line the quote opened on, since no row after it can be trusted;
- fields of any length are read (pandas' parser has no field size limit).

Rows are numbered by the physical line their record starts on (1-based, as an editor shows it), counting blank
lines and the extra lines of quoted fields that span lines, so a user can go to the line a message names.
"""

from __future__ import annotations

import csv
import gzip
import io
import re
import warnings
from collections.abc import Callable
from typing import Any

from diffusets_jax.io.files import check_input_file

_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # what undecodable bytes become under errors="surrogateescape"
_PANDAS_SKIPPED_LINE = re.compile(r"Skipping line (\d+): (.*)")
LINE_COLUMN = "_line"


def _closed_fields(delimiter: str) -> re.Pattern[str]:
    """A whole line of closed fields (quoted, with "" inside, or free of quotes): what nearly every line with quotes
    is, matched in C so the field-by-field scan runs only on the rest (MIMIC-IV-ECG's 800k-row table quotes its
    reports)."""
    d = re.escape(delimiter)
    return re.compile(rf'(?:"(?:[^"]|"")*"|[^{d}"]*)(?:{d}(?:"(?:[^"]|"")*"|[^{d}"]*))*')


def read_csv_table(path: str, *, what: str, skip: Callable[[int, str], None], na_filter: bool = True,  # noqa: ANN401 (a pandas DataFrame)
                   delimiter: str = ",") -> Any:
    """A CSV table (plain or .gz) as a DataFrame of strings, one column per header name, plus `_line`: the
    physical line (int, 1-based) each row's record starts on (or "row N" in the rare table whose records pandas
    splits otherwise, e.g. at a lone carriage return).

    `na_filter`: True reads empty cells (and pandas' NA words such as "NA") as NaN; False keeps every cell's
    text as is, "" for an empty one (free text such as a report statement "NA" stays text).
    `skip(line, why)` is called for every record left out (not UTF-8, malformed); a caller that refuses such a
    table raises from it. `delimiter`: "," (CSV) or "\t" (TSV).
    Unusable as a whole (missing, unreadable, no UTF-8 header, an unclosed quote, not CSV, a header that names a
    column twice): ValueError, one line naming the file and what to do.
    """
    import pandas as pd

    check_input_file(path, what)
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
        if path.endswith(".gz"):
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as err:
        raise ValueError(f"{path}: cannot read the {what} ({err}): is the file complete?") from None
    # Undecodable bytes are kept as surrogates so the records holding them can be found, named and skipped.
    # Split on newlines only (str.splitlines would also split a report at \r, \f, \x1c, ...).
    lines = [line.removesuffix("\r") for line in raw.decode("utf-8-sig", errors="surrogateescape").split("\n")]
    records = _records(lines, path, delimiter)
    if not records or _NOT_UTF8.search(records[0][1]):
        raise ValueError(f"{path}: no header line of UTF-8 column names: is it the {what}?")
    # Refused for every caller: pandas reads a second "NAME" as "NAME.1", so a lookup by name (prepare's report_N
    # or age, embed's report, sample's text) silently takes the first and never sees the other. Blank names (the
    # empty columns a spreadsheet adds after the last) are never looked up, and pandas names them apart.
    header_line, header = records[0]
    names = next(csv.reader([header.replace("\n", " ")], delimiter=delimiter), [])
    repeated = sorted({name for name in names if name.strip() and names.count(name) > 1})
    if repeated:
        raise ValueError(f"{path} line {header_line}: the header names column {repeated[0]!r} twice; keep one")
    kept = [records[0]]
    for line, text in records[1:]:
        if _NOT_UTF8.search(text):
            skip(line, "not UTF-8 text")
        else:
            kept.append((line, text))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            # The header is read as a row (header=None) and its names apart: given the header as such, pandas takes
            # a first data row with one field too many for an index column and shifts every row's fields one
            # column left, silently; read as a row, the header fixes the width and such a row is malformed.
            names = pd.read_csv(io.StringIO(kept[0][1]), nrows=0, sep=delimiter, dtype=object).columns
            table = pd.read_csv(io.StringIO("\n".join(text for _, text in kept)), dtype=object, on_bad_lines="warn",
                                na_filter=na_filter, sep=delimiter, header=None)
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
            raise ValueError(f"{path}: not a readable CSV table ({' '.join(str(err).split())}): is it the "
                             f"{what}?") from None
    table = table.iloc[1:].reset_index(drop=True)
    table.columns = names
    # pandas numbers the records it skips by their position in what it was fed (the header is 1), whatever
    # number of lines each spans.
    malformed: set[int] = set()
    for warning in caught:
        for fed, why in _PANDAS_SKIPPED_LINE.findall(str(warning.message)):
            malformed.add(int(fed))
            skip(kept[int(fed) - 1][0], f"malformed CSV line ({why.strip()})")
    data_lines = [line for fed, (line, _) in enumerate(kept[1:], 2) if fed not in malformed]
    # Should pandas split records otherwise than `_records` (it also ends a record at a lone carriage return),
    # rows are named by position instead.
    table[LINE_COLUMN] = data_lines if len(data_lines) == len(table) else [f"row {i + 1}" for i in range(len(table))]
    return table


def _records(lines: list[str], path: str, delimiter: str = ",") -> list[tuple[int, str]]:
    """(physical line it starts on, text) of each CSV record of `lines`, the lines of a quoted field joined with
    "\\n"; lines holding only whitespace between records are dropped (inside a quoted field they are kept)."""
    records: list[tuple[int, list[str]]] = []
    in_quotes, opened_on = False, 0
    closed_fields = _closed_fields(delimiter)
    for number, line in enumerate(lines, 1):
        if in_quotes:
            records[-1][1].append(line)
        elif line.strip():
            records.append((number, [line]))
        else:
            continue
        if '"' in line and (in_quotes or not closed_fields.fullmatch(line)):
            in_quotes, opened_here = _quote_state_after(line, in_quotes, delimiter)
            opened_on = number if opened_here else opened_on
    if in_quotes:
        raise ValueError(f"{path} line {opened_on}: a quoted field opened on this line is never closed, so every "
                         "later row would be read into it: close the quote (a quote inside a quoted field is "
                         'written twice, "")')
    return [(number, "\n".join(parts)) for number, parts in records]


def _quote_state_after(line: str, in_quotes: bool, delimiter: str = ",") -> tuple[bool, bool]:
    """Whether a CSV record is inside a quoted field at the end of `line` (given whether it was at the start), and
    whether the field it is inside opened on this line. Read as pandas' parser reads it: a quote opens a field
    only as the field's first character, "" inside one is a quote, text after the closing quote joins the field.
    """
    position, opened_here = 0, False
    while True:
        if in_quotes:
            close = line.find('"', position)
            if close < 0:
                return True, opened_here
            if line.startswith('"', close + 1):  # an escaped quote: still inside
                position = close + 2
                continue
            in_quotes = False
            position = close + 1
        elif line.startswith('"', position):  # a field that starts with a quote
            in_quotes, opened_here = True, True
            position += 1
            continue
        comma = line.find(delimiter, position)  # the rest of this unquoted field: to the next separator
        if comma < 0:
            return False, opened_here
        position = comma + 1
