"""Scoring a clinical Turing test: filled answer sheets against the kit's key (`diffusets-jax turing-score`).

Each answer sheet is one rater's copy of the kit's `answer_sheet.csv` (`sheet_id,answer`, every sheet answered);
the rater is named by the file name (`answers_<name>.csv` -> `<name>`). Every sheet is read and checked before
anything is computed; a malformed or incomplete one gets one line naming the file and the row.

Per rater, real-vs-generated: the confusion matrix (truth x answer), accuracy with its exact (Clopper-Pearson)
95 % interval and the exact two-sided binomial test against chance (0.5; with unequal real and generated sheets,
where chance is not 0.5, Fisher's exact test of answer against truth), and the sensitivity / specificity of
detecting generated ECGs. Alignment: the share of own-report sheets judged `match` (the alignment rate) with its
exact 95 % interval, and on mismatched controls the share judged `no_match`. Across raters: Fleiss' kappa, and
the pooled rates (every rating counted once; ratings of one sheet by several raters are not independent, so the
pooled interval is narrower than the evidence warrants: it is labelled as such).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from diffusets_jax.experiments.turing import (
    ANSWER_HEADER,
    ANSWERS,
    KEY_FORMAT,
    REAL_VS_GENERATED,
    TRUTHS,
)
from diffusets_jax.io.files import file_sha256, write_json_atomic, write_text_atomic
from diffusets_jax.metrics.agreement import category_counts, fleiss_kappa

SCORE_FORMAT = "diffusets-jax turing score 1"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
RATER_PREFIX = "answers_"


def read_key(path: str | os.PathLike) -> dict[str, Any]:
    """A kit's key.json, checked for what scoring needs."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"key {str(path)!r} is a directory: give the key.json file that turing-kit wrote in it")
    if not path.is_file():
        raise FileNotFoundError(f"key {str(path)!r} does not exist: give the key.json that turing-kit wrote beside "
                                "the package")
    try:
        key = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        key = None
    if not isinstance(key, dict) or key.get("format") != KEY_FORMAT or key.get("variant") not in ANSWERS:
        raise ValueError(f"{path.name}: not a key written by `diffusets-jax turing-kit` (format {KEY_FORMAT!r})")
    sheets = key.get("sheets")
    truths = TRUTHS[key["variant"]]
    if not isinstance(sheets, list) or not sheets or any(
            not isinstance(s, dict) or not isinstance(s.get("sheet_id"), str) or s.get("truth") not in truths
            for s in sheets):
        raise ValueError(f"{path.name}: its sheets are damaged (each needs a sheet_id and a truth in {truths}): "
                         "restore the key from a copy")
    return key


def rater_name(path: str | os.PathLike) -> str:
    """`answers_dr_a.csv` -> `dr_a`; any other file is named by its stem."""
    stem = Path(path).stem
    return stem[len(RATER_PREFIX):] if stem.startswith(RATER_PREFIX) and len(stem) > len(RATER_PREFIX) else stem


def _normalise(answer: str) -> str:
    return answer.strip().lower().replace(" ", "_").replace("-", "_")


def _without_trailing_blanks(row: list[str]) -> list[str]:
    """A row without the empty cells after its answer: a spreadsheet saves every row as wide as the widest column
    it ever held (a note typed beside one answer and deleted leaves "ID;real;" on every line)."""
    while len(row) > len(ANSWER_HEADER) and not row[-1].strip():
        row = row[:-1]
    return row


