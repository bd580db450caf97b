"""Generate ``fixtures/openai_sampling.npz``: whole sampling chains of openai networks run by the
references' own samplers, step by step, with every random draw fixed.

* improved-diffusion 1bc7bbb: an unconditional ``UNetModel`` with a learned variance, a diffusion
  from ``script_util.create_gaussian_diffusion`` with the arguments ``create_model_and_diffusion``
  passes it (cosine schedule, ``rescale_timesteps=True``, respaced), sampled by
  ``p_sample_loop_progressive`` (4000 steps respaced ``"10"``) and by
  ``ddim_sample_loop_progressive`` with eta 0 and eta 1 (100 steps respaced by the section
  counts ``"3,4"``).
* guided-diffusion 22e0df8: a class-conditional ``UNetModel`` from
  ``script_util.create_model_and_diffusion`` (learned variance, scale-shift norm,
  ``resblock_updown``, ``num_head_channels``; linear schedule, 1000 steps, ``rescale_timesteps``
  False as guided-diffusion's default) and a noisy classifier ``EncoderUNetModel`` (attention
  pool), sampled by ``p_sample_loop_progressive`` (respaced ``"10"``) and
  ``ddim_sample_loop_progressive`` (respaced ``"ddim10"``, eta 0), each with classifier guidance
  (the ``cond_fn`` and ``model_fn`` of guided-diffusion's ``scripts/classifier_sample.py``) and
  without it, from the same x_T and noise.

Every parameter of the networks is redrawn (seeded, rounded to float16 values, the rule of
``generate_openai_unet_fixtures.py``), so that no zero-initialised layer hides a mapping
mistake. The per-step Gaussian draws are fixed: during each loop ``torch.randn_like`` (what
``p_sample`` and ``ddim_sample`` draw their noise with) is replaced by a function that returns
pre-drawn tensors in order and counts the calls. The script also records what the network and
the classifier were fed at every step (their time input, the classifier's gradient), runs the
non-progressive ``p_sample_loop`` / ``ddim_sample_loop`` once more with the same draws and
checks that its result is the last progressive sample bit for bit.

This script never imports jaxdiff. Regenerate (from the repository root; see PROVENANCE.md):

    /work/ref/torchenv/bin/python tests/parity/generate_openai_sampling_fixtures.py \\
        --improved-diffusion /work/ref --guided-diffusion /work/ref/guided
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "fixtures"
NAME = "openai_sampling"


def _load(name: str, filename: str):
    spec = importlib.util.spec_from_file_location(name, HERE / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The seed rule and the deterministic .npz writer (generate_fixtures.py); the parameter redraw
# (generate_openai_unet_fixtures.py).
gf = _load("jaxdiff_parity_generate_fixtures", "generate_fixtures.py")
gu = _load("jaxdiff_parity_generate_openai_unet_fixtures", "generate_openai_unet_fixtures.py")

BATCH = 2
IMAGE = 8  # 8 x 8 RGB: the fixture keeps three networks' weights under 2 MB
NUM_CLASSES = 10
CLASSIFIER_SCALE = 4.0

# improved-diffusion: create_model_and_diffusion's defaults (model_and_diffusion_defaults) with
# these changes. Its create_model only builds 32, 64 or 256 pixel networks (four or more
# levels, 1.6 M parameters at 32 channels), so the network is built with UNetModel directly,
# with create_model's arguments at two levels; the diffusion is create_gaussian_diffusion with
# exactly the arguments create_model_and_diffusion gives it.
IMPROVED_UNET = dict(
    in_channels=3,
    model_channels=32,
    out_channels=6,  # learn_sigma=True
    num_res_blocks=1,
    attention_resolutions=(2,),  # attention_resolutions="4" at image_size 8
    dropout=0.0,
    channel_mult=(1, 1),
    num_classes=None,
    use_checkpoint=False,
    num_heads=2,
    num_heads_upsample=-1,
    use_scale_shift_norm=True,
)
IMPROVED_DIFFUSION = dict(
    learn_sigma=True,
    sigma_small=False,
    noise_schedule="cosine",
    use_kl=False,
    predict_xstart=False,
    rescale_timesteps=True,
    rescale_learned_sigmas=True,
)

# guided-diffusion: create_model_and_diffusion with these arguments (the rest are
# model_and_diffusion_defaults()). script_util.NUM_CLASSES (1000) is set to NUM_CLASSES while it
# runs, so that the class embedding does not dominate the file.
GUIDED_MODEL = dict(
    image_size=IMAGE,
    num_channels=32,
    num_res_blocks=1,
    channel_mult="1,1",
    num_heads=4,
    num_head_channels=16,
    attention_resolutions="4",  # downsample rate 2
    class_cond=True,
    learn_sigma=True,
    use_scale_shift_norm=True,
    resblock_updown=True,
    diffusion_steps=1000,
    noise_schedule="linear",
)
# The noisy classifier: create_classifier's EncoderUNetModel arguments (classifier_defaults:
# scale-shift, resblock_updown, attention pool) at width 32, depth 1, two levels. create_classifier
# itself only builds 64 pixel networks and up, with num_head_channels=64 (needs width >= 64).
CLASSIFIER = dict(
    image_size=IMAGE,
    in_channels=3,
    model_channels=32,
    out_channels=NUM_CLASSES,
    num_res_blocks=1,
    attention_resolutions=(2,),
    channel_mult=(1, 1),
    use_fp16=False,
    num_head_channels=16,
    use_scale_shift_norm=True,
    resblock_updown=True,
    pool="attention",
)

# case -> (repository, network, loop, diffusion arguments, eta, classifier guidance). Cases
# with the same "chain" share x_T, the per-step noise and the labels.
CASES = {
    "improved_ddpm": ("improved", "improved_unet", "p_sample",
                      dict(steps=4000, timestep_respacing="10"), None, False),
    "improved_ddim_eta0": ("improved", "improved_unet", "ddim_sample",
                           dict(steps=100, timestep_respacing="3,4"), 0.0, False),
    "improved_ddim_eta1": ("improved", "improved_unet", "ddim_sample",
                           dict(steps=100, timestep_respacing="3,4"), 1.0, False),
    "guided_ddpm_classifier": ("guided", "guided_unet", "p_sample",
                               dict(timestep_respacing="10"), None, True),
    "guided_ddpm_unguided": ("guided", "guided_unet", "p_sample",
                             dict(timestep_respacing="10"), None, False),
    "guided_ddim_classifier": ("guided", "guided_unet", "ddim_sample",
                               dict(timestep_respacing="ddim10"), 0.0, True),
    "guided_ddim_unguided": ("guided", "guided_unet", "ddim_sample",
                             dict(timestep_respacing="ddim10"), 0.0, False),
}  # fmt: skip


def chain_of(case: str) -> str:
    """The name that seeds a case's x_T, noise and labels (guided and unguided share it)."""
    return case.replace("_classifier", "").replace("_unguided", "")


