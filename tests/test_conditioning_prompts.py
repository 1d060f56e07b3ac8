"""Ordered prompts: the exact published strings."""

from __future__ import annotations

import math

import pytest

from diffusets_jax.conditioning.prompts import (
    free_text_prompt,
    make_prompt,
    ordered_prompt,
    ordinal,
    report_lines,
)


def test_single_line():
    assert ordered_prompt(["Sinus rhythm"]) == "Most importantly, the 1st diagnosis is {Sinus rhythm}."


def test_two_lines_no_separator_between_sentences():
    assert ordered_prompt(["Sinus rhythm", "Normal ECG"]) == (
        "Most importantly, the 1st diagnosis is {Sinus rhythm}."
        "As a supplementary condition, the 2nd diagnosis is {Normal ECG}."
    )


def test_five_lines_exact():
    lines = ["Sinus tachycardia", "Possible left atrial enlargement", "Left axis deviation",
             "Nonspecific T wave abnormality", "Abnormal ECG"]
    assert ordered_prompt(lines) == (
        "Most importantly, the 1st diagnosis is {Sinus tachycardia}."
        "As a supplementary condition, the 2nd diagnosis is {Possible left atrial enlargement}."
        "As a supplementary condition, the 3rd diagnosis is {Left axis deviation}."
        "As a supplementary condition, the 4th diagnosis is {Nonspecific T wave abnormality}."
        "As a supplementary condition, the 5th diagnosis is {Abnormal ECG}."
    )


def test_pipe_joined_string_equals_list_and_trailing_segment_dropped():
    expected = ordered_prompt(["Atrial fibrillation", "Low QRS voltages"])
    assert ordered_prompt("Atrial fibrillation|Low QRS voltages") == expected
    assert ordered_prompt("Atrial fibrillation|Low QRS voltages|") == expected
    assert ordered_prompt(" Atrial fibrillation | Low QRS voltages ") == expected


def test_missing_lines_dropped_like_empty_mimic_fields():
    # report_0..report_17 as pandas reads them: later fields NaN/None/empty.
    row = ["Sinus bradycardia", "Left atrial enlargement", "Abnormal ECG", math.nan, None, ""]
    assert report_lines(row) == ["Sinus bradycardia", "Left atrial enlargement", "Abnormal ECG"]
    assert ordered_prompt(row).endswith("As a supplementary condition, the 3rd diagnosis is {Abnormal ECG}.")


def test_a_line_break_inside_a_statement_separates_statements_in_a_string_and_in_a_list():
    """Only sample split a cell typed with Alt+Enter; embed and prepare kept "Sinus rhythm\nLeft axis deviation" as
    one statement, so the text embedded for training, for the cache and for sampling differed."""
    expected = ["Sinus rhythm", "Left axis deviation", "Abnormal ECG"]
    assert report_lines("Sinus rhythm\nLeft axis deviation|Abnormal ECG") == expected
    assert report_lines(["Sinus rhythm\r\nLeft axis deviation", "Abnormal ECG\r", math.nan]) == expected
    assert report_lines(("Sinus rhythm\rLeft axis deviation\n\n", "Abnormal ECG")) == expected
    assert make_prompt(["Sinus rhythm\nLeft axis deviation"], "free_text") == make_prompt(expected[:2], "free_text")
    # Other control characters are text (str.splitlines would split at them).
    assert report_lines(["Sinus\x85rhythm\x0c", "a\u2028b"]) == ["Sinus\x85rhythm", "a\u2028b"]


def test_eighteen_lines_use_th_from_fourth():
    prompt = ordered_prompt([f"L{i}" for i in range(18)])
    assert prompt.count("Most importantly") == 1
    assert "the 11th diagnosis is {L10}." in prompt and "the 12th diagnosis is {L11}." in prompt
    assert prompt.endswith("As a supplementary condition, the 18th diagnosis is {L17}.")


def test_ordinals_follow_the_reference_rule():
    assert [ordinal(n) for n in (1, 2, 3, 4, 10, 11, 12, 13, 21, 22)] == [
        "1st", "2nd", "3rd", "4th", "10th", "11th", "12th", "13th", "21th", "22th"]
    with pytest.raises(ValueError):
        ordinal(0)


def test_lines_are_not_otherwise_altered():
    # Case, inner punctuation and a final period are kept: the embedding sees what the reference embedded.
    assert ordered_prompt(["PVC(s); ST elev."]) == "Most importantly, the 1st diagnosis is {PVC(s); ST elev.}."


def test_empty_report_is_an_error():
    for empty in ([], "", "|", [None, math.nan, "  "]):
        with pytest.raises(ValueError, match="no statements"):
            ordered_prompt(empty)


def test_non_string_line_is_an_error():
    with pytest.raises(ValueError, match="int"):
        ordered_prompt(["Sinus rhythm", 3])


def test_free_text_prompt_ptbxl_template():
    assert free_text_prompt("sinus rhythm, normal ecg") == "The report of the ECG is that sinus rhythm, normal ecg."
    with pytest.raises(ValueError):
        free_text_prompt("  ")


def test_free_text_prompt_of_a_report_as_written_is_the_one_prepare_trained_on():
    """PTB-XL reports often end in a full stop, which `prepare ptbxl` drops: `embed --template free_text` of
    ptbxl_database.csv, and `sample --text` of a report as written, built "... normal ecg.." instead."""
    assert make_prompt("sinus rhythm. normal ecg.", "free_text") == make_prompt(["sinus rhythm. normal ecg"], "free_text")
    assert make_prompt(["left axis deviation. "], "free_text") == "The report of the ECG is that left axis deviation."
    with pytest.raises(ValueError):
        free_text_prompt(" . ")


def _reference_prompt(text: str) -> str:
    """The published algorithm as the reference doc states it, written independently: walk the '|'-joined text
    character by character, close a braced sentence at every '|', and one more for a non-empty tail."""
    ordinals = ["1st", "2nd", "3rd"]
    out, count, current = "", 0, ""

    def sentence(index: int, statement: str) -> str:
        if index == 0:
            return "Most importantly, the 1st diagnosis is {" + statement + "}."
        name = ordinals[index] if index <= 2 else str(index + 1) + "th"
        return "As a supplementary condition, the " + name + " diagnosis is {" + statement + "}."

    for ch in text:
        if ch == "|":
            out += sentence(count, current)
            count, current = count + 1, ""
        else:
            current += ch
    if current:
        out += sentence(count, current)
    return out


@pytest.mark.parametrize("n", range(1, 19))
def test_equals_the_reference_algorithm_for_1_to_18_statements(n):
    vocabulary = ["Sinus rhythm", "Left axis deviation", "Abnormal ECG", "PVC(s)", "ST elev.", "1st degree A-V block",
                  "Possible {old} infarct", "Low QRS voltages"]
    lines = [vocabulary[(i * 5 + n) % len(vocabulary)] + f" {i}" for i in range(n)]
    expected = _reference_prompt("|".join(lines))
    assert ordered_prompt(lines) == expected
    assert ordered_prompt("|".join(lines)) == expected
    assert ordered_prompt("|".join(lines) + "|") == expected  # a trailing empty segment is dropped, as published
    assert expected.count("{") >= n and "}.As a supplementary" in expected or n == 1
