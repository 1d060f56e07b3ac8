"""Generation from a patient's own recording: posterior reconstruction, SDEdit editing and digital twins.

    from diffusets_jax.posterior_pipeline import ReferenceGenerator, reference_task
    task = reference_task("rec/patient01", observe="I")           # 12 leads from lead I
    gen = ReferenceGenerator("models/", task, batch_size=4)
    for batch in gen.generate([make_condition("Sinus rhythm", "F", 50, 70, 4)]):
        ...  # batch.ecgs (n, 1024, 12) mV

A `ReferenceTask` is one recording (`io.reference.read_reference`) and what to do with it:
- observe only: posterior sampling (`diffusion.posterior`) of ECGs that agree with the observed leads / time
  window up to `noise_std` (optionally with baseline drift marginalised), under the given report and patient;
- edit strength only: SDEdit (`diffusion.editing.edit`): the recording re-generated under the given conditions;
- both: digital twins (`diffusion.editing.digital_twin`): started from the edited recording and kept close to
  the observation.
Every row of a request uses the same recording; several rows (a count > 1) are several twins.

`ReferenceGenerator` is an `ECGGenerator` (the same model directory checks, embedder, conditioning, batches
and per-batch noise `fold_in(PRNGKey(seed), batch)`) whose batches run the posterior or editing program, so
`io.outputs.sample_to_directory` writes its results like `sample`'s, with the reference beside each.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from diffusets_jax import parallel
from diffusets_jax.data.records import record_base
from diffusets_jax.diffusion.observations import (
    DEFAULT_DRIFT_CUTOFF_HZ,
    lead_mask,
    make_observation,
    window_mask,
)
from diffusets_jax.diffusion.posterior import PosteriorConfig, jit_posterior_generate, posterior_chain
from diffusets_jax.diffusion.samplers import SamplerConfig
from diffusets_jax.diffusion.schedule import make_schedule
from diffusets_jax.ecg.leads import STANDARD_LEADS
from diffusets_jax.io.reference import Reference, read_reference
from diffusets_jax.pipeline import ECGGenerator

# A reconstruction's observed leads are taken as accurate to 0.05 mV, a quarter of a typical ECG's std
# (about 0.2 mV): close to the recording without asking the sampler for an exact match it cannot reach.
DEFAULT_NOISE_STD_MV = 0.05
DEFAULT_PARTICLES = PosteriorConfig().particles
# The chains each mode runs unless the user chooses: SMC needs a stochastic chain (100 DDPM steps, the
# posterior module's default); an edit alone runs deterministic DDIM (`editing.EDIT_SAMPLER`).
POSTERIOR_SAMPLER = ("ddpm", 100)
EDIT_SAMPLER = ("ddim", 50)


@dataclasses.dataclass(frozen=True)
class ReferenceTask:
    """A recording and what to do with it (build with `reference_task`, which checks everything).

    observe: the observed leads, standard order (empty: no observation); window: (start_s, end_s) observed, or
    None for all 10 s; noise_std: observation noise (mV); drift: marginalise baseline wander below
    `DEFAULT_DRIFT_CUTOFF_HZ`; strength: the edit strength in [0, 1] or None (no edit); particles: K of the
    posterior sampler.
    """

    reference: Reference
    observe: tuple[str, ...] = ()
    window: tuple[float, float] | None = None
    noise_std: float = DEFAULT_NOISE_STD_MV
    drift: bool = False
    strength: float | None = None
    particles: int = DEFAULT_PARTICLES

    @property
    def mode(self) -> str:
        """"posterior" (observe only), "edit" (strength only) or "twin" (both)."""
        if self.strength is None:
            return "posterior"
        return "twin" if self.observe else "edit"

    def observed_mask(self) -> np.ndarray:
        """`(1024, 12)` bool: the reference entries the observation pins (all False for an edit)."""
        mask = np.zeros(self.reference.ecg.shape, bool)
        if self.observe:
            mask[:] = lead_mask(list(self.observe))[None, :]
            if self.window is not None:
                mask &= window_mask(*self.window)[:, None]
            mask &= ~self.reference.missing  # samples the recording lacks pin nothing
        return mask

    def describe(self) -> dict[str, Any]:
        """The task for manifests and run fingerprints (JSON-ready)."""
        # The recording by content too: another recording saved under the same name is another input, not a resume.
        content = hashlib.sha256(np.ascontiguousarray(self.reference.ecg, np.float32).tobytes()).hexdigest()
        # Which 10 s of a longer record (--reference-start): the manifest said only the record, so the excerpt a run
        # was made from could not be told. Named only when given, so that runs recorded without it still resume.
        start = {} if self.reference.start_s is None else {"start_s": self.reference.start_s}
        # Samples of usable leads the recording lacks (left unobserved), per lead on the 1024-sample time base. Named
        # only where there are some, so that runs recorded before still resume.
        gaps = {lead: int(n) for lead, n in zip(STANDARD_LEADS, self.reference.missing.sum(axis=0), strict=True) if n}
        start = {**start, "missing_samples": gaps} if gaps else start
        return {"record": os.path.abspath(self.reference.source), "record_content": content, "fs": self.reference.fs,
                **start, "mode": self.mode,
                "usable_leads": list(self.reference.leads), "excluded_leads": dict(self.reference.excluded),
                "observed_leads": list(self.observe), "observed_window_s": None if self.window is None else list(self.window),
                "noise_std_mv": self.noise_std if self.observe else None, "drift": self.drift if self.observe else None,
                "edit_strength": self.strength, "particles": self.particles if self.observe else None}

    def label(self) -> str:
        """The reference's heading on plots, e.g. "Reference (observed: I, II; 0-5 s)"."""
        if not self.observe:
            return f"Reference (edited at strength {self.strength:g})"
        window = "" if self.window is None else f"; {self.window[0]:g}-{self.window[1]:g} s"
        return f"Reference (observed: {', '.join(self.observe)}{window})"


