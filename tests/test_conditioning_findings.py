"""Findings files: reading (approved, hand-written, LLM-written), the refusal of unapproved ones, one-line errors
for every malformed field, and writing that never overwrites."""

from __future__ import annotations

import hashlib
import json

import pytest

from diffusets_jax.conditioning.findings import Findings, findings_condition, read_findings, write_findings

BRUGADA = ["Sinus rhythm", "Right bundle branch block pattern", "Coved ST elevation in V1-V2"]


def _write(path, record) -> str:
    path.write_text(json.dumps(record))
    return str(path)


def test_hand_written_approved_file(tmp_path):
    path = _write(tmp_path / "brugada.json", {"condition": " Brugada syndrome ", "statements": BRUGADA,
                                              "patient": {"sex": "M", "age": 40, "heart_rate": "72"},
                                              "approved": True, "reviewed_by": "Dr A"})
    findings = read_findings(path)
    assert isinstance(findings, Findings)
    assert findings.condition == "Brugada syndrome" and findings.statements == tuple(BRUGADA)
    assert findings.patient == {"sex": 1, "age": 40.0, "heart_rate": 72.0}
    assert findings.provenance == {
        "file": str((tmp_path / "brugada.json").resolve()),
        "sha256": hashlib.sha256((tmp_path / "brugada.json").read_bytes()).hexdigest(),
        "condition": "Brugada syndrome", "source": "hand", "model": None, "base_url": None, "created": None,
        "approved": True, "reviewer": "Dr A", "edited": None,
    }


def test_patient_is_optional_field_by_field(tmp_path):
    findings = read_findings(_write(tmp_path / "f.json", {"condition": "X", "statements": ["A"], "approved": True,
                                                          "patient": {"age": 30}}))
    assert findings.patient == {"age": 30.0}
    assert read_findings(_write(tmp_path / "g.json", {"condition": "X", "statements": ["A"],
                                                      "approved": True})).patient == {}


def test_unapproved_is_refused_unless_allowed(tmp_path):
    path = _write(tmp_path / "f.json", {"condition": "X", "statements": ["A"], "approved": False, "model": "m",
                                        "llm_statements": ["A", "B"]})
    with pytest.raises(ValueError, match=r'^f.json: approved is false: an expert must check the statements.*"approved": true'):
        read_findings(path)
    findings = read_findings(path, allow_unapproved=True)
    assert findings.approved is False
    assert findings.provenance["source"] == "llm" and findings.provenance["model"] == "m"
    assert findings.provenance["edited"] is True  # the reviewer removed "B"
    assert findings.provenance["reviewer"] is None  # none named


