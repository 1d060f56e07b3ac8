"""Optimisers and learning-rate schedules of the reference recipes, built from `config.train`.

- VAE: AdamW with PyTorch's `OneCycleLR` (cosine annealing, peak `learning_rate`).
- U-Net: AdamW (weight decay 0.01), cosine decay from `learning_rate` to `cosine_final_fraction` x it,
  stepped per batch.
- CLIP: AdamW at a constant rate.
Gradient clipping by global norm is an option (`grad_clip_norm > 0`); the reference does not clip.
"""

from __future__ import annotations

import math

import ml_collections
import optax

LR_SCHEDULES = ("constant", "one_cycle", "cosine")


def steps_per_epoch(config: ml_collections.ConfigDict) -> int:
    """Optimiser steps per pass over `config.data.num_train_examples` (the last partial batch dropped)."""
    examples = int(config.data.num_train_examples)
    batch = int(config.train.global_batch_size)
    if examples < batch:
        raise ValueError(f"data.num_train_examples={examples} is smaller than train.global_batch_size={batch}")
    return examples // batch


def total_steps(config: ml_collections.ConfigDict) -> int:
    """`train.num_steps` when > 0, else `ceil(train.num_epochs * steps_per_epoch)`."""
    if int(config.train.num_steps) > 0:
        return int(config.train.num_steps)
    return max(1, math.ceil(float(config.train.num_epochs) * steps_per_epoch(config)))


def learning_rate_schedule(train: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """The schedule named by `train.lr_schedule` over `num_steps` optimiser steps."""
    name = train.get("lr_schedule", "constant")
    lr = float(train.learning_rate)
    if name == "constant":
        return optax.constant_schedule(lr)
    if name == "one_cycle":
        # PyTorch OneCycleLR defaults: start at max / 25, peak after 30 %, cosine down to start / 1e4.
        return optax.cosine_onecycle_schedule(
            transition_steps=num_steps,
            peak_value=lr,
            pct_start=float(train.get("one_cycle_pct_start", 0.3)),
            div_factor=float(train.get("one_cycle_div_factor", 25.0)),
            final_div_factor=float(train.get("one_cycle_final_div_factor", 1e4)),
        )
    if name == "cosine":
        warmup = int(train.get("warmup_steps", 0))
        final = float(train.get("cosine_final_fraction", 0.1))
        if warmup > 0:
            return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(num_steps, warmup + 1), lr * final)
        return optax.cosine_decay_schedule(lr, decay_steps=max(num_steps, 1), alpha=final)
    raise ValueError(f"train.lr_schedule must be one of {LR_SCHEDULES}, got {name!r}")


def make_optimizer(train: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
    """AdamW with PyTorch's defaults (betas 0.9/0.999, eps 1e-8) and `train.weight_decay`, optionally clipped.

    Weight decay applies to every parameter, as `torch.optim.AdamW(model.parameters())` does.
    """
    adamw = optax.adamw(
        schedule,
        b1=float(train.get("adam_b1", 0.9)),
        b2=float(train.get("adam_b2", 0.999)),
        eps=float(train.get("adam_eps", 1e-8)),
        weight_decay=float(train.weight_decay),
    )
    clip = float(train.grad_clip_norm)
    return optax.chain(optax.clip_by_global_norm(clip), adamw) if clip > 0 else adamw
