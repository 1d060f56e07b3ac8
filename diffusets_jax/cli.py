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


def _add_convert(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "convert",
        help="convert the published PyTorch checkpoints into diffusets-jax models",
        description=(
            "Convert the published DiffuSETS PyTorch checkpoints (vae_model.pth, unet_all.pth, clip_model.pth) "
            "into diffusets-jax model directories OUT/vae, OUT/unet, OUT/clip (config.json + Orbax variables), "
            "the format `sample`, `evaluate` and `train` load. Each file may also be a .npz or .safetensors dump "
            "of the same state dict, which needs no PyTorch. Converted models take and return ECGs in the "
            "standard lead order (I, II, III, aVR, aVL, aVF, V1-V6)."
        ),
    )
    parser.add_argument("--vae", metavar="FILE", help="VAE checkpoint (vae_model.pth: {'encoder', 'decoder'} state dicts)")
    parser.add_argument("--unet", metavar="FILE", help="U-Net checkpoint (unet_all.pth)")
    parser.add_argument("--clip", metavar="FILE", help="CLIP checkpoint (clip_model.pth), the metrics' feature extractor")
    parser.add_argument("--out", required=True, metavar="DIR", help="directory to write the converted models into")
    parser.set_defaults(func=_convert)


def _convert(args: argparse.Namespace) -> int:
    import jax

    from diffusets_jax import convert
    from diffusets_jax.models.bundle import save_model

    jobs = [(name, path) for name, path in (("vae", args.vae), ("unet", args.unet), ("clip", args.clip)) if path]
    if not jobs:
        raise ValueError("nothing to convert: give at least one of --vae, --unet, --clip")
    for name, path in jobs:  # fail before writing anything
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--{name} {path!r} does not exist")
    for name, path in jobs:
        # The U-Net converter is looked up by name so this command works before/without it.
        converter = getattr(convert, f"{name}_from_torch", None)
        if converter is None:
            raise ValueError(f"this installation has no {name} converter (diffusets_jax.convert.{name}_from_torch)")
        module, variables = converter(convert.load_state_dict(path))
        written = save_model(args.out, name, module, variables)
        count = sum(int(getattr(leaf, "size", 1)) for leaf in jax.tree.leaves(variables["params"]))
        print(f"{name}: {path} -> {written} ({type(module).__name__}, {count:,} parameters)")
    return 0


COMMANDS.append(_add_convert)


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
