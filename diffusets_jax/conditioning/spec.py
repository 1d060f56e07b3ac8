"""What a U-Net's text condition was made with, recorded with the data and the model and checked at sampling.

A U-Net only understands embeddings from the model and prompt style it was trained with: ada-002 embeddings of
the ordered prompt for the published U-Net, MiniLM embeddings for the demo, an 8192-d "E-72B" served behind an
OpenAI-compatible endpoint for another release. `ConditioningSpec` names all of it; data preparation writes it
into the dataset card (`data.provenance`), encoding copies it to the latent dataset, U-Net training copies it
into `model_index.json` with the patient-feature mode, and sampling rebuilds the same embedder from it. Nothing
is inferred from array widths: the widths are only checked against what is recorded.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from diffusets_jax.conditioning.patient import FEATURE_SCALES
from diffusets_jax.conditioning.prompts import PROMPT_STYLES

EMBEDDER_KINDS: tuple[str, ...] = ("openai", "local")
# Options a spec may record per kind (everything `make_embedder` accepts that changes the vectors, plus where).
_OPTIONS: dict[str, tuple[str, ...]] = {
    "openai": ("base_url", "send_dimensions"),
    "local": ("model_dir", "max_length", "dtype"),
}


@dataclasses.dataclass(frozen=True)
class EmbedderSpec:
    """A text embedder by kind, model name and output width.

    kind: "openai" (OpenAI's API or any OpenAI-compatible server) or "local" (the Flax sentence encoder).
    model: the model name sent to the server ("text-embedding-ada-002", "E-72B", ...) or, locally, the
        sentence-transformers model's name ("all-MiniLM-L6-v2").
    dim: the vector width the U-Net's text input takes.
    embedder_id: the embedder's own id when it was recorded (`Embedder.embedder_id`: for the local encoder it
        includes a digest of its weights); sampling refuses an embedder whose id differs. "" = not recorded.
    options: `make_embedder` options (base_url, send_dimensions; model_dir, max_length, dtype). Never secrets:
        API keys come from the environment at run time.
    """

    kind: str
    model: str
    dim: int
    embedder_id: str = ""
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in EMBEDDER_KINDS:
            raise ValueError(f"embedder kind must be one of {', '.join(EMBEDDER_KINDS)}, got {self.kind!r}")
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("embedder model must be a non-empty name, e.g. text-embedding-ada-002")
        if not isinstance(self.dim, int) or isinstance(self.dim, bool) or self.dim < 1:
            raise ValueError(f"embedder dim must be a positive integer, got {self.dim!r}")
        unknown = sorted(set(self.options) - set(_OPTIONS[self.kind]))
        if unknown:
            raise ValueError(f"{self.kind} embedder options {unknown} are not recorded options "
                             f"(allowed: {', '.join(_OPTIONS[self.kind])}); API keys come from the environment")

    @classmethod
    def from_embedder_config(cls, kind: str, options: dict[str, Any], dim: int, embedder_id: str = "") -> EmbedderSpec:
        """The spec of `make_embedder(kind, **options)` (a data-prep builder config's embedder)."""
        from diffusets_jax.conditioning.embedders import LOCAL_DEFAULT_MODEL, OPENAI_DEFAULT_MODEL

        options = dict(options)
        if kind == "openai":
            model = options.pop("model", OPENAI_DEFAULT_MODEL)
            options.pop("dim", None)
        else:
            model = LOCAL_DEFAULT_MODEL if options.get("model_dir") is None else str(options["model_dir"])
        kept = {k: v for k, v in options.items() if k in _OPTIONS.get(kind, ()) and v is not None}
        return cls(kind=kind, model=model, dim=int(dim), embedder_id=embedder_id, options=kept)

    def make(self, **overrides: Any):  # noqa: ANN201 (an Embedder)
        """Build the embedder: `make_embedder(kind, ...)` with the recorded model, width and options.

        `overrides`: run-time settings that do not change the vectors (api_key, base_url, batch_size, timeouts).
        The local encoder has no API: an `api_key` (which `sample` reads from the environment whatever the model
        directory's embedder) is ignored for it, and a `base_url` refused in one line. Both went to the encoder's
        constructor, whose TypeError was a traceback for anyone sampling a MiniLM model with OPENAI_API_KEY set.
        """
        from diffusets_jax.conditioning.embedders import make_embedder

        given = {k: v for k, v in overrides.items() if v is not None}
        if self.kind == "openai":
            return make_embedder("openai", model=self.model, dim=self.dim, **{**self.options, **given})
        if "base_url" in given:
            raise ValueError(f"--embedder-base-url {given['base_url']}: this model's embedder is the local sentence "
                             f"encoder ({self.model}), which runs here and asks no server: drop it")
        given.pop("api_key", None)
        return make_embedder("local", **{**self.options, **given})

    def check(self, embedder: Any, where: str) -> None:
        """Raise ValueError when `embedder` does not give the vectors this spec recorded."""
        if int(embedder.dim) != self.dim:
            raise ValueError(f"{where}: the recorded embedder {self.model!r} gives {self.dim}-d vectors but the one "
                             f"built here gives {embedder.dim}-d ones")
        if self.embedder_id and embedder.embedder_id != self.embedder_id:
            raise ValueError(f"{where}: this model was conditioned on embeddings from {self.embedder_id!r}, but the "
                             f"embedder here is {embedder.embedder_id!r} (other weights or settings): install the "
                             "recorded model, or point --embedder-base-url at a server that serves it")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any, where: str) -> EmbedderSpec:
        if not isinstance(data, dict):
            raise ValueError(f"{where}: 'embedder' must be an object with kind, model and dim")
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        missing = [k for k in ("kind", "model", "dim") if k not in data]
        if unknown or missing:
            raise ValueError(f"{where}: embedder record has unknown fields {unknown} / lacks {missing}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: {err}") from None


