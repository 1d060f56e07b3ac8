"""The model directory: the unit a user trains into, converts into, samples and evaluates from.

Like a diffusers pipeline folder, a model directory holds one folder per component (`vae/`, `unet/`, optional
`clip/`, each a `models.bundle` config + Orbax checkpoint) and `model_index.json` at its root:

    {
      "format": "diffusets-jax model directory", "format_version": 1,
      "components": {
        "vae":  {"class": "diffusets_jax.models.vae.VAE", "uid": "...", "latent_shape": [128, 4], "provenance": {...}},
        "unet": {"class": "diffusets_jax.models.unet.UNet", "uid": "...", "text_dim": 1536, "vae_uid": "...",
                 "provenance": {...}},
        "clip": {...}
      },
      "conditioning": {"embedder": {"kind", "model", "dim", "embedder_id", "options"}, "prompt_style",
                       "patient_features"},
      "diffusion": {"schedule": {...}, "latent_scale", "scale_by_std", "clip_sample", "latent_std"},
      "sampling": {"validated": [...]}
    }

`conditioning` and `diffusion` describe the U-Net and are written with it. Each component has a random `uid`;
a U-Net records the uid of the VAE whose latents it was trained on, so a directory whose VAE was later
replaced is refused instead of decoding with the wrong VAE. Provenance (dataset name, config, version, split
and example count, the training config, the code's version and commit, the time; for converted checkpoints the
source file and its SHA-256) travels with each component.

Writes are atomic: a component is written beside the directory and renamed into place, and the index is
rewritten under a lock, so concurrent trainings into one directory (a VAE and a CLIP) never lose each other's
entry; readers hold it shared while they read the index and load (`reading`), so they never pair one component's
weights with another's entry. Directories written before this format (`generation.json` + component folders) still load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from diffusets_jax.conditioning.spec import ConditioningSpec, EmbedderSpec
from diffusets_jax.diffusion.schedule import DiffusionSpec, ScheduleConfig
from diffusets_jax.ecg.shapes import ECG_LENGTH, LATENT_LENGTH, NUM_LEADS
from diffusets_jax.io.files import read_json, remove_temporaries_in, write_json_atomic
from diffusets_jax.models import bundle
from diffusets_jax.provenance import stamp

MODEL_INDEX = "model_index.json"
INDEX_FORMAT = "diffusets-jax model directory"
INDEX_VERSION = 1
COMPONENTS: tuple[str, ...] = ("vae", "unet", "clip")
LEGACY_GENERATION_META = "generation.json"  # the format before model_index.json
_LOCK_FILE = ".model_index.lock"


@dataclasses.dataclass(frozen=True)
class ModelIndex:
    """A model directory's `model_index.json`, parsed and validated."""

    components: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    conditioning: ConditioningSpec | None = None
    diffusion: DiffusionSpec | None = None
    sampling: dict[str, Any] = dataclasses.field(default_factory=dict)
    legacy: bool = False  # read from generation.json

    def to_json(self) -> dict[str, Any]:
        return {"format": INDEX_FORMAT, "format_version": INDEX_VERSION, "components": self.components,
                "conditioning": None if self.conditioning is None else self.conditioning.to_json(),
                "diffusion": None if self.diffusion is None else self.diffusion.to_json(),
                "sampling": self.sampling}


def read_index(directory: str | os.PathLike) -> ModelIndex:
    """The index of a model directory (an empty one when the directory has none yet)."""
    directory = Path(directory)
    path = directory / MODEL_INDEX
    if path.exists():
        return _parse_index(read_json(path, "model index"), str(path))
    if (directory / LEGACY_GENERATION_META).exists():
        return _legacy_index(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} is a file, not a model directory")
    return ModelIndex()


def _parse_index(data: Any, where: str) -> ModelIndex:
    if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
        raise ValueError(f"{where} is not a diffusets-jax model index (no format {INDEX_FORMAT!r})")
    if int(data.get("format_version", 0)) > INDEX_VERSION:
        raise ValueError(f"{where} was written by a newer diffusets-jax (format {data['format_version']}): upgrade "
                         "diffusets-jax to read it")
    components = data.get("components") or {}
    if not isinstance(components, dict) or any(name not in COMPONENTS for name in components):
        raise ValueError(f"{where}: 'components' must map names from {COMPONENTS} to objects")
    conditioning = data.get("conditioning")
    diffusion = data.get("diffusion")
    return ModelIndex(
        components={name: dict(entry) for name, entry in components.items()},
        conditioning=None if conditioning is None else ConditioningSpec.from_json(conditioning, where),
        diffusion=None if diffusion is None else DiffusionSpec.from_json(diffusion, where),
        sampling=dict(data.get("sampling") or {}),
    )


