"""Generated ECGs read back with the conditions they were made from, whoever made them.

`evaluate --generated PATH` scores any generator's samples (ours, SSSD-ECG, Auto-TTE, ...) under one scorer, and
`turing-kit --generated/--real PATH` shows them to raters, from:

- an NPZ (`samples.npz` of `diffusets-jax sample`, or any NPZ with an `ecg` array `(n, samples, 12)` in mV,
  standard lead order, plus optional `report` ('|'-joined statements) or `prompt`, `sex`, `age`, `heart_rate`,
  `subject_id` (the patient whose record conditioned the ECG, empty or -1 where unknown), and `text_embedding`
  `(n, D)` (finite, D the scoring CLIP's text width) with optionally `embedder_id`, the id of the embedder that
  made it (one string, as `embed --output` writes it));
- a folder of WFDB records (ours carry the conditions in their header comments; others are read signal-only);
- a dataset folder (`dataset_info.json`): a `sample --corpus` corpus or any dataset in the prepared schema;
- a `sample` output folder (`manifest.json`): its NPZ, or the NPZ of every host of a multi-host run, in order
  (exact float samples; the folder's WFDB records are 16-bit and maybe resampled, and may not have been written).

Every record becomes the DiffuSETS time base (whole 10 s FFT-resampled to 1024 samples) in the standard lead order.
A record that cannot be used (a WFDB record that is not 10 s long among them) is skipped and counted with its reason;
the whole input failing is one line.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

from diffusets_jax.conditioning.prompts import report_lines
from diffusets_jax.ecg.resample import resample_to_length
from diffusets_jax.ecg.shapes import ECG_LENGTH, ECG_SECONDS, NUM_LEADS
from diffusets_jax.ecg.units import check_millivolts, finite_ecgs

NON_FINITE = "non-finite samples"  # the reason counted in `GeneratedSet.skipped` for an ECG with NaN or inf
WRONG_DURATION = "not 10 s long"  # the reason counted for a WFDB record of another duration
# The reason counted for a WFDB record whose values are not millivolts (ADC counts or microvolts under a header that
# says mV, a wrong gain), as `prepare` skips one as `implausible_amplitude` and an NPZ of such values is refused.
NOT_MILLIVOLTS = "not in millivolts (check the header's gain and units)"


@dataclasses.dataclass
class GeneratedSet:
    """`ecg` `(n, 1024, 12)` float32 mV; per record its report statements, prompt, sex (1 male / 0 female / -1
    unknown), age and heart rate (NaN unknown) and, when stored, its text embedding `(n, D)` (finite), with the
    NPZ file it came from and the id of the embedder that made it where the NPZ records one (`embedder_id`)."""

    ecg: np.ndarray
    reports: list[tuple[str, ...]]
    prompts: list[str]
    sex: np.ndarray
    age: np.ndarray
    heart_rate: np.ndarray
    text_embedding: np.ndarray | None
    source: str
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    # Whether `reports` are each ECG's report statements (an NPZ's `report`, a dataset's report_lines), not a prompt
    # standing in for one (an NPZ with only `prompt`; WFDB headers, which `sample` fills with the prompt).
    statements: bool = False
    # Where `text_embedding` came from (an NPZ file, the first of a multi-host run's), for messages; and its
    # embedder's id (`Embedder.embedder_id`) when the NPZ records one, "" when not.
    text_embedding_file: str = ""
    text_embedder: str = ""
    # `(n,)` str: the patient whose record conditioned each ECG, "" where unknown (an NPZ's `subject_id`, a prepared
    # dataset's; a corpus names none); None when the source gives none. The bootstrap clusters by it.
    subject_id: np.ndarray | None = None


def _to_time_base(ecg: np.ndarray, where: str) -> np.ndarray:
    ecg = np.asarray(ecg, np.float64)
    if ecg.ndim != 2 or ecg.shape[1] != NUM_LEADS:
        raise ValueError(f"{where}: expected (samples, {NUM_LEADS}) in standard lead order, got shape {ecg.shape}")
    return resample_to_length(ecg, ECG_LENGTH) if ecg.shape[0] != ECG_LENGTH else ecg.astype(np.float32)


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _sex_code(value: Any) -> int:
    """A WFDB header's sex as a code, -1 where it is absent or unreadable (headers are not refused one by one)."""
    from diffusets_jax.conditioning.patient import parse_sex

    try:
        return parse_sex(value)
    except ValueError:
        return -1