def read_answers(path: str | os.PathLike, key: Mapping[str, Any]) -> dict[str, str]:
    """One filled answer sheet -> {sheet_id: answer}, every sheet of `key` answered exactly once.

    Accepted: a UTF-8 CSV (an Excel byte-order mark is fine; `;` separators too), header `sheet_id,answer`, one
    row per sheet in any order, blank rows and empty cells after the answer ignored, answers in any case ("No
    match" is `no_match`)."""
    path = Path(path)
    name = path.name
    if path.is_dir():
        raise ValueError(f"answer sheet {str(path)!r} is a directory: give the raters' filled answers_<name>.csv files")
    if not path.is_file():
        raise FileNotFoundError(f"answer sheet {str(path)!r} does not exist")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"{name}: not UTF-8 text; save the answer sheet as CSV (UTF-8)") from None
    if not text.strip():
        raise ValueError(f"{name}: empty; expected the header {','.join(ANSWER_HEADER)} and one row per sheet")
    first = text.splitlines()[0]
    # newline=None: the csv module sees "\n" for "\r\n" and a lone "\r" too (a sheet saved on an old Mac, or by some
    # spreadsheet exports), where it stopped with Python's advice to open the file in universal-newline mode.
    reader = csv.reader(io.StringIO(text, newline=None),
                        delimiter=";" if ";" in first and "," not in first else ",")
    allowed = ANSWERS[key["variant"]]
    order = [sheet["sheet_id"] for sheet in key["sheets"]]
    known = set(order)
    answers: dict[str, str] = {}
    rows: dict[str, int] = {}
    try:
        header = _without_trailing_blanks(next(reader))
        if [cell.strip().lower() for cell in header] != list(ANSWER_HEADER):
            raise ValueError(f"{name} row 1: header is {','.join(header)!r}; expected {','.join(ANSWER_HEADER)!r} "
                             "(keep the answer sheet's header)")
        for row in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            row = _without_trailing_blanks(row)
            if len(row) != len(ANSWER_HEADER):
                raise ValueError(f"{name} row {line}: {len(row)} columns; expected {len(ANSWER_HEADER)} "
                                 f"({','.join(ANSWER_HEADER)})")
            sheet_id, answer = row[0].strip().upper(), _normalise(row[1])
            if sheet_id not in known:
                raise ValueError(f"{name} row {line}: sheet id {row[0].strip()!r} is not in the key: is the sheet from "
                                 "another kit, or the ID mistyped?")
            if sheet_id in rows:
                raise ValueError(f"{name} row {line}: sheet {sheet_id} is answered again (first at row {rows[sheet_id]}); "
                                 "keep one answer per sheet")
            if not answer:
                raise ValueError(f"{name} row {line}: sheet {sheet_id} has no answer; write {' or '.join(allowed)}")
            if answer not in allowed:
                raise ValueError(f"{name} row {line}: answer {row[1].strip()!r} for sheet {sheet_id} is not "
                                 f"{' or '.join(allowed)}")
            answers[sheet_id] = answer
            rows[sheet_id] = line
    except csv.Error as err:
        raise ValueError(f"{name} row {reader.line_num}: not readable as CSV ({err})") from None
    except StopIteration:
        raise ValueError(f"{name}: empty; expected the header {','.join(ANSWER_HEADER)}") from None
    missing = [sheet_id for sheet_id in order if sheet_id not in answers]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise ValueError(f"{name}: no answer for {len(missing)} of the {len(order)} sheets ({shown}): answer every sheet")
    return answers


# -- statistics ------------------------------------------------------------------------------------------------------
def _rate(successes: int, n: int) -> tuple[float | None, list[float] | None]:
    """successes / n with its exact (Clopper-Pearson) 95 % interval; (None, None) when n = 0."""
    if n == 0:
        return None, None
    from scipy.stats import binomtest

    interval = binomtest(successes, n).proportion_ci(confidence_level=0.95, method="exact")
    return successes / n, [float(interval.low), float(interval.high)]


def _confusion(truths: Sequence[str], answers: Sequence[str], variant: str) -> dict[str, dict[str, int]]:
    table = {truth: {answer: 0 for answer in ANSWERS[variant]} for truth in TRUTHS[variant]}
    for truth, answer in zip(truths, answers, strict=True):
        table[truth][answer] += 1
    return table


def _real_vs_generated(confusion: Mapping[str, Mapping[str, int]], with_test: bool) -> dict[str, Any]:
    from scipy.stats import binomtest

    real, generated = confusion["real"], confusion["generated"]
    n = sum(real.values()) + sum(generated.values())
    correct = real["real"] + generated["generated"]
    accuracy, interval = _rate(correct, n)
    result: dict[str, Any] = {"n": n, "correct": correct, "accuracy": accuracy, "accuracy_ci95": interval}
    if with_test:
        if sum(real.values()) == sum(generated.values()):
            result["binomial_p_two_sided"] = float(binomtest(correct, n, 0.5).pvalue)
        else:
            # With unequal real and generated sheets, a rater who cannot tell them apart but leans to one answer is
            # right more (or less) often than half the time: "generated" on every one of 10 real and 30 generated
            # sheets scores 75 %, p = 0.002 against 0.5. Fisher's exact test of answer against truth has "cannot
            # tell" as its null whatever the rater leans to.
            from scipy.stats import fisher_exact

            table = [[real["real"], real["generated"]], [generated["real"], generated["generated"]]]
            result["fisher_p_two_sided"] = float(fisher_exact(table).pvalue)
    result["sensitivity_generated"], result["sensitivity_generated_ci95"] = _rate(
        generated["generated"], sum(generated.values()))
    result["specificity_real"], result["specificity_real_ci95"] = _rate(real["real"], sum(real.values()))
    return result


