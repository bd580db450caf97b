"""Generate the jaxdiff parity fixtures by running the upstream PyTorch reference code.

References (see PROVENANCE.md):
  * denoising-diffusion-pytorch 2.3.4 ("lucid"), imported from the installed package;
  * openai/improved-diffusion at commit 1bc7bbb ("openai"), imported from ``--improved-diffusion``;
  * openai/guided-diffusion at commit 22e0df8 ("guided"), imported from ``--guided-diffusion``
    (only samplers.npz uses it).

Every stored result is what the upstream functions return; this script only builds inputs,
calls the references and saves their outputs. It never imports jaxdiff.

Regenerate (from the repository root):

    /work/ref/torchenv/bin/python tests/parity/generate_fixtures.py \\
        --improved-diffusion /work/ref --guided-diffusion /work/ref/guided

PROVENANCE.md describes each file and lists versions, seeds, the import-only stand-in modules
and the ``np.int`` patch. Every file's ``__meta__`` entry maps each case id to its parameters.
"""

from __future__ import annotations

import argparse
import contextlib
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
from fractions import Fraction
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


def load_references(improved_dir: Path, guided_dir: Path | None) -> types.SimpleNamespace:
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

    guided = None
    if guided_dir is not None:
        # guided-diffusion's package has its own top-level name, so both import side by side.
        sys.path.insert(0, str(guided_dir))
        from guided_diffusion import gaussian_diffusion as guided_gd
        from guided_diffusion import respace as guided_respace

        loaded_from = Path(guided_gd.__file__).resolve().parent.parent
        if loaded_from != guided_dir.resolve():
            raise RuntimeError(f"guided_diffusion imported from {loaded_from}, not {guided_dir}")
        # the same fields as this namespace, so openai_diffusion() builds guided processes too
        guided = types.SimpleNamespace(gd=guided_gd, respace=guided_respace)
    return types.SimpleNamespace(
        **lucid,
        gd=gd,
        respace=respace,
        losses=losses,
        resample=resample,
        guided=guided,
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


def run_store_main(argv, description: str, default_out: Path, generate, packages) -> int:
    """The ``main`` of a one-file generator (Unet, training): ``--out``, deterministic torch,
    the stand-ins, the versions of ``packages``, ``generate()`` -> a :class:`Store` written to
    ``--out``, its seeds; 1 when a value is non-finite."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=default_out, help="output folder")
    args = parser.parse_args(argv)

    torch.set_default_dtype(torch.float32)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    stand_ins = install_stand_ins()
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in packages)
    print(
        f"torch {torch.__version__}, numpy {np.__version__}, {versions}; "
        f"stand-ins: {', '.join(stand_ins) or 'none'}"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    tick = time.perf_counter()
    store = generate()
    path = store.write(args.out)
    print(
        f"{path.name}: {len(store.arrays)} arrays, {len(store.meta)} cases, "
        f"{path.stat().st_size / 1e6:.2f} MB, {time.perf_counter() - tick:.1f} s"
    )
    for name, seed in sorted(SEEDS.items()):
        print(f"  seed {name}: {seed}")
    if store.nonfinite:
        print(f"non-finite values in {store.nonfinite}")
        return 1
    return 0


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


def tanh_params(
    seed: int, out_channels: int, s_std: float, *, self_cond: bool = False
) -> dict[str, np.ndarray]:
    """W, b, s drawn in that order; with ``self_cond`` also V ~ N(0, 0.5²), drawn after s."""
    rng = np.random.default_rng(seed)
    params = {
        "W": rng.normal(0.0, 0.5, size=(out_channels, CHANNELS)).astype(np.float32),
        "b": rng.normal(0.0, 0.1, size=(out_channels,)).astype(np.float32),
        "s": rng.normal(0.0, s_std, size=(out_channels,)).astype(np.float32),
    }
    if self_cond:
        params["V"] = rng.normal(0.0, 0.5, size=(out_channels, CHANNELS)).astype(np.float32)
    return params


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


class SelfCondTanhModel(TanhModel):
    """out = tanh(W x + V x_self_cond + b + s tin), with x_self_cond = zeros when None."""

    def __init__(self, params: dict[str, np.ndarray]):
        super().__init__(params, continuous=False)
        self.V = torch.nn.Parameter(torch.from_numpy(params["V"].copy()))
        self.self_condition = True

    def forward(self, x, t, x_self_cond=None):
        if x_self_cond is None:
            x_self_cond = torch.zeros_like(x)
        tin = t.to(torch.float32)
        self.last_time_input = tin.detach().clone()
        h = torch.einsum("oc,nchw->nohw", self.W, x)
        h = h + torch.einsum("oc,nchw->nohw", self.V, x_self_cond)
        return torch.tanh(
            h + self.b[:, None, None] + self.s[None, :, None, None] * tin[:, None, None, None]
        )


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
# 9. samplers.npz

SAMPLER_SHAPE = (2, CHANNELS, SIZE, SIZE)
LUCID_DDPM_PROCESSES = (("cosine", 24), ("linear", 50))
LUCID_DDIM_STEPS = (10, 26, 60)
LUCID_DDIM_ETAS = (0.0, 1.0)
LUCID_DDIM_OBJECTIVES = ("pred_noise", "pred_v")
OPENAI_DDIM_PROCESSES = (("linear", "ddim10"), ("cosine", "25"))
OPENAI_DDIM_ETAS = (0.0, 0.5)
OPENAI_DDIM_PAIRS = (
    ("EPSILON", "FIXED_SMALL"),
    ("EPSILON", "LEARNED_RANGE"),
    ("START_X", "FIXED_LARGE"),
)
OPENAI_REVERSE_CASES = (
    ("linear", "ddim10", "EPSILON", "FIXED_SMALL"),
    ("cosine", "25", "START_X", "FIXED_LARGE"),
)
GUIDED_PAIRS = (("EPSILON", "LEARNED_RANGE"), ("START_X", "FIXED_SMALL"))
GUIDED_SCALE = 0.7
GUIDED_DDIM_ETA = 0.5
CONTINUOUS_STEPS = 10

STEP_LAYOUT = {
    "x_T": "[B, C, H, W] the starting image the reference drew (torch.randn / th.randn)",
    "step_noise": "[S, B, C, H, W] the randn_like draw of each loop iteration in loop order; "
    "zeros where the reference drew nothing (see steps_without_draw)",
}


class DrawRecorder(RandnLikeRecorder):
    """The recording proxy for the sampler loops: records ``randn`` as well as ``randn_like``,
    and tags each draw with the loop iteration that was running (-1 before the first)."""

    def __init__(self, real):
        super().__init__(real)
        self.step = -1
        self.tags: list[tuple[str, int]] = []

    def randn(self, *args, **kwargs):
        out = self._real.randn(*args, **kwargs)
        self.draws.append(out.detach().clone())
        self.tags.append(("randn", self.step))
        return out

    def randn_like(self, *args, **kwargs):
        out = super().randn_like(*args, **kwargs)
        self.tags.append(("randn_like", self.step))
        return out

    def by_step(self, num_steps: int, shape=SAMPLER_SHAPE):
        """(draws before the loop as (function, tensor) pairs, step_noise, steps without a draw)"""
        before = []
        step_noise = torch.zeros((num_steps, *shape), dtype=torch.float32)
        drawn = [False] * num_steps
        for draw, (function, step) in zip(self.draws, self.tags, strict=True):
            if step < 0:
                before.append((function, draw))
                continue
            assert function == "randn_like" and not drawn[step], (function, step)
            step_noise[step] = draw
            drawn[step] = True
        return before, step_noise, [i for i, d in enumerate(drawn) if not d]


def _copy(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
        return type(value)(*(_copy(v) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_copy(v) for v in value)
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    return value


class StepWrapper:
    """Replaces one per-iteration method on a reference instance: numbers its calls, points the
    recorder's draws at the running call, and keeps copies of the arguments and results."""

    def __init__(self, obj, name: str, recorder: DrawRecorder):
        self.obj, self.name, self.recorder = obj, name, recorder
        self.original = getattr(obj, name)
        self.args: list[tuple] = []
        self.results: list = []

    def __call__(self, *args, **kwargs):
        self.recorder.step = len(self.args)
        self.args.append(_copy((args, kwargs)))
        out = self.original(*args, **kwargs)
        self.results.append(_copy(out))
        return out

    def __enter__(self):
        setattr(self.obj, self.name, self)
        return self

    def __exit__(self, *exc):
        delattr(self.obj, self.name)  # the class's method is visible again


def _passthrough_tqdm(iterable=None, *args, **kwargs):
    return iterable


@contextlib.contextmanager
def patched(targets):
    """Temporarily set ``module.name = value`` for each (module, name, value)."""
    saved = [(module, name, getattr(module, name)) for module, name, _ in targets]
    for module, name, value in targets:
        setattr(module, name, value)
    try:
        yield
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)