def read_generated(path: str | os.PathLike, flag: str = "--generated", kind: str = "corpus") -> GeneratedSet:
    """Read generated ECGs and their conditions from an NPZ, a WFDB folder or a dataset folder (module docstring).
    `flag`: the option that named `path`, for error messages. `kind`: what a dataset folder must be by its card,
    "corpus" (generated ECGs) or "prepared" (recorded ones, where a command reads real ECGs this way)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{flag} {path} does not exist")
    generated = _read_any(path, flag, kind)
    if not len(generated.ecg):  # refused here, before a command claims its output folder or measures anything
        raise ValueError(f"{flag} {path} holds no ECGs: there is nothing to score or show; give a set with at least one")
    return generated


def _read_any(path: Path, flag: str, kind: str) -> GeneratedSet:
    from diffusets_jax.data.card import check_dataset_kind

    _refuse_unfinished_sample_run(path, flag)
    if path.is_file() and path.suffix.lower() == ".npz":
        return _read_npz(path)
    if path.is_dir() and (path / "dataset_info.json").is_file():
        check_dataset_kind(path, kind, flag)
        return _read_dataset(path, flag)
    if path.is_dir() and (npz_files := _sample_npz_files(path)) is not None:
        return _read_sample_folder(path, npz_files, flag)
    if path.is_dir():
        records = sorted(p.with_suffix("") for p in path.rglob("*.hea"))
        if records:
            return _read_wfdb(path, records, flag)
    raise ValueError(f"{flag} {path}: not an .npz, a folder of WFDB records, or a dataset folder "
                     "(dataset_info.json); give one of those")


def source_fingerprint(path: str | os.PathLike) -> str:
    """What identifies the content `read_generated(path)` reads, for a run's settings: a file's SHA-256; a dataset's
    card fingerprint (rewritten by every build); a `sample` folder's NPZ files; another folder's files, names and
    bytes (hidden files aside). Samples written again at the same path are then another input, not the finished
    run's."""
    import hashlib

    from diffusets_jax.io.files import file_sha256

    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    if (path / "dataset_info.json").is_file():
        from diffusets_jax.data.card import card_fingerprint

        return card_fingerprint(path)
    if (files := _sample_npz_files(path)) is None:  # a sample folder: what is read, not its PNGs and records
        files = sorted(p for p in path.rglob("*") if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(path).parts))
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.relative_to(path).as_posix()}\0{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def finite_only(generated: GeneratedSet, flag: str = "--generated") -> GeneratedSet:
    """`generated` without its ECGs that have NaN or inf samples (failed generations: no metric is defined on
    them), counted under `skipped` as a WFDB folder's are when read; one line if none is left."""
    finite = finite_ecgs(generated.ecg)
    if finite.all():
        return generated
    skipped = {**generated.skipped, NON_FINITE: generated.skipped.get(NON_FINITE, 0) + int((~finite).sum())}
    if not finite.any():
        raise ValueError(f"{flag} {generated.source}: every one of its {len(finite)} ECGs has NaN or inf samples; "
                         "there is nothing to score or show")
    rows = np.flatnonzero(finite)
    return dataclasses.replace(
        generated, ecg=generated.ecg[rows], reports=[generated.reports[i] for i in rows],
        prompts=[generated.prompts[i] for i in rows], sex=generated.sex[rows], age=generated.age[rows],
        heart_rate=generated.heart_rate[rows],
        text_embedding=None if generated.text_embedding is None else generated.text_embedding[rows], skipped=skipped,
        subject_id=None if generated.subject_id is None else generated.subject_id[rows])


def _sample_npz_files(folder: Path) -> list[Path] | None:
    """The NPZ files a `sample` output folder's manifest lists (every host's, in order); None for another folder.
    io.outputs is imported here: it imports JAX, which reading NPZs does not need."""
    from diffusets_jax.io.files import read_json
    from diffusets_jax.io.outputs import MANIFEST

    if not (folder / MANIFEST).is_file():
        return None
    return [folder / name for name in read_json(folder / MANIFEST, "sample manifest").get("npz") or []]


def _refuse_unfinished_sample_run(path: Path, flag: str) -> None:
    """One line for a `sample` run's folder that it has not finished (killed, or running now), or for a part of
    one (its `wfdb/` folder, an NPZ in it: `io.outputs.sample_run_folder`): it holds the ECGs of some batches
    (`.parts/`, maybe WFDB records) but no manifest, and scoring those as the set would score a part of it as if
    it were the whole."""
    from diffusets_jax.io.files import read_json
    from diffusets_jax.io.outputs import sample_run_folder
    from diffusets_jax.io.run_dir import RUN_FILE

    for folder in (path if path.is_dir() else None, sample_run_folder(path)):
        if folder is None or not (folder / RUN_FILE).is_file():
            continue
        record = read_json(folder / RUN_FILE, "run record")
        command = str(record.get("command", "")) if isinstance(record, dict) else ""
        if command.split(" ")[0] == "sample" and record.get("status") != "complete":
            what = f"{flag} {path} is" if folder == path else f"{flag} {path} is part of {folder},"
            raise ValueError(f"{what} an unfinished `diffusets-jax {command}` run (killed, or still running: its run "
                             f"record says {record.get('status')!r}): rerun the same sample command to finish it, "
                             "then score it")


def _read_sample_folder(folder: Path, npz_files: list[Path], flag: str) -> GeneratedSet:
    if not npz_files:
        raise ValueError(f"{flag} {folder}: this sample run wrote no NPZ (--formats without npz); give its wfdb/ "
                         "folder instead")
    parts = [_read_npz(path) for path in npz_files]
    skipped: dict[str, int] = {}
    for part in parts:
        for reason, count in part.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + count
    embeddings = [part.text_embedding for part in parts]
    with_text = [part for part in parts if part.text_embedding is not None] if all(
        e is not None for e in embeddings) else []
    for part in with_text[1:]:  # one set of vectors: the hosts' NPZs must agree on their width and embedder
        first = with_text[0]
        if part.text_embedding.shape[1] != first.text_embedding.shape[1] or part.text_embedder != first.text_embedder:
            raise ValueError(f"{flag} {part.source}: 'text_embedding' is {part.text_embedding.shape[1]}-d from "
                             f"{part.text_embedder or 'an unrecorded embedder'}, but {first.source}'s is "
                             f"{first.text_embedding.shape[1]}-d from {first.text_embedder or 'an unrecorded embedder'}"
                             ": give one run's samples")
    return GeneratedSet(np.concatenate([part.ecg for part in parts]), [r for part in parts for r in part.reports],
                        [p for part in parts for p in part.prompts], np.concatenate([part.sex for part in parts]),
                        np.concatenate([part.age for part in parts]),
                        np.concatenate([part.heart_rate for part in parts]),
                        np.concatenate(embeddings) if with_text else None, str(folder),
                        skipped, statements=all(part.statements for part in parts),
                        text_embedding_file=with_text[0].source if with_text else "",
                        text_embedder=with_text[0].text_embedder if with_text else "",
                        subject_id=np.concatenate([_patients(part) for part in parts])
                        if any(part.subject_id is not None for part in parts) else None)


def _read_npz(path: Path) -> GeneratedSet:
    import zipfile
    import zlib

    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):  # a .npy array under an .npz name
            raise ValueError("an .npy array, not an .npz archive of named arrays")
        data = dict(archive)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:  # garbled, truncated, not a zip
        raise ValueError(f"{path}: not a readable .npz ({err}): give one written by numpy.savez") from None
    if "ecg" not in data:
        raise ValueError(f"{path}: no 'ecg' array (expected ecg (n, samples, 12) in mV, standard lead order)")
    ecg = np.asarray(data["ecg"])
    if ecg.ndim != 3 or ecg.shape[2] != NUM_LEADS:
        raise ValueError(f"{path}: 'ecg' has shape {ecg.shape}; expected (n, samples, {NUM_LEADS})")
    n = len(ecg)
    for key in ("report", "prompt", "sex", "age", "heart_rate", "subject_id", "text_embedding"):
        if key not in data:
            continue
        if data[key].ndim == 0:
            raise ValueError(f"{path}: '{key}' is a single value; give one per ECG ({n})")
        if len(data[key]) != n:
            raise ValueError(f"{path}: '{key}' has {len(data[key])} entries for {n} ECGs")
    if "report" in data:
        reports = [tuple(report_lines(str(r))) for r in data["report"]]
    elif "prompt" in data:
        reports = [(str(p),) for p in data["prompt"]]
    else:
        reports = [()] * n
    prompts = [str(p) for p in data["prompt"]] if "prompt" in data else ["|".join(r) for r in reports]
    sex = _sex_codes(data["sex"], f"{path}: 'sex'") if "sex" in data else np.full(n, -1)
    age = _numbers(data["age"], f"{path}: 'age'") if "age" in data else np.full(n, np.nan)
    hr = _numbers(data["heart_rate"], f"{path}: 'heart_rate'") if "heart_rate" in data else np.full(n, np.nan)
    text_embedding = _text_embeddings(data["text_embedding"], path) if "text_embedding" in data else None
    if ecg.shape[1] == ECG_LENGTH:  # the usual case, our own `sample`'s: used as read, not copied (~48 KB an ECG)
        ecgs = ecg.astype(np.float32, copy=False)
    else:
        ecgs = np.stack([_to_time_base(e, f"{path} ecg[{i}]") for i, e in enumerate(ecg)]) if n else np.zeros(
            (0, ECG_LENGTH, NUM_LEADS), np.float32)
    # An NPZ names no units: one in microvolts was scored as ECGs of 1000x the amplitude, with no sign but "Records
    # over 10 mV: 100 %" in the report. Checked as the readers of recordings check, on 16 evenly spaced ECGs (a
    # unit is the whole file's, and the set is used as read: a check of all of it would copy it several times); an
    # all-NaN set is refused, and counted, by whoever scores it.
    some = ecgs[np.unique(np.linspace(0, n - 1, 16).astype(np.int64))] if n else ecgs
    if np.isfinite(some).any():
        check_millivolts(some, what=f"{path}: 'ecg'")
    return GeneratedSet(ecgs, reports, prompts, sex, age, hr, text_embedding,
                        str(path), statements="report" in data,
                        text_embedding_file=str(path) if text_embedding is not None else "",
                        text_embedder=_embedder_id(data, path) if text_embedding is not None else "",
                        subject_id=_patient_ids(data["subject_id"]) if "subject_id" in data else None)