def parse_window(text: str | None) -> tuple[float, float] | None:
    """`"0,5"` -> (0.0, 5.0) seconds; the range itself is checked by `reference_task`."""
    if text is None:
        return None
    parts = [p.strip() for p in str(text).split(",")]
    try:
        start, end = (float(p) for p in parts)
    except ValueError:
        raise ValueError(f"--observe-window {text!r}: give START,END in seconds, e.g. 0,5") from None
    return start, end


def reference_task(record: str | os.PathLike | Reference, *, observe: str | Sequence[str] | None = None,
                   window: tuple[float, float] | None = None, noise_std: float | None = None, drift: bool = False,
                   strength: float | None = None, particles: int = DEFAULT_PARTICLES,
                   start_s: float | None = None) -> ReferenceTask:
    """Read `record` (a WFDB record path, or a `Reference`) and check the request; raises a one-line ValueError
    (or FileNotFoundError) for anything wrong, before any model is loaded.

    observe: lead names ("I,II", a list, or "all" for every usable lead of the record); window, noise_std and
    drift refine an observation and need one. strength: edit strength in [0, 1]. start_s: take 10 s of a longer
    record from there.
    """
    if observe is None and strength is None:
        raise ValueError("--reference needs --observe LEADS (reconstruction), --edit-strength S (editing) or both "
                         "(digital twins)")
    if observe is None:
        for flag, value in (("--observe-window", window), ("--noise-std", noise_std), ("--drift", drift or None)):
            if value is not None:
                raise ValueError(f"{flag} refines an observation; add --observe LEADS (e.g. --observe I,II)")
    if strength is not None and not (np.isfinite(strength) and 0.0 <= float(strength) <= 1.0):
        raise ValueError(f"--edit-strength must be in [0, 1] (0 = the recording's reconstruction, 1 = new "
                         f"generation), got {strength:g}")
    if noise_std is not None and not (np.isfinite(noise_std) and noise_std > 0):
        raise ValueError(f"--noise-std must be > 0 mV (e.g. {DEFAULT_NOISE_STD_MV} for a near-exact observation), "
                         f"got {noise_std:g}")
    if particles < 1:
        raise ValueError(f"--particles must be >= 1, got {particles}")
    if window is not None:
        window_mask(*window, what="--observe-window")  # range check
    reference = record if isinstance(record, Reference) else _read(record, start_s)
    observed: tuple[str, ...] = ()
    if observe is not None:
        names = reference.leads if isinstance(observe, str) and observe.strip().lower() == "all" else observe
        # A lead the record has but `read_reference` left out (flat, missing samples) is not "not in the
        # reference": say why it cannot be observed, so the user does not look for a misspelt or absent lead.
        asked = lead_mask(names, what="--observe")
        unusable = [f"{lead} ({reference.excluded[lead]})" for lead, on in zip(STANDARD_LEADS, asked, strict=True)
                    if on and reference.excluded.get(lead, "absent") != "absent"]
        if unusable:
            raise ValueError(f"--observe: {reference.source} has {', '.join(unusable)}, which cannot be observed; "
                             f"observe its usable leads ({', '.join(reference.leads)}) instead")
        mask = lead_mask(names, available=reference.leads, what="--observe")
        observed = tuple(lead for lead, on in zip(STANDARD_LEADS, mask, strict=True) if on)
    gaps = {lead: int(n) for lead, n in zip(STANDARD_LEADS, reference.missing.sum(axis=0), strict=True) if n}
    if strength is not None and (reference.excluded or gaps):
        # An edit encodes every sample of the recording; a gap would be encoded as the straight line that bridges it.
        missing = ", ".join([f"{lead} ({why})" for lead, why in reference.excluded.items()]
                            + [f"{n} samples of {lead} (missing samples)" for lead, n in gaps.items()])
        raise ValueError(f"--edit-strength encodes the whole recording, but {reference.source} lacks {missing}; "
                         "reconstruct it with --observe alone instead")
    return ReferenceTask(reference=reference, observe=observed, window=None if window is None else tuple(window),
                         noise_std=DEFAULT_NOISE_STD_MV if noise_std is None else float(noise_std), drift=bool(drift),
                         strength=None if strength is None else float(strength), particles=int(particles))


