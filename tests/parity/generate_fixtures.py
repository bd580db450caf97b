"""Generate the jaxdiff parity fixtures by running the upstream PyTorch reference code.

References (see PROVENANCE.md):
  * denoising-diffusion-pytorch 2.3.4 ("lucid"), imported from the installed package;
  * openai/improved-diffusion at commit 1bc7bbb ("openai"), imported from ``--improved-diffusion``.

Every stored result is what the upstream functions return; this script only builds inputs,
calls the references and saves their outputs. It never imports jaxdiff.

Regenerate (from the repository root):

    /work/ref/torchenv/bin/python tests/parity/generate_fixtures.py --improved-diffusion /work/ref

PROVENANCE.md describes each file and lists versions, seeds, the import-only stand-in modules
and the ``np.int`` patch. Every file's ``__meta__`` entry maps each case id to its parameters.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import io
import json
import math
import os
import sys
import time
import types
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "fixtures"

CHANNELS = 3
SIZE = 4
BATCH = 4
S_STD_DISCRETE = 0.002
S_STD_CONTINUOUS = 0.05

OPENAI_TABLES = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "alphas_cumprod_next",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)
MEAN_TYPES = ("EPSILON", "START_X", "PREVIOUS_X")
VAR_TYPES = ("FIXED_SMALL", "FIXED_LARGE", "LEARNED", "LEARNED_RANGE")
LOSS_TYPES = ("MSE", "RESCALED_MSE", "KL", "RESCALED_KL")
LEARNED_VAR_TYPES = ("LEARNED", "LEARNED_RANGE")
LUCID_OBJECTIVES = ("pred_noise", "pred_x0", "pred_v")
MIN_SNR_MODES = {"off": None, "g5": 5.0, "g3": 3.0}

# Import-only stand-ins. denoising_diffusion_pytorch's package __init__ imports its Trainer,
# dataset, FID and attention modules, which import these packages at module level. None of that
# code runs here, so each missing package is replaced by empty modules exporting the imported
# names as functions that raise when called. Packages that are installed are used as they are.
STAND_INS: dict[str, dict[str, tuple[str, ...]]] = {
    "tqdm": {"tqdm": ("tqdm",), "tqdm.auto": ("tqdm",)},
    "scipy": {"scipy": (), "scipy.optimize": ("linear_sum_assignment",)},
    "PIL": {"PIL": (), "PIL.Image": ()},
    "torchvision": {"torchvision": (), "torchvision.transforms": (), "torchvision.utils": ()},
    "accelerate": {"accelerate": ("Accelerator",)},
    "packaging": {"packaging": (), "packaging.version": ("parse",)},
}

# What a reference may raise for a degenerate configuration (recorded in the meta).
REFERENCE_ERRORS = (
    ArithmeticError,
    AssertionError,
    LookupError,
    NameError,
    RuntimeError,
    TypeError,
    ValueError,
)

SEEDS: dict[str, int] = {}


def seed_for(name: str) -> int:
    """Fixed seed of a named random draw: crc32 of the name, recorded in SEEDS."""
    seed = zlib.crc32(name.encode("utf-8")) & 0x7FFFFFFF
    SEEDS[name] = seed
    return seed


# ----------------------------------------------------------------------------------------------
# Environment: stand-ins and reference imports


def _raising_stand_in(qualname: str):
    def stand_in(*args, **kwargs):
        raise RuntimeError(f"{qualname} is an import-only stand-in (see PROVENANCE.md)")

    stand_in.__name__ = qualname.rsplit(".", 1)[-1]
    stand_in.__qualname__ = qualname
    return stand_in


def install_stand_ins() -> list[str]:
    """Register stand-in modules for the packages of STAND_INS that are not installed."""
    installed = []
    for package, modules in STAND_INS.items():
        if package in sys.modules or importlib.util.find_spec(package) is not None:
            continue
        for module_name, names in modules.items():
            module = types.ModuleType(module_name, "import-only stand-in (generate_fixtures.py)")
            module.__spec__ = importlib.machinery.ModuleSpec(module_name, loader=None)
            for name in names:
                setattr(module, name, _raising_stand_in(f"{module_name}.{name}"))
            sys.modules[module_name] = module
            parent, _, child = module_name.rpartition(".")
            if parent:
                setattr(sys.modules[parent], child, module)
        installed.append(package)
    return installed


def load_references(improved_dir: Path) -> types.SimpleNamespace:
    stand_ins = install_stand_ins()

    lucid = {
        alias: importlib.import_module(f"denoising_diffusion_pytorch.{module}")
        for alias, module in (
            ("ddp", "denoising_diffusion_pytorch"),
            ("lgd", "learned_gaussian_diffusion"),
            ("ctd", "continuous_time_gaussian_diffusion"),
            ("vpd", "v_param_continuous_time_gaussian_diffusion"),
            ("sd", "simple_diffusion"),
        )
    }

    sys.path.insert(0, str(improved_dir))
    from improved_diffusion import gaussian_diffusion as gd
    from improved_diffusion import losses, resample, respace

    loaded_from = Path(gd.__file__).resolve().parent.parent
    if loaded_from != improved_dir.resolve():
        raise RuntimeError(f"improved_diffusion imported from {loaded_from}, not {improved_dir}")
    return types.SimpleNamespace(
        **lucid,
        gd=gd,
        respace=respace,
        losses=losses,
        resample=resample,
        stand_ins=stand_ins,
        lucid_version=importlib.metadata.version("denoising-diffusion-pytorch"),
    )


# ----------------------------------------------------------------------------------------------
# Storage


def to_numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().contiguous().numpy().copy()
    return np.asarray(value)


class Store:
    """Flat ``key -> array`` mapping plus the ``__meta__`` case table of one fixture file."""

    def __init__(self, name: str):
        self.name = name
        self.arrays: dict[str, np.ndarray] = {}
        self.meta: dict[str, dict] = {}
        self.nonfinite: list[str] = []

    def put(self, key: str, value) -> None:
        if key in self.arrays or key == "__meta__":
            raise KeyError(f"{self.name}: duplicate key {key}")
        array = np.ascontiguousarray(to_numpy(value))
        if array.dtype == object:
            raise TypeError(f"{self.name}: {key} is an object array")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            self.nonfinite.append(key)
        self.arrays[key] = array

    def put_all(self, prefix: str, mapping: dict) -> None:
        for name, value in mapping.items():
            self.put(f"{prefix}/{name}", value)

    def case(self, case_id: str, **params) -> None:
        if case_id in self.meta:
            raise KeyError(f"{self.name}: duplicate case {case_id}")
        self.meta[case_id] = params

    def write(self, out_dir: Path) -> Path:
        """Write an ``np.load``-compatible compressed .npz with fixed zip timestamps.

        ``np.savez_compressed`` stamps every member with the current time, so two runs would not
        be byte-identical; this writes the same format with a constant timestamp instead.
        """
        path = out_dir / f"{self.name}.npz"
        members = dict(self.arrays)
        members["__meta__"] = np.array(json.dumps(self.meta, sort_keys=True))
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for key, array in members.items():
                info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                buffer = io.BytesIO()
                np.lib.format.write_array(buffer, array, allow_pickle=False)
                archive.writestr(info, buffer.getvalue())
        return path


# ----------------------------------------------------------------------------------------------
# Inputs and the deterministic tanh model


def pixel_grid_x0(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Pixels uniform on {0..255} mapped by p/127.5 - 1, with the two extreme values forced."""
    pixels = rng.integers(0, 256, size=shape)
    x0 = pixels.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    x0[0, 0, 0, 0] = -1.0
    x0[0, 0, 0, 1] = 1.0
    return x0