@contextlib.contextmanager
def lucid_recording(refs):
    """The ``torch`` name of the three lucid modules replaced by a DrawRecorder, and their
    ``tqdm`` (an import-only stand-in that raises) by a pass-through, for one sampler call."""
    recorder = DrawRecorder(torch)
    modules = [refs.ddp, refs.ctd, refs.vpd]
    targets = [(m, "torch", recorder) for m in modules]
    targets += [(m, "tqdm", _passthrough_tqdm) for m in modules]
    with patched(targets):
        yield recorder


@contextlib.contextmanager
def openai_recording(gd):
    """The ``th`` name of an openai gaussian_diffusion module replaced by a DrawRecorder."""
    recorder = DrawRecorder(gd.th)
    with patched([(gd, "th", recorder)]):
        yield recorder


class TimeRecordingModel(torch.nn.Module):
    """Returns zeros (a pred_noise of 0) and keeps the time tensor it is fed at every call."""

    def __init__(self):
        super().__init__()
        self.channels = self.out_dim = 1
        self.self_condition = False
        self.random_or_learned_sinusoidal_cond = False
        self.times: list[int] = []

    def forward(self, x, t, x_self_cond=None):
        assert bool((t == t[0]).all()), t
        self.times.append(int(t[0]))
        return torch.zeros_like(x)