def test_missing_file_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist: write one with `diffusets-jax describe"):
        read_findings(tmp_path / "nope.json")
    # A folder was said not to exist, and to be written with `describe`.
    with pytest.raises(ValueError, match="is a directory: give the findings .json file in it"):
        read_findings(tmp_path)


@pytest.mark.parametrize("content, message", [
    ('{"condition": "X",\n "statements": ["A"]\n "approved": true}', r"f.json line 3: not valid JSON"),
    ('["A"]', r"f.json: expected a JSON object"),
    ('{"condition": "X", "statements": ["A"], "aproved": true}', r"unknown field\(s\) 'aproved'"),
    ('{"condition": "X", "statements": ["A"]}', r"missing field\(s\) approved"),
    ('{"condition": "", "statements": ["A"], "approved": true}', r"condition must name the condition"),
    ('{"condition": "X", "statements": ["A"], "approved": "yes"}', r"approved must be true or false"),
    ('{"condition": "X", "statements": [], "approved": true}', r"statements must be a non-empty list"),
    ('{"condition": "X", "statements": "A|B", "approved": true}', r"statements must be a non-empty list"),
    ('{"condition": "X", "statements": ["A", " "], "approved": true}', r"statements\[1\] is ' '"),
    ('{"condition": "X", "statements": ["A", 3], "approved": true}', r"statements\[1\] is 3"),
    ('{"condition": "X", "statements": ["A|B"], "approved": true}', r"statements\[0\] 'A\|B' contains '\|'"),
    ('{"condition": "X", "statements": ["ST {up}"], "approved": true}', r"contains '\{'"),
    ('{"condition": "X", "statements": ["ST up\\rT inverted"], "approved": true}', r"contains '\\r'"),
    ('{"condition": "X", "statements": ["' + "a" * 201 + '"], "approved": true}', r"has 201 characters"),
    ('{"condition": "X", "statements": ' + json.dumps([f"s{i}" for i in range(19)]) + ', "approved": true}',
     r"19 statements; reports have at most 18 lines"),
    ('{"condition": "X", "statements": ["A"], "approved": true, "patient": {"sex": "W"}}',
     r"f.json: patient.sex: cannot parse 'W'"),
    ('{"condition": "X", "statements": ["A"], "approved": true, "patient": {"age": 300}}',
     r"f.json: patient.age is 300, PTB-XL's code for a missing age"),
    ('{"condition": "X", "statements": ["A"], "approved": true, "patient": {"heart_rate": 400}}',
     r"f.json: patient.heart_rate: 400 is out of range"),
    ('{"condition": "X", "statements": ["A"], "approved": true, "patient": {"hr": 70}}',
     r"unknown patient field\(s\) 'hr'"),
    ('{"condition": "X", "statements": ["A"], "approved": true, "patient": [1]}', r"patient must be an object"),
])
def test_malformed_files_get_one_line_naming_the_file_and_field(tmp_path, content, message):
    path = tmp_path / "f.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        read_findings(path, allow_unapproved=True)
    assert "\n" not in str(error.value)


def test_a_byte_order_mark_from_an_editor_is_read_past(tmp_path):
    """A file reviewed in an editor that saves "UTF-8 with BOM" was refused as not valid JSON."""
    record = {"condition": "X", "statements": ["A"], "approved": True}
    (tmp_path / "f.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(record, indent=2).encode("utf-8"))
    findings = read_findings(tmp_path / "f.json")
    assert findings.statements == ("A",) and findings.approved
    assert findings.provenance["sha256"] == hashlib.sha256((tmp_path / "f.json").read_bytes()).hexdigest()


def test_not_utf8_is_a_clear_error(tmp_path):
    (tmp_path / "f.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(ValueError, match="not a UTF-8 text file"):
        read_findings(tmp_path / "f.json")


def test_write_validates_and_never_overwrites(tmp_path):
    record = {"condition": "X", "statements": ["A"], "approved": False}
    path = write_findings(tmp_path / "f.json", record)
    assert json.loads(path.read_text()) == record
    path.write_text('{"reviewed": "by an expert"}')
    with pytest.raises(ValueError, match="already exists and may hold an expert's review"):
        write_findings(path, record)
    assert path.read_text() == '{"reviewed": "by an expert"}'
    with pytest.raises(ValueError, match="statements must be a non-empty list"):
        write_findings(tmp_path / "g.json", {**record, "statements": []})
    with pytest.raises(ValueError, match="must end in .json"):
        write_findings(tmp_path / "g.txt", record)
    with pytest.raises(FileNotFoundError, match="create it first"):
        write_findings(tmp_path / "missing" / "g.json", record)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]  # no temporary files left behind


def test_findings_condition_takes_the_files_patient_unless_a_flag_says_otherwise(tmp_path):
    findings = read_findings(_write(tmp_path / "b.json", {"condition": "Brugada syndrome", "statements": BRUGADA,
                                                          "patient": {"sex": "M", "age": 40}, "approved": True}))
    condition, provenance = findings_condition(findings, age="55", heart_rate="90", count=3)
    assert condition.report == tuple(BRUGADA) and condition.count == 3
    assert (condition.sex, condition.age, condition.heart_rate) == (1, 55.0, 90.0)
    assert provenance["patient_from"] == {"sex": "file", "age": "flag", "heart_rate": "flag"}
    assert provenance["file"] == findings.provenance["file"]
    condition, _ = findings_condition(findings, sex="F", heart_rate=60)
    assert (condition.sex, condition.age, condition.heart_rate, condition.count) == (0, 40.0, 60.0, 1)


@pytest.mark.parametrize("given, message", [
    ({}, r"b.json gives no heart_rate in its patient and no flag does: pass --hr or add them"),
    ({"heart_rate": "fast"}, r"--hr: cannot parse 'fast'"),
    ({"heart_rate": 70, "count": 0}, r"--findings: count: 0 must be a whole number >= 1"),
])
def test_findings_condition_errors_are_one_line(tmp_path, given, message):
    findings = read_findings(_write(tmp_path / "b.json", {"condition": "X", "statements": ["A"], "approved": True,
                                                          "patient": {"sex": "M", "age": 40}}))
    with pytest.raises(ValueError, match=message) as error:
        findings_condition(findings, **given)
    assert "\n" not in str(error.value)


def test_a_file_without_patient_needs_every_flag(tmp_path):
    bare = read_findings(_write(tmp_path / "c.json", {"condition": "X", "statements": ["A"], "approved": True}))
    with pytest.raises(ValueError, match="gives no sex or age or heart_rate.*pass --sex/--age/--hr"):
        findings_condition(bare)
    assert findings_condition(bare, sex="M", age="50", heart_rate="70")[1]["patient_from"] == {
        "sex": "flag", "age": "flag", "heart_rate": "flag"}
