"""Walking a traced program: every equation of a jaxpr, nested ones included, for tests that check what runs."""

from __future__ import annotations

from collections.abc import Iterator

import jax


def equations(jaxpr: jax.extend.core.Jaxpr) -> Iterator[jax.extend.core.JaxprEqn]:
    """Every equation of `jaxpr`, and of the jaxprs inside it (pjit, remat, scan and custom-derivative bodies)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from equations(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from equations(sub)
