"""Output names for inputs that may share a name: two records called `00001_hr` in two folders, or two model
directories called `model` (train's default WORKDIR/model), must not be written under one name.

`distinct_names` keeps each path's last part where that is already unique and, for those that collide, takes as
many trailing parts as it needs, joined by '-': `runs/a/model` and `runs/b/model` are `a-model` and `b-model`.
Parts may hold '-' themselves, so two whole paths can still join to one name (`x/a-b/c` and `x/a/b-c` are both
`x-a-b-c`); those get a short hash of their path added.
"""

from __future__ import annotations

import hashlib
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
    while True:  # ends when the names differ, or no colliding one can take another part
        names = ["-".join(p[-d:]) or "root" for p, d in zip(parts, depth, strict=True)]
        counts = Counter(names)
        if all(counts[name] == 1 for name in names):
            return names
        grown = [d + 1 if counts[name] > 1 and d < len(p) else d for p, d, name in zip(parts, depth, names, strict=True)]
        if grown == depth:  # the colliding names already hold their whole paths: more parts would loop forever
            break
        depth = grown
    return [f"{name}-{hashlib.sha256('/'.join(p).encode()).hexdigest()[:8]}" if counts[name] > 1 else name
            for p, name in zip(parts, names, strict=True)]
