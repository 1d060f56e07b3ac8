from pathlib import Path

import pytest

from diffusets_jax import cli
from diffusets_jax.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["diffusets_vae", "diffusets_unet", "diffusets_clip", "improved_unet", "demo_vae",
                                  "demo_unet", "demo_clip"])
def test_shipped_configs_load(name):
    config = load_config(CONFIGS / f"{name}.py")
    assert {"model", "data", "mesh", "train"} <= set(config.keys())
    assert config.train.global_batch_size > 0


def test_faithful_unet_numbers():
    config = load_config(CONFIGS / "diffusets_unet.py")
    assert (config.train.global_batch_size, config.train.learning_rate, config.train.num_epochs) == (512, 5e-4, 200)
    assert (config.train.t_min, config.train.t_max, config.train.cond_dropout) == (1, 998, 0.0)
    assert config.train.lr_schedule == "cosine" and config.train.cosine_final_fraction == 0.1


def test_train_unknown_override_names_close_matches(capsys):
    code = cli.main(["train", "vae", "--config", str(CONFIGS / "demo_vae.py"), "--workdir", "/tmp/x",
                     "--config.train.learning_rat=1e-3"])
    assert code == 2
    assert "did you mean 'train.learning_rate'" in capsys.readouterr().err


def test_train_needs_a_dataset(capsys):
    code = cli.main(["train", "clip", "--config", str(CONFIGS / "demo_clip.py"), "--workdir", "/tmp/x",
                     "--config.train.global_batch_size", "16"])
    assert code == 2
    assert "config.data.dataset is empty" in capsys.readouterr().err


def test_train_rejects_stray_arguments():
    with pytest.raises(SystemExit):
        cli.main(["train", "vae", "--config", str(CONFIGS / "demo_vae.py"), "--workdir", "/tmp/x", "--bogus"])
