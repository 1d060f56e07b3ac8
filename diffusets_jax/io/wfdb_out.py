"""Generated ECGs as WFDB records that any PhysioNet tool (wfdb, WFDB toolkit, LightWAVE) can open.

A record is `NAME.hea` + `NAME.dat`: 12 signals named I, II, III, aVR, aVL, aVF, V1-V6 (standard order), units
mV, format 16 with a fixed gain of 1000 adu/mV (1 uV steps, +-32.767 mV range; MIMIC-IV-ECG uses 200 adu/mV,
so this loses nothing of the training data's resolution), sampled at the model's 102.4 Hz (1024 samples in
10 s) or, on request, FFT-resampled back to 500 Hz (5000 samples; the inverse of the preprocessing that made
the 1024-sample training signals). The generation conditions go into header comments as `key: value` lines,
e.g. `# prompt: Most importantly, ...`, `# sex: M`, `# age: 63`, `# heart_rate: 72.0`, `# seed: 0`. A header is
ASCII (wfdb reads it as such and drops every other character), so a value's other characters are written as
`\\uXXXX` (`\\UXXXXXXXX` beyond U+FFFF) and a backslash as `\\\\`: ASCII text reads as written, and
`read_record` gives back exactly the conditions that were written ("QTc \\u2265 500 ms" is "QTc ≥ 500 ms").

Each record is written atomically: both files go to a temporary folder beside the target and are moved into
place with `os.replace`, the header last, so a crash never leaves a header pointing at a partial signal file.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from diffusets_jax import __version__
from diffusets_jax.ecg.leads import STANDARD_LEADS, reorder_leads
from diffusets_jax.ecg.resample import resample_rate
from diffusets_jax.ecg.shapes import ECG_RATE_HZ
from diffusets_jax.ecg.units import non_finite_reason, to_millivolts

DURATION_S = 10.0
ADC_GAIN = 1000.0  # adu per mV
_ADC_LIMIT = 32767  # format 16; -32768 is WFDB's "no sample" marker
_RECORD_NAME = re.compile(r"^[-\w]+$")
_ESCAPED = re.compile(r"\\(\\|u[0-9a-f]{4}|U[0-9a-f]{8})")  # what `_ascii_escaped` writes, and only that
# The highest rate a record may be resampled to. The generated signal holds nothing above 51.2 Hz and clinical
# and research recorders sample at 250 Hz to a few kHz; far above that a rate is a typo (--wfdb-fs 500000 for
# 500 would write 5 million samples per lead and record).
MAX_OUTPUT_FS_HZ = 10_000.0
# The lowest: 100 Hz, PTB-XL's low-rate records and the lowest rate `sample --reference` accepts. The generated
# signal holds content up to 51.2 Hz (its 102.4 Hz rate's Nyquist frequency); below 100 Hz a record loses part of
# the QRS complex (which reaches 40 Hz and beyond), and far below it is no ECG at all (0.2 Hz: 2 samples in 10 s).
MIN_OUTPUT_FS_HZ = 100.0


def format_conditions(conditions: Mapping[str, Any]) -> list[str]:
    """Header comment lines `key: value` for the generation conditions, in the given order.

    `sex` given as 1 / 0 (the training encoding: 1 = male) is written as `M` / `F`; floats are written with
    up to 6 significant digits; newlines in values (multi-line reports) become ` | `; characters beyond ASCII and
    backslashes are escaped (module docstring), which `parse_conditions` undoes.
    """
    lines = []
    for key, value in conditions.items():
        if not re.fullmatch(r"[A-Za-z_][\w]*", str(key)):
            raise ValueError(f"condition name {key!r}: use letters, digits and underscores only")
        if key == "sex" and isinstance(value, int | float | np.integer | np.floating) and value in (0, 1):
            value = "M" if value == 1 else "F"
        elif isinstance(value, float | np.floating):
            value = f"{float(value):.6g}"
        text = " | ".join(part.strip() for part in str(value).splitlines()) if str(value) else ""
        lines.append(f"{key}: {_ascii_escaped(text)}")
    return lines


def _ascii_escaped(text: str) -> str:
    """`text` in ASCII: wfdb writes a header's comments as they are but reads them as ASCII, dropping the rest, so
    "Ischémie" came back as "Ischmie" and `evaluate --generated` scored against prompts that were never given."""
    return "".join(c if c.isascii() and c != "\\" else "\\\\" if c == "\\" else
                   f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}" for c in text)


def _unescaped(text: str) -> str:
    """Inverse of `_ascii_escaped`."""
    return _ESCAPED.sub(lambda m: "\\" if m.group(1) == "\\" else chr(int(m.group(1)[1:], 16)), text)


def parse_conditions(comments: Sequence[str]) -> dict[str, str]:
    """Inverse of `format_conditions` on a record's header comments (values stay strings)."""
    parsed = {}
    for line in comments:
        key, sep, value = line.partition(":")
        if sep and re.fullmatch(r"[A-Za-z_][\w]*", key.strip()):
            parsed[key.strip()] = _unescaped(value.strip())
    return parsed


