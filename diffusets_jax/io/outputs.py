"""`sample`'s output folder: NPZ arrays, WFDB records, clinical PNG sheets and one manifest.

Layout of OUT (names are the ECG's position in the request, `sample_00042`):

    samples.npz          ecg (n, 1024, 12), position (n,), prompt, report, sex, age, heart_rate  (several
                         hosts: one samples-PPPPP-of-NNNNN.npz per process)
    wfdb/sample_NNNNN    .hea + .dat at 102.4 Hz (or --wfdb-fs), conditions in the header comments
    plots/sample_NNNNN.png
    manifest.json        the settings, every sample's conditions and files, skipped records and why
    embeddings.sqlite    the prompt vectors the run got (no --embedding-cache given), which a resume reuses

An ECG with NaN or inf samples is in no format (the NPZ's `position` says which requests it holds). One beyond
what a 16-bit WFDB record holds stays in the NPZ but, when WFDB records are asked for, gets neither a record nor a
PNG. The manifest lists both under `skipped`, with the reason.

A generator with a `reference` (`posterior_pipeline.ReferenceGenerator`: reconstruction, editing, twins from a
recording) also stores the recording on the model's time base (`reference`, (1024, 12)) and the entries its
observation pins (`observed`, (1024, 12) bool) in the NPZ, the task under `reference` in the manifest, and draws
the recording above each result in the PNG.

The folder is claimed with `io.run_dir.output_dir`: a user's folder is never written into, and a rerun with the
same settings resumes. Each finished batch leaves `.parts/batch-BBBBBB.npz` (its ECGs, written last, after its
records), so a crash costs at most the batch in progress; the parts are merged into the NPZ at the end, one
part's ECGs in memory at a time (the set may be far larger than memory), and removed (they are ours). Each part
records the code version that wrote it: a run resumed after an upgrade lists which samples each version wrote
(`samples_by_code` in the manifest).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

from diffusets_jax import parallel
from diffusets_jax.conditioning.requests import Condition, expand
from diffusets_jax.ecg.shapes import ECG_SHAPE
from diffusets_jax.ecg.units import non_finite_reason
from diffusets_jax.io.files import atomic_path, read_json, remove_temporaries_in, write_json_atomic
from diffusets_jax.io.plot_workers import plot_workers
from diffusets_jax.io.run_dir import RUN_EMBEDDINGS, check_output_path, output_dir
from diffusets_jax.provenance import code_version
from diffusets_jax.worker_processes import WorkerProcesses, wait_for

FORMATS: tuple[str, ...] = ("npz", "wfdb", "png")
MANIFEST = "manifest.json"
_PARTS = ".parts"
WFDB_FOLDER = "wfdb"
_NPZ_NAME = re.compile(r"samples(-\d+-of-\d+)?\.npz")  # one host's, or each of several hosts', `_finish`
_PART_NAME = re.compile(r"batch-\d+\.npz")  # `_part_path`


def parse_formats(text: str | None) -> list[str]:
    """`"npz,wfdb"` -> ["npz", "wfdb"], None -> every format, refusing unknown or no formats (checked before any
    work). In `FORMATS`' order, whatever order they are given in: the list is part of a run's fingerprint, and
    `wfdb,npz` writes what `npz,wfdb` writes, so the same command with its formats reordered resumes."""
    if text is None:
        return list(FORMATS)
    formats = [f.strip().lower() for f in str(text).split(",") if f.strip()]
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise ValueError(f"--formats {text!r}: {'unknown ' + ', '.join(unknown) if unknown else 'nothing chosen'}; "
                         f"choose from {', '.join(FORMATS)}")
    return [f for f in FORMATS if f in formats]


def sample_name(position: int) -> str:
    return f"sample_{position:05d}"


def _header(condition: Condition, prompt: str, settings: dict[str, Any]) -> dict[str, Any]:
    return {"prompt": prompt, "sex": "M" if condition.sex else "F", "age": condition.age,
            "heart_rate": condition.heart_rate, **settings}


def _write_batch_records(out: Path, batch: Any, formats: Sequence[str], wfdb_fs: float | None,
                         header_settings: dict[str, Any], unusable: dict[int, str], plots: WorkerProcesses,
                         reference: Any = None) -> tuple[dict[str, str], list[Future]]:
    """Write one generated batch's WFDB records and hand its PNGs (beside `reference`'s recording when there is one)
    to `plots`; the records skipped and why, and the PNGs' futures. `unusable` {row: reason}: the batch's ECGs kept
    out of every format."""
    from diffusets_jax.io.plot import plot_ecg, plot_pair
    from diffusets_jax.io.wfdb_out import write_records

    names = [sample_name(batch.start + i) for i in range(len(batch.conditions))]
    headers = [_header(c, p, header_settings) for c, p in zip(batch.conditions, batch.prompts, strict=True)]
    skipped = {names[row]: reason for row, reason in unusable.items()}
    rows = [row for row in range(len(names)) if row not in unusable]
    if "wfdb" in formats and rows:
        skipped.update(write_records(out / WFDB_FOLDER, batch.ecgs[rows], [names[r] for r in rows],
                                     [headers[r] for r in rows], output_fs=wfdb_fs).skipped)
    drawing = []
    if "png" in formats:
        (out / "plots").mkdir(exist_ok=True)
        for name, ecg, header in zip(names, batch.ecgs, headers, strict=True):
            if name in skipped:
                continue
            path = out / "plots" / f"{name}.png"
            if reference is None:
                drawing.append(plots.run_for_effect(plot_ecg, ecg, conditions=header, path=path))
            else:
                labels = (reference.label(), "Reconstructed" if reference.mode == "posterior" else "Generated")
                # The leads the recording lacks or could not use are left blank, not drawn as flat 0 mV traces.
                drawing.append(plots.run_for_effect(plot_pair, reference.reference.recorded(), ecg,
                                                    conditions=header, path=path, labels=labels))
    return skipped, drawing


def sample_run_folder(path: str | os.PathLike) -> Path | None:
    """The `sample` output folder `path` is a part of by this module's layout: its WFDB folder (`<run>/wfdb`), an
    NPZ it writes (`<run>/samples.npz`, `<run>/samples-PPPPP-of-NNNNN.npz`) or a batch of a run not finished
    (`<run>/.parts/batch-BBBBBB.npz`); None for any other path. The layout only, one level or two up and no
    further: whether `<run>` is a `sample` run, and a finished one, is its run record's to say."""
    path = Path(path)
    if path.is_dir() and path.name == WFDB_FOLDER:
        return path.parent
    if path.is_file() and _NPZ_NAME.fullmatch(path.name):
        return path.parent
    if path.is_file() and _PART_NAME.fullmatch(path.name) and path.parent.name == _PARTS:
        return path.parent.parent
    return None


