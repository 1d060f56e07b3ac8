"""Keyword rules over report text: which records show a condition (per-condition evaluation, downstream tasks).

A rule holds if the report contains any of its `any` phrases and none of its `none` phrases. Two ways to match:

- plain (the default): substrings of the lower-cased report, its statements joined by "|", as the published
  evaluation matches them (DiffuSETS_Exp `test_scripts/batch_disease_gen.py` on the `|`-joined report_N text):
  "pace" also matches "paced"; " st " needs the spaces, so a statement that starts with "ST" does not match it,
  and no phrase reaches across two statements;
- whole words (`whole_words`, the downstream benchmark's tasks): case-insensitive, a phrase must not be glued to
  letters or digits on either side ("normal ecg" does not match "Abnormal ECG", "pvc" does not match "pvcs") and
  must lie within one statement; runs of whitespace count as one space, in reports and phrases alike.

Rule files are JSON:

    {"skip_reports_with": ["warning:"], "whole_words": false,
     "rules": [{"name": "normal", "any": ["normal ecg"], "none": ["abnormal ecg"], "description": "..."}]}

(`whole_words` and `description` optional). The per-condition rules of the paper ship in
`experiments/data/condition_rules.json`, the downstream benchmark's tasks in `experiments/data/downstream_rules.json`;
users pass their own file, or one rule on the command line as `NAME=kw1|kw2!exclusion1|exclusion2` (`parse_rule`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffusets_jax.conditioning.prompts import LINE_SEPARATOR
from diffusets_jax.io.files import read_json

CONDITION_RULES = Path(__file__).resolve().parent / "data" / "condition_rules.json"
DOWNSTREAM_RULES = Path(__file__).resolve().parent / "data" / "downstream_rules.json"
_SPACES = re.compile(r"\s+")


@dataclasses.dataclass(frozen=True)
class KeywordRule:
    name: str
    any_of: tuple[str, ...]
    none_of: tuple[str, ...] = ()
    whole_words: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        # Plain phrases keep their spaces (" st " means a separate word); whole-word phrases are normalised.
        clean = normalize_text if self.whole_words else str.lower
        object.__setattr__(self, "any_of", tuple(clean(p) for p in self.any_of))
        object.__setattr__(self, "none_of", tuple(clean(p) for p in self.none_of))
        if not self.any_of or not all(self.any_of) or not all(self.none_of):
            raise ValueError(f"rule {self.name!r}: needs at least one 'any' phrase and no empty phrase")

    def matches(self, report: Sequence[str] | str) -> bool:
        """Whether a report (its statements, or one string) satisfies the rule (see the module docstring)."""
        if not self.whole_words:
            text = report_text(report)
            return any(p in text for p in self.any_of) and not any(p in text for p in self.none_of)
        statements = [normalize_text(s) for s in ([report] if isinstance(report, str) else report)]
        found = lambda phrases: bool(phrases) and any(_word_pattern(phrases).search(s) for s in statements)
        return found(self.any_of) and not found(self.none_of)

    def mask(self, reports: Sequence[Sequence[str] | str]) -> np.ndarray:
        """`(n,)` bool: `matches` of each report."""
        return np.array([self.matches(r) for r in reports], dtype=bool)

    def to_json(self) -> dict[str, Any]:
        """The rule as one entry of a rule file."""
        return {"name": self.name, "any": list(self.any_of), "none": list(self.none_of),
                "whole_words": self.whole_words, "description": self.description}


@dataclasses.dataclass(frozen=True)
class RuleSet:
    rules: tuple[KeywordRule, ...]
    skip_reports_with: tuple[str, ...] = ()

    def skipped(self, text: str) -> bool:
        return any(p in text for p in self.skip_reports_with)

    def labels(self, reports: Sequence[Sequence[str] | str]) -> dict[str, list[int]]:
        """`{rule name: indices of the reports it matches}`, skipped reports left out of every rule."""
        kept = ~self.skipped_mask(reports)
        return {rule.name: np.flatnonzero(kept & rule.mask(reports)).tolist() for rule in self.rules}

    def skipped_mask(self, reports: Sequence[Sequence[str] | str]) -> np.ndarray:
        """`(n,)` bool: the reports every rule leaves out (`skip_reports_with`)."""
        return np.array([self.skipped(report_text(r)) for r in reports], dtype=bool)

    def to_json(self) -> dict[str, Any]:
        """The rule set as a rule file: what a run that uses it records of it (an edited file is another input)."""
        return {"rules": [rule.to_json() for rule in self.rules], "skip_reports_with": list(self.skip_reports_with)}

    def select(self, names: Sequence[str]) -> RuleSet:
        known = {r.name: r for r in self.rules}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"unknown condition(s) {', '.join(unknown)}; the rules define {', '.join(known)}")
        return dataclasses.replace(self, rules=tuple(known[n] for n in names))


def report_text(report: Sequence[str] | str) -> str:
    """The text a plain rule is matched against: the statements joined by "|", lower-cased (the published text;
    spaces would let " st " match "...|ST elevation" and "normal ecg" match "Otherwise normal|ECG ...")."""
    return (report if isinstance(report, str) else LINE_SEPARATOR.join(report)).lower()


def normalize_text(text: str) -> str:
    """Lower case, whitespace runs collapsed to one space, stripped (whole-word matching)."""
    return _SPACES.sub(" ", str(text)).strip().lower()


@functools.lru_cache(maxsize=256)
def _word_pattern(phrases: tuple[str, ...]) -> re.Pattern[str]:
    # Longest first, so an alternation never stops at a phrase that is a prefix of a longer one.
    alternatives = "|".join(re.escape(p) for p in sorted(phrases, key=len, reverse=True))
    return re.compile(rf"(?<![a-z0-9])(?:{alternatives})(?![a-z0-9])")


def parse_rule(spec: str) -> KeywordRule:
    """`NAME=kw1|kw2` or `NAME=kw1|kw2!exclusion1|exclusion2` -> a whole-word KeywordRule (any-of, none-of)."""
    name, sep, body = str(spec).partition("=")
    positives, _, negatives = body.partition("!")
    split = lambda text: tuple(p for p in (normalize_text(part) for part in text.split("|")) if p)
    if not sep or not name.strip() or not split(positives):
        raise ValueError(f"rule {spec!r}: write NAME=keyword1|keyword2[!exclusion1|exclusion2]")
    return KeywordRule(name.strip().lower(), split(positives), split(negatives), whole_words=True)


def _phrases(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
        raise ValueError(f"{where}: expected a list of non-empty phrases, got {value!r}")
    return tuple(p.lower() for p in value)


def load_rules(path: str | os.PathLike = CONDITION_RULES) -> RuleSet:
    """A rule file (see the module docstring); every problem is one line naming the file and the rule."""
    data = read_json(path, "keyword rule file")
    name = Path(path).name
    if not isinstance(data, dict) or not isinstance(data.get("rules"), list) or not data["rules"]:
        raise ValueError(f"{name}: expected an object with a non-empty 'rules' list")
    whole_words = data.get("whole_words", False)
    if not isinstance(whole_words, bool):
        raise ValueError(f"{name}: 'whole_words' must be true or false, got {whole_words!r}")
    rules, seen = [], set()
    for number, entry in enumerate(data["rules"], 1):
        where = f"{name} rule {number}"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise ValueError(f"{where}: each rule needs a 'name' and an 'any' list of phrases")
        unknown = sorted(set(entry) - {"name", "any", "none", "description"})
        if unknown:
            raise ValueError(f"{where} ({entry['name']}): unknown field(s) {unknown}; a rule has name, any, none, "
                             "description")
        if not isinstance(entry.get("description", ""), str):
            raise ValueError(f"{where} ({entry['name']}): 'description' must be a string")
        if entry["name"] in seen:
            raise ValueError(f"{where}: the name {entry['name']!r} is used twice")
        seen.add(entry["name"])
        phrases = _phrases(entry.get("any"), f"{where} ({entry['name']}) 'any'")  # these name the file themselves
        exclusions = _phrases(entry.get("none", []), f"{where} ({entry['name']}) 'none'")
        try:
            rules.append(KeywordRule(entry["name"], phrases, exclusions, whole_words=whole_words,
                                     description=entry.get("description", "")))
        except ValueError as err:  # the rule's own check does not know the file
            raise ValueError(f"{name}: {err}") from None
    skip = _phrases(data.get("skip_reports_with", []), f"{name} 'skip_reports_with'") if data.get(
        "skip_reports_with") else ()
    return RuleSet(tuple(rules), skip)
