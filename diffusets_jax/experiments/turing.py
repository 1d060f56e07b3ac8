"""Clinical Turing-test kits: blinded packages of 12-lead sheets for cardiologists, the key kept apart.

The paper's two tests, as `diffusets-jax turing-kit --variant`:

- `real-vs-generated`: real ECGs (a prepared dataset split, or an NPZ with an `ecg` array) and ECGs generated
  from the conditions of *other* real records (a `samples.npz` of `diffusets-jax sample`), shuffled together.
  Raters mark each sheet `real` or `generated`. Real records whose conditions (report, sex, age, heart rate)
  produced one of the generated ECGs are left out, so no sheet pairs with another; `turing-conditions` writes
  the conditions of randomly chosen records of a split for `sample --conditions`.
- `alignment`: generated ECGs, each sheet showing the report and patient information it was generated from.
  Raters mark each `match` or `no_match`. Optionally a share of the sheets shows the conditions of another
  generated ECG instead (mismatched controls, which measure whether raters notice a wrong report).

OUT/ after a run:

    package/            what raters receive, and nothing else
        README.txt          the task
        booklet.pdf         one sheet per page, in answer-sheet order
        sheets/ID.png       the same sheets as PNGs
        answer_sheet.csv    `sheet_id,answer`, one row per sheet in booklet order, answers blank
    key.json            the truth per sheet ID; never send it to raters
    .diffusets-run.json the run record of `io.run_dir.output_dir` (settings and their fingerprint)

Each sheet of the key records its ID, booklet position, truth, source (the input path and its SHA-256, or the
dataset split, and the index of the ECG there as `io.generated.read_generated` or `experiments.evaluate.load_split`
reads it: its row; for what a `sample` run wrote, `sample` also names it, `sample_NNNNN` in that run's manifest, WFDB
records and PNGs, which is not the row when the run skipped a failed ECG) and the conditions the ECG came with
(report statements, sex, age, heart rate); alignment sheets also record what they show (`shown`).

Blinding: sheet IDs are random 6-character codes; the booklet order is a random permutation; every sheet is
drawn by the same code (`io.plot.plot_ecg`) at the same size, dpi and title style, titled only "Sheet ID" (plus
the shown report and patient information in the alignment variant); PNGs carry no text chunks and the PDF no
creator, producer or date; PNGs are padded to one byte size (a noisier trace compresses worse); every file of
the package gets the same timestamp, so write order reveals nothing.
Only ECGs of exactly (1024, 12) finite samples are used, so every sheet has the same time base and no gaps.
The random seed is recorded only outside the package (in the key and OUT's run record): by default a fresh one,
since raters who know the seed and the inputs could rebuild the key.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import io
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffusets_jax.conditioning.patient import parse_age, parse_heart_rate, parse_sex
from diffusets_jax.conditioning.prompts import LINE_SEPARATOR, report_lines
from diffusets_jax.ecg.shapes import ECG_LENGTH, NUM_LEADS
from diffusets_jax.ecg.units import finite_ecgs
from diffusets_jax.io.files import (
    read_json,
    write_bytes_atomic,
    write_json_atomic,
    write_new_text,
    write_text_atomic,
)

REAL_VS_GENERATED = "real-vs-generated"
ALIGNMENT = "alignment"
VARIANTS = (REAL_VS_GENERATED, ALIGNMENT)
# What raters may answer, and the truth the key records, per variant.
ANSWERS = {REAL_VS_GENERATED: ("real", "generated"), ALIGNMENT: ("match", "no_match")}
TRUTHS = {REAL_VS_GENERATED: ("real", "generated"), ALIGNMENT: ("own_report", "other_report")}

# The paper's sheet counts (n_real, n_generated): 50 real + 50 generated; 100 generated with their reports.
PAPER_COUNTS = {REAL_VS_GENERATED: (50, 50), ALIGNMENT: (0, 100)}

KEY_FORMAT = "diffusets-jax turing key 1"
PACKAGE_DIR = "package"
KEY_FILE = "key.json"
SHEETS_DIR = "sheets"
BOOKLET = "booklet.pdf"
ANSWER_SHEET = "answer_sheet.csv"
README = "README.txt"
ANSWER_HEADER = ("sheet_id", "answer")

# No 0/O, 1/I/L: IDs are copied by hand. No E: a spreadsheet reads an ID such as 2345E9 as a number and saves the
# rater's answer sheet with 2.345E+12 in its place, an ID no key holds.
ID_ALPHABET = "ABCDFGHJKMNPQRSTUVWXYZ23456789"
ID_LENGTH = 6
PNG_METADATA = {"Software": None}  # no text chunks at all
PDF_METADATA = {"Creator": None, "Producer": None, "CreationDate": None}  # an empty info dictionary
class SplitRows:
    """The ECGs of a prepared split, held only where a sheet needs them: indexed by the split's row like an
    `(n, 1024, 12)` array once `read` has fetched the chosen rows. A kit shows 50 real ECGs of a split that may
    hold 80,000 (4 GB for MIMIC-IV-ECG's test split); which ones are usable comes from a first pass that keeps
    no ECG (`finite`), the chosen ones from a second."""

    def __init__(self, builder: Any, split: str, limit: int | None, finite: np.ndarray):
        self.builder, self.split, self.limit, self.finite = builder, split, limit, finite
        self._rows: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.finite)

    def read(self, rows: Sequence[int]) -> None:
        """Fetch `rows`' ECGs in one pass over the split."""
        from diffusets_jax.experiments.evaluate import load_split

        rows = sorted(set(map(int, rows)))
        ecg = load_split(self.builder, self.split, limit=self.limit, ecg_rows=rows)["ecg"]
        self._rows = dict(zip(rows, ecg.astype(np.float32), strict=True))

    def __getitem__(self, row: int) -> np.ndarray:
        return self._rows[int(row)]


@dataclasses.dataclass(frozen=True)
class EcgSet:
    """ECGs `(n, 1024, 12)` mV with, per ECG, the conditions it was recorded or generated with (None if unknown)."""

    ecg: np.ndarray | SplitRows
    conditions: list[dict[str, Any] | None]
    source: dict[str, Any]  # where they came from, for the key (and each sheet's source adds its index)
    names: list[str] | None = None  # a sample run's: each ECG's sample_NNNNN (manifest, WFDB record, PNG)


# -- inputs ----------------------------------------------------------------------------------------------------------
def _condition(report: Sequence[str], sex: Any, age: Any, heart_rate: Any, *, where: str) -> dict[str, Any]:
    """One ECG's conditions, the patient values validated like every other condition (errors name `where`)."""
    try:
        patient = {"sex": parse_sex(sex), "age": parse_age(age), "heart_rate": parse_heart_rate(heart_rate)}
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    return {"report": list(report), **patient}


def _check_ecg_shape(shape: tuple[int, ...], where: str) -> None:
    """`shape` (n, 1024, 12) with n >= 1, or one line saying what was expected."""
    if len(shape) != 3 or tuple(shape[1:]) != (ECG_LENGTH, NUM_LEADS) or shape[0] == 0:
        raise ValueError(f"{where}: ecg has shape {tuple(shape)}; expected (n, {ECG_LENGTH}, {NUM_LEADS}) ECGs in mV, "
                         "standard lead order, 102.4 Hz, as `diffusets-jax sample` writes them")


def _check_ecg_array(ecg: np.ndarray, where: str) -> np.ndarray:
    _check_ecg_shape(ecg.shape, where)
    return ecg.astype(np.float32)


def load_ecgs(path: str | os.PathLike, *, generated: bool) -> EcgSet:
    """ECGs and their conditions as `io.generated.read_generated` reads them, on the 1024-sample time base.

    Generated ECGs: the `samples.npz` of `diffusets-jax sample` (or any NPZ with `ecg`, `report` ('|'-joined
    statements), `sex`, `age`, `heart_rate`), or a `sample --corpus` folder; each ECG must say the statements and
    patient it was generated from, since the kit pairs them with real records and the alignment variant shows
    them. Real ECGs: the same, an NPZ with only `ecg`, or a folder of WFDB records; conditions are optional (a
    record whose conditions are unknown, or not given as statements, is never paired).
    """
    from diffusets_jax.io.generated import read_generated, source_fingerprint

    flag = "--generated" if generated else "--real"
    if not generated:
        _refuse_sample_output(Path(path), flag)
    read = read_generated(path, flag, kind="corpus" if generated else "prepared")
    path = Path(path)
    statements = read.statements
    if generated and not statements:
        raise ValueError(f"{flag} {path}: does not store each ECG's report statements (a WFDB header or a 'prompt' "
                         "array holds the prompt only): give the folder or samples.npz that `diffusets-jax sample` "
                         "wrote")
    conditions: list[dict[str, Any] | None] = []
    for i, report in enumerate(read.reports):
        sex, age, heart_rate = int(read.sex[i]), float(read.age[i]), float(read.heart_rate[i])
        # read_generated marks what the input does not say as sex -1 / NaN; anything else is a value to validate.
        if not statements or not report or sex == -1 or not np.isfinite(age) or not np.isfinite(heart_rate):
            if generated:
                raise ValueError(f"{flag} {path}: ECG {i} does not say the report, sex, age and heart rate it was "
                                 "generated from; give the samples.npz that `diffusets-jax sample` wrote")
            conditions.append(None)
            continue
        conditions.append(_condition(report, sex, age, heart_rate, where=f"{flag} {path.name} [{i}]"))
    source = {"path": str(path.resolve()), "sha256": source_fingerprint(path)}
    return EcgSet(_check_ecg_array(read.ecg, f"{flag} {path.name}"), conditions, source,
                  _sample_names(path, len(conditions)))


def _sample_names(path: Path, count: int) -> list[str] | None:
    """The sample_NNNNN name of each ECG a `sample` run's NPZ (or folder) holds, in the order they are read, from
    the NPZ's `position` array; None for other inputs. A run that skipped a failed ECG holds fewer rows than it
    named samples, so a row is not its name: sheet 3 may be sample_00004."""
    from diffusets_jax.io.generated import _sample_npz_files

    files = [path] if path.is_file() and path.suffix.lower() == ".npz" else (
        _sample_npz_files(path) if path.is_dir() else None)
    positions = []
    for file in files or []:
        with np.load(file, allow_pickle=False) as data:
            if "position" not in data.files:
                return None
            positions.append(np.asarray(data["position"]).reshape(-1))
    if not positions or sum(len(p) for p in positions) != count:
        return None
    from diffusets_jax.io.outputs import sample_name

    return [sample_name(int(position)) for position in np.concatenate(positions)]


def _refuse_sample_output(path: Path, flag: str) -> None:
    """One line for what a `sample` run wrote (its folder, samples.npz or wfdb/), given as real ECGs: the key would
    call generated ECGs real. A `sample --corpus` folder is refused by its dataset card (`io.generated`)."""
    from diffusets_jax.io.outputs import sample_run_folder
    from diffusets_jax.io.run_dir import RUN_FILE

    for folder in (path if path.is_dir() else None, sample_run_folder(path)):
        if folder is None or not (folder / RUN_FILE).is_file():
            continue
        try:
            record = read_json(folder / RUN_FILE, "run record")
        except (OSError, ValueError):
            continue  # not a record this check can read; the ECGs are read as they are
        command = str(record.get("command", "")) if isinstance(record, dict) else ""
        if command.split(" ")[0] == "sample":
            raise ValueError(f"{flag} {path}: generated ECGs (`diffusets-jax {command}` wrote {folder}), but {flag} "
                             "takes recorded ones: give a prepared split (--dataset) or an NPZ or WFDB folder of "
                             "recordings")


def load_dataset_split(dataset: str | os.PathLike, split: str, *, data_dir: str | os.PathLike | None = None,
                       limit: int | None = None, builder: Any = None) -> EcgSet:  # noqa: ANN401 (a TFDS builder)
    """Real ECGs and their conditions from a prepared dataset split (`experiments.evaluate.load_split`; `limit`
    reads only its first examples): the conditions of every record, the ECGs as `SplitRows` (read once chosen).
    `builder`: the dataset's builder when the caller has opened it (`experiments.evaluate.ecg_dataset`)."""
    from diffusets_jax.data.card import card_fingerprint
    from diffusets_jax.experiments.evaluate import ecg_dataset, load_split

    if builder is None:  # opened once: read, and fingerprinted
        builder = ecg_dataset(dataset, data_dir, kind="prepared")
    columns = load_split(builder, split, limit=limit, ecg_rows=[])  # every ECG looked at, none kept
    _check_ecg_shape((len(columns["finite"]), *builder.info.features["ecg"].shape), f"dataset {dataset} split {split}")
    conditions: list[dict[str, Any] | None] = _split_conditions(columns, split)
    rows = SplitRows(builder, split, limit, columns["finite"])
    return EcgSet(rows, conditions, {"dataset": os.fspath(dataset), "split": split,
                                    "data_dir": None if data_dir is None else os.fspath(data_dir), "limit": limit,
                                    "card": card_fingerprint(builder)})


def _split_conditions(columns: Mapping[str, Any], split: str) -> list[dict[str, Any] | None]:
    """Each record's conditions, from `load_split`'s columns."""
    return [_condition(report_lines(list(lines)), sex.item(), age.item(), hr.item(), where=f"split {split} [{i}]")
            for i, (lines, sex, age, hr) in enumerate(zip(columns["report_lines"], columns["sex"], columns["age"],
                                                         columns["heart_rate"], strict=True))]


def _condition_key(condition: Mapping[str, Any] | None) -> tuple | None:
    """What identifies the conditions an ECG was generated from: its statements (whatever the prompt style) and
    patient, ages and rates to 0.1 (as stored in float32)."""
    if condition is None or not condition["report"]:
        return None
    return (tuple(condition["report"]), condition["sex"], round(condition["age"], 1),
            round(condition["heart_rate"], 1))


# -- the kit ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class KitOptions:
    """What a kit is built from; recorded in the key, and compared when a kit is asked for again in the same OUT."""

    variant: str
    n_real: int = 0
    n_generated: int = 50
    controls: float = 0.0  # alignment: share of sheets showing another ECG's conditions
    seed: int | None = None  # None: a fresh random seed, recorded in the key
    dpi: int = 200

    def check(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.n_generated < 1 or self.n_real < 0:
            raise ValueError(f"--n-generated must be >= 1 and --n-real >= 0, got {self.n_generated} and {self.n_real}")
        if self.variant == REAL_VS_GENERATED and self.n_real < 1:
            raise ValueError("the real-vs-generated variant needs real ECGs: --n-real >= 1")
        if self.variant == ALIGNMENT and self.n_real:
            raise ValueError("the alignment variant shows generated ECGs only: drop --n-real")
        if not 0.0 <= self.controls < 1.0 or (self.controls and self.variant != ALIGNMENT):
            raise ValueError(f"--controls is the alignment variant's share of mismatched sheets, in [0, 1); got "
                             f"{self.controls} for {self.variant}")
        if not 30 <= self.dpi <= 600:
            raise ValueError(f"--dpi must be within 30..600, got {self.dpi}")
        if self.seed is not None and self.seed < 0:  # NumPy's generators take non-negative seeds of any size
            raise ValueError(f"--seed must be a whole number >= 0, got {self.seed}")


def _draw_ids(rng: np.random.Generator, count: int) -> list[str]:
    ids: list[str] = []
    while len(ids) < count:
        candidate = "".join(rng.choice(list(ID_ALPHABET), ID_LENGTH))
        if candidate not in ids:
            ids.append(candidate)
    return ids


def _finite(ecg: np.ndarray | SplitRows) -> np.ndarray:
    return np.flatnonzero(ecg.finite if isinstance(ecg, SplitRows) else finite_ecgs(ecg))


def _pick(rng: np.random.Generator, candidates: np.ndarray, count: int, what: str, why: str, flag: str) -> np.ndarray:
    if len(candidates) < count:
        raise ValueError(f"{count} {what} asked for but only {len(candidates)} are usable ({why}): lower {flag}")
    return np.sort(rng.choice(candidates, count, replace=False))


def _shown(condition: Mapping[str, Any]) -> dict[str, Any]:
    """What an alignment sheet's title shows: the report statements and the patient."""
    return {"prompt": "\n".join(condition["report"]), "sex": condition["sex"], "age": condition["age"],
            "heart_rate": condition["heart_rate"]}


def _real_vs_generated_sheets(rng, options: KitOptions, real: EcgSet, generated: EcgSet) -> tuple[list[dict], dict]:
    generated_ok = _finite(generated.ecg)
    chosen_generated = _pick(rng, generated_ok, options.n_generated, "generated ECGs",
                             f"{len(generated.ecg) - len(generated_ok)} of {len(generated.ecg)} have non-finite samples",
                             "--n-generated")
    used = {_condition_key(c) for c in generated.conditions} - {None}
    finite = set(_finite(real.ecg).tolist())
    paired = {i for i in finite if _condition_key(real.conditions[i]) in used}
    real_ok = np.array(sorted(finite - paired), dtype=np.int64)
    chosen_real = _pick(rng, real_ok, options.n_real, "real ECGs",
                        f"{len(real.ecg)} read, {len(real.ecg) - len(finite)} with non-finite samples, {len(paired)} "
                        "whose conditions generated one of the generated ECGs", "--n-real")
    entries = [{"truth": "real", "set": real, "index": int(i)} for i in chosen_real]
    entries += [{"truth": "generated", "set": generated, "index": int(i)} for i in chosen_generated]
    counts = {"real": len(chosen_real), "generated": len(chosen_generated),
              "real_left_out_as_paired": len(paired), "real_left_out_non_finite": len(real.ecg) - len(finite),
              "generated_left_out_non_finite": len(generated.ecg) - len(generated_ok)}
    return entries, counts


def _alignment_sheets(rng, options: KitOptions, generated: EcgSet) -> tuple[list[dict], dict]:
    finite = _finite(generated.ecg)
    usable = np.array([i for i in finite if generated.conditions[i]["report"]], dtype=np.int64)
    chosen = _pick(rng, usable, options.n_generated, "generated ECGs",
                   f"{len(generated.ecg) - len(finite)} of {len(generated.ecg)} have non-finite samples, "
                   f"{len(finite) - len(usable)} have no report statements", "--n-generated")
    n_controls = int(round(options.controls * len(chosen)))
    controls = set(rng.choice(chosen, n_controls, replace=False).tolist()) if n_controls else set()
    # Donors of mismatched conditions: ECGs outside the kit first, so a report seldom appears on two sheets.
    outside = rng.permutation(np.setdiff1d(usable, chosen))
    donors = [int(i) for i in np.concatenate([outside, rng.permutation(chosen)])]
    entries, used_donors = [], set()
    for i in chosen.tolist():
        entry = {"truth": "own_report", "set": generated, "index": i, "shown_index": i}
        if i in controls:
            report = generated.conditions[i]["report"]
            donor = next((d for d in donors if d != i and d not in used_donors
                          and generated.conditions[d]["report"] != report), None)
            if donor is None:
                raise ValueError(f"no generated ECG with another report is left to mismatch sheet source {i}: "
                                 "lower --controls or generate ECGs from more distinct reports")
            used_donors.add(donor)
            entry.update(truth="other_report", shown_index=donor)
        entries.append(entry)
    counts = {"own_report": len(chosen) - n_controls, "other_report": n_controls,
              "generated_left_out_non_finite": len(generated.ecg) - len(finite),
              "generated_left_out_no_report": len(finite) - len(usable)}
    return entries, counts


def _readme(variant: str, n_sheets: int) -> str:
    task = {
        REAL_VS_GENERATED: (
            "Each sheet shows one 10-second 12-lead ECG. Some were recorded from patients, the others were\n"
            "generated by a model. For every sheet, decide which it is: write `real` or `generated`."
        ),
        ALIGNMENT: (
            "Each sheet shows a 10-second 12-lead ECG generated by a model, above it the report statements and\n"
            "the patient information (sex, age, heart rate) it should agree with. For every sheet, decide whether\n"
            "the ECG matches them: write `match` or `no_match`."
        ),
    }[variant]
    return (
        f"Clinical ECG reading: {n_sheets} sheets\n\n{task}\n\n"
        f"The sheets are in {BOOKLET} (one per page) and, the same, in {SHEETS_DIR}/ as PNG images named by their\n"
        "sheet ID. Paper speed 25 mm/s, gain 10 mm/mV: 3 x 4 leads of 2.5 s each and a 10 s lead II rhythm\n"
        "strip.\n\n"
        f"Answers: copy {ANSWER_SHEET} to answers_<your name>.csv and fill its `answer` column, one answer per\n"
        f"sheet ({' or '.join(ANSWERS[variant])}). Keep the header and the sheet IDs as they are. Please answer\n"
        "every sheet on your own, without discussing them with other readers.\n"
    )


def _answer_sheet(ids: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(ANSWER_HEADER)
    writer.writerows([sheet_id, ""] for sheet_id in ids)
    return buffer.getvalue()


def _render(package: Path, entries: Sequence[dict], options: KitOptions) -> None:
    """Every sheet as sheets/ID.png and one page of the booklet, in booklet order, all drawn the same way."""
    from matplotlib.backends.backend_pdf import PdfPages

    from diffusets_jax.io.plot import plot_ecg, prompt_lines_needed, save_png

    shown = [_shown(e["set"].conditions[e["shown_index"]]) if options.variant == ALIGNMENT else None for e in entries]
    # One title height for every sheet: a taller sheet must not stand out.
    prompt_lines = max(prompt_lines_needed(s) for s in shown)
    (package / SHEETS_DIR).mkdir()
    with PdfPages(package / BOOKLET, metadata=PDF_METADATA) as booklet:
        for entry, conditions in zip(entries, shown, strict=True):
            fig = plot_ecg(entry["set"].ecg[entry["index"]], title=f"Sheet {entry['sheet_id']}", conditions=conditions,
                           prompt_lines=prompt_lines)
            save_png(fig, package / SHEETS_DIR / f"{entry['sheet_id']}.png", options.dpi, metadata=PNG_METADATA)
            booklet.savefig(fig)
    _equalise_png_sizes(sorted((package / SHEETS_DIR).iterdir()))


PNG_PADDING_CHUNK = b"paDd"  # ancillary, private, safe to copy: viewers skip it


def _equalise_png_sizes(paths: Sequence[Path]) -> None:
    """Pad every PNG to one byte size with a chunk of zeros before IEND. A busier trace compresses worse, so a
    folder sorted by size would otherwise group the sheets by how they were made."""
    import zlib

    sizes = {path: path.stat().st_size for path in paths}
    target = max(sizes.values()) + 12  # a chunk is at least 12 bytes: every file gets one, the largest an empty one
    for path, size in sizes.items():
        data = path.read_bytes()
        padding = bytes(target - size - 12)
        chunk = (len(padding).to_bytes(4, "big") + PNG_PADDING_CHUNK + padding
                 + zlib.crc32(PNG_PADDING_CHUNK + padding).to_bytes(4, "big"))
        write_bytes_atomic(path, data[:-12] + chunk + data[-12:])  # the last 12 bytes are the IEND chunk


def _key(options: KitOptions, seed: int, entries: Sequence[dict], counts: dict, inputs: dict, created: str) -> dict:
    sheets = []
    for position, entry in enumerate(entries, 1):
        ecg_set, index = entry["set"], entry["index"]
        sheet = {"sheet_id": entry["sheet_id"], "position": position, "truth": entry["truth"],
                 "source": {**ecg_set.source, "index": index,
                            **({"sample": ecg_set.names[index]} if ecg_set.names else {})},
                 "conditions": ecg_set.conditions[index]}
        if options.variant == ALIGNMENT:
            sheet["shown"] = {"index": entry["shown_index"],
                              **({"sample": ecg_set.names[entry["shown_index"]]} if ecg_set.names else {}),
                              **ecg_set.conditions[entry["shown_index"]]}
        sheets.append(sheet)
    return {"format": KEY_FORMAT, "variant": options.variant, "answers": list(ANSWERS[options.variant]),
            "truths": list(TRUTHS[options.variant]), "created": created, "seed": seed,
            "settings": _settings(options, seed, inputs), "counts": counts, "sheets": sheets}


def _settings(options: KitOptions, seed: int, inputs: dict) -> dict:
    """What determines the kit: its run fingerprint (`io.run_dir`), recorded in the key too."""
    return json.loads(json.dumps({**dataclasses.asdict(options), "seed": seed, "inputs": inputs}))


def _stamp(root: Path, when: float) -> None:
    """One timestamp for every file and folder under `root`: the order they were written in stays unknown."""
    for folder, dirs, files in os.walk(root):
        for name in files + dirs:
            os.utime(Path(folder) / name, (when, when))
    os.utime(root, (when, when))


def build_kit(
    out: str | os.PathLike,
    options: KitOptions,
    *,
    generated: str | os.PathLike,
    real: str | os.PathLike | None = None,
    dataset: str | os.PathLike | None = None,
    split: str = "test",
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Build a Turing-test kit in `out` (layout in the module docstring); returns a summary.

    Generated ECGs come from `generated` (the `samples.npz` of `diffusets-jax sample`, or what `load_ecgs`
    reads); real ones (real-vs-generated only) from `real` (the same forms) or from `split` of the prepared
    `dataset`. `out` is claimed with `io.run_dir.output_dir`: a kit already built
    there from the same inputs and settings (same seed) is left as it is, a half-built one is rebuilt, a user's
    folder or another kit is refused unless `overwrite` (which replaces it, key included, once the new kit is
    complete). Every input is read and the sheets are chosen before `out` is touched, so a bad input or count
    leaves no claimed folder behind.
    """
    from diffusets_jax.data.location import dataset_folder
    from diffusets_jax.experiments.evaluate import ecg_dataset
    from diffusets_jax.io.run_dir import check_output_path, output_dir, reading

    options.check()
    reads = [("--generated", generated), ("--real", real), ("--dataset", dataset_folder(dataset)),
             ("--data-dir", data_dir)]
    check_output_path(out, overwrite=overwrite, reads=reads)
    if options.variant == REAL_VS_GENERATED and (real is None) == (dataset is None):
        raise ValueError("the real-vs-generated variant takes real ECGs from --dataset (a prepared split) or --real "
                         "(an NPZ or a WFDB folder): give exactly one")
    if options.variant == ALIGNMENT and (real is not None or dataset is not None):
        raise ValueError("the alignment variant shows generated ECGs only: drop --dataset/--real")
    if real is not None and Path(real).resolve() == Path(generated).resolve():
        raise ValueError(f"--real and --generated are the same {str(generated)!r}")
    generated_set = load_ecgs(generated, generated=True)
    inputs: dict[str, Any] = {"generated": generated_set.source}
    real_set = None
    seed = options.seed
    if seed is None and not overwrite:  # the same command again: the kit this folder holds, or finishes it
        seed = _recorded_seed(Path(out))
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % 2**63)
    rng = np.random.default_rng(seed)
    with contextlib.ExitStack() as held:
        if real is not None:
            real_set = load_ecgs(real, generated=False)
            inputs["real"] = real_set.source
        elif dataset is not None:
            # The split's conditions are read here and its chosen ECGs below: held as read in between, so that a
            # `prepare --overwrite` cannot pair one build's conditions with another build's ECGs.
            builder = ecg_dataset(dataset, data_dir, kind="prepared")
            held.enter_context(reading(builder.data_dir))
            real_set = load_dataset_split(dataset, split, data_dir=data_dir, limit=limit, builder=builder)
            inputs["real"] = real_set.source
        if options.variant == REAL_VS_GENERATED:
            entries, counts = _real_vs_generated_sheets(rng, options, real_set, generated_set)
        else:
            entries, counts = _alignment_sheets(rng, options, generated_set)
        if real_set is not None and isinstance(real_set.ecg, SplitRows):  # only now are the real sheets known
            real_set.ecg.read([e["index"] for e in entries if e["set"] is real_set])
    entries = [entries[i] for i in rng.permutation(len(entries))]
    for entry, sheet_id in zip(entries, _draw_ids(rng, len(entries)), strict=True):
        entry["sheet_id"] = sheet_id

    settings = _settings(options, seed, inputs)
    with output_dir(out, command="turing-kit", settings=settings, overwrite=overwrite, reads=reads) as run:
        if run.complete:
            return _summary(run.final, read_json(run.path / KEY_FILE, "Turing-test key"), already_built=True)
        # A half-built kit of this same run (a crash): ours, rebuilt whole, since the key must match every sheet.
        shutil.rmtree(run.path / PACKAGE_DIR, ignore_errors=True)
        (run.path / KEY_FILE).unlink(missing_ok=True)
        now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
        package = run.path / PACKAGE_DIR
        package.mkdir()
        _render(package, entries, options)
        write_text_atomic(package / ANSWER_SHEET, _answer_sheet([e["sheet_id"] for e in entries]))
        write_text_atomic(package / README, _readme(options.variant, len(entries)))
        key = _key(options, seed, entries, counts, inputs, now.isoformat())
        write_json_atomic(run.path / KEY_FILE, key)
        _stamp(package, now.timestamp())
        run.mark_complete(sheets=len(entries))
    return _summary(Path(out), key, already_built=False)


def _recorded_seed(out: Path) -> int | None:
    """The seed of the turing-kit run `out` holds (finished or not), or None. Without --seed a fresh one is drawn:
    the same command again into the same folder then asked for another kit, and was refused as one, where it
    should leave the finished kit as it is or rebuild the unfinished one."""
    from diffusets_jax.io.run_dir import RUN_FILE

    try:
        record = read_json(out / RUN_FILE, "run record")
    except (OSError, ValueError):
        return None  # no record (a new folder), or one `output_dir` refuses in its own words
    settings = record.get("settings") if isinstance(record, dict) and record.get("command") == "turing-kit" else None
    seed = settings.get("seed") if isinstance(settings, dict) else None
    return seed if isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0 else None


def _summary(out: Path, key: Mapping[str, Any], *, already_built: bool) -> dict[str, Any]:
    return {"package": str(out / PACKAGE_DIR), "key": str(out / KEY_FILE), "variant": key["variant"],
            "sheets": len(key["sheets"]), "counts": key["counts"], "seed": key["seed"], "already_built": already_built}


# -- conditions for the generated half ---------------------------------------------------------------------------------
def write_split_conditions(
    out: str | os.PathLike,
    dataset: str | os.PathLike,
    split: str,
    count: int,
    *,
    seed: int,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """Write the conditions (text, sex, age, heart_rate) of `count` random records of a prepared split as a CSV
    for `diffusets-jax sample --conditions`; `build_kit` then leaves those records out of the real sheets.
    Records without report statements are skipped. `out` must not exist."""
    from diffusets_jax.io.run_dir import check_output_file

    out = Path(out)
    if out.suffix.lower() != ".csv":
        raise ValueError(f"{str(out)!r}: the conditions file must end in .csv")
    if out.exists():
        raise ValueError(f"{str(out)!r} already exists: choose another path (nothing is ever overwritten)")
    check_output_file(out, "--out")  # a folder that is a file, or unwritable: before the split is read, not after
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if seed < 0:  # NumPy's generators take non-negative seeds of any size
        raise ValueError(f"--seed must be a whole number >= 0, got {seed}")
    from diffusets_jax.experiments.evaluate import load_split

    # The conditions alone: the split's ECGs (39 GB for all of MIMIC-IV-ECG) are not needed to choose records.
    conditions = _split_conditions(load_split(dataset, split, data_dir=data_dir, limit=limit, with_ecg=False), split)
    # '|' would split a statement in two, and `sample` refuses the prompt's braces in one: either record's ECG
    # would not be generated from its own statements.
    usable = np.array([i for i, c in enumerate(conditions) if c["report"]
                       and not any(char in line for line in c["report"] for char in (LINE_SEPARATOR, "{", "}"))],
                      dtype=np.int64)
    chosen = _pick(np.random.default_rng(seed), usable, count, "records",
                   f"{len(conditions) - len(usable)} of {len(conditions)} have no report or a '|', '{{' or '}}' "
                   "in one", "the count")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["text", "sex", "age", "heart_rate"])
    for i in chosen.tolist():
        c = conditions[i]
        # repr: the exact stored values, so the generated ECGs' conditions match their records' in build_kit.
        writer.writerow([LINE_SEPARATOR.join(c["report"]), "M" if c["sex"] else "F", repr(c["age"]),
                         repr(c["heart_rate"])])
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_new_text(out, buffer.getvalue())
    except FileExistsError:
        raise ValueError(f"{str(out)!r} appeared while writing: it was left untouched") from None
    return {"out": str(out), "records": len(chosen), "split": split, "seed": seed,
            "left_out_without_report": len(conditions) - len(usable)}

