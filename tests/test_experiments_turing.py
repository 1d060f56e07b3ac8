"""Turing-test kits: layout, blinding (every byte of the package scanned for the key), selection of real records
that did not condition a generated ECG, the alignment variant with mismatched controls, reruns and bad inputs."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusets_jax.cli import main
from diffusets_jax.experiments import turing
from diffusets_jax.experiments.turing import KitOptions, build_kit
from tests.helpers.turing_inputs import (
    decompressed_streams,
    ecg_like,
    outside_streams,
    pdf_page_texts,
    png_outside_image_data,
    shows,
    write_generated,
    write_kit_inputs,
)

DPI = 30  # small PNGs: these tests are about the package, not the drawing (tests/test_io_plot.py)
@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    return write_kit_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def kit(inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kits") / "kit"
    build_kit(out, KitOptions("real-vs-generated", n_real=5, n_generated=4, seed=11, dpi=DPI),
              generated=inputs["generated"], real=inputs["real"])
    return out


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _visible(folder: Path) -> list[str]:
    """What a user sees in `folder`: not the run record and lock of `io.run_dir`."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".diffusets-run"))


def test_layout_answer_sheet_and_key(kit, inputs):
    package = kit / "package"
    assert _visible(kit) == ["key.json", "package"]  # the key is outside the package
    assert json.loads((kit / ".diffusets-run.json").read_text())["status"] == "complete"
    key = json.loads((kit / "key.json").read_text())
    ids = [sheet["sheet_id"] for sheet in key["sheets"]]
    assert len(ids) == 9 and len(set(ids)) == 9 and all(re.fullmatch(r"[A-HJ-KM-NP-Z2-9]{6}", i) for i in ids)
    assert [s["position"] for s in key["sheets"]] == list(range(1, 10))
    assert sorted(s["truth"] for s in key["sheets"]) == ["generated"] * 4 + ["real"] * 5
    assert key["variant"] == "real-vs-generated" and key["answers"] == ["real", "generated"] and key["seed"] == 11
    assert key["counts"]["real_left_out_as_paired"] == 2 and key["counts"]["real_left_out_non_finite"] == 1
    real_sources = {s["source"]["index"] for s in key["sheets"] if s["truth"] == "real"}
    assert real_sources == {2, 3, 4, 6, 7}  # not 0, 1 (they conditioned generated ECGs) nor 5 (NaN)
    assert all(s["source"]["path"] == str(inputs["real"].resolve()) for s in key["sheets"] if s["truth"] == "real")
    generated = [s for s in key["sheets"] if s["truth"] == "generated"]
    with np.load(inputs["generated"]) as samples:  # the statements the sample writer stored, not a parsed prompt
        assert all(s["conditions"]["report"] == str(samples["report"][s["source"]["index"]]).split("|")
                   for s in generated)
    # Answer sheet: the header and one blank answer per sheet, in booklet (= key) order.
    with open(package / "answer_sheet.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [["sheet_id", "answer"]] + [[i, ""] for i in ids]
    assert sorted(p.name for p in (package / "sheets").iterdir()) == sorted(f"{i}.png" for i in ids)
    # The booklet: one page per sheet, in answer-sheet order, titled only by the sheet ID.
    pages = pdf_page_texts(package / "booklet.pdf")
    assert len(pages) == 9
    for page, sheet_id in zip(pages, ids, strict=True):
        title = [line for line in page.splitlines() if line.startswith("Sheet")]
        assert title == [f"Sheet {sheet_id}"]
    readme = (package / "README.txt").read_text()
    assert "9 sheets" in readme and "`real` or `generated`" in readme and "answers_<your name>.csv" in readme


def _key_strings(key: dict) -> set[str]:
    """What must never appear in the package: every source path, file name and digest, the truth labels
    of the alignment variant, and the seed."""
    strings = {str(key["seed"])}
    for sheet in key["sheets"]:
        for value in sheet["source"].values():
            if isinstance(value, str):
                strings |= {value, Path(value).name, Path(value).stem}
        if key["variant"] == "alignment":
            strings.add(sheet["truth"])
    return {s for s in strings if len(s) >= 4}


def find_leaks(package: Path, key: dict) -> list[str]:
    """Everything in `package` that could tell a rater a sheet's truth or source: [] for a blind package."""
    leaks = []
    forbidden = _key_strings(key) | {"key.json"}
    for path in _files(package):
        data = path.read_bytes()
        # What can be read in the file, not its compressed bytes (which hold any short string by chance): a PDF's
        # dictionaries, its streams decompressed and the text its pages show; a PNG's chunks but the pixels.
        if path.suffix == ".pdf":
            data = (outside_streams(data) + decompressed_streams(data)
                    + "\n".join(pdf_page_texts(path)).encode("latin-1"))
        elif path.suffix == ".png":
            data = png_outside_image_data(data)
        lowered = data.lower()
        leaks += [f"{path.name} contains {text!r}" for text in forbidden if text.lower().encode() in lowered]
        if path.suffix in (".png", ".pdf"):  # sheet files: not even the words
            leaks += [f"{path.name} contains {word!r}" for word in (b"real", b"generated", b"sample", b"synthetic",
                                                                    b"recorded from", b"model") if word in lowered]
        if path.suffix == ".csv" and set(data.decode().split()) != (
                {"sheet_id,answer"} | {f"{s['sheet_id']}," for s in key["sheets"]}):
            leaks.append(f"{path.name} holds more than the header, the IDs and blank answers")
    if {p.stem for p in (package / "sheets").iterdir()} != {s["sheet_id"] for s in key["sheets"]}:
        leaks.append("sheet file names are not exactly the IDs")
    sizes = set()
    for path in (package / "sheets").iterdir():
        with Image.open(path) as image:
            if image.text or image.info.get("exif") or "icc_profile" in image.info:
                leaks.append(f"{path.name} has metadata {sorted(image.info)}")
            sizes.add(image.size)
    if len(sizes) != 1:
        leaks.append(f"sheets of different sizes {sorted(sizes)}")
    if len({p.stat().st_size for p in (package / "sheets").iterdir()}) != 1:
        leaks.append("PNG files of different byte sizes")
    pdf = outside_streams((package / "booklet.pdf").read_bytes())
    leaks += [f"booklet.pdf has {field!r}" for field in (b"/CreationDate", b"/ModDate", b"/Producer", b"/Creator",
                                                         b"/Author", b"/Title", b"/ID") if field in pdf]
    if len({os.stat(p).st_mtime for p in [package, *package.rglob("*")]}) != 1:  # write order (real first?)
        leaks.append("files with different timestamps")
    return leaks


def test_no_sheet_id_reads_as_a_number_in_a_spreadsheet():
    """An ID such as 2345E9 was read by a spreadsheet as 2.345E+12 and saved so in the rater's answer sheet, which
    then named a sheet no key holds; digits around any letter of the alphabet must stay text."""
    digits = [c for c in turing.ID_ALPHABET if c.isdigit()]
    for letter in (c for c in turing.ID_ALPHABET if c.isalpha()):
        for candidate in (digits[0] * 4 + letter + digits[1], digits[0] + letter + digits[1] * 4):
            with pytest.raises(ValueError):
                float(candidate)
    ids = turing._draw_ids(np.random.default_rng(0), 500)
    assert len(set(ids)) == 500 and all(len(i) == turing.ID_LENGTH and set(i) <= set(turing.ID_ALPHABET) for i in ids)


def test_package_leaks_nothing(kit):
    key = json.loads((kit / "key.json").read_text())
    package = kit / "package"
    assert {p.suffix for p in _files(package)} == {".png", ".pdf", ".csv", ".txt"}
    assert find_leaks(package, key) == []
    pixels = []
    for path in sorted((package / "sheets").iterdir()):
        with Image.open(path) as image:
            pixels.append(np.asarray(image.convert("L"), np.int16))  # padded PNGs decode
        assert path.read_bytes()[-12:] == b"\x00\x00\x00\x00IEND\xaeB`\x82"  # and end well-formed
    assert min(np.abs(a - b).sum() for a, b in zip(pixels, pixels[1:], strict=False)) > 0  # each its own


def test_the_leak_scan_finds_planted_leaks(kit, tmp_path):
    """The scan can fail: each kind of leak planted in a copy of the package is reported."""
    import shutil

    from matplotlib.backends.backend_pdf import PdfPages

    from diffusets_jax.io.plot import plot_ecg, save_png

    key = json.loads((kit / "key.json").read_text())
    sheet_id = key["sheets"][0]["sheet_id"]
    source_stem = Path(next(s["source"]["path"] for s in key["sheets"] if s["truth"] == "real")).stem
    ecg = ecg_like(np.random.default_rng(0), 1)[0]

    def planted(plant) -> list[str]:
        copy = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(kit / "package", copy)
        when = os.stat(copy / "README.txt").st_mtime
        plant(copy)
        for path in [copy, *copy.rglob("*")]:
            if "mtime" not in plant.__name__:
                os.utime(path, (when, when))
        return find_leaks(copy, key)

    def title(copy):  # a booklet page naming the real NPZ the sheet came from, in the title
        with PdfPages(copy / "booklet.pdf", metadata={"Creator": None, "Producer": None, "CreationDate": None}) as pdf:
            pdf.savefig(plot_ecg(ecg, title=f"Sheet {sheet_id} from {source_stem}"))

    def png_text(copy):
        save_png(plot_ecg(ecg), copy / "sheets" / f"{sheet_id}.png", 30, metadata={"Software": None, "Comment": "x"})

    def pdf_date(copy):
        with PdfPages(copy / "booklet.pdf") as pdf:
            pdf.savefig(plot_ecg(ecg))

    def answer_column(copy):
        text = (copy / "answer_sheet.csv").read_text()
        (copy / "answer_sheet.csv").write_text(text.replace(f"{sheet_id},", f"{sheet_id},real"))

    def mtime(copy):
        os.utime(copy / "sheets" / f"{sheet_id}.png", (0, 0))

    assert planted(title) == [f"booklet.pdf contains {source_stem!r}", "booklet.pdf contains b'real'"]
    assert any("has metadata" in leak for leak in planted(png_text))
    assert any("different byte sizes" in leak for leak in planted(png_text))
    assert "booklet.pdf has b'/CreationDate'" in planted(pdf_date)
    assert any("holds more than the header" in leak for leak in planted(answer_column))
    assert planted(mtime) == ["files with different timestamps"]
    # And what the sheets do show is visible to the same reading: IDs and lead names.
    text = "\n".join(pdf_page_texts(kit / "package" / "booklet.pdf"))
    assert all(s["sheet_id"] in text for s in key["sheets"]) and "aVR" in text


def test_same_seed_same_package_bytes_and_rerun_is_a_no_op(kit, inputs, tmp_path):
    options = KitOptions("real-vs-generated", n_real=5, n_generated=4, seed=11, dpi=DPI)
    again = tmp_path / "again"
    build_kit(again, options, generated=inputs["generated"], real=inputs["real"])
    for a, b in zip(_files(kit / "package"), _files(again / "package"), strict=True):
        assert a.relative_to(kit) == b.relative_to(again) and a.read_bytes() == b.read_bytes()
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in _files(again)}
    summary = build_kit(again, options, generated=inputs["generated"], real=inputs["real"])
    assert summary["already_built"] is True and summary["sheets"] == 9
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in _files(again)} == before
    with pytest.raises(ValueError, match=r"holds an earlier turing-kit run with other settings \(seed: 11 -> 12\)"):
        build_kit(again, KitOptions("real-vs-generated", n_real=5, n_generated=4, seed=12, dpi=DPI),
                  generated=inputs["generated"], real=inputs["real"])
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in _files(again)} == before
    # Another seed reorders and renames everything.
    other = tmp_path / "other"
    build_kit(other, KitOptions("real-vs-generated", n_real=5, n_generated=4, seed=12, dpi=DPI),
              generated=inputs["generated"], real=inputs["real"])
    ids = lambda out: [s["sheet_id"] for s in json.loads((out / "key.json").read_text())["sheets"]]
    assert set(ids(other)).isdisjoint(ids(again))
    # Without --seed a fresh one is drawn and recorded.
    fresh = build_kit(tmp_path / "fresh", KitOptions("real-vs-generated", n_real=2, n_generated=2, dpi=DPI),
                      generated=inputs["generated"], real=inputs["real"])
    assert json.loads((tmp_path / "fresh" / "key.json").read_text())["seed"] == fresh["seed"] not in (11, 12)
    # The same command again (no --seed) is the kit the folder holds: it drew another seed and was refused as
    # another kit ("seed: A -> B"), where a finished kit is left as it is and an unfinished one finished.
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in _files(tmp_path / "fresh")}
    again = build_kit(tmp_path / "fresh", KitOptions("real-vs-generated", n_real=2, n_generated=2, dpi=DPI),
                      generated=inputs["generated"], real=inputs["real"])
    assert again["already_built"] is True and again["seed"] == fresh["seed"]
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in _files(tmp_path / "fresh")} == before
    with pytest.raises(ValueError, match=r"other settings \(n_real: 2 -> 3\)"):  # other settings: named, not the seed
        build_kit(tmp_path / "fresh", KitOptions("real-vs-generated", n_real=3, n_generated=2, dpi=DPI),
                  generated=inputs["generated"], real=inputs["real"])
    replaced = build_kit(tmp_path / "fresh", KitOptions("real-vs-generated", n_real=2, n_generated=2, dpi=DPI),
                         generated=inputs["generated"], real=inputs["real"], overwrite=True)
    assert replaced["already_built"] is False and replaced["seed"] != fresh["seed"]  # --overwrite: a fresh draw


