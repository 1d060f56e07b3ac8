"""Keyword rules over report text: which records show a condition (per-condition evaluation, downstream tasks).

A rule holds if the lower-cased report (its statements joined by single spaces) contains any of its `any` phrases
and none of its `none` phrases, matched as plain substrings, as the published evaluation does ("pace" also matches
"paced"; " st " needs the spaces). Rule files are JSON:

    {"skip_reports_with": ["warning:"], "rules": [{"name": "normal", "any": ["normal ecg"], "none": ["abnormal ecg"]}]}

The per-condition rules of the paper ship in `experiments/data/condition_rules.json`; users pass their own file.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffusets_jax.io.files import read_json

CONDITION_RULES = Path(__file__).resolve().parent / "data" / "condition_rules.json"


@dataclasses.dataclass(frozen=True)
class KeywordRule:
    name: str
    any_of: tuple[str, ...]
    none_of: tuple[str, ...] = ()

    def matches(self, text: str) -> bool:
        """Whether lower-cased report `text` (see `report_text`) satisfies the rule."""
        return any(p in text for p in self.any_of) and not any(p in text for p in self.none_of)


@dataclasses.dataclass(frozen=True)
class RuleSet:
    rules: tuple[KeywordRule, ...]
    skip_reports_with: tuple[str, ...] = ()

    def skipped(self, text: str) -> bool:
        return any(p in text for p in self.skip_reports_with)

    def labels(self, reports: Sequence[Sequence[str] | str]) -> dict[str, list[int]]:
        """`{rule name: indices of the reports it matches}`, skipped reports left out of every rule."""
        texts = [report_text(r) for r in reports]
        return {rule.name: [i for i, t in enumerate(texts) if not self.skipped(t) and rule.matches(t)]
                for rule in self.rules}

    def select(self, names: Sequence[str]) -> RuleSet:
        known = {r.name: r for r in self.rules}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"unknown condition(s) {', '.join(unknown)}; the rules define {', '.join(known)}")
        return dataclasses.replace(self, rules=tuple(known[n] for n in names))


def report_text(report: Sequence[str] | str) -> str:
    """The text a rule is matched against: the statements joined by single spaces, lower-cased."""
    return (report if isinstance(report, str) else " ".join(report)).lower()


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
    rules, seen = [], set()
    for number, entry in enumerate(data["rules"], 1):
        where = f"{name} rule {number}"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise ValueError(f"{where}: each rule needs a 'name' and an 'any' list of phrases")
        unknown = sorted(set(entry) - {"name", "any", "none"})
        if unknown:
            raise ValueError(f"{where} ({entry['name']}): unknown field(s) {unknown}; a rule has name, any, none")
        if entry["name"] in seen:
            raise ValueError(f"{where}: the name {entry['name']!r} is used twice")
        seen.add(entry["name"])
        rules.append(KeywordRule(entry["name"], _phrases(entry.get("any"), f"{where} ({entry['name']}) 'any'"),
                                 _phrases(entry.get("none", []), f"{where} ({entry['name']}) 'none'")))
    skip = _phrases(data.get("skip_reports_with", []), f"{name} 'skip_reports_with'") if data.get(
        "skip_reports_with") else ()
    return RuleSet(tuple(rules), skip)
