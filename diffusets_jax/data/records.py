"""Decode one source ECG record into a training example's signal and heart rate, or say why it is unusable.

Shared by every dataset builder in `data_prep/` and free of TensorFlow, so decoding worker processes start
fast. A record is described by a `RecordCandidate` (path + metadata from the source's tables); `decode_record`
reads its WFDB files, checks them, reorders the leads by name, converts to millivolts, computes the heart rate
(reference spec section 3) and resamples the whole 10 s to (1024, 12). Anything wrong raises `BadRecord`
with one of `SKIP_REASONS`, which builds count instead of dying.

`decode_chunk_cached` does this for a chunk of candidates and stores the result atomically in a decode cache,
so an interrupted build never decodes a finished chunk again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zipfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from diffusets_jax.conditioning.patient import AGE_RANGE
from diffusets_jax.ecg.heart_rate import record_heart_rate
from diffusets_jax.ecg.leads import (
    STANDARD_LEADS,
    LeadNameError,
    MissingLeadError,
    UnknownLeadError,
    canonical_lead_name,
    derive_limb_leads,
    lead_permutation,
)
from diffusets_jax.ecg.qrs import FLAT_LEAD_MV
from diffusets_jax.ecg.resample import resample_to_length
from diffusets_jax.ecg.shapes import ECG_LENGTH, ECG_SECONDS
from diffusets_jax.ecg.units import MAX_PLAUSIBLE_MV, check_millivolts, millivolt_factor, to_millivolts

# Why a record was skipped. Metadata reasons are checked before the files are read (cheap); the rest in the
# order a reader meets them.
SKIP_REASONS: tuple[str, ...] = (
    "missing_demographics",  # subject absent from the demographics table (no age and no sex)
    "missing_age",
    "implausible_age",  # outside conditioning.patient.AGE_RANGE, where `sample` would refuse it too
    "missing_sex",
    "missing_report",  # no report statement (all report columns empty, or no Dx code we can name)
    "missing_header",
    "unreadable_header",
    "missing_signal_file",
    "truncated_signal_file",
    "unreadable_signal",
    "too_few_leads",  # one of the 12 standard leads is absent
    "unknown_lead_names",  # a lead name we cannot map and the 12 standard leads are not all there
    "unknown_units",
    "wrong_duration",  # not a whole 10 s recording
    "nan_lead",  # a lead with no finite sample
    "saturated_signal",  # samples clipped at the ADC's limit (`saturated_samples`): their true values are unknown
    "flat_lead",  # a lead spanning < FLAT_LEAD_MV (disconnected electrode); only with flat_leads="skip"
    "implausible_amplitude",  # not millivolts after unit conversion (wrong gain in the header)
    "no_heart_rate",  # RR interval unusable and QRS detection found < 2 beats
)

# Bytes per sample of the WFDB storage formats whose file size we can predict (to tell truncated files).
_BYTES_PER_SAMPLE: dict[str, float] = {
    "8": 1, "16": 2, "61": 2, "80": 1, "160": 2, "24": 3, "32": 4, "212": 1.5, "310": 4 / 3, "311": 4 / 3,
}


class BadRecord(Exception):
    """A record that cannot become an example; `reason` is one of SKIP_REASONS, `detail` says what was seen."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class RecordCandidate:
    """One source record and its metadata, as listed by a builder from the source's tables.

    `record_path` is relative to the manual dir and has no extension (the WFDB record name). `age`/`sex` are
    None when the source lacks them; `rr_ms` is the machine RR interval where the source has one.
    `strat_fold` is PTB-XL's recommended fold (None elsewhere).
    """

    record_path: str
    subject_id: int
    study_id: int
    age: float | None
    sex: int | None  # 1 = male, 0 = female
    report_lines: tuple[str, ...]
    rr_ms: float | None = None
    strat_fold: int | None = None
    subject_known: bool = True  # False: the subject is absent from the demographics table
    # True where age, sex and report come from the record's own header (the Challenge's comment lines): missing
    # ones may then mean an unreadable header, which is what a skip must name.
    metadata_in_header: bool = False


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """How records are turned into examples; part of the decode-cache fingerprint."""

    length: int = ECG_LENGTH
    seconds: float = ECG_SECONDS
    duration_tolerance_s: float = 0.1
    flat_lead_mv: float = FLAT_LEAD_MV
    # "keep": records with flat leads are written (as the reference does) and counted in the build report;
    # "skip": they are skipped as `flat_lead`. Real data have them: Chapman-Shaoxing records such as JS20004
    # carry all-zero V2/V4/V6, and the fixture's documented defects expect JS20004 to be written.
    flat_leads: str = "keep"

    def __post_init__(self) -> None:
        if self.flat_leads not in ("keep", "skip"):
            raise ValueError(f"flat_leads must be 'keep' or 'skip', got {self.flat_leads!r}")


