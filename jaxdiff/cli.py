"""The ``jaxdiff`` command line. Parses flags and calls the library; no logic of its own.

    jaxdiff convert --config CONFIG --in model.pt --out params.msgpack [--which ema|model]
    jaxdiff convert --config CONFIG --in params.msgpack --out model.pt --to-torch

``CONFIG`` is a preset name (``jaxdiff.models.PRESETS``), a JSON object of the reference
``Unet``'s constructor arguments, or the path of a file holding one. A ``.npz`` state_dict works
in both directions without torch. An existing output file is never replaced without ``--force``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _config(value: str):
    path = Path(value)
    if path.suffix == ".json" and path.is_file():
        return json.loads(path.read_text())
    return value


def _convert(args: argparse.Namespace) -> int:
    from jaxdiff import convert
    from jaxdiff.models import unet_from_config

    if args.dst.exists() and not args.force:
        print(f"jaxdiff convert: {args.dst} exists; pass --force to replace it", file=sys.stderr)
        return 1
    try:
        config = unet_from_config(_config(args.config))
        if args.to_torch:
            variables = convert.load_flax_params(args.src, config)
            save = (
                convert.save_state_dict_npz
                if args.dst.suffix == ".npz"
                else convert.save_torch_checkpoint
            )
            save(variables, args.dst, config, overwrite=args.force)
        else:
            state = convert.load_state_dict_file(args.src, which=args.which, prefix=args.prefix)
            variables = convert.torch_state_dict_to_flax(state, config)
            convert.save_flax_params(variables, args.dst, overwrite=args.force)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"jaxdiff convert: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxdiff", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser(
        "convert",
        help="PyTorch Unet weights <-> Flax params (msgpack)",
        description="Convert denoising-diffusion-pytorch Unet weights to jaxdiff Flax params "
        "(msgpack) or back (--to-torch).",
    )
    convert.add_argument(
        "--config", required=True, help="preset name, JSON object or .json file of Unet options"
    )
    convert.add_argument(
        "--in",
        dest="src",
        type=Path,
        required=True,
        help=".pt or .npz (or .msgpack with --to-torch)",
    )
    convert.add_argument(
        "--out",
        dest="dst",
        type=Path,
        required=True,
        help=".msgpack (or .pt / .npz with --to-torch)",
    )
    convert.add_argument(
        "--to-torch", action="store_true", help="Flax msgpack -> PyTorch state_dict"
    )
    convert.add_argument(
        "--which",
        choices=("ema", "model"),
        default="ema",
        help="from a Trainer or EMA checkpoint: the EMA weights (default) or the online model",
    )
    convert.add_argument("--prefix", help="take the Unet keys under this prefix (overrides)")
    convert.add_argument("--force", action="store_true", help="replace an existing output file")
    convert.set_defaults(run=_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