def _alignment(confusion: Mapping[str, Mapping[str, int]]) -> dict[str, Any]:
    own, other = confusion["own_report"], confusion["other_report"]
    result: dict[str, Any] = {"n": sum(own.values()) + sum(other.values()), "n_own_report": sum(own.values()),
                              "judged_match": own["match"], "n_controls": sum(other.values())}
    result["alignment_rate"], result["alignment_rate_ci95"] = _rate(own["match"], sum(own.values()))
    result["control_rejection_rate"], result["control_rejection_rate_ci95"] = _rate(
        other["no_match"], sum(other.values()))
    return result


def score_answers(key: Mapping[str, Any], answers: Mapping[str, Mapping[str, str]]) -> dict[str, Any]:
    """Per-rater and overall statistics from `answers` ({rater: {sheet_id: answer}}, each complete)."""
    variant = key["variant"]
    order = [sheet["sheet_id"] for sheet in key["sheets"]]
    truths = [sheet["truth"] for sheet in key["sheets"]]
    per_rater, pooled_answers, pooled_truths = [], [], []
    for rater, given in answers.items():
        row = [given[sheet_id] for sheet_id in order]
        confusion = _confusion(truths, row, variant)
        stats = _real_vs_generated(confusion, True) if variant == REAL_VS_GENERATED else _alignment(confusion)
        per_rater.append({"rater": rater, "confusion": confusion, **stats})
        pooled_answers += row
        pooled_truths += truths
    pooled_confusion = _confusion(pooled_truths, pooled_answers, variant)
    overall: dict[str, Any] = {"raters": len(per_rater), "pooled_confusion": pooled_confusion}
    if variant == REAL_VS_GENERATED:
        accuracies = [r["accuracy"] for r in per_rater]
        overall["mean_accuracy"] = sum(accuracies) / len(accuracies)
        overall["pooled"] = _real_vs_generated(pooled_confusion, False)
    else:
        overall["pooled"] = _alignment(pooled_confusion)
    if len(per_rater) >= 2:
        kappa = fleiss_kappa(category_counts([[answers[r][s] for s in order] for r in answers], ANSWERS[variant]))
        overall["fleiss_kappa"] = None if math.isnan(kappa) else kappa
        if math.isnan(kappa):
            overall["fleiss_kappa_note"] = "undefined: every rating is the same answer"
    else:
        overall["fleiss_kappa"] = None
        overall["fleiss_kappa_note"] = "needs at least two raters"
    return {"format": SCORE_FORMAT, "variant": variant, "sheets": len(order),
            "sheets_per_truth": {t: truths.count(t) for t in TRUTHS[variant]}, "raters": per_rater, "overall": overall}


# -- report ----------------------------------------------------------------------------------------------------------
def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def _ci(interval: Sequence[float] | None) -> str:
    return "n/a" if interval is None else f"{100 * interval[0]:.1f}-{100 * interval[1]:.1f} %"


def _p(value: float) -> str:
    return f"{value:.3g}" if value >= 1e-4 else "< 0.0001"


