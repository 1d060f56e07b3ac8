from pathlib import Path

import pytest

from diffusets_jax import cli
from diffusets_jax.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["diffusets_vae", "diffusets_unet", "diffusets_clip", "improved_unet", "demo_vae",
                                  "demo_unet", "demo_clip"])
def test_shipped_configs_load(name):
    config = load_config(CONFIGS / f"{name}.py")
    assert {"model_kind", "model", "data", "mesh", "optimizer", "train"} <= set(config.keys())
    assert config.model_kind in name or (name == "improved_unet" and config.model_kind == "unet")
    assert ("diffusion" in config) == (config.model_kind == "unet")
    assert config.train.global_batch_size > 0
    # Every optimiser field is declared: the optimiser is built from exactly these, with no defaults in code.
    from diffusets_jax.config import optimizer_section

    assert set(config.optimizer.keys()) == set(optimizer_section().keys())


def test_faithful_unet_numbers():
    config = load_config(CONFIGS / "diffusets_unet.py")
    assert (config.train.global_batch_size, config.optimizer.learning_rate, config.train.num_epochs) == (512, 5e-4, 200)
    assert (config.train.t_min, config.train.t_max, config.train.cond_dropout) == (1, 998, 0.0)
    assert config.optimizer.lr_schedule == "cosine" and config.optimizer.cosine_final_fraction == 0.1
    assert config.diffusion.clip_sample and config.diffusion.schedule.prediction_type == "epsilon"


def test_train_unknown_override_names_close_matches(capsys):
    code = cli.main(["train", "vae", "--config", str(CONFIGS / "demo_vae.py"), "--workdir", "/tmp/x",
                     "--config.train.learning_rat=1e-3"])
    assert code == 2
    assert "did you mean 'optimizer.learning_rate'" in capsys.readouterr().err


def test_train_refuses_a_config_for_another_model(capsys, tmp_path):
    code = cli.main(["train", "vae", "--config", str(CONFIGS / "demo_clip.py"), "--workdir", str(tmp_path / "w")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "is a clip config" in err and "diffusets-jax train clip" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "w").exists()


def test_a_config_file_with_a_syntax_error_is_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(:\n    pass\n")
    assert cli.main(["train", "vae", "--config", str(bad), "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip()
    assert "bad.py line 1" in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_train_needs_a_dataset(capsys):
    code = cli.main(["train", "clip", "--config", str(CONFIGS / "demo_clip.py"), "--workdir", "/tmp/x",
                     "--config.train.global_batch_size", "16"])
    assert code == 2
    assert "config.data.dataset is empty" in capsys.readouterr().err


def test_train_rejects_stray_arguments():
    with pytest.raises(SystemExit):
        cli.main(["train", "vae", "--config", str(CONFIGS / "demo_vae.py"), "--workdir", "/tmp/x", "--bogus"])
