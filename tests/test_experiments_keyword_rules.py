"""Keyword rules: the paper's per-condition selection, as substring rules on lower-cased reports."""

from __future__ import annotations

import json

import pytest

from diffusets_jax.experiments.keyword_rules import CONDITION_RULES, load_rules, report_text

REPORTS = [
    ["Sinus rhythm", "Normal ECG"],                               # 0: sn, normal
    ["Sinus rhythm", "Abnormal ECG"],                             # 1: sn (not normal: "abnormal ecg")
    ["Atrial fibrillation", "Left bundle branch block"],          # 2: af, lbbb
    ["Sinus tachycardia", "PVC(s)"],                              # 3: snt, pvc
    ["Sinus rhythm", "1st degree A-V block"],                     # 4: sn, avbi
    ["Sinus rhythm", "Warning: data quality may affect interpretation"],  # 5: skipped entirely
    ["Atrial paced rhythm"],                                      # 6: pacing ("pace" in "paced")
    ["ST elevation", "Sinus rhythm with ST junctional depression"],        # 7: st ("st junctional"), sn
    ["Sinus rhythm", "Nonspecific ST abnormality"],               # 8: st (" st "), sn
    ["Inferior infarct, age undetermined"],                       # 9: mi
    ["Sinus rhythm with PAC(s)"],                                 # 10: pac, sn
]


def test_the_papers_rules_select_the_records_they_describe():
    labels = load_rules(CONDITION_RULES).labels(REPORTS)
    assert labels["normal"] == [0]
    assert labels["sn"] == [0, 1, 4, 7, 8, 10]  # 5 says "sinus rhythm" but carries a warning: skipped
    assert labels["af"] == [2] and labels["lbbb"] == [2] and labels["rbbb"] == []
    assert labels["pvc"] == [3] and labels["snt"] == [3] and labels["avbi"] == [4]
    assert labels["pacing"] == [6] and labels["mi"] == [9] and labels["pac"] == [10]
    assert labels["st"] == [7, 8]  # "st junctional" and " st "; "ST elevation" alone starts the text, no space
    assert len(load_rules().rules) == 15


def test_report_text_joins_statements_lower_cased():
    assert report_text(["Sinus Rhythm", "PVC(s)"]) == "sinus rhythm pvc(s)"
    assert report_text("Already TEXT") == "already text"


def test_user_rule_files_and_their_errors(tmp_path):
    path = tmp_path / "rules.json"
    path.write_text(json.dumps({"rules": [{"name": "brugada", "any": ["brugada", "coved st"], "none": ["no brugada"]}]}))
    rules = load_rules(path)
    assert rules.labels([["Coved ST elevation V1-V2"], ["No Brugada pattern"], ["Brugada"]]) == {"brugada": [0, 2]}
    with pytest.raises(ValueError, match="unknown condition"):
        rules.select(["af"])
    for content, match in [
        ({"rules": []}, "non-empty 'rules'"),
        ({"rules": [{"name": "x"}]}, r"rules.json rule 1 \(x\) 'any'"),
        ({"rules": [{"name": "x", "any": ["a"], "nope": 1}]}, "unknown field"),
        ({"rules": [{"name": "x", "any": ["a"]}, {"name": "x", "any": ["b"]}]}, "used twice"),
        ({"rules": [{"name": "x", "any": "a"}]}, "expected a list"),
    ]:
        path.write_text(json.dumps(content))
        with pytest.raises(ValueError, match=match):
            load_rules(path)
    path.write_text("{broken")
    with pytest.raises(ValueError, match="rules.json line 1: not valid JSON"):
        load_rules(path)
