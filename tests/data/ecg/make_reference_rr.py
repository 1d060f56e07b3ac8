"""Rebuild reference_rr.json: each fixture record's beats and mean RR, made without the project's detector.

Run from the repository root: `python tests/data/ecg/make_reference_rr.py` (needs wfdb and neurokit2, ~2 min).

Method: on the 500 Hz PTB-XL-layout copy, wfdb's XQRS and NeuroKit2's default detector (ecg_clean + ecg_peaks,
method "neurokit") run on every lead that is not flat (24 lead-detector pairs for a full record). All detections are
pooled and split where two consecutive ones are more than 60 ms apart; a group found by at least half of the pairs
is a beat, at the group's median sample. Every record was then inspected on a plot of leads I, II, V1, V4, V5 with
the beats marked; MANUAL_CORRECTIONS lists the one change made. Beats in the first and last ~0.2 s are often missed
by both detectors (their learning period and the record's edge): they are not part of the reference, which changes
the mean RR of a regular rhythm by well under 1%.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import wfdb

HERE = os.path.dirname(os.path.abspath(__file__))
GROUP_GAP_S = 0.06
MIN_SUPPORT = 0.5
# record -> beat sample indices to remove, with the reason seen on the plot.
MANUAL_CORRECTIONS = {
    "HR06001": ([4883], "the record ends in a constant run from sample 4949; the step into it is not a beat"),
}


def main() -> None:
    import neurokit2 as nk

    from diffusets_jax.ecg.qrs import FLAT_LEAD_MV, detect_qrs_xqrs

    truth = json.load(open(os.path.join(HERE, "truth.json")))
    out = {}
    for index, name in enumerate(truth, start=1):
        record = wfdb.rdrecord(os.path.join(HERE, "ptbxl", "records500", "00000", f"{index:05d}_hr"))
        signal, fs = np.nan_to_num(record.p_signal), float(record.fs)
        detections = []
        for lead in range(signal.shape[1]):
            x = signal[:, lead]
            if np.ptp(x) < FLAT_LEAD_MV:
                continue
            detections.append(detect_qrs_xqrs(x, fs))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _, info = nk.ecg_peaks(nk.ecg_clean(x, sampling_rate=int(fs)), sampling_rate=int(fs))
            detections.append(np.asarray(info["ECG_R_Peaks"], dtype=np.int64))
        pooled = np.sort(np.concatenate(detections))
        groups = np.split(pooled, np.flatnonzero(np.diff(pooled) > GROUP_GAP_S * fs) + 1)
        beats = [int(np.median(g)) for g in groups if len(g) >= MIN_SUPPORT * len(detections)]
        note = "consensus of XQRS and NeuroKit2 on all non-flat leads; inspected"
        if name in MANUAL_CORRECTIONS:
            removed, why = MANUAL_CORRECTIONS[name]
            beats = [b for b in beats if b not in removed]
            note += f"; removed {removed}: {why}"
        mean_rr_ms = float(np.mean(np.diff(beats))) / fs * 1000.0
        out[name] = {
            "beats_500hz": beats,
            "mean_rr_ms": round(mean_rr_ms, 3),
            "heart_rate_bpm": round(60000.0 / mean_rr_ms, 3),
            "truth_json_rr_ms": truth[name]["rr_ms"],
            "note": note,
        }
    with open(os.path.join(HERE, "reference_rr.json"), "w") as f:
        json.dump({"fs": 500.0, "method": __doc__.split("\n\n")[1].replace("\n", " "), "records": out}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
