"""CLIP score against a NumPy cosine, from arrays and through a Flax (module, variables) pair."""

import jax
import numpy as np
import pytest

from diffusets_jax.metrics.clip_score import clip_score, clip_score_from_model
from diffusets_jax.metrics.features import clip_ecg_features
from diffusets_jax.models.clip import CLIP


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


def small_clip() -> CLIP:
    """The project's CLIP with a tiny ECG tower: the real code path, compiled in seconds."""
    return CLIP(base_filters=8, filters=(8, 16), blocks_per_stage=(1, 1), kernel_size=4, group_width=4,
                dropout_rate=0.0, text_hidden_dim=16, embed_dim=8)


def random_variables(model: CLIP, ecgs: np.ndarray, texts: np.ndarray) -> dict:
    """Variables of the right structure filled from NumPy: `model.init` compiles for ~a minute on 2 busy
    cores, `eval_shape` takes a second. BatchNorm variances are kept positive."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), ecgs, texts)
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        if jax.tree_util.keystr(path).endswith("['var']"):
            return rng.uniform(0.5, 2.0, size=leaf.shape).astype(leaf.dtype)
        return (0.2 * rng.normal(size=leaf.shape)).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def test_from_model_equals_arrays_path_in_any_batch_size():
    model = small_clip()
    rng = np.random.default_rng(1)
    ecgs = rng.normal(size=(10, 1024, 12)).astype(np.float32)
    texts = rng.normal(size=(10, 1536)).astype(np.float32)
    variables = random_variables(model, ecgs[:2], texts[:2])
    # Whole batch in one call (jitted: op-by-op Net1D takes ~10 s to dispatch) vs the metric's padded batches.
    ecg_features = jax.jit(lambda v, x: model.apply(v, x, method=CLIP.encode_ecg))(variables, ecgs)
    text_features = model.apply(variables, texts, method=CLIP.encode_text)
    expected = numpy_cosine(np.asarray(ecg_features, np.float64), np.asarray(text_features, np.float64))
    result = clip_score_from_model(model, variables, ecgs, texts, batch_size=4)  # 4 + 4 + padded 2
    np.testing.assert_allclose(result.per_pair, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(clip_ecg_features(model, variables, iter([ecgs[:4], ecgs[4:8]])), ecg_features[:8],
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="10 ECGs but 9"):
        clip_score_from_model(model, variables, ecgs, texts[:9])


def test_python_lists_of_feature_vectors_are_accepted():
    """Lists of feature vectors failed with "'list' object has no attribute 'ndim'"."""
    rng = np.random.default_rng(2)
    ecg, text = rng.normal(size=(5, 8)), rng.normal(size=(5, 8))
    np.testing.assert_array_equal(clip_score(ecg.tolist(), list(text)).per_pair, clip_score(ecg, text).per_pair)
