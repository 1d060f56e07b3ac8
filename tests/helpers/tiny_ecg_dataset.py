"""A small TFDS dataset in the prepared schema, for tests of the input pipeline and the latent dataset.

Synthetic but schema-exact: each example's ECG is a lead-scaled sine at its heart rate, and sample
`ecg[0, 0]` carries the example's index so tests can tell which examples a batch holds even when they
read only the `ecg` field. One training ECG holds a NaN so batch jobs' skip-and-count paths are exercised. Splits come in several shard files so file-order shuffling is exercised.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from diffusets_jax.conditioning.spec import ConditioningSpec, EmbedderSpec
from diffusets_jax.data.builder import LocalDatasetInfo
from diffusets_jax.data.card import write_card
from diffusets_jax.data.schema import ecg_features
from diffusets_jax.ecg.shapes import ECG_LENGTH, NUM_LEADS

EMBEDDING_DIM = 8
NAN_ECG_INDEX = 9  # this example's ECG has a NaN sample, like a record with a lead dropout
SPLIT_SIZES = {"train": 53, "validation": 13, "test": 11}
SPLIT_OFFSETS = {"train": 0, "validation": 1000, "test": 2000}


def example(index: int) -> dict:
    heart_rate = 50.0 + (index * 7) % 60
    t = np.arange(ECG_LENGTH, dtype=np.float32) / 102.4
    leads = np.linspace(0.2, 1.2, NUM_LEADS, dtype=np.float32)
    ecg = (np.sin(2 * np.pi * heart_rate / 60.0 * t)[:, None] * leads[None, :]).astype(np.float32)
    ecg[0, 0] = index
    if index == NAN_ECG_INDEX:
        ecg[500, 3] = np.nan
    return {
        "ecg": ecg,
        "report_lines": ["Sinus rhythm", f"record {index}"],
        "prompt": f"Sinus rhythm|record {index}",
        "text_embedding": np.full((EMBEDDING_DIM,), index / 100.0, np.float32),
        "sex": index % 2,
        "age": 40.0 + index % 50,
        "heart_rate": heart_rate,
        "heart_rate_source": "rr",
        "subject_id": 10_000 + index // 3,
        "study_id": index,
        "record_path": f"files/p{index}/s{index}",
    }


class SyntheticSplits:
    """The body of a tiny synthetic TFDS builder (mixed in before `tfds.core.GeneratorBasedBuilder`, so it is not
    registered itself): splits of `SPLIT_SIZES` examples made by `make_example(index)`, ids offset per split."""

    VERSION = tfds.core.Version("1.0.0")
    EMBEDDING_DIM: int
    SPLIT_SIZES: dict[str, int]
    SPLIT_OFFSETS: dict[str, int]

    @staticmethod
    def make_example(index: int) -> dict:
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        # LocalDatasetInfo: TFDS's own would leave an empty temporary folder for every build (builder.py says why).
        return LocalDatasetInfo(builder=self, features=ecg_features(self.EMBEDDING_DIM))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in self.SPLIT_SIZES}

    def _generate_examples(self, split):
        for i in range(self.SPLIT_SIZES[split]):
            index = self.SPLIT_OFFSETS[split] + i
            yield index, self.make_example(index)


class TinyEcg(SyntheticSplits, tfds.core.GeneratorBasedBuilder):
    """`tiny_ecg`: train/validation/test with SPLIT_SIZES examples, ids offset per split."""

    EMBEDDING_DIM, SPLIT_SIZES, SPLIT_OFFSETS = EMBEDDING_DIM, SPLIT_SIZES, SPLIT_OFFSETS
    make_example = staticmethod(example)


def build(data_dir: str, num_shards: int = 4) -> TinyEcg:
    """Prepare the dataset under `data_dir` and write its card, as `diffusets-jax prepare` does: its "embeddings"
    are recorded as an OpenAI-compatible `fake-embedding-8` (tests serve it with tests.helpers.fake_openai_server)."""
    builder = TinyEcg(data_dir=data_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=num_shards))
    embedder = EmbedderSpec("openai", f"fake-embedding-{EMBEDDING_DIM}", EMBEDDING_DIM)
    write_card(builder.data_dir, kind="prepared", name="tiny_ecg", config=None, version=str(builder.version),
               conditioning=ConditioningSpec(embedder, "ordered"), splits=SPLIT_SIZES)
    return builder
