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


class ReplayGenerator:
    """Stands in for `pipeline.ECGGenerator` in `io.outputs.sample_to_directory`: it "generates" the given ECGs, in
    order, so a test gets a samples.npz written by the sample writer itself with ECGs it chose, without a model."""

    def __init__(self, ecgs: np.ndarray, batch_size: int = 4) -> None:
        from diffusets_jax.conditioning.spec import ConditioningSpec, EmbedderSpec
        from diffusets_jax.diffusion.samplers import sampler_config

        self.ecgs = np.asarray(ecgs, np.float32)
        self.batch_size = batch_size
        self.seed = 0
        self.sampler = sampler_config("ddim", steps=1)
        self.conditioning = ConditioningSpec(EmbedderSpec("openai", "replay", 1), "ordered", "normalised")

    def prompt(self, condition) -> str:
        return condition.prompt(self.conditioning.prompt_style)

    def settings(self) -> dict:
        import hashlib

        return {"replay": hashlib.sha256(self.ecgs.tobytes()).hexdigest(), "batch_size": self.batch_size}

    def reads(self) -> list:
        return []  # no model directory, no embedding cache

    def num_batches(self, conditions) -> int:
        from diffusets_jax.conditioning.requests import expand

        return -(-len(expand(conditions)) // self.batch_size)

    def generate(self, conditions, *, progress: bool = False, batches=None, run_cache=None):  # replays: embeds nothing
        from diffusets_jax.conditioning.requests import expand
        from diffusets_jax.pipeline import GeneratedBatch

        items = expand(conditions)
        if len(items) != len(self.ecgs):
            raise ValueError(f"{len(items)} conditions for {len(self.ecgs)} ECGs")
        for index in range(self.num_batches(conditions)) if batches is None else batches:
            start = index * self.batch_size
            chunk = items[start : start + self.batch_size]
            yield GeneratedBatch(index, start, chunk, [self.prompt(c) for c in chunk],
                                 self.ecgs[start : start + len(chunk)])


def write_samples(out_dir: Path, conditions: Sequence, ecgs: np.ndarray) -> Path:
    """`ecgs` with `conditions` (one ECG each) as a samples.npz, written by `diffusets-jax sample`'s own writer."""
    from diffusets_jax.io.outputs import sample_to_directory

    sample_to_directory(ReplayGenerator(ecgs), conditions, out_dir, formats=("npz",), progress=False)
    return out_dir / "samples.npz"


def write_generated(out_dir: Path, reports: Sequence[str], ecgs: np.ndarray, sexes: Sequence[str],
                    ages: Sequence[float], rates: Sequence[float]) -> Path:
    """A samples.npz as `diffusets-jax sample` writes it (through its own writer)."""
    from diffusets_jax.conditioning.requests import make_condition

    conditions = [make_condition(r, s, a, h) for r, s, a, h in zip(reports, sexes, ages, rates, strict=True)]
    return write_samples(out_dir, conditions, ecgs)


REPORTS = ["Sinus rhythm|Normal ECG", "Sinus bradycardia", "Atrial fibrillation|Abnormal ECG",
           "Sinus tachycardia|Left axis deviation|Abnormal ECG", "Sinus rhythm|Right bundle branch block",
           "Sinus rhythm|Left ventricular hypertrophy|ST-T abnormality"]


def write_kit_inputs(root: Path) -> dict[str, Path]:
    """A samples.npz of 6 generated ECGs (REPORTS) and a real NPZ of 8 ECGs, two of them recorded with the
    conditions of generated ECGs 0 and 1 (so a kit must not show them), one with a NaN sample (index 5)."""
    rng = np.random.default_rng(7)
    generated = write_generated(root / "gen", REPORTS, ecg_like(rng, 6), ["M", "F", "M", "F", "M", "F"],
                                [50, 61, 72, 45, 39, 80], [70, 52, 101, 118, 66, 75])
    real_ecg = ecg_like(rng, 8)
    real_ecg[5, 100, 3] = np.nan
    reports = REPORTS[:2] + [f"Sinus rhythm|record {i}" for i in range(2, 8)]
    np.savez(root / "real_records.npz", ecg=real_ecg, report=np.array(reports), sex=np.array([1, 0, 1, 1, 0, 0, 1, 0]),
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


def outside_streams(data: bytes) -> bytes:
    """A PDF without its streams' bytes: the object dictionaries and trailer, where metadata keys live (a
    compressed page or image can hold any three bytes, `/ID` included)."""
    return _STREAM.sub(b"stream\nendstream", data)


def png_outside_image_data(data: bytes) -> bytes:
    """A PNG without its compressed pixels (the IDAT chunks' data): the header and every other chunk, text
    chunks included, where words could be read."""
    kept, position = [data[:8]], 8
    while position + 8 <= len(data):
        end = position + 12 + int.from_bytes(data[position:position + 4], "big")
        kept.append(data[position:position + 8] if data[position + 4:position + 8] == b"IDAT" else data[position:end])
        position = end
    return b"".join(kept)


def decompressed_streams(data: bytes) -> bytes:
    """Every zlib stream of a PDF, decompressed and concatenated."""
    out = []
    for raw in _STREAM.findall(data):
        try:
            out.append(zlib.decompress(raw))
        except zlib.error:
            out.append(raw)
    return b"\n".join(out)