def _legacy_index(directory: Path) -> ModelIndex:
    """A `generation.json` directory (written before model_index.json) as an index, from what it recorded."""
    path = directory / LEGACY_GENERATION_META
    meta = read_json(path, "generation metadata")
    known = {"embedder", "embedder_options", "patient_features", "schedule", "latent_scale", "clip_sample"}
    if not isinstance(meta, dict) or set(meta) - known:
        raise ValueError(f"{path} is not a diffusets-jax generation.json; write the model directory again with "
                         "`diffusets-jax convert --out DIR` or `diffusets-jax train ... --model-dir DIR`")
    components = {name: {"class": None, "uid": None, "provenance": {"legacy": str(path)}}
                  for name in COMPONENTS if (directory / name / bundle.CONFIG_FILE).exists()}
    kind = meta.get("embedder", "openai")
    options = dict(meta.get("embedder_options") or {})
    from diffusets_jax.conditioning.embedders import EMBEDDERS, OPENAI_DEFAULT_DIM

    if kind not in EMBEDDERS:
        raise ValueError(f"{path}: unknown embedder {kind!r}")
    if kind == "openai":
        dim = int(options.pop("dim", OPENAI_DEFAULT_DIM))
    else:  # the local encoder's width is the U-Net's text input, which generation.json's writer checked
        dim = int(bundle.read_module_config(directory, "unet")["fields"].get("text_dim", 384))
    embedder = EmbedderSpec.from_embedder_config(kind, options, dim)
    schedule = meta.get("schedule") or {}
    diffusion = DiffusionSpec(schedule=ScheduleConfig(**schedule),
                              latent_scale=float(meta.get("latent_scale", DiffusionSpec.latent_scale)),
                              clip_sample=bool(meta.get("clip_sample", True)))
    return ModelIndex(components=components,
                      conditioning=ConditioningSpec(embedder, "ordered", meta.get("patient_features", "faithful")),
                      diffusion=diffusion, legacy=True)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive lock on the directory's index while it is read, changed and rewritten."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / _LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def reading(directory: str | os.PathLike) -> Iterator[None]:
    """Hold a shared lock on the directory's index lock while a reader reads `model_index.json` and loads the
    components it lists, so that what it reads is one state of the directory. A writer (`write_component`) holds
    the lock exclusively while it replaces a component and rewrites the index: without this, a `sample` that read
    the index, then the weights, while a `train vae --overwrite` or a `convert` finished into the directory decoded
    with the new VAE but recorded (and checked the U-Net against) the old one's uid, and one that looked while the
    old folder was being swapped out was told the model was missing or damaged. The reader waits for a writer at
    work (while it saves one component) and a writer for the readers (while they load). Nothing is
    created: a directory without the lock file (written before it existed, or by hand), or whose lock file this user
    may not read (another user's, made under umask 077), is read without it, as before."""
    try:
        handle = open(Path(directory) / _LOCK_FILE)  # read-only: a shared model directory may not be writable
    except (FileNotFoundError, NotADirectoryError, PermissionError):  # none, or another user's unreadable one
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def check_model_folder(directory: str | os.PathLike, flag: str = "--model-dir") -> None:
    """Refuse to add a component to a folder of the user's: one that exists, holds no model index and has entries no
    model directory has (a thesis, a dataset). A model directory may hold anything once it has its index."""
    directory = Path(directory)
    if not directory.is_dir() or (directory / MODEL_INDEX).exists() or (directory / LEGACY_GENERATION_META).exists():
        return
    ours = {*COMPONENTS, MODEL_INDEX, LEGACY_GENERATION_META}
    foreign = sorted(p.name for p in directory.iterdir() if p.name not in ours and not p.name.startswith("."))
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ValueError(f"{flag} {directory} is not a model directory and holds other files ({shown}): give a new "
                         "or empty folder, or an existing model directory")


