"""Output names for inputs that may share a name: two records called `00001_hr` in two folders, or two model
directories called `model` (train's default WORKDIR/model), must not be written under one name.

`distinct_names` keeps each path's last part where that is already unique and, for those that collide, takes as
many trailing parts as it needs, joined by '-': `runs/a/model` and `runs/b/model` are `a-model` and `b-model`.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path


def distinct_names(paths: Sequence[str | os.PathLike]) -> list[str]:
    """One name per path, all different, each the shortest ending of its path that no other path shares.

    The paths must differ once resolved (ValueError otherwise: the caller says which one was given twice).
    """
    parts = [Path(path).resolve().parts[1:] for path in paths]  # without the root, e.g. ('runs', 'a', 'model')
    if len(set(parts)) != len(parts):
        raise ValueError("distinct_names: a path is given twice")
    depth = [1] * len(parts)
    while True:  # ends: whole paths differ
        names = ["-".join(p[-d:]) or "root" for p, d in zip(parts, depth, strict=True)]
        counts = Counter(names)
        if all(counts[name] == 1 for name in names):
            return names
        depth = [d + 1 if counts[name] > 1 else d for d, name in zip(depth, names, strict=True)]
