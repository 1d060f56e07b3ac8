"""The dataset card: what a dataset directory holds and how it was made, written beside its TFRecords.

Every dataset this project writes carries `diffusets_dataset.json`: prepared ECGs (`prepare`), latent datasets
(`encode`) and synthetic corpora (`sample --corpus`). It records the kind, name, builder config and version,
the examples per split, the text condition (`conditioning.spec.ConditioningSpec`: embedder and prompt style),
the upstream datasets or models it was derived from, and the code that wrote it. Training reads it so that a
model directory states what its U-Net was conditioned on instead of guessing from array widths.

Datasets prepared before cards existed are still read: their builder config (named in TFDS's
`dataset_info.json`) is looked up in `data_prep` and its embedder settings used.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from diffusets_jax.conditioning.spec import ConditioningSpec, EmbedderSpec
from diffusets_jax.io.files import json_text, read_json, write_json_atomic
from diffusets_jax.provenance import stamp

CARD_FILE = "diffusets_dataset.json"
CARD_FORMAT = "diffusets-jax dataset card"
CARD_VERSION = 1
KINDS: tuple[str, ...] = ("prepared", "latents", "corpus")


def write_card(directory: str | os.PathLike, *, kind: str, name: str, config: str | None, version: str,
               conditioning: ConditioningSpec, splits: dict[str, int], derived_from: dict[str, Any] | None = None,
               **details: Any) -> dict[str, Any]:
    """Write the card of the dataset in `directory` atomically; returns it.

    `derived_from`: the upstream card (latents, corpora) and/or model provenance; `details`: anything else worth
    keeping (e.g. the prepare report's skip counts).
    """
    if kind not in KINDS:
        raise ValueError(f"dataset card kind must be one of {KINDS}, got {kind!r}")
    card = {"format": CARD_FORMAT, "format_version": CARD_VERSION, "kind": kind, "name": name, "config": config,
            "version": str(version), "splits": {k: int(v) for k, v in splits.items()},
            "conditioning": conditioning.to_json(), "derived_from": derived_from or {}, **details, **stamp()}
    path = Path(directory) / CARD_FILE
    if path.is_file():  # a resumed run finishing the same dataset: the card, and so the build's identity, stays
        existing = read_json(path, "dataset card")
        if _without_stamp(existing) == _without_stamp(json.loads(json_text(card))):
            return existing
    write_json_atomic(path, card)
    return card


def _without_stamp(card: Any) -> Any:
    """A card without when and by which code it was written (`provenance.stamp`)."""
    return {k: v for k, v in card.items() if k not in ("created", "code")} if isinstance(card, dict) else card


def read_card(builder: Any) -> dict[str, Any]:
    """The card of a loaded TFDS builder's dataset (or of a dataset directory), legacy datasets included.

    Raises ValueError with what to do when the dataset says nothing about its conditioning.
    """
    directory = Path(os.fspath(builder if isinstance(builder, str | os.PathLike) else builder.data_dir))
    path = directory / CARD_FILE
    if path.is_file():
        card = read_json(path, "dataset card")
        if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
            raise ValueError(f"{path} is not a diffusets-jax dataset card")
        ConditioningSpec.from_json(card.get("conditioning"), str(path))  # validate now, one line if broken
        return card
    if isinstance(builder, str | os.PathLike):
        from diffusets_jax.data.pipeline import load_builder

        builder = load_builder(directory)
    legacy = _legacy_prepared_card(builder)
    if legacy is None:
        raise ValueError(
            f"{directory} has no {CARD_FILE} recording how its text embeddings were made: re-run the command that "
            "wrote it with this version (`diffusets-jax encode` for a latent dataset, `diffusets-jax prepare` for "
            "prepared data)")
    return legacy


def check_dataset_kind(directory: str | os.PathLike, kind: str, flag: str) -> None:
    """Refuse in one line a dataset whose card says it is not of `kind` ("prepared": recorded ECGs; "corpus":
    generated ones, `sample --corpus`). The two share one schema, so a corpus given where real records are asked
    for would read without complaint, and a Turing key or a downstream test set would call generated ECGs real.
    A dataset without a card (built by other tools) is not refused: nothing says what it holds."""
    path = Path(os.fspath(directory)) / CARD_FILE
    card = read_json(path, "dataset card") if path.is_file() else None
    found = card.get("kind") if isinstance(card, dict) else None
    if found is None or found == kind:
        return
    what = {"prepared": "a prepared dataset of recorded ECGs", "corpus": "a corpus of generated ECGs (`sample "
            "--corpus` wrote it)", "latents": "a latent dataset (`encode` wrote it)"}
    wanted = {"prepared": "recorded ECGs: give a dataset `diffusets-jax prepare` wrote",
              "corpus": "generated ECGs: give what `diffusets-jax sample` wrote"}
    raise ValueError(f"{flag} {directory} is {what.get(found, repr(found))}, but {flag} takes {wanted[kind]}")


def card_conditioning(card: dict[str, Any], where: str = "dataset card") -> ConditioningSpec:
    return ConditioningSpec.from_json(card["conditioning"], where)


def check_embeddings_fit(conditioning: ConditioningSpec | None, card: dict[str, Any], *, model: str, data: str,
                         remedy: str) -> None:
    """Refuse in one line a model (a U-Net; a CLIP that records its text conditioning) given a dataset's stored text
    embeddings made otherwise than those it was trained on. The vectors are passed to it as they are, so another
    embedder's, even of the same width, or embeddings of prompts in another style are inputs it never saw, and
    whatever it computes from them means nothing. The same embedder is the same kind, model and width, and the
    same id where both record one; the prompt style must match too. `model` and `data` name the two in the message
    ("the U-Net of --model-dir M", "--dataset D"); `remedy` says what to do."""
    if conditioning is None:
        raise ValueError(f"{model} records no text conditioning, so it cannot be checked that {data} holds the text "
                         "embeddings it was trained on: write it again with this version")
    theirs = card_conditioning(card, data)
    mine, stored = conditioning.embedder, theirs.embedder
    same = (mine.kind, mine.model, mine.dim) == (stored.kind, stored.model, stored.dim) and not (
        mine.embedder_id and stored.embedder_id and mine.embedder_id != stored.embedder_id)
    if same and conditioning.prompt_style == theirs.prompt_style:
        return
    raise ValueError(f"{data} holds {_embedder_name(stored)} embeddings of {theirs.prompt_style} prompts, but {model} "
                     f"was conditioned on {_embedder_name(mine)} embeddings of {conditioning.prompt_style} prompts: "
                     f"{remedy}")


def check_embedder_id_fits(conditioning: ConditioningSpec, embedder_id: str, *, model: str, data: str,
                           remedy: str) -> None:
    """`check_embeddings_fit` for embeddings that record only their embedder's id (`Embedder.embedder_id`: an
    NPZ's `embedder_id`), not a dataset card: refused in the same words when both it and `conditioning` record an
    id and the ids differ (another model, width or, locally, weights); an id missing on either side cannot be
    checked."""
    mine = conditioning.embedder
    if not embedder_id or not mine.embedder_id or embedder_id == mine.embedder_id:
        return
    raise ValueError(f"{data} holds {embedder_id!r} embeddings, but {model} was conditioned on {_embedder_name(mine)} "
                     f"embeddings of {conditioning.prompt_style} prompts: {remedy}")


def _embedder_name(embedder: EmbedderSpec) -> str:
    return f"{embedder.kind} {embedder.model!r} ({embedder.embedder_id or f'{embedder.dim}-d'})"


def _legacy_prepared_card(builder: Any) -> dict[str, Any] | None:
    """A card for a dataset prepared by a data_prep builder before cards existed, from its builder config."""
    from diffusets_jax.data import sources

    name, config_name = builder.info.name, builder.info.config_name
    if name not in sources.SOURCES.values() or not config_name:
        return None
    configs = {c.name: c for c in sources.builder_class(name).BUILDER_CONFIGS}
    config = configs.get(config_name)
    if config is None:
        return None
    report_path = Path(os.fspath(builder.data_dir)) / "prepare_report.json"
    embedder_id = ""
    if report_path.is_file():
        embedder_id = read_json(report_path, "prepare report").get("embedding", {}).get("embedder_id", "")
    embedder = EmbedderSpec.from_embedder_config(config.embedder, config.embedder_options, config.embedding_dim,
                                                 embedder_id)
    conditioning = ConditioningSpec(embedder, prompt_style=config.prompt_style)
    return {"format": CARD_FORMAT, "format_version": CARD_VERSION, "kind": "prepared", "name": name,
            "config": config_name, "version": str(builder.info.version),
            "splits": {k: int(v.num_examples) for k, v in builder.info.splits.items()},
            "conditioning": conditioning.to_json(), "derived_from": {}, "legacy": True}


def card_fingerprint(builder: Any) -> str:
    """What identifies one build of a dataset (a loaded builder or a dataset directory): the fingerprint of its card,
    which every build writes anew (its records, conditioning, upstream and time; a resumed build that ends with the
    same card keeps the old one, `write_card`). Runs that read a dataset put it in
    their settings, so a dataset prepared again at the same path is another input, not a resume of the old one."""
    from diffusets_jax.io.files import file_sha256
    from diffusets_jax.io.run_dir import fingerprint

    directory = Path(os.fspath(builder if isinstance(builder, str | os.PathLike) else builder.data_dir))
    if (directory / CARD_FILE).is_file():
        return fingerprint(read_card(builder))
    # No card (prepared before cards, or by another tool): TFDS's own record of the build, rewritten with it.
    return file_sha256(directory / "dataset_info.json")


def dataset_reference(builder: Any, split: str | None = None) -> dict[str, Any]:
    """What a model records about the dataset it was trained on: name, config, version, kind, path, split and its
    example count, and the dataset's own upstream provenance (`derived_from`)."""
    card = read_card(builder)
    reference = {"kind": card["kind"], "name": card["name"], "config": card.get("config"), "version": card["version"],
                 "path": os.path.abspath(os.fspath(builder.data_dir)), "derived_from": card.get("derived_from", {})}
    if split is not None:
        reference.update(split=split, examples=int(builder.info.splits[split].num_examples))
    return reference
