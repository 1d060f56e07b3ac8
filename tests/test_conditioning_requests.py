"""Generation requests from flags and files: validated, one line per bad field naming file and line."""

from __future__ import annotations

import json

import pytest

from diffusets_jax.conditioning.prompts import make_prompt
from diffusets_jax.conditioning.requests import expand, make_condition, read_conditions


def test_make_condition_validates_and_builds_the_prompt_in_the_models_style():
    c = make_condition("Sinus rhythm|Left axis deviation", "m", "63", 71, 2)
    assert (c.sex, c.age, c.heart_rate, c.count) == (1, 63.0, 71.0, 2)
    assert c.prompt("ordered") == ("Most importantly, the 1st diagnosis is {Sinus rhythm}."
                                   "As a supplementary condition, the 2nd diagnosis is {Left axis deviation}.")
    assert c.prompt("free_text") == "The report of the ECG is that Sinus rhythm, Left axis deviation."
    with pytest.raises(ValueError, match="flags: .*heart_rate"):
        make_condition("Sinus rhythm", "F", 50, 900, where="flags")
    with pytest.raises(ValueError, match="count"):
        make_condition("Sinus rhythm", "F", 50, 60, 0)
    with pytest.raises(ValueError, match="empty report"):
        make_condition(" | ", "F", 50, 60)


def test_read_conditions_csv_and_jsonl(tmp_path):
    csv_path = tmp_path / "c.csv"
    csv_path.write_text("text,sex,age,hr,count\nSinus rhythm,F,40,60,3\nAtrial fibrillation|Low QRS voltages,male,80,110,\n")
    conditions = read_conditions(csv_path)
    assert [c.count for c in conditions] == [3, 1]
    assert conditions[1].report == ("Atrial fibrillation", "Low QRS voltages")
    assert len(expand(conditions)) == 4
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text(json.dumps({"text": "Sinus bradycardia", "sex": 0, "age": 70, "heart_rate": 50, "n": 2}) + "\n")
    assert read_conditions(jsonl)[0].count == 2


@pytest.mark.parametrize("content,match", [
    (b"text,sex,age\nSinus rhythm,F,40\n", r"bad.csv line 1: no 'heart_rate' column .*; its columns are text, sex, age"),
    (b"text,sex,age,hr\nSinus rhythm,F,,60\n", r"bad.csv line 2: missing field 'age'"),
    (b"text;sex;age;hr\nSinus rhythm;F;40;60\n", r"bad.csv line 1: no 'text' column .*separated by ';'"),
    (b"text,sex,age,hr\nSinus rhythm, rate 60,F,40,60\n", r"bad.csv line 2: malformed CSV line \(expected 4 fields, "
                                                        r"saw 5\); put a text that holds commas in double quotes"),
    (b"text,sex,age,hr,count\nSinus rhythm,F,40,60,1.5\n", r"bad.csv line 2: count: '1.5' must be a whole number"),
    (b"text,sex,age,hr,count\nSinus rhythm,F,40,60,0\n", r"bad.csv line 2: count: '0' must be a whole number >= 1"),
    (b"text,sex,age,hr\nSinus rhythm,X,40,60\n", r"bad.csv line 2: .*sex"),
    (b"text,sex,age,hr\nSinus rhythm,F,40,60\nSinus \xff rhythm,F,40,60\n", r"bad.csv line 3: not UTF-8"),
    (b"text,sex,age,hr\n", r"bad.csv: no conditions"),
])
def test_bad_conditions_files_name_file_line_and_field(tmp_path, content, match):
    bad = tmp_path / "bad.csv"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        read_conditions(bad)


@pytest.mark.parametrize("count", [1.5, True, "2x", -1])
def test_a_jsonl_count_is_a_whole_number_never_truncated(tmp_path, count):
    """int() read a JSON count of 1.5 as 1 and `true` as 1: one ECG where the file asked for something else."""
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "Sinus rhythm", "sex": "F", "age": 40, "hr": 60, "count": count}) + "\n")
    with pytest.raises(ValueError, match=r"c.jsonl line 1: count: .* must be a whole number >= 1"):
        read_conditions(path)
    path.write_text(json.dumps({"text": "Sinus rhythm", "sex": "F", "age": 40, "hr": 60, "count": 2.0}) + "\n")
    assert read_conditions(path)[0].count == 2


def test_a_csv_count_written_as_a_whole_float_is_that_count(tmp_path):
    """pandas writes a count column with a gap as floats ("2.0"): it was refused as not a whole number."""
    import pandas as pd

    path = tmp_path / "c.csv"
    pd.DataFrame({"text": ["Sinus rhythm", "Atrial fibrillation"], "sex": ["F", "M"], "age": [40, 70],
                  "hr": [60, 110], "count": [2, None]}).to_csv(path, index=False)
    assert [c.count for c in read_conditions(path)] == [2, 1]
    path.write_text("text,sex,age,hr,count\nSinus rhythm,F,40,60,2.5\n")
    with pytest.raises(ValueError, match=r"c.csv line 2: count: '2.5' must be a whole number >= 1"):
        read_conditions(path)


