"""Tiny CLIP for the demo and smoke tests (local 384-d text embeddings).

    diffusets-jax train clip --config configs/demo_clip.py --workdir runs/demo_clip --config.data.dataset=DIR
"""

import ml_collections

from diffusets_jax.config import data_section, mesh_section, module_section, optimizer_section, train_section
from diffusets_jax.models.clip import CLIP


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model_kind = "clip"  # `diffusets-jax train clip`
    # Two Net1D stages of narrow filters instead of seven; 16-d projections.
    config.model = module_section(
        CLIP, base_filters=8, filters=(8, 16), blocks_per_stage=(1, 1), group_width=8, text_dim=384,
        text_hidden_dim=64, embed_dim=16,
    )
    config.data = data_section()
    config.mesh = mesh_section(data=-1, fsdp=1)
    config.optimizer = optimizer_section(
        learning_rate=1e-3,
        lr_schedule="constant",
    )
    config.train = train_section(
        global_batch_size=8,
        num_steps=200,
        log_every=10,
        eval_every=100,
        eval_batches=2,
        checkpoint_every=100,
    )
    return config
