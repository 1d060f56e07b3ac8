"""Faithful DiffuSETS evaluation CLIP (reference spec section 8): Net1D ECG tower + MLP text tower.

    diffusets-jax train clip --config configs/diffusets_clip.py --workdir runs/clip \
        --config.data.dataset=/data/tfds/mimic_iv_ecg/1.0.0

Its ECG tower is the feature extractor of FID / precision-recall / CLIP score.
Output: `WORKDIR/model/clip` (or `--model-dir DIR`).

The reference spec gives the loss and AdamW but no batch, rate or length; the defaults below are conventional. The
published experiment code (DiffuSETS_Exp-Extended `clip/clip_train.py`, read at its HEAD) trains with AdamW at a
constant 1e-3, weight decay 1e-3, 10 epochs of 16,384-record batches split into 64 micro-batches of 256, each with
only its own negatives, which is our `grad_accum_steps`:

    --config.optimizer.learning_rate=1e-3 --config.optimizer.weight_decay=1e-3 \
        --config.train.global_batch_size=16384 --config.train.grad_accum_steps=64 --config.train.num_epochs=10

It feeds the CLIP VAE reconstructions of posterior draws (decoder(z) of its latent dataset), where `train clip`
reads the prepared ECGs themselves; the published checkpoint (`convert`) is the way to the paper's own features.
"""

import ml_collections

from diffusets_jax.config import data_section, mesh_section, module_section, optimizer_section, train_section
from diffusets_jax.models.clip import CLIP


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model_kind = "clip"  # `diffusets-jax train clip`

    # CLIP module fields; empty = the published model (22.0 M parameters, text_dim 1536, 64-d projections,
    # logit scale initialised to log(1 / 0.07)).
    config.model = module_section(CLIP)

    config.data = data_section()
    config.mesh = mesh_section(data=-1, fsdp=1)
    config.optimizer = optimizer_section(
        learning_rate=1e-4,
        lr_schedule="constant",
        weight_decay=0.01,
    )
    config.train = train_section(
        # Conventional values (the module docstring gives the published code's). Larger effective batches (more
        # negatives per step) help contrastive training; grad_accum_steps lowers memory but each micro-batch sees
        # only its negatives.
        global_batch_size=256,
        num_epochs=50.0,
        log_every=50,
        eval_every=2000,
        eval_batches=8,
        checkpoint_every=2000,
    )
    return config
