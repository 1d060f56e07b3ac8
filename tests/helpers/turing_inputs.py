"""Inputs for Turing-kit tests: ECG-like signals, a samples.npz written by the real sample writer, a real NPZ, and
text extraction from matplotlib PDFs (so tests can see what a booklet page says)."""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def ecg_like(rng: np.random.Generator, n: int, rate_bpm: float = 70.0) -> np.ndarray:
    """(n, 1024, 12) mV at 102.4 Hz: QRS-like pulses at about `rate_bpm`, lead-specific gains, a little noise."""
    t = np.arange(1024) / 102.4
    out = np.empty((n, 1024, 12), np.float32)
    for i in range(n):
        beats = np.arange(rng.uniform(0.2, 0.6), 10.0, 60.0 / (rate_bpm * rng.uniform(0.8, 1.2)))
        pulse = sum(np.exp(-0.5 * ((t - b) / 0.025) ** 2) for b in beats)
        out[i] = pulse[:, None] * rng.uniform(-0.5, 1.5, 12)[None] + 0.02 * rng.standard_normal((1024, 12))
    return out


def write_generated(out_dir: Path, reports: Sequence[str], ecgs: np.ndarray, sexes: Sequence[str],
                    ages: Sequence[float], rates: Sequence[float]) -> Path:
    """A samples.npz as `diffusets-jax sample` writes it (through its own writer)."""
    from diffusets_jax.generate import make_condition, write_samples

    conditions = [make_condition(r, s, a, h) for r, s, a, h in zip(reports, sexes, ages, rates, strict=True)]
    write_samples(out_dir, conditions, ecgs, formats=("npz",))
    return out_dir / "samples.npz"


REPORTS = ["Sinus rhythm|Normal ECG", "Sinus bradycardia", "Atrial fibrillation|Abnormal ECG",
           "Sinus tachycardia|Left axis deviation|Abnormal ECG", "Sinus rhythm|Right bundle branch block",
           "Sinus rhythm|Left ventricular hypertrophy|ST-T abnormality"]


def write_kit_inputs(root: Path) -> dict[str, Path]:
    """A samples.npz of 6 generated ECGs (REPORTS) and a real NPZ of 8 ECGs, two of them recorded with the
    conditions of generated ECGs 0 and 1 (so a kit must not show them), one with a NaN sample (index 5)."""
    from diffusets_jax.conditioning.prompts import ordered_prompt

    rng = np.random.default_rng(7)
    generated = write_generated(root / "gen", REPORTS, ecg_like(rng, 6), ["M", "F", "M", "F", "M", "F"],
                                [50, 61, 72, 45, 39, 80], [70, 52, 101, 118, 66, 75])
    real_ecg = ecg_like(rng, 8)
    real_ecg[5, 100, 3] = np.nan
    prompts = [ordered_prompt(REPORTS[0]), ordered_prompt(REPORTS[1])] + [ordered_prompt(f"Sinus rhythm|record {i}")
                                                                        for i in range(2, 8)]
    np.savez(root / "real_records.npz", ecg=real_ecg, prompt=np.array(prompts), sex=np.array([1, 0, 1, 1, 0, 0, 1, 0]),
             age=np.array([50, 61, 33, 44, 55, 66, 77, 88], np.float32),
             heart_rate=np.array([70, 52, 60, 65, 70, 75, 80, 85], np.float32))
    return {"generated": generated, "real": root / "real_records.npz"}


# matplotlib writes "stream\n" DATA "\nendstream"; DATA may itself end in "\r", so no "\r?" here.
_STREAM = re.compile(rb"stream\n(.*?)\nendstream", re.S)


def pdf_page_texts(path: Path) -> list[str]:
    """The text shown on each page of a matplotlib PDF, one line per text object (BT ... ET): the strings of its
    TJ arrays joined (matplotlib splits words into kerned pieces, so a plain byte search misses them). Glyphs
    drawn from a second font, such as the "fi" ligature, come back as one unreadable character: see `shows`."""
    data = path.read_bytes()
    texts = []
    for raw in _STREAM.findall(data):
        try:
            content = zlib.decompress(raw)
        except zlib.error:
            continue
        lines = []
        for block in re.findall(rb"\nBT\n(.*?)\nET\n", content, re.S):
            strings = [string for array in re.findall(rb"\[(.*?)\]\s*TJ", block, re.S)
                       for string in re.findall(rb"\(((?:\\.|[^\\)])*)\)", array)]
            lines.append(b"".join(strings).replace(b"\\(", b"(").replace(b"\\)", b")").decode("latin-1"))
        if lines:
            texts.append("\n".join(lines))
    return texts


def shows(page_text: str, text: str) -> bool:
    """Whether `page_text` (from `pdf_page_texts`) contains `text`, a ligature (fi, fl, ff, ffi, ffl) matching
    the one character it was drawn as."""
    pattern = re.sub("ffi|ffl|ff|fi|fl", lambda m: f"(?:{m.group(0)}|.)", re.escape(text))
    return re.search(pattern, page_text) is not None


def decompressed_streams(data: bytes) -> bytes:
    """Every zlib stream of a PDF, decompressed and concatenated."""
    out = []
    for raw in _STREAM.findall(data):
        try:
            out.append(zlib.decompress(raw))
        except zlib.error:
            out.append(raw)
    return b"\n".join(out)