def _patient_ids(values: Any) -> np.ndarray:
    """Patient ids `(n,)` as str, "" where unknown: an empty entry, NaN, or -1 (a corpus's `subject_id`)."""
    ids = []
    for value in np.asarray(values).reshape(-1).tolist():
        if isinstance(value, float) and value.is_integer():  # 17.0 from a float array is patient 17
            value = int(value)
        text = str(value).strip()
        ids.append("" if text in ("", "-1", "nan") else text)
    return np.asarray(ids, dtype=str)


def _patients(part: GeneratedSet) -> np.ndarray:
    """`part`'s patient ids, all unknown when it gives none."""
    return part.subject_id if part.subject_id is not None else np.full(len(part.ecg), "", dtype=str)


def _text_embeddings(values: np.ndarray, path: Path) -> np.ndarray:
    """An NPZ's `text_embedding` as float32 `(n, D)`: one vector per ECG, every entry finite. Anything else is one
    line: the CLIP's text tower would fail on it with a traceback, or broadcast it into a score that means
    nothing (evaluate checks the width D against the CLIP, `experiments.evaluate.check_text_embeddings`)."""
    embeddings = _numbers(values, f"{path}: 'text_embedding'")
    if embeddings.ndim != 2 or embeddings.shape[1] < 1:
        raise ValueError(f"{path}: 'text_embedding' has shape {embeddings.shape}; expected (n, D), one D-wide vector "
                         "per ECG: give the embeddings so, or leave the array out")
    bad = np.flatnonzero(~np.isfinite(embeddings).all(axis=1))
    if len(bad):
        raise ValueError(f"{path}: 'text_embedding'[{bad[0]}] has NaN or inf entries ({len(bad)} rows do): give "
                         "finite embeddings, or leave the array out")
    return embeddings.astype(np.float32)


