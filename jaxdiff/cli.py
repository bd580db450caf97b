"""The ``jaxdiff`` command line. Parses flags and calls the library; no logic of its own.

    jaxdiff train [--preset digits | --config FILE] [--workdir runs/digits] [--FIELD VALUE ...]
    jaxdiff train --workdir W [--steps N]    # continue W with W/config.json
    jaxdiff sample --workdir runs/digits [--sampler ddim|ddpm] [--steps 50] [--eta 0] [--num 64]
    jaxdiff bpd --workdir runs/digits [--split test] [--at-init]
    jaxdiff sample|bpd --openai-checkpoint FILE --openai-layout improved|guided --openai-flags ...
    jaxdiff eval --workdir runs/digits [--num 1000] [--sampler ddim] [--steps 50] [--metric auto]
    jaxdiff eval --real FOLDER_OR_NPZ [FOLDER_OR_NPZ] [--save-stats FILE] --inception-weights FILE
    jaxdiff export --workdir runs/digits --out model.pt [--step N] [--which ema|model]
    jaxdiff convert --config CONFIG --in model.pt --out params.msgpack [--which ema|model]
    jaxdiff convert --config CONFIG --in params.msgpack --out model.pt --to-torch

``CONFIG`` is a workdir (the network of its ``config.json``), a train preset (``digits``), a
Unet preset (``jaxdiff.models.PRESETS``), a JSON object of the reference ``Unet``'s constructor
arguments, or the path of a file holding one. A ``.npz`` state_dict works
in both directions without torch. An existing output file is never replaced without ``--force``.

``train``, ``sample`` and ``bpd`` keep XLA's compiled programs on disk (JAX's persistent
compilation cache), so a later run of the same program loads it instead of compiling it again:
``--compilation-cache DIR``, default ``$JAXDIFF_COMPILATION_CACHE``, else JAX's own
``$JAX_COMPILATION_CACHE_DIR``, else ``~/.cache/jaxdiff/xla``; ``none`` switches it off.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
from pathlib import Path

from jaxdiff import cli_evaluate, cli_weights

CACHE_ENV = "JAXDIFF_COMPILATION_CACHE"


def _compilation_cache(value: str | None) -> None:
    """Point JAX's persistent compilation cache at ``value`` (a directory, or ``none``); must
    run before the process compiles anything. An explicit directory that cannot be created
    raises a ValueError; the default one is skipped with a warning."""
    import jax

    given = value is not None
    if not given:  # the environment's choice, JAX's own setting, then ours
        value = os.environ.get(CACHE_ENV) or jax.config.jax_compilation_cache_dir
        value = value or "~/.cache/jaxdiff/xla"
    if value == "none":
        jax.config.update("jax_enable_compilation_cache", False)
        return
    path = Path(value).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK):
            raise PermissionError(f"{path} is not writable")
    except OSError as error:
        message = (
            f"cannot use {path} as the compilation cache ({error}); pass --compilation-cache "
            f"with a writable directory, or none"
        )
        if given:
            raise ValueError(message) from error
        print(f"jaxdiff: warning: {message}; compiling without it", file=sys.stderr)
        jax.config.update("jax_enable_compilation_cache", False)
        return
    jax.config.update("jax_compilation_cache_dir", str(path))


def _fail(command: str, error: Exception) -> int:
    from jaxdiff import checkpoint

    message = str(error)
    if isinstance(error, checkpoint.CorruptCheckpointError):
        if error.remaining and command == "train":
            n = max(error.remaining)
            message += (
                f"\nTo resume from step {n}, run again with --restore-step {n} (the newer "
                f"checkpoints are moved to {checkpoint.SET_ASIDE}/, not deleted)."
            )
        elif error.remaining:
            message += f"\nUse an earlier checkpoint with --step {max(error.remaining)}."
        elif command == "train":
            message += (
                "\nTo start again from scratch, run again with --restore-step 0 (it is moved "
                f"to {checkpoint.SET_ASIDE}/, not deleted)."
            )
    print(f"jaxdiff {command}: {message}", file=sys.stderr)
    return 1


def _train_config(args: argparse.Namespace):
    """The run's configuration and where it came from: ``--config FILE`` over the preset, else
    the workdir's own ``config.json`` when it has one and no ``--preset`` is given (resuming
    needs no flags), else the preset (``digits``); then every given flag on top."""
    from jaxdiff import config as cfg

    preset = args.preset or "digits"
    config = cfg.PRESETS[preset]
    source = f"preset {preset!r}"
    saved = _workdir(args) / "config.json"
    if args.config is not None:
        config = cfg.load_config_file(args.config, base=config)
        source = f"{args.config} over the {source}"
    elif args.preset is None and saved.is_file():
        config = cfg.load_config(saved.parent)
        source = str(saved)
    sections = {}
    for section in dataclasses.fields(config):
        current = getattr(config, section.name)
        changes = {
            f.name: getattr(args, f.name)
            for f in dataclasses.fields(current)
            if getattr(args, f.name, None) is not None
        }
        sections[section.name] = dataclasses.replace(current, **changes)
    config = cfg.Config(**sections)
    if args.folder is not None and args.dataset is None:
        config = dataclasses.replace(
            config, data=dataclasses.replace(config.data, dataset="folder")
        )
    return cfg.validate(config), source


def _workdir(args: argparse.Namespace) -> Path:
    return args.workdir or Path("runs") / (args.preset or "digits")


def _train(args: argparse.Namespace) -> int:
    from jaxdiff import runner

    try:
        config, source = _train_config(args)
    except ValueError as error:
        return _fail("train", error)
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        print(f"(from {source}, with the flags given)", file=sys.stderr)
        return 0
    workdir = _workdir(args)
    if source.endswith("config.json"):
        print(f"jaxdiff train: continuing {workdir} with its config.json", file=sys.stderr)
    try:
        runner.train_and_evaluate(config, workdir, restore_step=args.restore_step)
    except runner.Interrupted as stop:
        again = " ".join(shlex.quote(a) for a in ["jaxdiff", *_argv(args)])
        print(f"jaxdiff train: {stop}. Resume with: {again}", file=sys.stderr)
        return 128 + stop.signum
    except ValueError as error:
        return _fail("train", error)
    return 0


def _argv(args: argparse.Namespace) -> list[str]:
    """The command line that ran (for "resume with"), with the workdir made explicit."""
    argv, skip = [], False
    for a in args.argv:  # a --restore-step would set aside what this run saved
        if skip or a.startswith("--restore-step="):
            skip = False
            continue
        if a == "--restore-step":
            skip = True
            continue
        argv.append(a)
    if args.workdir is None:
        argv += ["--workdir", str(_workdir(args))]
    return argv


_FLAG_HELP = {
    "channels": "default: from the images (RGB when any file is in colour)",
    "tensorboard": "also write TensorBoard event files to WORKDIR/tensorboard (needs "
    "pip install 'jaxdiff[tensorboard]')",
    "test_fraction": "an image folder's share held out from training, by file name, for bpd "
    "and eval --split test (default 0: none; the digits have their own split)",
}


def _config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per field of the run's typed configuration (``--steps``, ``--dim-mults``...)."""
    from jaxdiff import config as cfg

    _CHOICES = cfg.choices()  # noqa: N806
    for section in dataclasses.fields(cfg.Config):
        group = parser.add_argument_group(f"{section.name} (overrides the preset or config)")
        for field in dataclasses.fields(section.default):
            if field.name == "folder":  # --data-dir
                continue
            flag = "--" + field.name.replace("_", "-")
            default = field.default
            if isinstance(default, bool):
                group.add_argument(
                    flag,
                    dest=field.name,
                    action=argparse.BooleanOptionalAction,
                    help=_FLAG_HELP.get(field.name),
                )
            elif isinstance(default, tuple):
                group.add_argument(
                    flag,
                    dest=field.name,
                    type=lambda v: tuple(int(x) for x in v.split(",")),
                    help="comma-separated, e.g. 1,2,2",
                )
            else:
                kind = type(default) if default is not None else float
                kind = (
                    str if "str" in str(field.type) else int if "int" in str(field.type) else kind
                )
                choices = _CHOICES.get(field.name)
                group.add_argument(
                    flag,
                    dest=field.name,
                    type=kind,
                    choices=choices,
                    help=_FLAG_HELP.get(field.name, f"default {default!r}")
                    + (f"; one of {', '.join(choices)}" if choices else ""),
                )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxdiff", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    compiles = argparse.ArgumentParser(add_help=False)
    compiles.add_argument(
        "--compilation-cache",
        metavar="DIR",
        help=f"keep compiled XLA programs here for later runs (default ${CACHE_ENV} or "
        "~/.cache/jaxdiff/xla; 'none' switches it off)",
    )

    train = commands.add_parser(
        "train",
        parents=[compiles],
        help="train a model (default: the embedded digits dataset, into runs/digits)",
        description="Train, or resume, a diffusion model. With no arguments: the digits preset "
        "(scikit-learn's handwritten digits, 16x16) into runs/digits.",
    )
    train.add_argument(
        "--preset",
        choices=sorted(_presets()),
        help="start from this preset (default: the workdir's config.json when it has one, "
        "else digits): " + "; ".join(f"{name}, {text}" for name, text in _preset_help().items()),
    )
    train.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="start from this .json or .toml file (sections model, diffusion, data, run; keys "
        "it leaves out keep the preset's values)",
    )
    train.add_argument(
        "--print-config", action="store_true", help="print the resolved configuration and exit"
    )
    train.add_argument("--workdir", type=Path, help="default: runs/<preset>")
    train.add_argument("--data-dir", dest="folder", help="train on this image folder instead")
    train.add_argument(
        "--restore-step",
        type=int,
        metavar="N",
        help="resume from checkpoint N, not the newest (the newer ones are moved to "
        "checkpoints-set-aside/, not deleted); 0 starts from scratch",
    )
    _config_flags(train)
    train.set_defaults(run=_train)
    cli_evaluate.add_commands(commands, compiles)

    export = commands.add_parser(
        "export",
        help="write a trained workdir's weights as .pt, .npz or .msgpack",
        description="Write a workdir's EMA (or online) weights: a .pt state_dict that "
        "denoising-diffusion-pytorch's Unet loads (needs torch), the same state_dict as .npz "
        "(no torch), or Flax params as .msgpack.",
    )
    export.add_argument("--workdir", type=Path, required=True)
    export.add_argument("--out", type=Path, required=True, help="FILE.pt, FILE.npz or FILE.msgpack")
    export.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    export.add_argument("--which", choices=("ema", "model"), default="ema")
    export.add_argument("--force", action="store_true", help="replace an existing output file")
    export.set_defaults(run=cli_weights.export_command)

    convert = commands.add_parser(
        "convert",
        help="PyTorch Unet weights <-> Flax params (msgpack)",
        description="Convert denoising-diffusion-pytorch Unet weights to jaxdiff Flax params "
        "(msgpack) or back (--to-torch).",
    )
    convert.add_argument(
        "--config",
        required=True,
        help="a workdir, a train preset, a Unet preset, a JSON object or .json file of Unet "
        "options",
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
    convert.set_defaults(run=cli_weights.convert_command)
    return parser


def _preset_help() -> dict[str, str]:
    from jaxdiff import config

    return {name: config.PRESET_HELP.get(name, "") for name in sorted(config.PRESETS)}


def _presets():
    from jaxdiff import runner

    return runner.PRESETS


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.command not in ("convert", "export"):
        try:
            _compilation_cache(args.compilation_cache)
        except ValueError as error:
            return _fail(args.command, error)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print(f"jaxdiff {args.command}: interrupted; nothing more was written", file=sys.stderr)
        return 130
    except OSError as error:  # e.g. a read-only or full disk outside the checkpoints
        where = f" ({error.filename})" if getattr(error, "filename", None) else ""
        print(
            f"jaxdiff {args.command}: {error.strerror or error}{where}. If the disk is full or "
            "read-only, free some space or choose another location; files already written are "
            "unchanged.",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
