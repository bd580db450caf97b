"""The evaluation commands of ``jaxdiff``: ``sample`` (images from a workdir or an openai
checkpoint), ``bpd`` (bits/dim) and ``eval`` (the digits metric, FID). Parsing only; the work
is :mod:`jaxdiff.evaluation`'s (and :mod:`jaxdiff.cli_openai`'s for openai checkpoints)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jaxdiff import cli_openai


def _fail(command: str, error: Exception) -> int:
    from jaxdiff.cli import _fail as fail

    return fail(command, error)


def _labels_of(args: argparse.Namespace, num_classes: int | None):
    """``--class N|all``: (labels or None, grid columns, number of images, name suffix)."""
    import numpy as np

    if args.label is None:
        return None, None, args.num, ""
    if args.label == "all" and num_classes is not None:
        per = args.num if args.num != 64 else 8
        return np.repeat(np.arange(num_classes), per), per, num_classes * per, "_classes"
    try:
        label = int(args.label)
    except ValueError:
        raise ValueError(f"--class takes a class number or all, got {args.label!r}") from None
    return np.full(args.num, label), None, args.num, f"_class{label}"


def _sample(args: argparse.Namespace) -> int:
    import numpy as np

    from jaxdiff import config as cfg
    from jaxdiff import evaluation
    from jaxdiff import workdir as wd

    try:
        cli_openai.check_source(args)
        openai = args.openai_checkpoint is not None
        if openai:  # image_sample.py: DDPM over the flags' respacing, the .npz keys it writes
            source, flags_respacing, classifier = cli_openai.for_sampling(args)
            config, sampler = source.config, args.sampler or "ddpm"
            extra = dict(classifier=classifier, classifier_scale=args.classifier_scale,
                         npz_keys=("arr_0", "arr_1"))  # fmt: skip
        else:
            source, flags_respacing, classifier = args.workdir, None, None
            config, sampler = cfg.load_config(args.workdir), args.sampler or "ddim"
            extra = dict(step=args.step)
        respacing = args.respacing
        if respacing is None and args.steps is None and sampler not in wd.SOLVERS:
            respacing = flags_respacing
        steps = wd.resolve_steps(config, sampler, args.steps)
        name = wd.sampler_name(config, sampler, steps, respacing, args.grid)
        k = config.model.num_classes or (classifier.num_classes if classifier else None)
        labels, cols, num, suffix = _labels_of(args, k)
        if openai and labels is None and k is not None:  # the scripts draw them at random
            labels = np.arange(num) % k
        name += suffix
        if args.guidance_scale is not None:
            name += f"_w{args.guidance_scale:g}"
        if classifier is not None:
            name += f"_classifier{args.classifier_scale:g}"
        out = args.out or (
            Path("samples") / f"{args.openai_checkpoint.stem}_{name}_seed{args.seed}"
            if openai
            else Path(args.workdir) / "samples" / f"{name}_seed{args.seed}"
        )
        evaluation.sample_images(
            source,
            out,
            num=num,
            sampler=sampler,
            steps=steps,
            eta=args.eta,
            seed=args.seed,
            overwrite=args.force,
            labels=labels,
            guidance_scale=args.guidance_scale,
            rescaled_phi=args.rescaled_phi,
            respacing=respacing,
            var_type=args.var_type,
            cols=cols,
            grid=args.grid,
            show_progress=not args.quiet,
            batch_size=args.batch_size,
            **extra,
        )
    except (ValueError, FileNotFoundError) as error:
        return _fail("sample", error)
    print(f"wrote {Path(out).with_suffix('.png')} and {Path(out).with_suffix('.npz')}")
    return 0


def _bpd(args: argparse.Namespace) -> int:
    from jaxdiff import evaluation

    try:
        cli_openai.check_source(args)
        if args.openai_checkpoint is not None:
            result = cli_openai.bpd(args)
        else:
            if args.folder is not None:
                raise ValueError(
                    "--data-dir goes with --openai-checkpoint; a workdir is evaluated on its "
                    "own data (--split)"
                )
            result = evaluation.evaluate_bpd(
                args.workdir,
                split=args.split,
                batch_size=args.batch_size,
                seed=args.seed,
                step=args.step,
                at_init=args.at_init,
                tails=args.tails,
                var_type=args.var_type,
                log=None if args.quiet else lambda m: print(m, file=sys.stderr, flush=True),
                num=args.num,
            )
    except (ValueError, FileNotFoundError) as error:
        return _fail("bpd", error)
    print(json.dumps(result))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from jaxdiff import evaluation, features

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        if args.workdir is None:
            return _eval_real(args, evaluation, features)
        if args.real and len(args.real) > 1:
            raise ValueError("with --workdir, --real takes one folder or statistics file")
        result = evaluation.evaluate(
            args.workdir,
            num=args.num,
            sampler=args.sampler or "ddim",
            steps=args.steps,
            eta=args.eta,
            seed=args.seed,
            batch_size=args.batch_size,
            step=args.step,
            metric=args.metric,
            inception_weights=args.inception_weights,
            real=args.real[0] if args.real else None,
            at_init=args.at_init,
            bpd=args.bpd,
            respacing=args.respacing,
            var_type=args.var_type,
            guidance_scale=args.guidance_scale,
            rescaled_phi=args.rescaled_phi,
            log=log if not args.quiet else None,
            grid=args.grid,
        )
    except ValueError as error:
        return _fail("eval", error)
    print(evaluation.format_table(result), file=sys.stderr)
    print(json.dumps(result))
    return 0


def _eval_real(args: argparse.Namespace, evaluation, features) -> int:
    """``--real A [B]``: statistics of A (saved with --save-stats), or the metrics of A against
    B, as pytorch-fid's command does."""
    if not args.real:
        raise ValueError("give --workdir W (a trained run) or --real FOLDER [FOLDER]")
    if len(args.real) > 2:
        raise ValueError(f"--real takes one or two folders or .npz files, got {len(args.real)}")
    metric = "fid" if args.metric == "auto" else args.metric
    if metric not in ("fid", "digits"):
        raise ValueError(f"--real compares with one metric: 'fid' or 'digits', not {metric!r}")
    if args.save_stats and args.save_stats.exists() and not args.force:
        raise ValueError(f"{str(args.save_stats)!r} exists; pass --force to replace it")
    extractor = (
        features.inception_extractor(args.inception_weights)
        if metric == "fid"
        else features.digits_extractor()
    )
    stats = [evaluation.real_statistics(p, extractor, args.batch_size) for p in args.real]
    if args.save_stats:
        features.save_statistics(stats[0], args.save_stats)
        print(f"wrote {args.save_stats} ({stats[0].count} images)", file=sys.stderr)
    if len(stats) == 2:
        print(json.dumps({extractor.name: features.quality(stats[0], stats[1])}))
    elif not args.save_stats:
        raise ValueError("with one --real, pass --save-stats FILE (or a second --real to compare)")
    return 0


