import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusets_jax.models.bundle import load_model, module_config, module_from_config, save_model
from diffusets_jax.models.clip import CLIP
from diffusets_jax.models.net1d import BatchNorm1d
from diffusets_jax.models.vae import VAE
from tests.helpers.random_variables import random_variables


def _assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_vae_round_trip(tmp_path):
    vae = VAE(widths=(8, 16), groups=4)
    variables = random_variables(vae, jnp.zeros((1, 16, 12)), jax.random.key(0))
    path = save_model(tmp_path, "vae", vae, variables)
    assert path == os.path.join(tmp_path, "vae")
    assert sorted(os.listdir(tmp_path)) == ["vae"]  # no staging leftovers
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert config["class"] == "diffusets_jax.models.vae.VAE" and config["fields"]["widths"] == [8, 16]
    loaded, loaded_variables = load_model(tmp_path, "vae")
    assert loaded == vae and isinstance(loaded.widths, tuple)
    _assert_same(loaded_variables, variables)
    z = np.ones((1, 4, 4), np.float32)
    np.testing.assert_array_equal(loaded.apply(loaded_variables, z, method=VAE.decode),
                                  vae.apply(variables, z, method=VAE.decode))


def test_a_saved_model_gets_the_permissions_the_umask_gives(tmp_path):
    """Its folder was staged with tempfile.mkdtemp, whose 0700 followed it into place: colleagues sharing the model
    directory (a group- or world-readable umask) could not read its weights."""
    vae = VAE(widths=(8, 16), groups=4)
    variables = random_variables(vae, jnp.zeros((1, 16, 12)), jax.random.key(0))
    previous = os.umask(0o022)
    try:
        path = save_model(tmp_path, "vae", vae, variables)
    finally:
        os.umask(previous)
    assert os.stat(path).st_mode & 0o777 == 0o755
    assert sorted(os.listdir(tmp_path)) == ["vae"]


def test_clip_with_batch_stats_round_trip(tmp_path):
    clip = CLIP(base_filters=8, filters=(8, 16), blocks_per_stage=(1, 1), kernel_size=3, group_width=4,
                text_dim=6, text_hidden_dim=8, embed_dim=4)
    variables = random_variables(clip, jnp.zeros((1, 16, 12)), jnp.zeros((1, 6)))
    save_model(tmp_path, "clip", clip, variables)
    loaded, loaded_variables = load_model(tmp_path, "clip")
    assert loaded == clip
    assert set(loaded_variables) == {"params", "batch_stats"}
    _assert_same(loaded_variables, variables)


def test_saving_again_replaces_the_model_only_when_asked(tmp_path):
    bn = BatchNorm1d(momentum=0.2)
    first = {"params": {"scale": np.ones(3, np.float32), "bias": np.zeros(3, np.float32)}}
    second = {"params": {"scale": np.full(3, 2.0, np.float32), "bias": np.ones(3, np.float32)}}
    save_model(tmp_path, "bn", bn, first)
    with pytest.raises(FileExistsError, match="replace=True"):
        save_model(tmp_path, "bn", bn, second)  # never over a model unless asked
    save_model(tmp_path, "bn", bn, second, replace=True)
    assert sorted(os.listdir(tmp_path)) == ["bn"]
    loaded, variables = load_model(tmp_path, "bn")
    assert loaded.momentum == 0.2
    _assert_same(variables, second)