def check_output_fs(output_fs: float | None) -> float | None:
    """`output_fs` if it is None (keep the model's rate) or a rate in [`MIN_OUTPUT_FS_HZ`, `MAX_OUTPUT_FS_HZ`] Hz;
    ValueError otherwise, in words a command can print as its one line (checked before any ECG is generated)."""
    if output_fs is not None and not MIN_OUTPUT_FS_HZ <= output_fs <= MAX_OUTPUT_FS_HZ:
        raise ValueError(f"--wfdb-fs must be a rate in Hz from {MIN_OUTPUT_FS_HZ:g} to {MAX_OUTPUT_FS_HZ:g} (e.g. 500; "
                         f"the model's own is 102.4), got {output_fs:g}")
    return output_fs


def prepare_signal(ecg: Any, fs: float = ECG_RATE_HZ, output_fs: float | None = None) -> tuple[np.ndarray, float]:
    """Check one ECG `(samples, 12)` in mV and resample it to `output_fs` if given -> `(signal, fs)`."""
    check_output_fs(output_fs)
    ecg = np.asarray(ecg, dtype=np.float64)
    if ecg.ndim != 2 or ecg.shape[1] != len(STANDARD_LEADS):
        raise ValueError(
            f"expected one ECG of shape (samples, 12) in standard lead order, got shape {ecg.shape}; "
            "a (12, samples) array needs transposing (the project is channels-last)"
        )
    reason = non_finite_reason(ecg)
    if reason:
        raise ValueError(reason)
    if output_fs is not None and output_fs != fs:
        ecg, fs = resample_rate(ecg, fs, output_fs, dtype=np.float64), float(output_fs)
    peak = float(np.max(np.abs(ecg))) if ecg.size else 0.0
    if peak * ADC_GAIN >= _ADC_LIMIT:
        raise ValueError(
            f"the ECG reaches {peak:.1f} mV, beyond the +-{_ADC_LIMIT / ADC_GAIN:.1f} mV a 16-bit record at "
            f"{ADC_GAIN:g} adu/mV holds; real ECGs stay within a few mV, so check the model output's units"
        )
    return ecg, fs


def write_record(
    path: str | os.PathLike,
    ecg: Any,
    *,
    fs: float = ECG_RATE_HZ,
    conditions: Mapping[str, Any] | None = None,
    output_fs: float | None = None,
) -> str:
    """Write one ECG `(samples, 12)` (mV, standard lead order, sampled at `fs`) as the WFDB record `path`
    (`dir/NAME`, no extension; NAME of letters, digits, `_` or `-`). `output_fs=500` resamples to 500 Hz.
    Returns the header path. An existing record of the same name is replaced atomically."""
    path = os.fspath(path)
    if path.endswith((".hea", ".dat")):
        path = path[:-4]
    directory, name = os.path.split(path)
    directory = directory or "."
    if not _RECORD_NAME.match(name):
        raise ValueError(f"record name {name!r}: WFDB names may contain only letters, digits, '_' and '-'")
    signal, signal_fs = prepare_signal(ecg, fs, output_fs)
    comments = [f"generator: diffusets-jax {__version__}"] + format_conditions(conditions or {})
    os.makedirs(directory, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=directory)
    try:
        _write_files(staging, name, signal, signal_fs, comments)
        os.replace(os.path.join(staging, f"{name}.dat"), os.path.join(directory, f"{name}.dat"))
        os.replace(os.path.join(staging, f"{name}.hea"), os.path.join(directory, f"{name}.hea"))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return os.path.join(directory, f"{name}.hea")