@dataclasses.dataclass(frozen=True)
class DecodedRecord:
    """A usable record: `ecg` (1024, 12) float32 mV in standard lead order, heart rate and where it came from.

    `heart_rate_lead` is the standard-order lead index the "xqrs_first_lead" method used; -1 when the RR interval
    or the multi-lead consensus (the default) gave the rate.
    """

    ecg: np.ndarray
    heart_rate: float
    heart_rate_source: str
    heart_rate_lead: int
    flat_leads: tuple[str, ...] = ()
    derived_leads: tuple[str, ...] = ()  # limb leads computed from I and II (`ecg.leads.derive_limb_leads`)


def check_metadata(candidate: RecordCandidate) -> None:
    """Raise BadRecord for a candidate whose table metadata already rules it out (no file access)."""
    if not candidate.subject_known:
        raise BadRecord("missing_demographics", f"subject {candidate.subject_id} is not in the demographics table")
    if candidate.age is None or not np.isfinite(candidate.age):
        raise BadRecord("missing_age", f"no age for subject {candidate.subject_id}")
    if not AGE_RANGE[0] <= candidate.age <= AGE_RANGE[1]:
        raise BadRecord("implausible_age", f"age {candidate.age:g} of subject {candidate.subject_id} is outside "
                                           f"{AGE_RANGE[0]:g}-{AGE_RANGE[1]:g} years")
    if candidate.sex not in (0, 1):
        raise BadRecord("missing_sex", f"no sex for subject {candidate.subject_id}")
    if not candidate.report_lines:
        raise BadRecord("missing_report", "no report statements")


WFDB_EXTENSIONS = (".hea", ".dat", ".mat")  # a record's header and its signal files (format 16, CinC's MATLAB)


def record_base(path: str | os.PathLike) -> str:
    """A WFDB record's path without extension (`dir/NAME`, what wfdb reads), given that or one of its files."""
    path = os.fspath(path)
    return os.path.splitext(path)[0] if path.endswith(WFDB_EXTENSIONS) else path


def _check_signal_files(header, record_path: str) -> None:  # noqa: ANN001 (a wfdb Record or header)
    """BadRecord if the header is empty, or a signal file it names is missing or shorter than it implies."""
    header_path = record_path + ".hea"
    _check_declares_signals(header, header_path)
    directory = os.path.dirname(record_path)
    offsets = header.byte_offset or [0] * header.n_sig
    expected_bytes: dict[str, float] = {}
    for file_name, fmt, offset in zip(header.file_name, header.fmt, offsets, strict=True):
        if fmt not in _BYTES_PER_SAMPLE or expected_bytes.get(file_name, 0.0) < 0:
            expected_bytes[file_name] = -1.0  # unpredictable size (compressed formats): let wfdb judge
            continue
        expected_bytes[file_name] = expected_bytes.get(file_name, float(offset or 0)) + header.sig_len * _BYTES_PER_SAMPLE[fmt]
    for file_name, expected in expected_bytes.items():
        path = os.path.join(directory, file_name)
        if not os.path.exists(path):
            raise BadRecord("missing_signal_file", f"{path} does not exist (named in {header_path})")
        if expected > 0 and os.path.getsize(path) < int(expected):
            raise BadRecord(
                "truncated_signal_file", f"{path} has {os.path.getsize(path)} bytes, header implies {int(expected)}"
            )


def _check_declares_signals(header, header_path: str) -> None:  # noqa: ANN001 (a wfdb Record or header)
    if not header.n_sig or not header.sig_len or not header.fs or not header.file_name:
        raise BadRecord("unreadable_header", f"{header_path} declares no signals, length or sampling rate")
    if len(header.file_name) != header.n_sig:  # wfdb then fails reading the signals with a bare IndexError
        raise BadRecord("unreadable_header", f"{header_path} declares {header.n_sig} signals on its record line but "
                                             f"describes {len(header.file_name)} on signal lines")


def check_header(record_path: str):  # noqa: ANN201 (a wfdb header)
    """A record's parsed header, or BadRecord if it is missing, cannot be parsed, or declares no signals; nothing
    else is read."""
    import wfdb

    header_path = record_path + ".hea"
    if not os.path.exists(header_path):
        raise BadRecord("missing_header", f"{header_path} does not exist")
    try:
        header = wfdb.rdheader(record_path)
    except Exception as err:  # wfdb raises bare ValueError/IndexError/... on malformed input
        raise BadRecord("unreadable_header", f"{header_path} cannot be read as a WFDB header "
                                             f"({type(err).__name__}: {err})") from None
    _check_declares_signals(header, header_path)
    return header