def render_markdown(report: Mapping[str, Any]) -> str:
    variant, overall = report["variant"], report["overall"]
    lines = [f"# Clinical Turing test: {variant}", "",
             f"{report['sheets']} sheets (" + ", ".join(f"{n} {t}" for t, n in report["sheets_per_truth"].items())
             + f"), {overall['raters']} rater(s). Key: {report.get('key', '')}", ""]
    answers, truths = ANSWERS[variant], TRUTHS[variant]
    shared = ", too narrow: raters rated the same sheets" if overall["raters"] > 1 else ""
    if variant == REAL_VS_GENERATED:
        counts = report["sheets_per_truth"]
        balanced = counts["real"] == counts["generated"]
        test = "binomial_p_two_sided" if balanced else "fisher_p_two_sided"
        test_name = "two-sided binomial vs 0.5" if balanced else "two-sided Fisher exact, answer vs truth"
        lines += [f"| rater | accuracy | 95 % CI (exact) | p ({test_name}) | sensitivity (generated) | specificity (real) |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['rater']} | {_pct(r['accuracy'])} ({r['correct']}/{r['n']}) | {_ci(r['accuracy_ci95'])} | "
                  f"{_p(r[test])} | {_pct(r['sensitivity_generated'])} | {_pct(r['specificity_real'])} |"
                  for r in report["raters"]]
        pooled = overall["pooled"]
        reading = ("Accuracy near 50 % means the raters could not tell generated ECGs from real ones." if balanced else
                   f"The kit holds {counts['real']} real and {counts['generated']} generated sheets, so a rater who "
                   "cannot tell them apart need not score 50 % (one answer on every sheet scores "
                   f"{_pct(counts['real'] / report['sheets'])} or {_pct(counts['generated'] / report['sheets'])}): "
                   "read Fisher's exact test, and sensitivity and specificity (their mean is near 50 % for a rater "
                   "who cannot tell).")
        lines += ["", f"Mean accuracy over raters: {_pct(overall['mean_accuracy'])}. Pooled over all ratings: "
                  f"{_pct(pooled['accuracy'])} ({pooled['correct']}/{pooled['n']}; interval "
                  f"{_ci(pooled['accuracy_ci95'])}{shared}). {reading}"]
    else:
        lines += ["| rater | alignment rate (own report judged match) | 95 % CI (exact) | controls judged no_match "
                  "| 95 % CI |", "|---|---|---|---|---|"]
        lines += [f"| {r['rater']} | {_pct(r['alignment_rate'])} ({r['judged_match']}/{r['n_own_report']}) | "
                  f"{_ci(r['alignment_rate_ci95'])} | {_pct(r['control_rejection_rate'])} (of {r['n_controls']}) | "
                  f"{_ci(r['control_rejection_rate_ci95'])} |" for r in report["raters"]]
        pooled = overall["pooled"]
        lines += ["", f"Pooled alignment rate over all ratings: {_pct(pooled['alignment_rate'])} "
                  f"({pooled['judged_match']}/{pooled['n_own_report']}; interval {_ci(pooled['alignment_rate_ci95'])}"
                  f"{shared})."]
    kappa = overall["fleiss_kappa"]
    lines += ["", "Agreement between raters, Fleiss' kappa: "
              + (f"{kappa:.3f}" if kappa is not None else f"n/a ({overall['fleiss_kappa_note']})"), "",
              "## Confusion matrices (rows: truth, columns: answer)", ""]
    for rater in report["raters"] + [{"rater": "all raters (pooled)", "confusion": overall["pooled_confusion"]}]:
        lines += [f"### {rater['rater']}", "", "| truth \\ answer | " + " | ".join(answers) + " |",
                  "|---|" + "---|" * len(answers)]
        lines += [f"| {t} | " + " | ".join(str(rater["confusion"][t][a]) for a in answers) + " |" for t in truths]
        lines.append("")
    return "\n".join(lines)


def score(key_path: str | os.PathLike, sheet_paths: Sequence[str | os.PathLike], out: str | os.PathLike, *,
          overwrite: bool = False) -> dict:
    """Read the key and every answer sheet (all checked first), score them, write OUT/report.json and report.md.

    `out` is claimed with `io.run_dir.output_dir` only once everything is scored (a bad sheet leaves nothing
    behind): the same key and sheets again leave a finished report as it is; other inputs (a corrected sheet, one
    more rater) or a user's folder are refused unless `overwrite`, which replaces the folder as a whole.
    """
    from diffusets_jax.io.run_dir import check_output_path, output_dir

    if not sheet_paths:
        raise ValueError("give at least one filled answer sheet")
    reads = [("--key", key_path), *(("sheet", path) for path in sheet_paths)]
    check_output_path(out, overwrite=overwrite, reads=reads)
    key = read_key(key_path)
    answers: dict[str, dict[str, str]] = {}
    files: dict[str, str] = {}
    for path in sheet_paths:
        rater = rater_name(path)
        if rater in files:  # the paths as given: two folders' answers_a.csv have the same name
            if files[rater] == str(Path(path).resolve()):
                raise ValueError(f"{path}: the same sheet is given twice; give each rater's sheet once")
            raise ValueError(f"{path}: rater {rater!r} is also {files[rater]}: name each rater's sheet "
                             f"{RATER_PREFIX}<name>.csv, one file per rater")
        answers[rater] = read_answers(path, key)
        files[rater] = str(Path(path).resolve())
    report = score_answers(key, answers)
    report["key"] = str(Path(key_path).resolve())
    for entry in report["raters"]:
        entry["file"] = files[entry["rater"]]
    # What the report is computed from, by content: a sheet edited after scoring is another run.
    settings = {"key": {"file": report["key"], "sha256": file_sha256(key_path)},
                "sheets": {rater: {"file": file, "sha256": file_sha256(file)} for rater, file in files.items()}}
    with output_dir(out, command="turing-score", settings=settings, overwrite=overwrite, reads=reads) as run:
        if not run.complete:
            write_json_atomic(run.path / REPORT_JSON, report)
            write_text_atomic(run.path / REPORT_MD, render_markdown(report))
            run.mark_complete(raters=len(answers))
    return report
