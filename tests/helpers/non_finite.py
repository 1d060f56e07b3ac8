"""A generator whose ECGs at chosen request positions come out with NaN or inf samples, for the tests of how
every writer and scorer treats a failed generation."""

from __future__ import annotations

import dataclasses

import numpy as np


class NonFiniteAt:
    """`generator` whose ECGs at the given request positions come out with NaN or inf samples, as a diverged network
    or a bf16 overflow gives them; everything else is the real generator's."""

    def __init__(self, generator, positions):
        self.inner, self.positions = generator, set(positions)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _spoil(self, ecgs, start):
        ecgs = np.array(ecgs)
        for row in range(len(ecgs)):
            if start + row in self.positions:
                ecgs[row, 100 + row, 3] = np.nan if (start + row) % 2 else np.inf
        return ecgs

    def generate(self, *args, **kwargs):
        for batch in self.inner.generate(*args, **kwargs):
            yield dataclasses.replace(batch, ecgs=self._spoil(batch.ecgs, batch.start))

    def generate_batch(self, cond, batch_index):
        return self._spoil(self.inner.generate_batch(cond, batch_index), batch_index * self.inner.batch_size)

    def generate_batches(self, jobs):
        indices = []

        def noted():
            for cond, batch_index in jobs:
                indices.append(batch_index)
                yield cond, batch_index

        for number, ecgs in enumerate(self.inner.generate_batches(noted())):
            yield self._spoil(ecgs, indices[number] * self.inner.batch_size)