def test_user_files_are_never_touched_unless_overwrite(inputs, tmp_path):
    options = KitOptions("real-vs-generated", n_real=2, n_generated=2, seed=1, dpi=DPI)
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty and was not written by diffusets-jax turing-kit"):
        build_kit(out, options, generated=inputs["generated"], real=inputs["real"])
    assert _visible(out) == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    build_kit(empty, options, generated=inputs["generated"], real=inputs["real"])
    assert _visible(empty) == ["key.json", "package"]
    # --overwrite replaces the user's folder as a whole, once the new kit is complete.
    summary = build_kit(out, options, generated=inputs["generated"], real=inputs["real"], overwrite=True)
    assert summary["already_built"] is False and _visible(out) == ["key.json", "package"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "empty"]  # no staging folder left behind


def test_a_half_built_kit_of_the_same_run_is_rebuilt_whole(inputs, tmp_path, monkeypatch):
    options = KitOptions("real-vs-generated", n_real=3, n_generated=3, seed=4, dpi=DPI)
    reference = tmp_path / "reference"
    build_kit(reference, options, generated=inputs["generated"], real=inputs["real"])

    def crash(*args, **kwargs):
        raise OSError("disk full")

    out = tmp_path / "kit"
    monkeypatch.setattr(turing, "_readme", crash)  # after the sheets, before the key
    with pytest.raises(OSError, match="disk full"):
        build_kit(out, options, generated=inputs["generated"], real=inputs["real"])
    assert not (out / "key.json").exists() and (out / "package" / "sheets").is_dir()
    monkeypatch.undo()
    summary = build_kit(out, options, generated=inputs["generated"], real=inputs["real"])
    assert summary["already_built"] is False
    assert [p.relative_to(out) for p in _files(out / "package")] == [
        p.relative_to(reference) for p in _files(reference / "package")]
    for a, b in zip(_files(out / "package"), _files(reference / "package"), strict=True):
        assert a.read_bytes() == b.read_bytes()