def _header_text(record_path: str) -> str:
    """A record's header as text: UTF-8, else Latin-1 (older exporters). WFDB headers are meant to be ASCII, and wfdb
    reads one dropping every other byte, but exports write microvolts as 'µV': wfdb read that as 'V', a signal a
    million times too large, which was skipped as not millivolts (or refused as a reference) with a message blaming
    a header that was right."""
    with open(record_path + ".hea", "rb") as handle:
        raw = handle.read()
    try:
        return raw.decode("utf-8-sig")  # a byte-order mark, as Windows tools write, is no part of the record line
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _units_as_written(record_path: str, units: list[str]) -> list[str]:
    """`units` as wfdb read them from a record's header, with each one wfdb shortened by dropping its non-ASCII
    characters ('µV' -> 'V', see `_header_text`) as the header writes it."""
    from wfdb.io import header as wfdb_header

    try:
        lines, _ = wfdb_header.parse_header_content(_header_text(record_path))
    except (OSError, ValueError):
        return units
    signals = [wfdb_header.rx_signal.match(line) for line in lines[1:]]
    if len(signals) != len(units) or any(signal is None for signal in signals):
        return units  # a header wfdb reads otherwise (multi-segment): its units are left as wfdb gave them
    return [signal["units"] if signal["units"] != unit and signal["units"].encode("ascii", "ignore").decode() == unit
            else unit for signal, unit in zip(signals, units, strict=True)]


@dataclasses.dataclass(frozen=True)
class Format16Record:
    """What `read_wfdb_record` gives of a record `_read_format16` read: wfdb.Record's fields the readers use."""

    p_signal: np.ndarray  # (samples, signals) float64, physical units, NaN where a sample is missing
    fs: float
    sig_name: list[str]
    units: list[str]
    comments: list[str]
    # Per signal, how many of its samples were clipped at the ADC's limit (`saturated_samples`); NaN in p_signal.
    saturated: tuple[int, ...] = ()


# A clipped (saturated) ADC holds its limit while the true signal lies beyond. Where a format's limits are not the
# converter's own they tell nothing: `wfdb.wrsamp`'s automatic gain maps every signal's own extremes onto format 16's
# limits, so such a record has its tallest R peak at 32767, and a clean (synthetic, simulated) one may hold its
# extreme there for a whole baseline. A sample at format 16's limit is clipped only where it lies beyond a plausible
# ECG amplitude (at MIMIC-IV-ECG's 200 adu/mV the limit is 164 mV). Where the limits are the converter's own (a
# header's ADC resolution narrower than the format, or a 12-bit-or-narrower format such as 212), a run this long at
# the limit is a clip too: an R peak's top is never flat for 20 ms.
SATURATION_RUN_S = 0.02
_CONVERTER_FORMATS = frozenset({"80", "508", "212", "310", "311"})  # formats as narrow as the ADCs that use them


def _rail_limits(fmt: str, adc_res: int | None, adc_zero: int | None, digital: np.ndarray
                 ) -> tuple[float, float, bool] | None:
    """The lowest and highest valid digital value of a signal (`digital` (samples,), NaN where missing) in WFDB
    format `fmt`, and whether they are the converter's own (see SATURATION_RUN_S): the format's range less its "no
    sample" value, or the header's narrower ADC resolution around its ADC zero where every sample lies within it.
    None for a format without a fixed range (8: first differences)."""
    from wfdb.io._signal import INVALID_SAMPLE_VALUE, SAMPLE_VALUE_RANGE

    if fmt not in SAMPLE_VALUE_RANGE or INVALID_SAMPLE_VALUE.get(fmt) is None:
        return None
    low, high = SAMPLE_VALUE_RANGE[fmt]
    if INVALID_SAMPLE_VALUE[fmt] == low:
        low += 1
    converter = fmt in _CONVERTER_FORMATS
    if adc_res and adc_res < int(np.log2(high - low + 2)):  # a 12-bit converter stored in 16-bit words
        zero = adc_zero or 0
        res_low, res_high = zero - 2 ** (adc_res - 1), zero + 2 ** (adc_res - 1) - 1
        finite = digital[np.isfinite(digital)]
        # A header whose resolution its own samples exceed is wrong about it: the format's range holds then.
        if res_low >= low and res_high <= high and (not finite.size or (finite.min() >= res_low and finite.max() <= res_high)):
            low, high, converter = res_low, res_high, True
    return float(low), float(high), converter


def saturated_samples(digital: np.ndarray, physical_mv: np.ndarray, fs: float,
                      limits: Sequence[tuple[float, float, bool] | None]) -> np.ndarray:
    """Which samples of `digital` (samples, signals) (NaN where missing) were clipped by the ADC: `(samples, signals)`
    bool. A sample at its signal's `limits` (`_rail_limits`) is clipped where its value in mV (`physical_mv`, NaN
    where the units are unknown) is beyond `units.MAX_PLAUSIBLE_MV`, or, at a converter's own limits, where it is
    part of a run of at least SATURATION_RUN_S (3 samples at least) there."""
    clipped = np.zeros(digital.shape, bool)
    run = max(3, int(round(SATURATION_RUN_S * fs)))
    for column, bounds in enumerate(limits):
        if bounds is None:
            continue
        low, high, converter = bounds
        for rail in (low, high):
            at = digital[:, column] == rail
            if not at.any():
                continue
            clipped[:, column] |= at & (np.abs(physical_mv[:, column]) > MAX_PLAUSIBLE_MV)
            if not converter:
                continue
            edges = np.flatnonzero(np.diff(np.concatenate([[0], at.astype(np.int8), [0]])))
            for start, stop in zip(edges[::2], edges[1::2], strict=True):
                if stop - start >= run:
                    clipped[start:stop, column] = True
    return clipped


