"""turing-score: statistics against hand-worked examples and independent scipy computations, one-line errors for
malformed or incomplete answer sheets, and the kit -> answers -> report path end to end."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
from scipy.stats import beta

from diffusets_jax.cli import main
from diffusets_jax.experiments.turing import KEY_FORMAT, KitOptions, build_kit
from diffusets_jax.experiments.turing_score import read_answers, read_key, score
from tests.helpers.turing_inputs import write_kit_inputs

REAL = [f"R{i}AAAA" for i in range(1, 6)]
GENERATED = [f"G{i}AAAA" for i in range(1, 6)]


def _key(tmp_path: Path, variant: str, truths: dict[str, str]) -> Path:
    answers = {"real-vs-generated": ["real", "generated"], "alignment": ["match", "no_match"]}[variant]
    key = {"format": KEY_FORMAT, "variant": variant, "answers": answers, "seed": 0,
           "sheets": [{"sheet_id": s, "position": i, "truth": t} for i, (s, t) in enumerate(truths.items(), 1)]}
    path = tmp_path / "key.json"
    path.write_text(json.dumps(key))
    return path


def _sheet(path: Path, answers: dict[str, str]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sheet_id", "answer"])
        writer.writerows(answers.items())
    return path


def _exact_ci(k: int, n: int) -> tuple[float, float]:
    """Clopper-Pearson from beta quantiles, independently of scipy's binomtest."""
    low = 0.0 if k == 0 else beta.ppf(0.025, k, n - k + 1)
    high = 1.0 if k == n else beta.ppf(0.975, k + 1, n - k)
    return low, high


@pytest.fixture
def real_vs_generated(tmp_path) -> tuple[Path, list[Path]]:
    key = _key(tmp_path, "real-vs-generated", {**{s: "real" for s in REAL}, **{s: "generated" for s in GENERATED}})
    a = {**{s: "real" for s in REAL[:4]}, REAL[4]: "generated", **{s: "generated" for s in GENERATED[:4]},
         GENERATED[4]: "real"}  # 8 of 10 right
    b = {s: "real" for s in REAL + GENERATED}  # calls everything real
    c = {**{s: "real" for s in REAL}, **{s: "generated" for s in GENERATED}}  # the key itself
    sheets = [_sheet(tmp_path / f"answers_{name}.csv", answers) for name, answers in (("a", a), ("b", b), ("c", c))]
    return key, sheets


def test_an_unbalanced_kit_is_not_tested_against_half(tmp_path):
    """10 real and 30 generated sheets (--n-real / --n-generated may differ): a rater answering "generated" to every
    sheet cannot tell them apart, yet scores 75 % and was reported at p = 0.002 against 0.5."""
    from scipy.stats import hypergeom

    real, generated = [f"R{i}AAAA" for i in range(10)], [f"G{i}AAAA" for i in range(30)]
    key = _key(tmp_path, "real-vs-generated", {**{s: "real" for s in real}, **{s: "generated" for s in generated}})
    lean = _sheet(tmp_path / "answers_lean.csv", {s: "generated" for s in real + generated})
    # 8 of 10 real and 27 of 30 generated right: answers and truth are far from independent.
    good = _sheet(tmp_path / "answers_good.csv", {**{s: "real" for s in real[:8]}, **{s: "generated" for s in real[8:]},
                                                  **{s: "generated" for s in generated[:27]},
                                                  **{s: "real" for s in generated[27:]}})
    report = score(key, [lean, good], tmp_path / "report")
    lean_row, good_row = report["raters"]
    assert lean_row["accuracy"] == 0.75 and "binomial_p_two_sided" not in lean_row
    assert lean_row["fisher_p_two_sided"] == pytest.approx(1.0)
    # Fisher's two-sided p by hand: the hypergeometric tables (11 answered real of 40, 10 real) at most as likely.
    table = hypergeom(40, 10, 11)
    p = sum(table.pmf(k) for k in range(0, 11) if table.pmf(k) <= table.pmf(8) * (1 + 1e-7))
    assert good_row["fisher_p_two_sided"] == pytest.approx(p)
    text = (tmp_path / "report" / "report.md").read_text()
    assert "Fisher exact" in text and "binomial vs 0.5" not in text and "need not score 50 %" in text