def test_a_row_of_empty_cells_asks_for_nothing(tmp_path):
    """A spreadsheet saves a row it once held, emptied, as ",,,": it was refused as a row without text."""
    path = tmp_path / "c.csv"
    path.write_text("text,sex,age,hr\nSinus rhythm,F,40,60\n,,,\n , ,,\nAtrial fibrillation,M,70,110\n,,,\n")
    assert [c.report for c in read_conditions(path)] == [("Sinus rhythm",), ("Atrial fibrillation",)]
    path.write_text("text,sex,age,hr\n,,,\n")
    with pytest.raises(ValueError, match="c.csv: no conditions found"):
        read_conditions(path)
    path.write_text("text,sex,age,hr\nSinus rhythm,F,40,60\n,F,40,60\n")  # a row with values still needs its text
    with pytest.raises(ValueError, match="c.csv line 3: missing field 'text'"):
        read_conditions(path)


@pytest.mark.parametrize("content, what", [
    ('[{"text": "Sinus rhythm", "sex": "F", "age": 40, "hr": 60}]\n', "a JSON array"),
    ('[\n  {"text": "Sinus rhythm", "sex": "F", "age": 40, "hr": 60}\n]\n', "a JSON array"),
    ('{\n  "text": "Sinus rhythm", "sex": "F", "age": 40, "hr": 60\n}\n', "one JSON value over several lines"),
])
def test_one_json_document_is_named_as_such_not_as_invalid_json(tmp_path, content, what):
    """A JSON array or a pretty-printed object was refused as "line 1: not valid JSON" (its "[" or "{" alone)."""
    path = tmp_path / "c.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=rf"^c.json: {what}; a conditions file is JSON Lines, one object per line"):
        read_conditions(path)


@pytest.mark.parametrize("text", [{"statements": ["Sinus rhythm"]}, 5, True])
def test_a_jsonl_text_that_is_no_string_or_list_is_refused(tmp_path, text):
    """str() made it a statement ("{'statements': [...]}", "5", "True"), and ECGs were generated from that prompt."""
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": text, "sex": "F", "age": 40, "hr": 60}) + "\n")
    with pytest.raises(ValueError, match=r"^c.jsonl line 1: text: .* is a (dict|int|bool); give the report statements"):
        read_conditions(path)


def test_a_built_prompt_as_the_text_is_refused(tmp_path):
    """A `prompt` column copied from a manifest was read as one statement and wrapped in a second prompt
    ("...diagnosis is {Most importantly, the 1st diagnosis is {Sinus rhythm}.}."), generated from silently."""
    prompt = make_prompt(["Sinus rhythm", "Left axis deviation"], "ordered")
    path = tmp_path / "c.csv"
    path.write_text(f'prompt,sex,age,hr\nAtrial fibrillation,F,70,110\n"{prompt}",M,50,70\n')
    with pytest.raises(ValueError, match=r"^c.csv line 3: text: statement 'Most importantly, the 1st diagnosis is "
                                         r"\{Sinus.*\.\.\.' holds '\{' or '\}'.*not a prompt built from them"):
        read_conditions(path)


def test_conditions_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_conditions(tmp_path / "absent.csv")
    with pytest.raises(ValueError, match="is a directory"):
        read_conditions(tmp_path)
    (tmp_path / "c.txt").write_text("x")
    with pytest.raises(ValueError, match="unknown conditions format"):
        read_conditions(tmp_path / "c.txt")
    (tmp_path / "c.jsonl").write_text('{"text": "a", "sex": "F", "age": 1, "hr": 60}\n[1, 2]\n')
    with pytest.raises(ValueError, match="c.jsonl line 2: expected a JSON object"):
        read_conditions(tmp_path / "c.jsonl")


def test_column_names_as_spreadsheets_export_them(tmp_path):
    """`Count` used to be ignored (one ECG per row, no error) and `Age` reported missing."""
    path = tmp_path / "c.csv"
    path.write_text("Text, Sex ,AGE,HR,Count,Record ID\nSinus rhythm,M,50,70,3,r1\n")
    (condition,) = read_conditions(path)
    assert (condition.sex, condition.age, condition.heart_rate, condition.count) == (1, 50.0, 70.0, 3)
    path.write_text("age,Age,text,sex,hr\n50,51,Sinus rhythm,M,70\n")
    with pytest.raises(ValueError, match="c.csv line 1: two columns read as 'age'; keep one"):
        read_conditions(path)
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text(json.dumps({"Report": "Sinus rhythm", "Gender": "F", "Age": 40, "HR": 60, "N": 2}) + "\n")
    assert read_conditions(jsonl)[0].count == 2


