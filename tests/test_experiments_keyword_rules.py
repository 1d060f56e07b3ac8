"""Keyword rules: the paper's per-condition selection as substring rules on lower-cased reports; whole-word,
per-statement rules (the downstream tasks, `NAME=...` specs)."""

from __future__ import annotations

import json

import pytest

from diffusets_jax.experiments.keyword_rules import (
    CONDITION_RULES,
    DOWNSTREAM_RULES,
    KeywordRule,
    RuleSet,
    load_rules,
    parse_rule,
    report_text,
)

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
    assert report_text(["Sinus Rhythm", "PVC(s)"]) == "sinus rhythm|pvc(s)"
    assert report_text("Already TEXT") == "already text"


def test_plain_rules_see_the_statements_joined_as_the_published_code_joins_them():
    # DiffuSETS_Exp batch_disease_gen.py matches the '|'-joined report text: a later statement starting with "ST"
    # is not " st ", and "normal" ending one statement and "ECG" starting the next is not "normal ecg".
    labels = load_rules(CONDITION_RULES).labels([["Sinus rhythm", "ST elevation, consider early repolarization"],
                                                 ["Borderline ECG", "Otherwise normal", "ECG within limits"]])
    assert labels["st"] == [] and labels["normal"] == [] and labels["sn"] == [0]


def test_user_rule_files_and_their_errors(tmp_path):
    path = tmp_path / "rules.json"
    path.write_text(json.dumps({"rules": [{"name": "brugada", "any": ["brugada", "coved st"], "none": ["no brugada"]}]}))
    rules = load_rules(path)
    assert rules.labels([["Coved ST elevation V1-V2"], ["No Brugada pattern"], ["Brugada"]]) == {"brugada": [0, 2]}
    with pytest.raises(ValueError, match="unknown condition"):
        rules.select(["af"])
    for content, match in [
        ({"rules": []}, "non-empty 'rules'"),
        ({"rules": [{"name": "x"}]}, r"^rules.json rule 1 \(x\) 'any'"),  # the file named once
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


def test_shipped_downstream_tasks_match_whole_words():
    rules = load_rules(DOWNSTREAM_RULES)
    assert [r.name for r in rules.rules] == ["normal", "af", "pvc"] and all(r.whole_words for r in rules.rules)
    normal, af, pvc = rules.rules
    assert normal.matches(["Sinus rhythm", "Normal ECG"])
    assert not normal.matches(["Sinus tachycardia", "Abnormal ECG"])  # no exclusion needed: "abnormal" is one word
    assert af.matches(["Atrial fibrillation with rapid ventricular response"]) and not af.matches(["Atrial flutter"])
    for report in (["Sinus rhythm", "PVC(s)"], ["Premature ventricular contractions"], ["frequent PVCs"],
                   ["Ventricular premature complex"]):
        assert pvc.matches(report), report
    assert not pvc.matches(["Atrial premature complexes"])
    assert normal.description.startswith("Normal vs abnormal")


def test_whole_words_within_one_statement_and_plain_substrings_of_the_joined_report():
    words = KeywordRule("x", ("LEFT   axis",), whole_words=True)
    assert words.any_of == ("left axis",)  # case and whitespace runs do not matter
    assert words.matches(["left  AXIS deviation"])
    assert not words.matches(["left", "axis deviation"])  # never across two statements
    assert not KeywordRule("y", ("pvc",), whole_words=True).matches(["pvcs"])
    assert KeywordRule("y", ("pvc",)).matches(["pvcs"])  # plain rules match substrings, as published
    plain = KeywordRule("x", ("left axis",))
    assert not plain.matches(["left", "axis deviation"])  # the statements joined by "|", as published
    assert KeywordRule("x", ("left|axis",)).matches(["left", "axis deviation"])
    assert plain.mask([["left axis"], ["right axis"], []]).tolist() == [True, False, False]
    with pytest.raises(ValueError, match="'any' phrase"):
        KeywordRule("z", ("  ",), whole_words=True)


def test_rule_specs_are_whole_word_rules_with_exclusions():
    rule = parse_rule("Normal=normal ecg!otherwise normal|except")
    assert rule.name == "normal" and rule.whole_words
    assert rule.any_of == ("normal ecg",) and rule.none_of == ("otherwise normal", "except")
    assert rule.matches(["Normal ECG"])
    assert not rule.matches(["Otherwise normal ECG"])
    assert not rule.matches(["Sinus rhythm", "Normal ECG except for rate"])  # an exclusion in any statement
    for spec in ("af", "af=", "af=!sinus", "=fib"):
        with pytest.raises(ValueError, match="NAME=keyword1"):
            parse_rule(spec)


def test_rule_files_with_whole_words_descriptions_and_skips(tmp_path):
    path = tmp_path / "rules.json"
    path.write_text(json.dumps({"whole_words": True, "skip_reports_with": ["warning:"], "rules": [
        {"name": "lbbb", "any": ["left bundle branch block", "lbbb"], "none": ["incomplete"], "description": "LBBB"}]}))
    rules = load_rules(path)
    (lbbb,) = rules.rules
    assert lbbb.whole_words and lbbb.description == "LBBB"
    reports = [["LBBB"], ["Incomplete LBBB"], ["Left bundle branch block", "Warning: noise"], ["LBBBs"]]
    assert rules.labels(reports) == {"lbbb": [0]}
    assert rules.skipped_mask(reports).tolist() == [False, False, True, False]
    assert load_rules(path).rules == rules.rules and RuleSet(rules.rules).labels(reports) == {"lbbb": [0, 2]}
    assert lbbb.to_json() == {"name": "lbbb", "any": ["left bundle branch block", "lbbb"], "none": ["incomplete"],
                              "whole_words": True, "description": "LBBB"}
    path.write_text(json.dumps({"whole_words": "yes", "rules": [{"name": "x", "any": ["a"]}]}))
    with pytest.raises(ValueError, match="'whole_words' must be true or false"):
        load_rules(path)
    path.write_text(json.dumps({"whole_words": True, "rules": [{"name": "x", "any": [" "]}]}))
    with pytest.raises(ValueError, match="rules.json: rule 'x'"):
        load_rules(path)