def standard_inputs(seed: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    shape = (batch, CHANNELS, SIZE, SIZE)
    x0 = pixel_grid_x0(rng, shape)
    noise = rng.standard_normal(shape).astype(np.float32)
    return torch.from_numpy(x0), torch.from_numpy(noise)


def tanh_params(seed: int, out_channels: int, s_std: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "W": rng.normal(0.0, 0.5, size=(out_channels, CHANNELS)).astype(np.float32),
        "b": rng.normal(0.0, 0.1, size=(out_channels,)).astype(np.float32),
        "s": rng.normal(0.0, s_std, size=(out_channels,)).astype(np.float32),
    }


class TanhModel(torch.nn.Module):
    """out[n,o,h,w] = tanh(sum_c W[o,c] x[n,c,h,w] + b[o] + s[o] tin[n]), tin = float32(t)."""

    def __init__(self, params: dict[str, np.ndarray], *, continuous: bool):
        super().__init__()
        self.W = torch.nn.Parameter(torch.from_numpy(params["W"].copy()))
        self.b = torch.nn.Parameter(torch.from_numpy(params["b"].copy()))
        self.s = torch.nn.Parameter(torch.from_numpy(params["s"].copy()))
        # attributes the lucid diffusion classes inspect
        self.channels = int(self.W.shape[1])
        self.out_dim = int(self.W.shape[0])
        self.self_condition = False
        self.random_or_learned_sinusoidal_cond = continuous
        self.last_time_input: torch.Tensor | None = None

    def forward(self, x, t, x_self_cond=None):
        if x_self_cond is not None:
            raise ValueError("the tanh model takes no self-conditioning input")
        tin = t.to(torch.float32)
        self.last_time_input = tin.detach().clone()
        h = torch.einsum("oc,nchw->nohw", self.W, x)
        return torch.tanh(
            h + self.b[:, None, None] + self.s[None, :, None, None] * tin[:, None, None, None]
        )

    def grads(self) -> dict[str, torch.Tensor]:
        return {
            "grad_W": self.W.grad.detach().clone(),
            "grad_b": self.b.grad.detach().clone(),
            "grad_s": self.s.grad.detach().clone(),
        }


class ConstantModel(torch.nn.Module):
    """START_X oracle: returns the stored image whatever x_t and t are."""

    def __init__(self, image: torch.Tensor):
        super().__init__()
        self.register_buffer("image", image.clone())

    def forward(self, x, t):
        return self.image.clone()


def discrete_t(num_steps: int) -> list[int]:
    return [0, 1, num_steps // 2, num_steps - 1]


def error_text(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"


# ----------------------------------------------------------------------------------------------
# Reference constructors


def openai_diffusion(
    refs,
    schedule,
    steps,
    respacing=None,
    *,
    mean="EPSILON",
    var="FIXED_SMALL",
    loss="MSE",
    rescale=False,
):
    gd = refs.gd
    kwargs = {
        "betas": gd.get_named_beta_schedule(schedule, steps),
        "model_mean_type": gd.ModelMeanType[mean],
        "model_var_type": gd.ModelVarType[var],
        "loss_type": gd.LossType[loss],
        "rescale_timesteps": rescale,
    }
    if respacing is None:
        return gd.GaussianDiffusion(**kwargs)
    use_timesteps = refs.respace.space_timesteps(steps, respacing)
    return refs.respace.SpacedDiffusion(use_timesteps=use_timesteps, **kwargs)


def openai_model_call(refs, diffusion, model, x, t):
    """The model output exactly as p_mean_variance / training_losses obtain it."""
    if isinstance(diffusion, refs.respace.SpacedDiffusion):
        model = diffusion._wrap_model(model)
    return model(x, diffusion._scale_timesteps(t))


def openai_tables(diffusion) -> dict[str, np.ndarray]:
    return {name: np.asarray(getattr(diffusion, name), dtype=np.float64) for name in OPENAI_TABLES}


def lucid_gaussian(
    refs,
    model,
    schedule,
    steps,
    *,
    objective="pred_noise",
    schedule_kwargs=None,
    min_snr_gamma=None,
):
    return refs.ddp.GaussianDiffusion(
        model,
        image_size=SIZE,
        timesteps=steps,
        objective=objective,
        beta_schedule=schedule,
        schedule_fn_kwargs=dict(schedule_kwargs or {}),
        auto_normalize=False,
        min_snr_loss_weight=min_snr_gamma is not None,
        min_snr_gamma=5 if min_snr_gamma is None else min_snr_gamma,
    )


def zero_params(out_channels: int) -> dict[str, np.ndarray]:
    return {
        "W": np.zeros((out_channels, CHANNELS), np.float32),
        "b": np.zeros((out_channels,), np.float32),
        "s": np.zeros((out_channels,), np.float32),
    }


# ----------------------------------------------------------------------------------------------
# 1. schedules.npz


def gen_schedules(refs) -> Store:
    store = Store("schedules")
    ddp = refs.ddp
    schedule_fns = {
        "linear": ddp.linear_beta_schedule,
        "cosine": ddp.cosine_beta_schedule,
        "sigmoid": ddp.sigmoid_beta_schedule,
    }
    lucid_cases = [
        (name, name, {}, steps) for name in schedule_fns for steps in (1000, 4000, 37, 1)
    ]
    lucid_cases.append(("cosine_s0.02", "cosine", {"s": 0.02}, 1000))
    lucid_cases.append(("sigmoid_custom", "sigmoid", {"start": -2, "end": 4, "tau": 0.7}, 1000))
    model = TanhModel(zero_params(CHANNELS), continuous=False)
    for label, schedule, kwargs, steps in lucid_cases:
        case = f"lucid/{label}/T{steps}"
        meta = {"reference": "lucid", "schedule": schedule, "schedule_kwargs": kwargs, "T": steps}
        try:
            betas64 = schedule_fns[schedule](steps, **kwargs)
            tables = {}
            for objective in LUCID_OBJECTIVES:
                for mode, gamma in MIN_SNR_MODES.items():
                    diffusion = lucid_gaussian(
                        refs,
                        model,
                        schedule,
                        steps,
                        objective=objective,
                        schedule_kwargs=kwargs,
                        min_snr_gamma=gamma,
                    )
                    buffers = dict(diffusion.named_buffers())
                    tables[f"loss_weight/{objective}/{mode}"] = buffers.pop("loss_weight")
                    for name, value in buffers.items():
                        tables.setdefault(name, value)
        except REFERENCE_ERRORS as error:  # recorded in the meta, nothing stored
            meta["error"] = error_text(error)
            store.case(case, **meta)
            continue
        buffer_names = [name for name in tables if not name.startswith("loss_weight/")]
        store.put(f"{case}/betas_f64", betas64)
        store.put_all(case, tables)
        meta["buffers"] = buffer_names
        store.case(case, **meta)

    for schedule in ("linear", "cosine"):
        for steps in (1000, 4000, 37, 1):
            case = f"openai/{schedule}/T{steps}"
            meta = {"reference": "openai", "schedule": schedule, "T": steps}
            betas = refs.gd.get_named_beta_schedule(schedule, steps)
            try:
                diffusion = openai_diffusion(refs, schedule, steps)
            except REFERENCE_ERRORS as error:
                # GaussianDiffusion reads posterior_variance[1], which does not exist for T=1.
                meta["error"] = error_text(error)
                meta["stored"] = ["betas"]
                store.put(f"{case}/betas", np.asarray(betas, np.float64))
                store.case(case, **meta)
                continue
            store.put_all(case, openai_tables(diffusion))
            meta["stored"] = list(OPENAI_TABLES)
            store.case(case, **meta)

    t32 = torch.cat([torch.linspace(0, 1, 201), torch.tensor([1e-6, 0.999999])]).to(torch.float32)
    t64 = t32.to(torch.float64)
    continuous = {
        "lucid_ct/linear": (
            "continuous_time_gaussian_diffusion.beta_linear_log_snr",
            refs.ctd.beta_linear_log_snr,
        ),
        "lucid_ct/cosine": (
            "continuous_time_gaussian_diffusion.alpha_cosine_log_snr",
            refs.ctd.alpha_cosine_log_snr,
        ),
        "simple/cosine": (
            "simple_diffusion.logsnr_schedule_cosine",
            refs.sd.logsnr_schedule_cosine,
        ),
        "simple/shifted": (
            (
                "simple_diffusion.logsnr_schedule_shifted(logsnr_schedule_cosine, image_d=64, "
                "noise_d=32)"
            ),
            refs.sd.logsnr_schedule_shifted(refs.sd.logsnr_schedule_cosine, image_d=64, noise_d=32),
        ),
        "simple/interpolated": (
            (
                "simple_diffusion.logsnr_schedule_interpolated(logsnr_schedule_cosine, "
                "image_d=64, noise_d_low=32, noise_d_high=64)"
            ),
            refs.sd.logsnr_schedule_interpolated(
                refs.sd.logsnr_schedule_cosine, image_d=64, noise_d_low=32, noise_d_high=64
            ),
        ),
    }
    for case, (description, fn) in continuous.items():
        store.put(f"{case}/t", t32)
        store.put(f"{case}/log_snr", fn(t32))
        store.put(f"{case}/log_snr_f64", fn(t64))
        store.case(
            case,
            reference="lucid",
            function=description,
            n_points=int(t32.numel()),
            t="float32 linspace(0, 1, 201) then [1e-6, 0.999999]",
            log_snr="fn(t) in float32",
            log_snr_f64="fn(t.double()) in float64",
        )
    return store


# ----------------------------------------------------------------------------------------------
# 2. respacing.npz


def gen_respacing(refs) -> Store:
    store = Store("respacing")
    space_timesteps = refs.respace.space_timesteps

    def concatenated(steps, specs):
        values, offsets, invalid, first_error = [], [0], [], None
        for n, spec in specs:
            try:
                kept = sorted(space_timesteps(steps, spec))
            except ValueError as error:
                invalid.append(n)
                first_error = first_error or error_text(error)
                continue
            values.extend(kept)
            offsets.append(len(values))
        return values, offsets, invalid, first_error

    ns_1000 = list(range(1, 1001))
    ns_4000 = sorted(set(range(1, 4001, 7)) | {21, 50, 250, 1000})
    for steps, ns in ((1000, ns_1000), (4000, ns_4000)):
        values, offsets, invalid, _ = concatenated(steps, [(n, str(n)) for n in ns])
        assert not invalid
        case = f"openai/space_all/{steps}"
        store.put(f"{case}/values", np.asarray(values, np.int64))
        store.put(f"{case}/offsets", np.asarray(offsets, np.int64))
        store.put(f"{case}/ns", np.asarray(ns, np.int64))
        store.case(
            case,
            T=steps,
            spec='section string "N" for each N in ns',
            layout="list i = sorted(space_timesteps(T, str(ns[i]))) = "
            "values[offsets[i]:offsets[i+1]]",
        )

    valid, ddim_invalid = [], []
    for n in ns_1000:
        try:
            space_timesteps(1000, f"ddim{n}")
        except ValueError:
            ddim_invalid.append(n)
        else:
            valid.append(n)
    values, offsets, invalid, _ = concatenated(1000, [(n, f"ddim{n}") for n in valid])
    assert not invalid
    _, _, _, ddim_error = concatenated(1000, [(ddim_invalid[0], f"ddim{ddim_invalid[0]}")])
    case = "openai/ddim_all/1000"
    store.put(f"{case}/values", np.asarray(values, np.int64))
    store.put(f"{case}/offsets", np.asarray(offsets, np.int64))
    store.put(f"{case}/ns", np.asarray(valid, np.int64))
    store.put(f"{case}/invalid", np.asarray(ddim_invalid, np.int64))
    store.case(
        case,
        T=1000,
        spec='"ddimN" for N in 1..1000',
        layout="valid N in ns; list i = values[offsets[i]:offsets[i+1]]; "
        "invalid lists the N that raise ValueError",
        error_example=f"ddim{ddim_invalid[0]}: {ddim_error}",
    )

    singles = [
        (300, "10,15,20"),
        (37, "7,3,5"),
        (10, "1,1"),
        (4000, "50"),
        (1000, "10"),
        (37, "37"),
    ]
    raising = [
        (37, "40"),
        (60, "2,50"),
        (10, "ddim7"),
        (1000, "ddim1"),
        (1000, "ddim37"),
        (1000, "ddim45"),
    ]
    for steps, spec in singles + raising:
        case = f"openai/space/{steps}/{spec}"
        try:
            kept = sorted(space_timesteps(steps, spec))
        except ValueError as error:
            store.case(case, T=steps, spec=spec, error=error_text(error))
            continue
        store.put(case, np.asarray(kept, np.int64))
        store.case(case, T=steps, spec=spec)

    for schedule, steps, spec in (
        ("linear", 1000, "ddim50"),
        ("linear", 1000, "ddim10"),
        ("cosine", 4000, "50"),
        ("cosine", 1000, "10,15,20"),
        ("linear", 37, "7,3,5"),
    ):
        case = f"openai/spaced/{schedule}/T{steps}/{spec}"
        diffusion = openai_diffusion(refs, schedule, steps, spec)
        store.put_all(case, openai_tables(diffusion))
        store.put(f"{case}/timestep_map", np.asarray(diffusion.timestep_map, np.int64))
        store.case(case, schedule=schedule, T=steps, spec=spec, num_steps=diffusion.num_timesteps)
    return store


# ----------------------------------------------------------------------------------------------
# 3. gaussian_openai.npz


def openai_process(store, refs, prefix, schedule, steps, respacing, rescale, batch, mv_pairs):
    base = openai_diffusion(refs, schedule, steps, respacing, rescale=rescale)
    num_steps = base.num_timesteps
    t_list = discrete_t(num_steps) if batch == BATCH else [num_steps // 2]
    input_seed = seed_for(f"gaussian_openai:{prefix}:inputs")
    x0, noise = standard_inputs(input_seed, batch)
    t = torch.tensor(t_list, dtype=torch.int64)
    store.put_all(f"{prefix}/inputs", {"x0": x0, "noise": noise, "t": t})
    with torch.no_grad():
        x_t = base.q_sample(x0, t, noise=noise)
        q_mean, q_var, q_logvar = base.q_mean_variance(x0, t)
        post_mean, post_var, post_logvar = base.q_posterior_mean_variance(x_start=x0, x_t=x_t, t=t)
        store.put(f"{prefix}/q_sample", x_t)
        store.put_all(
            f"{prefix}/q_mean_variance",
            {"mean": q_mean, "variance": q_var, "log_variance": q_logvar},
        )
        store.put_all(
            f"{prefix}/q_posterior",
            {"mean": post_mean, "variance": post_var, "log_variance_clipped": post_logvar},
        )
        store.put(
            f"{prefix}/predict_xstart_from_eps",
            base._predict_xstart_from_eps(x_t=x_t, t=t, eps=noise),
        )
        store.put(
            f"{prefix}/predict_eps_from_xstart",
            base._predict_eps_from_xstart(x_t=x_t, t=t, pred_xstart=x0),
        )
        store.put(f"{prefix}/prior_bpd", base._prior_bpd(x0))

    model_time = None
    for mean, var in mv_pairs:
        case = f"{prefix}/{mean.lower()}/{var.lower()}"
        out_channels = 2 * CHANNELS if var in LEARNED_VAR_TYPES else CHANNELS
        param_seed = seed_for(f"gaussian_openai:{case}:params")
        params = tanh_params(param_seed, out_channels, S_STD_DISCRETE)
        model = TanhModel(params, continuous=False)
        store.put_all(case, params)
        diffusion = openai_diffusion(
            refs, schedule, steps, respacing, mean=mean, var=var, rescale=rescale
        )
        with torch.no_grad():
            store.put(f"{case}/model_output", openai_model_call(refs, diffusion, model, x_t, t))
            if model_time is None:
                model_time = model.last_time_input
            assert torch.equal(model_time, model.last_time_input)
            for clip in (True, False):
                tag = "clip" if clip else "noclip"
                out = diffusion.p_mean_variance(model, x_t, t, clip_denoised=clip)
                store.put_all(f"{case}/p_mean_variance/{tag}", out)
                vb = diffusion._vb_terms_bpd(model, x_start=x0, x_t=x_t, t=t, clip_denoised=clip)
                store.put_all(f"{case}/vb_terms_bpd/{tag}", vb)
        loss_keys = {}
        openai_float64_run(
            refs,
            store,
            case,
            params,
            (schedule, steps, respacing, rescale),
            (mean, var),
            x0,
            x_t,
            noise,
            t,
        )
        for loss in LOSS_TYPES:
            diffusion = openai_diffusion(
                refs, schedule, steps, respacing, mean=mean, var=var, loss=loss, rescale=rescale
            )
            model.zero_grad(set_to_none=True)
            terms = diffusion.training_losses(model, x0, t, noise=noise.clone())
            terms["loss"].sum().backward()
            present = [name for name in ("loss", "mse", "vb") if name in terms]
            for name in present:
                store.put(f"{case}/training_losses/{loss}/{name}", terms[name])
            store.put_all(f"{case}/training_losses/{loss}", model.grads())
            loss_keys[loss] = present
        store.case(
            case,
            kind="model_case",
            process=prefix,
            schedule=schedule,
            T=steps,
            respacing=respacing,
            num_steps=num_steps,
            rescale_timesteps=rescale,
            batch=batch,
            t=t_list,
            mean_type=mean,
            var_type=var,
            out_channels=out_channels,
            param_seed=param_seed,
            training_loss_keys=loss_keys,
            s_std=S_STD_DISCRETE,
        )

    store.put(f"{prefix}/model_time", model_time)
    timestep_map = getattr(base, "timestep_map", None)
    store.case(
        prefix,
        kind="process",
        schedule=schedule,
        T=steps,
        respacing=respacing,
        num_steps=num_steps,
        rescale_timesteps=rescale,
        batch=batch,
        t=t_list,
        input_seed=input_seed,
        timestep_map=timestep_map,
        cases=[f"{prefix}/{m.lower()}/{v.lower()}" for m, v in mv_pairs],
    )


def openai_float64_run(refs, store, case, params, process, types, x0, x_t, noise, t):
    """The same calls in float64 (inputs and parameters upcast from the float32 ones), under
    ``{case}/f64``. improved-diffusion still casts its coefficients to float32, so the difference
    from the float32 run is the reference's own float32 arithmetic error; the parity tests use it
    to bound the agreement where the math is ill-conditioned (tail probabilities of the decoder,
    the PREVIOUS_X inversion by a tiny posterior coefficient)."""
    schedule, steps, respacing, rescale = process
    mean, var = types
    params64 = {k: v.astype(np.float64) for k, v in params.items()}
    model = TanhModel(params64, continuous=False)
    x0, x_t, noise = (a.to(torch.float64) for a in (x0, x_t, noise))
    diffusion = openai_diffusion(
        refs, schedule, steps, respacing, mean=mean, var=var, rescale=rescale
    )
    with torch.no_grad():
        for clip in (True, False):
            tag = "clip" if clip else "noclip"
            out = diffusion.p_mean_variance(model, x_t, t, clip_denoised=clip)
            store.put(f"{case}/f64/p_mean_variance/{tag}/pred_xstart", out["pred_xstart"].double())
            vb = diffusion._vb_terms_bpd(model, x_start=x0, x_t=x_t, t=t, clip_denoised=clip)
            store.put(f"{case}/f64/vb_terms_bpd/{tag}/output", vb["output"].double())
    for loss in LOSS_TYPES:
        diffusion = openai_diffusion(
            refs, schedule, steps, respacing, mean=mean, var=var, loss=loss, rescale=rescale
        )
        model.zero_grad(set_to_none=True)
        terms = diffusion.training_losses(model, x0, t, noise=noise.clone())
        terms["loss"].sum().backward()
        for name in ("loss", "vb"):
            if name in terms:
                store.put(f"{case}/f64/training_losses/{loss}/{name}", terms[name].double())
        for name, grad in model.grads().items():
            store.put(f"{case}/f64/training_losses/{loss}/{name}", grad.double())


def gen_gaussian_openai(refs) -> Store:
    store = Store("gaussian_openai")
    processes = [
        ("linear", 1000, None, True),
        ("cosine", 1000, None, True),
        ("linear", 4000, None, True),
        ("cosine", 4000, None, True),
        ("linear", 37, None, False),
        ("cosine", 37, None, True),
        ("linear", 1000, "ddim50", False),
        ("cosine", 1000, "10,15,20", True),
    ]
    all_pairs = [(m, v) for m in MEAN_TYPES for v in VAR_TYPES]
    for schedule, steps, respacing, rescale in processes:
        prefix = f"{schedule}/T{steps}" + (f"/{respacing}" if respacing else "")
        openai_process(store, refs, prefix, schedule, steps, respacing, rescale, BATCH, all_pairs)
    b1_pairs = [("EPSILON", "FIXED_LARGE"), ("EPSILON", "LEARNED_RANGE")]
    for schedule, steps, rescale in (("linear", 1000, True), ("cosine", 37, True)):
        prefix = f"{schedule}/T{steps}/b1"
        openai_process(store, refs, prefix, schedule, steps, None, rescale, 1, b1_pairs)
    return store


# ----------------------------------------------------------------------------------------------
# 4. gaussian_lucid.npz


def likelihood_inputs() -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed_for("likelihood:normal_kl_inputs"))
    kl = {
        "mean1": rng.normal(0.0, 1.0, 64).astype(np.float32),
        "logvar1": rng.uniform(-6.0, 3.0, 64).astype(np.float32),
        "mean2": rng.normal(0.0, 1.0, 64).astype(np.float32),
        "logvar2": rng.uniform(-6.0, 3.0, 64).astype(np.float32),
    }
    pixels = np.arange(256, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)
    means = np.linspace(-1.2, 1.2, 7).astype(np.float32)
    log_scales = np.linspace(math.log(1 / 255) - 2.0, 1.0, 7).astype(np.float32)
    x, m, s = np.meshgrid(pixels, means, log_scales, indexing="ij")
    grid = {"x": x, "means": m, "log_scales": s}
    far_means = np.array([-3.0, -2.0, -1.5, -1.05, 1.05, 1.5, 2.0, 3.0], np.float32)
    ux, um = np.meshgrid(pixels, far_means, indexing="ij")
    underflow = {"x": ux, "means": um, "log_scales": np.full_like(ux, -12.0)}
    cdf_x = np.linspace(-8.0, 8.0, 1001).astype(np.float32)
    return {"normal_kl": kl, "grid": grid, "underflow": underflow, "cdf_x": {"x": cdf_x}}


def tensors(mapping: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(value.copy()) for name, value in mapping.items()}


def gen_gaussian_lucid(refs) -> Store:
    store = Store("gaussian_lucid")
    lgd = refs.lgd
    for schedule in ("linear", "cosine", "sigmoid"):
        for steps in (1000, 37):
            prefix = f"{schedule}/T{steps}"
            input_seed = seed_for(f"gaussian_lucid:{prefix}:inputs")
            x0, noise = standard_inputs(input_seed, BATCH)
            t_list = discrete_t(steps)
            t = torch.tensor(t_list, dtype=torch.int64)
            store.put_all(f"{prefix}/inputs", {"x0": x0, "noise": noise, "t": t})
            base = lucid_gaussian(
                refs, TanhModel(zero_params(CHANNELS), continuous=False), schedule, steps
            )
            with torch.no_grad():
                x_t = base.q_sample(x0, t, noise=noise.clone())
                v = base.predict_v(x0, t, noise)
                post = base.q_posterior(x0, x_t, t)
                store.put(f"{prefix}/q_sample", x_t)
                store.put(
                    f"{prefix}/predict_start_from_noise",
                    base.predict_start_from_noise(x_t, t, noise),
                )
                store.put(
                    f"{prefix}/predict_noise_from_start", base.predict_noise_from_start(x_t, t, x0)
                )
                store.put(f"{prefix}/predict_v", v)
                store.put(f"{prefix}/predict_start_from_v", base.predict_start_from_v(x_t, t, v))
                store.put_all(
                    f"{prefix}/q_posterior",
                    dict(zip(("mean", "variance", "log_variance_clipped"), post, strict=True)),
                )
            store.case(
                prefix,
                kind="process",
                schedule=schedule,
                T=steps,
                t=t_list,
                input_seed=input_seed,
                auto_normalize=False,
            )
            for objective in LUCID_OBJECTIVES:
                lucid_objective_case(
                    store, refs, prefix, schedule, steps, objective, x0, noise, t, x_t
                )
            lucid_learned_case(store, refs, prefix, schedule, steps, x0, noise, t, x_t)

    inputs = likelihood_inputs()
    kl = tensors(inputs["normal_kl"])
    store.put_all("likelihood/normal_kl", kl)
    store.put(
        "likelihood/normal_kl/out",
        lgd.normal_kl(kl["mean1"], kl["logvar1"], kl["mean2"], kl["logvar2"]),
    )
    cdf_x = torch.from_numpy(inputs["cdf_x"]["x"].copy())
    store.put("likelihood/approx_cdf/x", cdf_x)
    store.put("likelihood/approx_cdf/out", lgd.approx_standard_normal_cdf(cdf_x))
    grid = tensors(inputs["grid"])
    store.put_all("likelihood/discretized", grid)
    store.put(
        "likelihood/discretized/out",
        lgd.discretized_gaussian_log_likelihood(
            grid["x"], means=grid["means"], log_scales=grid["log_scales"]
        ),
    )
    store.case(
        "likelihood/normal_kl",
        kind="likelihood",
        function="normal_kl",
        n=64,
        seed=SEEDS["likelihood:normal_kl_inputs"],
    )
    store.case(
        "likelihood/approx_cdf",
        kind="likelihood",
        function="approx_standard_normal_cdf",
        x="float32 linspace(-8, 8, 1001)",
    )
    store.case(
        "likelihood/discretized",
        kind="likelihood",
        function="discretized_gaussian_log_likelihood (thres=0.999 default)",
        grid="[256 pixel values p/127.5-1] x [7 means linspace(-1.2,1.2)] x "
        "[7 log_scales linspace(log(1/255)-2, 1)], meshgrid indexing ij, float32",
    )
    return store


def lucid_objective_case(store, refs, prefix, schedule, steps, objective, x0, noise, t, x_t):
    case = f"{prefix}/{objective}"
    param_seed = seed_for(f"gaussian_lucid:{case}:params")
    params = tanh_params(param_seed, CHANNELS, S_STD_DISCRETE)
    model = TanhModel(params, continuous=False)
    store.put_all(case, params)
    diffusion = lucid_gaussian(refs, model, schedule, steps, objective=objective)
    with torch.no_grad():
        store.put(f"{case}/model_output", model(x_t, t))
        for tag, clip, rederive in (
            ("clip", True, True),
            ("clip_norederive", True, False),
            ("noclip", False, False),
        ):
            pred = diffusion.model_predictions(
                x_t, t, None, clip_x_start=clip, rederive_pred_noise=rederive
            )
            store.put_all(
                f"{case}/model_predictions/{tag}",
                {"pred_noise": pred.pred_noise, "pred_x_start": pred.pred_x_start},
            )
        for clip in (True, False):
            tag = "clip" if clip else "noclip"
            out = diffusion.p_mean_variance(x=x_t, t=t, clip_denoised=clip)
            store.put_all(
                f"{case}/p_mean_variance/{tag}",
                dict(zip(("mean", "variance", "log_variance", "x_start"), out, strict=True)),
            )
    torch_seeds = {}
    for mode in ("off", "g5"):
        weighted = lucid_gaussian(
            refs, model, schedule, steps, objective=objective, min_snr_gamma=MIN_SNR_MODES[mode]
        )
        for strength in (0.0, 0.1):
            key = f"{case}/p_losses/{mode}/off{strength:g}"
            torch_seed = seed_for(f"gaussian_lucid:{key}:torch")
            torch_seeds[f"{mode}/off{strength:g}"] = torch_seed
            model.zero_grad(set_to_none=True)
            noise_arg = noise.clone()  # p_losses adds the offset noise to it in place
            torch.manual_seed(torch_seed)
            loss = weighted.p_losses(
                x0, t, noise=noise_arg, offset_noise_strength=strength, loss_reduction="none"
            )
            loss.sum().backward()
            store.put(f"{key}/loss", loss)
            store.put_all(key, model.grads())
            if strength > 0:
                torch.manual_seed(torch_seed)
                offset = torch.randn(x0.shape[:2])
                assert torch.equal(noise_arg, noise + strength * offset[:, :, None, None])
                store.put(f"{key}/offset_noise", offset)
            else:
                assert torch.equal(noise_arg, noise)
    store.case(
        case,
        kind="objective_case",
        process=prefix,
        schedule=schedule,
        T=steps,
        objective=objective,
        param_seed=param_seed,
        s_std=S_STD_DISCRETE,
        p_losses_torch_seeds=torch_seeds,
        min_snr_gamma={"off": None, "g5": 5},
        offset_noise_strengths=[0.0, 0.1],
        offset_noise="torch.manual_seed(seed); torch.randn(B, C) inside p_losses",
    )


def lucid_learned_case(store, refs, prefix, schedule, steps, x0, noise, t, x_t):
    lgd = refs.lgd
    case = f"{prefix}/learned"
    param_seed = seed_for(f"gaussian_lucid:{case}:params")
    params = tanh_params(param_seed, 2 * CHANNELS, S_STD_DISCRETE)
    model = TanhModel(params, continuous=False)
    store.put_all(case, params)
    diffusion = lgd.LearnedGaussianDiffusion(
        model,
        vb_loss_weight=0.001,
        image_size=SIZE,
        timesteps=steps,
        beta_schedule=schedule,
        objective="pred_noise",
        auto_normalize=False,
    )
    with torch.no_grad():
        model_output = model(x_t, t)
        store.put(f"{case}/model_output", model_output)
        for clip in (True, False):
            tag = "clip" if clip else "noclip"
            out = diffusion.p_mean_variance(x=x_t, t=t, clip_denoised=clip)
            store.put_all(
                f"{case}/p_mean_variance/{tag}",
                dict(zip(("mean", "variance", "log_variance", "x_start"), out, strict=True)),
            )
        try:
            diffusion.model_predictions(x_t, t)
            model_predictions = "ok"
        except REFERENCE_ERRORS as error:
            model_predictions = error_text(error)
    model.zero_grad(set_to_none=True)
    loss = diffusion.p_losses(x0, t, noise=noise.clone(), loss_reduction="none")
    loss.sum().backward()
    store.put(f"{case}/p_losses/loss", loss)
    store.put_all(f"{case}/p_losses", model.grads())
    # The same loss in float64 (see openai_float64_run): the decoder term at t = 0 sits in the
    # CDF's tails, where the float32 reference saturates and floors.
    model64 = TanhModel({k: v.astype(np.float64) for k, v in params.items()}, continuous=False)
    diffusion.model = model64
    loss64 = diffusion.p_losses(x0.double(), t, noise=noise.clone().double(), loss_reduction="none")
    loss64.sum().backward()
    store.put(f"{case}/f64/p_losses/loss", loss64.double())
    store.put_all(f"{case}/f64/p_losses", {k: v.double() for k, v in model64.grads().items()})
    diffusion.model = model

    # The kl / decoder-nll pieces are internal to p_losses; recompose them from the module's own
    # helpers on the same upstream intermediates (clip_denoised=False as p_losses' default), and
    # check that they add up to the upstream loss.
    with torch.no_grad():
        true_mean, _, true_log_var = diffusion.q_posterior(x_start=x0, x_t=x_t, t=t)
        model_mean, _, model_log_var, _ = diffusion.p_mean_variance(
            x=x_t, t=t, clip_denoised=False, model_output=model_output
        )
        kl = lgd.meanflat(lgd.normal_kl(true_mean, true_log_var, model_mean, model_log_var))
        kl = kl * lgd.NAT
        decoder_nll = -lgd.discretized_gaussian_log_likelihood(
            x0, means=model_mean, log_scales=0.5 * model_log_var
        )
        decoder_nll = lgd.meanflat(decoder_nll) * lgd.NAT
        mse = lgd.meanflat((model_output.chunk(2, dim=1)[0] - noise) ** 2)
        recomposed = mse + torch.where(t == 0, decoder_nll, kl) * diffusion.vb_loss_weight
    pieces_gap = float((recomposed - loss.detach()).abs().max())
    assert pieces_gap <= 1e-6, pieces_gap
    store.put_all(f"{case}/p_losses/pieces", {"kl": kl, "decoder_nll": decoder_nll, "mse": mse})
    store.case(
        case,
        kind="learned_case",
        process=prefix,
        schedule=schedule,
        T=steps,
        objective="pred_noise",
        vb_loss_weight=0.001,
        param_seed=param_seed,
        s_std=S_STD_DISCRETE,
        out_channels=2 * CHANNELS,
        p_losses_clip_denoised=False,
        pieces="recomposed from learned_gaussian_diffusion helpers; "
        f"mse + 0.001*where(t==0, decoder_nll, kl) matches loss to {pieces_gap:.1e}",
        model_predictions_call=model_predictions,
    )


# ----------------------------------------------------------------------------------------------
# 5. likelihood_openai.npz


def gen_likelihood_openai(refs) -> Store:
    store = Store("likelihood_openai")
    losses = refs.losses
    inputs = likelihood_inputs()
    kl = tensors(inputs["normal_kl"])
    store.put_all("normal_kl", kl)
    store.put(
        "normal_kl/out", losses.normal_kl(kl["mean1"], kl["logvar1"], kl["mean2"], kl["logvar2"])
    )
    store.case(
        "normal_kl",
        function="losses.normal_kl",
        n=64,
        seed=SEEDS["likelihood:normal_kl_inputs"],
        note="same inputs as gaussian_lucid likelihood/normal_kl",
    )
    cdf_x = torch.from_numpy(inputs["cdf_x"]["x"].copy())
    store.put("approx_standard_normal_cdf/x", cdf_x)
    store.put("approx_standard_normal_cdf/out", losses.approx_standard_normal_cdf(cdf_x))
    store.case(
        "approx_standard_normal_cdf",
        function="losses.approx_standard_normal_cdf",
        x="float32 linspace(-8, 8, 1001)",
    )
    for case, grid_name, description in (
        (
            "discretized_gaussian_log_likelihood",
            "grid",
            (
                "[256 pixel values] x [7 means linspace(-1.2,1.2)] x [7 log_scales "
                "linspace(log(1/255)-2, 1)], meshgrid ij, float32"
            ),
        ),
        (
            "discretized_gaussian_log_likelihood_underflow",
            "underflow",
            (
                "[256 pixel values] x means [-3,-2,-1.5,-1.05,1.05,1.5,2,3], log_scales = -12; "
                "probabilities underflow to the 1e-12 floors"
            ),
        ),
    ):
        grid = tensors(inputs[grid_name])
        store.put_all(case, grid)
        store.put(
            f"{case}/out",
            losses.discretized_gaussian_log_likelihood(
                grid["x"], means=grid["means"], log_scales=grid["log_scales"]
            ),
        )
        store.case(case, function="losses.discretized_gaussian_log_likelihood", grid=description)
    return store


# ----------------------------------------------------------------------------------------------
# 6. bpd_openai.npz


class RandnLikeRecorder:
    """Stands in for the ``th`` module inside improved_diffusion.gaussian_diffusion: forwards
    every attribute to torch, and keeps a copy of each ``randn_like`` draw."""

    def __init__(self, real):
        self._real = real
        self.draws: list[torch.Tensor] = []

    def __getattr__(self, name):
        return getattr(self._real, name)

    def randn_like(self, *args, **kwargs):
        out = self._real.randn_like(*args, **kwargs)
        self.draws.append(out.detach().clone())
        return out


def recorded_calc_bpd(refs, diffusion, model, x0, clip, torch_seed):
    """calc_bpd_loop with its per-step noise and the t of each step recorded."""
    gd = refs.gd
    recorder = RandnLikeRecorder(gd.th)
    t_order: list[int] = []
    q_sample = diffusion.q_sample

    def recording_q_sample(x_start, t, noise=None):
        t_order.append(int(t[0]))
        return q_sample(x_start, t, noise=noise)

    diffusion.q_sample = recording_q_sample
    gd.th = recorder
    try:
        torch.manual_seed(torch_seed)
        out = diffusion.calc_bpd_loop(model, x0, clip_denoised=clip)
    finally:
        gd.th = recorder._real
        del diffusion.q_sample
    assert len(recorder.draws) == len(t_order) == diffusion.num_timesteps
    return out, torch.stack(recorder.draws), np.asarray(t_order, np.int64)


def bpd_vb_float64(diffusion, params, x0, noise, t_order, clip):
    """calc_bpd_loop's VB terms recomputed in float64 from the recorded noise, step by step in
    the same loop order (see openai_float64_run for why)."""
    model = TanhModel({k: v.astype(np.float64) for k, v in params.items()}, continuous=False)
    x0 = x0.to(torch.float64)
    columns = []
    with torch.no_grad():
        for i, step in enumerate(to_numpy(t_order)):
            t = torch.full((x0.shape[0],), int(step), dtype=torch.int64)
            x_t = diffusion.q_sample(x0, t, noise=torch.as_tensor(noise[i]).to(torch.float64))
            out = diffusion._vb_terms_bpd(model, x_start=x0, x_t=x_t, t=t, clip_denoised=clip)
            columns.append(out["output"].double())
    return torch.stack(columns, dim=1)


def gen_bpd_openai(refs) -> Store:
    store = Store("bpd_openai")
    shape = (2, CHANNELS, SIZE, SIZE)
    constants = {"c0": 0.0, "c128": float(np.float32(128) / np.float32(127.5) - np.float32(1))}
    for steps in (1000, 4000):
        shared_seed = seed_for(f"bpd_openai:oracle/T{steps}:torch")
        shared_noise = None
        for schedule in ("linear", "cosine"):
            for var in ("FIXED_SMALL", "FIXED_LARGE"):
                for tag, value in constants.items():
                    case = f"oracle/{schedule}/T{steps}/{var.lower()}/{tag}"
                    diffusion = openai_diffusion(
                        refs, schedule, steps, mean="START_X", var=var, rescale=True
                    )
                    x0 = torch.full(shape, value, dtype=torch.float32)
                    out, noise, t_order = recorded_calc_bpd(
                        refs, diffusion, ConstantModel(x0), x0, True, shared_seed
                    )
                    if shared_noise is None:
                        shared_noise = noise
                        store.put(f"oracle/T{steps}/noise", noise)
                        store.put(f"oracle/T{steps}/t_order", t_order)
                    assert torch.equal(noise, shared_noise)
                    store.put(f"{case}/x0", x0)
                    store.put_all(case, out)
                    store.case(
                        case,
                        kind="oracle",
                        schedule=schedule,
                        T=steps,
                        num_steps=steps,
                        mean_type="START_X",
                        var_type=var,
                        constant=value,
                        clip_denoised=True,
                        rescale_timesteps=True,
                        torch_seed=shared_seed,
                        noise_key=f"oracle/T{steps}/noise",
                        t_order_key=f"oracle/T{steps}/t_order",
                    )

    tanh_cases = [("linear", 20, None, m, v, True) for m in MEAN_TYPES for v in VAR_TYPES]
    tanh_cases += [("cosine", 20, None, m, v, True) for m in MEAN_TYPES for v in VAR_TYPES]
    # Addition to the spec: linear T=20 has beta_{T-1} = 1 exactly, so alpha-bar_{T-1} = 0 and the
    # reference's sqrt(1/alpha-bar) tables are inf (NaN terms at t=T-1). T=24 is the same check
    # with finite tables.
    tanh_cases += [("linear", 24, None, m, v, True) for m in MEAN_TYPES for v in VAR_TYPES]
    tanh_cases.append(("linear", 1000, "ddim10", "EPSILON", "LEARNED_RANGE", True))
    tanh_cases.append(("cosine", 20, None, "EPSILON", "FIXED_SMALL", False))
    for schedule, steps, respacing, mean, var, clip in tanh_cases:
        case = f"tanh/{schedule}/T{steps}" + (f"/{respacing}" if respacing else "")
        case += f"/{mean.lower()}/{var.lower()}" + ("" if clip else "/noclip")
        input_seed = seed_for(f"bpd_openai:{case}:inputs")
        param_seed = seed_for(f"bpd_openai:{case}:params")
        torch_seed = seed_for(f"bpd_openai:{case}:torch")
        x0, _ = standard_inputs(input_seed, 2)
        out_channels = 2 * CHANNELS if var in LEARNED_VAR_TYPES else CHANNELS
        params = tanh_params(param_seed, out_channels, S_STD_DISCRETE)
        diffusion = openai_diffusion(
            refs, schedule, steps, respacing, mean=mean, var=var, rescale=True
        )
        out, noise, t_order = recorded_calc_bpd(
            refs, diffusion, TanhModel(params, continuous=False), x0, clip, torch_seed
        )
        store.put(f"{case}/x0", x0)
        store.put_all(case, params)
        store.put(f"{case}/noise", noise)
        store.put(f"{case}/t_order", t_order)
        store.put_all(case, out)
        vb64 = bpd_vb_float64(diffusion, params, x0, noise, t_order, clip)
        store.put(f"{case}/f64/vb", vb64)
        store.put(f"{case}/f64/total_bpd", vb64.sum(dim=1) + out["prior_bpd"].double())
        nonfinite = sorted(name for name, value in out.items() if not torch.isfinite(value).all())
        store.case(
            case,
            kind="tanh",
            schedule=schedule,
            T=steps,
            respacing=respacing,
            num_steps=diffusion.num_timesteps,
            mean_type=mean,
            var_type=var,
            clip_denoised=clip,
            rescale_timesteps=True,
            out_channels=out_channels,
            input_seed=input_seed,
            param_seed=param_seed,
            torch_seed=torch_seed,
            s_std=S_STD_DISCRETE,
            noise_key=f"{case}/noise",
            t_order_key=f"{case}/t_order",
            nonfinite_outputs=nonfinite,
        )
    return store


# ----------------------------------------------------------------------------------------------
# 7. continuous_lucid.npz


def gen_continuous_lucid(refs) -> Store:
    store = Store("continuous_lucid")
    pairs = [(1.0, 0.998), (0.5, 0.498), (0.002, 0.0)]
    pair_array = np.asarray(pairs, np.float32)
    variants = [
        ("ct", schedule, mode) for schedule in ("linear", "cosine") for mode in ("off", "g5")
    ]
    variants.append(("vparam", "cosine", None))
    for kind, schedule, mode in variants:
        for times_tag in ("fixed", "random"):
            case = f"{kind}/{schedule}" + (f"/{mode}" if mode else "") + f"/{times_tag}"
            input_seed = seed_for(f"continuous_lucid:{case}:inputs")
            param_seed = seed_for(f"continuous_lucid:{case}:params")
            x0, noise = standard_inputs(input_seed, BATCH)
            if times_tag == "fixed":
                times = torch.tensor([0.0, 1e-3, 0.5, 1.0], dtype=torch.float32)
                times_seed = None
            else:
                times_seed = seed_for(f"continuous_lucid:{case}:times")
                rng = np.random.default_rng(times_seed)
                times = torch.from_numpy(rng.uniform(0.0, 1.0, BATCH).astype(np.float32))
            params = tanh_params(param_seed, CHANNELS, S_STD_CONTINUOUS)
            model = TanhModel(params, continuous=True)
            store.put_all(f"{case}/inputs", {"x0": x0, "noise": noise, "times": times})
            store.put_all(case, params)

            def build(clip, kind=kind, schedule=schedule, mode=mode, model=model):
                if kind == "vparam":
                    return refs.vpd.VParamContinuousTimeGaussianDiffusion(
                        model, image_size=SIZE, channels=CHANNELS, clip_sample_denoised=clip
                    )
                return refs.ctd.ContinuousTimeGaussianDiffusion(
                    model,
                    image_size=SIZE,
                    channels=CHANNELS,
                    noise_schedule=schedule,
                    clip_sample_denoised=clip,
                    min_snr_loss_weight=mode == "g5",
                    min_snr_gamma=5,
                )

            diffusion = build(True)
            with torch.no_grad():
                sampled = diffusion.q_sample(x_start=x0, times=times, noise=noise.clone())
            names = ("x", "log_snr", "alpha", "sigma") if kind == "vparam" else ("x", "log_snr")
            store.put_all(f"{case}/q_sample", dict(zip(names, sampled, strict=True)))
            x = sampled[0]

            model.zero_grad(set_to_none=True)
            loss = diffusion.p_losses(x0, times, noise=noise.clone(), loss_reduction="none")
            loss.sum().backward()
            store.put(f"{case}/p_losses/loss", loss)
            store.put_all(f"{case}/p_losses", model.grads())

            store.put(f"{case}/p_mean_variance/time_pairs", pair_array)
            for clip in (True, False):
                tag = "clip" if clip else "noclip"
                diffusion = build(clip)
                for index, (time_now, time_next) in enumerate(pair_array):
                    with torch.no_grad():
                        mean, variance = diffusion.p_mean_variance(
                            x=x, time=torch.tensor(time_now), time_next=torch.tensor(time_next)
                        )
                    store.put_all(
                        f"{case}/p_mean_variance/{tag}/{index}",
                        {"mean": mean, "variance": variance},
                    )
            cls = (
                "VParamContinuousTimeGaussianDiffusion"
                if kind == "vparam"
                else "ContinuousTimeGaussianDiffusion"
            )
            store.case(
                case,
                cls=cls,
                noise_schedule=schedule,
                min_snr_gamma=5 if mode == "g5" else None,
                times=times_tag,
                time_pairs=pairs,
                input_seed=input_seed,
                param_seed=param_seed,
                times_seed=times_seed,
                s_std=S_STD_CONTINUOUS,
                model_time_input="log_snr (float32)",
                p_mean_variance_x="q_sample/x",
                q_sample_returns=list(names),
            )
    return store


# ----------------------------------------------------------------------------------------------
# 8. resample_openai.npz


def gen_resample_openai(refs) -> Store:
    store = Store("resample_openai")
    resample = refs.resample
    had_int = "int" in vars(np)
    if not had_int:
        # resample.py builds its count array with np.int, removed in NumPy 1.24.
        np.__dict__["int"] = int
    try:
        for steps, history, calls, batch in ((8, 10, 20, 6), (3, 2, 6, 4)):
            case = f"second_moment/T{steps}/h{history}"
            seed = seed_for(f"resample_openai:{case}")
            rng = np.random.default_rng(seed)
            ts = rng.integers(0, steps, size=(calls, batch)).astype(np.int64)
            ts[:, -1] = ts[:, 0]  # a duplicate timestep in every call
            losses = rng.uniform(0.05, 3.0, size=(calls, batch))
            diffusion = openai_diffusion(refs, "cosine", steps)
            sampler = resample.LossSecondMomentResampler(
                diffusion, history_per_term=history, uniform_prob=0.001
            )
            weights = [sampler.weights().copy()]
            warmed_up = [bool(sampler._warmed_up())]
            for call in range(calls):
                sampler.update_with_all_losses(
                    [int(v) for v in ts[call]], [float(v) for v in losses[call]]
                )
                weights.append(sampler.weights().copy())
                warmed_up.append(bool(sampler._warmed_up()))
            assert warmed_up[-1], f"{case}: never warmed up; pick another seed"
            store.put_all(
                case,
                {
                    "ts": ts,
                    "losses": losses,
                    "weights": np.asarray(weights, np.float64),
                    "warmed_up": np.asarray(warmed_up, np.bool_),
                },
            )
            store.case(
                case,
                sampler="LossSecondMomentResampler",
                T=steps,
                history_per_term=history,
                uniform_prob=0.001,
                calls=calls,
                batch=batch,
                seed=seed,
                first_warm_index=warmed_up.index(True),
                layout="weights[0] before any call, weights[i+1] after call i",
            )
    finally:
        if not had_int:
            del np.__dict__["int"]
    sampler = resample.UniformSampler(openai_diffusion(refs, "cosine", 8))
    store.put("uniform/T8/weights", np.asarray(sampler.weights()))
    store.case("uniform/T8", sampler="UniformSampler", T=8)
    return store


# ----------------------------------------------------------------------------------------------

GENERATORS = {
    "schedules": gen_schedules,
    "respacing": gen_respacing,
    "gaussian_openai": gen_gaussian_openai,
    "gaussian_lucid": gen_gaussian_lucid,
    "likelihood_openai": gen_likelihood_openai,
    "bpd_openai": gen_bpd_openai,
    "continuous_lucid": gen_continuous_lucid,
    "resample_openai": gen_resample_openai,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--improved-diffusion",
        type=Path,
        default=os.environ.get("IMPROVED_DIFFUSION_DIR"),
        help="folder containing the improved_diffusion package (default: $IMPROVED_DIFFUSION_DIR)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument(
        "--only", nargs="+", choices=sorted(GENERATORS), help="write only these files"
    )
    parser.add_argument(
        "--seed-table", type=Path, help="also write a markdown table of every seed used"
    )
    args = parser.parse_args(argv)
    if args.improved_diffusion is None:
        parser.error("--improved-diffusion or IMPROVED_DIFFUSION_DIR is required")

    torch.set_default_dtype(torch.float32)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    refs = load_references(Path(args.improved_diffusion))
    print(
        f"torch {torch.__version__}, numpy {np.__version__}, "
        f"denoising-diffusion-pytorch {refs.lucid_version}; "
        f"stand-ins: {', '.join(refs.stand_ins) or 'none'}"
    )
    args.out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    for name in args.only or GENERATORS:
        tick = time.perf_counter()
        store = GENERATORS[name](refs)
        path = store.write(args.out)
        print(
            f"{path.name}: {len(store.arrays)} arrays, {len(store.meta)} cases, "
            f"{path.stat().st_size / 1e6:.2f} MB, {time.perf_counter() - tick:.1f} s"
        )
        if store.nonfinite:
            print(
                f"  non-finite values in {len(store.nonfinite)} arrays, e.g. "
                f"{', '.join(store.nonfinite[:6])}"
            )
    print(f"total {time.perf_counter() - start:.1f} s")

    if args.seed_table:
        lines = ["| name | seed |", "|---|---|"]
        lines += [f"| `{name}` | {seed} |" for name, seed in sorted(SEEDS.items())]
        args.seed_table.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