def _embedder_id(data: dict[str, np.ndarray], path: Path) -> str:
    """The id of the embedder that made an NPZ's `text_embedding` (`embedder_id`, one string, as `embed --output`
    writes it); "" when the NPZ records none."""
    if "embedder_id" not in data:
        return ""
    value = data["embedder_id"]
    if value.ndim != 0 or value.dtype.kind != "U" or not str(value):
        raise ValueError(f"{path}: 'embedder_id' must be one string (the embedder's id, e.g. "
                         f"'openai/text-embedding-ada-002/1536'), got {value.dtype} of shape {value.shape}")
    return str(value)


def _sex_codes(values: np.ndarray, where: str) -> np.ndarray:
    """An NPZ's sex entries as codes (1 male, 0 female, -1 unknown), spelt as a conditions file may spell them
    (`conditioning.patient.parse_sex`: M/F/male/female/1/0, any case); a missing entry (empty, NaN) or -1 is
    unknown. Anything else is one line naming the entry."""
    from diffusets_jax.conditioning.patient import MissingPatientValue, parse_sex

    codes = np.full(len(values), -1, np.int64)
    for i, value in enumerate(values.tolist()):
        try:
            codes[i] = -1 if value == -1 else parse_sex(value, field=f"{where}[{i}]")  # names the allowed spellings
        except MissingPatientValue:
            pass
    return codes


