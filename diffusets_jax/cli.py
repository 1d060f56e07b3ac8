"""The `diffusets-jax` command: parse arguments and call the library; no logic of its own.

Each subcommand is registered by one `_add_<name>` function below (parser + handler). Handlers import
their library modules lazily so `diffusets-jax --help` stays fast and TensorFlow is only loaded by the
commands that read or write TFRecords.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

Handler = Callable[[argparse.Namespace], int | None]


# Subcommand registrations, in the order a user meets them. Each takes the subparsers object.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def _add_encode(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "encode",
        help="encode a prepared dataset with a trained VAE into a latent dataset for diffusion training",
        description=(
            "Run the VAE encoder once over every example of a prepared dataset and write TFRecord shards of "
            "(latent_mean, latent_logvar) (128, 4) with the conditions (text_embedding, sex, age, heart_rate, "
            "prompt, subject_id, study_id). The output directory is a TFDS dataset that diffusion training reads "
            "instead of re-encoding ECGs every step. Shards are written atomically and listed in "
            "latent_index.json: rerunning the same command after a crash skips the finished shards. Records "
            "whose ECG or latent is not finite are skipped and counted."
        ),
    )
    parser.add_argument("--vae", required=True, metavar="DIR", help="trained or converted VAE directory (models.bundle)")
    parser.add_argument("--data-dir", required=True, metavar="DIR", help="TFDS data_dir the dataset was prepared into")
    parser.add_argument("--dataset", required=True, metavar="NAME", help="prepared dataset name, e.g. mimic_iv_ecg")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory of the latent dataset")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="examples per encoder call, a multiple of the local device count (default: 256)")
    parser.add_argument("--examples-per-shard", type=int, default=8192,
                        help="source examples per output shard, the unit of resumption (default: 8192)")
    parser.add_argument("--splits", nargs="+", metavar="SPLIT",
                        help="splits to encode (default: train validation test, those the dataset has)")

    def handler(args: argparse.Namespace) -> int:
        from diffusets_jax.data import latents

        apply_fn, variables = latents.load_vae_encoder(args.vae)
        index = latents.encode_dataset(
            args.dataset, args.out, apply_fn, variables, data_dir=args.data_dir, splits=args.splits,
            batch_size=args.batch_size, examples_per_shard=args.examples_per_shard,
            vae=os.path.abspath(args.vae), progress=True)
        for split, entry in index["splits"].items():
            written = sum(s["num_examples"] for s in entry["shards"])
            skipped = sum(s["skipped"] for s in entry["shards"])
            print(f"{split}: {written} latents in {len(entry['shards'])} shards, {skipped} bad records skipped")
        print(f"latent dataset: {args.out} (read it with fields=pipeline.LATENT_FIELDS)")
        return 0

    parser.set_defaults(func=handler)


COMMANDS.append(_add_encode)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffusets-jax",
        description=(
            "DiffuSETS in JAX: generate 10-second 12-lead ECGs from clinical text reports plus sex, "
            "age and heart rate. Commands: prepare data, embed reports, train, sample, evaluate, "
            "convert the published PyTorch checkpoints, run the demo."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in COMMANDS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:  # bad input: one clear line naming it, no traceback
        print(f"diffusets-jax {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
