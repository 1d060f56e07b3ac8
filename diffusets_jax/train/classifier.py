"""ECG classifier training: Net1D with a linear head (`num_classes = 1`), binary cross-entropy, AdamW.

Batches: `{"ecg": (batch, 1024, 12) float32 mV, "label": (batch,) float32 0/1, "weight": (batch,) float32}`. The
loss is `mean(weight * BCE(logit, label))`: weights of 1 give the plain loss, inverse class frequencies
(`balanced_weights`) the class-weighted one, with no change to the compiled step. BatchNorm statistics live in
`state.model_state["batch_stats"]`; dropout draws from the step key.

The data come from host arrays (`array_batches`): the downstream benchmark holds its few thousand labelled records
in memory and mixes real and generated ones freely, which a TFRecord reader would make awkward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from diffusets_jax import parallel
from diffusets_jax.config import module_fields
from diffusets_jax.ecg.shapes import ECG_LENGTH
from diffusets_jax.models.net1d import Net1D
from diffusets_jax.models.precision import cast_floating
from diffusets_jax.train.loop import Task
from diffusets_jax.train.optim import learning_rate_schedule, make_optimizer

MODEL_KIND = "classifier"


def build_classifier(config: ml_collections.ConfigDict) -> Net1D:
    """Net1D from `config.model` (its fields), which must ask for one output (a binary task's logit)."""
    if config.get("model_kind") != MODEL_KIND:
        raise ValueError(f"the classifier config must have model_kind = {MODEL_KIND!r} (configs/downstream_net1d.py "
                         f"shows the layout), got {config.get('model_kind')!r}")
    model = Net1D(**module_fields(config))
    if model.num_classes != 1:
        raise ValueError(f"config.model.num_classes must be 1 (one logit for a binary task), got {model.num_classes}")
    return model


def balanced_weights(labels: np.ndarray) -> np.ndarray:
    """`(n,)` float32 inverse-frequency weights `n / (2 n_class)`: each class carries half the total weight."""
    labels = np.asarray(labels).astype(bool)
    n, n_pos = labels.size, int(labels.sum())
    if n_pos in (0, n):
        raise ValueError("class weights need both classes in the training set")
    return np.where(labels, n / (2 * n_pos), n / (2 * (n - n_pos))).astype(np.float32)


def classifier_task(config: ml_collections.ConfigDict, num_steps: int) -> Task:
    """Task for the training loop; `eval_fn` gives the validation BCE and accuracy at logit 0 (probability 0.5)."""
    model = build_classifier(config)
    schedule = learning_rate_schedule(config.optimizer, num_steps)
    compute_dtype = jnp.dtype(config.train.compute_dtype)

    def init_variables(key: jax.Array) -> dict[str, Any]:
        return model.init(key, jnp.zeros((2, ECG_LENGTH, model.in_channels)), train=False)

    def loss_fn(params, model_state, batch, key, step):
        variables = {"params": cast_floating(params, compute_dtype), **model_state}
        logits, updates = model.apply(variables, batch["ecg"].astype(compute_dtype), train=True,
                                      rngs={"dropout": key}, mutable=["batch_stats"])
        logits = logits[:, 0].astype(jnp.float32)
        per_example = optax.sigmoid_binary_cross_entropy(logits, batch["label"])
        loss = jnp.mean(batch["weight"] * per_example)
        new_state = {**model_state, **cast_floating(updates, jnp.float32)}
        return loss, ({"accuracy": jnp.mean((logits > 0) == (batch["label"] > 0.5))}, new_state)

    def eval_fn(params, model_state, batch, key):
        logits = model.apply({"params": params, **model_state}, batch["ecg"], train=False)[:, 0]
        return {"bce": jnp.mean(optax.sigmoid_binary_cross_entropy(logits, batch["label"])),
                "accuracy": jnp.mean((logits > 0) == (batch["label"] > 0.5))}

    return Task(MODEL_KIND, init_variables, loss_fn, make_optimizer(config.optimizer, schedule), schedule, eval_fn,
                model)


def array_batches(arrays: Mapping[str, np.ndarray], batch_size: int, seed: int
                  ) -> Callable[[int], Iterator[dict[str, np.ndarray]]]:
    """`train_batches(start_step)` for the loop over host arrays (all `(n, ...)`): endless batches of
    `batch_size`, each epoch a fresh permutation drawn from `(seed, epoch)`, batches running across epochs.

    Batch `k` depends only on `(seed, k)`, so a run resumed at step `k` sees what a straight run would.
    """
    sizes = {len(v) for v in arrays.values()}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"array_batches: arrays must share a non-zero first dimension, got {sorted(sizes)}")
    n = sizes.pop()

    def permutation(epoch: int) -> np.ndarray:
        return np.random.default_rng([seed, epoch]).permutation(n)

    def batches(start_step: int) -> Iterator[dict[str, np.ndarray]]:
        epoch, offset = divmod(start_step * batch_size, n)
        order = permutation(epoch)[offset:]
        while True:
            while len(order) < batch_size:
                epoch += 1
                order = np.concatenate([order, permutation(epoch)])
            take, order = order[:batch_size], order[batch_size:]
            yield {name: value[take] for name, value in arrays.items()}

    return batches


def make_predictor(model: Net1D, mesh: jax.sharding.Mesh, batch_size: int
                   ) -> Callable[[Mapping[str, Any], np.ndarray], np.ndarray]:
    """`predict(variables, ecgs (n, 1024, 12)) -> (n,) float64 logits` in inference mode (running BatchNorm
    statistics, no dropout), compiled once for `batch_size` rounded up to the device count and reused for every
    model of the same architecture; the batch is split over `mesh`'s devices."""
    devices = parallel.num_batch_shards(mesh)
    batch_size = max(devices, -(-batch_size // devices) * devices)
    apply = jax.jit(lambda variables, ecg: model.apply(variables, ecg, train=False)[:, 0],
                    in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
                    out_shardings=parallel.replicated(mesh))

    def predict(variables: Mapping[str, Any], ecgs: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(ecgs), batch_size):
            chunk = np.asarray(ecgs[start:start + batch_size], np.float32)
            padded = np.concatenate([chunk, np.zeros((batch_size - len(chunk), *chunk.shape[1:]), np.float32)])
            out.append(np.asarray(jax.device_get(apply(variables, padded)), np.float64)[:len(chunk)])
        return np.concatenate(out) if out else np.zeros((0,), np.float64)

    return predict
