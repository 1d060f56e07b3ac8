"""Winograd convolutions: exact algebra in float64, float32 accuracy against a float64 reference, gradients, and
when the VAE takes the path."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusets_jax.models import winograd
from diffusets_jax.models.vae import VAE


def _reference(x: np.ndarray, kernel: np.ndarray, padding: tuple[int, int]) -> np.ndarray:
    """Direct correlation in float64 numpy: y[b, o, :] = sum_i xpad[b, o + i, :] @ kernel[i]."""
    x = np.pad(np.asarray(x, np.float64), ((0, 0), padding, (0, 0)))
    kernel = np.asarray(kernel, np.float64)
    out_length = x.shape[1] - kernel.shape[0] + 1
    return sum(np.einsum("blc,co->blo", x[:, i:i + out_length], kernel[i]) for i in range(kernel.shape[0]))


def _direct(x, kernel, padding):
    return jax.lax.conv_general_dilated(x, kernel, (1,), (padding,), dimension_numbers=("NWC", "WIO", "NWC"))


@pytest.mark.parametrize("m,r", [(2, 3), (4, 3), (4, 2), (3, 2), (2, 5)])
def test_transforms_compute_the_correlation_exactly(m, r):
    """A^T [(G g) * (B^T d)] is the m-output, r-tap correlation of the tile d: exact up to float64 rounding."""
    a_t, g_matrix, b_t = winograd.transforms(m, r)
    assert a_t.shape == (m, m + r - 1) and g_matrix.shape == (m + r - 1, r) and b_t.shape == (m + r - 1,) * 2
    rng = np.random.default_rng(m * 10 + r)
    for _ in range(5):
        d, g = rng.standard_normal(m + r - 1), rng.standard_normal(r)
        expected = np.array([np.dot(g, d[i:i + r]) for i in range(m)])
        np.testing.assert_allclose(a_t @ ((g_matrix @ g) * (b_t @ d)), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("length,taps,padding", [
    (64, 3, (1, 1)),   # the VAE's "same" k3 conv, length a multiple of the tile
    (13, 3, (1, 1)),   # the last tile partly past the end
    (7, 3, (0, 0)),    # valid
    (21, 2, (1, 0)),   # the upsampling's even taps
    (21, 2, (0, 1)),   # and its odd ones
])
def test_correlate_matches_a_float64_reference(length, taps, padding):
    rng = np.random.default_rng(length)
    x = rng.standard_normal((3, length, 96)).astype(np.float32)
    kernel = (rng.standard_normal((taps, 96, 80)) / np.sqrt(taps * 96)).astype(np.float32)
    expected = _reference(x, kernel, padding)
    got = np.asarray(jax.jit(winograd.correlate, static_argnums=2)(x, kernel, padding))
    direct = np.asarray(_direct(x, kernel, padding))
    assert got.shape == expected.shape == direct.shape
    scale = np.abs(expected).max()
    # float32 rounding in the transforms: within 1e-5 of the scale, and of the order of the direct conv's own.
    assert np.abs(got - expected).max() <= 1e-5 * scale
    assert np.sqrt(np.mean((got - expected) ** 2)) <= 10 * max(np.sqrt(np.mean((direct - expected) ** 2)), 1e-8)


@pytest.mark.parametrize("taps,padding", [
    (3, (1, 1)),  # the VAE's "same" k3 conv
    (2, (1, 0)),  # the upsampling's even taps: the input gradient is padded (0, 1), not (1, 0)
    (2, (0, 1)),  # and its odd ones
])
def test_correlate_gradients_match_the_direct_convolution(taps, padding):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 30, 64)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((taps, 64, 72)) / np.sqrt(taps * 64), jnp.float32)
    target = jnp.asarray(rng.standard_normal((2, 31 - taps + sum(padding), 72)), jnp.float32)

    def loss(conv):
        return lambda x, k: jnp.sum((conv(x, k, padding) - target) ** 2)

    ours = jax.grad(loss(winograd.correlate), argnums=(0, 1))(x, kernel)
    theirs = jax.grad(loss(_direct), argnums=(0, 1))(x, kernel)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * float(jnp.abs(b).max()))


def test_when_the_winograd_path_is_taken():
    c, length = winograd.MIN_CHANNELS, winograd.TILE * winograd.MIN_ROWS  # one record of this length has MIN_ROWS tiles
    wide, narrow = jnp.zeros((1, length, c), jnp.float32), jnp.zeros((1, length, c // 2), jnp.float32)
    k3, narrow_k3 = jnp.zeros((3, c, c), jnp.float32), jnp.zeros((3, c // 2, c), jnp.float32)
    on_cpu = jax.default_backend() == "cpu"
    assert winograd.uses_winograd("auto", wide, k3) == on_cpu
    assert winograd.uses_winograd("auto", jnp.zeros((4, length // 4, c)), k3) == on_cpu  # rows count the batch
    assert not winograd.uses_winograd("auto", wide[:, :length - winograd.TILE], k3)  # too few rows for the matmuls to pay
    assert not winograd.uses_winograd("auto", narrow, narrow_k3)  # too narrow to pay for the transforms
    assert not winograd.uses_winograd("auto", wide.astype(jnp.bfloat16), k3.astype(jnp.bfloat16))  # bf16: too lossy
    assert not winograd.uses_winograd("auto", wide, jnp.zeros((1, c, c)))  # a 1x1 conv is a matmul already
    assert not winograd.uses_winograd("direct", wide, k3)
    assert winograd.uses_winograd("winograd", narrow, narrow_k3)
    with pytest.raises(ValueError, match="conv_algorithm must be one of"):
        winograd.uses_winograd("fft", wide, k3)


def test_vae_algorithms_share_parameters_and_agree():
    """Same parameter tree and initial values whatever the algorithm; encode and decode agree within float32
    rounding (the published-scale parity against PyTorch is in test_convert_vae)."""
    small = VAE(widths=(64, 64), groups=8)
    x = jax.random.normal(jax.random.key(0), (2, 64, 12))
    direct, fast = small.clone(conv_algorithm="direct"), small.clone(conv_algorithm="winograd")
    variables = jax.jit(direct.init)(jax.random.key(1), x, jax.random.key(2))
    same = jax.jit(fast.init)(jax.random.key(1), x, jax.random.key(2))
    jax.tree.map(np.testing.assert_array_equal, variables, same)

    def run(module):
        mean, logvar = module.apply(variables, x, method=VAE.encode)
        return mean, logvar, module.apply(variables, mean, method=VAE.decode)

    for a, b in zip(jax.jit(lambda: run(fast))(), jax.jit(lambda: run(direct))(), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * float(jnp.abs(b).max()))


def _interior_padded_pads(hlo: str) -> list[str]:
    """The pads of a compiled program's HLO with interior padding (`lo_hi_interior` per dimension, interior > 0)."""
    return [m for m in re.findall(r"pad\([^)]*\), padding=(\S+?)[,}\s]", hlo)
            if any(int(dim.split("_")[2]) for dim in m.split("x") if dim.count("_") == 2)]