def _numbers(values: np.ndarray, where: str) -> np.ndarray:
    """An NPZ's numeric entries (ages, heart rates, embeddings) as float64; a missing one (an empty string) is NaN,
    one that is no number is one line naming the entry."""
    try:
        return np.asarray(values, np.float64)
    except (TypeError, ValueError):
        pass
    flat = np.asarray(values).reshape(-1).tolist()
    numbers = np.empty(len(flat))
    for i, value in enumerate(flat):
        if isinstance(value, str) and value.strip() == "":
            numbers[i] = np.nan
            continue
        try:
            numbers[i] = float(value)
        except (TypeError, ValueError):
            index = np.unravel_index(i, np.shape(values))
            raise ValueError(f"{where}[{', '.join(map(str, index))}] is {value!r}, not a number: give numbers, NaN "
                             "where unknown") from None
    return numbers.reshape(np.shape(values))


def _read_wfdb(folder: Path, records: list[Path], flag: str) -> GeneratedSet:
    from diffusets_jax.data.records import DecodeOptions
    from diffusets_jax.io.wfdb_out import read_record

    tolerance_s = DecodeOptions().duration_tolerance_s  # as `prepare` takes a recording for a 10 s one
    ecgs, reports, prompts, sex, age, hr = [], [], [], [], [], []
    skipped: dict[str, int] = {}
    for record in records:
        try:
            read = read_record(record)
            # A header gives the rate, so a record of another duration is known: resampled whole to the 10 s time
            # base it was stretched or squeezed (a 5 s record at 60 bpm was scored as 30 bpm).
            if abs(len(read.signal) / read.fs - ECG_SECONDS) > tolerance_s:
                skipped[WRONG_DURATION] = skipped.get(WRONG_DURATION, 0) + 1
                continue
            ecg = _to_time_base(read.signal, str(record))
        except (ValueError, OSError) as err:
            reason = type(err).__name__ if not isinstance(err, ValueError) else "unreadable or not 12-lead"
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        if not np.isfinite(ecg).all():
            skipped[NON_FINITE] = skipped.get(NON_FINITE, 0) + 1
            continue
        try:  # a header's gain is per record: one with the wrong one was scored at 1000x the amplitude
            check_millivolts(ecg, what=str(record))
        except ValueError:
            skipped[NOT_MILLIVOLTS] = skipped.get(NOT_MILLIVOLTS, 0) + 1
            continue
        conditions = read.conditions
        prompt = conditions.get("prompt", "")
        ecgs.append(ecg)
        reports.append(tuple(report_lines(conditions["report"])) if conditions.get("report") else
                       ((prompt,) if prompt else ()))
        prompts.append(prompt)
        sex.append(_sex_code(conditions.get("sex", "")))
        age.append(_number(conditions.get("age")))
        hr.append(_number(conditions.get("heart_rate")))
    if not ecgs:
        raise ValueError(f"{flag} {folder}: none of its {len(records)} WFDB records is a usable 12-lead ECG "
                         f"({skipped})")
    return GeneratedSet(np.stack(ecgs).astype(np.float32), reports, prompts, np.asarray(sex), np.asarray(age),
                        np.asarray(hr), None, str(folder), skipped)


