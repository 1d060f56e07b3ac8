"""The train state: everything that changes during training, as one pytree that Orbax saves and restores."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """Params, optimiser state, optional EMA params, step and PRNG key.

    - `step`: () int32, optimiser updates applied so far (= batches consumed; the data position).
    - `params`: trainable parameters, always float32 (bf16 compute casts a copy inside the step).
    - `opt_state`: the optax state of `params`.
    - `model_state`: non-trainable variable collections, e.g. `{"batch_stats": ...}` for BatchNorm; `{}` if none.
    - `ema_params`: exponential moving average of `params`, or None when EMA is off.
    - `rng`: (2,) uint32 raw key. The key of step s is `fold_in(rng, s)`, so a resumed run draws exactly the
      noise a straight run would have drawn.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    model_state: Any
    ema_params: Any
    rng: jax.Array

    def step_key(self) -> jax.Array:
        """The (2,) uint32 key for this step's random draws (noise, timesteps, dropout)."""
        return jax.random.fold_in(self.rng, self.step)

    def eval_params(self) -> Any:
        """The params to evaluate and export: the EMA ones when EMA is on."""
        return self.params if self.ema_params is None else self.ema_params


def create_train_state(
    variables: dict[str, Any], optimizer: optax.GradientTransformation, rng: jax.Array, use_ema: bool
) -> TrainState:
    """A fresh state from `model.init` output (`{"params": ..., other collections}`) and a raw (2,) key."""
    params = variables["params"]
    model_state = {name: value for name, value in variables.items() if name != "params"}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        model_state=model_state,
        ema_params=jax.tree.map(jnp.copy, params) if use_ema else None,
        rng=jnp.asarray(rng, jnp.uint32),
    )


def ema_update(ema_params: Any, params: Any, decay: float | jax.Array) -> Any:
    """`decay * ema + (1 - decay) * params`, leaf by leaf."""
    return jax.tree.map(lambda e, p: e * decay + p.astype(e.dtype) * (1.0 - decay), ema_params, params)
