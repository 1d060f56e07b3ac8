"""Tiny U-Net for the demo and smoke tests, on latents of the demo VAE and local (384-d) text embeddings.

    diffusets-jax train unet --config configs/demo_unet.py --workdir runs/demo_unet --config.data.dataset=DIR
"""

import ml_collections

from diffusets_jax.config import data_section, mesh_section, train_section


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # Three levels instead of seven, narrow attention; the published block structure.
    config.model = ml_collections.ConfigDict(
        {
            "latent_channels": 4,
            "channels": (8, 16),  # output width of the down blocks; 6 blocks + bottleneck = 7 levels
            "down_attention_dims": (8, 16),  # attention width H = 2 x block input width
            "bottleneck_attention_dim": 16,
            "up_attention_dims": (32, 16),  # up0 .. up5
            "num_heads": 2,
            "bottleneck_heads": 2,
            "kernel_size": 7,
            "text_dim": 384,
            "exact_cross_attention": False,  # False: computed as its equivalent per-sample bias
        }
    )
    config.data = data_section()
    config.mesh = mesh_section(data=-1, fsdp=1)
    config.train = train_section(
        global_batch_size=8,
        learning_rate=1e-3,
        lr_schedule="cosine",
        cosine_final_fraction=0.1,
        num_steps=200,
        t_min=1,
        t_max=998,
        loss_reduction="sum_per_sample",
        cond_dropout=0.1,  # so the demo can show classifier-free guidance
        patient_features="normalised",
        ema_decay=0.99,
        eval_timesteps=(10, 500, 990),
        log_every=10,
        eval_every=100,
        eval_batches=2,
        checkpoint_every=100,
    )
    return config