def recorded_ddim_time_pairs(refs, steps: int, sampling_steps: int) -> list[tuple[int, int]]:
    """The (time, time_next) pairs of lucid ``ddim_sample``, taken from a run of it: the list
    the reference hands its progress bar (its ``tqdm`` name is replaced by a recorder), checked
    against the times its model is fed and the noise it draws (only where time_next >= 0)."""
    model = TimeRecordingModel()
    diffusion = refs.ddp.GaussianDiffusion(
        model,
        image_size=1,
        timesteps=steps,
        sampling_timesteps=sampling_steps,
        auto_normalize=False,
    )
    iterated: list[list] = []

    def recording_tqdm(iterable=None, *args, **kwargs):
        iterated.append(list(iterable))
        return iterated[-1]

    draws = RandnLikeCounter(torch)
    targets = [(refs.ddp, "tqdm", recording_tqdm), (refs.ddp, "torch", draws)]
    with patched(targets):
        diffusion.ddim_sample((1, 1, 1, 1))
    assert len(iterated) == 1, len(iterated)
    pairs = [(int(a), int(b)) for a, b in iterated[0]]
    assert model.times == [time for time, _ in pairs], (model.times, pairs)
    assert draws.count == sum(time_next >= 0 for _, time_next in pairs)
    assert pairs[-1][1] == -1 and all(b >= 0 for _, b in pairs[:-1]), pairs
    return pairs


class RandnLikeCounter:
    """A stand-in for the ``torch`` name that counts ``randn_like`` calls; all else is torch."""

    def __init__(self, real):
        self._real, self.count = real, 0

    def __getattr__(self, name):
        return getattr(self._real, name)

    def randn_like(self, *args, **kwargs):
        self.count += 1
        return self._real.randn_like(*args, **kwargs)


def exact_time_pairs(steps: int, sampling_steps: int) -> list[tuple[int, int]]:
    """times_i = trunc(-1 + i*T/S) in exact rational arithmetic, reversed and paired."""
    times = [
        math.trunc(Fraction(-1) + Fraction(i * steps, sampling_steps))
        for i in range(sampling_steps + 1)
    ]
    times.reverse()
    return list(zip(times[:-1], times[1:], strict=False))


def sampler_model(case: str, out_channels: int, s_std: float, *, self_cond=False, continuous=False):
    param_seed = seed_for(f"samplers:{case}:params")
    params = tanh_params(param_seed, out_channels, s_std, self_cond=self_cond)
    if self_cond:
        return params, SelfCondTanhModel(params), param_seed
    return params, TanhModel(params, continuous=continuous), param_seed


def put_recorded(store, case, recorder, num_steps, steps, x_first):
    """Store x_T (the single randn before the loop, checked against the first image), the per-
    step noise and steps; return the loop iterations without a draw."""
    before, step_noise, no_draw = recorder.by_step(num_steps)
    assert [f for f, _ in before] == ["randn"], [f for f, _ in before]
    x_T = before[0][1]
    assert torch.equal(x_T, x_first)
    store.put(f"{case}/x_T", x_T)
    store.put(f"{case}/step_noise", step_noise)
    store.put(f"{case}/steps", steps)
    return no_draw


def lucid_ddpm_case(store, refs, case, schedule, steps, objective, self_cond):
    params, model, param_seed = sampler_model(case, CHANNELS, S_STD_DISCRETE, self_cond=self_cond)
    diffusion = refs.ddp.GaussianDiffusion(
        model,
        image_size=SIZE,
        timesteps=steps,
        sampling_timesteps=None,
        objective=objective,
        beta_schedule=schedule,
        auto_normalize=False,
    )
    torch_seed = seed_for(f"samplers:{case}:torch")
    with lucid_recording(refs) as recorder, StepWrapper(diffusion, "p_sample", recorder) as calls:
        torch.manual_seed(torch_seed)
        imgs = diffusion.p_sample_loop(SAMPLER_SHAPE, return_all_timesteps=True)
    imgs = imgs.transpose(0, 1)  # the reference stacks on dim 1: [B, S+1, ...]
    t_list = [int(args[1]) for args, _ in calls.args]
    assert t_list == list(range(steps))[::-1]
    for i, (img, _) in enumerate(calls.results):
        assert torch.equal(img, imgs[i + 1])
    if self_cond:  # the self-conditioning input is the previous step's x_start
        assert calls.args[0][0][2] is None
        for i in range(1, steps):
            assert torch.equal(calls.args[i][0][2], calls.results[i - 1][1])
    no_draw = put_recorded(store, case, recorder, steps, np.asarray(t_list, np.int64), imgs[0])
    store.put_all(case, params)
    store.put(f"{case}/imgs", imgs)
    store.put(f"{case}/x_start", torch.stack([x_start for _, x_start in calls.results]))
    store.case(
        case,
        kind="lucid_ddpm",
        reference="lucid",
        call="GaussianDiffusion.p_sample_loop(shape, return_all_timesteps=True)",
        schedule=schedule,
        T=steps,
        num_steps=steps,
        objective=objective,
        sampling_timesteps=None,
        auto_normalize=False,
        clip_denoised=True,
        shape=list(SAMPLER_SHAPE),
        model="selfcond_tanh" if self_cond else "tanh",
        self_condition=self_cond,
        model_time_input="the integer t",
        s_std=S_STD_DISCRETE,
        param_seed=param_seed,
        torch_seed=torch_seed,
        steps_without_draw=no_draw,
        layout={
            **STEP_LAYOUT,
            "steps": "[S] int64, t of each p_sample call (T-1 .. 0)",
            "imgs": "[S+1, B, C, H, W] x_T then the image after each step (the reference "
            "returns [B, S+1, ...]; stored transposed)",
            "x_start": "[S, B, C, H, W] the (clipped) x_start returned by each p_sample",
        },
    )