def _part_path(out: Path, batch_index: int) -> Path:
    return out / _PARTS / f"batch-{batch_index:06d}.npz"


@dataclasses.dataclass(frozen=True)
class StreamedArray:
    """An NPZ member too large to hold in memory at once: its dtype and shape, and the blocks (consecutive rows
    along axis 0, C order, in order) that make it, produced one at a time while it is written."""

    dtype: np.dtype
    shape: tuple[int, ...]
    blocks: Iterable[np.ndarray]


def _save_npz(path: Path, **arrays: np.ndarray | StreamedArray) -> None:
    """`np.savez(path, **arrays)`, atomically, where a member may be a `StreamedArray`: a batch's part
    (`.parts/batch-NNNNNN.npz`) and the merged `samples.npz`.

    The archive is numpy's, byte for byte: the same zip entries (`NAME.npy`, zip64, zipfile's fixed 1980 timestamp,
    so identical runs write identical bytes) and `.npy` headers, so `np.load` reads it as it reads any NPZ. Members
    are stored, not deflated: deflate shrank ECGs (float32) by 7.5 % for 1.6 ms of the host's time per ECG, about 16
    times what storing them takes, and the merge runs after sampling, alone, so deflating it cost a run of 100,000
    ECGs minutes whatever the accelerator. Object arrays are refused (numpy would pickle them; no reader of ours
    unpickles). A streamed member costs one block of memory, not the whole array: `samples.npz` of a large request
    holds about 48 KB per ECG (`_finish`).
    """
    with atomic_path(path, suffix=".npz") as temporary, \
            zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for key, value in arrays.items():
            with archive.open(f"{key}.npy", "w", force_zip64=True) as member:  # always zip64, as numpy (gh-10776)
                if isinstance(value, StreamedArray):
                    _write_streamed(member, key, value)
                else:
                    np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)


