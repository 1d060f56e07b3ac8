"""Batched, sharded ECG generation: conditions in, ECGs out (NPZ, WFDB, PNG, manifest, TFRecord corpora).

A model directory (written by `diffusets-jax convert` or exported by `diffusets-jax train`) holds the
`vae/` and `unet/` bundles (`diffusets_jax.models.bundle`) and `generation.json`, which records how the
U-Net was conditioned: the text embedder (its prompts must be embedded by the same model), the patient
feature mode, the noise schedule and the scale of its latents (what the VAE decoder divides by).
Generation is one jitted program (reverse chain + VAE decode) compiled once per batch size, with the batch
sharded over every device of the mesh (all hosts' devices in a multi-host run).

Reproducibility: batch `i` of a run uses `fold_in(PRNGKey(seed), i)`, so a corpus shard regenerated
after a crash is identical to the one that would have been written.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from diffusets_jax.conditioning.patient import parse_age, parse_heart_rate, parse_sex, patient_features
from diffusets_jax.conditioning.prompts import ordered_prompt, report_lines
from diffusets_jax.diffusion.guidance import fixed_null_condition
from diffusets_jax.diffusion.samplers import SamplerConfig, jit_generate
from diffusets_jax.diffusion.schedule import ScheduleConfig, make_schedule
from diffusets_jax.ecg.shapes import ECG_LENGTH, NUM_LEADS
from diffusets_jax.models.vae import LATENT_SCALE

GENERATION_META = "generation.json"


@dataclasses.dataclass(frozen=True)
class Condition:
    """One generation request: the report (lines, or `|`-joined text), the patient, and how many ECGs."""

    report: tuple[str, ...]
    sex: int  # 1 = male, 0 = female
    age: float  # years
    heart_rate: float  # bpm
    count: int = 1

    @property
    def prompt(self) -> str:
        return ordered_prompt(list(self.report))

    def as_dict(self) -> dict[str, Any]:
        return {"report": list(self.report), "prompt": self.prompt, "sex": self.sex, "age": self.age,
                "heart_rate": self.heart_rate}


def make_condition(text: object, sex: object, age: object, heart_rate: object, count: object = 1,
                   *, where: str = "") -> Condition:
    """Validate one condition; errors name `where` (e.g. 'conditions.csv line 3') and the field."""
    prefix = f"{where}: " if where else ""
    try:
        lines = report_lines(text if isinstance(text, (list, tuple)) else str(text or ""))
        if not lines:
            raise ValueError("text: empty report; give at least one statement (lines joined by '|')")
        n = int(count) if str(count).strip() not in ("", "None") else 1
        if n < 1:
            raise ValueError(f"count: {count!r} must be a positive integer")
        return Condition(tuple(lines), parse_sex(sex), parse_age(age), parse_heart_rate(heart_rate), n)
    except ValueError as err:
        raise ValueError(f"{prefix}{err}") from None


_FIELD_ALIASES = {"text": ("text", "report", "prompt"), "sex": ("sex", "gender"), "age": ("age",),
                  "heart_rate": ("heart_rate", "hr"), "count": ("count", "n")}


def _field(row: dict, name: str, where: str, required: bool = True) -> object:
    for alias in _FIELD_ALIASES[name]:
        if alias in row and row[alias] not in (None, ""):
            return row[alias]
    if required:
        raise ValueError(f"{where}: missing field {name!r} (accepted names: {', '.join(_FIELD_ALIASES[name])})")
    return 1


def read_conditions(path: str | os.PathLike) -> list[Condition]:
    """Conditions from a CSV (header row) or JSONL file: text, sex, age, heart_rate (or hr), optional count (n)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"conditions file {str(path)!r} does not exist")
    rows: list[tuple[str, dict]] = []
    if path.suffix.lower() in (".jsonl", ".json"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path.name} line {number}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path.name} line {number}: not valid JSON ({err.msg})") from None
    elif path.suffix.lower() in (".csv", ".tsv"):
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            for number, row in enumerate(reader, 2):
                rows.append((f"{path.name} line {number}", row))
    else:
        raise ValueError(f"{path.name}: unknown conditions format {path.suffix!r}; use .csv or .jsonl")
    conditions = [
        make_condition(_field(r, "text", w), _field(r, "sex", w), _field(r, "age", w), _field(r, "heart_rate", w),
                       _field(r, "count", w, required=False), where=w)
        for w, r in rows
    ]
    if not conditions:
        raise ValueError(f"{path.name}: no conditions found")
    return conditions