def lucid_ddim_case(store, refs, case, sampling_steps, eta, objective, self_cond):
    steps = 1000
    params, model, param_seed = sampler_model(case, CHANNELS, S_STD_DISCRETE, self_cond=self_cond)
    diffusion = refs.ddp.GaussianDiffusion(
        model,
        image_size=SIZE,
        timesteps=steps,
        sampling_timesteps=sampling_steps,
        ddim_sampling_eta=eta,
        objective=objective,
        beta_schedule="cosine",
        auto_normalize=False,
    )
    torch_seed = seed_for(f"samplers:{case}:torch")
    iterated: list[list] = []

    def recording_tqdm(iterable=None, *args, **kwargs):
        iterated.append(list(iterable))
        return iterated[-1]

    with (
        lucid_recording(refs) as recorder,
        StepWrapper(diffusion, "model_predictions", recorder) as calls,
        patched([(refs.ddp, "tqdm", recording_tqdm)]),
    ):
        torch.manual_seed(torch_seed)
        imgs = diffusion.ddim_sample(SAMPLER_SHAPE, return_all_timesteps=True)
    imgs = imgs.transpose(0, 1)
    assert len(iterated) == 1, len(iterated)
    pairs = [(int(a), int(b)) for a, b in iterated[0]]  # the list ddim_sample iterated over
    fed = [int(args[1][0]) for args, _ in calls.args]
    # the model is fed each pair's first time; noise is drawn exactly where time_next >= 0
    assert fed == [time for time, _ in pairs], (fed, pairs)
    steps_array = np.asarray(pairs, np.int64)
    no_draw = put_recorded(store, case, recorder, sampling_steps, steps_array, imgs[0])
    assert no_draw == [i for i, (_, time_next) in enumerate(pairs) if time_next < 0]
    if self_cond:  # the self-conditioning input is the previous step's x_start
        assert calls.args[0][0][2] is None
        for i in range(1, sampling_steps):
            assert torch.equal(calls.args[i][0][2], calls.results[i - 1].pred_x_start)
    store.put_all(case, params)
    store.put(f"{case}/imgs", imgs)
    store.put(f"{case}/time_pairs", steps_array)
    store.case(
        case,
        kind="lucid_ddim",
        reference="lucid",
        call="GaussianDiffusion.ddim_sample(shape, return_all_timesteps=True)",
        schedule="cosine",
        T=steps,
        sampling_timesteps=sampling_steps,
        num_steps=sampling_steps,
        ddim_sampling_eta=eta,
        objective=objective,
        auto_normalize=False,
        shape=list(SAMPLER_SHAPE),
        model="selfcond_tanh" if self_cond else "tanh",
        self_condition=self_cond,
        model_time_input="the integer time of each pair",
        s_std=S_STD_DISCRETE,
        param_seed=param_seed,
        torch_seed=torch_seed,
        steps_without_draw=no_draw,
        layout={
            **STEP_LAYOUT,
            "steps": "[S, 2] int64 (time, time_next) of each iteration; the same as time_pairs",
            "time_pairs": "[S, 2] int64, the pairs ddim_sample iterated over (recorded from "
            "the run, see PROVENANCE; checked against the times the model was fed)",
            "imgs": "[S+1, B, C, H, W] x_T then the image after each step (transposed from "
            "the reference's [B, S+1, ...]); the last step sets img = x_start",
        },
    )


def lucid_ddim_time_pairs_case(store, refs, steps):
    case = f"lucid/ddim_time_pairs/T{steps}"
    ns = list(range(1, steps + 1))
    values, offsets, differs, examples = [], [0], [], []
    for n in ns:
        pairs = recorded_ddim_time_pairs(refs, steps, n)
        exact = exact_time_pairs(steps, n)
        if pairs != exact:
            differs.append(n)
            if len(examples) < 5:
                index = next(i for i, (a, b) in enumerate(zip(pairs, exact, strict=True)) if a != b)
                examples.append(
                    {"S": n, "pair_index": index, "torch": pairs[index], "exact": exact[index]}
                )
        values.extend(pairs)
        offsets.append(len(values))
    store.put(f"{case}/values", np.asarray(values, np.int64))
    store.put(f"{case}/offsets", np.asarray(offsets, np.int64))
    store.put(f"{case}/ns", np.asarray(ns, np.int64))
    store.put(f"{case}/exact_differs", np.asarray(differs, np.int64))
    store.case(
        case,
        kind="lucid_ddim_time_pairs",
        reference="lucid",
        T=steps,
        call="GaussianDiffusion(model, image_size=1, timesteps=T, sampling_timesteps=S, "
        "auto_normalize=False).ddim_sample((1, 1, 1, 1)) for every S, with a model that returns "
        "zeros and records the time it is fed; the pairs are the list ddim_sample hands to its "
        "tqdm (recorded), checked against the fed times and the noise draws",
        layout="pairs for S = ns[i] are values[offsets[i]:offsets[i+1]] ([S, 2] int64, loop "
        "order); exact_differs lists the S whose pairs differ from trunc(-1 + i*T/S) in exact "
        "rational arithmetic",
        exact_differs_count=len(differs),
        exact_differs_examples=examples,
    )
    return differs


