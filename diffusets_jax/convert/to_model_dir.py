"""Published checkpoints -> a model directory (`diffusets-jax convert`), with what sampling needs recorded.

Each checkpoint is converted and written as a component of the model directory with its provenance (the source
file and its SHA-256). A U-Net is recorded with the published diffusion (linear schedule, epsilon prediction,
latent scale 0.18215, DDPM clipping) and with the embedder it was conditioned on: by default the published
ada-002 (1536-d) ordered prompts and raw patient values. A release built for another embedder (e.g. the 8192-d
"E-72B" served behind an OpenAI-compatible endpoint) names it: `--embedder-model E-72B [--embedder-base-url URL]`;
its width must equal the U-Net's text input, which is checked, never guessed.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from diffusets_jax.conditioning.spec import ConditioningSpec, EmbedderSpec, published_conditioning
from diffusets_jax.convert.common import KeyMismatch
from diffusets_jax.diffusion.sampler_validation import validate_model_defaults
from diffusets_jax.diffusion.schedule import DiffusionSpec
from diffusets_jax.io.files import file_sha256

COMPONENT_FLAGS = {"vae": "--vae", "unet": "--unet", "clip": "--clip"}


def unet_conditioning(text_dim: int, *, embedder_kind: str | None = None, embedder_model: str | None = None,
                      embedder_dim: int | None = None, base_url: str | None = None, prompt_style: str = "ordered",
                      patient_features: str = "faithful") -> ConditioningSpec:
    """The conditioning to record for a converted U-Net with `text_dim`-wide text input.

    No embedder model named (an OpenAI-compatible kind, or no kind): the published ada-002, which only fits a
    1536-d U-Net, served by `base_url` where one is given; anything else must be named. Every option given is
    checked or recorded: `--embedder-base-url` or `--embedder-dim` alone used to be dropped without a word (a
    1536-d U-Net recorded the published ada-002 without the endpoint, whatever width `--embedder-dim` said).
    """
    kind = embedder_kind or "openai"
    dim = int(embedder_dim) if embedder_dim is not None else text_dim
    if dim != text_dim:
        raise ValueError(f"--embedder-dim {dim} does not match the U-Net's {text_dim}-d text input")
    if kind == "openai" and embedder_model is None:
        published = published_conditioning()
        if text_dim != published.embedder.dim:
            raise ValueError(f"this U-Net takes {text_dim}-d text embeddings, not the published ada-002's "
                             f"{published.embedder.dim}: name the model it was trained with, e.g. --embedder-model "
                             "E-72B (an OpenAI-compatible endpoint) or --embedder-kind local")
        spec = (dataclasses.replace(published.embedder, options={"base_url": base_url}) if base_url
                else published.embedder)
    elif kind == "openai":
        options = {"base_url": base_url} if base_url else {}
        spec = EmbedderSpec("openai", embedder_model, dim, embedder_id=f"openai/{embedder_model}/{dim}",
                            options=options)
    elif base_url:  # the local encoder runs here: an endpoint would be recorded for nothing, or dropped unsaid
        raise ValueError("--embedder-base-url names an OpenAI-compatible endpoint; the local encoder "
                         "(--embedder-kind local) runs here and takes none: drop it, or use --embedder-kind openai")
    else:
        from diffusets_jax.models.text_encoder import sentence_encoder_width

        # A local encoder's width is a fact of its files: recording the U-Net's instead made a model directory
        # whose first `sample` failed ("gives 1536-d vectors but the one built here gives 384-d ones").
        width = sentence_encoder_width(embedder_model)
        if width != text_dim:
            named = f"--embedder-model {embedder_model}" if embedder_model else "the default local encoder (all-MiniLM-L6-v2)"
            raise ValueError(f"{named} gives {width}-d vectors but this U-Net takes {text_dim}-d text embeddings: "
                             "name the embedder it was trained with (--embedder-model: a sentence-transformers "
                             "folder for --embedder-kind local, or an OpenAI-compatible model)")
        # The folder as an absolute path: `sample` reads it from wherever it runs, and a relative one recorded as
        # given was looked for there ("./minilm is not a sentence-transformers model directory").
        options = {"model_dir": os.path.abspath(embedder_model)} if embedder_model else {}
        spec = EmbedderSpec.from_embedder_config("local", options, dim)
    return ConditioningSpec(spec, prompt_style, patient_features)


def convert_to_model_dir(out: str | os.PathLike, *, vae: str | None = None, unet: str | None = None,
                         clip: str | None = None, conditioning_options: dict[str, Any] | None = None,
                         overwrite: bool = False) -> list[tuple[str, Path, Any, int | None]]:
    """Convert the given checkpoints into model directory `out`; `(name, folder, module, parameter count)` each,
    module and count None for a component left as this same conversion wrote it before.

    Every input is checked (exists, readable), and every component name free in `out` (or `overwrite`), before
    anything is written. A component recorded with this conversion's fingerprint (`conversion_fingerprint`: the
    same checkpoint content and settings) is this command's own output: a rerun after an interruption between
    components leaves it as it is and writes the rest, without --overwrite (which converts it again).
    """
    import jax

    from diffusets_jax import convert
    from diffusets_jax.io.run_dir import check_reads_apart
    from diffusets_jax.models import model_dir as model_dirs

    jobs = [(name, path) for name, path in (("vae", vae), ("unet", unet), ("clip", clip)) if path]
    if not jobs:
        raise ValueError("nothing to convert: give at least one of --vae, --unet, --clip")
    prints: dict[str, tuple[str, str]] = {}  # name -> (checkpoint sha256, conversion fingerprint)
    done: dict[str, Path] = {}  # components this same conversion wrote before
    for name, path in jobs:
        if os.path.isdir(path):
            raise ValueError(f"{COMPONENT_FLAGS[name]} {path} is a directory: give the checkpoint file")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{COMPONENT_FLAGS[name]} {path} does not exist")
        sha256 = file_sha256(path)
        prints[name] = (sha256, conversion_fingerprint(name, sha256, conditioning_options if name == "unet" else None))
        if not overwrite and _converted_here(out, name, prints[name][1]):
            done[name] = Path(out) / name
            continue
        model_dirs.check_component_writable(out, name, overwrite=overwrite, flag="--out")
        if overwrite:  # a checkpoint kept inside the component it replaces would go with it
            check_reads_apart(Path(out) / name, [(COMPONENT_FLAGS[n], p) for n, p in jobs], "--out")
    if unet and not vae:  # before any work; `write_component` checks again under the directory's lock
        model_dirs.check_converted_unet_fits(out, flag="--out")
    converted = []
    conditioning = None
    for name, path in jobs:  # convert all first: a bad file fails before the model directory is touched
        if name in done:
            continue
        state_dict = convert.load_state_dict(path)
        try:
            module, variables = getattr(convert, f"{name}_from_torch")(state_dict)
        except KeyMismatch:
            other = _component_of(state_dict)
            if other is None or other == name:
                raise
            raise KeyMismatch(f"{COMPONENT_FLAGS[name]} {path} holds a DiffuSETS {other} checkpoint, not a {name}: "
                              f"give it as {COMPONENT_FLAGS[other]}") from None
        if name == "unet":  # its embedder too: checked after writing, a refusal left the VAE converted with it
            conditioning = unet_conditioning(int(module.text_dim), **(conditioning_options or {}))
        converted.append((name, path, module, variables))
    written: list[tuple[str, Path, Any, int | None]] = [(name, done[name], None, None) for name, _ in jobs
                                                       if name in done]
    # A VAE and U-Net converted are the published pair, whether in this command, this conversion's earlier run or
    # another `convert` (components are added one flag at a time): `write_component` links them under the
    # directory's lock, so that replacing that VAE later is refused at sampling instead of decoding the U-Net's
    # latents with another VAE. A VAE trained here is no such pair: it is refused beside a converted U-Net.
    for name, path, module, variables in converted:
        sha256, print_ = prints[name]
        provenance = {"source": "converted", "checkpoint": {"file": os.path.abspath(path), "sha256": sha256},
                      "conversion": print_}
        if name == "unet":
            diffusion = DiffusionSpec()  # the published schedule and latent scale; no data to measure its std on
            folder = model_dirs.write_component(out, "unet", module, variables, provenance=provenance,
                                                conditioning=conditioning, diffusion=diffusion,
                                                sampling=validate_model_defaults(diffusion), overwrite=overwrite,
                                                flag="--out")
        else:
            folder = model_dirs.write_component(out, name, module, variables, provenance=provenance,
                                                overwrite=overwrite, flag="--out")
        count = sum(int(getattr(leaf, "size", 1)) for leaf in jax.tree.leaves(variables["params"]))
        written.append((name, folder, module, count))
    return written


# A key only one component's checkpoint has, as a dotted path component sequence (a prefix may come before it).
_COMPONENT_MARKERS = {"vae": ".decoder.0.weight", "unet": ".bottelneck.cross_attention.", "clip": ".text_projector."}


def _component_of(state_dict: dict) -> str | None:
    """Which DiffuSETS component `state_dict` is, by a key only that component has; None when it is none of them.
    A checkpoint given to the wrong flag was refused with the keys the flag's component lacks (or, for --vae, a
    list of every stray key), which did not say that the file was fine and only in the wrong place."""
    found = [name for name, marker in _COMPONENT_MARKERS.items() if any(marker in f".{key}" for key in state_dict)]
    return found[0] if len(found) == 1 else None


def conversion_fingerprint(name: str, sha256: str, conditioning_options: dict[str, Any] | None) -> str:
    """What one converted component is made from: its name, its checkpoint's content and, for a U-Net, the
    conditioning options recorded with it (`io.run_dir.fingerprint`)."""
    from diffusets_jax.io.run_dir import fingerprint

    return fingerprint({"command": "convert", "component": name, "checkpoint_sha256": sha256,
                        "conditioning": conditioning_options})


def _converted_here(out: str | os.PathLike, name: str, print_: str) -> bool:
    """Whether `out` holds component `name` as the conversion of fingerprint `print_` wrote it."""
    from diffusets_jax.models import model_dir as model_dirs

    if not (Path(out) / name).is_dir() or not (Path(out) / model_dirs.MODEL_INDEX).is_file():
        return False
    entry = model_dirs.read_index(out).components.get(name) or {}
    return (entry.get("provenance") or {}).get("conversion") == print_