def expand(conditions: Sequence[Condition]) -> list[Condition]:
    """One entry per ECG to generate (each condition repeated `count` times), in order."""
    return [c for c in conditions for _ in range(c.count)]


@dataclasses.dataclass(frozen=True)
class GenerationMeta:
    """How the U-Net of a model directory was conditioned (written beside its bundles)."""

    embedder: str = "openai"  # "openai" (text-embedding-ada-002, 1536-d) or "local" (MiniLM, 384-d)
    embedder_options: dict = dataclasses.field(default_factory=dict)
    patient_features: str = "faithful"  # or "normalised"
    schedule: dict = dataclasses.field(default_factory=dict)  # ScheduleConfig fields; {} = faithful
    latent_scale: float = LATENT_SCALE  # what the U-Net's latents are multiplied by (the published 0.18215)
    # Whether DDPM sampling clips the predicted x0 to [-1, 1] by default, as the published sampler does. A model
    # whose latents are not within [-1, 1] (unit-variance ones from `train.scale_by_std`) records False.
    clip_sample: bool = True

    @classmethod
    def published(cls, text_dim: int) -> GenerationMeta:
        """How the published checkpoints were conditioned: raw patient values, ada-002 for 1536-d text
        (any other width is taken as the local MiniLM encoder's, the only other embedder we ship)."""
        if text_dim == 1536:
            return cls(embedder="openai", patient_features="faithful")
        return cls(embedder="local", patient_features="faithful")

    def save(self, directory: str | os.PathLike) -> None:
        path = Path(directory) / GENERATION_META
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=2))
        os.replace(tmp, path)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> GenerationMeta:
        path = Path(directory) / GENERATION_META
        if not path.exists():
            raise FileNotFoundError(
                f"{str(path)!r} is missing: point at a directory written by `diffusets-jax convert` or exported by "
                "`diffusets-jax train` (it holds vae/, unet/ and generation.json)"
            )
        return cls(**json.loads(path.read_text()))


DEFAULT_STEPS = {"ddpm": 1000, "ddim": 50, "dpmpp_2m": 20}


def sampler_config(sampler: str = "ddpm", *, steps: int | None = None, eta: float = 0.0,
                   guidance_scale: float = 1.0, clip_sample: bool | None = None) -> SamplerConfig:
    """A SamplerConfig with per-sampler defaults: ddpm 1000 steps, clipping x0 as the model directs
    (`GenerationMeta.clip_sample`: on for the published model), ddim 50 and dpmpp_2m 20 steps without clipping."""
    if sampler not in DEFAULT_STEPS:
        raise ValueError(f"sampler must be one of {', '.join(DEFAULT_STEPS)}, got {sampler!r}")
    return SamplerConfig(
        sampler=sampler, steps=steps or DEFAULT_STEPS[sampler], eta=eta, guidance_scale=guidance_scale,
        clip_sample=(None if sampler == "ddpm" else False) if clip_sample is None else clip_sample,
    )


def _batch_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names))


