"""Generation requests: what to generate, from command-line flags or a conditions file, validated up front.

A `Condition` is one report (its statements), one patient (sex, age, heart rate) and how many ECGs to make for
them. Files: CSV/TSV with a header row or JSON Lines, fields `text` (statements joined by `|`; also `report` or
`prompt`), `sex` (`gender`), `age`, `heart_rate` (`hr`) and optional `count` (`n`), in any case and spacing
(`Age`, ` HR `); other columns are ignored. A line break inside a text (a CSV cell typed with Alt+Enter in Excel,
`\n` in a JSON string) separates statements as `|` does; a statement may not hold the prompt's braces (a built
prompt is not a report). Every error names the file, the line (the physical line a
row starts on) and the field; two columns read as the same name, or two names of one field (`hr` and
`heart_rate`), are refused. A request is at most `MAX_ECGS` ECGs in all.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffusets_jax.conditioning.patient import parse_age, parse_heart_rate, parse_sex
from diffusets_jax.conditioning.prompts import make_prompt, report_lines

# The most ECGs one request may ask for: 10 million, twelve times MIMIC-IV-ECG (800k ECGs) and about 0.5 TB of
# float32 signal. Every requested ECG has an entry in memory (its request, its prompt's row, its manifest entry)
# before the first is generated, so a typo such as -n 1000000000000 would exhaust the host's memory rather than
# be refused; a larger corpus is several runs (another --seed or other conditions each).
MAX_ECGS = 10_000_000


@dataclasses.dataclass(frozen=True)
class Condition:
    """One generation request: the report statements, the patient, and how many ECGs."""

    report: tuple[str, ...]
    sex: int  # 1 = male, 0 = female
    age: float  # years
    heart_rate: float  # bpm
    count: int = 1

    def prompt(self, style: str = "ordered") -> str:
        """The text to embed, in the prompt style of the model that will be conditioned on it."""
        return make_prompt(list(self.report), style)

    def as_dict(self, style: str = "ordered") -> dict[str, Any]:
        return {"report": list(self.report), "prompt": self.prompt(style), "sex": self.sex, "age": self.age,
                "heart_rate": self.heart_rate}


def make_condition(text: object, sex: object, age: object, heart_rate: object, count: object = 1,
                   *, where: str = "") -> Condition:
    """Validate one condition; errors name `where` (e.g. 'conditions.csv line 3') and the field."""
    prefix = f"{where}: " if where else ""
    try:
        if not isinstance(text, str | list | tuple) and text is not None:
            # str() made a JSON object, number or true the statement "{'a': 1}", "5" or "True", silently
            raise ValueError(f"text: {text!r} is a {type(text).__name__}; give the report statements as a string "
                             "joined by '|' or a list of strings")
        lines = report_lines(text if isinstance(text, list | tuple) else str(text or ""))
        if not lines:
            raise ValueError("text: empty report; give at least one statement (statements joined by '|')")
        return Condition(tuple(lines), parse_sex(sex), parse_age(age), parse_heart_rate(heart_rate), _count(count))
    except ValueError as err:
        raise ValueError(f"{prefix}{err}") from None


def check_statements_not_prompt(condition: Condition, where: str) -> Condition:
    """Refuse statements that hold the ordered prompt's braces: a built prompt ("Most importantly, the 1st diagnosis
    is {Sinus rhythm}.", a `prompt` column copied from a manifest) read as a statement is wrapped in a second
    prompt, which no model was trained on, and its ECGs generated without a word. Findings files refuse braces too
    (`conditioning.findings`)."""
    for statement in condition.report:
        if "{" in statement or "}" in statement:
            shown = statement if len(statement) <= 60 else statement[:60] + "..."
            raise ValueError(f"{where}: text: statement {shown!r} holds '{{' or '}}', which delimit statements in the "
                             "prompt: give the report's statements (joined by '|'), not a prompt built from them")
    return condition


def _count(value: object) -> int:
    """A row's count: a whole number >= 1 (absent: 1). `int()` would truncate a JSON 1.5 to 1 and read `true` as 1."""
    if value is None or (isinstance(value, str) and value.strip() in ("", "None")):
        return 1
    number = value
    if isinstance(value, str) and value.strip().lstrip("+").isdigit():
        number = int(value.strip())
    elif isinstance(value, str):  # "2.0": pandas writes an int column that has a gap as floats (`to_csv`)
        try:
            number = float(value.strip())
        except ValueError:
            pass
    if isinstance(number, float) and number.is_integer():
        number = int(number)
    if isinstance(number, bool) or not isinstance(number, int) or number < 1:
        raise ValueError(f"count: {value!r} must be a whole number >= 1")
    return number