def openai_sampler_meta(diffusion, schedule, steps, respacing, mean, var):
    return {
        "schedule": schedule,
        "T": steps,
        "respacing": respacing,
        "num_steps": diffusion.num_timesteps,
        "mean_type": mean,
        "var_type": var,
        "rescale_timesteps": True,
        "shape": list(SAMPLER_SHAPE),
        "s_std": S_STD_DISCRETE,
    }


def openai_loop_case(
    store,
    ns,
    case,
    process,
    types_,
    *,
    loop,
    clip=True,
    eta=None,
    cond_fn=None,
    reference="openai",
):
    """One *_sample_loop_progressive run (``loop`` is "p_sample" or "ddim_sample") of the
    openai package ``ns`` (this script's refs for improved-diffusion, refs.guided for guided)."""
    schedule, steps, respacing = process
    mean, var = types_
    out_channels = 2 * CHANNELS if var in LEARNED_VAR_TYPES else CHANNELS
    params, model, param_seed = sampler_model(case, out_channels, S_STD_DISCRETE)
    diffusion = openai_diffusion(ns, schedule, steps, respacing, mean=mean, var=var, rescale=True)
    kwargs = {"clip_denoised": clip, "progress": False}
    if eta is not None:
        kwargs["eta"] = eta
    if cond_fn is not None:
        kwargs["cond_fn"] = cond_fn
        kwargs["model_kwargs"] = {}  # model_kwargs=None raises inside condition_* (PROVENANCE)
    progressive = getattr(diffusion, f"{loop}_loop_progressive")
    torch_seed = seed_for(f"samplers:{case}:torch")
    samples, pred_xstart = [], []
    with openai_recording(ns.gd) as recorder, StepWrapper(diffusion, loop, recorder) as calls:
        torch.manual_seed(torch_seed)
        for out in progressive(model, SAMPLER_SHAPE, **kwargs):
            samples.append(out["sample"].detach().clone())
            pred_xstart.append(out["pred_xstart"].detach().clone())
    num_steps = diffusion.num_timesteps
    t_list = []
    for args, _ in calls.args:
        t = args[2]
        assert torch.equal(t, torch.full_like(t, int(t[0])))
        t_list.append(int(t[0]))
    assert t_list == list(range(num_steps))[::-1]
    no_draw = put_recorded(
        store, case, recorder, num_steps, np.asarray(t_list, np.int64), calls.args[0][0][1]
    )
    assert not no_draw  # openai draws noise at every step, t = 0 included
    store.put_all(case, params)
    store.put(f"{case}/sample", torch.stack(samples))
    store.put(f"{case}/pred_xstart", torch.stack(pred_xstart))
    timestep_map = getattr(diffusion, "timestep_map", None)
    if timestep_map is not None:
        store.put(f"{case}/timestep_map", np.asarray(timestep_map, np.int64))
    meta = openai_sampler_meta(diffusion, schedule, steps, respacing, mean, var)
    meta.update(
        reference=reference,
        call=f"{type(diffusion).__name__}.{loop}_loop_progressive",
        clip_denoised=clip,
        eta=eta,
        out_channels=out_channels,
        param_seed=param_seed,
        torch_seed=torch_seed,
        steps_without_draw=no_draw,
        model_time_input="_scale_timesteps(t) = t * 1000 / T"
        if respacing is None
        else "timestep_map[t] * 1000 / T (the respacing wrapper)",
        layout={
            **STEP_LAYOUT,
            "step_noise": "[S, B, C, H, W] the th.randn_like draw of each step in loop order "
            "(drawn at t = 0 too, where the reference masks it)",
            "steps": "[S] int64, the (respaced) index t of each step, S-1 .. 0",
            "sample": "[S, B, C, H, W] out['sample'] of each yielded dict",
            "pred_xstart": "[S, B, C, H, W] out['pred_xstart'] of each yielded dict",
        },
    )
    if timestep_map is not None:
        meta["layout"]["timestep_map"] = "[S] int64, SpacedDiffusion.timestep_map"
    return meta, diffusion


