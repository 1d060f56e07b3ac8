"""Test configuration: 8 simulated CPU devices, TensorFlow kept off accelerators, quiet logs, one compilation cache.

XLA reads its flags when the backend starts, so this must run before anything imports jax.
"""

import os

# Most of the suite's time is XLA compiling. The tests still compile at XLA's default optimisation: LLVM at -O0
# (`--xla_backend_optimization_level=0`) cut two of the heaviest tests from 159 to 124 s, but it changes float
# rounding (the remat test's gradient comparison failed its tolerance), so the tests would no longer check the
# numbers users get (measured 2026-12-03).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import shutil  # noqa: E402
import tempfile  # noqa: E402

# Many tests compile the same programs (the tiny model's sampler, the faithful U-Net), often in subprocesses of
# their own. A persistent compilation cache for this session, inherited by every subprocess through the
# environment, compiles each once; it lives in a folder made here and removed when the session ends.
# Under pytest-xdist the controller runs this first and its workers inherit the folder; only the process that
# made it removes it. JAX takes a file lock around cache reads and writes only when the cache has a size limit,
# so one is set: concurrent workers and subprocesses then never read a half-written entry.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _XLA_CACHE = tempfile.mkdtemp(prefix="diffusets-jax-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(16 * 2**30))
else:
    _XLA_CACHE = None

import pytest  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    if _XLA_CACHE is not None:
        shutil.rmtree(_XLA_CACHE, ignore_errors=True)


@pytest.fixture(scope="module")
def openai_env():
    """The real OpenAI client pointed at a local fake OpenAI-compatible server serving 16-d embeddings (the tiny
    model directory's recorded embedder), for the module's tests."""
    from tests.helpers.fake_openai_server import fake_openai_env
    from tests.helpers.tiny_models import TEXT_DIM

    with fake_openai_env(TEXT_DIM) as server:
        yield server


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random VAE + U-Net model directory (`tests.helpers.tiny_models.tiny_model_dir`)."""
    from tests.helpers.tiny_models import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("model"))