@pytest.mark.parametrize("name,content", [
    ("c.csv", 'text,sex,age,hr\n"Sinus rhythm\nLeft axis deviation",F,50,70\n'),
    ("c.csv", 'text,sex,age,hr\r\n"Sinus rhythm\r\nLeft axis deviation",F,50,70\r\n'),  # Excel on Windows
    ("c.tsv", 'text\tsex\tage\thr\n"Sinus rhythm\nLeft axis deviation"\tF\t50\t70\n'),
    ("c.jsonl", json.dumps({"text": "Sinus rhythm\nLeft axis deviation", "sex": "F", "age": 50, "hr": 70}) + "\n"),
])
def test_a_line_break_inside_a_text_separates_statements_as_a_bar_does(tmp_path, name, content):
    """A cell typed with Alt+Enter in Excel was glued into one statement: `{Sinus rhythmLeft axis deviation}`."""
    path = tmp_path / name
    path.write_bytes(content.encode())
    (condition,) = read_conditions(path)
    assert condition.report == ("Sinus rhythm", "Left axis deviation")
    assert make_condition("Sinus rhythm\nLeft axis deviation", "F", 50, 70).report == condition.report


def test_only_line_breaks_end_a_csv_row_or_a_statement(tmp_path):
    """str.splitlines also split at U+0085 (which then vanished) and at a form feed ("missing field 'sex'")."""
    path = tmp_path / "c.csv"
    path.write_text("text,sex,age,hr\nSinus\x85rhythm,F,50,70\nAtrial\x0cfibrillation,M,60,110\n", encoding="utf-8")
    assert [c.report for c in read_conditions(path)] == [("Sinus\x85rhythm",), ("Atrial\x0cfibrillation",)]


def test_csv_errors_name_the_physical_line_the_row_starts_on(tmp_path):
    """Blank lines and texts spanning lines were not counted: the error named line 4 for a row on line 7."""
    path = tmp_path / "c.csv"
    path.write_text('text,sex,age,hr\n\n"Sinus rhythm\nLeft axis deviation",F,50,70\n\nSinus rhythm,F,50,999\n')
    with pytest.raises(ValueError, match=r"c.csv line 6: heart_rate: '999' is out of range"):
        read_conditions(path)


def test_jsonl_is_split_at_newlines_only(tmp_path):
    """json.dumps(ensure_ascii=False) writes U+2028 raw; splitting at it broke a valid line into two invalid ones."""
    path = tmp_path / "c.jsonl"
    row = {"text": "Sinus rhythm\u2028(confirmed)", "sex": "F", "age": 40, "hr": 60}
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n" + json.dumps({**row, "age": 400}) + "\n",
                    encoding="utf-8")
    with pytest.raises(ValueError, match=r"c.jsonl line 2: age"):
        read_conditions(path)
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_conditions(path)[0].report == ("Sinus rhythm\u2028(confirmed)",)


@pytest.mark.parametrize("name,content,match", [
    ("c.csv", "text,sex,age,hr,heart_rate\nSinus rhythm,F,50,70,80\n",
     r"c.csv line 1: 'heart_rate' and 'hr' both give the heart_rate field; keep one"),
    ("c.csv", "text,sex,age,hr,hr\nSinus rhythm,F,50,70,80\n", r"c.csv line 1: the header names column 'hr' twice"),
    ("c.jsonl", json.dumps({"text": "Sinus rhythm", "sex": "F", "age": 50, "hr": 70, "heart_rate": 80}) + "\n",
     r"c.jsonl line 1: 'heart_rate' and 'hr' both give the heart_rate field"),
])
def test_two_columns_for_one_field_are_refused(tmp_path, name, content, match):
    """`hr` 70 and `heart_rate` 80 silently gave 80 (and `hr,hr` the last), against the module's promise."""
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        read_conditions(path)


@pytest.mark.parametrize("digits", [400, 5000])
def test_a_huge_integer_in_jsonl_is_one_line_naming_the_line(tmp_path, digits):
    """A 400-digit age was an OverflowError traceback; 5000 digits, Python's int conversion limit, a ValueError
    that named no file."""
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "Sinus rhythm", "sex": "F", "age": %s, "hr": 60}\n' % ("9" * digits))
    with pytest.raises(ValueError, match=r"c.jsonl line 1: (age: 9{40}\.\.\. \(400 characters\) is out of range|"
                                         r"not valid JSON \(Exceeds the limit)") as raised:
        read_conditions(path)
    assert len(str(raised.value)) < 200


def test_a_request_beyond_max_ecgs_is_refused_before_it_is_built(tmp_path):
    """-n 1e12 built a list of 10**12 entries (MemoryError, or a host swapping) before anything was generated."""
    from diffusets_jax.conditioning.requests import MAX_ECGS, total_ecgs

    huge = make_condition("Sinus rhythm", "F", 40, 60, 10**12)
    with pytest.raises(ValueError, match=r"for 1,000,000,000,000 ECGs, more than the 10,000,000 one run makes"):
        expand([huge])
    assert total_ecgs([make_condition("Sinus rhythm", "F", 40, 60, MAX_ECGS)]) == MAX_ECGS
    path = tmp_path / "c.csv"
    path.write_text(f"text,sex,age,hr,count\nSinus rhythm,F,40,60,{MAX_ECGS}\nSinus rhythm,M,40,60,1\n")
    with pytest.raises(ValueError, match=r"c.csv: its count column asks for 10,000,001 ECGs"):
        read_conditions(path)