def check_component_writable(directory: str | os.PathLike, name: str, *, workdir: str | os.PathLike | None = None,
                             overwrite: bool = False, flag: str = "--model-dir") -> None:
    """Refuse to write component `name` over a folder this command did not make: one line, before any work.

    A component is replaced only with `overwrite` or when the index records it as exported by the training run in
    `workdir` (the same run finished, resumed or exported again). A converted or another run's component, a
    legacy one and a folder the index does not list are the user's.
    """
    directory = Path(directory)
    check_model_folder(directory, flag)
    if overwrite or not (directory / name).exists():
        return
    entry = read_index(directory).components.get(name)
    run = ((entry or {}).get("provenance") or {}).get("run") or {}
    if workdir is not None and run.get("workdir") == str(Path(workdir).resolve()):
        return
    if entry is None:
        what = "a folder its model_index.json does not list"
    else:
        source = (entry.get("provenance") or {}).get("source") or "an earlier format"
        what = f"a {source} {name} (uid {entry.get('uid')}{', from ' + run['workdir'] if run else ''})"
    raise ValueError(f"{flag} {directory} already holds {name}/, {what}: pass --overwrite to replace it, or give "
                     f"another {flag}")


def trained_with_condition_dropout(index: ModelIndex) -> bool:
    """Whether the U-Net's provenance records training with condition dropout (`train.cond_dropout` > 0): only
    then was the fixed null condition that classifier-free guidance contrasts with trained. False for a converted
    U-Net (the published one had none) and for one whose provenance records no training config."""
    config = ((index.components.get("unet") or {}).get("provenance") or {}).get("config") or {}
    return float((config.get("train") or {}).get("cond_dropout") or 0.0) > 0.0


def untrained_guidance_warning(index: ModelIndex, guidance_scale: float) -> str | None:
    """A warning line when `guidance_scale` != 1 runs guidance on a U-Net not trained with condition dropout, else
    None. A warning, not a refusal: the experiment may be wanted, but its unconditional branch is the network's
    answer for a condition it never saw, so its ECGs are no classifier-free guidance."""
    if guidance_scale == 1.0 or trained_with_condition_dropout(index):
        return None
    return (f"--guidance-scale {guidance_scale:g}: this U-Net's provenance records no condition dropout "
            "(train.cond_dropout), so the null condition guidance contrasts with was never trained and the ECGs "
            "are not classifier-free guidance; train with condition dropout (configs/improved_unet.py) to use it")


def check_vae_replaceable(directory: str | os.PathLike, *, overwrite: bool = False, source: str | None = None,
                          flag: str = "--model-dir") -> None:
    """Refuse a new VAE where the directory's U-Net was trained on the latents of another VAE: one line, before the
    VAE trains. `source`: the new VAE's provenance source ("trained", "converted").

    - The U-Net was trained on the VAE there now. A training run may replace its own VAE export
      (`check_component_writable`), and a run extended with more steps did so at its end, after which `sample`
      refused the directory and the U-Net had no VAE left to decode with.
    - The U-Net was converted (trained on the published VAE's latents) and no VAE is there yet: a VAE trained
      here decoded the published U-Net's latents into noise, without a word (`convert --unet` refuses the
      reverse order already).

    With `overwrite` the user has asked for the replacement."""
    directory = Path(directory)
    if overwrite or not (directory / MODEL_INDEX).is_file():
        return
    components = read_index(directory).components
    vae, unet = components.get("vae"), components.get("unet")
    if vae and unet and vae.get("uid") and unet.get("vae_uid") == vae.get("uid"):
        raise ValueError(f"{flag} {directory}: its unet/ was trained on the latents of its vae/ (uid {vae['uid']}), "
                         f"and a new VAE would leave that U-Net unable to decode: give another {flag}, or pass "
                         "--overwrite to replace the VAE (then encode again and retrain the U-Net)")
    if unet and not vae and source != "converted" and _source(unet) == "converted":
        raise ValueError(f"{flag} {directory}: its unet/ is converted, trained on the published VAE's latents, and a "
                         f"VAE trained here would decode them into noise: convert the published VAE into it "
                         f"(`diffusets-jax convert --vae`), give another {flag}, or pass --overwrite to train one "
                         "anyway (then encode again and retrain the U-Net)")


def check_converted_unet_fits(directory: str | os.PathLike, flag: str = "--out") -> None:
    """Refuse a converted U-Net into a directory holding a VAE that was not converted: the converted U-Net denoises
    the latents of the VAE it was trained with (the published one), and beside a VAE trained here it sampled without
    a word and decoded its latents into noise."""
    directory = Path(directory)
    if not (directory / MODEL_INDEX).is_file():
        return
    present = read_index(directory).components.get("vae") or {}
    if present and _source(present) != "converted":
        raise ValueError(f"{flag} {directory} holds a {_source(present) or 'not converted'} VAE (uid "
                         f"{present.get('uid')}), not the one the converted U-Net was trained with: give its VAE "
                         f"checkpoint with --vae (and --overwrite to replace this one), or convert into another {flag}")