def load_references(improved_dir: Path, guided_dir: Path) -> dict:
    """script_util, unet and gaussian_diffusion of each package, from the given folders."""
    modules = {}
    for folder, package in ((improved_dir, "improved_diffusion"), (guided_dir, "guided_diffusion")):
        sys.path.insert(0, str(folder))
        loaded = {
            name: importlib.import_module(f"{package}.{name}")
            for name in ("script_util", "unet", "gaussian_diffusion", "respace")
        }
        for module in loaded.values():
            loaded_from = Path(module.__file__).resolve().parent.parent
            if loaded_from != folder.resolve():
                raise RuntimeError(f"{package} imported from {loaded_from}, not {folder}")
        modules[package.split("_")[0]] = loaded
    return modules


class FixedDraws:
    """Stands in for ``torch.randn_like`` during a loop: returns ``draws[k]`` at the k-th call
    (checking its shape and dtype against the argument) and counts the calls."""

    def __init__(self, draws: torch.Tensor):
        self.draws, self.calls = draws, 0

    def __call__(self, like, *args, **kwargs):
        if args or kwargs:
            raise RuntimeError(f"randn_like called with extra arguments {args} {kwargs}")
        draw = self.draws[self.calls]
        if draw.shape != like.shape or draw.dtype != like.dtype:
            raise RuntimeError(f"draw {self.calls}: {tuple(draw.shape)} for {tuple(like.shape)}")
        self.calls += 1
        return draw.clone()