def _mv_or_nan(physical: np.ndarray, units: Sequence[str]) -> np.ndarray:
    """`physical` (samples, signals) in mV, NaN in a signal of unknown units (the reader refuses those later)."""
    factors = []
    for unit in units:
        try:
            factors.append(millivolt_factor(unit))
        except ValueError:
            factors.append(np.nan)
    return physical * np.asarray(factors)


def _read_format16(record_path: str) -> Format16Record | None:
    """The record as `wfdb.rdrecord` reads it, the same values, for the headers 12-lead sources write (MIMIC-IV-ECG,
    PTB-XL, CinC 2021, ours): one signal file in format 16, every gain, baseline and unit given. wfdb's reader spent
    8.5 of its 9.5 ms a record looking up its field rules in pandas tables, most of a record's decoding time in
    `prepare`. Its own header grammar and line splitting are used here (`wfdb.io.header`); any other header, or
    anything amiss (a missing or short signal file), gives None, and wfdb reads or diagnoses the record as before."""
    from wfdb.io import header as wfdb_header

    try:
        lines, comments = wfdb_header.parse_header_content(_header_text(record_path))
    except (OSError, ValueError):
        return None
    record = wfdb_header.rx_record.match(lines[0]) if lines else None
    if (record is None or record["n_seg"] or record["counter_freq"] or record["base_counter"]
            or not record["fs"] or not record["sig_len"] or int(record["n_sig"]) != len(lines) - 1):
        return None
    signals = [wfdb_header.rx_signal.match(line) for line in lines[1:]]
    if not signals or any(signal is None for signal in signals) or any(
            signal["fmt"] != "16" or signal["samps_per_frame"] not in ("", "1") or signal["skew"] not in ("", "0")
            or not signal["adc_gain"] or signal["baseline"] == "" or not signal["units"] for signal in signals):
        return None
    if len({(signal["file_name"], signal["byte_offset"]) for signal in signals}) != 1:
        return None
    try:
        gains = np.array([float(signal["adc_gain"]) for signal in signals])
        baselines = np.array([int(signal["baseline"]) for signal in signals])
        fs, length = float(record["fs"]), int(record["sig_len"])
    except ValueError:
        return None
    if not (gains > 0).all() or not fs > 0:  # gain 0: uncalibrated, for wfdb's defaults to settle
        return None
    path = os.path.join(os.path.dirname(record_path), signals[0]["file_name"])
    offset, count = int(signals[0]["byte_offset"] or 0), length * len(signals)
    try:
        if os.path.getsize(path) < offset + 2 * count:
            return None
        digital = np.fromfile(path, dtype="<i2", count=count, offset=offset).reshape(length, len(signals))
    except (OSError, ValueError):
        return None
    physical = digital.astype(np.float64)  # wfdb's dac, in its order: minus the baseline, over the gain
    np.subtract(physical, baselines, physical)
    np.divide(physical, gains, physical)
    physical[digital == -32768] = np.nan  # format 16's "no sample"
    units = [signal["units"] for signal in signals]
    as_float = np.where(digital == -32768, np.nan, digital.astype(np.float64))
    limits = [_rail_limits("16", _int_or_none(signal["adc_res"]), _int_or_none(signal["adc_zero"]), as_float[:, column])
              for column, signal in enumerate(signals)]
    clipped = saturated_samples(as_float, _mv_or_nan(physical, units), fs, limits)
    physical[clipped] = np.nan
    return Format16Record(physical, fs, [signal["sig_name"] for signal in signals], units,
                          [line.strip(" \t#") for line in comments], tuple(int(n) for n in clipped.sum(axis=0)))


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text not in (None, "") else None
    except ValueError:
        return None