def _source(entry: dict[str, Any]) -> str | None:
    """How a component came to be: its provenance's "source" ("trained", "converted"; None when not recorded)."""
    return (entry.get("provenance") or {}).get("source")


def write_component(directory: str | os.PathLike, name: str, module: Any, variables: Any, *,
                    provenance: dict[str, Any], conditioning: ConditioningSpec | None = None,
                    diffusion: DiffusionSpec | None = None, vae_uid: str | None = None,
                    sampling: dict[str, Any] | None = None, overwrite: bool = False, flag: str = "--model-dir"
                    ) -> Path:
    """Add component `name` to the model directory (atomically) and record it in the index (`flag`: the option
    that named the directory, for messages).

    An existing `name` is replaced only as `check_component_writable` allows (the training run in
    `provenance["run"]["workdir"]` replaces its own export; anything else needs `overwrite`). A U-Net needs
    `conditioning` (with its patient-feature mode) and `diffusion`; `vae_uid` names the VAE whose latents it was
    trained on when known. A CLIP may be given the `conditioning` of its training data, kept in its own entry.
    Returns the component's folder.
    """
    if name not in COMPONENTS:
        raise ValueError(f"model component must be one of {', '.join(COMPONENTS)}, got {name!r}")
    if name == "unet" and (conditioning is None or conditioning.patient_features is None or diffusion is None):
        raise ValueError("a U-Net is written with its conditioning (embedder, prompt style, patient features) and "
                         "its diffusion settings")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{flag} {directory} is a file: give a directory")
    entry: dict[str, Any] = {"class": bundle.module_config(module)["class"], "uid": uuid.uuid4().hex,
                             "provenance": {**stamp(), **provenance}}
    if name == "vae":
        entry["latent_shape"] = [ECG_LENGTH // int(module.downsampling), int(module.latent_channels)]
    if name == "clip" and conditioning is not None:
        # The index's own `conditioning` is the U-Net's; a CLIP's text tower was trained on its dataset's
        # embeddings, which may be another embedder's: recorded with it, so `evaluate` can check what it is given.
        entry["conditioning"] = conditioning.to_json()
    if name == "unet":
        entry.update(text_dim=int(module.text_dim), latent_channels=int(module.latent_channels), vae_uid=vae_uid)
        if conditioning.embedder.dim != int(module.text_dim):
            raise ValueError(f"the U-Net takes {module.text_dim}-d text but its embedder {conditioning.embedder.model!r} "
                             f"gives {conditioning.embedder.dim}-d vectors")
    with _locked(directory):
        check_component_writable(directory, name, workdir=(provenance.get("run") or {}).get("workdir"),
                                 overwrite=overwrite, flag=flag)
        if name == "vae":  # also where no early check ran: `train vae --export-only` of a later step
            check_vae_replaceable(directory, overwrite=overwrite, source=provenance.get("source"), flag=flag)
        index = read_index(directory)
        if name == "unet" and _source(entry) == "converted":
            # Checked again under the lock: a VAE trained into the directory since `convert`'s early check
            check_converted_unet_fits(directory, flag=flag)
            if "vae" in index.components and not entry.get("vae_uid"):  # a converted VAE, from another command
                entry["vae_uid"] = index.components["vae"].get("uid")
        path = Path(bundle.save_model(directory, name, module, variables, replace=True))  # checked just above
        # A staging folder of this component left by an export that was killed (SIGKILL, a SIGTERM outside the
        # training loop) is ours, and no other export of it runs while we hold the lock: a model's worth of disk,
        # which no rerun would otherwise ever remove.
        remove_temporaries_in(directory, [name])
        components = {**index.components, name: entry}
        unet = components.get("unet")
        if name == "vae" and _source(entry) == "converted" and unet and not unet.get("vae_uid") \
                and _source(unet) == "converted":
            # `convert --unet` then `convert --vae` (components are added one flag at a time): the published pair,
            # recorded as when converted in one command, so that replacing this VAE later is refused at sampling
            components["unet"] = {**unet, "vae_uid": entry["uid"]}
        updates: dict[str, Any] = {"components": components, "legacy": False}
        if name == "unet":
            updates.update(conditioning=conditioning, diffusion=diffusion, sampling=dict(sampling or {}))
        # A legacy generation.json stays (it is the user's); read_index prefers the index just written.
        write_json_atomic(directory / MODEL_INDEX, dataclasses.replace(index, **updates).to_json())
    return path


def update_sampling(directory: str | os.PathLike, sampling: dict[str, Any]) -> None:
    """Replace the index's `sampling` record (validated sampler settings) under the lock."""
    directory = Path(directory)
    with _locked(directory):
        index = read_index(directory)
        write_json_atomic(directory / MODEL_INDEX, dataclasses.replace(index, sampling=dict(sampling)).to_json())


def require(index: ModelIndex, directory: str | os.PathLike, *names: str) -> None:
    """Raise with what to do when components `names` are missing from the directory."""
    missing = [name for name in names if name not in index.components]
    if missing and not os.path.exists(directory):  # a mistyped path: "has no vae (it has nothing)" hid the typo
        raise FileNotFoundError(f"model directory {os.fspath(directory)} does not exist: check the path, or write "
                                "one with `diffusets-jax convert --out DIR` or `diffusets-jax train ... --model-dir DIR`")
    if missing:
        have = ", ".join(sorted(index.components)) or "nothing"
        hint = {"vae": "`diffusets-jax train vae ... --model-dir DIR` or `convert --vae`",
                "unet": "`diffusets-jax train unet ... --model-dir DIR` or `convert --unet`",
                "clip": "`diffusets-jax train clip ... --model-dir DIR`, `convert --clip`, or pass --clip DIR"}
        raise ValueError(f"model directory {os.fspath(directory)} has no {', '.join(missing)} (it has {have}): add it "
                         f"with {hint[missing[0]]}")


def load_component(directory: str | os.PathLike, name: str) -> tuple[Any, dict]:
    """`(module, variables)` of a component (variables as host arrays)."""
    return bundle.load_model(directory, name)


def load_component_as_read(directory: str | os.PathLike, name: str, uid: str | None, flag: str = "--model-dir"
                           ) -> tuple[Any, dict]:
    """`load_component`, for a run that read the directory's index earlier (its uids in the run's fingerprint, its
    conditioning and diffusion used with the weights): the component `name` is refused in one line when its uid is
    no longer `uid` (a training or convert finished into the directory since), instead of being run with settings
    and a record of the one it replaced."""
    with reading(directory):
        now = read_index(directory).components.get(name, {}).get("uid")
        if now != uid:
            raise ValueError(f"{flag} {os.fspath(directory)}: its {name}/ was replaced since this run read it (uid {uid} "
                             f"-> {now}: a training or convert wrote into it): run the command again")
        return load_component(directory, name)


def check_generation_parts(directory: str | os.PathLike, index: ModelIndex, vae: Any, unet: Any) -> None:
    """Refuse a directory whose VAE and U-Net do not fit together or with the recorded conditioning."""
    where = os.fspath(directory)
    if index.conditioning is None or index.diffusion is None:
        raise ValueError(f"{where}: {MODEL_INDEX} records no conditioning/diffusion for its U-Net: write the U-Net "
                         "again with `diffusets-jax train unet --model-dir` or `convert --unet`")
    # A VAE of another lead count converts (`convert` leaves its channels as they are), but what it decodes is
    # no 12-lead ECG in the standard order: generation ran to the end and every ECG was skipped by the writers.
    if int(vae.in_channels) != NUM_LEADS:
        raise ValueError(f"{where}: its VAE decodes {vae.in_channels}-channel signals, but generation makes 12-lead "
                         "ECGs (I, II, III, aVR, aVL, aVF, V1-V6): use a model directory with a 12-lead VAE")
    vae_latent = (ECG_LENGTH // int(vae.downsampling), int(vae.latent_channels))
    if vae_latent != (LATENT_LENGTH, int(unet.latent_channels)):
        raise ValueError(f"{where}: the VAE makes {vae_latent} latents from (1024, 12) ECGs but the U-Net denoises "
                         f"({LATENT_LENGTH}, {unet.latent_channels}) ones: they were not trained together")
    if index.conditioning.embedder.dim != int(unet.text_dim):
        raise ValueError(f"{where}: the U-Net takes {unet.text_dim}-d text embeddings but the recorded embedder "
                         f"{index.conditioning.embedder.model!r} gives {index.conditioning.embedder.dim}-d ones")
    wanted = index.components.get("unet", {}).get("vae_uid")
    actual = index.components.get("vae", {}).get("uid")
    if wanted and actual and wanted != actual:
        raise ValueError(f"{where}: the U-Net was trained on latents of VAE {wanted[:8]}, but this directory's VAE is "
                         f"{actual[:8]} (replaced since): encode with this VAE and train the U-Net again, or put the "
                         "original VAE back")
