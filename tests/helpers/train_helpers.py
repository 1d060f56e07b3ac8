"""A tiny regression task for the generic training loop's tests (and the subprocess they start)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from diffusets_jax.config import mesh_section, train_section
from diffusets_jax.train.loop import Task

FEATURES = 16


class TinyMLP(nn.Module):
    hidden: int = 64

    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(self.hidden)(x))
        return nn.Dense(FEATURES)(x)


def tiny_task(learning_rate: float = 1e-2, input_noise: float = 0.01) -> Task:
    model = TinyMLP()
    schedule = optax.cosine_decay_schedule(learning_rate, 100, alpha=0.1)
    optimizer = optax.adamw(schedule, weight_decay=0.01)

    def init_variables(key):
        return model.init(key, jnp.zeros((1, FEATURES)))

    def loss_fn(params, model_state, batch, key, step):
        # Input noise from the step key: exact resume must reproduce the random draws too.
        noisy = batch["x"] + input_noise * jax.random.normal(key, batch["x"].shape)
        pred = model.apply({"params": params}, noisy)
        loss = jnp.mean((pred - batch["y"]) ** 2)
        return loss, ({"mae": jnp.mean(jnp.abs(pred - batch["y"]))}, model_state)

    def eval_fn(params, model_state, batch, key):
        pred = model.apply({"params": params}, batch["x"])
        return {"mse": jnp.mean((pred - batch["y"]) ** 2)}

    return Task("tiny", init_variables, loss_fn, optimizer, schedule, eval_fn)


def batch_at(step: int, batch_size: int, seed: int = 0, poison_step: int = -1) -> dict[str, np.ndarray]:
    """Deterministic batch of step `step`; NaN inputs at `poison_step`."""
    rng = np.random.default_rng([seed, step])
    x = rng.normal(size=(batch_size, FEATURES)).astype(np.float32)
    y = np.sin(x).astype(np.float32)
    if step == poison_step:
        x[:] = np.nan
    return {"x": x, "y": y}


def batches_from(batch_size: int, poison_step: int = -1):
    def factory(start_step: int):
        step = start_step
        while True:
            yield batch_at(step, batch_size, poison_step=poison_step)
            step += 1

    return factory


def tiny_config(**train_values) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.mesh = mesh_section()
    values = dict(global_batch_size=16, num_steps=8, log_every=2, eval_every=4, checkpoint_every=4,
                  keep_checkpoints=5, progress_bar=False)
    values.update(train_values)
    config.train = train_section(**values)
    return config