def test_the_gradient_reads_every_transform_as_slices():
    """The written-out gradient: no interior-padded pads (what autodiff makes of the strided input transform, and
    XLA:CPU fuses into loops that do not vectorise), while autodiff of the same forward has them, so the check can
    tell."""
    x, kernel = jnp.ones((2, 48, 16)), jnp.ones((3, 16, 8)) * 0.1

    def hlo_of(conv):
        grad = jax.grad(lambda x, k: jnp.sum(jnp.tanh(conv(x, k)) ** 2), argnums=(0, 1))
        return jax.jit(grad).lower(x, kernel).compile().as_text()

    assert _interior_padded_pads(hlo_of(lambda x, k: winograd.correlate(x, k, (1, 1)))) == []
    autodiff = hlo_of(lambda x, k: winograd._winograd(x, k, (1, 1), winograd.TILE)[0])
    assert _interior_padded_pads(autodiff)


def test_correlate_refuses_padding_beyond_full():
    with pytest.raises(ValueError, match="pads each side by 0 to 2"):
        winograd.correlate(jnp.ones((1, 8, 4)), jnp.ones((3, 4, 4)), (3, 1))


def test_the_gradient_on_an_explicit_mesh_matches_one_device():
    """The kernel gradient contracts the batch-sharded tiles: on a mesh with Explicit axes it is told its
    sharding (that of the kernel) and equals the one-device gradient."""
    mesh = jax.make_mesh((len(jax.devices()),), ("data",))
    assert mesh.axis_types == (jax.sharding.AxisType.Explicit,)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((len(jax.devices()), 40, 24)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 24, 16)) / 8, jnp.float32)
    grad = jax.jit(jax.grad(lambda x, k: jnp.sum(winograd.correlate(x, k, (1, 1)) ** 2), argnums=(0, 1)))
    sharded_x = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    sharded_kernel = jax.device_put(kernel, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    for got, expected in zip(grad(sharded_x, sharded_kernel), grad(x, kernel), strict=True):
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * float(jnp.abs(expected).max()))