def _without_saturation(record) -> Format16Record:  # noqa: ANN001 (a wfdb.Record)
    """A record wfdb read as a `Format16Record`, its samples clipped at the ADC's limit (`saturated_samples`) NaN.
    Its digital values are recovered from the physical ones (wfdb's adc: x gain + baseline, exact for any gain)."""
    physical = np.array(record.p_signal, dtype=np.float64)
    units = list(record.units or [])
    n_sig = physical.shape[1]
    fields = [list(getattr(record, name, None) or []) for name in ("fmt", "adc_gain", "baseline", "adc_res", "adc_zero")]
    clipped = np.zeros(physical.shape, bool)
    if all(len(values) == n_sig for values in fields[:3]) and len(units) == n_sig:
        fmts, gains, baselines = fields[:3]
        res = fields[3] if len(fields[3]) == n_sig else [None] * n_sig
        zeros = fields[4] if len(fields[4]) == n_sig else [None] * n_sig
        limits, digital = [], np.full(physical.shape, np.nan)
        for column in range(n_sig):
            if not gains[column] or gains[column] <= 0:  # uncalibrated: no digital values to recover
                limits.append(None)
                continue
            digital[:, column] = np.round(physical[:, column] * gains[column] + baselines[column])
            limits.append(_rail_limits(str(fmts[column]), res[column], zeros[column], digital[:, column]))
        clipped = saturated_samples(digital, _mv_or_nan(physical, units), float(record.fs), limits)
        physical[clipped] = np.nan
    return Format16Record(physical, float(record.fs), list(record.sig_name), units, list(record.comments or []),
                          tuple(int(n) for n in clipped.sum(axis=0)))


def read_wfdb_record(record_path: str) -> Format16Record:
    """wfdb.rdrecord (path without extension, physical values), or BadRecord saying what is wrong with the files:
    a missing or unreadable header, a missing signal file or one shorter than its header implies (where wfdb's own
    error would be e.g. "cannot reshape array of size 500 into shape (12)"). Format-16 records of one signal file
    are read here, the same values ten times faster (`_read_format16`). Samples clipped at the ADC's limit are NaN
    (`saturated_samples`), counted per signal in `saturated`."""
    fast = _read_format16(record_path)
    if fast is not None:
        return _upright_inverted_leads(fast)
    import wfdb

    # Read first and diagnose only on failure (a missing or unparseable header is named by `check_header`): wfdb's
    # header parsing is the slowest part of a read, and a separate rdheader would parse every header twice.
    try:
        record = wfdb.rdrecord(record_path)
    except Exception as err:  # wfdb raises bare ValueError/IndexError/... on malformed input
        _check_signal_files(check_header(record_path), record_path)
        raise BadRecord("unreadable_signal", f"{record_path}: {type(err).__name__}: {err}") from None
    _check_signal_files(record, record_path)
    if record.units:
        record.units = _units_as_written(record_path, list(record.units))
    return _upright_inverted_leads(_without_saturation(record))


def _standard_name(name: str) -> str | None:
    try:
        return canonical_lead_name(name)
    except UnknownLeadError:
        return None


def _upright_inverted_leads(record: Format16Record) -> Format16Record:
    """`record` with each inverted lead ('-aVR', as Cabrera-order exports name it) turned upright under its own name,
    or dropped where the record has that lead too (it holds nothing else). Read as a lead of another name, '-aVR'
    skipped the record as `unknown_lead_names`, and a reference's message asked to rename it to aVR: upside down."""
    names = [str(name) for name in record.sig_name]
    inverted = {i: _standard_name(name.strip()[1:]) for i, name in enumerate(names) if name.strip().startswith("-")}
    inverted = {i: lead for i, lead in inverted.items() if lead is not None}
    if not inverted:
        return record
    present = {_standard_name(name) for name in names} - {None}
    signal = np.array(record.p_signal, dtype=np.float64)
    keep = [i for i in range(len(names)) if i not in inverted or inverted[i] not in present]
    for i in inverted:
        signal[:, i] = -signal[:, i]
    saturated = record.saturated or (0,) * len(names)
    return Format16Record(signal[:, keep], float(record.fs), [inverted.get(i, names[i]) for i in keep],
                          [record.units[i] for i in keep], list(record.comments or []),
                          tuple(saturated[i] for i in keep))


def _record_mv(record_path: str) -> tuple[Format16Record, np.ndarray]:
    """`read_wfdb_record` and its signal `(samples, signals)` float64 in mV; BadRecord for unknown units."""
    record = read_wfdb_record(record_path)
    try:
        signal_mv = to_millivolts(np.asarray(record.p_signal, dtype=np.float64), record.units)
    except ValueError as err:
        raise BadRecord("unknown_units", f"{record_path}.hea: {err}") from None
    return record, signal_mv


def read_record_mv(record_path: str) -> tuple[np.ndarray, float, list[str]]:
    """Read a WFDB record (path without extension) -> (signal (n, leads) float64 mV, fs, lead names).

    Raises BadRecord for a missing/unreadable header, missing/truncated/unreadable signal files and unknown
    units. Lead order is as stored. Missing samples, and samples clipped at the ADC's limit, are NaN.
    """
    record, signal_mv = _record_mv(record_path)
    return signal_mv, float(record.fs), list(record.sig_name)