def _write_streamed(member: Any, key: str, array: StreamedArray) -> None:
    """Write `array` as a `.npy` into the open zip `member`: numpy's header, then each block's bytes."""
    dtype = np.dtype(array.dtype)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(array.shape)}
    try:
        np.lib.format.write_array_header_1_0(member, header)
    except ValueError:  # a header beyond version 1.0's 64 KiB, as numpy's own writer falls back
        np.lib.format.write_array_header_2_0(member, header)
    rows = 0
    for block in array.blocks:
        if block.shape[1:] != tuple(array.shape[1:]):
            raise ValueError(f"{key}: a block of shape {block.shape} in an array of shape {array.shape}")
        member.write(np.ascontiguousarray(block, dtype=dtype).tobytes())
        rows += len(block)
    if rows != array.shape[0]:  # a bug of the caller: never rename a short array into place
        raise ValueError(f"{key}: {rows} rows streamed for an array of shape {array.shape}")


def _save_part(out: Path, batch: Any, skipped: dict[str, str], drawing: list[Future]) -> None:
    """Save `batch`'s part (`.parts/batch-NNNNNN.npz`) once its PNGs (`drawing`) are written."""
    wait_for(drawing)
    (out / _PARTS).mkdir(exist_ok=True)
    _save_npz(_part_path(out, batch.index), ecg=batch.ecgs.astype(np.float32),
              position=np.arange(batch.start, batch.start + len(batch.conditions)),
              code=np.array(json.dumps(code_version(), sort_keys=True)),
              skipped_name=np.array(list(skipped), dtype=str), skipped_why=np.array(list(skipped.values()), dtype=str))


