"""Installed as a user installs it (`pip install .` or a wheel, not editable): the package must carry everything
the commands read, the shipped configs included, and find it without a checkout around it. `make install` installs
editable, so nothing else in the suite runs on an installed copy."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# What a build reads: the packages' sources and data, the configs mapped into the package, the metadata's files.
BUILD_INPUTS = ("pyproject.toml", "README.md", "diffusets_jax", "data_prep", "configs")
CACHES = shutil.ignore_patterns("__pycache__", "*.pyc")


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")


def _isolated_env() -> dict[str, str]:
    """The environment without the PYTHONPATH that may point the test run at a checkout."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def test_every_folder_of_the_packages_is_listed_and_configs_is_mapped_into_the_package():
    setuptools = PYPROJECT["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    folders = {".".join(path.parent.relative_to(ROOT).parts) for top in ("diffusets_jax", "data_prep")
               for path in _files(ROOT / top)}
    assert folders - listed == set(), "add these folders to [tool.setuptools] packages, or the wheel lacks them"
    assert setuptools["package-dir"] == {"diffusets_jax.configs": "configs"}
    assert "diffusets_jax.configs" in listed


# Run by the installed (or copied) package, from a folder outside any checkout: where the shipped configs are found
# and that the commands' config lookups load them.
LOOKUP = """
import json, sys
from pathlib import Path
import diffusets_jax
from diffusets_jax.config import load_config
from diffusets_jax.experiments import demo, downstream
demo_vae = demo._config("demo_vae", Path("data"), 1)
classifier = load_config(downstream.DEFAULT_CONFIG)
print(json.dumps({"package": diffusets_jax.__file__, "demo_vae": demo_vae.model_kind,
                  "classifier": classifier.model_kind}))
"""


def _lookup(python: str | Path, cwd: Path, env: dict[str, str]) -> dict:
    done = subprocess.run([str(python), "-c", LOOKUP], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_demo_and_downstream_find_the_configs_a_wheel_carries(tmp_path):
    # The layout a wheel installs: the package with the configs inside it, nothing of the checkout next to it.
    site = tmp_path / "site"
    shutil.copytree(ROOT / "diffusets_jax", site / "diffusets_jax", ignore=shutil.ignore_patterns(
        "__pycache__", "demo_data"))
    shutil.copytree(ROOT / "configs", site / "diffusets_jax" / "configs", ignore=CACHES)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    found = _lookup(sys.executable, elsewhere, {**_isolated_env(), "PYTHONPATH": str(site)})
    assert Path(found["package"]).is_relative_to(site)
    assert (found["demo_vae"], found["classifier"]) == ("vae", "classifier")


def test_a_missing_config_file_names_where_the_shipped_ones_are(tmp_path, monkeypatch):
    from diffusets_jax.config import SHIPPED_CONFIGS, load_config

    monkeypatch.chdir(tmp_path)  # a user's folder: no configs/ here
    with pytest.raises(FileNotFoundError, match=str(SHIPPED_CONFIGS)):
        load_config("configs/demo_vae.py")
    assert (SHIPPED_CONFIGS / "demo_vae.py").is_file()


def _setuptools_major() -> int:
    import setuptools

    return int(setuptools.__version__.split(".")[0])


@pytest.mark.slow
def test_the_installed_wheel_carries_and_finds_what_the_commands_read(tmp_path):
    source = tmp_path / "source"  # a copy: building in the checkout would leave build/ and *.egg-info there
    source.mkdir()
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=CACHES)
        else:
            shutil.copy2(ROOT / name, source / name)
    if _setuptools_major() < 77:
        # The wheel is built offline, with this environment's setuptools (no build isolation); one older than
        # pyproject.toml's build requirement (>= 77) cannot read the SPDX `license` string, so the copy says it the
        # older way. What goes into the wheel, and where, does not depend on it.
        pyproject = source / "pyproject.toml"
        pyproject.write_text(re.sub(r'^license = ("[^"]*")$', r"license = {text = \1}", pyproject.read_text(),
                                    flags=re.M))
    env = _isolated_env()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(tmp_path / "dist"), str(source)], check=True, env=env, timeout=600)
    [wheel] = (tmp_path / "dist").glob("diffusets_jax-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {str(path.relative_to(source)) for top in ("diffusets_jax", "data_prep") for path in _files(source / top)}
    expected |= {f"diffusets_jax/configs/{path.name}" for path in _files(source / "configs")}
    assert expected - names == set()

    # A fresh venv seeded with this environment's dependencies (a path line in a .pth file: the editable install's
    # own .pth there is not run), the wheel installed into it.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    [site_packages] = (venv / "lib").glob("python*/site-packages")
    seeds = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (site_packages / "seed_dependencies.pth").write_text("\n".join(seeds) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps",
                    "--no-index", "-q", str(wheel)], check=True, env=env, timeout=300)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    found = _lookup(venv / "bin" / "python", elsewhere, env)
    assert Path(found["package"]).is_relative_to(site_packages)
    assert (found["demo_vae"], found["classifier"]) == ("vae", "classifier")
    # The README's way to find the shipped configs and bundled records of an installed copy.
    [command] = re.findall(r'^(python -c "import diffusets_jax.*")$', (ROOT / "README.md").read_text(), flags=re.M)
    printed = subprocess.run(command.replace("python", str(venv / "bin" / "python"), 1), shell=True, cwd=elsewhere,
                             env=env, capture_output=True, text=True, check=True, timeout=120).stdout.strip()
    assert Path(printed).is_relative_to(site_packages)
    assert (Path(printed) / "configs" / "demo_vae.py").is_file()
    assert (Path(printed) / "demo_data" / "cinc2021" / "E07500.hea").is_file()
    for argv in (["diffusets-jax", "demo", "--help"], ["diffusets-jax", "--version"]):
        done = subprocess.run([str(venv / "bin" / argv[0]), *argv[1:]], cwd=elsewhere, env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
    from diffusets_jax import __version__

    assert done.stdout.split() == ["diffusets-jax", __version__]  # the metadata's version is the package's own


def test_the_version_is_defined_once():
    """pyproject.toml and `diffusets_jax.__version__` each defined it; the installed metadata (what provenance
    records) and the WFDB headers (which print `__version__`) could disagree after a release bumped one."""
    assert "version" not in PYPROJECT["project"] and "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "diffusets_jax.__version__"}