@dataclasses.dataclass(frozen=True)
class ConditioningSpec:
    """How a dataset's (or a U-Net's) text condition was built, and, for a U-Net, its patient features.

    prompt_style: "ordered" or "free_text" (`conditioning.prompts.make_prompt`).
    patient_features: "faithful" (raw sex, age, heart rate), "normalised" (sex, age / 100, HR / 100) or "none"
        (an ablation trained without patient information: the U-Net sees zeros); None for a dataset, where
        the mode is not chosen yet.
    """

    embedder: EmbedderSpec
    prompt_style: str = "ordered"
    patient_features: str | None = None

    def __post_init__(self) -> None:
        if self.prompt_style not in PROMPT_STYLES:
            raise ValueError(f"prompt_style must be one of {', '.join(PROMPT_STYLES)}, got {self.prompt_style!r}")
        if self.patient_features is not None and self.patient_features not in FEATURE_SCALES:
            raise ValueError(f"patient_features must be one of {', '.join(FEATURE_SCALES)}, "
                             f"got {self.patient_features!r}")

    def with_patient_features(self, mode: str) -> ConditioningSpec:
        return dataclasses.replace(self, patient_features=mode)

    def to_json(self) -> dict[str, Any]:
        return {"embedder": self.embedder.to_json(), "prompt_style": self.prompt_style,
                "patient_features": self.patient_features}

    @classmethod
    def from_json(cls, data: Any, where: str) -> ConditioningSpec:
        if not isinstance(data, dict) or "embedder" not in data:
            raise ValueError(f"{where}: 'conditioning' must be an object with an 'embedder'")
        unknown = sorted(set(data) - {"embedder", "prompt_style", "patient_features"})
        if unknown:
            raise ValueError(f"{where}: conditioning has unknown fields {unknown}")
        try:
            return cls(embedder=EmbedderSpec.from_json(data["embedder"], where),
                       prompt_style=data.get("prompt_style", "ordered"),
                       patient_features=data.get("patient_features"))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: {err}") from None


def published_conditioning() -> ConditioningSpec:
    """The published U-Net's condition: ada-002 (1536-d) embeddings of the ordered prompt, raw patient values."""
    from diffusets_jax.conditioning.embedders import OPENAI_DEFAULT_DIM, OPENAI_DEFAULT_MODEL

    return ConditioningSpec(EmbedderSpec("openai", OPENAI_DEFAULT_MODEL, OPENAI_DEFAULT_DIM,
                                         embedder_id=f"openai/{OPENAI_DEFAULT_MODEL}/{OPENAI_DEFAULT_DIM}"),
                            prompt_style="ordered", patient_features="faithful")