class ECGGenerator:
    """Loads a model directory once and generates ECGs for batches of conditions.

    `generate_batch` pads every batch to `batch_size` (a multiple of the device count), so the program is
    compiled exactly once per run, and drops the padding from the result.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        sampler: SamplerConfig | None = None,
        *,
        batch_size: int = 64,
        seed: int = 0,
        embedding_cache: str | os.PathLike | None = None,
        compute_dtype: Any = None,
        mesh: jax.sharding.Mesh | None = None,
    ) -> None:
        from diffusets_jax.models.bundle import load_model

        self.model_dir = Path(model_dir)
        self.meta = GenerationMeta.load(self.model_dir)
        self.vae, self.vae_variables = load_model(self.model_dir, "vae")
        self.unet, self.unet_variables = load_model(self.model_dir, "unet")
        sampler = sampler if sampler is not None else SamplerConfig()
        if sampler.clip_sample is None:  # "as the model directs"
            sampler = dataclasses.replace(sampler, clip_sample=self.meta.clip_sample)
        self.sampler = sampler
        self.seed = seed
        self.mesh = mesh if mesh is not None else jax.make_mesh((jax.device_count(),), ("data",))
        devices = self.mesh.devices.size
        self.batch_size = max(devices, -(-batch_size // devices) * devices)
        self.embedding_cache = embedding_cache
        self._embedder = None
        schedule = make_schedule(ScheduleConfig(**self.meta.schedule)) if self.meta.schedule else make_schedule()
        sharding = _batch_sharding(self.mesh)
        self._cond_sharding = sharding
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        self.unet_variables = jax.device_put(self.unet_variables, replicated)
        self.vae_variables = jax.device_put(self.vae_variables, replicated)
        self._generate = jit_generate(self.unet, self.vae, schedule, sampler, batch_sharding=sharding,
                                      compute_dtype=compute_dtype, latent_scale=self.meta.latent_scale)
        self._null_cond = fixed_null_condition(self.unet.text_dim) if sampler.guidance_scale != 1.0 else None

    # -- conditions -> model inputs ------------------------------------------------------------------
    def embed(self, prompts: Sequence[str]) -> np.ndarray:
        """Prompt embeddings (n, text_dim) with the model's embedder, through the cache when one is set."""
        from diffusets_jax.conditioning.cache import EmbeddingCache, embed_with_cache
        from diffusets_jax.conditioning.embedders import make_embedder

        if self._embedder is None:
            self._embedder = make_embedder(self.meta.embedder, **self.meta.embedder_options)
            if self._embedder.dim != self.unet.text_dim:
                raise ValueError(
                    f"{self.model_dir}: the U-Net takes {self.unet.text_dim}-d text embeddings but embedder "
                    f"{self.meta.embedder!r} gives {self._embedder.dim}-d ones: fix {GENERATION_META}"
                )
        if self.embedding_cache is None:
            unique = list(dict.fromkeys(prompts))
            table = dict(zip(unique, np.asarray(self._embedder.embed(unique), np.float32), strict=True))
            return np.stack([table[p] for p in prompts])
        cache = EmbeddingCache(self.embedding_cache)
        try:
            return embed_with_cache(list(prompts), self._embedder, cache)
        finally:
            cache.close()

    def condition_arrays(self, conditions: Sequence[Condition], text_embedding: np.ndarray) -> dict[str, np.ndarray]:
        features = patient_features([c.sex for c in conditions], [c.age for c in conditions],
                                    [c.heart_rate for c in conditions], mode=self.meta.patient_features)
        return {"text_embedding": np.asarray(text_embedding, np.float32), "sex": features[:, 0],
                "age": features[:, 1], "heart_rate": features[:, 2]}

    # -- generation -------------------------------------------------------------------------------------
    def generate_batch(self, cond: dict[str, np.ndarray], batch_index: int) -> np.ndarray:
        """ECGs `(n, 1024, 12)` float32 mV for `n <= batch_size` conditions; batch `batch_index` fixes the noise."""
        n = len(cond["sex"])
        if not 0 < n <= self.batch_size:
            raise ValueError(f"generate_batch takes 1..{self.batch_size} conditions, got {n}")
        padded = {k: np.concatenate([v, np.repeat(v[-1:], self.batch_size - n, axis=0)]) for k, v in cond.items()}
        cond_global = jax.device_put(padded, self._cond_sharding)
        key = jax.random.fold_in(jax.random.PRNGKey(self.seed), batch_index)
        ecg = self._generate(self.unet_variables, self.vae_variables, cond_global, key, self._null_cond)
        return np.asarray(jax.device_get(ecg))[:n]

    def generate(self, conditions: Sequence[Condition], *, progress: bool = False, start_batch: int = 0,
                 text_embeddings: np.ndarray | None = None) -> Iterator[tuple[int, list[Condition], np.ndarray]]:
        """Yield `(batch_index, conditions, ecgs)` over `expand(conditions)` in batches of `batch_size`.

        `text_embeddings` `(len(expand(conditions)), text_dim)`: precomputed prompt embeddings (e.g. a prepared
        dataset's), used instead of running the embedder.
        """
        items = expand(conditions)
        if text_embeddings is None:
            embeddings = self.embed([c.prompt for c in items])
        else:
            embeddings = np.asarray(text_embeddings, np.float32)
            if embeddings.shape != (len(items), self.unet.text_dim):
                raise ValueError(f"text_embeddings: expected ({len(items)}, {self.unet.text_dim}), got {embeddings.shape}")
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(items), unit="ECG", desc="sampling", initial=min(len(items), start_batch * self.batch_size))
        try:
            for index, start in enumerate(range(0, len(items), self.batch_size)):
                if index < start_batch:
                    continue
                chunk = items[start : start + self.batch_size]
                cond = self.condition_arrays(chunk, embeddings[start : start + len(chunk)])
                began = time.perf_counter()
                ecgs = self.generate_batch(cond, index)
                if bar is not None:
                    bar.update(len(chunk))
                    bar.set_postfix(ecg_per_s=f"{len(chunk) / (time.perf_counter() - began):.2f}")
                yield index, chunk, ecgs
        finally:
            if bar is not None:
                bar.close()