def openai_reverse_case(store, refs, case, schedule, respacing, mean, var):
    steps = 1000
    out_channels = 2 * CHANNELS if var in LEARNED_VAR_TYPES else CHANNELS
    params, model, param_seed = sampler_model(case, out_channels, S_STD_DISCRETE)
    diffusion = openai_diffusion(refs, schedule, steps, respacing, mean=mean, var=var, rescale=True)
    num_steps = diffusion.num_timesteps
    t_list = [0, 1, num_steps // 2, num_steps - 2]
    input_seed = seed_for(f"samplers:{case}:inputs")
    rng = np.random.default_rng(input_seed)
    x = torch.from_numpy(rng.standard_normal(SAMPLER_SHAPE).astype(np.float32))
    samples, pred_xstart = [], []
    with openai_recording(refs.gd) as recorder, torch.no_grad():
        for t in t_list:
            out = diffusion.ddim_reverse_sample(
                model,
                x,
                torch.full((SAMPLER_SHAPE[0],), t, dtype=torch.int64),
                clip_denoised=True,
                eta=0.0,
            )
            samples.append(out["sample"].detach().clone())
            pred_xstart.append(out["pred_xstart"].detach().clone())
    assert not recorder.draws
    store.put_all(case, params)
    store.put(f"{case}/x", x)
    store.put(f"{case}/t", np.asarray(t_list, np.int64))
    store.put(f"{case}/sample", torch.stack(samples))
    store.put(f"{case}/pred_xstart", torch.stack(pred_xstart))
    store.put(f"{case}/timestep_map", np.asarray(diffusion.timestep_map, np.int64))
    meta = openai_sampler_meta(diffusion, schedule, steps, respacing, mean, var)
    store.case(
        case,
        kind="openai_ddim_reverse",
        reference="openai",
        call="SpacedDiffusion.ddim_reverse_sample(model, x, t, clip_denoised=True, eta=0.0)",
        **meta,
        clip_denoised=True,
        eta=0.0,
        t=t_list,
        out_channels=out_channels,
        param_seed=param_seed,
        input_seed=input_seed,
        model_time_input="timestep_map[t] * 1000 / T (the respacing wrapper)",
        layout={
            "x": "[B, C, H, W] N(0, 1) float32, the input of every call",
            "t": "[4] int64 respaced indices; call k uses t[k] for the whole batch",
            "sample": "[4, B, C, H, W] out['sample'] of call k",
            "pred_xstart": "[4, B, C, H, W] out['pred_xstart'] of call k",
            "timestep_map": "[S] int64",
        },
    )


def guided_cond_fn(target: torch.Tensor, scale: float, seen: list):
    """An analytic 'gradient of log p(y|x)' that also depends on its time input."""

    def cond_fn(x, t, **kwargs):
        seen.append(t.detach().clone())
        return -scale * (x - target) * (1 + 0.001 * t)[:, None, None, None]

    return cond_fn


def model_kwargs_none_error(refs, loop: str) -> str:
    """What guided-diffusion does with a cond_fn and the default model_kwargs=None."""
    ns = refs.guided
    diffusion = openai_diffusion(ns, "cosine", 24, mean="EPSILON", var="FIXED_SMALL", rescale=True)
    model = TanhModel(zero_params(CHANNELS), continuous=False)
    cond_fn = guided_cond_fn(torch.zeros(SAMPLER_SHAPE), GUIDED_SCALE, [])
    torch.manual_seed(0)
    try:
        next(
            iter(
                getattr(diffusion, f"{loop}_loop_progressive")(
                    model, SAMPLER_SHAPE, cond_fn=cond_fn
                )
            )
        )
    except REFERENCE_ERRORS as error:
        return error_text(error)
    return "ok"


def gen_samplers(refs) -> Store:
    store = Store("samplers")

    # 1-2. lucid DDPM ancestral sampling
    for schedule, steps in LUCID_DDPM_PROCESSES:
        for objective in LUCID_OBJECTIVES:
            case = f"lucid/ddpm/{schedule}/T{steps}/{objective}"
            lucid_ddpm_case(store, refs, case, schedule, steps, objective, False)
    case = "lucid/ddpm_selfcond/cosine/T24/pred_noise"
    lucid_ddpm_case(store, refs, case, "cosine", 24, "pred_noise", True)

    # 3. lucid DDIM
    for sampling_steps in LUCID_DDIM_STEPS:
        for eta in LUCID_DDIM_ETAS:
            for objective in LUCID_DDIM_OBJECTIVES:
                case = f"lucid/ddim/T1000/S{sampling_steps}/eta{eta}/{objective}"
                lucid_ddim_case(store, refs, case, sampling_steps, eta, objective, False)
    case = "lucid/ddim_selfcond/T1000/S10/eta0.0/pred_noise"
    lucid_ddim_case(store, refs, case, 10, 0.0, "pred_noise", True)

    # 4. lucid DDIM time pairs for every S
    for steps in (1000, 37):
        lucid_ddim_time_pairs_case(store, refs, steps)

    # 5. openai DDPM
    ddpm_cases = [("cosine", 24, m, v, True) for m in MEAN_TYPES for v in VAR_TYPES]
    ddpm_cases.append(("linear", 50, "EPSILON", "LEARNED_RANGE", False))
    for schedule, steps, mean, var, clip in ddpm_cases:
        case = f"openai/ddpm/{schedule}/T{steps}/{mean.lower()}/{var.lower()}"
        case += "" if clip else "/noclip"
        meta, _ = openai_loop_case(
            store,
            refs,
            case,
            (schedule, steps, None),
            (mean, var),
            loop="p_sample",
            clip=clip,
        )
        store.case(case, kind="openai_ddpm", **meta)

    # 6. openai DDIM on respaced processes
    for schedule, respacing in OPENAI_DDIM_PROCESSES:
        for eta in OPENAI_DDIM_ETAS:
            for mean, var in OPENAI_DDIM_PAIRS:
                case = f"openai/ddim/{schedule}/T1000/{respacing}/eta{eta}"
                case += f"/{mean.lower()}/{var.lower()}"
                meta, _ = openai_loop_case(
                    store,
                    refs,
                    case,
                    (schedule, 1000, respacing),
                    (mean, var),
                    loop="ddim_sample",
                    eta=eta,
                )
                store.case(case, kind="openai_ddim", **meta)

    # 7. openai DDIM reverse steps
    for schedule, respacing, mean, var in OPENAI_REVERSE_CASES:
        case = f"openai/ddim_reverse/{schedule}/T1000/{respacing}/{mean.lower()}/{var.lower()}"
        openai_reverse_case(store, refs, case, schedule, respacing, mean, var)

    # 8. guided-diffusion classifier guidance
    target_seed = seed_for("samplers:guided:target")
    target = torch.from_numpy(pixel_grid_x0(np.random.default_rng(target_seed), SAMPLER_SHAPE))
    none_errors = {
        "p_sample": model_kwargs_none_error(refs, "p_sample"),
        "ddim_sample": model_kwargs_none_error(refs, "ddim_sample"),
    }
    for tag, loop, eta, strategy in (
        ("cond_mean", "p_sample", None, "condition_mean"),
        ("cond_score", "ddim_sample", GUIDED_DDIM_ETA, "condition_score"),
    ):
        for mean, var in GUIDED_PAIRS:
            case = f"guided/{tag}/cosine/T24/{mean.lower()}/{var.lower()}"
            seen: list[torch.Tensor] = []
            cond_fn = guided_cond_fn(target, GUIDED_SCALE, seen)
            meta, diffusion = openai_loop_case(
                store,
                refs.guided,
                case,
                ("cosine", 24, None),
                (mean, var),
                loop=loop,
                eta=eta,
                cond_fn=cond_fn,
                reference="guided",
            )
            cond_t = torch.stack(seen)
            assert len(seen) == diffusion.num_timesteps
            expected_t = torch.stack(
                [
                    diffusion._scale_timesteps(torch.full((SAMPLER_SHAPE[0],), t))
                    for t in reversed(range(diffusion.num_timesteps))
                ]
            )
            assert torch.equal(cond_t, expected_t)
            store.put(f"{case}/target", target)
            store.put(f"{case}/scale", np.float32(GUIDED_SCALE))
            store.put(f"{case}/cond_t", cond_t)
            meta["layout"].update(
                target="[B, C, H, W] the cond_fn target (pixel-grid image)",
                scale="float32 scalar, the cond_fn scale",
                cond_t="[S, B] float32, the time input cond_fn received at each step "
                "(_scale_timesteps(t))",
            )
            store.case(
                case,
                kind=f"guided_{tag}",
                **meta,
                guidance=strategy,
                cond_fn="-scale * (x - target) * (1 + 0.001 * t)[:, None, None, None], "
                "t = the time input cond_fn receives",
                scale=GUIDED_SCALE,
                target_seed=target_seed,
                model_kwargs="{} (passed explicitly)",
                model_kwargs_none=none_errors[loop],
            )

    # 9. lucid continuous time
    continuous_cases = [
        ("ct", "linear", True),
        ("ct", "cosine", True),
        ("vparam", "cosine", True),
        ("ct", "cosine", False),
    ]
    for kind, schedule, clip in continuous_cases:
        case = f"lucid/continuous/{kind}/{schedule}/N{CONTINUOUS_STEPS}"
        case += "" if clip else "/noclip"
        lucid_continuous_case(store, refs, case, kind, schedule, clip)

    # 10. lucid interpolate
    lucid_interpolate_case(store, refs, "lucid/interpolate/cosine/T24/pred_noise")
    return store


def lucid_continuous_case(store, refs, case, kind, schedule, clip):
    params, model, param_seed = sampler_model(case, CHANNELS, S_STD_CONTINUOUS, continuous=True)
    if kind == "vparam":
        cls = "VParamContinuousTimeGaussianDiffusion"
        diffusion = refs.vpd.VParamContinuousTimeGaussianDiffusion(
            model,
            image_size=SIZE,
            channels=CHANNELS,
            num_sample_steps=CONTINUOUS_STEPS,
            clip_sample_denoised=clip,
        )
    else:
        cls = "ContinuousTimeGaussianDiffusion"
        diffusion = refs.ctd.ContinuousTimeGaussianDiffusion(
            model,
            image_size=SIZE,
            channels=CHANNELS,
            noise_schedule=schedule,
            num_sample_steps=CONTINUOUS_STEPS,
            clip_sample_denoised=clip,
        )
    torch_seed = seed_for(f"samplers:{case}:torch")
    with lucid_recording(refs) as recorder, StepWrapper(diffusion, "p_sample", recorder) as calls:
        torch.manual_seed(torch_seed)
        out = diffusion.p_sample_loop(SAMPLER_SHAPE)
    pairs = [[args[1], args[2]] for args, _ in calls.args]
    steps = torch.stack([torch.stack(pair) for pair in pairs]).to(torch.float32)
    imgs = torch.stack([calls.args[0][0][0], *calls.results])
    no_draw = put_recorded(store, case, recorder, CONTINUOUS_STEPS, steps, imgs[0])
    assert no_draw == [i for i, (_, time_next) in enumerate(pairs) if time_next == 0]
    store.put_all(case, params)
    store.put(f"{case}/imgs", imgs)
    store.put(f"{case}/out", out)
    store.case(
        case,
        kind="lucid_continuous",
        reference="lucid",
        cls=cls,
        call=f"{cls}.p_sample_loop(shape)",
        noise_schedule=schedule,
        num_sample_steps=CONTINUOUS_STEPS,
        num_steps=CONTINUOUS_STEPS,
        clip_sample_denoised=clip,
        shape=list(SAMPLER_SHAPE),
        model="tanh",
        model_time_input="log_snr(time) (float32), repeated over the batch",
        s_std=S_STD_CONTINUOUS,
        param_seed=param_seed,
        torch_seed=torch_seed,
        steps_without_draw=no_draw,
        layout={
            **STEP_LAYOUT,
            "steps": "[N, 2] float32 (time, time_next) of each p_sample call, from "
            "torch.linspace(1, 0, N + 1)",
            "imgs": "[N+1, B, C, H, W] x_T then each p_sample result; the last one before "
            "the final clamp and unnormalisation",
            "out": "[B, C, H, W] what p_sample_loop returned: (clamp(img, -1, 1) + 1) / 2",
        },
    )


def lucid_interpolate_case(store, refs, case):
    steps, t, lam = 24, 10, 0.3
    params, model, param_seed = sampler_model(case, CHANNELS, S_STD_DISCRETE)
    diffusion = refs.ddp.GaussianDiffusion(
        model,
        image_size=SIZE,
        timesteps=steps,
        sampling_timesteps=None,
        objective="pred_noise",
        beta_schedule="cosine",
        auto_normalize=False,
    )
    input_seed = seed_for(f"samplers:{case}:inputs")
    rng = np.random.default_rng(input_seed)
    x1 = torch.from_numpy(pixel_grid_x0(rng, SAMPLER_SHAPE))
    x2 = torch.from_numpy(pixel_grid_x0(rng, SAMPLER_SHAPE))
    torch_seed = seed_for(f"samplers:{case}:torch")
    with lucid_recording(refs) as recorder, StepWrapper(diffusion, "p_sample", recorder) as calls:
        torch.manual_seed(torch_seed)
        out = diffusion.interpolate(x1, x2, t=t, lam=lam)
    before, step_noise, no_draw = recorder.by_step(t)
    assert [f for f, _ in before] == ["randn_like", "randn_like"]
    q_noise = torch.stack([draw for _, draw in before])
    t_list = [int(args[1]) for args, _ in calls.args]
    assert t_list == list(range(t))[::-1]
    assert no_draw == [t - 1]  # p_sample at t = 0 uses 0. instead of a draw
    store.put_all(case, params)
    store.put(f"{case}/x1", x1)
    store.put(f"{case}/x2", x2)
    store.put(f"{case}/q_noise", q_noise)
    store.put(f"{case}/step_noise", step_noise)
    store.put(f"{case}/steps", np.asarray(t_list, np.int64))
    store.put(f"{case}/out", out)
    store.case(
        case,
        kind="lucid_interpolate",
        reference="lucid",
        call=f"GaussianDiffusion.interpolate(x1, x2, t={t}, lam={lam})",
        schedule="cosine",
        T=steps,
        objective="pred_noise",
        t=t,
        lam=lam,
        num_steps=t,
        auto_normalize=False,
        shape=list(SAMPLER_SHAPE),
        model="tanh",
        s_std=S_STD_DISCRETE,
        param_seed=param_seed,
        input_seed=input_seed,
        torch_seed=torch_seed,
        steps_without_draw=no_draw,
        layout={
            "x1": "[B, C, H, W] pixel-grid image",
            "x2": "[B, C, H, W] pixel-grid image (drawn after x1 from the same generator)",
            "q_noise": "[2, B, C, H, W] the randn_like draws inside q_sample: x1's, then x2's",
            "step_noise": "[t, B, C, H, W] the randn_like draw of each p_sample call; zeros at "
            "t = 0",
            "steps": "[t] int64, t-1 .. 0",
            "out": "[B, C, H, W] what interpolate returned",
        },
    )


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
    "samplers": gen_samplers,
}
# files whose generator needs --guided-diffusion
NEEDS_GUIDED = {"samplers"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--improved-diffusion",
        type=Path,
        default=os.environ.get("IMPROVED_DIFFUSION_DIR"),
        help="folder containing the improved_diffusion package (default: $IMPROVED_DIFFUSION_DIR)",
    )
    parser.add_argument(
        "--guided-diffusion",
        type=Path,
        default=os.environ.get("GUIDED_DIFFUSION_DIR"),
        help="folder containing the guided_diffusion package, needed for samplers.npz "
        "(default: $GUIDED_DIFFUSION_DIR)",
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
    selected = args.only or list(GENERATORS)
    if args.guided_diffusion is None and NEEDS_GUIDED.intersection(selected):
        parser.error(
            "--guided-diffusion or GUIDED_DIFFUSION_DIR is required for "
            + ", ".join(sorted(NEEDS_GUIDED.intersection(selected)))
        )

    torch.set_default_dtype(torch.float32)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    guided_dir = Path(args.guided_diffusion) if args.guided_diffusion is not None else None
    refs = load_references(Path(args.improved_diffusion), guided_dir)
    print(
        f"torch {torch.__version__}, numpy {np.__version__}, "
        f"denoising-diffusion-pytorch {refs.lucid_version}; "
        f"stand-ins: {', '.join(refs.stand_ins) or 'none'}"
    )
    args.out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    for name in selected:
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