_FIELD_ALIASES = {"text": ("text", "report", "prompt"), "sex": ("sex", "gender"), "age": ("age",),
                  "heart_rate": ("heart_rate", "hr"), "count": ("count", "n")}


def _normalise_columns(row: dict, where: str) -> dict:
    """Column names as spreadsheets export them (`Age`, ` HR `) read as ours; two that become the same name are
    refused rather than one silently chosen. Columns we do not read are kept and ignored."""
    normal: dict = {}
    for column, value in row.items():
        key = column.strip().lower() if isinstance(column, str) else column
        if key in normal:
            raise ValueError(f"{where}: two columns read as {key!r}; keep one")
        normal[key] = value
    return normal


def _check_aliases(row: dict, where: str) -> None:
    """Two names of one field (`hr` 70 and `heart_rate` 80) are refused: which one the user meant is theirs to say,
    and reading either would silently drop the other."""
    for name, aliases in _FIELD_ALIASES.items():
        given = [alias for alias in aliases if alias in row]
        if len(given) > 1:
            raise ValueError(f"{where}: {given[0]!r} and {given[1]!r} both give the {name} field; keep one")


def _field(row: dict, name: str, where: str, required: bool = True) -> object:
    for alias in _FIELD_ALIASES[name]:
        if alias in row and row[alias] not in (None, ""):
            return row[alias]
    if required:
        raise ValueError(f"{where}: missing field {name!r} (accepted names: {', '.join(_FIELD_ALIASES[name])})")
    return 1


def _rows(path: Path) -> list[tuple[str, dict]]:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return _table_rows(path, "\t" if suffix == ".tsv" else ",")
    if suffix not in (".jsonl", ".json"):
        raise ValueError(f"{path.name}: unknown conditions format {path.suffix!r}; use .csv, .tsv or .jsonl")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise ValueError(f"{path.name} line {line}: not UTF-8 text (byte {err.start}); save the file as UTF-8") from None
    rows: list[tuple[str, dict]] = []
    _refuse_one_json_document(path, text)
    # JSON Lines ends a record at "\n" only: str.splitlines would also split at U+2028, U+0085 or a form feed, which
    # json.dumps(ensure_ascii=False) leaves raw inside a string.
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:  # JSONDecodeError, or an integer beyond Python's 4300-digit conversion limit
            why = err.msg if isinstance(err, json.JSONDecodeError) else str(err).split(";")[0]  # not Python's advice
            raise ValueError(f"{path.name} line {number}: not valid JSON ({why})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path.name} line {number}: expected a JSON object with text, sex, age, heart_rate")
        rows.append((f"{path.name} line {number}", row))
    return rows


def _refuse_one_json_document(path: Path, text: str) -> None:
    """A JSON array of conditions, or one object over several lines, is refused as what it is: read line by line,
    its first line ("[" or "{") was "not valid JSON", which it is, as a whole."""
    try:
        document = json.loads(text)
    except ValueError:
        return  # JSON Lines, or JSON that is wrong: the line-by-line reading names the line
    if isinstance(document, list) or "\n" in text.strip():
        what = "a JSON array" if isinstance(document, list) else "one JSON value over several lines"
        raise ValueError(f"{path.name}: {what}; a conditions file is JSON Lines, one object per line "
                         '({"text": ..., "sex": ..., "age": ..., "heart_rate": ...}), or a CSV')