def test_alignment_kit_shows_reports_and_records_controls(inputs, tmp_path):
    out = tmp_path / "align"
    summary = build_kit(out, KitOptions("alignment", n_generated=4, controls=0.5, seed=3, dpi=DPI),
                        generated=inputs["generated"])
    assert summary["counts"]["own_report"] == 2 and summary["counts"]["other_report"] == 2
    key = json.loads((out / "key.json").read_text())
    assert key["answers"] == ["match", "no_match"]
    pages = pdf_page_texts(out / "package" / "booklet.pdf")
    for sheet, page in zip(key["sheets"], pages, strict=True):
        shown, own = sheet["shown"], sheet["conditions"]
        if sheet["truth"] == "own_report":
            assert shown["index"] == sheet["source"]["index"] and shown["report"] == own["report"]
        else:
            assert shown["index"] != sheet["source"]["index"] and shown["report"] != own["report"]
        # The sheet shows the shown report's statements and patient, whole, and its ID; nothing about the truth.
        sex = "M" if shown["sex"] else "F"
        assert f"Sheet {sheet['sheet_id']}   Sex {sex}   Age {shown['age']:g}   HR {shown['heart_rate']:.0f} bpm" in page
        assert shows(page, " | ".join(shown["report"]))
    # Donors come from generated ECGs outside the kit first: the 2 controls show the 2 ECGs not in the kit.
    in_kit = {s["source"]["index"] for s in key["sheets"]}
    assert {s["shown"]["index"] for s in key["sheets"] if s["truth"] == "other_report"} == set(range(6)) - in_kit
    forbidden = _key_strings(key)
    for path in _files(out / "package"):
        data = path.read_bytes()
        if path.suffix == ".pdf":
            data += decompressed_streams(data) + "\n".join(pdf_page_texts(path)).encode("latin-1")
        assert not any(s.encode() in data for s in forbidden), path.name
    readme = (out / "package" / "README.txt").read_text()
    assert "`match` or `no_match`" in readme and "generated" in readme  # raters know these ECGs are generated


