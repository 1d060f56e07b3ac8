import json
import re
from pathlib import Path

import pytest

from diffusets_jax.config import (
    apply_overrides,
    check_optimizer_section,
    load_config,
    optimizer_section,
    save_config,
    split_override_args,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

CONFIG_FILE = '''
import ml_collections

def get_config():
    c = ml_collections.ConfigDict()
    c.train = ml_collections.ConfigDict(dict(learning_rate=5e-4, global_batch_size=512, ema_decay=0.0,
                                             use_cfg=False, name="unet", channels=(8, 16), maybe=None))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
    return c
'''


@pytest.fixture
def config_path(tmp_path):
    path = tmp_path / "exp.py"
    path.write_text(CONFIG_FILE)
    return path


def test_load_and_override_types(config_path):
    config = load_config(config_path, ["--config.train.learning_rate=1e-4", "train.global_batch_size=2048",
                                       "--config.train.use_cfg=true", "train.channels=4,8,16", "mesh.fsdp=2",
                                       "train.maybe=[1, 2]", "train.ema_decay=1"])
    assert config.train.learning_rate == 1e-4
    assert config.train.global_batch_size == 2048 and isinstance(config.train.global_batch_size, int)
    assert config.train.use_cfg is True
    assert config.train.channels == (4, 8, 16)
    assert config.mesh.fsdp == 2
    assert config.train.maybe == [1, 2]
    assert config.train.ema_decay == 1.0 and isinstance(config.train.ema_decay, float)


def test_a_tuple_of_whole_numbers_takes_whole_numbers_as_an_int_field_does(config_path):
    """`--config.model.widths=32.0,64,64` became (32.0, 64, 64) and failed in the first traced step, after the
    workdir was claimed; `(32,64,'a')` failed later still, naming no key."""
    config = load_config(config_path, ["train.channels=32.0,64"])  # as an int field takes 512.0
    assert config.train.channels == (32, 64) and all(type(c) is int for c in config.train.channels)
    for raw in ("32.5,64", "(32,64,'a')", "(32,True)", "(64)"):
        with pytest.raises(ValueError, match=r"config key 'train.channels' expects a tuple"):
            load_config(config_path, [f"train.channels={raw}"])
    with pytest.raises(ValueError, match=r"expects a tuple of whole numbers, e.g. \(32, 64\) \(current value "
                                         r"\(8, 16\)\), got '32.5,64'"):
        load_config(config_path, ["train.channels=32.5,64"])


def test_unknown_key_names_close_matches(config_path):
    with pytest.raises(ValueError, match=r"unknown config key 'train.learning_rat'.*'train.learning_rate'"):
        load_config(config_path, ["train.learning_rat=1"])
    with pytest.raises(ValueError, match=r"unknown config key 'optim.global_batch_size'.*'train.global_batch_size'"):
        load_config(config_path, ["optim.global_batch_size=1"])
    with pytest.raises(ValueError, match="unknown config key 'zzz'"):
        load_config(config_path, ["zzz=1"])


def test_bad_values_are_errors(config_path):
    with pytest.raises(ValueError, match="expects an int"):
        load_config(config_path, ["train.global_batch_size=1.5"])
    with pytest.raises(ValueError, match="expects a bool"):
        load_config(config_path, ["train.use_cfg=maybe"])
    with pytest.raises(ValueError, match="expects a float"):
        load_config(config_path, ["train.learning_rate=fast"])
    with pytest.raises(ValueError, match="is a section"):
        load_config(config_path, ["train=1"])
    with pytest.raises(ValueError, match="no '='"):
        load_config(config_path, ["train.learning_rate"])


def test_missing_file_and_missing_get_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "nope.py")
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(ValueError, match="get_config"):
        load_config(empty)


def test_split_override_args():
    overrides, rest = split_override_args(["--workdir", "w", "--config.a.b=1", "--config.c", "2", "vae"])
    assert overrides == ["--config.a.b=1", "--config.c=2"]
    assert rest == ["--workdir", "w", "vae"]


def test_save_config_writes_resolved_json(config_path, tmp_path):
    config = apply_overrides(load_config(config_path), ["train.learning_rate=0.002"])
    path = save_config(config, tmp_path / "work")
    saved = json.loads(path.read_text())
    assert saved["train"]["learning_rate"] == 0.002
    assert saved["train"]["channels"] == [8, 16]
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".config")]


def test_saved_json_config_loads_back_with_overrides(config_path, tmp_path):
    path = save_config(load_config(config_path), tmp_path / "run")
    config = load_config(path, ["train.global_batch_size=8"])
    assert config.train.global_batch_size == 8 and config.train.learning_rate == 5e-4
    assert list(config.train.channels) == [8, 16]


def test_module_section_lists_every_field():
    import flax.linen as nn

    from diffusets_jax.config import module_section

    class Toy(nn.Module):
        widths: tuple[int, ...] = (1, 2)
        kernel: int = 3
        dtype: object = None

    section = module_section(Toy, kernel=5)
    assert section.to_dict() == {"widths": (1, 2), "kernel": 5}
    with pytest.raises(ValueError, match="no field"):
        module_section(Toy, kernal=5)