# -- outputs -----------------------------------------------------------------------------------------------
def _atomic_write_bytes(path: Path, payload: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, path)


def write_samples(
    out_dir: str | os.PathLike,
    conditions: Sequence[Condition],
    ecgs: np.ndarray,
    *,
    formats: Sequence[str] = ("npz", "wfdb", "png"),
    wfdb_fs: float | None = None,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write generated ECGs `(n, 1024, 12)` with their conditions; returns the manifest (also `manifest.json`).

    npz: `samples.npz` (ecg, prompt, sex, age, heart_rate). wfdb: `wfdb/sample_NNNNN.{hea,dat}` at 102.4 Hz
    (or `wfdb_fs`, e.g. 500), conditions in the header comments. png: `plots/sample_NNNNN.png` in the clinical
    12-lead layout.
    """
    from diffusets_jax.io.plot import plot_ecg
    from diffusets_jax.io.wfdb_out import write_records

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ecgs = np.asarray(ecgs, np.float32)
    if ecgs.shape[1:] != (ECG_LENGTH, NUM_LEADS) or len(ecgs) != len(conditions):
        raise ValueError(f"write_samples: expected ({len(conditions)}, {ECG_LENGTH}, {NUM_LEADS}) ECGs, got {ecgs.shape}")
    unknown = set(formats) - {"npz", "wfdb", "png"}
    if unknown:
        raise ValueError(f"unknown output formats {sorted(unknown)}; choose from npz, wfdb, png")
    settings = dict(settings or {})
    names = [f"sample_{i:05d}" for i in range(len(conditions))]
    header = [{"prompt": c.prompt, "sex": "M" if c.sex else "F", "age": c.age, "heart_rate": c.heart_rate, **settings}
              for c in conditions]
    records = [{"name": name, **c.as_dict()} for name, c in zip(names, conditions, strict=True)]
    skipped: dict[str, str] = {}
    if "wfdb" in formats:
        summary = write_records(out / "wfdb", ecgs, names, header, output_fs=wfdb_fs)
        skipped.update(summary.skipped)
        for entry in records:
            if entry["name"] not in summary.skipped:
                entry["wfdb"] = f"wfdb/{entry['name']}"
    if "png" in formats:
        (out / "plots").mkdir(exist_ok=True)
        for entry, ecg, cond in zip(records, ecgs, header, strict=True):
            plot_ecg(ecg, conditions=cond, path=out / "plots" / f"{entry['name']}.png")
            entry["png"] = f"plots/{entry['name']}.png"
    if "npz" in formats:
        tmp = out / "samples.npz.tmp.npz"
        np.savez_compressed(
            tmp, ecg=ecgs, prompt=np.array([c.prompt for c in conditions]),
            sex=np.array([c.sex for c in conditions], np.int32), age=np.array([c.age for c in conditions], np.float32),
            heart_rate=np.array([c.heart_rate for c in conditions], np.float32),
        )
        os.replace(tmp, out / "samples.npz")
    manifest = {"count": len(records), "settings": settings, "skipped": skipped, "samples": records}
    _atomic_write_bytes(out / "manifest.json", json.dumps(manifest, indent=2).encode())
    return manifest


def write_corpus(
    generator: ECGGenerator,
    conditions: Sequence[Condition],
    out_dir: str | os.PathLike,
    *,
    shard_size: int | None = None,
    dataset_name: str = "synthetic_ecg",
    progress: bool = True,
) -> dict[str, Any]:
    """Generate `expand(conditions)` into TFRecord shards readable with `tfds.builder_from_directory(out_dir)`.

    Shards follow `diffusets_jax.data.schema` (the prepared datasets' schema; `heart_rate_source` is
    "condition", ids are -1), one shard per `shard_size` ECGs (a multiple of the generator's batch size).
    Each shard is written to a temporary file and renamed, and a restarted run skips finished shards, so a
    crash loses at most the shard in progress. The TFDS metadata is written once all shards exist.
    """
    import tensorflow as tf
    import tensorflow_datasets as tfds
    from etils import epath

    from diffusets_jax.data.schema import ecg_features

    tf.config.set_visible_devices([], "GPU")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = expand(conditions)
    batch = generator.batch_size
    shard_size = batch * max(1, -(-(shard_size or 1024) // batch))
    num_shards = max(1, -(-len(items) // shard_size))
    features = ecg_features(generator.unet.text_dim)
    template = tfds.core.ShardedFileTemplate(
        data_dir=epath.Path(out), template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
        dataset_name=dataset_name, split="train", filetype_suffix="tfrecord",
    )
    embeddings = generator.embed([c.prompt for c in items])
    written, skipped = 0, 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), unit="ECG", desc="corpus")
    began = time.perf_counter()
    for shard in range(num_shards):
        path = Path(os.fspath(template.sharded_filepath(shard_index=shard, num_shards=num_shards)))
        lo, hi = shard * shard_size, min(len(items), (shard + 1) * shard_size)
        if path.exists():
            skipped += 1
            if bar is not None:
                bar.update(hi - lo)
            continue
        tmp = path.with_name(path.name + ".tmp")
        with tf.io.TFRecordWriter(os.fspath(tmp)) as writer:
            for start in range(lo, hi, batch):
                chunk = items[start : min(hi, start + batch)]
                cond = generator.condition_arrays(chunk, embeddings[start : start + len(chunk)])
                ecgs = generator.generate_batch(cond, start // batch)
                for offset, (condition, ecg) in enumerate(zip(chunk, ecgs, strict=True)):
                    writer.write(features.serialize_example({
                        "ecg": ecg, "report_lines": list(condition.report), "prompt": condition.prompt,
                        "text_embedding": embeddings[start + offset], "sex": condition.sex, "age": condition.age,
                        "heart_rate": condition.heart_rate, "heart_rate_source": "condition",
                        "subject_id": -1, "study_id": start + offset, "record_path": "",
                    }))
                if bar is not None:
                    bar.update(len(chunk))
                    bar.set_postfix(ecg_per_s=f"{(bar.n - skipped * shard_size) / (time.perf_counter() - began):.2f}")
        os.replace(tmp, path)
        written += 1
    if bar is not None:
        bar.close()
    lengths = [min(len(items), (s + 1) * shard_size) - s * shard_size for s in range(num_shards)]
    split = tfds.core.SplitInfo(
        name="train", shard_lengths=lengths, filename_template=template,
        num_bytes=sum(os.path.getsize(os.fspath(template.sharded_filepath(shard_index=s, num_shards=num_shards)))
                      for s in range(num_shards)),
    )
    tfds.folder_dataset.write_metadata(
        data_dir=epath.Path(out), features=features, split_infos=[split], filename_template=template,
        description=f"Synthetic ECGs generated by diffusets-jax from {generator.model_dir}",
        check_data=False,
    )
    return {"examples": len(items), "shards": num_shards, "written": written, "skipped": skipped}


def sample_to_directory(
    generator: ECGGenerator,
    conditions: Sequence[Condition],
    out_dir: str | os.PathLike,
    *,
    formats: Sequence[str] = ("npz", "wfdb", "png"),
    wfdb_fs: float | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate `expand(conditions)` and write them with `write_samples`; returns the manifest."""
    batches = list(generator.generate(conditions, progress=progress))
    items = [c for _, chunk, _ in batches for c in chunk]
    ecgs = np.concatenate([e for _, _, e in batches])
    settings = {"model_dir": str(generator.model_dir), "sampler": generator.sampler.sampler,
                "steps": generator.sampler.steps, "guidance_scale": generator.sampler.guidance_scale,
                "seed": generator.seed}
    return write_samples(out_dir, items, ecgs, formats=formats, wfdb_fs=wfdb_fs, settings=settings)
