import json
import os

import numpy as np
import pytest
import wfdb

from diffusets_jax.ecg.heart_rate import heart_rate_from_rr, heart_rate_from_xqrs, record_heart_rate
from diffusets_jax.ecg.resample import resample_to_length

ECG_DATA = os.path.join(os.path.dirname(__file__), "data", "ecg")
TRUTH = json.load(open(os.path.join(ECG_DATA, "truth.json")))


def read_ptbxl(name: str) -> np.ndarray:
    """Fixture record by source name, standard lead order, 500 Hz, mV (PTB-XL layout)."""
    index = list(TRUTH).index(name) + 1
    return wfdb.rdrecord(os.path.join(ECG_DATA, "ptbxl", "records500", "00000", f"{index:05d}_hr")).p_signal


@pytest.mark.parametrize(
    "rr, expected",
    [(1000, 60.0), (300, 200.0), (1500, 40.0), (299.9, None), (1500.1, None), (0, None), (65535, None),
     (None, None), (float("nan"), None), ("n/a", None)],
)
def test_rr_interval_rule(rr, expected):
    bpm = heart_rate_from_rr(rr)
    assert bpm == pytest.approx(expected) if expected is not None else bpm is None


def test_xqrs_matches_truth_on_lead_two():
    # truth.json's rr_ms is what XQRS found on lead II at 500 Hz.
    for name in ("E07500", "HR06002", "JS20010"):
        signal = read_ptbxl(name)
        bpm, lead = heart_rate_from_xqrs(signal[:, 1:2], 500.0)
        assert lead == 0
        assert bpm == pytest.approx(60000.0 / TRUTH[name]["rr_ms"], rel=1e-6)


def test_xqrs_moves_on_to_the_next_lead():
    signal = read_ptbxl("E07503")  # XQRS finds no beats on lead II of this record
    assert TRUTH["E07503"]["rr_ms"] is None
    assert heart_rate_from_xqrs(signal[:, 1:2], 500.0) is None
    bpm, lead = heart_rate_from_xqrs(signal[:, [1, 6, 7]], 500.0)
    assert lead in (1, 2) and 95 < bpm < 160  # a sinus tachycardia
    flat_first = np.concatenate([np.zeros((5000, 1)), read_ptbxl("E07500")[:, 1:2]], axis=1)
    assert heart_rate_from_xqrs(flat_first, 500.0)[1] == 1


def test_xqrs_gives_none_without_beats():
    rng = np.random.default_rng(0)
    assert heart_rate_from_xqrs(np.zeros((5000, 12)), 500.0) is None
    assert heart_rate_from_xqrs(0.02 * rng.standard_normal((5000, 3)), 500.0) is None
    with pytest.raises(ValueError):
        heart_rate_from_xqrs(np.zeros(5000), 500.0)


def test_xqrs_at_the_generated_rate():
    # The HR metric runs XQRS on (1024, 12) records at 102.4 Hz. At that rate XQRS often counts T waves too
    # (E07500: ~115 bpm for a 57 bpm rhythm), a property of the published metric, not of this wrapper.
    signal = resample_to_length(read_ptbxl("HR06000"), 1024)
    bpm, lead = heart_rate_from_xqrs(signal, 102.4)
    assert lead == 0 and 40.0 < bpm < 200.0


def test_record_heart_rate_prefers_a_valid_rr_interval():
    signal = read_ptbxl("JS20004")
    assert record_heart_rate(800.0, signal, 500.0) == (pytest.approx(75.0), "rr")
    bpm, source = record_heart_rate(65535, signal, 500.0)
    # The first lead with two detections is lead I (truth's RR is lead II's): the same rhythm, ~104-113 bpm.
    assert source == "xqrs" and bpm == heart_rate_from_xqrs(signal, 500.0)[0]
    assert bpm == pytest.approx(60000.0 / TRUTH["JS20004"]["rr_ms"], rel=0.1)
    assert record_heart_rate(0, np.zeros((5000, 12)), 500.0) is None