def decode_record(manual_dir: str, candidate: RecordCandidate, options: DecodeOptions = DecodeOptions()) -> DecodedRecord:
    """Turn one candidate into a DecodedRecord, or raise BadRecord naming the first problem found."""
    record_path = os.path.join(manual_dir, candidate.record_path)
    try:
        check_metadata(candidate)
    except BadRecord:
        if candidate.metadata_in_header:  # read the header only here: wfdb's parsing is the slow part of a read
            check_header(record_path)
        raise
    record, signal_mv = _record_mv(record_path)
    fs, stored_names = float(record.fs), list(record.sig_name)
    # An 8-lead record (I, II, V1-V6, as many devices store) has all 12: its other limb leads are exact combinations.
    signal_mv, lead_names, derived = derive_limb_leads(signal_mv, stored_names)
    # (A derived lead is clipped where I or II is, and those are checked themselves.)
    saturated = (record.saturated or (0,) * len(stored_names)) + (0,) * len(derived)
    try:
        order = lead_permutation(lead_names, allow_extra=True)
    except MissingLeadError as err:
        unknown = []
        for name in lead_names:
            try:
                canonical_lead_name(name)
            except UnknownLeadError:
                unknown.append(name)
        reason = "unknown_lead_names" if unknown else "too_few_leads"
        raise BadRecord(reason, f"{record_path}: {err}") from None
    except LeadNameError as err:  # duplicated lead names
        raise BadRecord("unknown_lead_names", f"{record_path}: {err}") from None
    signal_mv = signal_mv[:, order]
    # A clipped stretch has no true value to train on: NaN, it would become 0 mV (`resample_to_length`'s rule) in the
    # middle of a QRS complex or a wander; kept at the limit, a spike of tens of mV that the amplitude check, a 99th
    # percentile, lets through. The record is skipped, and counted.
    clipped = [(lead, saturated[column]) for lead, column in zip(STANDARD_LEADS, order, strict=True) if saturated[column]]
    if clipped:
        raise BadRecord("saturated_signal", f"{record_path}: samples at the ADC's limit (clipped) in lead(s) "
                                            + ", ".join(f"{lead} ({count})" for lead, count in clipped))
    duration = signal_mv.shape[0] / fs
    if abs(duration - options.seconds) > options.duration_tolerance_s:
        raise BadRecord(
            "wrong_duration", f"{record_path}: {signal_mv.shape[0]} samples at {fs:g} Hz = {duration:.3f} s, expected {options.seconds:g} s"
        )
    finite = np.isfinite(signal_mv)
    flat_leads = []
    for lead_index, lead in enumerate(STANDARD_LEADS):
        if not finite[:, lead_index].any():
            raise BadRecord("nan_lead", f"{record_path}: lead {lead} has no finite sample")
        values = signal_mv[finite[:, lead_index], lead_index]
        if float(values.max() - values.min()) < options.flat_lead_mv:
            flat_leads.append(lead)
    if flat_leads and (options.flat_leads == "skip" or len(flat_leads) == len(STANDARD_LEADS)):
        raise BadRecord("flat_lead", f"{record_path}: lead(s) {', '.join(flat_leads)} span < {options.flat_lead_mv} mV")
    try:
        check_millivolts(signal_mv, what=record_path)
    except ValueError as err:
        raise BadRecord("implausible_amplitude", str(err)) from None
    rate = record_heart_rate(candidate.rr_ms, signal_mv, fs)
    if rate is None:
        raise BadRecord(
            "no_heart_rate", f"{record_path}: RR interval {candidate.rr_ms} unusable and QRS detection found < 2 beats"
        )
    ecg = resample_to_length(signal_mv, options.length, axis=0, dtype=np.float32)
    return DecodedRecord(
        ecg=ecg, heart_rate=float(rate.bpm), heart_rate_source=rate.source, heart_rate_lead=rate.lead,
        flat_leads=tuple(flat_leads), derived_leads=derived,
    )


# ---------------------------------------------------------------------------------------------------------
# Chunks and the decode cache


@dataclasses.dataclass(frozen=True)
class ChunkResult:
    """Decoded chunk: per candidate either an entry of the ok arrays or a skip reason.

    `ok_index` (k,) positions (in the chunk) of usable records; `ecg` (k, 1024, 12) float32; `heart_rate`,
    `heart_rate_source`, `heart_rate_lead` (k,). `skip_reason`/`skip_detail` (n,) are '' for usable records.
    """

    ok_index: np.ndarray
    ecg: np.ndarray
    heart_rate: np.ndarray
    heart_rate_source: np.ndarray
    heart_rate_lead: np.ndarray
    flat_leads: np.ndarray
    skip_reason: np.ndarray
    derived_leads: np.ndarray  # (k,) per usable record, the limb leads computed from I and II ("III,aVR", or '')
    skip_detail: np.ndarray
    reused: bool = False