def _table_rows(path: Path, delimiter: str) -> list[tuple[str, dict]]:
    """The rows of a CSV/TSV conditions file, read as `prepare` and `embed` read theirs (`io.tables`): a text cell
    may span lines (Excel's Alt+Enter; each line is a statement, `make_condition`), and every row is named by the
    physical line it starts on. A row that is not UTF-8 or has more fields than the header is refused, not skipped:
    a conditions file asks for those ECGs."""
    from diffusets_jax.io.tables import LINE_COLUMN, read_csv_table

    def refuse(line: int, why: str) -> None:
        hint = ("; put a text that holds commas in double quotes" if why.startswith("malformed") and delimiter == ","
                else "; save the file as UTF-8" if why.startswith("not UTF-8") else "")
        raise ValueError(f"{path.name} line {line}: {why}{hint}")

    try:
        table = read_csv_table(os.fspath(path), what="conditions file", skip=refuse, na_filter=False,
                               delimiter=delimiter)
    except ValueError as err:  # the reader names the whole path; every other message here names the file
        raise ValueError(str(err).replace(os.fspath(path), path.name, 1)) from None
    columns = [str(name) for name in table.columns if name != LINE_COLUMN]
    _check_header(path, columns, delimiter)
    rows = []
    for record in table.to_dict("records"):
        line = record.pop(LINE_COLUMN)
        if not any(str(cell).strip() for cell in record.values()):
            continue  # ",,,": a spreadsheet saves a row it once held, emptied, so; it asks for nothing
        rows.append((f"{path.name} {'line ' if isinstance(line, int) else ''}{line}", record))
    return rows


def _check_header(path: Path, columns: Sequence[str], delimiter: str) -> None:
    """The required columns, checked once on the header: "line 2: missing field 'text'" for a file that has no
    such column, or that a spreadsheet saved with semicolons, pointed at the wrong line and the wrong cause."""
    where = f"{path.name} line 1"
    header = _normalise_columns(dict.fromkeys(columns), where)
    _check_aliases(header, where)
    names = {column for column in header if column}
    for field in ("text", "sex", "age", "heart_rate"):
        if not names & set(_FIELD_ALIASES[field]):
            other = next((d for d in (";", "\t", ",") if d != delimiter and any(d in c for c in columns)), None)
            hint = (f"; the file seems separated by {other!r}: save it with {delimiter!r}" if other else
                    f"; its columns are {', '.join(columns) or 'none'}")
            raise ValueError(f"{path.name} line 1: no {field!r} column (accepted names: "
                             f"{', '.join(_FIELD_ALIASES[field])}){hint}")


def read_conditions(path: str | os.PathLike) -> list[Condition]:
    """Conditions from a CSV/TSV (header row) or JSONL file: text, sex, age, heart_rate (or hr), optional count."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"conditions file {str(path)!r} is a directory; give a .csv or .jsonl file")
    if not path.exists():
        raise FileNotFoundError(f"conditions file {str(path)!r} does not exist")
    rows = [(where, _normalise_columns(row, where)) for where, row in _rows(path)]
    for where, row in rows:
        _check_aliases(row, where)
    conditions = [
        check_statements_not_prompt(make_condition(_field(r, "text", w), _field(r, "sex", w), _field(r, "age", w),
                                                   _field(r, "heart_rate", w), _field(r, "count", w, required=False),
                                                   where=w), w)
        for w, r in rows
    ]
    if not conditions:
        raise ValueError(f"{path.name}: no conditions found")
    total_ecgs(conditions, f"{path.name}: its count column asks")
    return conditions


def total_ecgs(conditions: Sequence[Condition], asked: str = "the conditions ask") -> int:
    """How many ECGs `conditions` ask for, refused beyond `MAX_ECGS` (ValueError beginning with `asked`, which says
    where the counts came from) before anything is built for them."""
    total = sum(c.count for c in conditions)
    if total > MAX_ECGS:
        raise ValueError(f"{asked} for {total:,} ECGs, more than the {MAX_ECGS:,} one run makes (each requested ECG is "
                         "held in memory before the first is generated); ask for fewer, or split the work into runs "
                         "with different --seed or conditions")
    return total


def expand(conditions: Sequence[Condition]) -> list[Condition]:
    """One entry per ECG to generate (each condition repeated `count` times), in order."""
    total_ecgs(conditions)
    return [c for c in conditions for _ in range(c.count)]
