"""Net1D ECG classifier of the data-augmentation benchmark (`diffusets-jax downstream`).

    diffusets-jax downstream --dataset DIR --model-dir MODEL --out OUT --config configs/downstream_net1d.py

The published Net1D (reference section 8: 7 stages, filters 64 ... 1024, kernel 16) with a one-logit linear head,
trained with binary cross-entropy for a fixed number of steps (`--steps` overrides `train.num_steps`). A demo-size
model comes from overrides, e.g. `--config.model.base_filters=8 --config.model.filters=8,16
--config.model.blocks_per_stage=1,1 --config.model.group_width=8 --config.train.global_batch_size=8`.
"""

import ml_collections

from diffusets_jax.config import mesh_section, module_section, optimizer_section, train_section
from diffusets_jax.models.net1d import Net1D


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model_kind = "classifier"  # read by `diffusets-jax downstream`, not by `train`
    config.model = module_section(Net1D, num_classes=1)
    config.mesh = mesh_section(data=-1, fsdp=1)
    config.optimizer = optimizer_section(
        # Conventional values for a ResNet-style ECG classifier trained from scratch; the paper gives none.
        learning_rate=1e-3,
        lr_schedule="cosine",
        cosine_final_fraction=0.01,
        weight_decay=0.01,
    )
    config.train = train_section(
        global_batch_size=64,
        num_steps=2000,  # fixed length, no early stopping: every arm gets the same optimisation budget
        log_every=50,
        eval_every=500,
        eval_batches=4,
        # One checkpoint at the end (the loop always saves the last step); the benchmark deletes it once the
        # arm's predictions are written, so dozens of arms do not fill the disk.
        checkpoint_every=1_000_000,
        keep_checkpoints=1,
    )
    return config