# 2: consensus QRS heart rate; 3: implausible_age; 4: unreadable headers of metadata_in_header records. Part of every
# dataset card's `records_fingerprint` (through `chunk_fingerprint`): changed, every dataset prepared before would look
# built from other records and be refused without --overwrite. So it stays; decoding changes bump DECODER_VERSION.
CACHE_FORMAT_VERSION = 4
# Bump when decoding changes. 5: heart rates clear of gaps in every lead, 'µV' headers, inverted leads (2026-12-07);
# 6: records clipped at their ADC's limit skipped (`saturated_signal`); 8-lead records' limb leads derived.
# In each decoded chunk's cache file name (`chunk_cache_name`), not in the card: a prepare resumed with a newer decoder
# decodes again what an older one cached instead of mixing the two decoders' records in one dataset, and a complete
# dataset is still recognised as built from the same records.
DECODER_VERSION = 6


def file_stamps(manual_dir: str, candidates: Sequence[RecordCandidate]) -> list[tuple[tuple[str, int, int], ...]]:
    """Per candidate, (extension, size, mtime_ns) of each of its files that exists (`WFDB_EXTENSIONS` beside its
    record path): what tells a record file fixed or replaced since a chunk was decoded.

    Size and modification time, the test make and rsync use, not a hash of the content: hashing every file would
    read the whole download (about 90 GB for MIMIC-IV-ECG) on every prepare, to find out that nothing changed. A
    copy that keeps the times (mv, cp -a, rsync -a) is still the same records; one that does not (cp -r) is decoded
    again. Signal files named otherwise than the record (a multi-file WFDB record) are not stamped; a change of
    which files a header names changes the header, which is."""
    stamps = []
    for candidate in candidates:
        base = os.path.join(manual_dir, candidate.record_path)
        found = []
        for extension in WFDB_EXTENSIONS:
            try:
                stat = os.stat(base + extension)
            except OSError:  # absent (a record has no .mat, or no .dat), or unreadable: decoding says which
                continue
            found.append((extension, stat.st_size, stat.st_mtime_ns))
        stamps.append(tuple(found))
    return stamps


_CANDIDATE_FIELDS = tuple(field.name for field in dataclasses.fields(RecordCandidate))
_LEGACY_FIELDS = tuple(name for name in _CANDIDATE_FIELDS if name != "metadata_in_header")


def _fields(candidate: RecordCandidate, names: tuple[str, ...] = _CANDIDATE_FIELDS) -> dict[str, Any]:
    """`dataclasses.asdict(candidate)` restricted to `names`, as JSON writes it. Not `asdict` itself: its deep copy
    of every value was most of a fingerprint's time (3.5 of 4.9 s per 50k records, measured 2026-12-06), and every
    field holds a scalar or a tuple of strings, which JSON writes the same either way."""
    return {name: getattr(candidate, name) for name in names}