def test_long_reports_make_every_alignment_sheet_equally_tall(tmp_path):
    rng = np.random.default_rng(0)
    long_report = "|".join(f"Long statement {i} about the conduction and repolarisation" for i in range(10))
    npz = write_generated(tmp_path / "gen", ["Sinus rhythm", long_report, "Sinus bradycardia"], ecg_like(rng, 3),
                          ["M", "F", "M"], [40, 50, 60], [70, 80, 55])
    build_kit(tmp_path / "kit", KitOptions("alignment", n_generated=3, seed=0, dpi=DPI), generated=npz)
    sizes = set()
    for path in (tmp_path / "kit" / "package" / "sheets").iterdir():
        with Image.open(path) as image:
            sizes.add(image.size)
    assert len(sizes) == 1
    pages = "\n".join(pdf_page_texts(tmp_path / "kit" / "package" / "booklet.pdf")).replace("\n", " ")
    assert long_report.replace("|", " | ") in pages  # uncut


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("variant, options, kwargs, error, message", [
    ("real-vs-generated", {"n_real": 2}, {}, ValueError, "give exactly one"),
    ("real-vs-generated", {"n_real": 2}, {"real": "R", "dataset": "D"}, ValueError, "give exactly one"),
    ("real-vs-generated", {"n_real": 0}, {"real": "R"}, ValueError, "--n-real >= 1"),
    ("alignment", {"n_real": 3}, {}, ValueError, "drop --n-real"),
    ("alignment", {}, {"real": "R"}, ValueError, "drop --dataset/--real"),
    ("alignment", {"controls": 1.0}, {}, ValueError, r"in \[0, 1\)"),
    ("real-vs-generated", {"n_real": 2, "controls": 0.2}, {"real": "R"}, ValueError, "alignment variant's share"),
    ("turing", {}, {}, ValueError, "variant must be one of"),
    ("alignment", {"dpi": 5}, {}, ValueError, "--dpi must be within"),
    ("real-vs-generated", {"n_real": 9}, {"real": "R"}, ValueError,
     r"9 real ECGs asked for but only 5 are usable \(8 read, 1 with non-finite samples, 2 whose conditions "
     r"generated one of the generated ECGs\): lower --n-real"),
    ("alignment", {"n_generated": 7}, {}, ValueError, "7 generated ECGs asked for but only 6 are usable.*--n-generated"),
    ("real-vs-generated", {"n_real": 2}, {"real": "G"}, ValueError, "are the same"),
    ("real-vs-generated", {"n_real": 2}, {"real": "missing.npz"}, FileNotFoundError, "--real .*does not exist"),
])
def test_bad_options_are_refused_before_any_drawing(inputs, tmp_path, variant, options, kwargs, error, message):
    names = {"R": inputs["real"], "G": inputs["generated"], "D": "some_dataset", "missing.npz": tmp_path / "missing.npz"}
    kwargs = {k: names[v] for k, v in kwargs.items()}
    with pytest.raises(error, match=message):
        build_kit(tmp_path / "out", KitOptions(variant, **{"n_generated": 2, "seed": 0, "dpi": DPI, **options}),
                  generated=inputs["generated"], **kwargs)
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == []


