"""Optimisers and learning-rate schedules of the reference recipes, built from `config.optimizer`.

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

from diffusets_jax.config import LR_SCHEDULES


def steps_per_epoch(config: ml_collections.ConfigDict) -> int:
    """Optimiser steps per pass over `config.data.num_train_examples` (the last partial batch dropped)."""
    examples = int(config.data.num_train_examples)
    batch = int(config.train.global_batch_size)
    if examples < batch:
        raise ValueError(f"data.num_train_examples={examples} is smaller than train.global_batch_size={batch}")
    return examples // batch


def total_steps(config: ml_collections.ConfigDict) -> int:
    """`train.num_steps` when > 0, else `ceil(train.num_epochs * steps_per_epoch)`.

    Both set must name the same length, as a run's saved config.json does (its num_steps resolved from its
    num_epochs): `--config.train.num_epochs=100` given to a config whose num_steps is set (a demo config, a saved
    config.json) trained the old number of steps, and said nothing."""
    steps, epochs = int(config.train.num_steps), float(config.train.num_epochs)
    from_epochs = max(1, math.ceil(epochs * steps_per_epoch(config))) if epochs > 0 else 0
    if steps > 0 and from_epochs and from_epochs != steps:
        raise ValueError(f"train.num_steps={steps} and train.num_epochs={epochs:g} ({from_epochs} steps of "
                         f"{config.train.global_batch_size} of {config.data.num_train_examples} examples) disagree: set "
                         "one and the other to 0, e.g. --config.train.num_epochs=0 to train num_steps, or "
                         "--config.train.num_steps=0 to train num_epochs")
    return steps if steps > 0 else from_epochs


def learning_rate_schedule(optimizer: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """The schedule named by `optimizer.lr_schedule` (`config.optimizer`) over `num_steps` optimiser steps."""
    name = optimizer.lr_schedule
    lr = float(optimizer.learning_rate)
    if name == "constant":
        return optax.constant_schedule(lr)
    if name == "one_cycle":
        return optax.cosine_onecycle_schedule(
            transition_steps=num_steps,
            peak_value=lr,
            pct_start=float(optimizer.one_cycle_pct_start),
            div_factor=float(optimizer.one_cycle_div_factor),
            final_div_factor=float(optimizer.one_cycle_final_div_factor),
        )
    if name == "cosine":
        warmup = int(optimizer.warmup_steps)
        final = float(optimizer.cosine_final_fraction)
        if warmup >= num_steps > 0:
            # optax would stretch the schedule to warmup + 1 steps: the run would end still warming up, its rate
            # never reaching `learning_rate` nor decaying (e.g. improved_unet.py's 1000 steps in a short run).
            raise ValueError(f"optimizer.warmup_steps={warmup} is not below the run's {num_steps} training steps: the "
                             "learning rate would never reach optimizer.learning_rate nor decay; lower "
                             "--config.optimizer.warmup_steps (0 = no warm-up) or train longer")
        if warmup > 0:
            return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(num_steps, warmup + 1), lr * final)
        return optax.cosine_decay_schedule(lr, decay_steps=max(num_steps, 1), alpha=final)
    raise ValueError(f"optimizer.lr_schedule must be one of {LR_SCHEDULES}, got {name!r}")


def schedule_sized_by_steps(optimizer: ml_collections.ConfigDict) -> bool:
    """Whether `learning_rate_schedule` depends on the run's number of steps: every schedule but a constant rate.
    A run extended to more steps re-sizes such a schedule mid-run (`train.loop`)."""
    return optimizer.lr_schedule != "constant"


def make_optimizer(optimizer: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
    """AdamW with `config.optimizer`'s betas, eps and weight decay, optionally clipped by global norm.

    Weight decay applies to every parameter, as `torch.optim.AdamW(model.parameters())` does.
    """
    adamw = optax.adamw(schedule, b1=float(optimizer.b1), b2=float(optimizer.b2), eps=float(optimizer.eps),
                        weight_decay=float(optimizer.weight_decay))
    clip = float(optimizer.grad_clip_norm)
    return optax.chain(optax.clip_by_global_norm(clip), adamw) if clip > 0 else adamw
