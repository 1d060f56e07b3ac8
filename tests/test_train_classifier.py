"""The Net1D classifier recipe: weighted BCE through the generic loop, deterministic array batches, prediction."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

from diffusets_jax import parallel
from diffusets_jax.config import load_config
from diffusets_jax.metrics.classification import roc_auc
from diffusets_jax.train.classifier import (
    array_batches,
    balanced_weights,
    build_classifier,
    classifier_task,
    make_predictor,
)
from diffusets_jax.train.loop import train

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "downstream_net1d.py"
TINY = ["model.base_filters=8", "model.filters=8,16", "model.blocks_per_stage=1,1", "model.group_width=8",
        "model.kernel_size=8", "train.global_batch_size=16", "train.progress_bar=false", "train.log_every=10",
        "optimizer.learning_rate=3e-3"]


def separable(n, seed):
    """Positives: a 1 mV 1.2 Hz sine on every lead; negatives: 0.2 mV; both with 0.1 mV noise."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 4 == 0).astype(np.float32)  # 1 in 4 positive: imbalanced
    t = np.arange(1024) / 102.4
    amplitude = np.where(labels > 0, 1.0, 0.2)[:, None, None]
    ecg = amplitude * np.sin(2 * np.pi * 1.2 * t)[None, :, None] + 0.1 * rng.standard_normal((n, 1024, 12))
    return ecg.astype(np.float32), labels


def test_balanced_weights_give_each_class_half():
    labels = np.array([1, 0, 0, 0])
    weights = balanced_weights(labels)
    assert weights.tolist() == pytest.approx([2.0, 4 / 6, 4 / 6, 4 / 6])
    assert weights[labels == 1].sum() == pytest.approx(weights[labels == 0].sum())
    with pytest.raises(ValueError, match="both classes"):
        balanced_weights(np.zeros(3))


def test_array_batches_resume_exactly():
    arrays = {"x": np.arange(10), "y": np.arange(10) * 2}
    straight = array_batches(arrays, 4, seed=3)(0)
    first = [next(straight) for _ in range(7)]
    resumed = array_batches(arrays, 4, seed=3)(5)
    assert all(np.array_equal(next(resumed)["x"], b["x"]) for b in first[5:])
    assert all(np.array_equal(b["y"], 2 * b["x"]) for b in first)  # rows stay aligned across fields
    epoch0 = np.concatenate([b["x"] for b in first])[:10]
    assert sorted(epoch0.tolist()) == list(range(10))  # each epoch is a permutation


def test_config_refuses_another_kind_or_width():
    config = load_config(CONFIG, ["model.num_classes=2"])
    with pytest.raises(ValueError, match="num_classes must be 1"):
        build_classifier(config)
    config = load_config(CONFIG)
    with config.unlocked():
        config.model_kind = "clip"
    with pytest.raises(ValueError, match="model_kind"):
        build_classifier(config)


@pytest.mark.slow
def test_classifier_learns_a_separable_task(tmp_path):
    config = load_config(CONFIG, TINY + ["train.num_steps=40", "train.eval_every=40"])
    ecg, labels = separable(64, seed=0)
    task = classifier_task(config, 40)
    arrays = {"ecg": ecg, "label": labels, "weight": balanced_weights(labels)}
    result = train(task, config, tmp_path, array_batches(arrays, 16, seed=0))
    assert result.step == 40
    test_ecg, test_labels = separable(32, seed=1)
    predict = make_predictor(task.model, parallel.mesh_from_config(config.mesh), batch_size=16)
    logits = predict({"params": result.state.params, **result.state.model_state}, test_ecg)
    assert logits.shape == (32,) and np.isfinite(logits).all()
    assert roc_auc(test_labels, logits) > 0.95
    # Padding the last batch must not change predictions: the same records one at a time.
    single = make_predictor(task.model, parallel.mesh_from_config(config.mesh), batch_size=jax.device_count())
    assert np.allclose(single({"params": result.state.params, **result.state.model_state}, test_ecg[:3]),
                       logits[:3], atol=1e-5)
