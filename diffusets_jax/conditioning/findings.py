"""Findings files: the ECG findings of a condition as report statements, reviewed by an expert before use.

The paper generates ECGs of conditions absent from the training data in two stages: a language model lists
the condition's ECG findings, an expert checks them against hallucination, and the findings are generated from
as report statements (embedded in the model's prompt style) with chosen patient information. A findings file
holds the first two stages' result:

    {
      "condition": "Brugada syndrome",
      "statements": ["Sinus rhythm", "Right bundle branch block pattern", "Coved ST elevation in V1-V2"],
      "patient": {"sex": "M", "age": 40, "heart_rate": 72},
      "approved": false
    }

`diffusets-jax describe` writes one from a chat model's answer, with `approved: false` and its provenance
(`model`, `base_url`, `prompt`, `answer`, `llm_statements`, `created`); an expert edits `statements` and sets
`approved` to true (`reviewed_by` and `review_notes` are there for their name and remarks). A file may also be
written by hand: `condition`, `statements` and `approved` are required, `patient` and each of its fields are
optional. Unknown keys are errors, so a misspelt `approved` cannot pass silently.

`sample --findings FILE` reads one (`read_findings`, refusing it while unapproved unless asked not to) and turns
it into a generation request (`findings_condition`), recording `Findings.provenance` in the run's manifest.

Statements are report lines: non-empty, at most MAX_STATEMENT_CHARS characters, without `|` (the report-line
separator of `--text`) or braces (the ordered prompt's delimiters), at most MAX_STATEMENTS of them (MIMIC-IV-ECG
reports have at most 18 lines; the model never saw more).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from diffusets_jax.conditioning.patient import parse_age, parse_heart_rate, parse_sex
from diffusets_jax.conditioning.prompts import LINE_SEPARATOR
from diffusets_jax.conditioning.requests import Condition, make_condition
from diffusets_jax.io.files import write_new_text

MAX_STATEMENTS = 18
MAX_STATEMENT_CHARS = 200
REQUIRED_FIELDS = ("condition", "statements", "approved")
OPTIONAL_FIELDS = ("patient", "reviewed_by", "review_notes", "model", "base_url", "prompt", "answer",
                   "llm_statements", "created")
PATIENT_FIELDS = ("sex", "age", "heart_rate")
_PARSERS = {"sex": parse_sex, "age": parse_age, "heart_rate": parse_heart_rate}


@dataclasses.dataclass(frozen=True)
class Findings:
    """A validated findings file.

    `patient` holds the parsed fields the file gives (sex 1 = male / 0 = female, age in years, heart_rate in
    bpm); `provenance` is what a sample manifest records about where the statements came from: the file
    (`file`, `sha256` of the bytes read), `condition`, `source` ("llm": written by `describe`, or "hand"), the
    chat `model`, `base_url` and `created` time (None for a hand-written file), `approved`, `reviewer` (None if
    not named) and `edited` (whether the reviewer changed the model's statements; None for a hand-written file).
    """

    condition: str
    statements: tuple[str, ...]
    patient: dict[str, float]
    approved: bool
    provenance: dict[str, Any]


def check_statements(statements: object, where: str) -> list[str]:
    """Validate report statements (rules in the module docstring); errors name `where` and the statement."""
    if not isinstance(statements, list | tuple) or not statements:
        raise ValueError(f"{where}: statements must be a non-empty list of report lines, got {statements!r}")
    if len(statements) > MAX_STATEMENTS:
        raise ValueError(f"{where}: {len(statements)} statements; reports have at most {MAX_STATEMENTS} lines: "
                         "keep the most important")
    kept = []
    for i, statement in enumerate(statements):
        if not isinstance(statement, str) or not statement.strip():
            raise ValueError(f"{where}: statements[{i}] is {statement!r}; each must be a non-empty string")
        statement = statement.strip()
        for bad, why in ((LINE_SEPARATOR, "separates report lines"), ("{", "delimits statements in the prompt"),
                         ("}", "delimits statements in the prompt"), ("\n", "ends a report line"),
                         ("\r", "ends a report line")):  # as `prompts.report_lines` splits at either
            if bad in statement:
                raise ValueError(f"{where}: statements[{i}] {statement!r} contains {bad!r}, which {why}: "
                                 "split or reword it")
        if len(statement) > MAX_STATEMENT_CHARS:
            raise ValueError(f"{where}: statements[{i}] has {len(statement)} characters; a report line has at most "
                             f"{MAX_STATEMENT_CHARS}: shorten or split it")
        kept.append(statement)
    return kept


def _check_patient(patient: object, where: str) -> dict[str, float]:
    if not isinstance(patient, Mapping):
        raise ValueError(f"{where}: patient must be an object with any of {', '.join(PATIENT_FIELDS)}, got {patient!r}")
    unknown = sorted(set(patient) - set(PATIENT_FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown patient field(s) {', '.join(map(repr, unknown))}; allowed: "
                         f"{', '.join(PATIENT_FIELDS)}")
    parsed = {}
    for field in PATIENT_FIELDS:
        if field in patient and patient[field] is not None:
            try:
                parsed[field] = _PARSERS[field](patient[field], field=f"patient.{field}")
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
    return parsed


def _check_record(record: object, where: str) -> tuple[str, list[str], dict[str, float], bool]:
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: expected a JSON object with {', '.join(REQUIRED_FIELDS)}, got {type(record).__name__}")
    unknown = sorted(set(record) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; allowed: "
                         f"{', '.join(REQUIRED_FIELDS + OPTIONAL_FIELDS)}")
    missing = [field for field in REQUIRED_FIELDS if field not in record]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)}; a findings file needs "
                         f"{', '.join(REQUIRED_FIELDS)}")
    condition = record["condition"]
    if not isinstance(condition, str) or not condition.strip():
        raise ValueError(f"{where}: condition must name the condition, got {condition!r}")
    if not isinstance(record["approved"], bool):
        raise ValueError(f"{where}: approved must be true or false, got {record['approved']!r}")
    statements = check_statements(record["statements"], where)
    patient = _check_patient(record.get("patient") or {}, where)
    return condition.strip(), statements, patient, record["approved"]


def patient_entry(sex: int | None = None, age: float | None = None, heart_rate: float | None = None) -> dict[str, Any]:
    """Parsed patient values -> the file's readable `patient` object (sex as "M"/"F"), omitting what is None."""
    entry: dict[str, Any] = {}
    if sex is not None:
        entry["sex"] = "M" if sex == 1 else "F"
    if age is not None:
        entry["age"] = age
    if heart_rate is not None:
        entry["heart_rate"] = heart_rate
    return entry


def check_new_findings_path(path: str | os.PathLike) -> Path:
    """Where a new findings file may go: a `.json` path that does not exist yet (an existing one may hold an
    expert's review, which is never overwritten). Checked before asking a model anything."""
    path = Path(path)
    if path.suffix.lower() != ".json":
        raise ValueError(f"findings file {str(path)!r} must end in .json")
    if path.exists():
        raise ValueError(f"{str(path)!r} already exists and may hold an expert's review: choose another path "
                         "(nothing is ever overwritten)")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"the folder of {str(path)!r} does not exist: create it first")
    return path