def run_with_draws(draws: torch.Tensor, loop, *args, **kwargs):
    """``loop(*args, **kwargs)`` with ``torch.randn_like`` returning ``draws`` in order (a
    progressive loop is a generator: ``loop=list`` runs it); the result and the draw count."""
    fixed, original = FixedDraws(draws), torch.randn_like
    torch.randn_like = fixed
    try:
        result = loop(*args, **kwargs)
    finally:
        torch.randn_like = original
    return result, fixed.calls


def recording_model_fn(model, class_cond: bool, seen: list):
    """guided-diffusion classifier_sample.py's model_fn (the labels go to the network only when
    it is class-conditional), recording the time input it gets."""

    def model_fn(x, t, y=None):
        seen.append(t.detach().clone())
        return model(x, t, y if class_cond else None)

    return model_fn


def recording_cond_fn(classifier, scale: float, seen: list):
    """The cond_fn of guided-diffusion's scripts/classifier_sample.py: the gradient of the sum
    over the batch of log_softmax(classifier(x, t))[b, y_b] with respect to x, times
    classifier_scale; records (t, x, gradient) of every call."""

    def cond_fn(x, t, y=None):
        assert y is not None
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x_in, t), dim=-1)
            chosen = log_probs[range(len(log_probs)), y.view(-1)]
            grad = torch.autograd.grad(chosen.sum(), x_in)[0] * scale
        seen.append((t.detach().clone(), x.detach().clone(), grad.detach().clone()))
        return grad

    return cond_fn


def build_networks(modules) -> dict:
    """The improved UNet, the guided UNet (with its diffusion arguments) and the classifier,
    each with every parameter redrawn."""
    nets = {}
    torch.manual_seed(gf.seed_for(f"{NAME}/improved_unet/init"))
    nets["improved_unet"] = modules["improved"]["unet"].UNetModel(**IMPROVED_UNET)

    guided_util = modules["guided"]["script_util"]
    arguments = guided_util.model_and_diffusion_defaults()
    arguments.update(GUIDED_MODEL)
    saved = guided_util.NUM_CLASSES
    guided_util.NUM_CLASSES = NUM_CLASSES
    try:
        torch.manual_seed(gf.seed_for(f"{NAME}/guided_unet/init"))
        nets["guided_unet"], _ = guided_util.create_model_and_diffusion(**arguments)
    finally:
        guided_util.NUM_CLASSES = saved
    nets["guided_unet_arguments"] = arguments

    torch.manual_seed(gf.seed_for(f"{NAME}/classifier/init"))
    nets["classifier"] = modules["guided"]["unet"].EncoderUNetModel(**CLASSIFIER)
    for name in ("improved_unet", "guided_unet", "classifier"):
        generator = torch.Generator().manual_seed(gf.seed_for(f"{NAME}/{name}/weights"))
        gu.rerandomise(nets[name], generator)
        nets[name].eval()
    return nets


def make_diffusion(modules, repo: str, extra: dict, guided_arguments: dict):
    util = modules[repo]["script_util"]
    if repo == "improved":
        return util.create_gaussian_diffusion(**IMPROVED_DIFFUSION, **extra)
    keys = ("learn_sigma", "noise_schedule", "use_kl", "predict_xstart", "rescale_timesteps",
            "rescale_learned_sigmas")  # fmt: skip
    arguments = {k: guided_arguments[k] for k in keys}
    return util.create_gaussian_diffusion(
        steps=guided_arguments["diffusion_steps"], **arguments, **extra
    )