def test_real_vs_generated_statistics_by_hand(real_vs_generated, tmp_path):
    key, sheets = real_vs_generated
    report = score(key, sheets, tmp_path / "report")
    a, b, c = report["raters"]
    assert [r["rater"] for r in report["raters"]] == ["a", "b", "c"]
    assert a["confusion"] == {"real": {"real": 4, "generated": 1}, "generated": {"real": 1, "generated": 4}}
    assert a["accuracy"] == 0.8 and a["correct"] == 8 and a["n"] == 10
    # Two-sided exact binomial test of 8/10 against 0.5: P(X <= 2) + P(X >= 8) = 2 (1 + 10 + 45) / 1024.
    assert a["binomial_p_two_sided"] == pytest.approx(112 / 1024)
    assert a["accuracy_ci95"] == pytest.approx(_exact_ci(8, 10))
    assert a["sensitivity_generated"] == 0.8 and a["specificity_real"] == 0.8
    assert b["accuracy"] == 0.5 and b["binomial_p_two_sided"] == pytest.approx(1.0)
    assert b["sensitivity_generated"] == 0.0 and b["specificity_real"] == 1.0
    assert b["sensitivity_generated_ci95"] == pytest.approx(_exact_ci(0, 5))
    # A sheet equal to the key: accuracy 1, p = 2 / 2^10.
    assert c["accuracy"] == 1.0 and c["binomial_p_two_sided"] == pytest.approx(2 / 1024)
    assert c["confusion"] == {"real": {"real": 5, "generated": 0}, "generated": {"real": 0, "generated": 5}}
    overall = report["overall"]
    assert overall["mean_accuracy"] == pytest.approx((0.8 + 0.5 + 1.0) / 3)
    assert overall["pooled"]["correct"] == 23 and overall["pooled"]["n"] == 30
    assert "binomial_p_two_sided" not in overall["pooled"]  # pooled ratings are not independent trials
    # Fleiss' kappa by hand: P_i = 1 on R1-R4, 1/3 on the other six -> P_bar = 0.6; shares 2/3, 1/3 -> P_e = 5/9;
    # kappa = (0.6 - 5/9) / (4/9) = 0.1.
    assert overall["fleiss_kappa"] == pytest.approx(0.1)
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert saved["raters"][0]["accuracy"] == 0.8 and saved["key"] == str(key.resolve())
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| a | 80.0 % (8/10) |" in markdown and "Fleiss' kappa: 0.100" in markdown
    assert "| real | 4 | 1 |" in markdown


def test_alignment_statistics_by_hand(tmp_path):
    truths = {"OWN1AA": "own_report", "OWN2AA": "own_report", "OWN3AA": "own_report", "OWN4AA": "own_report",
              "OTH1AA": "other_report", "OTH2AA": "other_report"}
    key = _key(tmp_path, "alignment", truths)
    x = _sheet(tmp_path / "answers_x.csv", {"OWN1AA": "match", "OWN2AA": "Match", "OWN3AA": "match",
                                            "OWN4AA": "no_match", "OTH1AA": "No match", "OTH2AA": "match"})
    y = _sheet(tmp_path / "answers_y.csv", {"OWN1AA": "match", "OWN2AA": "match", "OWN3AA": "match",
                                            "OWN4AA": "match", "OTH1AA": "no-match", "OTH2AA": "no_match"})
    report = score(key, [x, y], tmp_path / "report")
    rx, ry = report["raters"]
    assert rx["alignment_rate"] == 0.75 and rx["judged_match"] == 3 and rx["n_own_report"] == 4
    assert rx["alignment_rate_ci95"] == pytest.approx(_exact_ci(3, 4))
    assert rx["control_rejection_rate"] == 0.5 and rx["n_controls"] == 2
    assert ry["alignment_rate"] == 1.0 and ry["control_rejection_rate"] == 1.0
    assert ry["alignment_rate_ci95"] == pytest.approx(_exact_ci(4, 4))
    pooled = report["overall"]["pooled"]
    assert pooled["alignment_rate"] == 7 / 8 and pooled["alignment_rate_ci95"] == pytest.approx(_exact_ci(7, 8))
    # By hand: P_i = 1, 1, 1, 0, 1, 0 -> P_bar = 2/3; shares 8/12, 4/12 -> P_e = 5/9; kappa = (1/9) / (4/9).
    assert report["overall"]["fleiss_kappa"] == pytest.approx(0.25)
    assert "75.0 % (3/4)" in (tmp_path / "report" / "report.md").read_text()


