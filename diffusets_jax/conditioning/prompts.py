"""Ordered prompts: the sentence DiffuSETS builds from a report's statements before embedding it.

Exactly the published strings (diffusets-reference.md section 4), with no separator between sentences and
each statement inside literal braces, as the published code writes them and as the ada-002 embeddings the
published U-Net was trained on saw them (an embedding of the braceless text is a different condition):

    line 0      -> "Most importantly, the 1st diagnosis is {" + line + "}."
    line i >= 1 -> "As a supplementary condition, the " + ordinal + " diagnosis is {" + line + "}."

with ordinals 2nd, 3rd, then "{i+1}th" (4th, 5th, ... 11th, ... 18th; MIMIC-IV-ECG has at most 18 lines).
The reference's rule gives "21th" past twenty lines; kept as is, since it only changes what is embedded.
Statements are stripped of surrounding whitespace (so "a | b" typed on a command line is "a", "b"); their
inner text, case and punctuation are kept.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

LINE_SEPARATOR = "|"
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
# How a report becomes the text the embedder sees: "ordered" (the published MIMIC-IV-ECG prompt) or "free_text"
# (the paper's "The report of the ECG is that {report}." template, used for PTB-XL's free-text reports).
PROMPT_STYLES: tuple[str, ...] = ("ordered", "free_text")


def ordinal(position: int) -> str:
    """1 -> '1st', 2 -> '2nd', 3 -> '3rd', n >= 4 -> f'{n}th' (the reference's rule, not English's)."""
    if position < 1:
        raise ValueError(f"ordinal position must be >= 1, got {position}")
    return {1: "1st", 2: "2nd", 3: "3rd"}.get(position, f"{position}th")


def report_lines(lines: Sequence[object] | str) -> list[str]:
    """A report as its list of statements, in order: the one way prepare, embed and sample turn a report into the
    statements of its prompt, so that an embedding cache hits and a model is sampled with the text it was
    trained on.

    A string is split on `|` (so "Sinus rhythm|Normal ECG" is two lines). Every statement, of a string or of a
    sequence (MIMIC-IV-ECG's report_N cells, a JSON list), is also split at its line breaks: a spreadsheet cell
    typed with Alt+Enter holds one statement a line, and glued ("Sinus rhythmLeft axis deviation") or kept inside
    one statement the prompt would be one the model never saw. Only line breaks (\r\n, \r, \n) split; other
    control characters stay text. Missing statements (None, NaN as pandas reads empty CSV cells, empty or blank
    strings, such as the trailing segment of "a|b|") are dropped, as the reference drops empty
    `report_0..report_17` fields. Surrounding whitespace is removed.
    """
    if isinstance(lines, str):
        lines = lines.split(LINE_SEPARATOR)
    kept = []
    for line in lines:
        if line is None or (isinstance(line, float) and math.isnan(line)):
            continue
        if not isinstance(line, str):
            raise ValueError(f"report line {line!r} is a {type(line).__name__}, expected a string")
        kept += [part.strip() for part in _LINE_BREAK.split(line) if part.strip()]
    return kept


def ordered_prompt(lines: Sequence[str] | str) -> str:
    """Report statements (a sequence, or one `|`-joined string) -> the DiffuSETS ordered prompt.

    >>> ordered_prompt("Sinus rhythm|Normal ECG")
    'Most importantly, the 1st diagnosis is {Sinus rhythm}.As a supplementary condition, the 2nd diagnosis is {Normal ECG}.'

    Raises ValueError when the report has no statement: there is nothing to condition on.
    """
    kept = report_lines(lines)
    if not kept:
        raise ValueError(f"report {lines!r} has no statements: nothing to build a prompt from")
    sentences = ["Most importantly, the 1st diagnosis is {" + kept[0] + "}."]
    sentences += [
        f"As a supplementary condition, the {ordinal(i + 1)} diagnosis is " + "{" + line + "}."
        for i, line in enumerate(kept[1:], 1)
    ]
    return "".join(sentences)


def free_text_prompt(report: str) -> str:
    """A free-text report (PTB-XL's `report` column) -> the paper's "The report of the ECG is that {report}."

    The reference uses this template only for PTB-XL; MIMIC-IV-ECG statements go through `ordered_prompt`.
    """
    # A report's own closing full stop is dropped (PTB-XL writes "sinus rhythm. normal ecg." as well as without one),
    # as `prepare ptbxl` drops it: kept, embed and sample built "... normal ecg.." for the report a model was
    # trained on as "... normal ecg.".
    report = report.strip().rstrip(".").strip() if isinstance(report, str) else ""
    if not report:
        raise ValueError("report is empty: nothing to build a prompt from")
    return f"The report of the ECG is that {report}."


def make_prompt(report: Sequence[str] | str, style: str) -> str:
    """The text to embed for a report (statements, or one `|`-joined string) in a prompt style.

    "ordered": `ordered_prompt`; "free_text": the statements joined by ", " in `free_text_prompt`. A U-Net must be
    sampled with the style its training prompts had (the model directory records it).
    """
    if style == "ordered":
        return ordered_prompt(report)
    if style == "free_text":
        return free_text_prompt(", ".join(report_lines(report)))
    raise ValueError(f"prompt style must be one of {', '.join(PROMPT_STYLES)}, got {style!r}")