def _write_files(directory: str, name: str, signal: np.ndarray, fs: float, comments: Sequence[str]) -> None:
    """`name.dat` and `name.hea` in `directory`, the bytes `wfdb.wrsamp` writes for `signal` `(samples, 12)` mV as
    this module's records are (format 16, ADC_GAIN adu/mV, baseline 0, units mV, the standard leads; its test
    compares them). wrsamp itself took 37 ms a record, most of it looking up its field rules in pandas tables,
    which made the WFDB files of `sample` slower to write than a CPU generates the ECGs."""
    digital = np.round(signal * ADC_GAIN).astype(np.int64)  # wfdb's adc: x gain + baseline 0, half to even
    digital.astype("<i2").tofile(os.path.join(directory, f"{name}.dat"))  # frame by frame, 16-bit little-endian
    checksums = digital.sum(axis=0) % 65536
    # wfdb writes a whole rate (to 8 decimals) without its decimals, any other as Python prints the float
    fs_text = str(int(fs)) if round(fs, 8) == float(int(fs)) else str(fs)
    lines = [f"{name} {len(STANDARD_LEADS)} {fs_text} {len(signal)}"]
    lines += [f"{name}.dat 16 {float(ADC_GAIN)}(0)/mV 16 0 {digital[0, ch]} {checksums[ch]} 0 {lead}"
              for ch, lead in enumerate(STANDARD_LEADS)]
    lines += [f"# {comment}" for comment in comments]
    with open(os.path.join(directory, f"{name}.hea"), "w", encoding="utf-8") as header:
        header.writelines(f"{line}\n" for line in lines)


@dataclasses.dataclass
class WriteSummary:
    """Outcome of `write_records`: header paths written, and `skipped` {record name: reason}."""

    written: list[str] = dataclasses.field(default_factory=list)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)


def write_records(
    directory: str | os.PathLike,
    ecgs: Any,
    names: Sequence[str],
    conditions: Sequence[Mapping[str, Any]] | None = None,
    *,
    fs: float = ECG_RATE_HZ,
    output_fs: float | None = None,
) -> WriteSummary:
    """Write a batch `(batch, samples, 12)` as one record per ECG, `directory/names[i]`.

    A record that cannot be written (non-finite or out-of-range samples, a bad name) is skipped and counted
    in the summary with its reason; the rest of the batch is still written.
    """
    check_output_fs(output_fs)  # a bad rate is the caller's, not one record's: refused, not skipped
    ecgs = np.asarray(ecgs)
    if ecgs.ndim != 3:
        raise ValueError(f"ecgs: expected shape (batch, samples, 12), got {ecgs.shape}")
    if len(names) != ecgs.shape[0] or (conditions is not None and len(conditions) != ecgs.shape[0]):
        raise ValueError(
            f"{ecgs.shape[0]} ECGs need as many names ({len(names)} given) and conditions "
            f"({'none' if conditions is None else len(conditions)} given)"
        )
    summary = WriteSummary()
    for i, name in enumerate(names):
        try:
            summary.written.append(
                write_record(
                    os.path.join(os.fspath(directory), name),
                    ecgs[i],
                    fs=fs,
                    conditions=None if conditions is None else conditions[i],
                    output_fs=output_fs,
                )
            )
        except ValueError as err:
            summary.skipped[name] = str(err)
    return summary


@dataclasses.dataclass(frozen=True)
class EcgRecord:
    """A read record: `signal` `(samples, 12)` in mV, standard lead order; `fs` in Hz; header `conditions`."""

    signal: np.ndarray
    fs: float
    conditions: dict[str, str]


def read_record(path: str | os.PathLike) -> EcgRecord:
    """Read a 12-lead WFDB record (ours, MIMIC-IV-ECG, PTB-XL, CinC 2021; `path` with or without extension) into
    standard lead order, mV. Missing samples (NaN) are kept as NaN. ValueError saying what is wrong otherwise:
    damaged files (`data.records.read_wfdb_record`), units other than mV/uV/V, or leads missing from the 12."""
    from diffusets_jax.data.records import BadRecord, read_wfdb_record, record_base

    path = record_base(path)
    try:
        record = read_wfdb_record(path)
    except BadRecord as bad:
        raise ValueError(bad.detail) from None
    try:
        signal = reorder_leads(to_millivolts(np.asarray(record.p_signal, np.float64), record.units),
                               [str(n) for n in record.sig_name], allow_extra=True)
    except ValueError as err:  # an unknown unit, or lead names that are not the 12 standard ones
        raise ValueError(f"{path}: {err}") from None
    return EcgRecord(signal=signal, fs=float(record.fs), conditions=parse_conditions(record.comments or []))
