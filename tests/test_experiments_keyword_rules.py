"""Keyword rules: whole-word, case-insensitive, per-statement matching; rule syntax and files."""

from __future__ import annotations

import pytest

from diffusets_jax.experiments.keyword_rules import (
    KeywordRule,
    default_rules,
    parse_rule,
    read_rules,
    select_rules,
)


def test_shipped_rules_label_the_paper_tasks():
    rules = default_rules()
    assert list(rules) == ["normal", "af", "pvc"]
    normal, af, pvc = rules["normal"], rules["af"], rules["pvc"]
    assert normal.matches(["Sinus rhythm", "Normal ECG"])
    assert not normal.matches(["Sinus tachycardia", "Abnormal ECG"])  # "abnormal ecg" holds "normal ecg"
    assert af.matches(["Atrial fibrillation with rapid ventricular response"])
    assert not af.matches(["Atrial flutter"])
    for report in (["Sinus rhythm", "PVC(s)"], ["Premature ventricular contractions"], ["frequent PVCs"],
                   ["Ventricular premature complex"]):
        assert pvc.matches(report), report
    assert not pvc.matches(["Atrial premature complexes"])


def test_whole_words_and_one_statement_at_a_time():
    rule = KeywordRule("x", ("left axis",))
    assert rule.matches(["LEFT   AXIS deviation"])  # case and whitespace runs do not matter
    assert not rule.matches(["left", "axis deviation"])  # never across two statements
    assert not KeywordRule("y", ("pvc",)).matches(["pvcs"])
    assert KeywordRule("z", ("rbbb", "right bundle")).matches(["Incomplete right bundle branch block"])


def test_negatives_exclude():
    rule = parse_rule("Normal=normal ecg!otherwise normal|except")
    assert rule.name == "normal" and rule.negatives == ("otherwise normal", "except")
    assert rule.matches(["Normal ECG"])
    assert not rule.matches(["Otherwise normal ECG"])
    assert not rule.matches(["Normal ECG except for rate"])
    assert rule.labels([["Normal ECG"], ["Abnormal ECG"], []]).tolist() == [True, False, False]
    assert parse_rule(rule.spec()) == rule


@pytest.mark.parametrize("spec, message", [
    ("af", "NAME=keyword"),
    ("af=", "positive keyword"),
    ("af=!sinus", "positive keyword"),
    ("A F=fib", "task name"),
])
def test_bad_rule_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_rule(spec)


def test_rule_files_and_selection(tmp_path):
    path = tmp_path / "rules.csv"
    path.write_text("task,positive_keywords,negative_keywords\nlbbb,left bundle branch block|lbbb,incomplete\n")
    assert read_rules(path)["lbbb"].negatives == ("incomplete",)
    chosen = select_rules(["pvc", "lbbb"], extra=["stemi=st elevation"], files=[path])
    assert [r.name for r in chosen] == ["pvc", "lbbb", "stemi"]
    assert [r.name for r in select_rules(None)] == ["normal", "af", "pvc"]
    redefined = select_rules(["af"], extra=["af=afib|atrial fibrillation"])
    assert [r.positives for r in redefined] == [("afib", "atrial fibrillation")]
    with pytest.raises(ValueError, match="unknown task.*nope"):
        select_rules(["nope"])
    (tmp_path / "bad.csv").write_text("name,keywords\nx,y\n")
    with pytest.raises(ValueError, match="no column"):
        read_rules(tmp_path / "bad.csv")
    (tmp_path / "twice.csv").write_text("task,positive_keywords\nx,a\nx,b\n")
    with pytest.raises(ValueError, match="line 3.*twice"):
        read_rules(tmp_path / "twice.csv")
    with pytest.raises(FileNotFoundError):
        read_rules(tmp_path / "missing.csv")
