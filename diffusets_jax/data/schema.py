"""The one schema every prepared or generated ECG example follows.

Prepared datasets (the TFDS builders in `data_prep/`) and synthetic corpora (`diffusets-jax sample
--corpus`) both use it, so a downstream classifier reads real and synthetic records with one reader.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from diffusets_jax.ecg.shapes import ECG_LENGTH, NUM_LEADS

HEART_RATE_SOURCES = ("rr", "qrs", "xqrs", "condition")  # machine RR, consensus QRS detection, published XQRS, or generation input


def ecg_features(embedding_dim: int) -> tfds.features.FeaturesDict:
    """Features of one example; `embedding_dim` is the text embedder's output size (1536 ada-002, 384 MiniLM).

    - `ecg` (1024, 12) float32, millivolts, standard lead order I, II, III, aVR, aVL, aVF, V1-V6
    - `report_lines`: the report statements in order; `prompt`: the ordered prompt built from them
    - `text_embedding` (embedding_dim,) float32: the prompt's embedding
    - `sex` int32 (1 = male, 0 = female), `age` float32 (years), `heart_rate` float32 (bpm)
    - `heart_rate_source`: one of HEART_RATE_SOURCES
    - `subject_id`, `study_id` int64; `record_path`: the source record, relative to the manual dir
    """
    return tfds.features.FeaturesDict(
        {
            "ecg": tfds.features.Tensor(shape=(ECG_LENGTH, NUM_LEADS), dtype=np.float32),
            "report_lines": tfds.features.Sequence(tfds.features.Text()),
            "prompt": tfds.features.Text(),
            "text_embedding": tfds.features.Tensor(shape=(embedding_dim,), dtype=np.float32),
            "sex": tfds.features.Scalar(dtype=np.int32),
            "age": tfds.features.Scalar(dtype=np.float32),
            "heart_rate": tfds.features.Scalar(dtype=np.float32),
            "heart_rate_source": tfds.features.Text(),
            "subject_id": tfds.features.Scalar(dtype=np.int64),
            "study_id": tfds.features.Scalar(dtype=np.int64),
            "record_path": tfds.features.Text(),
        }
    )
