"""A deterministic stand-in for MiniLM (384-d), so tests of `prepare` do not load a model."""

from __future__ import annotations

import numpy as np


class HashEmbedder:
    """Unit vectors drawn from a seed made of each text: the same text always gets the same vector."""

    dim = 384
    embedder_id = "test/hash/384"

    def embed(self, texts):  # noqa: ANN001, ANN201 (the Embedder protocol)
        rows = [np.random.default_rng(abs(hash(t)) % 2**32).normal(size=self.dim) for t in texts]
        return np.asarray([r / np.linalg.norm(r) for r in rows], np.float32)