def test_seeds_are_whole_numbers_jax_keeps_apart():
    """Why the range: without x64 JAX keeps a seed's low 32 bits, so 2**32 + 1 would draw what 1 draws."""
    import jax
    import numpy as np

    from diffusets_jax.config import MAX_SEED, check_seed

    same = [jax.random.key_data(jax.random.key(s)) for s in (1, MAX_SEED + 2)]
    np.testing.assert_array_equal(*same)
    assert check_seed(0) == 0 and check_seed(MAX_SEED) == MAX_SEED and check_seed(np.int64(7)) == 7
    for bad in (-1, MAX_SEED + 1, 2**63, 1.0, True, "3", None):
        with pytest.raises(ValueError, match="must be a whole number from 0 to 4294967295"):
            check_seed(bad)


# config.optimizer is checked before any work: values that would train wrongly instead of failing are refused.
@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.py")), ids=lambda p: p.stem)
def test_every_shipped_config_passes(path):
    config = load_config(path)
    from diffusets_jax.train.run import check_train_section

    check_optimizer_section(config.optimizer, str(path))
    check_train_section(config, str(path))


@pytest.mark.parametrize("key,value,expected", [
    ("learning_rate", -1e-4, "optimizer.learning_rate must be in (0, inf), got -0.0001"),  # gradient ascent
    ("learning_rate", 0.0, "optimizer.learning_rate must be in (0, inf)"),
    ("learning_rate", float("nan"), "optimizer.learning_rate must be a finite number"),
    ("b1", 1.5, "optimizer.b1 must be in [0, 1), got 1.5"),
    ("b2", 1.0, "optimizer.b2 must be in [0, 1)"),
    ("eps", 0.0, "optimizer.eps must be in (0, inf)"),
    ("weight_decay", -0.01, "optimizer.weight_decay must be in [0, inf)"),
    ("grad_clip_norm", float("nan"), "optimizer.grad_clip_norm must be a finite number"),
    ("warmup_steps", -4, "optimizer.warmup_steps must be in [0, inf)"),
    ("cosine_final_fraction", 1.5, "optimizer.cosine_final_fraction must be in [0, 1]"),
    ("one_cycle_pct_start", 1.0, "optimizer.one_cycle_pct_start must be in (0, 1)"),
    ("one_cycle_div_factor", 0.0, "optimizer.one_cycle_div_factor must be in (0, inf)"),
    ("lr_schedule", "linear", "optimizer.lr_schedule must be one of"),
])
def test_a_value_that_would_train_wrongly_is_refused_by_name(key, value, expected):
    optimizer = optimizer_section()
    optimizer[key] = value
    with pytest.raises(ValueError) as err:
        check_optimizer_section(optimizer, "configs/x.py")
    assert str(err.value).startswith("configs/x.py: ") and expected in str(err.value)


@pytest.mark.parametrize("schedule", ["constant", "one_cycle"])
def test_a_warmup_for_a_schedule_without_one_is_refused(schedule):
    """Only the cosine schedule warms up: `--config.optimizer.warmup_steps=500` on the VAE's one-cycle or CLIP's
    constant rate was ignored, without a word."""
    with pytest.raises(ValueError, match=rf"optimizer.warmup_steps=500 warms up the cosine schedule only, and "
                                         rf"optimizer.lr_schedule is '{schedule}'"):
        check_optimizer_section(load_config(CONFIGS / "demo_clip.py", [f"optimizer.lr_schedule={schedule}",
                                                                       "optimizer.warmup_steps=500"]).optimizer)
    check_optimizer_section(optimizer_section(lr_schedule="cosine", warmup_steps=500))


def test_the_closed_ends_of_each_range_are_allowed():
    optimizer = optimizer_section(b1=0.0, b2=0.0, weight_decay=0.0, grad_clip_norm=0.0, warmup_steps=0,
                                  cosine_final_fraction=1.0)
    check_optimizer_section(optimizer)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.py")), ids=lambda p: p.name)
def test_a_config_names_the_folder_its_training_exports_into(path):
    """The published configs said their component went to `workdir/export/<kind>`, a folder no training writes:
    the export goes into the model directory, `WORKDIR/model` unless --model-dir names another."""
    from diffusets_jax.train.run import MODEL_DIR_NAME

    text = path.read_text()
    for claim in re.findall(r"Output: `([^`]*)`", text):
        kind = load_config(path).model_kind
        assert claim == f"WORKDIR/{MODEL_DIR_NAME}/{kind}", f"{path.name} says its output is {claim}"



@pytest.mark.parametrize("name,kind", [("demo_vae.py", "vae"), ("demo_unet.py", "unet")])
def test_a_demo_config_states_its_parameter_count(name, kind):
    """demo_vae.py said about 0.3 M parameters; its widths (32, 64, 64) make 0.61 M."""
    import jax
    import numpy as np

    from diffusets_jax.train.run import make_task

    path = CONFIGS / name
    claim = re.search(r"\((?:about )?([\d.]+) M parameters instead of", path.read_text())
    assert claim, f"{name} states no parameter count"
    config = load_config(path)
    config.data.num_train_examples = 64
    variables = jax.eval_shape(make_task(kind, config, 10).init_variables, jax.random.PRNGKey(0))
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(variables["params"]))
    assert count / 1e6 == pytest.approx(float(claim.group(1)), rel=0.1), f"{name}: {count} parameters"