def chunk_fingerprint(candidates: Sequence[RecordCandidate], options: DecodeOptions,
                      stamps: Sequence[tuple[tuple[str, int, int], ...]]) -> str:
    """Hash of everything that determines a chunk's decoded content: its records' paths and metadata, their files'
    `file_stamps` (given in the order of `candidates`) and the decode options."""
    if len(stamps) != len(candidates):
        raise ValueError(f"{len(stamps)} file stamps for {len(candidates)} records")
    payload = json.dumps(
        {"v": CACHE_FORMAT_VERSION, "options": dataclasses.asdict(options),
         "records": [_fields(c) for c in candidates], "files": [list(s) for s in stamps]},
        sort_keys=True, default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def chunk_cache_name(split: str, index: int, candidates: Sequence[RecordCandidate], options: DecodeOptions,
                     stamps: Sequence[tuple[tuple[str, int, int], ...]]) -> str:
    """The decode cache file name of chunk `index` of `split`: its `chunk_fingerprint` and the `DECODER_VERSION`."""
    return f"{split}-{index:06d}-{chunk_fingerprint(candidates, options, stamps)}-d{DECODER_VERSION}.npz"


def legacy_chunk_fingerprint(candidates: Sequence[RecordCandidate], options: DecodeOptions) -> str:
    """`chunk_fingerprint` as diffusets-jax computed it until 2026-12-06 (cache format 3, without file stamps), kept
    only to recognise the datasets it recorded: without it, every dataset prepared before would be refused as
    "built from other records" on its next `prepare`, and rebuilding MIMIC-IV-ECG takes hours."""
    # Candidates as they were then: `metadata_in_header` came with cache format 4.
    records = [_fields(c, _LEGACY_FIELDS) for c in candidates]
    payload = json.dumps({"v": 3, "options": dataclasses.asdict(options), "records": records}, sort_keys=True,
                         default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


_LISTING_BLOCK = 4096  # records per chunk fingerprint in a listing's: part of the recorded value


def listing_fingerprint(candidates: Sequence[RecordCandidate], options: DecodeOptions,
                        stamps: Sequence[tuple[tuple[str, int, int], ...]]) -> str:
    """A dataset card's `records_fingerprint`: `chunk_fingerprint` of each block of a whole listing's records, in
    order, hashed together."""
    digest = hashlib.sha256()
    for start in range(0, len(candidates), _LISTING_BLOCK):
        digest.update(chunk_fingerprint(candidates[start : start + _LISTING_BLOCK], options,
                                        stamps[start : start + _LISTING_BLOCK]).encode())
    return digest.hexdigest()[:24]


def legacy_listing_fingerprint(candidates: Sequence[RecordCandidate], options: DecodeOptions) -> str:
    """`listing_fingerprint` as dataset cards recorded it until 2026-12-06 (`legacy_chunk_fingerprint`)."""
    digest = hashlib.sha256()
    for start in range(0, len(candidates), _LISTING_BLOCK):
        digest.update(legacy_chunk_fingerprint(candidates[start : start + _LISTING_BLOCK], options).encode())
    return digest.hexdigest()[:24]


def decode_chunk(manual_dir: str, candidates: Sequence[RecordCandidate], options: DecodeOptions) -> ChunkResult:
    """Decode every candidate of a chunk; bad records are recorded, never raised."""
    ok_index, ecgs, rates, sources, leads, flats, derived = [], [], [], [], [], [], []
    reasons, details = [], []
    for position, candidate in enumerate(candidates):
        try:
            decoded = decode_record(manual_dir, candidate, options)
        except BadRecord as bad:
            reasons.append(bad.reason)
            details.append(bad.detail)
            continue
        ok_index.append(position)
        ecgs.append(decoded.ecg)
        rates.append(decoded.heart_rate)
        sources.append(decoded.heart_rate_source)
        leads.append(decoded.heart_rate_lead)
        flats.append(",".join(decoded.flat_leads))
        derived.append(",".join(decoded.derived_leads))
        reasons.append("")
        details.append("")
    return ChunkResult(
        ok_index=np.asarray(ok_index, dtype=np.int64),
        ecg=np.stack(ecgs) if ecgs else np.zeros((0, options.length, len(STANDARD_LEADS)), np.float32),
        heart_rate=np.asarray(rates, dtype=np.float32),
        heart_rate_source=np.asarray(sources, dtype=str),
        heart_rate_lead=np.asarray(leads, dtype=np.int64),
        flat_leads=np.asarray(flats, dtype=str),
        skip_reason=np.asarray(reasons, dtype=str),
        skip_detail=np.asarray(details, dtype=str),
        derived_leads=np.asarray(derived, dtype=str),
    )


def _load_chunk(path: str, ecg: bool = True) -> ChunkResult | None:
    """A cached chunk, or None when it is missing or damaged (it is decoded again). `ecg=False` leaves the ECGs, 48 KB
    a record and nearly all of the file, on disk (`ecg` is then empty): what counting and the build report read,
    where MIMIC-IV-ECG's cache is about 39 GB, read once more for each."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            return ChunkResult(**{field: stored[field] if field != "ecg" or ecg else np.zeros((0, 0, 0), np.float32)
                                  for field in ("ok_index", "ecg", "heart_rate", "heart_rate_source", "heart_rate_lead",
                                                "flat_leads", "skip_reason", "skip_detail", "derived_leads")},
                              reused=True)
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):  # a damaged cache file is decoded again
        return None


def decode_chunk_cached(
    manual_dir: str, candidates: Sequence[RecordCandidate], options: DecodeOptions, cache_path: str | None
) -> ChunkResult:
    """`decode_chunk`, reusing `cache_path` if a previous run finished this exact chunk; writes atomically.

    The cache file name should be `chunk_cache_name(...)` so a changed record list, option or decoder never
    reuses stale content. `cache_path=None` disables caching.
    """
    if cache_path is not None and os.path.exists(cache_path):
        cached = _load_chunk(cache_path)
        if cached is not None and len(cached.skip_reason) == len(candidates):
            return cached
    result = decode_chunk(manual_dir, candidates, options)
    if cache_path is not None:
        from diffusets_jax.io.files import atomic_path

        with atomic_path(cache_path) as temporary, open(temporary, "wb") as handle:  # no torn or shared chunk
            np.savez(handle, **{f.name: getattr(result, f.name) for f in dataclasses.fields(result) if f.name != "reused"})
    return result


def decode_chunk_task(task: tuple[str, Sequence[RecordCandidate], DecodeOptions, str | None]) -> ChunkResult:
    """Picklable single-argument form of `decode_chunk_cached` for process pools and Beam."""
    return decode_chunk_cached(*task)


def decode_chunk_to_cache(task: tuple[str, Sequence[RecordCandidate], DecodeOptions, str]) -> int:
    """Decode a chunk into its cache file (unless already there); returns its number of usable records.

    What local build workers run: the decoded arrays stay on disk instead of travelling back to the parent, and a
    chunk already there is counted without reading its ECGs.
    """
    manual_dir, candidates, options, cache_path = task
    cached = _load_chunk(cache_path, ecg=False) if os.path.exists(cache_path) else None
    if cached is not None and len(cached.skip_reason) == len(candidates):
        return len(cached.ok_index)
    return len(decode_chunk_cached(manual_dir, candidates, options, cache_path).ok_index)