def test_what_sample_wrote_is_refused_as_real_ecgs(inputs, tmp_path):
    """Another sample run's samples.npz (or its folder) as --real built a kit whose key called generated ECGs real;
    as a `sample --corpus` folder already was, it is refused before anything is drawn."""
    other = write_generated(tmp_path / "other", ["Sinus rhythm", "Atrial fibrillation"], ecg_like(np.random.default_rng(1), 2),
                            ["M", "F"], [50, 60], [70, 110])
    for real in (other, other.parent):
        with pytest.raises(ValueError, match=rf"^--real {re.escape(str(real))}: generated ECGs \(`diffusets-jax "
                                             r"sample` wrote .*other\), but --real takes recorded ones"):
            build_kit(tmp_path / "out", KitOptions("real-vs-generated", n_real=1, n_generated=1, seed=0, dpi=DPI),
                      generated=inputs["generated"], real=real)
        assert not (tmp_path / "out").exists()


def test_the_key_names_each_generated_sheet_as_its_sample_run_does(tmp_path):
    """The key gave a sheet's row in samples.npz as its index, documented as the run's sample_NNNNN: a run that
    skipped a failed ECG holds fewer rows than it named, so from there on the row named the next sample."""
    ecgs = ecg_like(np.random.default_rng(3), 5)
    ecgs[1, 10, 0] = np.nan  # sample_00001 fails: samples.npz holds samples 0, 2, 3, 4 in rows 0..3
    reports = ["Sinus rhythm", "Atrial fibrillation", "Sinus bradycardia", "Sinus tachycardia", "Left axis deviation"]
    generated = write_generated(tmp_path / "gen", reports, ecgs, ["M", "F", "M", "F", "M"], [50, 60, 70, 40, 30],
                                [60, 110, 50, 120, 70])
    build_kit(tmp_path / "kit", KitOptions("alignment", n_generated=4, controls=0.5, seed=0, dpi=DPI),
              generated=generated)
    key = json.loads((tmp_path / "kit" / "key.json").read_text())
    for sheet in key["sheets"]:
        number = int(sheet["source"]["sample"].removeprefix("sample_"))
        assert sheet["conditions"]["report"] == [reports[number]] and sheet["source"]["index"] == [0, 2, 3, 4].index(number)
        assert sheet["shown"]["report"] == [reports[int(sheet["shown"]["sample"].removeprefix("sample_"))]]
    assert sorted(s["source"]["sample"] for s in key["sheets"]) == ["sample_00000", "sample_00002", "sample_00003",
                                                                      "sample_00004"]


def test_bad_inputs_get_one_line_and_real_conditions_are_optional(inputs, tmp_path):
    rng = np.random.default_rng(0)
    good = dict(ecg=ecg_like(rng, 2), report=np.array(["A", "B|C"]), sex=np.array([1, 0]),
                age=np.array([50.0, 60.0]), heart_rate=np.array([60.0, 70.0]))
    cases = [
        (_npz(tmp_path / "noreport.npz", **{k: v for k, v in good.items() if k != "report"}), True,
         r"--generated .*noreport.npz: does not store each ECG's report statements"),
        (_npz(tmp_path / "blank.npz", **{**good, "report": np.array(["", "B|C"])}), True,
         r"--generated .*blank.npz: ECG 0 does not say the report, sex, age and heart rate it was generated from"),
        (_npz(tmp_path / "leads.npz", **{**good, "ecg": good["ecg"][:, :, :11]}), True,
         r"leads.npz: 'ecg' has shape \(2, 1024, 11\); expected \(n, samples, 12\)"),
        (_npz(tmp_path / "ragged.npz", **{**good, "age": np.array([1.0])}), True, r"'age' has 1 entries for 2 ECGs"),
        (_npz(tmp_path / "sex.npz", **{**good, "sex": np.array([1, 2])}), False,
         r"sex.npz: 'sex'\[1\]: 2 is not a sex code"),  # refused when read (io.generated)
        (_npz(tmp_path / "age.npz", **{**good, "age": np.array([50.0, 300.0])}), True,
         r"--generated age.npz \[1\]: age is 300"),
    ]
    (tmp_path / "text.npz").write_text("not an npz")
    cases.append((tmp_path / "text.npz", True, "text.npz: not a readable .npz"))
    np.save(tmp_path / "single.npy", good["ecg"])
    cases.append((tmp_path / "single.npy", False, "--real .*single.npy: not an .npz, a folder of WFDB records"))
    for path, generated, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            turing.load_ecgs(path, generated=generated)
        assert "\n" not in str(error.value)
    # Real ECGs may come without conditions, or with some unknown (NaN, sex -1): those are not paired.
    assert turing.load_ecgs(_npz(tmp_path / "ecg_only.npz", ecg=good["ecg"]), generated=False).conditions == [None,
                                                                                                              None]
    partial = turing.load_ecgs(_npz(tmp_path / "partial.npz", **{**good, "age": np.array([np.nan, 60.0])}),
                               generated=False)
    assert partial.conditions == [None, {"report": ["B", "C"], "sex": 0, "age": 60.0, "heart_rate": 70.0}]
    prompt_only = {k: v for k, v in good.items() if k != "report"} | {"prompt": np.array(["A", "B"])}
    with pytest.raises(ValueError, match="does not store each ECG's report statements"):
        turing.load_ecgs(_npz(tmp_path / "prompt.npz", **prompt_only), generated=True)
    assert turing.load_ecgs(tmp_path / "prompt.npz", generated=False).conditions == [None, None]  # never paired
    # sample's WFDB headers hold the prompt, not the statements: a kit cannot pair such generated ECGs.
    from diffusets_jax.io.wfdb_out import write_records

    write_records(tmp_path / "wfdb", good["ecg"], ["a", "b"],
                  [{"prompt": "Sinus rhythm", "sex": "M", "age": 50, "heart_rate": 60}] * 2)
    with pytest.raises(ValueError, match=r"--generated .*wfdb: does not store each ECG's report statements"):
        turing.load_ecgs(tmp_path / "wfdb", generated=True)
    wfdb_real = turing.load_ecgs(tmp_path / "wfdb", generated=False)
    assert wfdb_real.conditions == [None, None] and len(wfdb_real.source["sha256"]) == 64  # a folder: its files
    resampled = turing.load_ecgs(_npz(tmp_path / "long.npz", **{**good, "ecg": np.zeros((2, 5000, 12))}),
                                 generated=True)
    assert resampled.ecg.shape == (2, 1024, 12)  # any length, on the sheets' one time base