def write_findings(path: str | os.PathLike, record: Mapping[str, Any]) -> Path:
    """Validate `record` and write it as a new findings file at `path` (refused if the file exists).

    Written by `io.files.write_new_text`: atomically, and never over a file that appeared meanwhile."""
    path = check_new_findings_path(path)
    _check_record(record, str(path))
    try:
        write_new_text(path, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    except FileExistsError:
        raise ValueError(f"{str(path)!r} appeared while writing: it was left untouched") from None
    return path


def read_findings(path: str | os.PathLike, *, allow_unapproved: bool = False) -> Findings:
    """A findings file, validated; an unapproved one is refused unless `allow_unapproved`.

    Errors are one line naming the file (and the JSON line or field) and what to do."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"findings file {str(path)!r} is a directory: give the findings .json file in it")
    if not path.is_file():
        raise FileNotFoundError(f"findings file {str(path)!r} does not exist: write one with `diffusets-jax describe "
                                "CONDITION --out FILE` or by hand (condition, statements, approved)")
    payload = path.read_bytes()
    try:
        # utf-8-sig: an editor's byte-order mark (Windows Notepad's "UTF-8 with BOM") is not part of the JSON, as in
        # a conditions file or an answer sheet; the SHA-256 below stays that of the bytes as they are.
        record = json.loads(payload.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise ValueError(f"{path.name}: not a UTF-8 text file; a findings file is JSON") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path.name} line {err.lineno}: not valid JSON ({err.msg})") from None
    condition, statements, patient, approved = _check_record(record, path.name)
    if not approved and not allow_unapproved:
        raise ValueError(
            f"{path.name}: approved is false: an expert must check the statements against hallucination and set "
            '"approved": true (or pass --allow-unapproved-findings, which the manifest records)'
        )
    llm_statements = record.get("llm_statements")
    from_llm = "model" in record
    provenance = {
        "file": str(path.resolve()),
        "sha256": hashlib.sha256(payload).hexdigest(),  # of the bytes parsed above, not a second read
        "condition": condition,
        "source": "llm" if from_llm else "hand",
        "model": record.get("model"),
        "base_url": record.get("base_url"),
        "created": record.get("created"),
        "approved": approved,
        "reviewer": str(record.get("reviewed_by") or "").strip() or None,
        "edited": ([s.strip() for s in llm_statements if isinstance(s, str)] != statements
                   if from_llm and isinstance(llm_statements, list) else None),
    }
    return Findings(condition, tuple(statements), patient, approved, provenance)


PATIENT_FLAGS = {"sex": "--sex", "age": "--age", "heart_rate": "--hr"}


def patient_from_flags(sex: object = None, age: object = None, heart_rate: object = None) -> dict[str, float]:
    """The patient values given as `describe` / `sample` flags, parsed (errors name the flag); None ones left out."""
    given = {"sex": sex, "age": age, "heart_rate": heart_rate}
    return {name: _PARSERS[name](value, field=PATIENT_FLAGS[name]) for name, value in given.items() if value is not None}


def findings_condition(findings: Findings, *, sex: object = None, age: object = None, heart_rate: object = None,
                       count: object = 1, where: str = "--findings") -> tuple[Condition, dict[str, Any]]:
    """The generation request of a findings file, and the provenance to record with its ECGs.

    The statements are the file's; each patient value is the one given here (a `sample` flag, parsed like
    one) or else the file's; a value in neither is an error naming both places. The provenance is
    `findings.provenance` plus `patient_from`: for each of sex, age and heart_rate, "flag" or "file".
    """
    flags = patient_from_flags(sex, age, heart_rate)
    missing = [name for name in PATIENT_FLAGS if name not in flags and name not in findings.patient]
    if missing:
        raise ValueError(f"{where}: {findings.provenance['file']} gives no {' or '.join(missing)} in its patient and "
                         f"no flag does: pass {'/'.join(PATIENT_FLAGS[name] for name in missing)} or add them to "
                         'the file\'s "patient"')
    values = {**findings.patient, **flags}
    condition = make_condition(list(findings.statements), values["sex"], values["age"], values["heart_rate"], count,
                               where=where)
    provenance = {**findings.provenance,
                  "patient_from": {name: "flag" if name in flags else "file" for name in PATIENT_FLAGS}}
    return condition, provenance
