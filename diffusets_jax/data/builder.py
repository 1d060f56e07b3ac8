"""The TFDS builder every ECG source in `data_prep/` derives from: splits, embeddings, parallel decoding, report.

A source builder only lists its records (`list_candidates`: paths + metadata from the source's tables). This
base then, for `tfds build` or `diffusets-jax prepare`:

1. assigns each record to train / validation / test (patient-disjoint: a stable hash of the subject id, or
   the source's own folds); the published all-data recipe reads TFDS's `split="all"`, the union of the three
   (TFDS reserves the name `all`, so no duplicate copy is written);
2. builds every prompt, embeds each distinct prompt once through the conditioning cache;
3. decodes records in parallel worker processes (or in Apache Beam when `--beam_pipeline_options` is given),
   chunk by chunk, each finished chunk stored atomically in a decode cache beside the downloads: TFDS always
   rewrites an interrupted build's TFRecords from scratch (it writes into an `incomplete.*` folder renamed at
   the end), but a rerun reuses every decoded chunk, so only the cheap serialisation is repeated;
4. skips and counts bad records, writes `prepare_report.json` beside the dataset and prints a summary.

Source tables (`read_table`) follow the same rule: a row that cannot be used (bytes that are not UTF-8, a
malformed CSV line, an id that is not an integer) is skipped and counted as `bad_table_row` with its file and
line; only a table that is unusable as a whole (missing, not CSV, a needed column absent) stops the build, with
one line naming the file and what is missing. The dataset card records the manual dir and a fingerprint of its
record list, metadata and record files' size and modification time (`records_fingerprint`), so `prepare` can tell
a complete dataset built from another download, or from records changed since, from this one's.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import hashlib
import math
import os
import sys
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from unittest import mock

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import example_serializer as tfds_example_serializer

from diffusets_jax.conditioning.prompts import PROMPT_STYLES, make_prompt
from diffusets_jax.conditioning.spec import ConditioningSpec, EmbedderSpec
from diffusets_jax.data import records as records_lib
from diffusets_jax.data.card import write_card
from diffusets_jax.data.records import ChunkResult, DecodeOptions, RecordCandidate
from diffusets_jax.data.schema import ecg_features
from diffusets_jax.data.shards import DeterministicExampleSerializer
from diffusets_jax.io.files import write_json_atomic
from diffusets_jax.io.progress import progress_bar
from diffusets_jax.io.tables import LINE_COLUMN, read_csv_table
from diffusets_jax.worker_processes import WorkerProcesses, usable_cores

SPLITS: tuple[str, ...] = ("train", "validation", "test")
REPORT_FILENAME = "prepare_report.json"
EXAMPLES_PER_REASON_IN_REPORT = 10
_DECODER_DIED = ("a process decoding records died (killed, or out of memory?); rerun the same command to resume from "
                 "the decoded chunks, with fewer --workers if memory ran out")
EMBEDDING_DIMS: dict[str, int] = {"local": 384, "openai": 1536}  # MiniLM-L6; text-embedding-ada-002
# Skip reason of a source-table row that cannot be used at all (beside records.SKIP_REASONS, which need a record).
BAD_TABLE_ROW = "bad_table_row"


class LocalDatasetInfo(tfds.core.DatasetInfo):
    """`tfds.core.DatasetInfo` of a dataset built from the user's own download, which is never in TFDS's bucket.

    TFDS constructs a builder whose dataset is not prepared yet by calling `initialize_from_bucket`, which makes
    a temporary folder before it even looks in gs://tfds-data and never removes it (tensorflow-datasets 4.9.10:
    one empty `tmp*tfds` folder in the user's temporary directory for every `prepare`). Our datasets are built
    only from local files, so there is nothing to look up.
    """

    def initialize_from_bucket(self) -> None:
        return None


@dataclasses.dataclass(eq=False, kw_only=True)
class EcgBuilderConfig(tfds.core.BuilderConfig):
    """Options of one prepared variant of a source.

    - `embedder` / `embedder_options`: `diffusets_jax.conditioning.embedders.make_embedder(embedder, **options)`;
      "local" (MiniLM, 384-d; tests and demo) or "openai" (ada-002, 1536-d; the faithful recipe).
    - `embedding_dim`: the embedder's output size (the `text_embedding` feature's shape).
    - `split_fractions`: train / validation / test fractions of subjects (subject-hash splits).
    - `split_by`: "subject_hash" or "strat_fold" (PTB-XL's folds: 1-8 train, 9 validation, 10 test).
    - `prompt_style`: "ordered" (the MIMIC ordered prompt) or "free_text" (the paper's PTB-XL template), see
      `conditioning.prompts.make_prompt`.
    - `decode`: DecodeOptions (length, duration tolerance, flat-lead threshold).

    How a build runs (workers, chunk size, embedding cache file) does not change the dataset, so it is given
    to the builder (`Builder(config=..., workers=..., chunk_size=..., embedding_cache_path=...)`), not here.
    """

    embedder: str = "local"
    embedder_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    embedding_dim: int = EMBEDDING_DIMS["local"]
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    split_by: str = "subject_hash"
    prompt_style: str = "ordered"
    decode: DecodeOptions = dataclasses.field(default_factory=DecodeOptions)

    def __post_init__(self) -> None:
        if len(self.split_fractions) != 3 or any(f < 0 for f in self.split_fractions) or not math.isclose(
            sum(self.split_fractions), 1.0, abs_tol=1e-6
        ):
            raise ValueError(f"split_fractions must be 3 non-negative numbers summing to 1, got {self.split_fractions}")
        if self.split_by not in ("subject_hash", "strat_fold"):
            raise ValueError(f"split_by must be 'subject_hash' or 'strat_fold', got {self.split_by!r}")
        if self.prompt_style not in PROMPT_STYLES:
            raise ValueError(f"prompt_style must be one of {PROMPT_STYLES}, got {self.prompt_style!r}")


def embedder_configs(description: str, name_suffix: str = "", **overrides: Any) -> list[EcgBuilderConfig]:
    """The two standard configs of a source: "local" (MiniLM, default) and "openai" (ada-002, faithful)."""
    return [
        EcgBuilderConfig(name="local" + name_suffix, description=f"{description} Text embeddings: local MiniLM-L6 (384-d).",
                         embedder="local", embedding_dim=EMBEDDING_DIMS["local"], **overrides),
        EcgBuilderConfig(name="openai" + name_suffix, description=f"{description} Text embeddings: OpenAI text-embedding-ada-002 (1536-d), as published.",
                         embedder="openai", embedding_dim=EMBEDDING_DIMS["openai"], **overrides),
    ]


def subject_split(subject_id: int, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> str:
    """Stable, patient-disjoint split of a subject: SHA-256 of its id mapped to [0, 1) against `fractions`.

    Independent of record order, machine and Python's hash seed, so every record of a subject lands in the
    same split in every build, and adding records never moves existing subjects.
    """
    digest = hashlib.sha256(f"diffusets-subject:{int(subject_id)}".encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2.0**64
    cumulative = 0.0
    for split, fraction in zip(SPLITS, fractions, strict=True):
        cumulative += fraction
        if position < cumulative:
            return split
    return SPLITS[-1]


def strat_fold_split(fold: int | None) -> str:
    """PTB-XL's recommended split: folds 1-8 train, 9 validation, 10 test (the reference's test set)."""
    if fold is None:
        raise ValueError("record has no strat_fold; use split_by='subject_hash'")
    return "test" if fold == 10 else "validation" if fold == 9 else "train"


def stable_int_id(text: str) -> int:
    """A positive int64 id from a name, for sources without numeric subject/study ids (Challenge records)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


@dataclasses.dataclass
class _Chunk:
    split: str
    index: int
    candidates: list[RecordCandidate]
    cache_path: str


class EcgDatasetBuilder(tfds.core.GeneratorBasedBuilder):
    """Base of the ECG source builders; subclasses set VERSION, BUILDER_CONFIGS, MANUAL_DOWNLOAD_INSTRUCTIONS,
    `_description`/`_homepage`/`_citation` and implement `list_candidates`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release: whole 10 s at 1024 samples, standard lead order, mV."}
    _description = ""
    _homepage = ""
    _citation = ""

    def __init__(
        self,
        *,
        workers: int | None = None,
        chunk_size: int = 0,
        embedding_cache_path: str | None = None,
        embedder: Any = None,
        **kwargs: Any,
    ) -> None:
        """`workers`: decoding processes (None = all CPU cores, 0 = decode in this process); `chunk_size`:
        records per decode chunk (0 = automatic), the unit of work an interrupted build reuses;
        `embedding_cache_path`: the conditioning cache file (default DATA_DIR/embedding_cache/<embedder>.sqlite);
        `embedder`: an already constructed embedder to use instead of `make_embedder(config.embedder,
        **config.embedder_options)` (e.g. one loaded model shared by several builds); it must give
        `config.embedding_dim`-d vectors. Other arguments go to tfds.core.GeneratorBasedBuilder."""
        if workers is not None and int(workers) < 0:
            raise ValueError(f"--workers must be 0 (decode in this process) or a number of processes, got {workers}")
        if int(chunk_size) < 0:
            raise ValueError(f"--chunk-size must be a positive number of records, got {chunk_size}")
        super().__init__(**kwargs)
        self._workers = workers
        self._chunk_size = int(chunk_size)
        self._listed: tuple[str, list[RecordCandidate], list[tuple]] | None = None
        self._fingerprints: dict[str, str] = {}  # of the listing in `_listed`: see `records_fingerprint`
        self._table_skips: list[dict[str, str]] = []
        self._embedding_cache_path = embedding_cache_path
        self._embedder = embedder

    @abc.abstractmethod
    def list_candidates(self, manual_dir: str) -> list[RecordCandidate]:
        """Every record of the source with its metadata; unusable metadata stays None (counted later)."""

    def candidates(self, manual_dir: str) -> list[RecordCandidate]:
        """`list_candidates(manual_dir)`, read once per builder (prepare fingerprints them before building)."""
        return self._listing(manual_dir)[0]

    def _listing(self, manual_dir: str) -> tuple[list[RecordCandidate], list[tuple]]:
        """The candidates and their files' `records.file_stamps`, both taken once, at listing time: a file changed
        later is then never taken for the one stamped (a chunk's stamps are at least as old as what it decoded)."""
        key = os.path.abspath(os.fspath(manual_dir))  # TFDS hands the same folder over as another string
        if self._listed is None or self._listed[0] != key:
            self._table_skips = []
            candidates = self._one_per_record(self.list_candidates(os.fspath(manual_dir)))
            if not candidates:  # refused here, before prepare creates anything; on an empty folder TFDS itself
                # would stop with a bare AssertionError ("Manual directory ... does not exist or is empty")
                empty = " (the folder is empty)" if os.path.isdir(key) and not os.listdir(key) else ""
                raise FileNotFoundError(f"{self.name}: no records listed under {manual_dir}{empty}.\n"
                                        f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
            self._listed = (key, candidates, records_lib.file_stamps(key, candidates))
            self._fingerprints = {}
        return self._listed[1], self._listed[2]

    def _one_per_record(self, candidates: list[RecordCandidate]) -> list[RecordCandidate]:
        """The first listing of each record: a table that lists one twice (a repeated row, a merged export) would
        give TFDS two examples with one key, which ends the build in its AssertionError after all the decoding."""
        seen: set[str] = set()
        unique = []
        for candidate in candidates:
            if candidate.record_path in seen:
                self._table_skips.append({"record_path": candidate.record_path,
                                          "detail": "listed again; the first listing is used"})
                continue
            seen.add(candidate.record_path)
            unique.append(candidate)
        return unique

    def records_fingerprint(self, manual_dir: str) -> dict[str, Any]:
        """What the dataset is built from: the manual dir, its record count and a fingerprint of every record's
        path, metadata and files (size and modification time) and of the decode options
        (`records.chunk_fingerprint` over blocks of records)."""
        candidates, stamps = self._listing(manual_dir)
        # Hashed once per listing, which is taken once: a pass over every record (tens of seconds at MIMIC-IV-ECG's
        # 800k) that prepare's check and the card it writes at the end used to make each.
        if "records" not in self._fingerprints:
            self._fingerprints["records"] = records_lib.listing_fingerprint(candidates, self.builder_config.decode,
                                                                            stamps)
        return {"manual_dir": os.path.abspath(manual_dir), "records": len(candidates),
                "records_fingerprint": self._fingerprints["records"]}

    def legacy_records_fingerprint(self, manual_dir: str) -> str:
        """`records_fingerprint`'s value as a dataset card recorded it until 2026-12-06, without the files' sizes
        and times (`records.legacy_listing_fingerprint`): how a dataset prepared before is recognised. Once per
        listing, as `records_fingerprint`."""
        candidates, _ = self._listing(manual_dir)
        if "legacy" not in self._fingerprints:
            self._fingerprints["legacy"] = records_lib.legacy_listing_fingerprint(candidates,
                                                                                  self.builder_config.decode)
        return self._fingerprints["legacy"]

    def read_table(self, path: str, *, what: str, required: Sequence[str], optional: Sequence[str] = (),
                   integers: Sequence[str] = ()) -> Any:  # noqa: ANN401 (a pandas DataFrame)
        """One of the source's CSV tables (plain or .gz) as a DataFrame of strings (empty cells NaN), `integers`
        columns as int64, and `_line`, each row's line in the file.

        Unusable as a whole (missing, a directory, not CSV text, a `required` column absent): one line naming the
        file and what to do. Rows that are not UTF-8, malformed CSV lines, and rows whose `integers` columns do
        not hold an integer are skipped and counted as `bad_table_row` in the build report.
        """
        import pandas as pd

        table = read_csv_table(path, what=what, skip=lambda line, why: self._skip_row(path, line, why))
        missing = [column for column in required if column not in table.columns]
        if missing:
            header = [str(c) for c in table.columns if c != LINE_COLUMN]
            raise ValueError(f"{path}: no column {', '.join(repr(c) for c in missing)} (it has "
                             f"{', '.join(header[:12])}{' ...' if len(header) > 12 else ''}): is it the {what}?")
        table = table[[c for c in (*required, *optional, LINE_COLUMN) if c in table.columns]].copy()
        bad = pd.Series(False, index=table.index)
        for column in integers:
            values = pd.to_numeric(table[column], errors="coerce")
            wrong = values.isna() | (values != values.round())
            for line, value in zip(table.loc[wrong & ~bad, LINE_COLUMN], table.loc[wrong & ~bad, column], strict=True):
                self._skip_row(path, line, f"no {column}" if pd.isna(value) else f"{column} {value!r} is not an integer")
            bad |= wrong
            table[column] = values
        table = table[~bad].copy()
        for column in integers:
            table[column] = table[column].astype("int64")
        return table

    def _skip_row(self, path: str, line: int | str, why: str) -> None:
        where = f"{path} line {line}" if isinstance(line, int | np.integer) else f"{path} {line}"
        self._table_skips.append({"record_path": where,
                                  "detail": why})

    # ---- TFDS hooks --------------------------------------------------------------------------------------

    def _info(self) -> tfds.core.DatasetInfo:
        # What `dataset_info_from_configs` does (the source folder's README.md and CITATIONS.bib win), into a
        # LocalDatasetInfo.
        metadata = self.get_metadata()
        return LocalDatasetInfo(
            builder=self,
            description=metadata.description or self._description,
            features=ecg_features(self.builder_config.embedding_dim),
            homepage=self._homepage or None,
            citation=metadata.citation or self._citation or None,
        )

    def _download_and_prepare(self, dl_manager, download_config) -> None:  # noqa: ANN001 (TFDS types)
        self._use_beam = download_config.beam_runner is not None or download_config.beam_options is not None
        self._chunks: list[_Chunk] = []
        self._embedding_summary: dict[str, Any] = {}
        # TFDS's split writers serialize through `example_serializer.ExampleSerializer`, in a protobuf map order
        # that changes from process to process: two builds of the same records wrote different bytes. For this
        # build only, they make the deterministic one, as encode and corpora use.
        with mock.patch.object(tfds_example_serializer, "ExampleSerializer", DeterministicExampleSerializer):
            super()._download_and_prepare(dl_manager, download_config)
        report = self._build_report()
        write_json_atomic(os.path.join(os.fspath(self.data_dir), REPORT_FILENAME), report)
        config = self.builder_config
        embedder = EmbedderSpec.from_embedder_config(config.embedder, config.embedder_options, config.embedding_dim,
                                                     self._embedding_summary.get("embedder_id", ""))
        write_card(self.data_dir, kind="prepared", name=self.name, config=config.name, version=str(self.version),
                   conditioning=ConditioningSpec(embedder, prompt_style=config.prompt_style),
                   splits={split: n for split, n in report["examples_per_split"].items() if n},
                   derived_from=self.records_fingerprint(os.fspath(download_config.manual_dir or "")),
                   records_skipped=report["records_skipped"])
        print(format_report_summary(self.name, report), file=sys.stderr)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):  # noqa: ANN201
        config = self.builder_config
        manual_dir = os.fspath(dl_manager.manual_dir)
        candidates, stamps = self._listing(manual_dir)
        stamp_of = dict(zip((c.record_path for c in candidates), stamps, strict=True))
        self._embeddings = self._embed(candidates, dl_manager)
        by_split: dict[str, list[RecordCandidate]] = {split: [] for split in SPLITS}
        for candidate in candidates:
            by_split[self._split_of(candidate)].append(candidate)
        cache_root = os.path.join(
            os.fspath(dl_manager.download_dir), "decode_cache", f"{self.name}-{self.version}"
        )
        chunk_size = self._chunk_size or auto_chunk_size(len(candidates))
        for split, split_candidates in by_split.items():
            for start in range(0, len(split_candidates), chunk_size):
                members = split_candidates[start : start + chunk_size]
                path = os.path.join(cache_root, records_lib.chunk_cache_name(
                    split, start // chunk_size, members, config.decode, [stamp_of[c.record_path] for c in members]))
                self._chunks.append(_Chunk(split, start // chunk_size, members, path))
        # A chunk file cut short (a killed writer, a full disk) is no zip archive: it is decoded again, not reused.
        self._chunks_cached_before = {chunk.cache_path for chunk in self._chunks
                                      if os.path.exists(chunk.cache_path) and zipfile.is_zipfile(chunk.cache_path)}
        splits = [split for split in SPLITS if by_split[split]]
        if not self._use_beam:
            # Decode everything up front (in parallel, into the cache): TFDS cannot write a split that yields no
            # example, and only decoding tells which splits keep any record.
            usable = self._decode_locally(manual_dir)
            splits = [split for split in splits if usable[split]]
        return {
            split: self._generate_examples(manual_dir, [c for c in self._chunks if c.split == split])
            for split in splits
        }

    def _generate_examples(self, manual_dir: str, chunks: list[_Chunk]):  # noqa: ANN201
        tasks = [(manual_dir, chunk.candidates, self.builder_config.decode, chunk.cache_path) for chunk in chunks]
        embeddings, style = self._embeddings, self.builder_config.prompt_style
        if self._use_beam:
            beam = tfds.core.lazy_imports.apache_beam

            def decode_to_examples(task):  # noqa: ANN001, ANN202
                return chunk_examples(task[1], records_lib.decode_chunk_task(task), embeddings, style)

            return beam.Create(tasks) | beam.FlatMap(decode_to_examples)
        return self._generate_from_cache(tasks, embeddings, style)

    # ---- helpers -----------------------------------------------------------------------------------------

    def _decode_locally(self, manual_dir: str) -> collections.Counter[str]:
        """Decode every chunk not already in the cache, in `workers` worker processes; usable records per split."""
        decode = self.builder_config.decode
        tasks = [(manual_dir, c.candidates, decode, c.cache_path) for c in self._chunks]
        usable: collections.Counter[str] = collections.Counter()
        bar = progress_bar(sum(len(c.candidates) for c in self._chunks), unit=" records", desc="Decoding records")
        # Fresh interpreters (`worker_processes`), not forks: TensorFlow's threads are running here. One chunk is
        # decoded here.
        with WorkerProcesses(min(self._worker_count(), len(tasks) if len(tasks) > 1 else 0), died=_DECODER_DIED) as pool:
            try:
                for chunk, count in zip(self._chunks, pool.map(records_lib.decode_chunk_to_cache, tasks), strict=True):
                    usable[chunk.split] += count
                    bar.update(len(chunk.candidates))
            finally:
                bar.close()
        return usable

    def _generate_from_cache(self, tasks, embeddings, style) -> Iterator[tuple[str, dict]]:  # noqa: ANN001
        for task in tasks:  # every chunk is in the decode cache by now: this only loads it
            yield from chunk_examples(task[1], records_lib.decode_chunk_task(task), embeddings, style)

    def _worker_count(self) -> int:
        workers = self._workers
        return usable_cores() if workers is None else max(0, int(workers))  # a scheduler's allocation, not the machine

    def _split_of(self, candidate: RecordCandidate) -> str:
        if self.builder_config.split_by == "strat_fold":
            return strat_fold_split(candidate.strat_fold)
        return subject_split(candidate.subject_id, self.builder_config.split_fractions)

    def embedder(self) -> Any:  # noqa: ANN401 (an Embedder)
        """The embedder of this config, made once: the one given to the builder, else
        `make_embedder(config.embedder, **config.embedder_options)`; refused when its vectors do not fit."""
        from diffusets_jax.conditioning.embedders import make_embedder

        if self._embedder is None:
            config = self.builder_config
            options = dict(config.embedder_options)
            if config.embedder == "openai":  # a missing key's message names this builder's way round it
                options.setdefault("key_hint", "To keep reports on this machine, build the local config instead "
                                               "(--config local: MiniLM, 384-d).")
            self._embedder = make_embedder(config.embedder, **options)
        if self._embedder.dim != self.builder_config.embedding_dim:
            config = self.builder_config
            raise ValueError(
                f"builder config {config.name!r}: embedder {config.embedder!r} gives {self._embedder.dim}-d vectors "
                f"but embedding_dim is {config.embedding_dim}; set embedding_dim={self._embedder.dim}"
            )
        return self._embedder

    def embedding_cache_path(self, download_dir: str | None = None) -> str:
        """The conditioning cache file: the one given to the builder, else
        DATA_DIR/embedding_cache/<embedder>.sqlite (beside TFDS's `download_dir`, DATA_DIR/downloads by default)."""
        if self._embedding_cache_path:
            return self._embedding_cache_path
        download_dir = download_dir or os.path.join(os.fspath(self.data_dir_root), "downloads")  # TFDS's default
        return os.path.join(os.path.dirname(download_dir), "embedding_cache", f"{self.builder_config.embedder}.sqlite")

    def check_embedding(self) -> None:
        """Make the embedder (an OpenAI key is looked for) and check the embedding cache file, creating nothing:
        `prepare` calls this before it creates any folder, so such bad input leaves nothing behind."""
        from diffusets_jax.conditioning.cache import check_embedding_cache

        self.embedder()
        check_embedding_cache(self.embedding_cache_path(), "--embedding-cache")

    def _embed(self, candidates: Sequence[RecordCandidate], dl_manager) -> dict[str, np.ndarray]:  # noqa: ANN001
        """Embed each distinct prompt of the records that have a report once, through the conditioning cache."""
        from diffusets_jax.conditioning.cache import EmbeddingCache, EmbeddingRunStats, embed_with_cache

        config = self.builder_config
        prompts = sorted({make_prompt(c.report_lines, config.prompt_style) for c in candidates if c.report_lines})
        embedder = self.embedder()
        cache_path = self.embedding_cache_path(os.fspath(dl_manager.download_dir))
        stats = EmbeddingRunStats()
        with EmbeddingCache(cache_path, flag="--embedding-cache") as cache:
            vectors = np.asarray(embed_with_cache(prompts, embedder, cache, progress=True, stats=stats), dtype=np.float32)
        self._embedding_summary = {
            "embedder_id": embedder.embedder_id, "cache": cache_path, "distinct_prompts": len(prompts),
            "from_cache": stats.cached, "embedded_now": stats.embedded,
        }
        return dict(zip(prompts, vectors, strict=True))

    def _build_report(self) -> dict[str, Any]:
        """Counts per skip reason (with the first record paths), per split and per heart-rate source."""
        skipped: collections.Counter[str] = collections.Counter()
        examples_of: dict[str, list[dict[str, str]]] = collections.defaultdict(list)
        written: collections.Counter[str] = collections.Counter()
        sources: collections.Counter[str] = collections.Counter()
        detected_records: list[dict[str, Any]] = []  # heart rate from QRS detection (machine RR unusable)
        flat_lead_records: list[dict[str, str]] = []
        flat_lead_count = 0
        derived_records: list[dict[str, str]] = []
        derived_count = 0
        reused = decoded = 0
        for chunk in self._chunks:
            result = records_lib._load_chunk(chunk.cache_path, ecg=False)  # noqa: SLF001 (same package)
            if result is None:
                raise RuntimeError(f"decode cache {chunk.cache_path} is missing after the build")
            if chunk.cache_path in self._chunks_cached_before:
                reused += 1
            else:
                decoded += 1
            for candidate, reason, detail in zip(chunk.candidates, result.skip_reason, result.skip_detail, strict=True):
                if reason:
                    skipped[str(reason)] += 1
                    if len(examples_of[str(reason)]) < EXAMPLES_PER_REASON_IN_REPORT:
                        examples_of[str(reason)].append({"record_path": candidate.record_path, "detail": str(detail)})
            written[chunk.split] += len(result.ok_index)
            for position, flat in zip(result.ok_index, result.flat_leads, strict=True):
                if flat:
                    flat_lead_count += 1
                    if len(flat_lead_records) < EXAMPLES_PER_REASON_IN_REPORT:
                        flat_lead_records.append({"record_path": chunk.candidates[int(position)].record_path, "leads": str(flat)})
            for position, derived in zip(result.ok_index, result.derived_leads, strict=True):
                if derived:
                    derived_count += 1
                    if len(derived_records) < EXAMPLES_PER_REASON_IN_REPORT:
                        derived_records.append({"record_path": chunk.candidates[int(position)].record_path,
                                                "leads": str(derived)})
            for position, source, lead in zip(result.ok_index, result.heart_rate_source, result.heart_rate_lead, strict=True):
                sources[str(source)] += 1
                if source != "rr":
                    detected_records.append({"record_path": chunk.candidates[int(position)].record_path, "lead": int(lead)})
        for row in self._table_skips:  # source-table rows that never became a record
            skipped[BAD_TABLE_ROW] += 1
            if len(examples_of[BAD_TABLE_ROW]) < EXAMPLES_PER_REASON_IN_REPORT:
                examples_of[BAD_TABLE_ROW].append(row)
        listed = sum(len(chunk.candidates) for chunk in self._chunks)
        return {
            "dataset": self.name, "config": self.builder_config.name, "version": str(self.version),
            "records_listed": listed, "examples_written": sum(written.values()),
            "records_skipped": sum(skipped.values()),
            "skipped_by_reason": dict(sorted(skipped.items())),
            "skipped_examples": {reason: examples_of[reason] for reason in sorted(examples_of)},
            "examples_per_split": {split: written[split] for split in SPLITS},
            "heart_rate_sources": dict(sorted(sources.items())),
            "detected_heart_rate_records": detected_records[:100],
            # Written despite flat leads (DecodeOptions.flat_leads == "keep", the reference's behaviour).
            "written_with_flat_leads": {"count": flat_lead_count, "examples": flat_lead_records},
            # 8-lead records (I, II, V1-V6) whose other limb leads were computed from I and II (exact).
            "written_with_derived_leads": {"count": derived_count, "examples": derived_records},
            "embedding": self._embedding_summary,
            "decode_chunks": {"total": len(self._chunks), "reused": reused, "decoded": decoded},
        }


def auto_chunk_size(n_records: int) -> int:
    """Records per decode chunk: about 64 chunks for small sources, 512 records each for large ones.

    Depends on the record count only, never on the worker count, so a rerun with other `workers` still
    finds the chunks an interrupted build finished.
    """
    return int(min(512, max(4, math.ceil(n_records / 64))))


def chunk_examples(
    candidates: Sequence[RecordCandidate], result: ChunkResult, embeddings: Mapping[str, np.ndarray], style: str
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(key, example) for every usable record of a decoded chunk, in the schema of `ecg_features`."""
    for row, position in enumerate(result.ok_index):
        candidate = candidates[int(position)]
        prompt = make_prompt(candidate.report_lines, style)
        yield candidate.record_path, {
            "ecg": result.ecg[row],
            "report_lines": list(candidate.report_lines),
            "prompt": prompt,
            "text_embedding": embeddings[prompt],
            "sex": int(candidate.sex),  # type: ignore[arg-type]
            "age": float(candidate.age),  # type: ignore[arg-type]
            "heart_rate": float(result.heart_rate[row]),
            "heart_rate_source": str(result.heart_rate_source[row]),
            "subject_id": int(candidate.subject_id),
            "study_id": int(candidate.study_id),
            "record_path": candidate.record_path,
        }


def format_report_summary(name: str, report: Mapping[str, Any]) -> str:
    """A few human lines: written per split, skipped per reason, heart-rate sources."""
    # `records_skipped` counts the source-table rows that never became a record too: said apart, so that written and
    # skipped add up to the records listed ("4 written from 11 records; 8 skipped" read as a record gone missing).
    table_rows = report["skipped_by_reason"].get(BAD_TABLE_ROW, 0)
    lines = [
        f"{name}: {report['examples_written']} examples written from {report['records_listed']} records "
        f"({', '.join(f'{s} {n}' for s, n in report['examples_per_split'].items())}); "
        f"{report['records_skipped'] - table_rows} skipped"
        + (f", and {table_rows} unusable source-table row{'s' if table_rows != 1 else ''}" if table_rows else "")
    ]
    for reason, count in report["skipped_by_reason"].items():
        first = report["skipped_examples"][reason][0]["record_path"]
        lines.append(f"  skipped {count:>7} {reason:<24} e.g. {first}")
    flat = report["written_with_flat_leads"]
    if flat["count"]:
        lines.append(f"  written with flat leads: {flat['count']} e.g. {flat['examples'][0]['record_path']} ({flat['examples'][0]['leads']})")
    derived = report.get("written_with_derived_leads", {"count": 0})
    if derived["count"]:
        lines.append(f"  written with limb leads derived from I and II: {derived['count']} e.g. "
                     f"{derived['examples'][0]['record_path']} ({derived['examples'][0]['leads']})")
    lines.append("  heart rate: " + ", ".join(f"{s} {n}" for s, n in report["heart_rate_sources"].items()))
    chunks = report["decode_chunks"]
    lines.append(f"  decode chunks: {chunks['decoded']} decoded, {chunks['reused']} reused from an earlier run")
    return "\n".join(lines)