_VAR_HELP = (
    "the model's own variance by default; a fixed-variance model may use fixed_small or fixed_large"
)


def _sampling_flags(parser: argparse.ArgumentParser) -> None:
    from jaxdiff.config import SAMPLER_GRIDS, SAMPLERS

    parser.add_argument(
        "--sampler",
        choices=SAMPLERS,
        help="ddim (default; ddpm for an openai checkpoint, as image_sample.py), ddpm, or a "
        "fast solver: DPM-Solver++ (dpmpp-*), UniPC (unipc-*), "
        "k-diffusion's Karras samplers (euler, euler-a, heun, dpm2, lms)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        help="default 50 for DDIM, T for DDPM (fewer: the chain respaced to N steps), 20 for a "
        "fast solver (heun and dpm2 call the network twice per step)",
    )
    parser.add_argument(
        "--grid",
        choices=SAMPLER_GRIDS,
        help="a fast solver's grid: timestep spacing or noise levels (default linspace for "
        "DPM-Solver and UniPC, karras for the Karras samplers)",
    )
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM's eta")
    parser.add_argument(
        "--respacing",
        help="improved-diffusion's timestep_respacing, e.g. ddim50 or 250 or 10,15,20",
    )
    parser.add_argument("--var-type", help=_VAR_HELP)
    parser.add_argument(
        "--guidance-scale",
        type=float,
        help="classifier-free guidance of a class-conditional model (1: conditional, no guidance)",
    )
    parser.add_argument(
        "--rescaled-phi", type=float, default=0.0, help="guidance rescaling phi in [0, 1]"
    )


