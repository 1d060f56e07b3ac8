"""The library entry point: load a model directory once and generate ECGs for conditions.

    from diffusets_jax.conditioning.requests import make_condition
    from diffusets_jax.diffusion.samplers import sampler_config
    from diffusets_jax.pipeline import ECGGenerator
    gen = ECGGenerator("models/", sampler_config("dpmpp_2m"))
    for batch in gen.generate([make_condition("Sinus rhythm", "F", 50, 70, 8)]):
        ...  # batch.ecgs (len(batch.conditions), 1024, 12) float32 mV, standard lead order (a GeneratedBatch)

The model directory (`models.model_dir`) says everything generation needs: the VAE and U-Net, the embedder and
prompt style the U-Net was conditioned with, its patient-feature mode, schedule, prediction type, latent
scale and whether DDPM clips. Parts that do not fit are refused when the generator is built.

Generation is one jitted program (reverse chain + VAE decode) compiled once per run, the batch sharded over
this process's devices. Batch `i` always uses noise `fold_in(PRNGKey(seed), i)`, so results do not depend on
how many hosts share the work: on several hosts (`parallel.initialize_distributed`) batches are dealt
round-robin (`parallel.process_share`), each process generating and writing its own, and a corpus shard
regenerated after a crash is identical to the one that would have been written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusets_jax import parallel
from diffusets_jax.conditioning.patient import patient_features
from diffusets_jax.conditioning.requests import Condition, expand
from diffusets_jax.config import check_seed
from diffusets_jax.diffusion.guidance import CONDITION_FIELDS, condition_batch_size, fixed_null_condition
from diffusets_jax.diffusion.samplers import SamplerConfig, jit_generate, resolve_for_model, sampler_timesteps
from diffusets_jax.diffusion.schedule import make_schedule
from diffusets_jax.ecg.shapes import ECG_LENGTH, ECG_RATE_HZ
from diffusets_jax.io.progress import progress_bar
from diffusets_jax.models import model_dir as model_dirs


def _fetch(n: int, ecgs: jax.Array) -> np.ndarray:
    """The first `n` ECGs of a dispatched batch, once the device has them: `(n, 1024, 12)` float32 mV."""
    return np.asarray(jax.device_get(ecgs))[:n]


@dataclasses.dataclass
class GeneratedBatch:
    """One generated batch: its index (which fixes its noise), the conditions of its rows, their prompts and
    their ECGs `(n, 1024, 12)` float32 mV, and `start`, the position of its first row in `expand(conditions)`."""

    index: int
    start: int
    conditions: list[Condition]
    prompts: list[str]
    ecgs: np.ndarray


class ECGGenerator:
    """Loads a model directory once and generates ECGs for batches of conditions.

    `embedder_overrides`: run-time settings of the recorded embedder that do not change its vectors (an OpenAI
    `api_key`, another `base_url` serving the same model, `batch_size`, `timeout_s`).
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
        embedder_overrides: dict[str, Any] | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        if self.model_dir.exists() and not self.model_dir.is_dir():
            raise NotADirectoryError(f"--model-dir {self.model_dir} is a file, not a model directory (the folder "
                                     "holding model_index.json, vae/ and unet/)")
        if not self.model_dir.is_dir():
            raise FileNotFoundError(f"model directory {self.model_dir} does not exist (write one with `diffusets-jax "
                                    "convert --out DIR` or `diffusets-jax train ... --model-dir DIR`)")
        if batch_size < 1:
            raise ValueError(f"--batch-size must be a positive number of ECGs per compiled call, got {batch_size}")
        # The index and the weights as one state of the directory: a training or convert finishing into it now
        # waits until they are loaded (or they wait for it), so the uids recorded and checked are the weights'.
        with model_dirs.reading(self.model_dir):
            self.index = model_dirs.read_index(self.model_dir)
            model_dirs.require(self.index, self.model_dir, "vae", "unet")
            self.conditioning = self.index.conditioning
            self.diffusion = self.index.diffusion
            sampler = resolve_for_model(sampler if sampler is not None else SamplerConfig(), self.diffusion)
            schedule = make_schedule(self.diffusion.schedule)
            # Settings this model's schedule cannot run (more steps than it has timesteps) are refused here, from
            # the index alone: before the weights load and before a command claims its output folder for them.
            sampler_timesteps(sampler, schedule)
            self.sampler = sampler
            self.vae, vae_variables = model_dirs.load_component(self.model_dir, "vae")
            self.unet, unet_variables = model_dirs.load_component(self.model_dir, "unet")
        model_dirs.check_generation_parts(self.model_dir, self.index, self.vae, self.unet)
        self.seed = check_seed(seed)
        # The network's dtype changes the ECGs, so it is part of a run's fingerprint (`settings`); float32 is the
        # default and is named by None, as before, so runs started earlier still resume.
        self.compute_dtype = (None if compute_dtype is None or jnp.dtype(compute_dtype) == jnp.float32
                              else jnp.dtype(compute_dtype).name)
        # A module written with a compute dtype of its own (from Python, `UNet(dtype=jnp.bfloat16)`) computes in it
        # when no compute_dtype is given: recorded in `settings`, which otherwise said float32 for such a run.
        self.module_dtypes = {} if self.compute_dtype else {
            name: jnp.dtype(module.dtype).name for name, module in (("vae", self.vae), ("unet", self.unet))
            if getattr(module, "dtype", None) is not None and jnp.dtype(module.dtype) != jnp.float32}
        self.mesh = parallel.local_mesh()
        devices = self.mesh.devices.size
        self.batch_size = max(devices, -(-batch_size // devices) * devices)
        self.embedding_cache = embedding_cache
        self.embedder_overrides = dict(embedder_overrides or {})
        self._embedder = None
        self._cond_sharding = parallel.batch_sharding(self.mesh)
        replicated = parallel.replicated(self.mesh)
        self.unet_variables = jax.device_put(unet_variables, replicated)
        self.vae_variables = jax.device_put(vae_variables, replicated)
        self._generate = jit_generate(self.unet, self.vae, schedule, sampler,
                                      batch_sharding=self._cond_sharding, compute_dtype=compute_dtype,
                                      latent_scale=self.diffusion.latent_scale)
        self._null_cond = fixed_null_condition(self.unet.text_dim) if sampler.guidance_scale != 1.0 else None
        # A line for the command to show (None when there is nothing to say): guidance on a U-Net whose null
        # condition was never trained.
        self.guidance_warning = model_dirs.untrained_guidance_warning(self.index, sampler.guidance_scale)
        self._reconstruct = None

    # -- conditions -> model inputs ------------------------------------------------------------------
    def prompt(self, condition: Condition) -> str:
        """The text embedded for `condition`: its report in the U-Net's prompt style."""
        return condition.prompt(self.conditioning.prompt_style)

    def settings(self) -> dict[str, Any]:
        """What determines this generator's outputs, for manifests and run fingerprints."""
        # A lower compute dtype is recorded with what it covers. Before 2026-12-06 a bf16 run (recorded as the bare
        # "bfloat16") left most of the U-Net computing in float32; this form keeps such a run from resuming into,
        # and mixing its ECGs with, one whose networks compute in bf16.
        precision = {"compute_dtype": f"{self.compute_dtype} networks, float32 sampler"} if self.compute_dtype else {}
        if self.module_dtypes:
            precision = {"module_dtypes": dict(self.module_dtypes)}
        return {"model_dir": os.path.abspath(self.model_dir),
                "components": {name: entry.get("uid") for name, entry in self.index.components.items()},
                "sampler": self.sampler.record(), "seed": self.seed, "batch_size": self.batch_size,
                **precision}

    def reads(self) -> list[tuple[str, str | os.PathLike | None]]:
        """The files this generator reads, as `(flag, path)`: what an output folder replaced with `--overwrite`
        may not hold (`io.run_dir.check_reads_apart`)."""
        return [("--model-dir", self.model_dir), ("--embedding-cache", self.embedding_cache)]

    def embedder(self):  # noqa: ANN201 (an Embedder)
        if self._embedder is None:
            embedder = self.conditioning.embedder.make(**self.embedder_overrides)
            self.conditioning.embedder.check(embedder, str(self.model_dir))
            self._embedder = embedder
        return self._embedder

    def embed(self, prompts: Sequence[str]) -> np.ndarray:
        """Prompt embeddings `(n, text_dim)` with the model's embedder, through the cache when one is set.

        Each distinct prompt is embedded once. On several hosts process 0 embeds and the others receive the
        vectors, so a paid API is asked once per prompt, not once per host.
        """
        unique = list(dict.fromkeys(prompts))
        position = {p: i for i, p in enumerate(unique)}
        return self._embed_distinct(unique)[[position[p] for p in prompts]]

    def prompt_embeddings(self, conditions: Sequence[Condition], batches: Sequence[int] | None = None, *,
                          run_cache: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
        """`(table (u, text_dim), row (n,))` for `expand(conditions)`: ECG i's prompt embedding is `table[row[i]]`.

        Only the prompts of `batches` (of `batch_size` ECGs; default all) are embedded, each distinct prompt once,
        and each is kept once: a corpus of a million ECGs from a few conditions holds a few vectors, where one per
        ECG is 6 GB at the published 1536 dimensions (1e6 x 1536 float32). `row` is -1 for ECGs outside `batches`.

        `run_cache`: an embedding cache file of the run's own (in its output folder), used when this generator has
        no `embedding_cache`: the vectors a run got are kept there and a resumed run reads them instead of asking
        again, since an API's vectors (ada-002's) are not the same bits from one call to the next, and other bits
        are other ECGs.
        """
        owner = np.repeat(np.arange(len(conditions)), [c.count for c in conditions])  # ECG -> its condition
        wanted = np.ones(len(owner), bool)
        if batches is not None:
            wanted[:] = False
            for index in batches:
                wanted[index * self.batch_size : (index + 1) * self.batch_size] = True
        needed = np.unique(owner[wanted])
        prompts = [self.prompt(conditions[k]) for k in needed]
        unique = list(dict.fromkeys(prompts))
        position = {p: i for i, p in enumerate(unique)}
        row_of_condition = np.full(len(conditions), -1, np.int64)
        row_of_condition[needed] = [position[p] for p in prompts]
        return self._embed_distinct(unique, run_cache), row_of_condition[owner]

    def _embed_distinct(self, unique: Sequence[str], run_cache: str | os.PathLike | None = None) -> np.ndarray:
        """Embeddings `(len(unique), text_dim)` of distinct prompts (process 0 asks; every host receives them),
        through `embedding_cache`, else `run_cache` (`prompt_embeddings`), else straight from the embedder."""
        from diffusets_jax.conditioning.cache import EmbeddingCache, embed_with_cache

        table = np.zeros((len(unique), self.unet.text_dim), np.float32)
        if not unique:  # nothing left to generate (a finished run resumed): no request, on any host
            return table
        cache_path = self.embedding_cache if self.embedding_cache is not None else run_cache
        with parallel.failing_together():  # a refused or failed request stops every host, not only process 0
            if jax.process_index() == 0:
                if cache_path is None:
                    table = np.asarray(self.embedder().embed(unique), np.float32)
                else:
                    made_here = self.embedding_cache is None and not os.path.exists(cache_path)
                    # The run's own cache is opened by this process alone, in an output folder that may be on a
                    # shared disk, where WAL's shared memory is not to be had: a rollback journal instead.
                    cache = EmbeddingCache(cache_path, wal=self.embedding_cache is not None)
                    try:
                        table = np.asarray(embed_with_cache(unique, self.embedder(), cache), np.float32)
                    except BaseException:
                        # The run's own cache, made just now and given nothing (the key refused at the first
                        # request): removed, so that a run which wrote nothing leaves no folder (`io.run_dir`).
                        if made_here and cache.count() == 0:
                            cache.close()
                            for leftover in (cache_path, *(f"{cache_path}-{end}" for end in ("wal", "shm", "journal"))):
                                with contextlib.suppress(FileNotFoundError):
                                    os.remove(leftover)
                        raise
                    finally:
                        cache.close()
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            table = np.asarray(multihost_utils.broadcast_one_to_all(table))
        return table

    def condition_arrays(self, conditions: Sequence[Condition], text_embedding: np.ndarray) -> dict[str, np.ndarray]:
        features = patient_features([c.sex for c in conditions], [c.age for c in conditions],
                                    [c.heart_rate for c in conditions], mode=self.conditioning.patient_features)
        return {"text_embedding": np.asarray(text_embedding, np.float32), "sex": features[:, 0],
                "age": features[:, 1], "heart_rate": features[:, 2]}

    # -- reconstruction ---------------------------------------------------------------------------------
    def reconstruct(self, ecgs: np.ndarray, key: jax.Array | None = None, rows: Sequence[int] | None = None
                    ) -> np.ndarray:
        """VAE reconstructions decoder(encoder(ecg)) of `ecgs` `(n, 1024, 12)` mV at the model's latent scale.

        Without `key`, through the posterior mean. With `key`, through one draw from the posterior, as the
        published evaluation's references are (its stored latents are encoder samples, DiffuSETS_Exp
        vae/vae_encoding.py, decoded in test_scripts/evaluation.py): ECG `i` draws with `fold_in(key, rows[i])`
        (`rows` `(n,)`, default 0..n-1, e.g. record indices), so its reference does not depend on the batch or
        the host that makes it."""
        from diffusets_jax.models.vae import VAE

        if self._reconstruct is None:
            scale = self.diffusion.latent_scale

            def run(variables, ecg, row_keys, sample):
                mean, logvar = self.vae.apply(variables, ecg, method=VAE.encode)
                drawn = jax.vmap(lambda m, lv, k: VAE.sample_latent(m[None], lv[None], k, scale)[0])(
                    mean, logvar, row_keys)
                z = jnp.where(sample, drawn, mean * scale)
                return self.vae.apply(variables, z, latent_scale=scale, method=VAE.decode)

            self._reconstruct = jax.jit(run, in_shardings=(parallel.replicated(self.mesh), self._cond_sharding,
                                                           self._cond_sharding, None),
                                        out_shardings=self._cond_sharding)
        ecgs = np.asarray(ecgs, np.float32)
        # Checked before padding: one ECG without its batch axis, (1024, 12), was cut into rows of 12 samples and
        # refused by the VAE with the padded shape, (batch_size, 12), which names neither the argument nor the fix.
        if ecgs.ndim != 3 or ecgs.shape[2] != self.vae.in_channels:
            raise ValueError(f"reconstruct: ecgs has shape {ecgs.shape}, expected (n, 1024, {self.vae.in_channels}) mV, "
                             "leads last (ecgs[None] for one ECG; transpose (n, 12, 1024) PyTorch-layout arrays)")
        # The VAE takes any multiple of 8 samples: a 10-second record at its recorded 500 Hz, (n, 5000, 12), ran
        # through it and came back as a "reconstruction" of a time base the VAE never saw.
        if ecgs.shape[1] != ECG_LENGTH:
            raise ValueError(f"reconstruct: ecgs has {ecgs.shape[1]} samples per record, expected {ECG_LENGTH} (10 s "
                             f"at {ECG_RATE_HZ} Hz, the model's time base): resample whole records first, "
                             "ecg.resample.resample_to_length(ecgs, axis=1)")
        rows = np.arange(len(ecgs)) if rows is None else np.asarray(rows, np.int64)
        if rows.shape != (len(ecgs),):
            raise ValueError(f"reconstruct: rows has shape {rows.shape}, expected ({len(ecgs)},): one row index per "
                             "ECG")
        base = jax.random.PRNGKey(0) if key is None else key
        out = []
        for start in range(0, len(ecgs), self.batch_size):
            chunk = ecgs[start : start + self.batch_size]
            pad = self.batch_size - len(chunk)
            padded = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.float32)])
            chunk_rows = np.concatenate([rows[start : start + len(chunk)], np.zeros(pad, np.int64)])
            # Kept a JAX array: a typed key (jax.random.key) has no NumPy form, and a raw one needs none.
            row_keys = jax.vmap(lambda r: jax.random.fold_in(base, r))(chunk_rows)
            out.append(np.asarray(self._reconstruct(
                self.vae_variables, jax.device_put(padded, self._cond_sharding),
                jax.device_put(row_keys, self._cond_sharding), np.bool_(key is not None)))[: len(chunk)])
        return np.concatenate(out) if out else np.zeros_like(ecgs)

    # -- generation -------------------------------------------------------------------------------------
    def generate_batch(self, cond: dict[str, np.ndarray], batch_index: int) -> np.ndarray:
        """ECGs `(n, 1024, 12)` float32 mV for `n <= batch_size` conditions; `batch_index` fixes the noise."""
        return _fetch(*self._dispatch(cond, batch_index))

    def generate_batches(self, jobs: Iterable[tuple[dict[str, np.ndarray], int]]) -> Iterator[np.ndarray]:
        """`generate_batch(cond, batch_index)` for each job in turn, each batch handed over once the next one is on
        its way: the accelerator computes batch i + 1 while the caller writes batch i (its host work, a corpus shard's
        serialization or a folder's files, would otherwise leave the device idle). Same ECGs as `generate_batch`."""
        pending = None
        for cond, batch_index in jobs:
            started = self._dispatch(cond, batch_index)  # JAX returns at once; the device runs it after `pending`
            if pending is not None:
                yield _fetch(*pending)
            pending = started
        if pending is not None:
            yield _fetch(*pending)

    def _dispatch(self, cond: dict[str, np.ndarray], batch_index: int) -> tuple[int, jax.Array]:
        """(n, the padded batch's ECGs on the device, still being computed) for `n` conditions."""
        n, cond_global, key = self._device_batch(cond, batch_index)
        return n, self._generate(self.unet_variables, self.vae_variables, cond_global, key, self._null_cond)

    def _device_batch(self, cond: dict[str, np.ndarray], batch_index: int) -> tuple[int, Any, jax.Array]:
        """(n, the conditions padded to batch_size and sharded, the batch's key): what every batch program takes."""
        # Checked before padding, from the fields' shapes: one ECG's (text_dim,) embedding without its batch axis was
        # padded to text_dim + batch_size - 1 rows and refused as a batch of that size, and a scalar sex failed with
        # a TypeError; neither named the argument or the fix.
        cond = {k: np.asarray(v) for k, v in cond.items()}
        # A missing field was a KeyError from inside the traced sampler ('heart_rate'), naming neither the argument
        # nor the fields it takes; a misspelt one ('hr') was dropped without a word.
        missing = [k for k in CONDITION_FIELDS if k not in cond]
        unknown = sorted(set(cond) - set(CONDITION_FIELDS))
        if missing or unknown:
            wrong = "; ".join(f"{what} {names}" for what, names in (("missing", missing), ("unknown", unknown)) if names)
            raise ValueError(f"generate_batch: cond has {wrong}: it takes exactly the fields {list(CONDITION_FIELDS)}, "
                             "each an array with the batch first, (n, text_dim) for text_embedding and (n,) for the others")
        n = condition_batch_size(cond, "generate_batch: cond")
        if not 0 < n <= self.batch_size:
            raise ValueError(f"generate_batch takes 1..{self.batch_size} conditions, got {n}")
        padded = {k: np.concatenate([v, np.repeat(v[-1:], self.batch_size - n, axis=0)]) for k, v in cond.items()}
        return n, jax.device_put(padded, self._cond_sharding), jax.random.fold_in(jax.random.PRNGKey(self.seed),
                                                                                  batch_index)

    def num_batches(self, conditions: Sequence[Condition]) -> int:
        return -(-len(expand(conditions)) // self.batch_size)

    def generate(self, conditions: Sequence[Condition], *, progress: bool = False,
                 batches: Sequence[int] | None = None, text_embeddings: np.ndarray | None = None,
                 run_cache: str | os.PathLike | None = None) -> Iterator[GeneratedBatch]:
        """Yield the `GeneratedBatch`es of `expand(conditions)` in batches of `batch_size`.

        `batches`: the batch indices still to generate (default: all), the same on every host; each process
        generates its round-robin share of them (`parallel.process_share`), all of them on one host.
        `text_embeddings` `(len(expand(conditions)), text_dim)`: precomputed prompt embeddings (e.g. a prepared
        dataset's, which were made with the same embedder), used instead of running the embedder.
        `run_cache`: where a run keeps the vectors it got, to resume with the same ones (`prompt_embeddings`).
        """
        items = expand(conditions)
        total = -(-len(items) // self.batch_size)
        todo = list(range(total) if batches is None else batches)
        # Checked before anything is embedded: a batch past the end (indices of another batch size) was generated
        # from no conditions and refused as "generate_batch takes 1..B conditions, got 0", naming neither.
        outside = sorted({int(b) for b in todo if not 0 <= int(b) < total})
        if outside:
            raise ValueError(f"generate: batches {outside[:5]} are outside 0..{total - 1}: {len(items)} ECGs make "
                             f"{total} batches of {self.batch_size}")
        wanted = [todo[i] for i in parallel.process_share(len(todo))]
        if text_embeddings is None:
            # The prompts of every batch still to do (a resumed run skips the rest), the same on every host.
            table, row = self.prompt_embeddings(conditions, todo, run_cache=run_cache)
        else:
            table = np.asarray(text_embeddings, np.float32)
            if table.shape != (len(items), self.unet.text_dim):
                raise ValueError(f"text_embeddings: expected ({len(items)}, {self.unet.text_dim}), got {table.shape}")
            row = np.arange(len(items))
        bar = None
        if progress:
            bar = progress_bar(sum(min(self.batch_size, len(items) - b * self.batch_size) for b in wanted),
                               desc="sampling", unit="ECG")
        def jobs() -> Iterator[tuple[dict[str, np.ndarray], int]]:
            for index in wanted:
                start = index * self.batch_size
                yield self.condition_arrays(items[start : start + self.batch_size],
                                            table[row[start : start + self.batch_size]]), index

        try:
            last = time.perf_counter()
            for index, ecgs in zip(wanted, self.generate_batches(jobs()), strict=True):
                start = index * self.batch_size
                chunk = items[start : start + self.batch_size]
                if bar is not None:
                    # the run's pace: since the last batch was handed over, the caller's writing of it included
                    now = time.perf_counter()
                    bar.update(len(chunk))
                    bar.set_postfix(ecg_per_s=f"{len(chunk) / (now - last):.2f}",
                                    refresh=False)  # drawn at the bar's pace, not once per batch in a log file
                    last = now
                yield GeneratedBatch(index, start, chunk, [self.prompt(c) for c in chunk], ecgs)
        finally:
            if bar is not None:
                bar.close()