def test_a_replacement_that_fails_at_the_swap_puts_the_old_model_back(tmp_path, monkeypatch):
    from diffusets_jax.models import bundle

    bn = BatchNorm1d(momentum=0.2)
    first = {"params": {"scale": np.ones(3, np.float32), "bias": np.zeros(3, np.float32)}}
    second = {"params": {"scale": np.full(3, 2.0, np.float32), "bias": np.ones(3, np.float32)}}
    save_model(tmp_path, "bn", bn, first)
    real_replace = os.replace

    def replace(src, dst):  # the old model moves aside, then the new one fails to take its name
        if os.path.basename(os.fspath(src)).startswith(".bn.tmp-"):
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(bundle.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        save_model(tmp_path, "bn", bn, second, replace=True)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["bn"]  # neither hidden aside nor a staging folder left
    _assert_same(load_model(tmp_path, "bn")[1], first)

def test_config_values_survive_json():
    vae = VAE(widths=(32, 64, 64), groups=8)
    config = json.loads(json.dumps(module_config(vae)))
    assert module_from_config(config) == vae
    partial = {"class": "diffusets_jax.models.vae.VAE", "fields": {"widths": [4, 8]}}
    assert module_from_config(partial) == VAE(widths=(4, 8))


@pytest.mark.parametrize("key,value,expected", [
    ("num_res_blocks", 2.0, "fields.num_res_blocks takes an int (a width, count or size), got 2.0 (a float): write 2"),
    ("groups", True, "fields.groups takes an int (a width, count or size), got True (a bool)"),
    ("widths", [8.0, 16], "fields.widths takes whole numbers (widths, counts or sizes), got (8.0, 16)"),
])
def test_a_model_dirs_config_with_a_float_or_bool_count_names_its_file_and_field(key, value, expected):
    """An edited component config.json (`"num_res_blocks": 2.0`) built a module that failed in its first traced
    call with a traceback (`range(2.0)`), after an encode or a sample had claimed its output folder; True ran as 1.
    The rule config files given to train follow (51e2341)."""
    import re

    config = {"class": "diffusets_jax.models.vae.VAE", "fields": {"widths": [8, 16], "groups": 4, key: value}}
    with pytest.raises(ValueError, match="^" + re.escape(f"m/vae/config.json: {expected}")):
        module_from_config(config, source="m/vae/config.json")


def test_missing_model_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "vae")):
        load_model(tmp_path, "vae")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps(module_config(VAE())))
    with pytest.raises(FileNotFoundError, match="variables"):
        load_model(tmp_path, "vae")


def test_only_project_models_are_instantiated(tmp_path):
    for path in ("subprocess.Popen", "diffusets_jax.signal.STANDARD_LEADS", "flax.linen.Dense"):
        with pytest.raises(ValueError, match="class"):
            module_from_config({"class": path, "fields": {}}, source="x/config.json")
    with pytest.raises(ValueError, match="not a flax.linen Module"):
        module_from_config({"class": "diffusets_jax.models.vae.LATENT_SCALE", "fields": {}})
    with pytest.raises(ValueError, match="no field"):
        module_from_config({"class": "diffusets_jax.models.vae.VAE", "fields": {"nope": 1}})
    import flax.linen as nn

    with pytest.raises(ValueError, match="diffusets_jax.models"):
        save_model(tmp_path, "dense", nn.Dense(3), {"params": {}})
    assert not os.listdir(tmp_path)


def test_another_host_timing_out_in_the_restore_is_not_called_a_damaged_model(tmp_path, monkeypatch):
    # On several hosts the restore waits for every process: when another one stopped (a bad input of its own), this
    # one's restore times out. That is not a damaged model folder, which the one line used to tell the user.
    import orbax.checkpoint as ocp

    bn = BatchNorm1d(momentum=0.2)
    save_model(tmp_path, "bn", bn, {"params": {"scale": np.ones(3, np.float32), "bias": np.zeros(3, np.float32)}})
    lost = jax.errors.JaxRuntimeError("UNKNOWN: Gloo context initialization failed: DEADLINE_EXCEEDED: GetKeyValue() "
                                      "timed out with key: cpu:gloo/0,2048/1 and duration: 29.99999995s")

    def restore(self, *args, **kwargs):
        monkeypatch.setattr(jax, "process_count", lambda: 2)  # only now: Orbax's own set-up would wait for host 1
        raise lost

    monkeypatch.setattr(ocp.StandardCheckpointer, "restore", restore)
    with pytest.raises(jax.errors.JaxRuntimeError) as raised:
        load_model(tmp_path, "bn")
    assert raised.value is lost


@pytest.mark.multiprocess
def test_one_process_of_a_multi_host_run_saves_a_model_alone(tmp_path):
    # `train` on several hosts exports from process 0 only; Orbax's save waited for the other processes at its
    # barriers, so the export hung until the coordination service killed every process.
    from tests.helpers.two_processes import run_worker_pair

    run_worker_pair("save_model_two_process_worker.py", lambda i: [tmp_path])
    assert sorted(os.listdir(tmp_path)) == ["bn"]
