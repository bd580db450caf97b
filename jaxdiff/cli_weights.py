"""The weight commands of ``jaxdiff``: ``export`` (a trained workdir's weights as a PyTorch
state_dict, an ``.npz`` or Flax msgpack) and ``convert`` (between a reference state_dict and
Flax params). Parsing lives in :mod:`jaxdiff.cli`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _config(value: str):
    """``convert --config``: a workdir (its config.json's network), a train preset, a Unet
    preset, a JSON object or a .json file of the reference Unet's arguments."""
    from jaxdiff import config as cfg
    from jaxdiff import workdir as wd

    path = Path(value)
    if path.is_dir():
        return wd.build_model(cfg.load_config(path))
    if value in cfg.PRESETS:
        return wd.build_model(cfg.PRESETS[value])
    if path.suffix == ".json" and path.is_file():
        return json.loads(path.read_text())
    return value


EXPORT_FORMATS = {
    ".pt": "a torch state_dict",
    ".npz": "the same state_dict as .npz",
    ".msgpack": "Flax params",
}


def export_command(args: argparse.Namespace) -> int:
    from jaxdiff import convert
    from jaxdiff import workdir as wd

    out = args.out
    if out.suffix not in EXPORT_FORMATS:
        formats = ", ".join(f"{k} ({v})" for k, v in EXPORT_FORMATS.items())
        print(f"jaxdiff export: {out} has no known suffix; use one of {formats}", file=sys.stderr)
        return 1
    if out.exists() and not args.force:
        print(f"jaxdiff export: {out} exists; pass --force to replace it", file=sys.stderr)
        return 1
    try:
        _, model, state = wd.restored(args.workdir, args.step, finite=args.which == "ema")
        variables = state.ema_params if args.which == "ema" else state.params
        openai = isinstance(model, wd.LabelledUNetModel)
        if out.suffix == ".msgpack":
            convert.save_flax_params(variables, out, overwrite=args.force)
        elif openai:
            _save_openai(variables, out, model.net, args.force)
        else:
            save = (
                convert.save_torch_checkpoint
                if out.suffix == ".pt"
                else convert.save_state_dict_npz
            )
            save(variables, out, model, overwrite=args.force)
    except (ValueError, FileExistsError) as error:
        from jaxdiff.cli import _fail

        return _fail("export", error)
    if openai and out.suffix != ".msgpack":
        kwargs = json.dumps({k: v for k, v in model.net.config().items() if k != "layout"})
        print(
            f"wrote {out}: the {args.which} weights of step {int(state.step)}; guided-diffusion's "
            f"UNetModel(**{kwargs}) loads it"
        )
        return 0
    # the reference Unet's arguments that differ from its defaults (dim, num_classes required)
    required = {k: getattr(model, k) for k in ("dim", "num_classes") if hasattr(model, k)}
    defaults = type(model)(**required).config()
    kwargs = json.dumps(
        {k: v for k, v in model.config().items() if k in required or v != defaults[k]}
    )
    where = "classifier_free_guidance." if "num_classes" in required else ""
    print(
        f"wrote {out}: the {args.which} weights of step {int(state.step)}; "
        f"denoising-diffusion-pytorch's {where}Unet(**{kwargs}) loads it"
        if out.suffix != ".msgpack"
        else f"wrote {out}: the {args.which} weights of step {int(state.step)} (Flax params)"
    )
    return 0


def _save_openai(variables, out: Path, net, overwrite: bool) -> None:
    """An openai UNetModel's weights as the state_dict its repositories load (.pt or .npz)."""
    import numpy as np

    from jaxdiff import convert, convert_openai

    state = convert_openai.params_to_openai_state_dict(variables, net)
    if out.suffix == ".pt":
        convert_openai.save_openai_pt(out, state, overwrite=overwrite)
    else:
        convert._write_atomic(out, overwrite, lambda f: np.savez(f, **state))


def convert_command(args: argparse.Namespace) -> int:
    from jaxdiff import convert

    if args.dst.exists() and not args.force:
        print(f"jaxdiff convert: {args.dst} exists; pass --force to replace it", file=sys.stderr)
        return 1
    try:
        config = convert.network_from_config(_config(args.config))
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
