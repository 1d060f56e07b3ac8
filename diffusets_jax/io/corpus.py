"""Synthetic augmentation corpora: generated ECGs as TFRecord shards in the prepared-data schema.

`tfds.builder_from_directory(out)` reads a corpus exactly like prepared real data (`data.schema`:
`heart_rate_source` is "condition", `subject_id` -1, `study_id` the ECG's position in the request), so a
downstream classifier mixes real and synthetic records with one reader. The folder also gets a dataset card.

Shard `s` always holds the same ECGs (positions `s * shard_size ...`) generated with the same noise, is written
atomically (`data.shards.write_shard`) and is skipped when it exists, so a rerun of the same command after a crash
regenerates only the shard that was in progress, from the prompt vectors the first run got (kept in
`embeddings.sqlite` when no embedding cache is given: ada-002 does not answer the same bits twice); the run's fingerprint (`io.run_dir`) refuses a rerun with other
conditions, seed, shard size or model into the same folder. On several hosts shards are dealt round-robin to
the processes, each generating its own on its devices; process 0 writes the metadata when all are done.

An ECG with NaN or inf samples (a diverged network, an overflow in low precision) is a failed generation: it is
left out of its shard, so no training run reads it, and counted. Each shard's count and skipped positions are
written beside it after it (`.shard-counts/`), with the code version that wrote it; a shard without its count is
regenerated, and the metadata gives TFDS the shards' true lengths. A corpus resumed after an upgrade lists which
shards each version wrote (`shards_by_code` in the card and the summary).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from diffusets_jax import parallel
from diffusets_jax.conditioning.requests import Condition, expand
from diffusets_jax.ecg.units import non_finite_reason
from diffusets_jax.errors import RunFailed
from diffusets_jax.io.files import read_json, remove_temporaries_in, write_json_atomic
from diffusets_jax.io.progress import progress_bar
from diffusets_jax.io.run_dir import RUN_EMBEDDINGS, check_output_path, output_dir
from diffusets_jax.provenance import code_version

CORPUS_NAME = "synthetic_ecg"
SPLIT = "train"
_COUNTS = ".shard-counts"  # per shard: {"examples": written, "skipped": {position: reason}}
_LISTED = 10  # skipped ECGs named in the summary; every one is in .shard-counts/


def _counts_path(out: Path, shard: int) -> Path:
    return out / _COUNTS / f"shard-{shard:05d}.json"


def shard_size_in_batches(shard_size: int, batch_size: int) -> int:
    """The ECGs a shard holds: `shard_size` rounded up to whole batches, so a shard's ECGs are always the same
    batches, with the same noise (batch b's draws are keyed by b), whichever shards a rerun regenerates."""
    return batch_size * -(-shard_size // batch_size)


def write_corpus(generator: Any, conditions: Sequence[Condition], out_dir: str | os.PathLike, *,
                 shard_size: int = 1024, overwrite: bool = False, progress: bool = True,
                 provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Generate `expand(conditions)` into TFRecord shards of `shard_size` ECGs (rounded up to whole batches)."""
    from diffusets_jax.data.card import write_card
    from diffusets_jax.data.schema import ecg_features
    from diffusets_jax.data.shards import example_serializer, shard_filename, write_shard, write_tfds_metadata

    out = check_output_path(out_dir)
    if shard_size < 1:
        raise ValueError(f"--shard-size must be a positive number of ECGs, got {shard_size}")
    items = expand(conditions)
    batch = generator.batch_size
    shard_size = shard_size_in_batches(shard_size, batch)
    num_shards = max(1, -(-len(items) // shard_size))
    requested = [min(len(items), (s + 1) * shard_size) - s * shard_size for s in range(num_shards)]
    settings = {**generator.settings(), "shard_size": shard_size,
                "conditions": [{**c.as_dict(generator.conditioning.prompt_style), "count": c.count} for c in conditions],
                "provenance": provenance or {}}
    features = ecg_features(generator.unet.text_dim)
    serialize = example_serializer(features)
    with output_dir(out, command="sample --corpus", settings=settings, overwrite=overwrite,
                    reads=generator.reads()) as run:
        paths = [run.path / shard_filename(CORPUS_NAME, SPLIT, s, num_shards) for s in range(num_shards)]
        todo = [s for s in range(num_shards) if not (paths[s].exists() and _counts_path(run.path, s).exists())]
        # What no host holds yet: on a disk of its own each host sees only its shards, and the union of what each
        # lacks (as this was) made a resumed corpus regenerate every shard. `_gather_counts` reads any host's.
        todo = sorted(set.intersection(*map(set, parallel.allgather_objects(todo))))
        mine = [todo[i] for i in parallel.process_share(len(todo))]
        # The prompts of every shard still to write, each distinct one embedded and kept once (the same on every
        # host): a corpus of millions of ECGs holds its few prompt vectors, not one per ECG.
        per_shard = shard_size // batch
        # Kept in the folder (without --embedding-cache), so that a shard regenerated later, after a crash or a
        # loss, is made from the vectors the others were: an API does not answer the same bits twice.
        table, row = generator.prompt_embeddings(conditions, [s * per_shard + b for s in todo for b in range(per_shard)],
                                                 run_cache=run.path / RUN_EMBEDDINGS)
        bar = progress_bar(sum(requested[s] for s in mine), desc="corpus", unit="ECG", disable=not progress)
        # Each host writes its shards on its own; one that fails (its disk full) stops every host here, where the
        # others would wait for it at the next collective. Also the barrier before anyone looks at the shards.
        with parallel.failing_together():
            (run.path / _COUNTS).mkdir(exist_ok=True)
            for shard in mine:
                skipped: dict[str, str] = {}
                lo, hi = shard * shard_size, min(len(items), (shard + 1) * shard_size)
                examples = _shard_examples(generator, items, lo, hi, table, row, serialize, skipped, bar)
                written, _ = write_shard(paths[shard], examples)
                write_json_atomic(_counts_path(run.path, shard),
                                  {"examples": written, "skipped": skipped, "code": code_version()})
            bar.close()
        # Every host has finished writing, so a temporary shard or count file left now is a killed run's (ours: the
        # shard writer names it after its shard, in this claimed folder); its shard was written again above. Only
        # those, named after this corpus's shards and counts: the metadata, card and run record beside them are
        # process 0's alone to write (after `_gather_counts`), never another host's to remove mid-write. One
        # listing per folder on every host; on a shared disk whichever host comes first removes them.
        remove_temporaries_in(run.path, [path.name for path in paths])
        remove_temporaries_in(run.path / _COUNTS, [_counts_path(run.path, s).name for s in range(num_shards)])
        counts = _gather_counts(run.path, num_shards)
        lengths = [counts[s]["examples"] for s in range(num_shards)]  # what the shards hold, failed ECGs left out
        unusable = {int(position): why for s in range(num_shards) for position, why in counts[s]["skipped"].items()}
        mixed = _shards_by_code(counts)
        if jax.process_index() == 0:
            write_tfds_metadata(run.path, CORPUS_NAME, features, {SPLIT: lengths},
                                description=f"Synthetic ECGs generated by diffusets-jax from {generator.model_dir}")
            write_card(run.path, kind="corpus", name=CORPUS_NAME, config=None, version="1.0.0",
                       conditioning=generator.conditioning, splits={SPLIT: sum(lengths)},
                       derived_from={"model_dir": os.path.abspath(generator.model_dir),
                                     "components": settings["components"], "provenance": provenance or {}},
                       requested=len(items), skipped_ecgs=len(unusable), **mixed)
            run.mark_complete(examples=sum(lengths), shards=num_shards, skipped_ecgs=len(unusable), **mixed)
    return {"examples": sum(lengths), "requested": len(items), "shards": num_shards, "written": len(todo),
            "skipped": num_shards - len(todo), "skipped_ecgs": len(unusable),
            "skipped_examples": dict(sorted(unusable.items())[:_LISTED]), **mixed}


def _shards_by_code(counts: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """`{"shards_by_code": [{"code", "shards"}, ...]}` when the shards were written by more than one code version
    (a run resumed after an upgrade, `io.run_dir`), so a user can tell them apart or regenerate some; else `{}`.
    A count without a code predates this record: its version is unknown (None)."""
    groups: dict[str, dict[str, Any]] = {}
    for shard in sorted(counts):
        code = counts[shard].get("code")
        key = json.dumps(code, sort_keys=True)
        groups.setdefault(key, {"code": code, "shards": []})["shards"].append(shard)
    return {"shards_by_code": list(groups.values())} if len(groups) > 1 else {}


def _shard_examples(generator: Any, items: Sequence[Condition], lo: int, hi: int, table: np.ndarray,
                    row: np.ndarray, serialize: Callable[[dict[str, Any]], bytes], skipped: dict[str, str],
                    bar: Any) -> Iterator[bytes]:
    """The serialized examples of requests `items[lo:hi]` (one shard), generated a batch at a time; a failed
    generation (NaN or inf samples) goes into `skipped` (position -> why) instead. `table[row[i]]`: request i's
    prompt embedding."""
    batch = generator.batch_size
    starts = range(lo, hi, batch)
    rows = {start: slice(start, min(hi, start + batch)) for start in starts}  # each batch's requests
    jobs = ((generator.condition_arrays(items[rows[start]], table[row[rows[start]]]), start // batch)
            for start in starts)
    for start, ecgs in zip(starts, generator.generate_batches(jobs), strict=True):  # the next batch computes meanwhile
        chunk, vectors = items[rows[start]], table[row[rows[start]]]
        for offset, (condition, ecg) in enumerate(zip(chunk, ecgs, strict=True)):
            if reason := non_finite_reason(ecg):
                skipped[str(start + offset)] = reason
                continue
            yield serialize({
                "ecg": ecg, "report_lines": list(condition.report), "prompt": generator.prompt(condition),
                "text_embedding": vectors[offset], "sex": condition.sex, "age": condition.age,
                "heart_rate": condition.heart_rate, "heart_rate_source": "condition",
                "subject_id": -1, "study_id": start + offset, "record_path": "",
            })
        bar.update(len(chunk))


def _gather_counts(out: Path, num_shards: int) -> dict[int, dict[str, Any]]:
    """Every shard's count record, from whichever host's disk holds it (all of them on a shared disk)."""
    visible = {s: read_json(_counts_path(out, s), "corpus shard count") for s in range(num_shards)
               if _counts_path(out, s).exists()}
    counts = {int(s): c for host in parallel.allgather_objects(visible) for s, c in host.items()}  # JSON: str keys
    missing = sorted(set(range(num_shards)) - set(counts))
    if missing:
        raise RunFailed(f"{out}: no host holds the count of shard(s) {missing[:5]} after writing them; rerun the "
                        "same command to regenerate them")
    return counts

