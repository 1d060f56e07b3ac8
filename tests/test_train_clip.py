from pathlib import Path

import jax
import numpy as np
import pytest

from diffusets_jax import parallel
from diffusets_jax.config import load_config
from diffusets_jax.train import loop
from diffusets_jax.train.clip import (
    clip_task,
    contrastive_logits,
    retrieval_accuracy,
    symmetric_contrastive_loss,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _log_softmax(x, axis):
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def test_symmetric_contrastive_loss_matches_numpy():
    rng = np.random.default_rng(0)
    ecg, text = rng.normal(size=(2, 6, 5)).astype(np.float32)
    scale = np.float32(np.log(1 / 0.07))
    logits = np.asarray(contrastive_logits(ecg, text, scale))
    en = ecg / np.linalg.norm(ecg, axis=1, keepdims=True)
    tn = text / np.linalg.norm(text, axis=1, keepdims=True)
    np.testing.assert_allclose(logits, np.exp(scale) * en @ tn.T, rtol=1e-5)
    expected = -0.5 * (np.diag(_log_softmax(logits, 1)).mean() + np.diag(_log_softmax(logits, 0)).mean())
    np.testing.assert_allclose(symmetric_contrastive_loss(logits), expected, rtol=1e-5)


def test_retrieval_accuracy():
    logits = np.eye(4, dtype=np.float32)
    logits[0, 1] = 2.0  # ECG 0 retrieves report 1; report 1 retrieves ECG 0
    e2t, t2e = retrieval_accuracy(logits)
    assert float(e2t) == pytest.approx(0.75) and float(t2e) == pytest.approx(0.75)


def test_clip_step_updates_batch_stats_and_learns():
    config = load_config(CONFIGS / "demo_clip.py", ["model.filters=(8,)", "model.blocks_per_stage=(1,)",
                                                    "model.text_dim=8", "model.kernel_size=4"])
    config.optimizer.learning_rate = 3e-3
    task = clip_task(config, num_steps=10)
    mesh = parallel.make_mesh(2, 1, devices=jax.devices()[:2])
    _, shardings = loop.abstract_state(task, mesh, 0, False)
    state = loop.init_state(task, mesh, 0, False)
    before = jax.device_get(state.model_state)
    step = loop.jit_train_step(loop.make_train_step(task), shardings, mesh)
    rng = np.random.default_rng(0)
    text = rng.normal(size=(8, 8)).astype(np.float32)
    ecg = np.repeat(text[:, None, :], 128, axis=1).reshape(8, 1024, 1)[:, :, [0] * 12].astype(np.float32)
    batch = parallel.shard_host_batch({"ecg": ecg, "text_embedding": text}, mesh)
    losses = []
    for _ in range(5):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    changed = jax.tree.map(lambda a, b: not np.allclose(a, b), before, jax.device_get(state.model_state))
    assert any(jax.tree.leaves(changed)), "BatchNorm statistics must be updated in training"
    val = loop.evaluate(jax.jit(task.eval_fn), state, [{"ecg": ecg, "text_embedding": text}], mesh, seed=0)
    assert 0.0 <= val["retrieval_ecg_to_text_top1"] <= 1.0 and np.isfinite(val["contrastive_loss"])
