"""A patient's own recording as a reference for posterior sampling, editing and digital twins.

`read_reference` reads a WFDB record (any lead order and spelling, any subset of the 12 leads, any rate of
at least 100 Hz; leads beyond the 12, `ecg.leads.EXTRA_LEADS` such as a 15-lead record's vx, vy, vz, are passed
by), converts it to millivolts, maps its leads onto the standard order, checks that it is a
10-second recording (or takes a 10 s window of a longer one), and FFT-resamples it to the model's
(1024, 12) time base exactly as training data were (`ecg.resample.resample_to_length`). Leads the record
lacks, and leads that are flat (a disconnected electrode) or have no sample at all, are zero in `ecg`
and left out of `leads`, so an observation built from `leads` never asks the sampler to reproduce them.
A lead with a few missing samples (a dropout, samples clipped at the ADC's limit) is kept: its gaps are
bridged for resampling and marked in `missing`, so an observation leaves just those samples unobserved.
Every problem is a one-line ValueError naming the record.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from diffusets_jax.data.records import FLAT_LEAD_MV, BadRecord, read_record_mv, record_base
from diffusets_jax.ecg.leads import STANDARD_LEADS, UnknownLeadError, canonical_lead_name, is_extra_lead
from diffusets_jax.ecg.resample import resample_to_length
from diffusets_jax.ecg.shapes import ECG_LENGTH, ECG_SECONDS
from diffusets_jax.ecg.units import check_millivolts

# Below 100 Hz a record lacks content the model's 102.4 Hz time base represents (up to 51.2 Hz); PTB-XL's
# low-rate files are exactly 100 Hz and are accepted.
MIN_REFERENCE_RATE_HZ = 100.0
# As in data preparation (`data.records.DecodeOptions`): a whole 10 s recording, within 0.1 s.
DURATION_TOLERANCE_S = 0.1


@dataclasses.dataclass(frozen=True)
class Reference:
    """A recording on the model's time base.

    ecg: `(1024, 12)` float32, mV, standard lead order; zero in every lead not in `leads`.
    leads: the usable leads, standard spelling, standard order.
    excluded: lead -> why it is not usable ("absent", "flat", "missing samples": none recorded).
    missing: `(1024, 12)` bool, True where a usable lead's sample is not recorded (within one sample of the time
    base of a missing sample of the record): `ecg` bridges those gaps linearly, an observation leaves them out.
    fs: the record's sampling rate (Hz); source: where it came from; start_s: where the 10 s were taken from a
    longer record (seconds), None for a whole 10 s record.
    """

    ecg: np.ndarray
    leads: tuple[str, ...]
    excluded: dict[str, str]
    fs: float
    source: str
    start_s: float | None = None
    missing: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((ECG_LENGTH, len(STANDARD_LEADS)), bool))

    def recorded(self) -> np.ndarray:
        """`ecg` `(1024, 12)` with NaN in every lead not in `leads` and every `missing` sample: what the recording
        has, for drawing it (a zero lead drawn as a 0 mV trace reads as a recorded flat lead)."""
        shown = self.ecg.astype(np.float32, copy=True)
        shown[:, [i for i, lead in enumerate(STANDARD_LEADS) if lead not in self.leads]] = np.nan
        shown[self.missing] = np.nan
        return shown


def reference_from_array(signal: np.ndarray, fs: float, lead_names: Sequence[str], *, start_s: float | None = None,
                         source: str = "reference", start_flag: str = "start_s") -> Reference:
    """A Reference from a signal `(samples, n_leads)` in mV at `fs` Hz with one name per column.

    start_s: take the 10 s starting there from a longer recording (None: the record must last 10 s).
    start_flag: what the messages call start_s (the command's `--reference-start`, whose users have no start_s).
    """
    signal = np.asarray(signal, np.float64)
    if signal.ndim != 2:
        raise ValueError(f"{source}: expected a (samples, leads) signal, got shape {signal.shape}")
    if signal.shape[1] != len(lead_names):
        raise ValueError(f"{source}: {signal.shape[1]} signal columns but {len(lead_names)} lead names")
    # A 15-lead record (PTB's, with the Frank leads vx, vy, vz) or one with V7-V9 or right-sided leads has the
    # standard leads beside them: those are read, the others passed by (they used to refuse the whole record and
    # ask for a rename). Any other name is a lead this reader does not know, and is refused as before.
    extra = [is_extra_lead(name) for name in lead_names]
    if all(extra):
        raise ValueError(f"{source}: none of its leads ({', '.join(map(str, lead_names))}) is one of the standard 12 "
                         f"({', '.join(STANDARD_LEADS)})")
    signal = signal[:, [i for i, skip in enumerate(extra) if not skip]]
    canonical: list[str] = []
    for name in (name for name, skip in zip(lead_names, extra, strict=True) if not skip):
        try:
            canonical.append(canonical_lead_name(name))
        except UnknownLeadError as err:
            raise ValueError(f"{source}: {err}; rename the signal in the header") from None
    repeated = sorted({lead for lead in canonical if canonical.count(lead) > 1})
    if repeated:
        raise ValueError(f"{source}: lead(s) {', '.join(repeated)} appear more than once")
    fs = float(fs)
    if not fs >= MIN_REFERENCE_RATE_HZ:
        raise ValueError(f"{source}: sampling rate {fs:g} Hz is below {MIN_REFERENCE_RATE_HZ:g} Hz; the model works at "
                         f"{ECG_LENGTH / ECG_SECONDS:g} Hz (1024 samples over 10 s) and needs a record at least that fine")
    duration = signal.shape[0] / fs
    if start_s is None:
        if abs(duration - ECG_SECONDS) > DURATION_TOLERANCE_S:
            raise ValueError(f"{source}: {signal.shape[0]} samples at {fs:g} Hz last {duration:.2f} s; the model needs a "
                             f"{ECG_SECONDS:g} s recording (pass {start_flag} to take {ECG_SECONDS:g} s of a longer one)")
    else:
        if not 0.0 <= float(start_s) <= duration - ECG_SECONDS + DURATION_TOLERANCE_S:
            raise ValueError(f"{source}: {start_flag}={start_s:g} leaves less than {ECG_SECONDS:g} s of the "
                             f"{duration:.2f} s record; use 0 <= {start_flag} <= {max(duration - ECG_SECONDS, 0.0):.2f}")
        first = int(round(float(start_s) * fs))
        signal = signal[first:first + int(round(ECG_SECONDS * fs))]
    excluded: dict[str, str] = {lead: "absent" for lead in STANDARD_LEADS if lead not in canonical}
    columns: dict[str, np.ndarray] = {}
    gaps: dict[str, np.ndarray] = {}
    for lead, column in zip(canonical, signal.T, strict=True):
        finite = np.isfinite(column)
        if not finite.any():
            excluded[lead] = "missing samples"
        elif float(column[finite].max() - column[finite].min()) < FLAT_LEAD_MV:
            excluded[lead] = "flat"
        else:
            # One missing sample used to leave out the whole lead. The gaps are bridged (FFT resampling needs every
            # sample) and left unobserved on the model's time base instead.
            gaps[lead] = _missing_on_time_base(~finite)
            if gaps[lead].all():
                excluded[lead] = "missing samples"
                continue
            samples = np.arange(len(column))
            columns[lead] = np.interp(samples, samples[finite], column[finite]) if not finite.all() else column
    if not columns:
        raise ValueError(f"{source}: no usable lead ({', '.join(f'{k}: {v}' for k, v in excluded.items() if v != 'absent')})")
    usable = tuple(lead for lead in STANDARD_LEADS if lead in columns)
    stacked = np.stack([columns[lead] for lead in usable], axis=1)
    check_millivolts(stacked, what=source)
    ecg = np.zeros((ECG_LENGTH, len(STANDARD_LEADS)), np.float32)
    ecg[:, [STANDARD_LEADS.index(lead) for lead in usable]] = resample_to_length(stacked, ECG_LENGTH, axis=0)
    missing = np.zeros(ecg.shape, bool)
    for lead in usable:
        missing[:, STANDARD_LEADS.index(lead)] = gaps[lead]
    ordered_excluded = {lead: excluded[lead] for lead in STANDARD_LEADS if lead in excluded}
    return Reference(ecg=ecg, leads=usable, excluded=ordered_excluded, fs=fs, source=source,
                     start_s=None if start_s is None else float(start_s), missing=missing)


def _missing_on_time_base(missing: np.ndarray, length: int = ECG_LENGTH) -> np.ndarray:
    """`(length,)` bool: the samples of the model's time base within one of its steps of a missing sample of a lead
    (`missing` `(samples,)` bool over the whole 10 s): their resampled values lean on the bridged gap."""
    if not missing.any():
        return np.zeros((length,), bool)
    reach = int(np.ceil(len(missing) / length))  # one time-base step, in the record's samples
    near = np.convolve(missing.astype(np.int64), np.ones(2 * reach + 1, np.int64), mode="same") > 0
    positions = np.minimum(np.round(np.arange(length) * len(missing) / length).astype(np.int64), len(missing) - 1)
    return near[positions]


def read_reference(record_path: str | os.PathLike, *, start_s: float | None = None, start_flag: str = "start_s"
                   ) -> Reference:
    """Read a WFDB record (path with or without .hea/.dat/.mat) as a Reference; see `reference_from_array`."""
    path = record_base(record_path)
    try:
        signal, fs, names = read_record_mv(path)
    except BadRecord as bad:
        # The reader's details name the file they are about; prefix the record where they do not.
        raise ValueError(bad.detail if path in bad.detail else f"{path}: {bad.detail}") from None
    return reference_from_array(signal, fs, names, start_s=start_s, source=path, start_flag=start_flag)
