"""``jaxdiff sample`` and ``jaxdiff bpd`` on openai's checkpoints (improved-diffusion,
guided-diffusion), as their ``image_sample.py``, ``classifier_sample.py`` and ``image_nll.py``:

    jaxdiff sample --openai-checkpoint 64x64_diffusion.pt --openai-layout guided \\
        --openai-flags "--image_size 64 --class_cond True --learn_sigma True ..." \\
        [--classifier-checkpoint 64x64_classifier.pt --classifier-flags "..." \\
         --classifier-scale 1.0] [--sampler ddpm|ddim|...] [--num 16] [--batch-size 4]
    jaxdiff bpd --openai-checkpoint FILE --openai-layout improved --openai-flags "..." \\
        --data-dir IMAGES [--num 1000]

Parsing lives in :mod:`jaxdiff.cli`; the loading in :mod:`jaxdiff.pretrained`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

LAYOUT_HELP = (
    "whose script_util defaults fill in the flags left out: improved (improved-diffusion; "
    "rescale_timesteps True) or guided (guided-diffusion)"
)


def add_model_flags(parser: argparse.ArgumentParser, *, classifier: bool) -> None:
    group = parser.add_argument_group(
        "an openai checkpoint (improved-diffusion or guided-diffusion) in place of --workdir"
    )
    group.add_argument(
        "--openai-checkpoint",
        type=Path,
        metavar="FILE",
        help="the model's state_dict as the scripts save it (.pt, needs torch) or as .npz",
    )
    group.add_argument(
        "--openai-flags",
        default="",
        metavar="FLAGS",
        help='its script_util flags in one string, e.g. "--image_size 64 --num_channels 128 '
        '--learn_sigma True --diffusion_steps 4000 --noise_schedule cosine" (a single flag: '
        '--openai-flags="--image_size=32")',
    )
    group.add_argument("--openai-layout", choices=("improved", "guided"), help=LAYOUT_HELP)
    if not classifier:
        return
    group.add_argument(
        "--classifier-checkpoint",
        type=Path,
        metavar="FILE",
        help="guided-diffusion's noisy classifier: guide sampling towards the classes",
    )
    group.add_argument(
        "--classifier-flags",
        default="",
        metavar="FLAGS",
        help='its flags, e.g. "--image_size 64 --classifier_depth 4 --classifier_width 128"',
    )
    group.add_argument(
        "--classifier-scale",
        "--classifier_scale",
        type=float,
        default=1.0,
        help="classifier guidance scale (classifier_sample.py's --classifier_scale; default 1)",
    )


def check_source(args: argparse.Namespace) -> None:
    """Exactly one of --workdir and --openai-checkpoint, and the options each one takes."""
    openai = args.openai_checkpoint is not None
    if openai == (args.workdir is not None):
        raise ValueError("give --workdir DIR (a jaxdiff run) or --openai-checkpoint FILE")
    if not openai:
        extra = [f for f in ("classifier_checkpoint",) if getattr(args, f, None) is not None]
        if args.openai_flags or args.openai_layout or extra:
            raise ValueError(
                "--openai-flags, --openai-layout and --classifier-checkpoint go with "
                "--openai-checkpoint, not --workdir"
            )
        return
    if args.openai_layout is None:
        raise ValueError(
            "--openai-checkpoint needs --openai-layout improved or guided: the repository the "
            "checkpoint comes from (their flags' defaults differ)"
        )
    given = [
        flag
        for flag, value in (("--step", args.step), ("--at-init", getattr(args, "at_init", None)))
        if value
    ]
    if given:
        raise ValueError(f"{' and '.join(given)} apply to a workdir's checkpoints")


def _load(args: argparse.Namespace, data_dir=None):
    from jaxdiff import pretrained

    return pretrained.load_model(
        args.openai_checkpoint, args.openai_flags, layout=args.openai_layout, data_dir=data_dir
    )


def for_sampling(args: argparse.Namespace):
    """``jaxdiff sample --openai-checkpoint``: the loaded network, the flags'
    ``--timestep_respacing`` (None for the whole chain) and the classifier (or None)."""
    from jaxdiff import pretrained

    loaded, diffusion = _load(args)
    classifier = None
    if args.classifier_checkpoint is not None:
        classifier = pretrained.load_classifier(args.classifier_checkpoint, args.classifier_flags)
    elif args.classifier_flags:
        raise ValueError("--classifier-flags needs --classifier-checkpoint")
    return loaded, diffusion.respacing, classifier


def bpd(args: argparse.Namespace) -> dict:
    """``jaxdiff bpd --openai-checkpoint --data-dir``: image_nll.py's bits/dim."""
    from jaxdiff import data, evaluation, pretrained

    if args.folder is None:
        raise ValueError("--openai-checkpoint needs --data-dir: the image folder to evaluate")
    loaded, diffusion = _load(args, args.folder)
    folder = data.ImageFolder(args.folder, loaded.config.data.image_size, channels=3)
    if loaded.config.model.num_classes is not None:  # the class is the name's prefix
        folder.labels = pretrained.file_name_labels(folder.files)
    return evaluation.evaluate_bpd(
        loaded,
        split="all",
        dataset=folder,
        respacing=diffusion.respacing,
        batch_size=args.batch_size,
        seed=args.seed,
        tails=args.tails,
        var_type=args.var_type,
        log=None if args.quiet else lambda m: print(m, file=sys.stderr, flush=True),
        num=args.num,
    )