def _read(record: str | os.PathLike, start_s: float | None) -> Reference:
    path = os.fspath(record)
    base = record_base(path)
    if not os.path.exists(base + ".hea"):
        raise FileNotFoundError(f"--reference {path}: no WFDB header {base}.hea (give the record path without "
                                "extension, e.g. data/patient01)")
    try:
        return read_reference(base, start_s=start_s, start_flag="--reference-start")
    except ValueError as err:  # a damaged or unusable recording: the line names the flag, as the others do
        raise ValueError(f"--reference: {err}" if base in str(err) else f"--reference {path}: {err}") from None


def default_sampler(task: ReferenceTask) -> tuple[str, int]:
    """(sampler, steps) a task runs when the user names none."""
    return EDIT_SAMPLER if task.mode == "edit" else POSTERIOR_SAMPLER


def check_sampler(task: ReferenceTask, sampler: SamplerConfig) -> None:
    """One-line ValueError for a chain the task cannot run (before the model loads)."""
    if sampler.sampler not in ("ddpm", "ddim"):
        raise ValueError(f"--sampler {sampler.sampler}: reconstruction, editing and twins run ddpm or ddim")
    if task.mode != "edit" and sampler.sampler == "ddim" and not sampler.eta > 0:
        raise ValueError("--observe needs a stochastic chain: use --sampler ddpm, or ddim with --eta > 0 (e.g. 1)")


class ReferenceGenerator(ECGGenerator):
    """An `ECGGenerator` whose batches are posterior samples, edits or twins of `task`'s recording.

    `sampler`: ddpm, or ddim (eta > 0 when observing); None: `default_sampler(task)`. Other arguments as for
    `ECGGenerator`. `reference` is the task (`io.outputs` writes it beside the results).
    """

    def __init__(self, model_dir: str | os.PathLike, task: ReferenceTask, sampler: SamplerConfig | None = None, *,
                 compute_dtype: Any = None, **kwargs: Any) -> None:
        if sampler is None:
            name, steps = default_sampler(task)
            sampler = SamplerConfig(sampler=name, steps=steps, clip_sample=None)
        check_sampler(task, sampler)
        # The settings (manifest, run fingerprint) record the chain that runs: it ends with a first-order step.
        sampler = posterior_chain(sampler)
        super().__init__(model_dir, sampler, compute_dtype=compute_dtype, **kwargs)
        self.reference = task
        schedule = make_schedule(self.diffusion.schedule)
        options = dict(batch_sharding=self._cond_sharding, compute_dtype=compute_dtype,
                       latent_scale=self.diffusion.latent_scale)
        if task.mode == "edit":
            from diffusets_jax.diffusion.editing import jit_edit

            self._run = jit_edit(self.unet, self.vae, schedule, self.sampler, **options)
        else:
            config = PosteriorConfig(sampler=self.sampler, particles=task.particles)
            if task.mode == "twin":
                from diffusets_jax.diffusion.editing import jit_digital_twin

                self._run = jit_digital_twin(self.unet, self.vae, schedule, config, **options)
            else:
                self._run = jit_posterior_generate(self.unet, self.vae, schedule, config, **options)
        rows = np.repeat(task.reference.ecg[None], self.batch_size, axis=0)
        self._reference_rows = jax.device_put(rows, self._cond_sharding)
        self._observation = None
        if task.observe:
            observation = make_observation(
                rows, noise_std=task.noise_std, leads=list(task.observe), available_leads=task.reference.leads,
                window=task.window, mask=~task.reference.missing[None],
                drift_cutoff_hz=DEFAULT_DRIFT_CUTOFF_HZ if task.drift else None)
            observation = observation.map_samples(lambda a: jax.device_put(a, self._cond_sharding))
            basis = observation.drift_basis
            self._observation = observation.replace(
                drift_basis=None if basis is None else jax.device_put(basis, parallel.replicated(self.mesh)))

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "reference": self.reference.describe()}

    def _dispatch(self, cond: dict[str, np.ndarray], batch_index: int) -> tuple[int, jax.Array]:
        """(n, the padded batch's ECGs from the recording on the device, still being computed) for `n` conditions."""
        n, cond_global, key = self._device_batch(cond, batch_index)
        task, variables = self.reference, (self.unet_variables, self.vae_variables)
        if task.mode == "edit":
            ecg = self._run(*variables, self._reference_rows, cond_global, key, task.strength, self._null_cond)
        elif task.mode == "twin":
            ecg = self._run(*variables, self._reference_rows, self._observation, cond_global, key, task.strength,
                            self._null_cond).ecg
        else:
            ecg = self._run(*variables, cond_global, self._observation, key, self._null_cond).ecg
        return n, ecg
