"""CLIP training (reference section 8): ECG / report-embedding pairs, symmetric contrastive loss, AdamW.

logits = exp(logit_scale) * cos(ecg_proj_i, text_proj_j); loss = mean of the cross-entropies of rows
(ECG -> report) and columns (report -> ECG) against the diagonal. BatchNorm statistics live in
`state.model_state["batch_stats"]`; dropout draws from the step key.

Gradient accumulation (`train.grad_accum_steps`) averages the gradients of micro-batches, so each
micro-batch's contrastive loss sees only its own negatives: it lowers memory, not the task difficulty.
Validation: top-1 retrieval accuracy in both directions within each validation batch.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from diffusets_jax.config import module_fields
from diffusets_jax.ecg.shapes import ECG_LENGTH
from diffusets_jax.models.clip import CLIP
from diffusets_jax.models.precision import cast_floating
from diffusets_jax.train.loop import Task
from diffusets_jax.train.optim import learning_rate_schedule, make_optimizer


def build_clip(config: ml_collections.ConfigDict) -> CLIP:
    """The CLIP model from `config.model` (its fields; empty = the published model)."""
    return CLIP(**module_fields(config))


def contrastive_logits(ecg_proj: jax.Array, text_proj: jax.Array, logit_scale: jax.Array) -> jax.Array:
    """`(batch, batch)` similarity logits, float32: row i = ECG i against every report."""
    ecg = _normalize(ecg_proj.astype(jnp.float32))
    text = _normalize(text_proj.astype(jnp.float32))
    return jnp.exp(logit_scale.astype(jnp.float32)) * ecg @ text.T


def symmetric_contrastive_loss(logits: jax.Array) -> jax.Array:
    """Mean of the ECG->report and report->ECG cross-entropies with the matching pair as the label."""
    labels = jnp.arange(logits.shape[0])
    rows = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    columns = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels)
    return 0.5 * (jnp.mean(rows) + jnp.mean(columns))


def retrieval_accuracy(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Top-1 `(ecg -> report, report -> ecg)` accuracy within the batch."""
    labels = jnp.arange(logits.shape[0])
    return jnp.mean(jnp.argmax(logits, axis=1) == labels), jnp.mean(jnp.argmax(logits, axis=0) == labels)


def clip_task(config: ml_collections.ConfigDict, num_steps: int) -> Task:
    """Task for `diffusets-jax train clip`. Batches: `{"ecg": (batch, 1024, 12), "text_embedding": (batch, D)}`."""
    tc = config.train
    model = build_clip(config)
    schedule = learning_rate_schedule(config.optimizer, num_steps)
    compute_dtype = jnp.dtype(tc.compute_dtype)

    def init_variables(key: jax.Array) -> dict[str, Any]:
        return model.init(key, jnp.zeros((2, ECG_LENGTH, model.in_channels)), jnp.zeros((2, model.text_dim)),
                          train=False)

    def loss_fn(params, model_state, batch, key, step):
        variables = {"params": cast_floating(params, compute_dtype), **model_state}
        (ecg_proj, text_proj, logit_scale), updates = model.apply(
            variables, batch["ecg"].astype(compute_dtype), batch["text_embedding"].astype(compute_dtype),
            train=True, rngs={"dropout": key}, mutable=["batch_stats"],
        )
        logits = contrastive_logits(ecg_proj, text_proj, logit_scale)
        loss = symmetric_contrastive_loss(logits)
        ecg_to_text, text_to_ecg = retrieval_accuracy(logits)
        new_state = {**model_state, **cast_floating(updates, jnp.float32)}
        return loss, ({"ecg_to_text_acc": ecg_to_text, "text_to_ecg_acc": text_to_ecg,
                       "temperature": jnp.exp(-params["logit_scale"])}, new_state)

    def eval_fn(params, model_state, batch, key):
        ecg_proj, text_proj, logit_scale = model.apply({"params": params, **model_state}, batch["ecg"],
                                                       batch["text_embedding"], train=False)
        logits = contrastive_logits(ecg_proj, text_proj, logit_scale)
        ecg_to_text, text_to_ecg = retrieval_accuracy(logits)
        return {"contrastive_loss": symmetric_contrastive_loss(logits), "retrieval_ecg_to_text_top1": ecg_to_text,
                "retrieval_text_to_ecg_top1": text_to_ecg}

    return Task("clip", init_variables, loss_fn, make_optimizer(config.optimizer, schedule), schedule, eval_fn, model)


def _normalize(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