def sample_to_directory(generator: Any, conditions: Sequence[Condition], out_dir: str | os.PathLike, *,
                        formats: str | Sequence[str] = FORMATS, wfdb_fs: float | None = None, overwrite: bool = False,
                        progress: bool = True, provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Generate `expand(conditions)` with `generator` (a `pipeline.ECGGenerator`) into `out_dir`; the manifest.

    `formats`: some of `FORMATS`, as a sequence or as `--formats` takes them (`"npz,wfdb"`); others are refused.
    `provenance`: where the conditions came from (e.g. a findings file), recorded in the manifest and the run's
    settings.
    """
    from diffusets_jax.io.wfdb_out import check_output_fs

    out = check_output_path(out_dir)
    # As the command reads them: `formats="npz"` was taken letter by letter and ("NPZ",) matched no format, so
    # either run wrote no file and counted every ECG written.
    formats = parse_formats(formats if isinstance(formats, str) else ",".join(formats))
    check_output_fs(wfdb_fs)
    items = expand(conditions)
    total = generator.num_batches(conditions)
    settings = {**generator.settings(), "formats": formats, "wfdb_fs": wfdb_fs,
                "conditions": [{**c.as_dict(generator.conditioning.prompt_style), "count": c.count} for c in conditions],
                "provenance": provenance or {}}
    header_settings = {"sampler": generator.sampler.sampler, "steps": generator.sampler.steps,
                       "guidance_scale": generator.sampler.guidance_scale, "seed": generator.seed}
    with output_dir(out, command="sample", settings=settings, overwrite=overwrite, reads=generator.reads()) as run:
        if run.complete:
            # Process 0's: a host writing on a disk of its own has no manifest there (process 0 writes it alone).
            import jax

            shutil.rmtree(run.path / _PARTS, ignore_errors=True)  # a run killed after it completed left them
            return parallel.allgather_objects(read_json(run.path / MANIFEST, "sample manifest")
                                              if jax.process_index() == 0 else None)[0]
        # Made with the first part, not before: a run that fails before any (its embedding key refused) has
        # written nothing, and `output_dir` then removes the folder it claimed.
        parts = run.path / _PARTS
        local_done = sorted(int(p.stem.split("-")[1]) for p in parts.glob("batch-*.npz"))
        done = set().union(*map(set, parallel.allgather_objects(local_done)))
        remaining = [b for b in range(total) if b not in done]
        # At most (a host draws only its share of the batches): how many worker processes draw the PNGs.
        sheets = sum(len(items[b * generator.batch_size:(b + 1) * generator.batch_size])
                     for b in remaining) if "png" in formats else 0
        # A batch's part says its files are all written (a resumed run skips it), so it is saved once the batch's
        # PNGs are drawn: while the workers draw them, the next batch is generated and its records written.
        unsaved: list[tuple[Any, dict[str, str], list[Future]]] = []
        # Each host writes its share on its own; one that fails (its disk full) stops every host here, where the
        # others would wait for it at the next collective.
        with parallel.failing_together(), plot_workers(sheets) as plots:
            for batch in generator.generate(conditions, batches=remaining, progress=progress,
                                            run_cache=run.path / RUN_EMBEDDINGS):
                # An ECG with NaN or inf samples is a failed generation: no record or PNG here, and `_finish` leaves it
                # out of the NPZ.
                unusable = {row: reason for row, ecg in enumerate(batch.ecgs) if (reason := non_finite_reason(ecg))}
                unsaved.append((batch, *_write_batch_records(run.path, batch, formats, wfdb_fs, header_settings,
                                                             unusable, plots, getattr(generator, "reference", None))))
                while len(unsaved) > 1 or (unsaved and all(f.done() for f in unsaved[0][2])):
                    _save_part(run.path, *unsaved.pop(0))
            while unsaved:
                _save_part(run.path, *unsaved.pop(0))
        manifest = _finish(run.path, generator, items, total, formats, settings)
        run.mark_complete(count=manifest["count"])
        # The parts, now merged, go only once the run is recorded complete (on every host's disk): removed before,
        # a run killed before its manifest or its record was written found none and generated every ECG again.
        parallel.barrier("sample-complete")
        shutil.rmtree(run.path / _PARTS, ignore_errors=True)
    return manifest


@dataclasses.dataclass
class _PartsScan:
    """What `_finish`'s first pass keeps of the parts: a few numbers per ECG, in the parts' order, never an ECG."""

    position: np.ndarray  # (n,) each ECG's position in the request
    part: np.ndarray  # (n,) the index of the part that holds it
    row: np.ndarray  # (n,) its row in that part's `ecg`
    failed: dict[int, str]  # position -> why (NaN or inf samples)
    skipped: dict[str, str]  # what the parts recorded as skipped (sample name -> why)
    codes: dict[str, list[int]]  # code version (JSON) -> the positions it generated
    dtype: np.dtype  # of the merged `ecg`, as np.concatenate of the parts' would have it
    ecg_shape: tuple[int, ...]  # one ECG's, (1024, 12)


def _scan_parts(parts: Sequence[Path]) -> _PartsScan:
    """Read every part once, one at a time: positions, failures, skipped records and code versions."""
    positions, owners, rows = [], [], []
    dtypes: set[np.dtype] = set()  # one per part would be a million arguments to np.result_type
    failed: dict[int, str] = {}
    skipped: dict[str, str] = {}
    codes: dict[str, list[int]] = {}
    ecg_shape = ECG_SHAPE
    for index, part in enumerate(parts):
        with np.load(part) as data:
            position, ecg = data["position"], data["ecg"]
            # Which code version generated the part: a run resumed after an upgrade holds two (`io.run_dir`); a
            # part without one predates this record (version unknown).
            code = str(data["code"]) if "code" in data.files else "null"
            codes.setdefault(code, []).extend(int(p) for p in position)
            skipped.update(zip(data["skipped_name"].tolist(), data["skipped_why"].tolist(), strict=True))
        failed.update({int(p): reason for p, one in zip(position, ecg, strict=True) if (reason := non_finite_reason(one))})
        positions.append(position)
        owners.append(np.full(len(position), index, np.int64))
        rows.append(np.arange(len(position), dtype=np.int64))
        dtypes.add(ecg.dtype)
        ecg_shape = tuple(ecg.shape[1:])
    return _PartsScan(np.concatenate(positions) if positions else np.zeros((0,), np.int64),
                      np.concatenate(owners) if owners else np.zeros((0,), np.int64),
                      np.concatenate(rows) if rows else np.zeros((0,), np.int64), failed, skipped, codes,
                      np.result_type(*dtypes) if dtypes else np.dtype(np.float32), ecg_shape)


def _ecgs_in_order(parts: Sequence[Path], part_of: np.ndarray, row_of: np.ndarray) -> Iterator[np.ndarray]:
    """The ECGs `(part_of[i], row_of[i])` in that order, as blocks `(rows, 1024, 12)` of one part each.

    A part is loaded once per run of consecutive ECGs it holds: once in all when the parts hold whole blocks of
    positions (one host, or several on their own disks, resumed or not), more often if their positions ever
    interleave; either way memory holds one part's ECGs at a time.
    """
    if not len(part_of):
        return
    starts = np.flatnonzero(np.diff(part_of)) + 1
    for part, rows in zip(part_of[np.concatenate([[0], starts])], np.split(row_of, starts), strict=True):
        with np.load(parts[int(part)]) as data:
            ecg = data["ecg"]
        yield ecg[rows]


def _finish(out: Path, generator: Any, items: list[Condition], total: int, formats: list[str],
            settings: dict[str, Any]) -> dict[str, Any]:
    """Merge the per-batch parts into the NPZ, gather every process's summary, write the manifest (process 0).

    On a disk every host shares, process 0 sees every part and writes one `samples.npz`; on separate disks each
    process writes `samples-PPPPP-of-NNNNN.npz` of the batches only it holds.
    """
    import jax

    count, index = jax.process_count(), jax.process_index()
    parallel.barrier("sample-parts-written")  # every host's last part is on disk before anyone looks
    seen = sorted((out / _PARTS).glob("batch-*.npz"))
    visible = parallel.allgather_objects([p.name for p in seen])  # which parts each host can read
    if len(set(visible[0])) == total:  # one shared disk (or one host): process 0 merges everything
        mine = seen if index == 0 else []
        npz_name = "samples.npz"
    else:
        earlier = {name for names in visible[:index] for name in names}
        mine = [p for p in seen if p.name not in earlier]
        npz_name = f"samples-{index:05d}-of-{count:05d}.npz"
    parts = mine
    # Two passes over the parts, so that memory holds one part's ECGs (about 48 KB each) and a few numbers per
    # ECG, never the whole set: a request may ask for `MAX_ECGS`. The first decides the order and the failures.
    scan = _scan_parts(parts)
    local_skipped, local_codes = scan.skipped, scan.codes
    # Failed generations (NaN or inf samples) stay out of the NPZ, whichever run wrote their part.
    local_skipped.update({sample_name(p): reason for p, reason in scan.failed.items()})
    by_position = np.argsort(scan.position)
    order = by_position[~np.isin(scan.position[by_position], np.array(list(scan.failed), np.int64))].astype(np.int64)
    positions_arr = scan.position[order]
    if "npz" in formats and parts:
        chosen = [items[int(p)] for p in positions_arr]
        reference = getattr(generator, "reference", None)
        reference_arrays = {} if reference is None else {"reference": reference.reference.ecg,
                                                         "observed": reference.observed_mask()}
        ecg_arr = StreamedArray(scan.dtype, (len(order), *scan.ecg_shape),
                                _ecgs_in_order(parts, scan.part[order], scan.row[order]))
        _save_npz(out / npz_name, ecg=ecg_arr, position=positions_arr, **reference_arrays,
                  prompt=np.array([generator.prompt(c) for c in chosen], dtype=str),
                  report=np.array(["|".join(c.report) for c in chosen], dtype=str),
                  sex=np.array([c.sex for c in chosen], np.int32),
                  age=np.array([c.age for c in chosen], np.float32),
                  heart_rate=np.array([c.heart_rate for c in chosen], np.float32))
    summary = {"skipped": local_skipped, "npz": npz_name if "npz" in formats and parts else None,
               "codes": local_codes}
    gathered = parallel.allgather_objects(summary)
    parallel.barrier("sample-finished")
    # Every host has written its records, PNGs and NPZ, so a temporary left now is a killed earlier run's (a WFDB
    # staging folder, a half-written PNG or NPZ: ours, in this claimed folder); its file was written again. The
    # top folder only on process 0, which alone writes there from now on (the manifest, the run record).
    for folder in (out / WFDB_FOLDER, out / "plots", *((out,) if index == 0 else ())):
        remove_temporaries_in(folder)
    skipped = {name: why for s in gathered for name, why in s["skipped"].items()}
    by_code: dict[str, list[int]] = {}
    for s in gathered:
        for code, positions_of in s["codes"].items():
            by_code.setdefault(code, []).extend(positions_of)
    samples = []
    for position, condition in enumerate(items):
        name = sample_name(position)
        entry = {"name": name, **condition.as_dict(generator.conditioning.prompt_style)}
        if name not in skipped:
            if "wfdb" in formats:
                entry["wfdb"] = f"{WFDB_FOLDER}/{name}"
            if "png" in formats:
                entry["png"] = f"plots/{name}.png"
        samples.append(entry)
    manifest = {"count": len(items), "written": len(items) - len(skipped), "settings": settings,
                **({"reference": generator.reference.describe()} if getattr(generator, "reference", None) else {}),
                "skipped": skipped, "npz": [s["npz"] for s in gathered if s["npz"]],
                "processes": len(gathered), "samples": samples}
    if len(by_code) > 1:  # the samples came from more than one code version: say which from which
        manifest["samples_by_code"] = [{"code": json.loads(code), "samples": [sample_name(p) for p in sorted(ps)]}
                                       for code, ps in by_code.items()]
    if index == 0:
        write_json_atomic(out / MANIFEST, manifest)
    return manifest
