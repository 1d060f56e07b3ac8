"""bf16 compute with float32 master parameters (`train.compute_dtype="bfloat16"`) for the three trainers.

For each of the VAE, U-Net and CLIP recipes, on a tiny model: the bf16 loss and gradients stay close to the
float32 ones computed from the same parameters, batch and key, the bf16 run really computes its
convolutions in bf16 (not silently promoted back to float32), and the train step keeps float32 parameters
and optimiser state.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusets_jax import parallel
from diffusets_jax.config import load_config
from diffusets_jax.train import loop
from diffusets_jax.train.clip import clip_task
from diffusets_jax.train.diffusion import diffusion_task
from diffusets_jax.train.vae import vae_task
from tests.helpers.jaxprs import equations

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Three models, each compiled for float32 and bf16 with gradients: minutes of CPU on 2 shared cores.
pytestmark = pytest.mark.slow


def _ecg_batch(n: int, length: int = 128) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    t = np.linspace(0, 10, length, dtype=np.float32)
    beats = np.sin(2 * np.pi * rng.uniform(0.8, 1.6, (n, 1, 1)) * t[None, :, None])
    return {"ecg": (0.5 * beats * np.linspace(0.2, 1, 12)[None, None] + 0.05 * rng.normal(size=(n, length, 12)))
            .astype(np.float32)}


def _latent_batch(n: int, text_dim: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {"latent_mean": rng.normal(size=(n, 128, 4)).astype(np.float32) * 5,
            "latent_logvar": np.full((n, 128, 4), -6.0, np.float32),
            "text_embedding": rng.normal(size=(n, text_dim)).astype(np.float32) / np.sqrt(text_dim),
            "sex": rng.integers(0, 2, n).astype(np.float32), "age": rng.uniform(20, 90, n).astype(np.float32),
            "heart_rate": rng.uniform(50, 110, n).astype(np.float32)}


def _clip_batch(n: int, text_dim: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2)
    return {"ecg": rng.normal(0, 0.3, (n, 1024, 12)).astype(np.float32),
            "text_embedding": rng.normal(size=(n, text_dim)).astype(np.float32)}


# name -> (task factory, config file, overrides, batch). Tiny models: the same code paths as the published
# sizes at a fraction of the compile time.
CASES = {
    "vae": (vae_task, "demo_vae.py",
            ["model.widths=(8, 16, 16)", "model.groups=4", "model.num_res_blocks=1", "data.num_train_examples=64"],
            lambda: _ecg_batch(4)),
    "unet": (diffusion_task, "diffusets_unet.py",
             ["model.channels=(8, 16)", "model.down_attention_dims=(8, 16)", "model.bottleneck_attention_dim=8",
              "model.up_attention_dims=(32, 16)", "model.bottleneck_heads=2", "model.text_dim=12"],
             lambda: _latent_batch(4, 12)),
    "clip": (clip_task, "demo_clip.py",
             ["model.filters=(8, 16)", "model.blocks_per_stage=(1, 1)", "model.text_dim=8", "model.kernel_size=4"],
             lambda: _clip_batch(4, 8)),
}
# Relative loss tolerance: bf16 keeps 8 mantissa bits (a relative rounding of 2^-9 per operation), and the
# errors of a few dozen layers partly cancel; 3 % is far above what we see (well under 1 %) and far below
# what a broken bf16 path (wrong scaling, a bf16 softmax overflowing, a lost residual) would give.
LOSS_RTOL = 0.03


def _tasks(name: str) -> dict[str, loop.Task]:
    make_task, config_file, overrides, _ = CASES[name]
    return {dtype: make_task(load_config(CONFIGS / config_file, [*overrides, f"train.compute_dtype={dtype}"]),
                             num_steps=10)
            for dtype in ("float32", "bfloat16")}


@pytest.fixture(scope="module", params=sorted(CASES))
def losses_and_grads(request):
    name = request.param
    tasks = _tasks(name)
    variables = parallel.jit_run_once(tasks["float32"].init_variables, jax.random.PRNGKey(0))
    params = variables["params"]
    model_state = {k: v for k, v in variables.items() if k != "params"}
    batch = jax.tree.map(jnp.asarray, CASES[name][3]())
    key = jax.random.PRNGKey(1)
    out = {}
    for dtype, task in tasks.items():
        def loss(p, task=task):
            return task.loss_fn(p, model_state, batch, key, jnp.int32(0))[0]

        value, grads = jax.jit(jax.value_and_grad(loss))(params)
        out[dtype] = (float(value), grads, jax.make_jaxpr(loss)(params))
    return name, out


def test_bf16_loss_is_within_tolerance_of_f32(losses_and_grads):
    name, out = losses_and_grads
    f32, bf16 = out["float32"][0], out["bfloat16"][0]
    assert np.isfinite(f32) and np.isfinite(bf16)
    relative = abs(bf16 - f32) / abs(f32)
    assert relative < LOSS_RTOL, f"{name}: bf16 loss {bf16} vs f32 {f32} ({relative:.2%})"
    assert bf16 != f32, f"{name}: the bf16 loss equals the f32 one bit for bit: bf16 was not used"


def test_bf16_gradients_point_the_same_way(losses_and_grads):
    name, out = losses_and_grads
    flat32 = np.concatenate([np.ravel(g) for g in jax.tree.leaves(out["float32"][1])])
    flat16 = np.concatenate([np.ravel(g) for g in jax.tree.leaves(out["bfloat16"][1])])
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(out["bfloat16"][1]))  # grads of f32 masters
    cosine = flat32 @ flat16 / (np.linalg.norm(flat32) * np.linalg.norm(flat16))
    assert cosine > 0.99, f"{name}: cosine(bf16 grads, f32 grads) = {cosine:.4f}"
    assert np.linalg.norm(flat16) == pytest.approx(np.linalg.norm(flat32), rel=0.05)


def test_bf16_convolutions_run_in_bf16(losses_and_grads):
    name, out = losses_and_grads
    for dtype, expected in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
        convs = [eqn for eqn in equations(out[dtype][2].jaxpr) if eqn.primitive.name == "conv_general_dilated"]
        assert convs, f"{name}: no convolution in the loss"
        operand_dtypes = {var.aval.dtype for eqn in convs for var in eqn.invars}
        assert operand_dtypes == {jnp.dtype(expected)}, f"{name} {dtype}: convolutions in {operand_dtypes}"


def test_bf16_train_step_keeps_f32_params_and_optimizer_state():
    task = _tasks("clip")["bfloat16"]
    mesh = parallel.make_mesh(1, 1, devices=jax.devices()[:1])
    _, shardings = loop.abstract_state(task, mesh, 0, False)
    state = loop.init_state(task, mesh, 0, False)
    step = loop.jit_train_step(loop.make_train_step(task), shardings, mesh)
    state, metrics = step(state, parallel.shard_host_batch(_clip_batch(2, 8), mesh))
    assert np.isfinite(float(metrics["loss"]))
    floating = [x for x in jax.tree.leaves((state.params, state.opt_state)) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floating and all(x.dtype == jnp.float32 for x in floating)