def test_one_rater_has_no_kappa_and_rater_names_come_from_file_names(real_vs_generated, tmp_path):
    key, sheets = real_vs_generated
    report = score(key, sheets[:1], tmp_path / "one")
    assert report["overall"]["fleiss_kappa"] is None and "two raters" in report["overall"]["fleiss_kappa_note"]
    copy = tmp_path / "elsewhere"
    copy.mkdir()
    clash = copy / "answers_a.csv"
    clash.write_bytes(sheets[0].read_bytes())
    with pytest.raises(ValueError) as clashed:
        score(key, [sheets[0], clash], tmp_path / "two")
    assert str(clashed.value).startswith(f"{clash}: rater 'a' is also {sheets[0].resolve()}: name each rater's sheet")
    with pytest.raises(ValueError, match="answers_a.csv: the same sheet is given twice"):
        score(key, [sheets[0], sheets[0]], tmp_path / "three")


def _error(tmp_path: Path, key: Path, content: str | bytes) -> str:
    path = tmp_path / "answers_bad.csv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError) as error:
        read_answers(path, read_key(key))
    message = str(error.value)
    assert "\n" not in message and message.startswith("answers_bad.csv")
    return message


def _complete(exclude: str = "", **override: str) -> str:
    rows = {**{s: "real" for s in REAL}, **{s: "generated" for s in GENERATED}, **override}
    return "sheet_id,answer\n" + "".join(f"{s},{a}\n" for s, a in rows.items() if s != exclude)


@pytest.mark.parametrize("content, message", [
    (_complete().replace("sheet_id,answer", "id,answer"), r"row 1: header is 'id,answer'; expected 'sheet_id,answer'"),
    (_complete() + "XXXXXX,real\n", r"row 12: sheet id 'XXXXXX' is not in the key"),
    (_complete() + f"{REAL[0]},generated\n", rf"row 12: sheet {REAL[0]} is answered again \(first at row 2\)"),
    (_complete(**{REAL[2]: "maybe"}), rf"row 4: answer 'maybe' for sheet {REAL[2]} is not real or generated"),
    (_complete(**{REAL[2]: "match"}), rf"row 4: answer 'match' for sheet {REAL[2]} is not real or generated"),
    (_complete(**{GENERATED[0]: ""}), rf"row 7: sheet {GENERATED[0]} has no answer; write real or generated"),
    (_complete(**{GENERATED[0]: "real,sure"}), r"row 7: 3 columns; expected 2"),
    (_complete(exclude=GENERATED[1]), rf"no answer for 1 of the 10 sheets \({GENERATED[1]}\): answer every sheet"),
    ("sheet_id,answer\n", r"no answer for 10 of the 10 sheets \(R1AAAA, R2AAAA, R3AAAA, R4AAAA, R5AAAA, \.\.\.\)"),
    ("", r"answers_bad.csv: empty"),
    (b"sheet_id,answer\n\xff\xfe,real\n", "not UTF-8 text"),
])
def test_malformed_or_incomplete_sheets_get_one_line_naming_file_and_row(real_vs_generated, tmp_path, content, message):
    key, _ = real_vs_generated
    assert re.search(message, _error(tmp_path, key, content))


def test_a_folder_given_as_key_or_sheet_is_named_a_folder(real_vs_generated, tmp_path):
    """The kit's folder as --key, or a folder of sheets as a sheet, was said not to exist."""
    key, _ = real_vs_generated
    with pytest.raises(ValueError, match="is a directory: give the key.json file that turing-kit wrote in it"):
        read_key(key.parent)
    with pytest.raises(ValueError, match="is a directory: give the raters' filled answers_<name>.csv files"):
        read_answers(tmp_path, read_key(key))


def test_spreadsheet_quirks_are_accepted(real_vs_generated, tmp_path):
    """Excel's byte-order mark, ';' separators, CRLF, blank rows, any row order, lower-case IDs, spaced answers."""
    key, _ = real_vs_generated
    rows = [f"{s.lower()}; Real " for s in reversed(REAL)] + ["", ";"] + [f"{s};GENERATED" for s in GENERATED]
    path = tmp_path / "answers_excel.csv"
    path.write_bytes(b"\xef\xbb\xbf" + ("Sheet_ID;Answer\r\n" + "\r\n".join(rows) + "\r\n").encode())
    answers = read_answers(path, read_key(key))
    assert answers == {**{s: "real" for s in REAL}, **{s: "generated" for s in GENERATED}}
    # Lines ended by a lone CR (an old Mac's, some exports'): csv stopped with "new-line character seen in
    # unquoted field - do you need to open the file in universal-newline mode?"
    path.write_bytes(("sheet_id,answer\r" + "\r".join(f"{s},real" for s in REAL)
                      + "\r" + "\r".join(f"{s},generated" for s in GENERATED) + "\r").encode())
    assert read_answers(path, read_key(key)) == answers
    # A spreadsheet saves every row as wide as its widest column: a note typed beside an answer and deleted
    # left "ID;real;" on every line, refused as "header is 'sheet_id,answer,'".
    path.write_bytes(("sheet_id;answer;;\r\n" + "".join(f"{s};real;;\r\n" for s in REAL)
                      + "".join(f"{s};generated; ;\r\n" for s in GENERATED)).encode())
    assert read_answers(path, read_key(key)) == answers