def add_commands(commands, compiles: argparse.ArgumentParser) -> None:
    """The ``sample``, ``bpd`` and ``eval`` sub-commands."""
    sample = commands.add_parser(
        "sample", parents=[compiles], help="sample images from a trained workdir"
    )
    sample.add_argument("--workdir", type=Path, help="a jaxdiff run (or --openai-checkpoint)")
    _sampling_flags(sample)
    cli_openai.add_model_flags(sample, classifier=True)
    sample.add_argument(
        "--batch-size", type=int, help="images sampled at a time (default: all at once)"
    )
    sample.add_argument(
        "--num", type=int, default=64, help="images (with --class all: per class, default 8)"
    )
    sample.add_argument(
        "--class",
        dest="label",
        metavar="N|all",
        help="the class of a class-conditional model (all: one row per class)",
    )
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    sample.add_argument("--out", type=Path, help="output path without suffix (.png and .npz)")
    sample.add_argument("--force", action="store_true", help="replace existing output files")
    sample.add_argument("--quiet", action="store_true", help="no progress (stderr)")
    sample.set_defaults(run=_sample)

    bpd = commands.add_parser(
        "bpd", parents=[compiles], help="bits/dim of a trained workdir on its test split"
    )
    bpd.add_argument("--workdir", type=Path, help="a jaxdiff run (or --openai-checkpoint)")
    cli_openai.add_model_flags(bpd, classifier=False)
    bpd.add_argument(
        "--data-dir",
        dest="folder",
        type=Path,
        help="an openai checkpoint's images (image_nll.py's --data_dir; class from the file "
        "name's prefix before _ for a class-conditional model)",
    )
    bpd.add_argument(
        "--split",
        choices=("test", "train", "all"),
        default="test",
        help="test: the digits' held-out images, or a folder's (--test-fraction at training)",
    )
    bpd.add_argument("--batch-size", type=int, default=256)
    bpd.add_argument("--num", type=int, help="only the first N images of the split (default: all)")
    bpd.add_argument("--seed", type=int, default=0)
    bpd.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    bpd.add_argument("--at-init", action="store_true", help="evaluate the untrained network")
    bpd.add_argument("--quiet", action="store_true", help="no progress lines (stderr)")
    bpd.add_argument("--var-type", help=_VAR_HELP)
    bpd.add_argument(
        "--tails",
        choices=("exact", "reference"),
        default="exact",
        help="decoder tail probabilities: exact (default) or the references' float32 arithmetic",
    )
    bpd.set_defaults(run=_bpd)

    ev = commands.add_parser(
        "eval",
        parents=[compiles],
        help="sample-quality metrics of a trained workdir (digits metric, FID), or of folders",
        description="Sample N images from a workdir's EMA weights and measure them: the digits "
        "metric on digits (Fréchet distance of the shipped classifier's features, its "
        "classifier score, precision/recall; no download), FID when Inception weights are "
        "given. Prints a table and JSON; results go to <workdir>/eval/results.json. With --real "
        "and no workdir: the statistics of a folder (--save-stats) or the FID of two folders.",
    )
    ev.add_argument("--workdir", type=Path)
    ev.add_argument("--num", type=int, default=1000, help="samples to draw (default 1000)")
    _sampling_flags(ev)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--batch-size", type=int, default=250)
    ev.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    ev.add_argument(
        "--metric",
        choices=("auto", "digits", "fid", "all"),
        default="auto",
        help="auto: the digits metric on digits, FID elsewhere; all: both",
    )
    ev.add_argument(
        "--inception-weights",
        metavar="FILE",
        help="FID's Inception weights (.pth or .npz; default $JAXDIFF_INCEPTION_WEIGHTS)",
    )
    ev.add_argument(
        "--real",
        nargs="+",
        metavar="PATH",
        help="image folder or statistics .npz: the reference of a workdir's samples, or (without "
        "--workdir) the sets to compare",
    )
    ev.add_argument("--save-stats", type=Path, metavar="FILE", help="write --real's statistics")
    ev.add_argument("--at-init", action="store_true", help="evaluate the untrained network")
    ev.add_argument("--bpd", action="store_true", help="also the test bits/dim (slow)")
    ev.add_argument("--quiet", action="store_true", help="no progress lines")
    ev.add_argument("--force", action="store_true", help="replace an existing --save-stats file")
    ev.set_defaults(run=_eval)