def test_cli_turing_kit_end_to_end_and_bad_input(inputs, tmp_path, capsys):
    out = tmp_path / "cli_kit"
    code = main(["turing-kit", "--variant", "real-vs-generated", "--generated", str(inputs["generated"]), "--real",
                 str(inputs["real"]), "--n-real", "3", "--n-generated", "3", "--seed", "5", "--dpi", str(DPI),
                 "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0 and json.loads(captured.out)["sheets"] == 6 and "keep" in captured.err
    assert (out / "key.json").is_file() and len(list((out / "package" / "sheets").iterdir())) == 6
    # The paper's 50 real sheets by default: too many for these inputs, said in one line, exit 2.
    code = main(["turing-kit", "--variant", "real-vs-generated", "--generated", str(inputs["generated"]), "--real",
                 str(inputs["real"]), "--n-generated", "3", "--out", str(tmp_path / "other")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "50 real ECGs asked for but only 5 are usable" in err
    assert not (tmp_path / "other").exists()  # refused before the folder was claimed
    # Another kit into the same folder is refused (its raters' answers need its key) unless --overwrite.
    again = ["turing-kit", "--variant", "real-vs-generated", "--generated", str(inputs["generated"]), "--real",
             str(inputs["real"]), "--n-real", "3", "--n-generated", "3", "--seed", "6", "--dpi", str(DPI),
             "--out", str(out)]
    assert main(again) == 2 and "--overwrite" in capsys.readouterr().err
    assert main([*again, "--overwrite"]) == 0 and json.loads(capsys.readouterr().out)["seed"] == 6


def test_cli_turing_kit_refuses_dataset_flags_without_a_dataset(inputs, tmp_path, capsys):
    """`--real R --split validation --limit 100` (or the alignment variant with them) built the kit from all of R
    with exit 0: the flags that choose a --dataset's ECGs were ignored."""
    base = ["--generated", str(inputs["generated"]), "--n-generated", "3", "--seed", "5", "--dpi", str(DPI),
            "--out", str(tmp_path / "kit")]
    for variant, flags, named in (
            (["real-vs-generated", "--real", str(inputs["real"]), "--n-real", "3"], ["--split", "validation"],
             "--split selects"),
            (["real-vs-generated", "--real", str(inputs["real"]), "--n-real", "3"],
             ["--limit", "100", "--data-dir", str(tmp_path)], "--data-dir, --limit select"),
            (["alignment"], ["--split", "train"], "the alignment variant shows generated ECGs only: drop --split")):
        code = main(["turing-kit", "--variant", *variant, *base, *flags])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and named in err, err
        assert variant == ["alignment"] or "the real ECGs of --dataset" in err, err
    assert not (tmp_path / "kit").exists()


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> str:
    from tests.helpers import tiny_ecg_dataset

    return str(tiny_ecg_dataset.build(str(tmp_path_factory.mktemp("tfds"))).data_dir)


def test_a_dataset_split_is_held_only_where_a_sheet_needs_it(tiny_dataset):
    """A kit shows a few real ECGs of a split that may hold 80,000 (4 GB for MIMIC-IV-ECG's test split): the split
    is read for its conditions and which ECGs are usable, then only the chosen ECGs are read."""
    from diffusets_jax.experiments.evaluate import load_split
    from diffusets_jax.experiments.turing import SplitRows, load_dataset_split

    full = load_split(tiny_dataset, "test")
    real = load_dataset_split(tiny_dataset, "test")
    assert isinstance(real.ecg, SplitRows) and len(real.ecg) == len(full["ecg"]) == 11
    assert real.ecg.finite.tolist() == [True] * 11 and not real.ecg._rows
    assert [c["report"] for c in real.conditions] == [list(lines) for lines in full["report_lines"]]
    real.ecg.read([7, 2, 9, 2])
    assert sorted(real.ecg._rows) == [2, 7, 9]  # the chosen rows, nothing else
    for row in (2, 7, 9):
        np.testing.assert_array_equal(real.ecg[row], full["ecg"][row])
    with pytest.raises(KeyError):
        real.ecg[0]


def test_a_kits_real_ecgs_and_conditions_come_from_one_build(tiny_dataset, inputs, tmp_path, monkeypatch):
    """The split's conditions are read first and the chosen ECGs later: a `prepare --overwrite` in between would
    pair one build's conditions with another's ECGs. The dataset is held as read across both reads."""
    from diffusets_jax.experiments import turing
    from diffusets_jax.io.run_dir import READERS_LOCK, add_readers_lock, exclusive_lock

    add_readers_lock(tiny_dataset)  # as `prepare` leaves it
    replaced = []
    read_rows = turing.SplitRows.read

    def read_after_a_replacement_tried(self, rows):
        try:  # what `prepare --overwrite` takes before it moves the folder
            with exclusive_lock(tiny_dataset, "busy", name=READERS_LOCK):
                replaced.append(True)
        except ValueError:
            replaced.append(False)
        return read_rows(self, rows)

    monkeypatch.setattr(turing.SplitRows, "read", read_after_a_replacement_tried)
    from diffusets_jax.experiments import evaluate

    opened, open_dataset = [], evaluate.ecg_dataset  # opened once, held and read (it was twice); a builder passes
    monkeypatch.setattr(evaluate, "ecg_dataset", lambda dataset, *a, **k: (
        opened.append(dataset) if isinstance(dataset, str | os.PathLike) else None) or open_dataset(dataset, *a, **k))
    build_kit(tmp_path / "kit", KitOptions("real-vs-generated", n_real=3, n_generated=2, seed=0, dpi=DPI),
              generated=inputs["generated"], dataset=tiny_dataset, split="test")
    assert replaced == [False] and len(opened) == 1
    with exclusive_lock(tiny_dataset, "busy", name=READERS_LOCK):  # released once the kit's inputs are read
        pass


def test_recorded_and_generated_datasets_are_told_apart_by_their_cards(tiny_dataset, inputs, tmp_path):
    """Both kinds share one schema: a corpus as the real source, or a prepared dataset as the generated one, used to
    build a kit whose key called generated ECGs real (or the reverse)."""
    from tests.helpers.dataset_kind import as_corpus

    corpus = as_corpus(tiny_dataset, tmp_path / "corpus")
    options = KitOptions("real-vs-generated", n_real=2, n_generated=2, seed=0, dpi=DPI)
    cases = [
        (dict(generated=inputs["generated"], dataset=corpus), r"--dataset .*corpus is a corpus of generated ECGs "
         r"\(`sample --corpus` wrote it\), but --dataset takes recorded ECGs: give a dataset `diffusets-jax prepare` wrote"),
        (dict(generated=inputs["generated"], real=corpus), "--real .*corpus is a corpus of generated ECGs"),
        (dict(generated=tiny_dataset, real=inputs["real"]), r"--generated .* is a prepared dataset of recorded ECGs, but "
         r"--generated takes generated ECGs: give what `diffusets-jax sample` wrote"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            build_kit(tmp_path / "kit", options, **kwargs)
        assert not (tmp_path / "kit").exists()
    with pytest.raises(ValueError, match="--generated .* is a prepared dataset"):
        build_kit(tmp_path / "kit", KitOptions("alignment", n_generated=2, seed=0, dpi=DPI), generated=tiny_dataset)


@pytest.mark.slow  # builds a TFDS dataset and a tiny model, and generates with it
def test_a_conditions_file_under_a_file_is_refused_before_the_split_is_read(tmp_path):
    """The folder was made only once the split's conditions were read (minutes for MIMIC-IV-ECG), then failed as
    "afile: File exists"; the dataset here does not exist, so only a check made first can answer."""
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(NotADirectoryError, match=r"--out .*afile/c.csv: .*afile is a file, not a directory"):
        turing.write_split_conditions(tmp_path / "afile" / "c.csv", tmp_path / "no_dataset", "test", 2, seed=0)
    assert (tmp_path / "afile").read_text() == "mine"


def test_records_whose_statements_sample_would_refuse_are_not_drawn(tmp_path, monkeypatch):
    """A statement with the prompt's braces was written to the conditions file, which `sample --conditions` then
    refused (a built prompt is not a report): the paper's protocol stopped at its second step."""
    from diffusets_jax.conditioning.requests import read_conditions
    from diffusets_jax.experiments import evaluate

    reports = [["Sinus rhythm", "ST elevation {V1-V2}"], ["Sinus rhythm|Normal ECG"], ["Atrial fibrillation"]]
    columns = {"report_lines": [np.array(r) for r in reports], "sex": np.array([1, 0, 1]),
               "age": np.array([50.0, 60.0, 70.0], np.float32), "heart_rate": np.array([60.0, 70.0, 110.0], np.float32)}
    monkeypatch.setattr(evaluate, "load_split", lambda *a, **k: columns)
    summary = turing.write_split_conditions(tmp_path / "c.csv", "any", "test", 1, seed=0)
    assert summary["left_out_without_report"] == 2
    assert [c.report for c in read_conditions(tmp_path / "c.csv")] == [("Atrial fibrillation",)]
    with pytest.raises(ValueError, match=r"2 records asked for but only 1 are usable \(2 of 3 have no report or a "
                                         r"'\|', '\{' or '\}' in one\)"):
        turing.write_split_conditions(tmp_path / "d.csv", "any", "test", 2, seed=0)


def test_paper_protocol_end_to_end_conditions_sample_kit_score(tiny_dataset, tmp_path, capsys, monkeypatch):
    """The paper's protocol through the CLI: draw the conditions of some records of a split, generate from them
    with `sample`, build a kit whose real half is the split's other records, and score filled answer sheets."""
    from diffusets_jax.conditioning.requests import read_conditions
    from tests.helpers import tiny_ecg_dataset
    from tests.helpers.fake_openai_server import FakeOpenAIServer
    from tests.helpers.tiny_models import TEXT_DIM, tiny_model_dir

    conditions_csv = tmp_path / "conditions.csv"
    code = main(["turing-conditions", "--dataset", tiny_dataset, "--split", "test", "-n", "4", "--seed", "3",
                 "--out", str(conditions_csv)])
    assert code == 0 and json.loads(capsys.readouterr().out)["records"] == 4
    conditions = read_conditions(conditions_csv)
    drawn = {int(c.report[1].split()[-1]) for c in conditions}  # test examples are "record 2000".."record 2010"
    assert len(drawn) == 4 and drawn <= set(range(2000, 2011))
    for c in conditions:  # the exact stored values, so the kit recognises them
        source = tiny_ecg_dataset.example(int(c.report[1].split()[-1]))
        assert (c.sex, c.age, c.heart_rate) == (source["sex"], source["age"], pytest.approx(source["heart_rate"]))
    model_dir = tiny_model_dir(tmp_path / "model")
    with FakeOpenAIServer(dim=TEXT_DIM) as server:  # the tiny model's embedder
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        # The tiny model's chain that other tests compile too (ddim, 2 steps, batch 8): the session's cache serves it.
        assert main(["sample", "--model-dir", str(model_dir), "--conditions", str(conditions_csv), "--out",
                     str(tmp_path / "gen"), "--sampler", "ddim", "--steps", "2", "--batch-size", "8",
                     "--formats", "npz"]) == 0
    capsys.readouterr()
    out = tmp_path / "kit"
    assert main(["turing-kit", "--variant", "real-vs-generated", "--generated", str(tmp_path / "gen" / "samples.npz"),
                 "--dataset", tiny_dataset, "--split", "test", "--n-real", "7", "--n-generated", "4", "--seed", "0",
                 "--dpi", str(DPI), "--out", str(out)]) == 0
    key = json.loads((out / "key.json").read_text())
    shown_real = {int(s["conditions"]["report"][1].split()[-1]) for s in key["sheets"] if s["truth"] == "real"}
    assert shown_real == set(range(2000, 2011)) - drawn  # every other record, none of the drawn ones
    assert key["counts"]["real_left_out_as_paired"] == 4
    assert all(s["source"]["split"] == "test" for s in key["sheets"] if s["truth"] == "real")
    assert find_leaks(out / "package", key) == []
    # One rater right on every sheet, one calling everything real: scored against the key.
    blank = (out / "package" / "answer_sheet.csv").read_text().splitlines()
    truth = {s["sheet_id"]: s["truth"] for s in key["sheets"]}
    (tmp_path / "answers_right.csv").write_text("\n".join([blank[0]] + [f"{r}{truth[r[:-1]]}" for r in blank[1:]]))
    (tmp_path / "answers_real.csv").write_text("\n".join([blank[0]] + [f"{r}real" for r in blank[1:]]))
    capsys.readouterr()
    assert main(["turing-score", str(tmp_path / "answers_right.csv"), str(tmp_path / "answers_real.csv"), "--key",
                 str(out / "key.json"), "--out", str(tmp_path / "score")]) == 0
    report = json.loads((tmp_path / "score" / "report.json").read_text())
    assert [(r["rater"], r["correct"], r["n"]) for r in report["raters"]] == [("right", 11, 11), ("real", 7, 11)]
    with pytest.raises(ValueError, match=r"8 real ECGs asked for but only 7 are usable \(11 read, 0 with non-finite "
                                         r"samples, 4 whose conditions generated"):
        build_kit(tmp_path / "kit2", KitOptions("real-vs-generated", n_real=8, n_generated=4, seed=0, dpi=DPI),
                  generated=tmp_path / "gen" / "samples.npz", dataset=tiny_dataset, split="test")
    # The conditions file is never overwritten; impossible counts and bad names are refused.
    code = main(["turing-conditions", "--dataset", tiny_dataset, "--split", "test", "-n", "2", "--seed", "0",
                 "--out", str(conditions_csv)])
    assert code == 2 and "already exists" in capsys.readouterr().err
    with pytest.raises(ValueError, match="12 records asked for but only 11 are usable"):
        turing.write_split_conditions(tmp_path / "c.csv", tiny_dataset, "test", 12, seed=0)
    with pytest.raises(ValueError, match="must end in .csv"):
        turing.write_split_conditions(tmp_path / "c.txt", tiny_dataset, "test", 2, seed=0)
    with pytest.raises(ValueError, match="has no split 'tset'"):
        turing.write_split_conditions(tmp_path / "c.csv", tiny_dataset, "tset", 2, seed=0)
