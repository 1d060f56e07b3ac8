"""Threefry draws batched into a few calls: the same values, a fraction of the compile time.

`batch_threefry(fn)` returns a function that computes exactly what `fn` computes (bit for bit), with its
threefry random draws (`random_bits`, `random_fold_in`, `random_split` on single keys) grouped by dependency
level and each group evaluated as one elementwise `threefry2x32` over the concatenated counters.

Why: a model's `init` draws every parameter with its own key, and XLA inlines one threefry hash (20 rounds of
integer ops) per draw: 371 of them for the demo U-Net, plus one per `fold_in` that derives the keys. On the CPU
compiling those dominated the init program (15.9-22.7 s of compile for the demo U-Net on 2 cores; 3.3-5.5 s
batched, 2026-12-03; README, "Compiled programs are kept"). Threefry is counter-based and elementwise in
(key, counter), so concatenating independent draws and slicing the result changes nothing but the program's size.

How: the function is traced to a jaxpr, nested `jit` calls are inlined, and the equations are run in
dependency order; whenever only random draws are ready, all of them run as one call. What the draws compute
follows JAX's partitionable threefry (`jax_threefry_partitionable`, the default): `random_bits` of 32 bits
is `x1 ^ x2` of threefry over the 64-bit iota of its shape, `fold_in(key, m)` is threefry of the counter
`(0, m)`, `split(key, shape)` the pair `(x1, x2)` over the iota of its shape. Anything else (other key
implementations, batched keys, other bit widths, the non-partitionable mode, functions with effects) is left
to JAX as it is; `tests/test_batched_threefry.py` checks the equality on the three models' inits.

Cost: a batch's counters and results are whole arrays, so under sharded outputs (FSDP) every device computes
all of a level's draws before keeping its slices: a few times the model's parameter bytes, once, at init
(the models here have at most tens of millions of parameters).
"""

from __future__ import annotations

import collections
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jcore
from jax.extend.random import threefry2x32_p

_RANDOM_OPS = ("random_bits", "random_fold_in", "random_split")
_THREEFRY_KEY = "key<fry>"
_CALLS = ("jit", "pjit")  # the nested-jit primitive, named "pjit" in older JAX


class _Slot:
    """One value of the flattened program: known (`ready`) or still to be computed."""

    __slots__ = ("ready", "value")

    def __init__(self, value: Any = None, ready: bool = False):
        self.value, self.ready = value, ready


def _inlinable(eqn) -> bool:
    """A nested `jit` with no shardings of its own and no effects: its body can join the caller's."""
    if eqn.primitive.name not in _CALLS or eqn.effects or not isinstance(eqn.params.get("jaxpr"), jcore.ClosedJaxpr):
        return False
    shardings = (*eqn.params.get("in_shardings", ()), *eqn.params.get("out_shardings", ()))
    return all(type(s).__name__ == "UnspecifiedValue" for s in shardings)


def _flatten(jaxpr, consts: list[_Slot], inputs: list[_Slot], eqns: list) -> list[_Slot]:
    """Append `jaxpr`'s equations, nested `jit`s inlined, to `eqns` as `(eqn, in_slots, out_slots)`."""
    env = dict(zip(jaxpr.constvars, consts, strict=True)) | dict(zip(jaxpr.invars, inputs, strict=True))

    def read(atom) -> _Slot:
        return _Slot(atom.val, True) if isinstance(atom, jcore.Literal) else env[atom]

    for eqn in jaxpr.eqns:
        args = [read(a) for a in eqn.invars]
        if _inlinable(eqn):
            body = eqn.params["jaxpr"]
            outs = _flatten(body.jaxpr, [_Slot(c, True) for c in body.consts], args, eqns)
        else:
            outs = [_Slot() for _ in eqn.outvars]
            eqns.append((eqn, args, outs))
        for var, slot in zip(eqn.outvars, outs, strict=True):
            if not isinstance(var, jcore.DropVar):
                env[var] = slot
    return [read(a) for a in jaxpr.outvars]


def _batchable(eqn) -> bool:
    """A draw on one threefry key whose result `_draw_batch` reproduces exactly."""
    if eqn.primitive.name not in _RANDOM_OPS:
        return False
    key = eqn.invars[0].aval
    if key.shape != () or str(key.dtype) != _THREEFRY_KEY:
        return False
    if eqn.primitive.name == "random_fold_in":
        return eqn.invars[1].aval.shape == ()
    size_ok = math.prod(eqn.params["shape"]) < 2**32  # the iota's high word is then 0
    return size_ok and (eqn.primitive.name == "random_split" or eqn.params["bit_width"] == 32)


