"""A small prepared dataset whose reports carry the downstream tasks' keywords, for the downstream benchmark.

Same schema as `tiny_ecg_dataset` (8-d text embeddings, recorded as the embedder `tiny_models.tiny_model_dir(path,
text_dim=8)` records, so that model fits it), but record `i`'s report depends on `i % 4`: 0 "Normal ECG", 1 premature ventricular
contractions, 2 and 3 other abnormal ECGs; no record mentions atrial fibrillation. PVC records carry wide 1.5 mV
spikes, so a classifier can learn the PVC task. Two consecutive records share a patient. One training ECG holds a
NaN (the benchmark must leave it out).
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from diffusets_jax.conditioning.spec import ConditioningSpec
from diffusets_jax.data.card import write_card
from diffusets_jax.ecg.shapes import ECG_LENGTH, NUM_LEADS
from tests.helpers.tiny_ecg_dataset import SyntheticSplits
from tests.helpers.tiny_models import openai_conditioning

EMBEDDING_DIM = 8
SPLIT_SIZES = {"train": 24, "validation": 12, "test": 12}
SPLIT_OFFSETS = {"train": 0, "validation": 1000, "test": 2000}
NAN_ECG_INDEX = 5
REPORTS = (
    ["Sinus rhythm", "Normal ECG"],
    ["Sinus rhythm", "Premature ventricular contractions", "Abnormal ECG"],
    ["Sinus tachycardia", "Abnormal ECG"],
    ["Sinus bradycardia", "Left axis deviation", "Abnormal ECG"],
)


def example(index: int) -> dict:
    kind = index % 4
    heart_rate = (70.0, 75.0, 110.0, 50.0)[kind] + index % 5
    t = np.arange(ECG_LENGTH, dtype=np.float32) / 102.4
    leads = np.linspace(0.3, 1.0, NUM_LEADS, dtype=np.float32)
    ecg = 0.3 * np.sin(2 * np.pi * heart_rate / 60.0 * t)[:, None] * leads[None, :]
    if kind == 1:
        for beat in (1.3 + index % 3, 5.1, 8.2):
            ecg += 1.5 * np.exp(-0.5 * ((t - beat) / 0.05) ** 2)[:, None] * leads[None, :]
    ecg = ecg + 0.02 * np.random.default_rng(index).standard_normal(ecg.shape)
    ecg = ecg.astype(np.float32)
    if index == NAN_ECG_INDEX:
        ecg[100, 2] = np.nan
    lines = REPORTS[kind]
    return {
        "ecg": ecg, "report_lines": lines, "prompt": "|".join(lines),
        "text_embedding": np.linspace(kind, kind + 1, EMBEDDING_DIM).astype(np.float32) / 4,
        "sex": index % 2, "age": 40.0 + index % 40, "heart_rate": heart_rate, "heart_rate_source": "rr",
        "subject_id": 50_000 + index // 2, "study_id": index, "record_path": f"files/r{index}",
    }


class TinyReportEcg(SyntheticSplits, tfds.core.GeneratorBasedBuilder):
    """`tiny_report_ecg`: train/validation/test with SPLIT_SIZES examples."""

    EMBEDDING_DIM, SPLIT_SIZES, SPLIT_OFFSETS = EMBEDDING_DIM, SPLIT_SIZES, SPLIT_OFFSETS
    make_example = staticmethod(example)


def build(data_dir: str) -> TinyReportEcg:
    """Prepare it under `data_dir` with its card; returns the builder (`builder.data_dir` is the dataset folder)."""
    builder = TinyReportEcg(data_dir=data_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=2))
    # The embedder `tiny_model_dir(path, text_dim=EMBEDDING_DIM)` records, so that model may take these vectors.
    embedder = openai_conditioning(EMBEDDING_DIM).embedder
    write_card(builder.data_dir, kind="prepared", name="tiny_report_ecg", config=None, version=str(builder.version),
               conditioning=ConditioningSpec(embedder, "ordered"), splits=SPLIT_SIZES)
    return builder
