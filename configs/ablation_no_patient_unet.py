"""Ablation (the paper's Fig. 2A): the faithful U-Net recipe trained WITHOUT patient information.

The U-Net's sex, age and heart-rate inputs are zeros in training and sampling (`train.patient_features = "none"`),
so it can only take the heart rate from the report text; everything else is `configs/diffusets_unet.py`. Compare the
two with one evaluation:

    diffusets-jax train unet --config configs/ablation_no_patient_unet.py --workdir runs/unet_nopatient \
        --model-dir models_nopatient/ --config.data.dataset=latents/
    diffusets-jax evaluate --model-dir models/ models_nopatient/ --labels "with patient" "without patient" \
        --clip models/ --dataset DATASET_DIR --split test --out eval_ablation/

For the demo data, the same knob on the demo recipe: `--config configs/demo_unet.py
--config.train.patient_features=none`.
"""

from pathlib import Path

import ml_collections

from diffusets_jax.config import load_config


def get_config() -> ml_collections.ConfigDict:
    config = load_config(Path(__file__).with_name("diffusets_unet.py"))
    config.train.patient_features = "none"
    return config
