"""Rare conditions through a language model (`diffusets-jax describe CONDITION`).

The paper's first stage for a condition absent from the training data: a chat model lists the condition's ECG
findings as short report statements (Brugada syndrome: right bundle branch block pattern, coved ST elevation
in V1-V2, ...). The statements are written to a findings file (`conditioning.findings`) with `approved: false`,
the exact prompt, the raw answer, the model and the time, for an expert to check against hallucination before
`sample --findings` will use them.
"""

from __future__ import annotations

import datetime
import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from diffusets_jax.conditioning.chat import ChatClient
from diffusets_jax.conditioning.findings import (
    MAX_STATEMENTS,
    check_new_findings_path,
    check_statements,
    patient_entry,
    write_findings,
)

DEFAULT_MAX_STATEMENTS = 8
MAX_CONDITION_CHARS = 200

SYSTEM_PROMPT = (
    "You are a cardiologist. You describe the resting 12-lead ECG of a condition in the short statements of a "
    "machine-read ECG report, and you state only findings that are established for that condition."
)


def findings_messages(condition: str, max_statements: int = DEFAULT_MAX_STATEMENTS) -> list[dict[str, str]]:
    """The chat messages that ask for `condition`'s ECG findings."""
    user = (
        f"List the findings typical of {condition} on a resting 10-second 12-lead ECG, as short report statements "
        "in the style of machine-read ECG reports (for example: 'Sinus rhythm', 'Left axis deviation', 'Right bundle "
        "branch block', 'ST elevation in V1-V2'). Most important first, at most "
        f"{max_statements} statements, one finding per statement, only what the ECG shows: no explanations, "
        'history or treatment. Answer with JSON only, in the form {"findings": ["...", "..."]}.'
    )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)
_EMPHASIS = re.compile(r"(\*\*|__)(.+?)\1")
_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d{1,2}[.)])\s+")


_THINKING = re.compile(r"<think(?:ing)?>.*?</think(?:ing)?>", re.DOTALL | re.IGNORECASE)


def _json_findings(text: str) -> list | None:
    """The findings list of a JSON answer ({"findings": [...]}, {"statements": [...]} or a bare list), else None.

    The JSON may stand among prose that holds braces or brackets of its own ("findings {as asked}:", "[see
    refs]"): every `{` and `[` is tried as the start of a JSON value, objects with a findings list first, then
    lists of strings."""
    decoder = json.JSONDecoder()
    values = []
    for start in (i for i, char in enumerate(text) if char in "{["):
        try:
            values.append(decoder.raw_decode(text, start)[0])
        except json.JSONDecodeError:
            continue
    for value in values:
        if isinstance(value, dict):
            found = next((value[k] for k in ("findings", "statements") if isinstance(value.get(k), list)), None)
            if found is not None:
                return found
    return next((value for value in values
                 if isinstance(value, list) and value and all(isinstance(item, str) for item in value)), None)


def parse_findings_answer(answer: str) -> list[str]:
    """A chat model's answer -> finding statements, in order.

    Accepts the JSON asked for (also inside a ``` fence or surrounded by prose, or a bare JSON list) and falls
    back to one finding per bulleted or numbered line; other prose, and a reasoning model's <think> block, are
    ignored. Each statement loses Markdown emphasis (**bold**, __bold__), surrounding quotes, asterisks and
    underscores, and a trailing '.', ';' or ',' (report lines carry no final punctuation: the ordered prompt
    adds "}."); repeats are dropped. Returns [] when nothing usable is found.
    """
    # A reasoning model's thoughts (<think>...</think>, which some OpenAI-compatible servers leave in the answer)
    # hold drafts and bullets of their own: the findings are what follows them.
    text = _THINKING.sub("", answer).strip()
    fenced = _FENCE.search(text)
    if fenced:
        text = fenced.group(1).strip()
    items = _json_findings(text)
    if items is None:  # unbulleted prose (a refusal, an explanation) yields nothing rather than "findings"
        items = [_BULLET.sub("", line) for line in text.splitlines() if _BULLET.match(line)]
    statements: list[str] = []
    for item in items:
        if not isinstance(item, str):
            continue
        # Markdown emphasis ("**Coved ST elevation** in V1-V2"), as chat models write lists: kept, it would be
        # embedded as part of a statement no report holds, and is easy to miss in review.
        statement, before = _EMPHASIS.sub(r"\2", item), None
        while statement != before:  # "*Right bundle branch block*." and '"RBBB."' alike
            before, statement = statement, statement.strip().strip("\"'`*_").rstrip(".;,")
        if statement and statement.lower() not in (s.lower() for s in statements):
            statements.append(statement)
    return statements


def _utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def describe_condition(
    condition: str,
    client: ChatClient,
    out: str | os.PathLike,
    *,
    patient: Mapping[str, Any] | None = None,
    max_statements: int = DEFAULT_MAX_STATEMENTS,
    clock: Callable[[], str] = _utc_now,
) -> dict[str, Any]:
    """Ask `client` for `condition`'s ECG findings and write them to the new findings file `out` for review.

    `patient`: parsed sex (1/0), age, heart_rate to record with the findings (any subset). Returns the record
    written. Bad arguments and an existing `out` are refused before the model is asked; an answer with no usable
    statements raises RuntimeError and writes nothing.
    """
    condition = check_condition(condition)
    if not 1 <= max_statements <= MAX_STATEMENTS:
        raise ValueError(f"max_statements must be within 1..{MAX_STATEMENTS} (report lines), got {max_statements}")
    out = check_new_findings_path(out)
    messages = findings_messages(condition, max_statements)
    answer = client.complete(messages)
    statements = parse_findings_answer(answer)[:max_statements]
    if not statements:
        raise RuntimeError(f"model {client.model!r} gave no finding statements for {condition!r}; its answer began "
                           f"{answer.strip()[:120]!r}: rerun, try another model, or write the findings file by hand")
    try:
        statements = check_statements(statements, f"the answer of model {client.model!r}")
    except ValueError as err:
        raise RuntimeError(f"{err}; or write the findings file by hand") from None
    record: dict[str, Any] = {"condition": condition, "statements": statements}
    if patient:
        record["patient"] = patient_entry(**patient)
    record.update({
        "approved": False, "reviewed_by": "", "review_notes": "",
        "model": client.model, "base_url": client.base_url, "prompt": messages, "answer": answer,
        "llm_statements": statements, "created": clock(),
    })
    write_findings(out, record)
    return record


def check_condition(condition: str) -> str:
    """A condition name fit for the prompt: one non-empty line of at most MAX_CONDITION_CHARS characters."""
    name = condition.strip() if isinstance(condition, str) else ""
    if not name or "\n" in name or len(name) > MAX_CONDITION_CHARS:
        raise ValueError(f"condition must be a name of 1..{MAX_CONDITION_CHARS} characters on one line, "
                         f"e.g. 'Brugada syndrome'; got {condition!r}")
    return name

