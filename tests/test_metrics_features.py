"""The evaluation feature space (diffusets_jax/metrics/features.py): what the CLIP's ECG tower is given."""

import numpy as np
import pytest

from diffusets_jax.metrics.features import clip_ecg_features
from tests.test_metrics_clip_score import random_variables, small_clip


def test_ecgs_off_the_clips_time_base_or_layout_are_named_before_any_features():
    """Net1D mean-pools, so it takes any length: 500 Hz records (n, 5000, 12) gave features silently, and every
    learned-feature score computed on them was meaningless."""
    model = small_clip()
    ecgs = np.zeros((2, 1024, 12), np.float32)
    variables = random_variables(model, ecgs, np.zeros((2, 1536), np.float32))
    with pytest.raises(ValueError, match=r"clip_ecg_features: ecgs has 5000 samples per record, expected 1024"):
        clip_ecg_features(model, variables, np.zeros((2, 5000, 12), np.float32))
    with pytest.raises(ValueError, match=r"clip_ecg_features: ecgs has 5000 samples per record"):
        clip_ecg_features(model, variables, iter([np.zeros((2, 5000, 12), np.float32)]))  # a stream of batches too
    with pytest.raises(ValueError, match=r"clip_ecg_features: ecgs has shape \(2, 12, 1024\), expected \(n, 1024, 12\)"):
        clip_ecg_features(model, variables, np.zeros((2, 12, 1024), np.float32))
    with pytest.raises(ValueError, match=r"clip_ecg_features: ecgs has shape \(1024, 12\)"):
        clip_ecg_features(model, variables, [np.zeros((1024, 12), np.float32)])
