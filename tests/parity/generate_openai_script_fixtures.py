"""Generate ``fixtures/openai_script.npz``: what openai's ``script_util`` builds from the scripts'
flags (improved-diffusion 1bc7bbb, guided-diffusion 22e0df8), for
``tests/parity/test_openai_script_parity.py`` (``jaxdiff.openai_script``).

Every flag line is parsed as the scripts parse it (``add_dict_to_argparser`` on the defaults,
``argparse``, ``args_to_dict``), then given to the reference's ``create_model_and_diffusion`` or
``create_classifier_and_diffusion``. Two kinds of cases:

* published configurations (the READMEs' flag lines): the parsed options, the network's
  state_dict keys and shapes (built on torch's ``meta`` device: no weights), and the process:
  its betas, mean / variance / loss types, ``rescale_timesteps`` and the times its wrapped
  model passes the network at every step, for the flags as given and with a sampling
  respacing (``timestep_respacing``: its betas, ``timestep_map`` and times);
* small configurations: the network with every parameter redrawn by a counter-based rule (see
  ``redraw``: the values follow from the parameter's name and the element's index, so the test
  rebuilds the same state_dict with NumPy alone and the file stays small; a CRC-32 of each
  array is stored to prove it), then on fixed inputs at a few respaced steps
  ``diffusion.p_mean_variance(net, x, t, clip_denoised=True, model_kwargs=...)`` (mean,
  variance, log_variance, pred_xstart) and what the wrapped model passed the network (its
  time and its output); for the classifier, its logits at the times the wrapped classifier gets.

Also recorded: the three defaults dicts, ``str2bool`` on a list of spellings, and flag lines the
references refuse (with their error). This script never imports jaxdiff; only ``script_util``
of each package (with ``gaussian_diffusion``, ``respace``, ``unet`` and their ``nn``,
``losses``, ``fp16_util``, ``logger``) is imported: no blobfile, no mpi4py, no stand-in.

Regenerate (from the repository root; see PROVENANCE.md):

    /work/ref/torchenv/bin/python tests/parity/generate_openai_script_fixtures.py \\
        --improved-diffusion /work/ref --guided-diffusion /work/ref/guided

The seed derivation and the deterministic .npz writer are those of ``generate_fixtures.py``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import shlex
import sys
import zlib
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "fixtures"


def _load(name: str, filename: str):
    spec = importlib.util.spec_from_file_location(name, HERE / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The seed rule and the deterministic .npz writer; the generators' shared command line.
gf = _load("jaxdiff_parity_generate_fixtures", "generate_fixtures.py")
gu = _load("jaxdiff_parity_generate_openai_unet_fixtures", "generate_openai_unet_fixtures.py")

# improved-diffusion README, "Models and Hyperparameters" (MODEL_FLAGS + DIFFUSION_FLAGS)
IMPROVED_CIFAR10 = (
    "--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3 "
    "--diffusion_steps 4000 --noise_schedule cosine"
)
IMPROVED_IMAGENET64 = (
    "--image_size 64 --num_channels 128 --num_res_blocks 3 --learn_sigma True "
    "--diffusion_steps 4000 --noise_schedule cosine"
)
# guided-diffusion README, "Sampling from pre-trained models" (MODEL_FLAGS; the classifiers'
# flags of the sampling lines, without the script's --classifier_scale)
GUIDED_COMMON = (
    "--attention_resolutions 32,16,8 --diffusion_steps 1000 --learn_sigma True "
    "--num_res_blocks 2 --resblock_updown True --use_scale_shift_norm True"
)
GUIDED_256 = (
    f"{GUIDED_COMMON} --image_size 256 --noise_schedule linear --num_channels 256 "
    "--num_head_channels 64 --use_fp16 True"
)
CLASSIFIER = (
    "--classifier_attention_resolutions 32,16,8 --classifier_width 128 --classifier_pool "
    "attention --classifier_resblock_updown True --classifier_use_scale_shift_norm True"
)

M, C = "model", "classifier"
# case -> (repository, kind, flags, sampling respacing, the README's script flags left out)
PUBLISHED: dict[str, tuple[str, str, str, str, str]] = {
    "improved_cifar10_hybrid": ("improved", M, IMPROVED_CIFAR10, "ddim50", ""),
    "improved_cifar10_vlb": ("improved", M, f"{IMPROVED_CIFAR10} --use_kl True", "250", ""),
    "improved_imagenet64_hybrid": ("improved", M, IMPROVED_IMAGENET64, "250", ""),
    "improved_imagenet64_cond": (
        "improved", M,
        "--image_size 64 --num_channels 192 --num_res_blocks 3 --learn_sigma True --class_cond "
        "True --diffusion_steps 4000 --noise_schedule cosine --rescale_learned_sigmas False "
        "--rescale_timesteps False",
        "100", "",
    ),
    "improved_lsun_bedroom": (
        "improved", M,
        "--image_size 256 --num_channels 128 --num_res_blocks 2 --num_heads 1 --learn_sigma True "
        "--use_scale_shift_norm False --attention_resolutions 16 --diffusion_steps 1000 "
        "--noise_schedule linear --rescale_learned_sigmas False --rescale_timesteps False",
        "ddim50", "",
    ),
    "guided_imagenet64": (
        "guided", M,
        f"{GUIDED_COMMON} --class_cond True --dropout 0.1 --image_size 64 --noise_schedule cosine "
        "--num_channels 192 --num_head_channels 64 --num_res_blocks 3 "
        "--use_new_attention_order True --use_fp16 True",
        "250", "",
    ),
    "guided_imagenet128": (
        "guided", M,
        f"{GUIDED_COMMON} --class_cond True --image_size 128 --noise_schedule linear "
        "--num_channels 256 --num_heads 4 --use_fp16 True",
        "250", "",
    ),
    "guided_imagenet128_ddim": (
        "guided", M,
        "--attention_resolutions 32,16,8 --class_cond True --image_size 128 --learn_sigma True "
        "--num_channels 256 --num_heads 4 --num_res_blocks 2 --resblock_updown True --use_fp16 "
        "True --use_scale_shift_norm True",
        "ddim25", "--use_ddim True",
    ),
    "guided_imagenet256": ("guided", M, f"{GUIDED_256} --class_cond True", "250", ""),
    "guided_imagenet256_uncond": ("guided", M, f"{GUIDED_256} --class_cond False", "250", ""),
    "guided_imagenet512": (
        "guided", M,
        f"{GUIDED_COMMON} --class_cond True --image_size 512 --noise_schedule linear "
        "--num_channels 256 --num_head_channels 64 --use_fp16 False",
        "250", "",
    ),
    "guided_lsun_bedroom": (
        "guided", M, f"{GUIDED_256} --class_cond False --dropout 0.1", "1000", "",
    ),
    "guided_classifier64": (
        "guided", C,
        f"--image_size 64 {CLASSIFIER} --classifier_depth 4 --classifier_use_fp16 True",
        "250", "--classifier_scale 1.0",
    ),
    "guided_classifier128": (
        "guided", C,
        f"--image_size 128 {CLASSIFIER} --classifier_depth 2 --classifier_use_fp16 True",
        "ddim25", "--classifier_scale 0.5",
    ),
    "guided_classifier256": (
        "guided", C,
        f"--image_size 256 {CLASSIFIER} --classifier_depth 2 --classifier_use_fp16 True",
        "250", "--classifier_scale 1.0",
    ),
}  # fmt: skip

# Small networks, run with redrawn weights: case -> (repository, kind, flags, respaced steps t).
# Together: learned-range / fixed-small / fixed-large variances, eps and x0, class labels,
# scale-shift norm on and off (off only where a 64-channel level keeps the time embedding
# effective), resblock_updown, the new attention order, num_head_channels, guided's
# --channel_mult, linear and cosine schedules, section and DDIM respacing, rescale_timesteps
# True (improved's default) and False (guided's default), one noisy classifier.
SMALL: dict[str, tuple[str, str, str, tuple[int, ...]]] = {
    "improved_hybrid_cosine_ddim": (
        "improved", M,
        "--image_size 32 --num_channels 32 --num_res_blocks 1 --learn_sigma True --dropout 0.3 "
        "--diffusion_steps 400 --noise_schedule cosine --timestep_respacing ddim20",
        (0, 11, 19),
    ),
    "improved_class_xstart_sigma_small": (
        "improved", M,
        "--image_size 32 --num_channels 32 --num_res_blocks 0 --class_cond True "
        "--predict_xstart True --sigma_small True --use_scale_shift_norm False --num_heads 2 "
        "--num_heads_upsample 1 --attention_resolutions 8 --noise_schedule linear "
        "--timestep_respacing 10,15 --rescale_timesteps False",
        (0, 9, 24),
    ),
    "guided_class_updown_new_order": (
        "guided", M,
        "--image_size 32 --channel_mult 1,2 --num_channels 32 --num_res_blocks 1 "
        "--attention_resolutions 32,16 --class_cond True --learn_sigma True --resblock_updown "
        "True --use_new_attention_order True --num_head_channels 16 --dropout 0.1 "
        "--noise_schedule cosine --timestep_respacing 50",
        (0, 26, 49),
    ),
    "guided_xstart_kl_rescaled": (
        "guided", M,
        "--image_size 16 --channel_mult 1,2 --num_channels 32 --num_res_blocks 1 "
        "--attention_resolutions 8 --use_scale_shift_norm False --predict_xstart True --use_kl "
        "True --rescale_timesteps True --diffusion_steps 500 --timestep_respacing ddim25",
        (0, 13, 24),
    ),
    "guided_classifier_small": (
        "guided", C,
        "--image_size 64 --classifier_width 32 --classifier_depth 1 "
        "--classifier_attention_resolutions 32,8 --timestep_respacing 25",
        (0, 12, 24),
    ),
}  # fmt: skip

# Flag lines the references refuse: case -> (repository, kind, flags)
REFUSED = {
    "improved_image_size_128": ("improved", M, "--image_size 128"),
    "guided_image_size_32": ("guided", M, "--image_size 32"),
    "guided_fractional_channel_mult": ("guided", M, "--image_size 32 --channel_mult 0.5,1"),
    "classifier_image_size_32": ("guided", C, "--image_size 32"),
    "improved_sigmoid_schedule": ("improved", M, "--image_size 32 --noise_schedule sigmoid"),
}
BOOL_SPELLINGS = ("yes", "True", "T", "Y", "1", "no", "FALSE", "f", "N", "0", "maybe", "",
                  "on", "off", " true", "2")  # fmt: skip


# ----------------------------------------------------------------------------------------------
# The counter-based redraw, shared with the test (_redraw.py)

redraw = _load("jaxdiff_parity_redraw", "_redraw.py").redraw


def crc(array: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(array.astype(np.float16)).tobytes())


# ----------------------------------------------------------------------------------------------
# The references


def load_script_utils(improved_dir: Path, guided_dir: Path) -> dict:
    modules = {}
    for folder, package in ((improved_dir, "improved_diffusion"), (guided_dir, "guided_diffusion")):
        sys.path.insert(0, str(folder))
        module = importlib.import_module(f"{package}.script_util")
        loaded_from = Path(module.__file__).resolve().parent.parent
        if loaded_from != folder.resolve():
            raise RuntimeError(f"{package} imported from {loaded_from}, not {folder}")
        modules[package.split("_")[0]] = module
    return modules


def defaults_of(su, kind: str) -> dict:
    if kind == C:
        return su.classifier_and_diffusion_defaults()
    return su.model_and_diffusion_defaults()


def parse(su, kind: str, flags: str) -> dict:
    """The options as the scripts parse them (add_dict_to_argparser, argparse, args_to_dict)."""
    defaults = defaults_of(su, kind)
    parser = argparse.ArgumentParser()
    su.add_dict_to_argparser(parser, defaults)
    return su.args_to_dict(parser.parse_args(shlex.split(flags)), defaults.keys())


def create(su, kind: str, options: dict):
    make = su.create_classifier_and_diffusion if kind == C else su.create_model_and_diffusion
    return make(**options)


class TimeRecorder:
    """A network stand-in for the wrapped model: records the times it is called with."""

    def __init__(self, net=None):
        self.net, self.calls = net, []

    def __call__(self, x, t, **kwargs):
        out = self.net(x, t, **kwargs) if self.net is not None else torch.zeros(x.shape[0])
        self.calls.append((t.clone(), out.detach().clone()))
        return out


def wrapped_times(diffusion) -> torch.Tensor:
    """The time the wrapped model (SpacedDiffusion._wrap_model) passes for every step."""
    recorder = TimeRecorder()
    steps = torch.arange(diffusion.num_timesteps, dtype=torch.int64)
    diffusion._wrap_model(recorder)(torch.zeros(len(steps), 1), steps)
    return recorder.calls[0][0]


def put_diffusion(store, prefix: str, diffusion) -> dict:
    store.put(f"{prefix}/betas", np.asarray(diffusion.betas, np.float64))
    store.put(f"{prefix}/timestep_map", np.asarray(diffusion.timestep_map, np.int64))
    store.put(f"{prefix}/model_times", wrapped_times(diffusion))
    return dict(
        mean_type=diffusion.model_mean_type.name,
        var_type=diffusion.model_var_type.name,
        loss_type=diffusion.loss_type.name,
        rescale_timesteps=bool(diffusion.rescale_timesteps),
        num_timesteps=int(diffusion.num_timesteps),
        original_num_steps=int(diffusion.original_num_steps),
    )


def shapes(net) -> list:
    return [[k, list(v.shape)] for k, v in net.state_dict().items()]


def generate_published(store, modules) -> None:
    for case, (repo, kind, flags, respacing, left_out) in PUBLISHED.items():
        su = modules[repo]
        options = parse(su, kind, flags)
        with torch.device("meta"):  # keys and shapes only: no memory, no weights
            net, diffusion = create(su, kind, options)
            _, respaced = create(su, kind, {**options, "timestep_respacing": respacing})
        store.case(
            case,
            group="published",
            repository=repo,
            kind=kind,
            flags=flags,
            script_flags=left_out,
            respacing=respacing,
            options=options,
            state_dict=shapes(net),
            num_parameters=sum(p.numel() for p in net.parameters()),
            diffusion=put_diffusion(store, case, diffusion),
            respaced=put_diffusion(store, f"{case}/respaced", respaced),
        )


def generate_small(store, modules) -> None:
    for case, (repo, kind, flags, steps) in SMALL.items():
        su = modules[repo]
        options = parse(su, kind, flags)
        torch.manual_seed(gf.seed_for(f"openai_script/{case}/init"))
        net, diffusion = create(su, kind, options)
        net.eval()
        state = {
            k: torch.from_numpy(redraw(case, k, tuple(v.shape)))
            for k, v in net.state_dict().items()
        }
        net.load_state_dict(state, strict=True)

        inputs = torch.Generator().manual_seed(gf.seed_for(f"openai_script/{case}/inputs"))
        size = options["image_size"]
        x = torch.randn((len(steps), 3, size, size), generator=inputs)
        t = torch.tensor(steps, dtype=torch.int64)
        kwargs = {}
        if options.get("class_cond"):
            kwargs["y"] = torch.randint(0, su.NUM_CLASSES, (len(steps),), generator=inputs)
        recorder = TimeRecorder(net)
        with torch.no_grad():
            if kind == C:
                diffusion._wrap_model(recorder)(x, t)
            else:
                out = diffusion.p_mean_variance(
                    recorder, x, t, clip_denoised=True, model_kwargs=kwargs
                )
                for name in ("mean", "variance", "log_variance", "pred_xstart"):
                    store.put(f"{case}/{name}", out[name])
            (model_t, model_out), *more = recorder.calls
            assert not more, "one network call"
            # how far the output moves when the network gets the respaced step instead
            raw = net(x, t, **kwargs)
        store.put(f"{case}/x", x)
        store.put(f"{case}/t", t)
        store.put(f"{case}/model_t", model_t)
        store.put(f"{case}/model_out", model_out)
        for name, value in kwargs.items():
            store.put(f"{case}/{name}", value)
        scale = float(model_out.abs().max())
        store.case(
            case,
            group="small",
            repository=repo,
            kind=kind,
            flags=flags,
            options=options,
            state_dict=shapes(net),
            crc32={k: crc(v.numpy()) for k, v in state.items()},
            num_parameters=sum(p.numel() for p in net.parameters()),
            inputs=sorted(["x", "t", *kwargs]),
            diffusion=put_diffusion(store, f"{case}/diffusion", diffusion),
            max_abs_model_out=scale,
            raw_step_change=float((raw - model_out).abs().max()) / scale,
        )


def generate_rest(store, modules) -> None:
    for name, su in modules.items():
        defaults = list(map(list, su.model_and_diffusion_defaults().items()))  # in order
        store.case(f"defaults_{name}", group="defaults", repository=name, kind=M,
                   defaults=defaults)  # fmt: skip
    guided = modules["guided"]
    defaults = list(map(list, guided.classifier_and_diffusion_defaults().items()))
    store.case("defaults_classifier", group="defaults", repository="guided", kind=C,
               defaults=defaults)  # fmt: skip
    spellings = {}
    for spelling in BOOL_SPELLINGS:
        try:
            spellings[spelling] = guided.str2bool(spelling)
        except argparse.ArgumentTypeError:
            spellings[spelling] = None
    store.case("str2bool", group="str2bool", spellings=spellings)
    for case, (repo, kind, flags) in REFUSED.items():
        su = modules[repo]
        try:
            with torch.device("meta"):
                create(su, kind, parse(su, kind, flags))
        except (ValueError, NotImplementedError) as err:
            error = f"{type(err).__name__}: {err}"
        else:
            raise AssertionError(f"{case}: the reference accepted {flags!r}")
        store.case(case, group="refused", repository=repo, kind=kind, flags=flags, error=error)


def _generate(modules):
    store = gf.Store("openai_script")
    generate_published(store, modules)
    generate_small(store, modules)
    generate_rest(store, modules)
    return store


def _report(store) -> None:
    for case, info in sorted(store.meta.items()):
        if info.get("group") == "small":
            print(
                f"  {case}: {info['num_parameters']} parameters, max |out| "
                f"{info['max_abs_model_out']:.3g}, respaced-step change "
                f"{info['raw_step_change']:.3g}"
            )


def main(argv: list[str] | None = None) -> int:
    description = __doc__.split("\n\n")[0]
    return gu.run_generator(argv, description, load_script_utils, _generate, report=_report)


if __name__ == "__main__":
    sys.exit(main())