def generate(modules) -> object:
    store = gf.Store(NAME)
    nets = build_networks(modules)
    for name in ("improved_unet", "guided_unet", "classifier"):
        store.put_all(
            f"{name}/state_dict", {k: v.half() for k, v in nets[name].state_dict().items()}
        )
    shape = (BATCH, 3, IMAGE, IMAGE)

    chains = {}
    for case, (repo, net_name, loop, extra, eta, guided) in CASES.items():
        diffusion = make_diffusion(modules, repo, extra, nets["guided_unet_arguments"])
        steps = diffusion.num_timesteps
        chain = chain_of(case)
        if chain not in chains:
            draws = torch.Generator().manual_seed(gf.seed_for(f"{NAME}/{chain}/draws"))
            x_T = torch.randn(shape, generator=draws)
            noise = torch.randn((steps, *shape), generator=draws)
            y = (
                torch.randint(0, NUM_CLASSES, (BATCH,), generator=draws)
                if repo == "guided"
                else None
            )
            chains[chain] = (x_T, noise, y)
            store.put(f"{chain}/x_T", x_T)
            store.put(f"{chain}/noise", noise)
            if y is not None:
                store.put(f"{chain}/y", y)
        x_T, noise, y = chains[chain]

        model_t, cond_calls = [], []
        class_cond = nets[net_name].num_classes is not None
        model_fn = recording_model_fn(nets[net_name], class_cond, model_t)
        kwargs = dict(noise=x_T, clip_denoised=True, device=torch.device("cpu"), progress=False)
        if repo == "guided":
            kwargs["model_kwargs"] = {"y": y}
            if guided:
                kwargs["cond_fn"] = recording_cond_fn(nets["classifier"], CLASSIFIER_SCALE,
                                                      cond_calls)  # fmt: skip
        if eta is not None:
            kwargs["eta"] = eta
        progressive = getattr(diffusion, f"{loop}_loop_progressive")
        outs, calls = run_with_draws(noise, list, progressive(model_fn, shape, **kwargs))
        if calls != steps or len(outs) != steps or len(model_t) != steps:
            raise RuntimeError(f"{case}: {calls} draws, {len(outs)} steps, expected {steps}")
        if guided and len(cond_calls) != steps:
            raise RuntimeError(f"{case}: {len(cond_calls)} classifier calls for {steps} steps")
        # the non-progressive loop, as classifier_sample.py calls it, gives the last sample
        whole = getattr(diffusion, f"{loop}_loop")
        final, _ = run_with_draws(noise, whole, model_fn, shape, **kwargs)
        if not torch.equal(final, outs[-1]["sample"]):
            raise RuntimeError(f"{case}: {loop}_loop differs from its progressive loop")

        store.put(f"{case}/sample", torch.stack([o["sample"] for o in outs]))
        store.put(f"{case}/pred_xstart", torch.stack([o["pred_xstart"] for o in outs]))
        store.put(f"{case}/model_t", torch.stack(model_t[:steps]))
        if guided:
            # the classifier saw the chain's states: x_T, then each step's sample (not stored
            # twice; checked here)
            cond_x = torch.stack([c[1] for c in cond_calls[:steps]])
            states = torch.cat([x_T[None], torch.stack([o["sample"] for o in outs[:-1]])])
            if not torch.equal(cond_x, states):
                raise RuntimeError(f"{case}: the classifier's inputs are not the chain's states")
            store.put(f"{case}/cond_t", torch.stack([c[0] for c in cond_calls[:steps]]))
            store.put(f"{case}/cond_grad", torch.stack([c[2] for c in cond_calls[:steps]]))
        store.case(
            case,
            repository=repo,
            network=net_name,
            loop=f"{loop}_loop_progressive",
            diffusion_steps=diffusion.original_num_steps,
            noise_schedule=(IMPROVED_DIFFUSION if repo == "improved" else GUIDED_MODEL)[
                "noise_schedule"
            ],
            timestep_respacing=extra["timestep_respacing"],
            rescale_timesteps=bool(diffusion.rescale_timesteps),
            timestep_map=[int(t) for t in diffusion.timestep_map],
            num_steps=steps,
            var_type="learned_range",
            clip_denoised=True,
            eta=eta,
            classifier_scale=CLASSIFIER_SCALE if guided else None,
            chain=chain,
            shape=list(shape),
            max_abs_sample=float(outs[-1]["sample"].abs().max()),
        )

    for chain in ("guided_ddpm", "guided_ddim"):
        # how far guidance moves the chain, step by step (max over the batch and pixels)
        on = store.arrays[f"{chain}_classifier/sample"]
        off = store.arrays[f"{chain}_unguided/sample"]
        diff = np.abs(on - off).reshape(on.shape[0], -1).max(axis=1)
        store.meta[f"{chain}_classifier"]["max_abs_guided_minus_unguided"] = [
            float(d) for d in diff
        ]
        print(f"{chain}: max |guided - unguided| per step {np.array2string(diff, precision=3)}")

    store.meta["__networks__"] = {
        "improved_unet": {"class": "improved_diffusion.unet.UNetModel",
                          "kwargs": gu.json_kwargs(IMPROVED_UNET)},
        "guided_unet": {"class": "guided_diffusion.unet.UNetModel (create_model_and_diffusion)",
                        "kwargs": _guided_unet_kwargs(nets["guided_unet"],
                                                      nets["guided_unet_arguments"])},
        "classifier": {"class": "guided_diffusion.unet.EncoderUNetModel",
                       "kwargs": gu.json_kwargs(CLASSIFIER)},
        "create_model_and_diffusion": nets["guided_unet_arguments"],
        "num_parameters": {n: sum(p.numel() for p in nets[n].parameters())
                           for n in ("improved_unet", "guided_unet", "classifier")},
    }  # fmt: skip
    return store