def _draw_batch(batch: list) -> None:
    """Evaluate ready draws `(eqn, in_slots, out_slots)` as one threefry call over their concatenated counters."""
    key1, key2, counters, sizes = [], [], [], []
    for eqn, args, _ in batch:
        data = jax.random.key_data(args[0].value)
        if eqn.primitive.name == "random_fold_in":
            count = jnp.reshape(jnp.asarray(args[1].value, jnp.uint32), (1,))
        else:
            count = jnp.arange(math.prod(eqn.params["shape"]), dtype=jnp.uint32)
        size = count.shape[0]
        key1.append(jnp.broadcast_to(data[0], (size,)))
        key2.append(jnp.broadcast_to(data[1], (size,)))
        counters.append(count)
        sizes.append(size)
    low = jnp.concatenate(counters)
    x1, x2 = threefry2x32_p.bind(jnp.concatenate(key1), jnp.concatenate(key2), jnp.zeros_like(low), low)
    start = 0
    for (eqn, _, outs), size in zip(batch, sizes, strict=True):
        a, b = x1[start:start + size], x2[start:start + size]
        start += size
        if eqn.primitive.name == "random_bits":
            value = (a ^ b).reshape(eqn.params["shape"])
        elif eqn.primitive.name == "random_fold_in":
            value = jax.random.wrap_key_data(jnp.concatenate([a, b]), impl="threefry2x32")
        else:
            pairs = jnp.stack([a, b], axis=-1).reshape(*eqn.params["shape"], 2)
            value = jax.random.wrap_key_data(pairs, impl="threefry2x32")
        outs[0].value, outs[0].ready = value, True


def _run(eqns: list) -> None:
    """Run the flattened equations in dependency order, holding draws back until nothing else is ready."""
    waiting = [sum(not a.ready for a in args) for _, args, _ in eqns]
    consumers: dict[int, list[int]] = collections.defaultdict(list)
    for index, (_, args, _) in enumerate(eqns):
        for slot in args:
            if not slot.ready:
                consumers[id(slot)].append(index)
    ready = collections.deque(index for index, count in enumerate(waiting) if count == 0)
    draws: list[int] = []
    finished_count = 0
    while ready or draws:
        if ready:
            index = ready.popleft()
            eqn, args, outs = eqns[index]
            if _batchable(eqn):
                draws.append(index)
                continue
            with eqn.ctx.manager:
                result = eqn.primitive.bind(*(a.value for a in args), **eqn.primitive.get_bind_params(eqn.params))
            for slot, value in zip(outs, result if eqn.primitive.multiple_results else [result], strict=True):
                slot.value, slot.ready = value, True
            finished = [index]
        else:
            _draw_batch([eqns[i] for i in draws])
            finished, draws = draws, []
        finished_count += len(finished)
        for index in finished:
            for slot in eqns[index][2]:
                for consumer in consumers.get(id(slot), ()):
                    waiting[consumer] -= 1
                    if waiting[consumer] == 0:
                        ready.append(consumer)
    if finished_count != len(eqns):  # a cycle cannot occur in a jaxpr; this would be a bug here
        raise RuntimeError(f"batch_threefry ran {finished_count} of {len(eqns)} equations")


def batch_threefry(fn: Callable) -> Callable:
    """`fn` with its threefry draws batched (module docstring); to be traced, e.g. under `jax.jit`.

    Returns `fn` itself when JAX's threefry is not in its partitionable mode; a call whose program has effects
    runs `fn` unchanged.
    """
    if not jax.config.jax_threefry_partitionable:
        return fn

    @functools.wraps(fn)
    def batched(*args):
        closed, out_shapes = jax.make_jaxpr(fn, return_shape=True)(*args)
        if closed.effects:  # reordering would reorder them
            return fn(*args)
        eqns: list = []
        outs = _flatten(closed.jaxpr, [_Slot(c, True) for c in closed.consts],
                        [_Slot(a, True) for a in jax.tree.leaves(args)], eqns)
        _run(eqns)
        return jax.tree.unflatten(jax.tree.structure(out_shapes), [slot.value for slot in outs])

    return batched
