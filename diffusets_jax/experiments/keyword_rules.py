"""Labels from report keywords: a rule is positive when any of its keywords occurs and none of its exclusions does.

A rule `KeywordRule(name, positives, negatives)` matches a report (its statements, `report_lines`) when at least
one positive keyword and no negative keyword occurs in it. Matching is case-insensitive, on whole words, within one
statement:

- whole words: a keyword must not be glued to letters or digits on either side, so "normal ecg" does not match
  "Abnormal ECG" and "pvc" does not match "pvcs" (list both forms when both occur);
- within one statement: statements are matched one by one, so a two-word keyword never straddles two statements;
- runs of whitespace count as one space, in reports and keywords alike.

Rules are written as `NAME=kw1|kw2` or `NAME=kw1|kw2!neg1|neg2` (`parse_rule`), or as CSV rows `task,
positive_keywords, negative_keywords, description` with `|`-separated keywords (`read_rules`); the rules of the
paper's data-augmentation benchmark ship in `downstream_tasks.csv` (`default_rules`).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

DEFAULT_RULES_CSV = Path(__file__).resolve().parent / "downstream_tasks.csv"
RULE_COLUMNS = ("task", "positive_keywords", "negative_keywords", "description")
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")
_SPACES = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Lower case, whitespace runs collapsed to one space, stripped."""
    return _SPACES.sub(" ", str(text)).strip().lower()


@dataclasses.dataclass(frozen=True)
class KeywordRule:
    """`name`: the task's name; `positives`: keywords of which any makes a report positive; `negatives`: keywords
    of which any makes it negative regardless (both normalised, see `normalize_text`)."""

    name: str
    positives: tuple[str, ...]
    negatives: tuple[str, ...] = ()
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ValueError(f"task name {self.name!r}: use lower-case letters, digits, '_' or '-' (e.g. af, lbbb)")
        positives = tuple(normalize_text(k) for k in self.positives)
        negatives = tuple(normalize_text(k) for k in self.negatives)
        if not positives or not all(positives):
            raise ValueError(f"task {self.name}: needs at least one non-empty positive keyword")
        if not all(negatives):
            raise ValueError(f"task {self.name}: empty negative keyword")
        object.__setattr__(self, "positives", positives)
        object.__setattr__(self, "negatives", negatives)

    def matches(self, report_lines: Sequence[str]) -> bool:
        """True when a statement holds a positive keyword and no statement holds a negative one."""
        lines = [normalize_text(line) for line in report_lines]
        hit = lambda pattern: any(pattern.search(line) for line in lines)
        return hit(_pattern(self.positives)) and not (self.negatives and hit(_pattern(self.negatives)))

    def labels(self, reports: Iterable[Sequence[str]]) -> np.ndarray:
        """`(n,)` bool: `matches` of each report."""
        return np.array([self.matches(lines) for lines in reports], dtype=bool)

    def spec(self) -> str:
        """The rule in `parse_rule`'s syntax."""
        return f"{self.name}={'|'.join(self.positives)}" + (f"!{'|'.join(self.negatives)}" if self.negatives else "")

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "positives": list(self.positives), "negatives": list(self.negatives),
                "description": self.description}


@functools.lru_cache(maxsize=256)
def _pattern(keywords: tuple[str, ...]) -> re.Pattern[str]:
    # Longest first, so an alternation never stops at a keyword that is a prefix of a longer one.
    alternatives = "|".join(re.escape(k) for k in sorted(keywords, key=len, reverse=True))
    return re.compile(rf"(?<![a-z0-9])(?:{alternatives})(?![a-z0-9])")


def _keywords(text: str) -> tuple[str, ...]:
    return tuple(k for k in (normalize_text(part) for part in text.split("|")) if k)


def parse_rule(spec: str) -> KeywordRule:
    """`NAME=kw1|kw2` or `NAME=kw1|kw2!neg1|neg2` (positives any-of, negatives none-of) -> KeywordRule."""
    name, sep, body = str(spec).partition("=")
    if not sep:
        raise ValueError(f"--task {spec!r}: write NAME=keyword1|keyword2[!exclusion1|exclusion2]")
    positives, _, negatives = body.partition("!")
    return KeywordRule(name.strip().lower(), _keywords(positives), _keywords(negatives))


def read_rules(path: str | os.PathLike) -> dict[str, KeywordRule]:
    """Rules from a CSV file with columns task, positive_keywords, negative_keywords[, description]."""
    path = Path(path)
    if path.is_dir() or not path.exists():
        raise FileNotFoundError(f"task file {path} does not exist (a CSV with columns {', '.join(RULE_COLUMNS)})")
    rules: dict[str, KeywordRule] = {}
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in RULE_COLUMNS[:2] if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: no column(s) {missing}; the columns are {', '.join(RULE_COLUMNS)}")
        for line, row in enumerate(reader, start=2):
            try:
                rule = KeywordRule(normalize_text(row["task"] or ""), _keywords(row["positive_keywords"] or ""),
                                   _keywords(row.get("negative_keywords") or ""), (row.get("description") or "").strip())
            except ValueError as err:
                raise ValueError(f"{path} line {line}: {err}") from None
            if rule.name in rules:
                raise ValueError(f"{path} line {line}: task {rule.name} is defined twice")
            rules[rule.name] = rule
    if not rules:
        raise ValueError(f"{path}: no task rows")
    return rules


def default_rules() -> dict[str, KeywordRule]:
    """The benchmark's tasks (`downstream_tasks.csv`): normal, af, pvc."""
    return read_rules(DEFAULT_RULES_CSV)


def select_rules(names: Sequence[str] | None, extra: Sequence[str] = (), files: Sequence[str | os.PathLike] = ()
                 ) -> list[KeywordRule]:
    """The rules to run: `names` from the shipped and file-given tasks (None: the shipped ones), then every rule
    given as `extra` specs (`parse_rule`; a name already known is redefined). One line naming the unknown task."""
    known = default_rules()
    for path in files:
        known.update(read_rules(path))
    given = [parse_rule(spec) for spec in extra]
    chosen = list(known) if names is None else [normalize_text(n) for n in names if n.strip()]
    defined = {**known, **{r.name: r for r in given}}
    unknown = [n for n in chosen if n not in defined]
    if unknown:
        raise ValueError(f"--tasks: unknown task(s) {', '.join(unknown)}; known: {', '.join(defined)} (define one with "
                         "--task NAME=keyword1|keyword2[!exclusion])")
    order = list(dict.fromkeys([*chosen, *(r.name for r in given)]))
    if not order:
        raise ValueError("--tasks: no task selected")
    return [defined[n] for n in order]
