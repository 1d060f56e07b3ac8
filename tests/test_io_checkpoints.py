import asyncio
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

from diffusets_jax.io.checkpoints import _is_late_native_wakeup, restore_error_reason

REPO = Path(__file__).resolve().parents[1]


def _closed_loop_error() -> BaseException:
    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(print)
    except RuntimeError as err:
        return err
    raise AssertionError("a closed loop accepted a callback")


def test_only_a_native_wakeup_of_a_closed_loop_is_an_echo():
    error = _closed_loop_error()
    from_python = types.SimpleNamespace(exc_value=error, object=None, exc_traceback=error.__traceback__)
    # What tensorstore's threads produce: no Python frame above call_soon_threadsafe.
    from_native = types.SimpleNamespace(exc_value=error, object=None, exc_traceback=error.__traceback__.tb_next)
    assert from_native.exc_traceback.tb_frame.f_code.co_name == "call_soon_threadsafe"
    assert _is_late_native_wakeup(from_native)
    assert not _is_late_native_wakeup(from_python)  # our own code's mistakes stay loud
    assert not _is_late_native_wakeup(types.SimpleNamespace(**{**vars(from_native), "object": print}))
    other = RuntimeError("something else")
    assert not _is_late_native_wakeup(types.SimpleNamespace(exc_value=other, object=None, exc_traceback=None))


def test_the_reason_is_one_shortened_line():
    assert restore_error_reason(ValueError("a\n  b")) == "a b"
    assert restore_error_reason(OSError()) == "OSError"
    assert len(restore_error_reason(ValueError("x" * 500), limit=50)) == 50


_LOAD_DAMAGED = textwrap.dedent("""
    import pathlib, sys
    import jax, jax.numpy as jnp
    from diffusets_jax.models.bundle import load_model, save_model
    from diffusets_jax.models.vae import VAE
    from tests.helpers.random_variables import random_variables

    root = pathlib.Path(sys.argv[1])
    vae = VAE(widths=(8, 16), groups=4)
    save_model(root, "vae", vae, random_variables(vae, jnp.zeros((1, 16, 12)), jax.random.key(0)))
    for data in (root / "vae" / "variables").rglob("d/*"):
        data.write_bytes(data.read_bytes()[:20])
    try:
        load_model(root, "vae")
    except ValueError as err:
        print("REPORTED", err, file=sys.stderr)
        sys.exit(2)
""")


def test_a_failed_restore_leaves_no_echoes(tmp_path):
    # tensorstore's reads still in flight wake Orbax's closed event loop at once; before the filter was installed
    # ahead of the restore this printed "Event loop is closed" tracebacks in most runs, so three runs catch it.
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    for attempt in range(3):
        proc = subprocess.run([sys.executable, "-c", _LOAD_DAMAGED, str(tmp_path / str(attempt))], env=env,
                              capture_output=True, text=True, timeout=300, cwd=REPO)
        assert proc.returncode == 2, proc.stderr[-3000:]
        lines = proc.stderr.splitlines()
        assert sum(line.startswith("REPORTED") for line in lines) == 1, proc.stderr[-3000:]
        for echo in ("Traceback", "Event loop is closed", "never retrieved"):
            assert echo not in proc.stderr, proc.stderr[-3000:]
