"""Tiny VAE for the demo and smoke tests: the faithful recipe at toy size, minutes on a laptop CPU.

    diffusets-jax train vae --config configs/demo_vae.py --workdir runs/demo_vae --config.data.dataset=DIR
"""

import ml_collections

from diffusets_jax.config import data_section, mesh_section, module_section, optimizer_section, train_section
from diffusets_jax.models.vae import VAE


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model_kind = "vae"  # `diffusets-jax train vae`
    # Same layout as the published VAE with narrow widths (about 0.6 M parameters instead of 29.6 M).
    config.model = module_section(VAE, widths=(32, 64, 64), groups=8)
    config.data = data_section()
    config.mesh = mesh_section(data=-1, fsdp=1)
    config.optimizer = optimizer_section(
        learning_rate=1e-3,
        lr_schedule="one_cycle",
    )
    config.train = train_section(
        global_batch_size=8,
        num_steps=200,
        kl_anneal_epochs=10.0,
        kl_schedule="per_epoch",
        log_every=10,
        eval_every=100,
        eval_batches=2,
        checkpoint_every=100,
    )
    return config