def _guided_unet_kwargs(net, arguments: dict) -> dict:
    """The UNetModel keyword arguments create_model derived from ``arguments`` (for jaxdiff's
    ``openai_model_from_config``), checked against the built network."""
    size = arguments["image_size"]
    kwargs = dict(
        image_size=size,
        in_channels=3,
        model_channels=arguments["num_channels"],
        out_channels=6 if arguments["learn_sigma"] else 3,
        num_res_blocks=arguments["num_res_blocks"],
        attention_resolutions=[
            size // int(r) for r in arguments["attention_resolutions"].split(",")
        ],
        dropout=arguments["dropout"],
        channel_mult=[int(m) for m in arguments["channel_mult"].split(",")],
        num_classes=NUM_CLASSES if arguments["class_cond"] else None,
        num_heads=arguments["num_heads"],
        num_head_channels=arguments["num_head_channels"],
        num_heads_upsample=arguments["num_heads_upsample"],
        use_scale_shift_norm=arguments["use_scale_shift_norm"],
        resblock_updown=arguments["resblock_updown"],
        use_new_attention_order=arguments["use_new_attention_order"],
    )
    for key in ("in_channels", "model_channels", "out_channels", "num_res_blocks",
                "attention_resolutions", "channel_mult", "num_classes", "num_heads",
                "num_head_channels"):  # fmt: skip
        built = getattr(net, key)
        built = list(built) if isinstance(built, (tuple, set)) else built
        if key == "attention_resolutions":
            built = sorted(built)
        if built != kwargs[key]:
            raise RuntimeError(f"guided UNetModel {key} = {built}, expected {kwargs[key]}")
    return kwargs


def main(argv: list[str] | None = None) -> int:
    description = __doc__.split("\n\n")[0]
    return gu.run_generator(argv, description, load_references, generate, other_entries=1)


if __name__ == "__main__":
    sys.exit(main())