@pytest.mark.parametrize("content, error, message", [
    (None, FileNotFoundError, "does not exist: give the key.json"),
    ("{not json", ValueError, "not a key written by `diffusets-jax turing-kit`"),
    (json.dumps({"format": "other"}), ValueError, "not a key written by"),
    (json.dumps({"format": KEY_FORMAT, "variant": "alignment", "sheets": [{"sheet_id": "A", "truth": "real"}]}),
     ValueError, "its sheets are damaged"),
])
def test_bad_keys(tmp_path, content, error, message):
    path = tmp_path / "key.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(error, match=message):
        read_key(path)


def test_output_folder_policy(real_vs_generated, tmp_path):
    key, sheets = real_vs_generated
    out = tmp_path / "report"
    score(key, sheets, out)
    written = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir() if p.suffix in (".json", ".md")}
    score(key, sheets, out)  # the same inputs: the finished report is left as it is
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()
            if p.suffix in (".json", ".md")} == written
    with pytest.raises(ValueError, match="holds an earlier turing-score run with other settings.*--overwrite"):
        score(key, sheets[:2], out)  # another set of raters is another report
    assert len(json.loads((out / "report.json").read_text())["raters"]) == 3
    score(key, sheets[:2], out, overwrite=True)
    assert len(json.loads((out / "report.json").read_text())["raters"]) == 2
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "report.md").write_text("my notes")
    with pytest.raises(ValueError, match="is not empty and was not written by diffusets-jax turing-score"):
        score(key, sheets, busy)
    assert (busy / "report.md").read_text() == "my notes"
    assert [p.name for p in busy.iterdir() if not p.name.startswith(".diffusets-run")] == ["report.md"]
    # A bad sheet is found before anything is written.
    bad = _sheet(tmp_path / "answers_z.csv", {REAL[0]: "real"})
    with pytest.raises(ValueError, match="answers_z.csv: no answer for 9"):
        score(key, [*sheets, bad], tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_kit_answers_score_end_to_end(tmp_path, capsys):
    """Build a real kit, fill one sheet from the key and one all 'real', score them through the CLI."""
    inputs = write_kit_inputs(tmp_path)
    build_kit(tmp_path / "kit", KitOptions("real-vs-generated", n_real=3, n_generated=3, seed=2, dpi=30),
              generated=inputs["generated"], real=inputs["real"])
    key = json.loads((tmp_path / "kit" / "key.json").read_text())
    blank = (tmp_path / "kit" / "package" / "answer_sheet.csv").read_text().splitlines()
    truth = {s["sheet_id"]: s["truth"] for s in key["sheets"]}
    perfect = tmp_path / "answers_perfect.csv"
    perfect.write_text("\n".join([blank[0]] + [f"{row}{truth[row[:-1]]}" for row in blank[1:]]) + "\n")
    lazy = tmp_path / "answers_lazy.csv"
    lazy.write_text("\n".join([blank[0]] + [f"{row}real" for row in blank[1:]]) + "\n")
    code = main(["turing-score", str(perfect), str(lazy), "--key", str(tmp_path / "kit" / "key.json"),
                 "--out", str(tmp_path / "score")])
    assert code == 0 and "# Clinical Turing test: real-vs-generated" in capsys.readouterr().out
    report = json.loads((tmp_path / "score" / "report.json").read_text())
    perfect_report, lazy_report = report["raters"]
    assert perfect_report["rater"] == "perfect" and perfect_report["accuracy"] == 1.0
    assert lazy_report["accuracy"] == 0.5 and lazy_report["specificity_real"] == 1.0
    # A malformed sheet through the CLI: one line, exit 2.
    lazy.write_text(blank[0] + "\n")
    code = main(["turing-score", str(lazy), "--key", str(tmp_path / "kit" / "key.json"), "--out", str(tmp_path / "s2")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "answers_lazy.csv: no answer for 6 of the 6 sheets" in err
