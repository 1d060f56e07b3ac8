"""The command's persistent compilation cache: where it goes, when the user's settings win, and a real rerun loading it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffusets_jax import compile_cache

REPO = Path(__file__).resolve().parents[1]


def test_default_folder_follows_xdg_then_home():
    assert compile_cache.cache_settings({"XDG_CACHE_HOME": "/x/cache", "HOME": "/home/u"}) == {
        "JAX_COMPILATION_CACHE_DIR": "/x/cache/diffusets-jax/xla",
        "JAX_COMPILATION_CACHE_MAX_SIZE": str(compile_cache.DEFAULT_MAX_BYTES)}
    # A relative XDG_CACHE_HOME is invalid by the spec and ignored.
    for environ in ({"HOME": "/home/u"}, {"HOME": "/home/u", "XDG_CACHE_HOME": "rel/cache"}):
        assert compile_cache.cache_settings(environ)["JAX_COMPILATION_CACHE_DIR"] == "/home/u/.cache/diffusets-jax/xla"


def test_the_users_settings_win():
    assert compile_cache.cache_settings({"HOME": "/h", "JAX_COMPILATION_CACHE_DIR": "/mine"}) == {}
    assert compile_cache.cache_settings({"HOME": "/h", "JAX_COMPILATION_CACHE_DIR": ""}) == {}
    for off in ("false", "0", "OFF", " no "):
        assert compile_cache.cache_settings({"HOME": "/h", "JAX_ENABLE_COMPILATION_CACHE": off}) == {}
    assert compile_cache.cache_settings({"HOME": "/h", "JAX_ENABLE_COMPILATION_CACHE": "true"})
    settings = compile_cache.cache_settings({"HOME": "/h", "JAX_COMPILATION_CACHE_MAX_SIZE": "1000"})
    assert settings["JAX_COMPILATION_CACHE_MAX_SIZE"] == "1000"


def test_a_bad_size_is_one_clear_error():
    with pytest.raises(ValueError, match="JAX_COMPILATION_CACHE_MAX_SIZE must be a whole number of bytes.*'4G'"):
        compile_cache.cache_settings({"HOME": "/h", "JAX_COMPILATION_CACHE_MAX_SIZE": "4G"})


def test_an_unwritable_location_leaves_the_environment_alone(tmp_path):
    (tmp_path / "blocked").write_text("a file where the cache folder's parent would go")
    environ = {"XDG_CACHE_HOME": str(tmp_path / "blocked"), "HOME": str(tmp_path)}
    assert compile_cache.enable(environ) is None
    assert environ == {"XDG_CACHE_HOME": str(tmp_path / "blocked"), "HOME": str(tmp_path)}
    environ = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "mine"), "HOME": str(tmp_path)}
    assert compile_cache.enable(environ) is None and not (tmp_path / "mine").exists()


def _clean_env(tmp_path: Path) -> dict[str, str]:
    """This environment without the suite's own cache settings, with a fresh XDG cache home under `tmp_path`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    return env


def test_a_process_that_imported_jax_first_is_configured_too(tmp_path):
    script = ("import jax\nfrom diffusets_jax import compile_cache\ncompile_cache.enable()\n"
              "print(jax.config.jax_compilation_cache_dir, jax.config.jax_compilation_cache_max_size)")
    proc = subprocess.run([sys.executable, "-c", script], env=_clean_env(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(tmp_path / "xdg" / "diffusets-jax" / "xla"),
                                   str(compile_cache.DEFAULT_MAX_BYTES)]


@pytest.mark.slow
def test_a_rerun_of_a_command_loads_its_programs_from_the_cache(tmp_path):
    """Two `embed --embedder local` runs (the Flax text encoder's program) with no cache settings of their own."""
    (tmp_path / "reports.csv").write_text("report\nSinus rhythm|Normal ECG\nAtrial fibrillation\n")
    # Cache even the quick programs of this small run (the default skips those under a second).
    env = {**_clean_env(tmp_path), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    folder = tmp_path / "xdg" / "diffusets-jax" / "xla"

    def embed(run: int) -> None:
        proc = subprocess.run([sys.executable, "-m", "diffusets_jax", "embed", "--input", str(tmp_path / "reports.csv"),
                               "--embedder", "local", "--cache", str(tmp_path / f"{run}.sqlite"), "--no-progress"],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    embed(1)
    entries = {p: p.stat().st_mtime_ns for p in folder.glob("*-cache")}
    assert entries, sorted(p.name for p in folder.iterdir())
    used = {p: p.read_bytes() for p in folder.glob("*-atime")}
    embed(2)
    # Nothing compiled anew, nothing rewritten, and the entries were read (JAX's LRU records each read's time).
    assert {p: p.stat().st_mtime_ns for p in folder.glob("*-cache")} == entries
    assert all(p.read_bytes() != before for p, before in used.items())