def _read_dataset(folder: Path, flag: str) -> GeneratedSet:
    import tensorflow_datasets as tfds

    from diffusets_jax.data import pipeline

    builder = pipeline.load_builder(folder)
    split = "train" if "train" in builder.info.splits else sorted(builder.info.splits)[0]
    columns: dict[str, list] = {k: [] for k in ("ecg", "report_lines", "prompt", "sex", "age", "heart_rate",
                                                 "text_embedding", "subject_id")}
    missing = [k for k in ("ecg",) if k not in builder.info.features.keys()]
    if missing:
        raise ValueError(f"{flag} {folder}: the dataset has no 'ecg' feature (a latent dataset?)")
    for example in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)):
        for key in columns:
            if key in example:
                columns[key].append(example[key])
    n = len(columns["ecg"])
    if not n:
        return GeneratedSet(np.zeros((0, ECG_LENGTH, NUM_LEADS), np.float32), [], [], np.zeros(0, np.int64),
                            np.zeros(0), np.zeros(0), None, str(folder))
    return GeneratedSet(
        np.stack(columns["ecg"]).astype(np.float32),
        [tuple(line.decode() for line in lines) for lines in columns["report_lines"]] or [()] * n,
        [p.decode() for p in columns["prompt"]] or [""] * n,
        np.asarray(columns["sex"], np.int64) if columns["sex"] else np.full(n, -1),
        np.asarray(columns["age"], np.float64) if columns["age"] else np.full(n, np.nan),
        np.asarray(columns["heart_rate"], np.float64) if columns["heart_rate"] else np.full(n, np.nan),
        np.stack(columns["text_embedding"]).astype(np.float32) if columns["text_embedding"] else None,
        str(folder), statements=bool(columns["report_lines"]),
        subject_id=_patient_ids(columns["subject_id"]) if columns["subject_id"] else None)

