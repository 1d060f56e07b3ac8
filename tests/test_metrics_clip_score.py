"""CLIP score against a NumPy cosine, from arrays and through a Flax (module, variables) pair."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusets_jax.metrics.clip_score import clip_score, clip_score_from_model


def numpy_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_matches_numpy_cosine_and_ignores_scale():
    rng = np.random.default_rng(0)
    ecg, text = rng.normal(size=(33, 64)), rng.normal(size=(33, 64))
    result = clip_score(ecg, text)
    np.testing.assert_allclose(result.per_pair, numpy_cosine(ecg, text), rtol=1e-5, atol=1e-6)
    assert result.mean == pytest.approx(numpy_cosine(ecg, text).mean(), abs=1e-6)
    scaled = clip_score(ecg * 17.0, text * np.linspace(0.1, 5.0, 33)[:, None])
    np.testing.assert_allclose(scaled.per_pair, result.per_pair, rtol=1e-5, atol=1e-6)
    aligned = clip_score(ecg, 3.0 * ecg)
    assert aligned.mean == pytest.approx(1.0, abs=1e-6)
    assert clip_score(ecg, -ecg).mean == pytest.approx(-1.0, abs=1e-6)


def test_zero_features_score_zero_not_nan():
    text = np.ones((2, 4))
    result = clip_score(np.zeros((2, 4)), text)
    np.testing.assert_array_equal(result.per_pair, [0.0, 0.0])


def test_bad_inputs():
    with pytest.raises(ValueError, match="equal shape"):
        clip_score(np.ones((3, 4)), np.ones((3, 5)))
    with pytest.raises(ValueError, match="non-finite"):
        clip_score(np.full((2, 4), np.nan), np.ones((2, 4)))


class TwoTowerStandIn(nn.Module):
    """Same interface as the project's CLIP (`encode_ecg` on (b, 1024, 12), `encode_text` on (b, 1536));
    tiny towers so the test checks the plumbing, batching and jit, not the trained model."""

    def setup(self):
        self.ecg_projector = nn.Dense(8)
        self.text_projector = nn.Dense(8)

    def __call__(self, ecg, text):
        return self.encode_ecg(ecg), self.encode_text(text)

    def encode_ecg(self, ecg):
        return self.ecg_projector(jnp.mean(ecg, axis=1))

    def encode_text(self, text):
        return self.text_projector(text[:, :16])


def test_from_model_equals_arrays_path_in_any_batch_size():
    model = TwoTowerStandIn()
    rng = np.random.default_rng(1)
    ecgs = rng.normal(size=(10, 1024, 12)).astype(np.float32)
    texts = rng.normal(size=(10, 1536)).astype(np.float32)
    variables = model.init(jax.random.key(0), ecgs[:1], texts[:1])
    ecg_features = model.apply(variables, ecgs, method=TwoTowerStandIn.encode_ecg)
    text_features = model.apply(variables, texts, method=TwoTowerStandIn.encode_text)
    expected = numpy_cosine(np.asarray(ecg_features, np.float64), np.asarray(text_features, np.float64))
    result = clip_score_from_model(model, variables, ecgs, texts, batch_size=4)
    np.testing.assert_allclose(result.per_pair, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="10 ECGs but 9"):
        clip_score_from_model(model, variables, ecgs, texts[:9])
