"""Generate ``fixtures/solvers_diffusers.npz`` and ``fixtures/solvers_kdiffusion.npz``: fast
diffusion samplers of diffusers 0.42.1 and k-diffusion 0.1.1, run step by step.

Both references drive one fixed deterministic network (the "solver tanh net", below) from one
fixed standard normal draw ``x_T_noise``; every network call, every step's output and every random
draw the references consume are recorded. This script only builds inputs, calls the references
and saves what they return. It never imports jaxdiff and contains no upstream code.

Regenerate (from the repository root; see PROVENANCE.md, "Fast solvers"):

    /work/ref/torchenv/bin/python tests/parity/generate_solver_fixtures.py

The network, with ``t`` the (possibly fractional) timestep the reference feeds it, cast to
float32 and broadcast over the batch, in float32 and in exactly this order:

    out[b, c, h, w] = tanh(((A[c] * x[b, c, h, w]) + ((Bt[c] * t[b]) / 1000)) + D[c])

The same network serves as an eps, x0 ("sample") or v model; the prediction type only changes
how the scheduler reads it. The seed derivation and the deterministic .npz writer are those of
``generate_fixtures.py``, loaded from this folder.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import inspect
import platform
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "fixtures"

SHAPE = (2, 3, 4, 4)  # B, C, H, W (NCHW, the references' layout)
NUM_TRAIN_TIMESTEPS = 1000

# beta schedule key -> constructor kwargs. Every diffusers scheduler gets num_train_timesteps and
# these explicitly (HeunDiscreteScheduler's own defaults are 0.00085 / 0.012).
BETAS: dict[str, dict] = {
    "linear": {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02},
    "scaledlin": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    "cos": {"beta_schedule": "squaredcos_cap_v2"},
}
# Training-length tables a scheduler may hold; stored once per beta schedule under
# ``tables/{beta}/{field}`` (identical for every class: checked bit for bit).
TABLE_FIELDS = ("alphas_cumprod", "alpha_t", "sigma_t", "lambda_t")

DIFFUSERS_CLASSES = (
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "UniPCMultistepScheduler",
    "DDIMScheduler",
    "DDPMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
)

# Import-only stand-ins for what k_diffusion/sampling.py and k_diffusion/utils.py import at module
# level but never call here (used only where the package is not installed).
KDIFF_STAND_INS: dict[str, dict[str, tuple[str, ...]]] = {
    "torchvision": {
        "torchvision": (),
        "torchvision.transforms": (),
        "torchvision.transforms.functional": (),
    },
    "torchdiffeq": {"torchdiffeq": ("odeint",)},
}


def _load_generator_module():
    spec = importlib.util.spec_from_file_location(
        "jaxdiff_parity_generate_fixtures", HERE / "generate_fixtures.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gf = _load_generator_module()

REFERENCE_ERRORS = gf.REFERENCE_ERRORS


def error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


# ----------------------------------------------------------------------------------------------
# The network and the inputs


def net_params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(gf.seed_for("solvers/net"))
    return {
        "A": 0.5 + torch.rand(SHAPE[1], generator=g),
        "Bt": 2.0 * torch.rand(SHAPE[1], generator=g) - 1.0,
        "D": 0.6 * torch.rand(SHAPE[1], generator=g) - 0.3,
    }


def x_t_noise() -> torch.Tensor:
    g = torch.Generator().manual_seed(gf.seed_for("solvers/x_T_noise"))
    return torch.randn(SHAPE, generator=g)


class TanhNet:
    """The deterministic network; records every call (input, t as fed, t as float32, output)."""

    def __init__(self, params: dict[str, torch.Tensor]):
        self.A = params["A"][None, :, None, None]
        self.Bt = params["Bt"][None, :, None, None]
        self.D = params["D"][None, :, None, None]
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        if x.dtype != torch.float32:
            raise TypeError(f"the net got {x.dtype} input")
        t_fed = torch.as_tensor(t)
        t32 = t_fed.to(torch.float32).reshape(-1).expand(x.shape[0])
        h = self.A * x
        h = h + (self.Bt * t32[:, None, None, None]) / 1000
        h = h + self.D
        out = torch.tanh(h)
        self.calls.append((x.clone(), t_fed.clone(), t32.clone(), out.clone()))
        return out


def stack(tensors, shape=SHAPE, dtype=torch.float32) -> torch.Tensor:
    if not tensors:
        return torch.zeros((0, *shape), dtype=dtype)
    return torch.stack([torch.as_tensor(t) for t in tensors])


def json_value(value):
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def versions(packages) -> dict[str, str]:
    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
    }
    for package in packages:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[package] = importlib.metadata.version(package)
    return out


# ----------------------------------------------------------------------------------------------
# diffusers


def load_diffusers():
    import diffusers

    classes = {name: getattr(diffusers, name) for name in DIFFUSERS_CLASSES}
    modules = {name: sys.modules[cls.__module__] for name, cls in classes.items()}
    return types.SimpleNamespace(classes=classes, modules=modules, version=diffusers.__version__)


@contextlib.contextmanager
def recording_randn_tensor(module, draws: list):
    """Wrap the ``randn_tensor`` name of a scheduler module: same call, same tensor returned;
    a copy of every draw is appended to ``draws``."""
    if not hasattr(module, "randn_tensor"):  # UniPC, Heun: no random draws
        yield
        return
    original = module.randn_tensor

    def randn_tensor(*args, **kwargs):
        value = original(*args, **kwargs)
        draws.append(value.detach().clone())
        return value

    module.randn_tensor = randn_tensor
    try:
        yield
    finally:
        module.randn_tensor = original


def wrap_method(obj, name: str, record):
    """Instance attribute wrapping ``obj.name``: ``record(args, kwargs)`` then the original call."""
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        record(args, kwargs)
        return original(*args, **kwargs)

    setattr(obj, name, wrapper)


def config_dict(config) -> dict:
    # `_use_default_values` lists names in set order (not reproducible); the kwargs and the
    # other keys say the same.
    return json_value({k: v for k, v in dict(config).items() if k != "_use_default_values"})


class DiffusersRun:
    """Runs and records the diffusers cases into one Store."""

    def __init__(self, ref, params, noise):
        self.ref = ref
        self.params = params
        self.noise = noise
        self.store = gf.Store("solvers_diffusers")
        self.cases: list[dict] = []
        self.refused: list[dict] = []

    def build(self, cls_name: str, kwargs: dict, beta: str):
        full = {"num_train_timesteps": NUM_TRAIN_TIMESTEPS, **BETAS[beta], **kwargs}
        return self.ref.classes[cls_name](**full), full

    def refuse(self, name, cls_name, kwargs, n, stage, error):
        self.refused.append(
            {
                "name": name,
                "scheduler": cls_name,
                "kwargs": json_value(kwargs),
                "num_inference_steps": n,
                "stage": stage,
                "error": error_text(error),
            }
        )

    def put_tables(self, sched, beta: str) -> list[str]:
        fields = []
        for field in TABLE_FIELDS:
            if not hasattr(sched, field):
                continue
            value = gf.to_numpy(getattr(sched, field))
            key = f"tables/{beta}/{field}"
            if key in self.store.arrays:
                stored = self.store.arrays[key]
                if stored.dtype != value.dtype or not np.array_equal(stored, value):
                    raise RuntimeError(f"{type(sched).__name__}.{field} differs from {key}")
            else:
                self.store.put(key, value)
            fields.append(field)
        return fields

    def put_grid(self, name: str, sched) -> None:
        self.store.put(f"{name}/timesteps", sched.timesteps)
        if hasattr(sched, "sigmas"):
            self.store.put(f"{name}/sigmas", sched.sigmas)
        init = sched.init_noise_sigma
        self.store.put(f"{name}/init_noise_sigma", gf.to_numpy(init).reshape(()))

    def grid(self, name, cls_name, kwargs, n, beta="linear") -> None:
        try:
            sched, full = self.build(cls_name, kwargs, beta)
            sched.set_timesteps(n)
        except REFERENCE_ERRORS as error:
            self.refuse(name, cls_name, kwargs, n, "construct/set_timesteps", error)
            return
        tables = self.put_tables(sched, beta)
        self.put_grid(name, sched)
        self.cases.append(
            {
                "name": name,
                "scheduler": cls_name,
                "kwargs": json_value(full),
                "beta": beta,
                "num_inference_steps": n,
                "config": config_dict(sched.config),
                "grid_only": True,
                "nfe": 0,
                "tables": f"tables/{beta}",
                "table_fields": tables,
            }
        )

    def case(
        self, name, cls_name, kwargs, n, beta="linear", step_kwargs=None, reduced=False
    ) -> None:
        """One sampling loop. ``reduced`` (the 1000-step DDPM case only, for the file size)
        stores step_noise, step_noise_drawn and model_t of every step but ``sample`` only after
        the steps listed in ``sample_steps`` (0..9, then every tenth, the last included), and
        no model_input (the previous sample there), model_output (the net of it) or
        pred_original_sample."""
        step_kwargs = dict(step_kwargs or {})
        try:
            sched, full = self.build(cls_name, kwargs, beta)
        except REFERENCE_ERRORS as error:
            self.refuse(name, cls_name, kwargs, n, "construct", error)
            return
        config_before = config_dict(sched.config)
        sched.set_timesteps(n)
        config_after_set = config_dict(sched.config)

        net = TanhNet(self.params)
        module = self.ref.modules[cls_name]
        generator = torch.Generator().manual_seed(gf.seed_for(f"solvers_diffusers/{name}/step"))
        accepts = inspect.signature(sched.step).parameters
        if "generator" in accepts:
            step_kwargs_call = {**step_kwargs, "generator": generator}
        else:
            step_kwargs_call = step_kwargs

        # which solver update each step used (recorded by wrapping, the calls are unchanged)
        orders: list[int] = []
        corrector: list[int] = []
        if cls_name == "DPMSolverMultistepScheduler":
            for method, order in (
                ("dpm_solver_first_order_update", 1),
                ("multistep_dpm_solver_second_order_update", 2),
                ("multistep_dpm_solver_third_order_update", 3),
            ):
                wrap_method(sched, method, lambda a, k, order=order: orders.append(order))
        elif cls_name == "DPMSolverSinglestepScheduler":
            wrap_method(
                sched, "singlestep_dpm_solver_update", lambda a, k: orders.append(int(k["order"]))
            )
        elif cls_name == "UniPCMultistepScheduler":
            wrap_method(
                sched, "multistep_uni_p_bh_update", lambda a, k: orders.append(int(k["order"]))
            )
            wrap_method(
                sched, "multistep_uni_c_bh_update", lambda a, k: corrector.append(int(k["order"]))
            )

        x = self.noise * sched.init_noise_sigma
        rec = {k: [] for k in ("model_input", "sample", "pred_original_sample")}
        step_noise, drawn, corrector_per_step, heun_first = [], [], [], []
        try:
            for k, t in enumerate(sched.timesteps):
                if cls_name == "HeunDiscreteScheduler":
                    heun_first.append(bool(sched.state_in_first_order))
                inp = sched.scale_model_input(x, t)
                out = net(inp, t)
                draws: list[torch.Tensor] = []
                n_orders, n_corr = len(orders), len(corrector)
                with recording_randn_tensor(module, draws):
                    res = sched.step(out, t, x, **step_kwargs_call)
                if len(draws) > 1:
                    raise RuntimeError(f"{name}: step {k} drew {len(draws)} times")
                if cls_name in ("DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler"):
                    if len(orders) != n_orders + 1:
                        raise RuntimeError(f"{name}: step {k} ran {len(orders) - n_orders} updates")
                if cls_name == "UniPCMultistepScheduler":
                    corrector_per_step.append(corrector[-1] if len(corrector) > n_corr else 0)
                step_noise.append(draws[0] if draws else torch.zeros(SHAPE))
                drawn.append(bool(draws))
                rec["model_input"].append(inp.detach().clone())
                x = res.prev_sample
                rec["sample"].append(x.detach().clone())
                pred = getattr(res, "pred_original_sample", None)
                if pred is not None:
                    rec["pred_original_sample"].append(pred.detach().clone())
        except REFERENCE_ERRORS as error:
            self.refuse(name, cls_name, kwargs, n, f"step {len(rec['sample'])}", error)
            return
        bad = [k for k, v in enumerate(rec["sample"]) if not torch.isfinite(v).all()]
        if bad:
            error = FloatingPointError(
                f"prev_sample of step {bad[0]} (of {len(rec['sample'])}) is not finite"
            )
            self.refuse(name, cls_name, kwargs, n, f"step {bad[0]}", error)
            return

        tables = self.put_tables(sched, beta)
        self.put_grid(name, sched)
        put = self.store.put
        if not reduced:
            put(f"{name}/model_input", stack(rec["model_input"]))
        put(f"{name}/model_t", np.array([float(c[2][0]) for c in net.calls], dtype=np.float64))
        if not reduced:
            put(f"{name}/model_output", stack([c[3] for c in net.calls]))
        if reduced:
            steps = [k for k in range(len(rec["sample"])) if k < 10 or k % 10 == 9]
            put(f"{name}/sample_steps", np.array(steps, dtype=np.int64))
            put(f"{name}/sample", stack([rec["sample"][k] for k in steps]))
        else:
            put(f"{name}/sample", stack(rec["sample"]))
        if rec["pred_original_sample"] and not reduced:
            if len(rec["pred_original_sample"]) != len(rec["sample"]):
                raise RuntimeError(f"{name}: pred_original_sample on some steps only")
            put(f"{name}/pred_original_sample", stack(rec["pred_original_sample"]))
        put(f"{name}/step_noise", stack(step_noise))
        put(f"{name}/step_noise_drawn", np.array(drawn, dtype=bool))
        if orders:
            put(f"{name}/step_order", np.array(orders, dtype=np.int64))
        if cls_name == "UniPCMultistepScheduler":
            put(f"{name}/corrector_order", np.array(corrector_per_step, dtype=np.int64))
        if heun_first:
            put(f"{name}/heun_first_order", np.array(heun_first, dtype=bool))

        entry = {
            "name": name,
            "scheduler": cls_name,
            "kwargs": json_value(full),
            "beta": beta,
            "num_inference_steps": n,
            "step_kwargs": json_value(step_kwargs),
            "config": config_dict(sched.config),
            "nfe": len(net.calls),
            "num_steps": len(rec["sample"]),
            "tables": f"tables/{beta}",
            "table_fields": tables,
            "generator_seed": gf.SEEDS[f"solvers_diffusers/{name}/step"]
            if "generator" in accepts
            else None,
        }
        if reduced:
            entry["omitted_fields"] = ["model_input", "model_output", "pred_original_sample"]
        if config_after_set != config_before:
            entry["config_changed_by_set_timesteps"] = {
                key: [config_before.get(key), value]
                for key, value in config_after_set.items()
                if config_before.get(key) != value
            }
        self.cases.append(entry)


PRED = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
ALG = {
    "dpmsolver++": "dpmpp",
    "dpmsolver": "dpm",
    "sde-dpmsolver++": "sde-dpmpp",
    "sde-dpmsolver": "sde-dpm",
}
SPACINGS = ("linspace", "leading", "trailing")


def dpm_final_kwargs(algorithm: str) -> tuple[dict, str]:
    # dpmsolver / sde-dpmsolver refuse final_sigmas_type="zero" (the default); see `refused`.
    if algorithm in ("dpmsolver", "sde-dpmsolver"):
        return {"final_sigmas_type": "sigma_min"}, "-fsigmamin"
    return {}, ""


def diffusers_cases(run: DiffusersRun) -> None:
    """The case list. Cross products are kept to what each option interacts with (the
    prediction type only changes the conversion of the model output, so it is crossed with the
    algorithms at one n), so that the file stays near 3 MB."""
    # Configurations the classes refuse at construction (nothing stored; see `refused`).
    for cls_name, short in (
        ("DPMSolverMultistepScheduler", "dpmms"),
        ("DPMSolverSinglestepScheduler", "dpmss"),
    ):
        for algorithm in ("dpmsolver", "sde-dpmsolver"):
            kwargs = {"algorithm_type": algorithm}
            try:
                run.build(cls_name, kwargs, "linear")
            except REFERENCE_ERRORS as error:
                run.refuse(
                    f"probe-{short}-{ALG[algorithm]}", cls_name, kwargs, None, "construct", error
                )
            else:
                raise RuntimeError(f"{cls_name} accepted {kwargs}")

    # 1. DPMSolverMultistepScheduler
    cls = "DPMSolverMultistepScheduler"

    def dpm(alg, order, pred, n, extra="", beta="linear", **kwargs):
        final, suffix = dpm_final_kwargs(alg)
        if "final_sigmas_type" in kwargs:
            suffix = ""
        kwargs = {
            "algorithm_type": alg,
            "solver_order": order,
            "prediction_type": pred,
            **final,
            **kwargs,
        }
        run.case(f"{ALG[alg]}-{order}m-{PRED[pred]}-n{n}{extra}{suffix}", cls, kwargs, n, beta=beta)

    for alg in ALG:
        for order in (1, 2, 3):
            dpm(alg, order, "epsilon", 7)
        for order in (2, 3):
            dpm(alg, order, "epsilon", 20)
        for pred in ("sample", "v_prediction"):
            dpm(alg, 2, pred, 7)
    for order in (1, 3):
        for pred in ("sample", "v_prediction"):
            dpm("dpmsolver++", order, pred, 7)
    pp, eps = "dpmsolver++", "epsilon"
    for n in (5, 10, 16):
        dpm(pp, 2, eps, n, "-karras", use_karras_sigmas=True)
    dpm(pp, 3, eps, 15, "-karras", use_karras_sigmas=True)
    dpm(pp, 2, eps, 10, "-leading", timestep_spacing="leading")
    dpm(pp, 3, eps, 10, "-trailing", timestep_spacing="trailing")
    dpm(pp, 2, eps, 10, "-leading-offset1", timestep_spacing="leading", steps_offset=1)
    dpm(pp, 3, eps, 14, "-fsigmamin", final_sigmas_type="sigma_min")
    dpm(pp, 3, eps, 15, "-fsigmamin", final_sigmas_type="sigma_min")
    dpm(pp, 2, eps, 10, "-nolof", lower_order_final=False)
    dpm(pp, 3, eps, 10, "-nolof-fsigmamin", lower_order_final=False, final_sigmas_type="sigma_min")
    dpm(pp, 3, eps, 16, "-eulerfinal-fsigmamin", euler_at_final=True, final_sigmas_type="sigma_min")
    dpm(pp, 2, eps, 10, "-lu", use_lu_lambdas=True)
    dpm(pp, 2, eps, 10, "-thresh", thresholding=True)
    dpm(
        pp,
        3,
        eps,
        10,
        "-thresh-r09-max2",
        thresholding=True,
        dynamic_thresholding_ratio=0.9,
        sample_max_value=2.0,
    )
    dpm(
        pp,
        2,
        "sample",
        10,
        "-thresh-r09-max2",
        thresholding=True,
        dynamic_thresholding_ratio=0.9,
        sample_max_value=2.0,
    )
    dpm(pp, 2, eps, 10, "-heun", solver_type="heun")
    dpm("sde-dpmsolver++", 2, eps, 10, "-heun", solver_type="heun")
    dpm("sde-dpmsolver++", 2, eps, 10, "-karras", use_karras_sigmas=True)
    dpm("dpmsolver", 2, eps, 10, "-karras", use_karras_sigmas=True)
    dpm(pp, 2, eps, 10, "-karras-scaledlin", beta="scaledlin", use_karras_sigmas=True)
    dpm(pp, 2, eps, 10, "-cos", beta="cos")
    dpm(pp, 2, eps, 10, "-karras-cos", beta="cos", use_karras_sigmas=True)  # refused at step 9

    # 2. DPMSolverSinglestepScheduler (no timestep_spacing option: always linspace)
    cls = "DPMSolverSinglestepScheduler"

    def dpmss(alg, order, pred, n, extra="", **kwargs):
        final, suffix = dpm_final_kwargs(alg)
        if "final_sigmas_type" in kwargs:
            suffix = ""
        kwargs = {
            "algorithm_type": alg,
            "solver_order": order,
            "prediction_type": pred,
            **final,
            **kwargs,
        }
        run.case(f"{ALG[alg]}-{order}s-{PRED[pred]}-n{n}{extra}{suffix}", cls, kwargs, n)

    for alg in ("dpmsolver++", "dpmsolver"):
        for order in (1, 2, 3):
            for n in (6, 7):
                dpmss(alg, order, eps, n)
        for order in (2, 3):
            dpmss(alg, order, eps, 10)
            if alg == "dpmsolver++" or order == 2:
                dpmss(alg, order, "v_prediction", 7)
    dpmss(pp, 3, eps, 20)
    dpmss(pp, 2, eps, 7, "-karras", use_karras_sigmas=True)
    dpmss(pp, 3, eps, 7, "-karras", use_karras_sigmas=True)
    dpmss(pp, 3, eps, 6, "-fsigmamin", final_sigmas_type="sigma_min")
    dpmss(pp, 3, eps, 7, "-fsigmamin", final_sigmas_type="sigma_min")
    dpmss(
        pp, 3, eps, 12, "-nolof-fsigmamin", lower_order_final=False, final_sigmas_type="sigma_min"
    )
    dpmss("dpmsolver", 2, eps, 12, "-nolof", lower_order_final=False)
    dpmss(pp, 3, eps, 10, "-heun", solver_type="heun")
    dpmss("sde-dpmsolver++", 2, eps, 10)

    # 3. UniPCMultistepScheduler. With final_sigmas_type="zero" (the default) bh1, predict_x0
    # False and lower_order_final False end in a non-finite sample (see `refused`); those run
    # with "sigma_min".
    cls = "UniPCMultistepScheduler"

    def unipc(solver, order, px0, pred, n, extra="", beta="linear", **kwargs):
        zero_ok = solver == "bh2" and px0 and kwargs.get("lower_order_final", True)
        suffix = ""
        if not zero_ok and "final_sigmas_type" not in kwargs:
            kwargs["final_sigmas_type"] = "sigma_min"
            suffix = "-fsigmamin"
        kwargs = {
            "solver_type": solver,
            "solver_order": order,
            "predict_x0": px0,
            "prediction_type": pred,
            **kwargs,
        }
        px = "px0" if px0 else "peps"
        run.case(
            f"unipc-{solver}-o{order}-{px}-{PRED[pred]}-n{n}{extra}{suffix}",
            cls,
            kwargs,
            n,
            beta=beta,
        )

    for solver in ("bh1", "bh2"):
        for order in (1, 2, 3):
            for px0 in (True, False):
                unipc(solver, order, px0, eps, 7)
    unipc("bh2", 2, True, eps, 20)
    unipc("bh2", 3, True, eps, 20)
    for pred in ("sample", "v_prediction"):
        unipc("bh2", 2, True, pred, 7)
        unipc("bh2", 2, False, pred, 7)
        unipc("bh1", 3, True, pred, 7)
    unipc("bh2", 2, True, eps, 5, "-karras", use_karras_sigmas=True)
    unipc("bh2", 3, True, eps, 10, "-karras", use_karras_sigmas=True)
    unipc(
        "bh2",
        2,
        True,
        eps,
        10,
        "-karras-fsigmamin",
        use_karras_sigmas=True,
        final_sigmas_type="sigma_min",
    )
    unipc("bh2", 2, True, eps, 10, "-leading", timestep_spacing="leading")
    unipc("bh2", 3, True, eps, 10, "-trailing", timestep_spacing="trailing")
    unipc("bh2", 2, True, eps, 10, "-leading-offset1", timestep_spacing="leading", steps_offset=1)
    unipc("bh2", 2, True, eps, 10, "-nocorr0", disable_corrector=[0])
    unipc("bh2", 3, True, eps, 10, "-nocorr013", disable_corrector=[0, 1, 3])
    unipc("bh2", 3, True, eps, 10, "-nolof", lower_order_final=False)
    unipc("bh2", 2, True, eps, 16, "-fsigmamin", final_sigmas_type="sigma_min")
    unipc("bh2", 2, True, eps, 10, "-thresh", thresholding=True)
    unipc("bh2", 2, True, eps, 10, "-karras-scaledlin", beta="scaledlin", use_karras_sigmas=True)
    unipc("bh2", 2, True, eps, 10, "-cos", beta="cos")
    # the non-finite configurations, run as they are (recorded in `refused`, nothing stored)
    for solver, order, px0, lof in (
        ("bh1", 2, True, True),
        ("bh2", 2, False, True),
        ("bh2", 2, True, False),
        ("bh2", 3, True, False),
    ):
        kwargs = {
            "solver_type": solver,
            "solver_order": order,
            "predict_x0": px0,
            "lower_order_final": lof,
        }
        px = "px0" if px0 else "peps"
        run.case(
            f"probe-unipc-{solver}-o{order}-{px}-eps-n7-fzero" + ("" if lof else "-nolof"),
            cls,
            kwargs,
            7,
        )

    # 4. DDIMScheduler (clip_sample defaults to True there: passed False except in -clip)
    cls = "DDIMScheduler"

    def ddim(spacing, alpha_one, pred, n, eta, extra="", beta="linear", **kwargs):
        kwargs = {
            "timestep_spacing": spacing,
            "set_alpha_to_one": alpha_one,
            "prediction_type": pred,
            "clip_sample": False,
            **kwargs,
        }
        a1 = "a1" if alpha_one else "a0"
        e = {0.0: "0", 1.0: "1", 0.5: "05"}[eta]
        run.case(
            f"ddim-{spacing}-{a1}-{PRED[pred]}-n{n}-eta{e}{extra}",
            cls,
            kwargs,
            n,
            beta=beta,
            step_kwargs={"eta": eta},
        )

    for spacing in SPACINGS:
        for alpha_one in (True, False):
            ddim(spacing, alpha_one, eps, 10, 0.0)
    for pred in ("sample", "v_prediction"):
        ddim("leading", True, pred, 7, 0.0)
        ddim("trailing", False, pred, 7, 0.0)
    ddim("leading", True, eps, 7, 1.0)
    ddim("trailing", False, eps, 7, 1.0)
    ddim("linspace", True, eps, 7, 1.0)
    ddim("leading", True, eps, 7, 0.5)
    ddim("leading", True, eps, 10, 0.0, "-offset1", steps_offset=1)
    ddim("linspace", False, eps, 7, 0.0, "-offset1", steps_offset=1)
    ddim("leading", True, eps, 50, 0.0, "-offset1", steps_offset=1)
    ddim("leading", True, eps, 7, 0.0, "-clip", clip_sample=True)
    ddim("trailing", False, eps, 7, 0.0, "-scaledlin", beta="scaledlin")
    ddim("leading", True, eps, 7, 0.0, "-cos", beta="cos")

    # 5. DDPMScheduler, fixed_small variance, clip_sample off (its default is on)
    cls = "DDPMScheduler"
    small = {"variance_type": "fixed_small", "clip_sample": False}
    run.case("ddpm-eps-n10", cls, small, 10)
    run.case(
        "ddpm-v-trailing-n10",
        cls,
        {**small, "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
        10,
    )
    run.case("ddpm-eps-n1000", cls, small, 1000, reduced=True)

    # 6. EulerDiscreteScheduler
    cls = "EulerDiscreteScheduler"

    def euler(pred, spacing, n, extra="", beta="linear", step_kwargs=None, **kwargs):
        kwargs = {"prediction_type": pred, "timestep_spacing": spacing, **kwargs}
        run.case(
            f"euler-{PRED[pred]}-{spacing}-n{n}{extra}",
            cls,
            kwargs,
            n,
            beta=beta,
            step_kwargs=step_kwargs,
        )

    for pred in PRED:
        for spacing in SPACINGS:
            euler(pred, spacing, 7)
    for spacing in SPACINGS:
        euler(eps, spacing, 7, "-karras", use_karras_sigmas=True)
    euler("v_prediction", "linspace", 7, "-karras", use_karras_sigmas=True)
    euler(eps, "linspace", 7, "-fsigmamin", final_sigmas_type="sigma_min")
    euler(
        eps,
        "linspace",
        7,
        "-karras-fsigmamin",
        final_sigmas_type="sigma_min",
        use_karras_sigmas=True,
    )
    euler(eps, "linspace", 7, "-loglinear", interpolation_type="log_linear")
    euler(eps, "leading", 7, "-loglinear", interpolation_type="log_linear")
    euler(eps, "leading", 7, "-offset1", steps_offset=1)
    churn = {"s_churn": 1.0, "s_tmin": 0.0, "s_tmax": float("inf"), "s_noise": 1.0}
    euler(eps, "linspace", 10, "-churn", step_kwargs=churn)
    euler(eps, "linspace", 7, "-karras-churn", step_kwargs=churn, use_karras_sigmas=True)
    euler("v_prediction", "leading", 7, "-churn", step_kwargs=churn)
    euler(
        eps,
        "linspace",
        10,
        "-churn4-tmin005-tmax2",
        step_kwargs={**churn, "s_churn": 4.0, "s_tmin": 0.05, "s_tmax": 2.0},
    )
    euler(eps, "linspace", 7, "-scaledlin", beta="scaledlin")
    euler(eps, "linspace", 7, "-karras-cos", beta="cos", use_karras_sigmas=True)

    # 7. EulerAncestralDiscreteScheduler (its step draws noise at every step, the last too)
    cls = "EulerAncestralDiscreteScheduler"
    for pred in ("epsilon", "v_prediction"):
        for spacing in SPACINGS:
            run.case(
                f"euler-a-{PRED[pred]}-{spacing}-n7",
                cls,
                {"prediction_type": pred, "timestep_spacing": spacing},
                7,
            )
    run.case(
        "euler-a-eps-leading-n7-offset1", cls, {"timestep_spacing": "leading", "steps_offset": 1}, 7
    )
    run.case("euler-a-eps-linspace-n7-scaledlin", cls, {}, 7, beta="scaledlin")
    run.case("euler-a-x0-linspace-n7", cls, {"prediction_type": "sample"}, 7)  # refused

    # 8. HeunDiscreteScheduler (2n - 1 step calls per run)
    cls = "HeunDiscreteScheduler"
    for pred in PRED:
        run.case(f"heun-{PRED[pred]}-linspace-n5", cls, {"prediction_type": pred}, 5)
    for spacing in ("leading", "trailing"):
        run.case(f"heun-eps-{spacing}-n5", cls, {"timestep_spacing": spacing}, 5)
    for spacing in SPACINGS:
        run.case(
            f"heun-eps-{spacing}-n5-karras",
            cls,
            {"timestep_spacing": spacing, "use_karras_sigmas": True},
            5,
        )
    run.case(
        "heun-v-linspace-n7-karras",
        cls,
        {"prediction_type": "v_prediction", "use_karras_sigmas": True},
        7,
    )
    run.case(
        "heun-eps-leading-n5-offset1", cls, {"timestep_spacing": "leading", "steps_offset": 1}, 5
    )
    run.case("heun-x0-linspace-n5-clip", cls, {"prediction_type": "sample", "clip_sample": True}, 5)
    run.case("heun-eps-linspace-n5-scaledlin", cls, {}, 5, beta="scaledlin")

    # Grid-only cases: timesteps and sigmas for odd n, every spacing and Karras setting.
    grid_classes = {
        "DPMSolverMultistepScheduler": ("dpmms", True, True),
        "DPMSolverSinglestepScheduler": ("dpmss", False, True),
        "UniPCMultistepScheduler": ("unipc", True, True),
        "DDIMScheduler": ("ddim", True, False),
        "DDPMScheduler": ("ddpm", True, False),
        "EulerDiscreteScheduler": ("euler", True, True),
        "EulerAncestralDiscreteScheduler": ("euler-a", True, False),
        "HeunDiscreteScheduler": ("heun", True, True),
    }
    for cls, (short, has_spacing, has_karras) in grid_classes.items():
        for n in (3, 13, 25, 99):
            for spacing in SPACINGS if has_spacing else ("linspace",):
                for karras in (False, True) if has_karras else (False,):
                    kwargs = {"timestep_spacing": spacing} if has_spacing else {}
                    if karras:
                        kwargs["use_karras_sigmas"] = True
                    name = f"grid-{short}-{spacing}-n{n}" + ("-karras" if karras else "")
                    run.grid(name, cls, kwargs, n)
    for spacing in SPACINGS:
        for short, cls in (
            ("dpmms", "DPMSolverMultistepScheduler"),
            ("ddim", "DDIMScheduler"),
            ("euler", "EulerDiscreteScheduler"),
        ):
            run.grid(
                f"grid-{short}-{spacing}-n13-offset1",
                cls,
                {"timestep_spacing": spacing, "steps_offset": 1},
                13,
            )
    for n in (3, 13, 25, 99):
        run.grid(
            f"grid-dpmms-linspace-n{n}-lu",
            "DPMSolverMultistepScheduler",
            {"use_lu_lambdas": True},
            n,
        )
        run.grid(
            f"grid-euler-linspace-n{n}-loglinear",
            "EulerDiscreteScheduler",
            {"interpolation_type": "log_linear"},
            n,
        )
    for beta in ("scaledlin", "cos"):
        for karras in (False, True):
            kwargs = {"use_karras_sigmas": True} if karras else {}
            k = "-karras" if karras else ""
            for short, cls in (
                ("dpmms", "DPMSolverMultistepScheduler"),
                ("euler", "EulerDiscreteScheduler"),
            ):
                run.grid(f"grid-{short}-linspace-n13{k}-{beta}", cls, kwargs, 13, beta=beta)


def generate_diffusers(params, noise):
    ref = load_diffusers()
    run = DiffusersRun(ref, params, noise)
    store = run.store
    store.put_all("net", params)
    store.put("x_T_noise", noise)
    diffusers_cases(run)
    store.meta = {
        "reference": "diffusers schedulers, run step by step (generate_solver_fixtures.py)",
        "versions": versions(("diffusers",)),
        "shape": list(SHAPE),
        "net": "out = tanh(((A[c] * x) + ((Bt[c] * t) / 1000)) + D[c]), float32",
        "betas": BETAS,
        "cases": run.cases,
        "refused": run.refused,
    }
    return store


# ----------------------------------------------------------------------------------------------
# k-diffusion


def install_kdiff_stand_ins() -> list[str]:
    installed = []
    for package, modules in KDIFF_STAND_INS.items():
        if package in sys.modules or importlib.util.find_spec(package) is not None:
            continue
        for module_name, names in modules.items():
            module = types.ModuleType(module_name, "import-only stand-in (solver fixtures)")
            module.__spec__ = importlib.machinery.ModuleSpec(module_name, loader=None)
            for name in names:
                setattr(module, name, gf._raising_stand_in(f"{module_name}.{name}"))
            sys.modules[module_name] = module
            parent, _, child = module_name.rpartition(".")
            if parent:
                setattr(sys.modules[parent], child, module)
        installed.append(package)
    return installed


def load_kdiffusion():
    """Import k_diffusion.sampling and k_diffusion.external without the package __init__ (which
    imports the training, evaluation and model modules: clip, kornia, cleanfid, jsonmerge, ...)."""
    stand_ins = install_kdiff_stand_ins()
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        raise ModuleNotFoundError("k_diffusion is not installed")
    if "k_diffusion" not in sys.modules:
        package = types.ModuleType("k_diffusion", "k_diffusion without its __init__")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = importlib.machinery.ModuleSpec(
            "k_diffusion", loader=None, is_package=True
        )
        package.__spec__.submodule_search_locations = list(spec.submodule_search_locations)
        sys.modules["k_diffusion"] = package
    sampling = importlib.import_module("k_diffusion.sampling")
    external = importlib.import_module("k_diffusion.external")
    return types.SimpleNamespace(sampling=sampling, external=external, stand_ins=stand_ins)


@contextlib.contextmanager
def recording_randn_like(draws: list):
    """Wrap torch.randn_like (what sample_euler/heun/dpm_2 draw with): same call, same tensor."""
    original = torch.randn_like

    def randn_like(*args, **kwargs):
        value = original(*args, **kwargs)
        draws.append(value.detach().clone())
        return value

    torch.randn_like = randn_like
    try:
        yield
    finally:
        torch.randn_like = original


# sampler name -> (function name, kwargs, noise source: None, "randn_like" or "noise_sampler")
KD_SAMPLERS: dict[str, tuple[str, dict, str | None]] = {
    "euler": ("sample_euler", {}, "randn_like"),
    "euler-churn": ("sample_euler", {"s_churn": 1.0}, "randn_like"),
    "euler-a": ("sample_euler_ancestral", {}, "noise_sampler"),
    "heun": ("sample_heun", {}, "randn_like"),
    "heun-churn": ("sample_heun", {"s_churn": 1.0}, "randn_like"),
    "dpm2": ("sample_dpm_2", {}, "randn_like"),
    "dpm2-a": ("sample_dpm_2_ancestral", {}, "noise_sampler"),
    "lms": ("sample_lms", {"order": 4}, None),
    "dpmpp-2s-a": ("sample_dpmpp_2s_ancestral", {}, "noise_sampler"),
    "dpmpp-2m": ("sample_dpmpp_2m", {}, None),
    "dpmpp-2m-sde": (
        "sample_dpmpp_2m_sde",
        {"eta": 1.0, "solver_type": "midpoint"},
        "noise_sampler",
    ),
    "dpmpp-2m-sde-heun": (
        "sample_dpmpp_2m_sde",
        {"eta": 1.0, "solver_type": "heun"},
        "noise_sampler",
    ),
    "dpmpp-3m-sde": ("sample_dpmpp_3m_sde", {"eta": 1.0}, "noise_sampler"),
}


class KDiffRun:
    def __init__(self, kd, params, noise, alphas_cumprod):
        self.kd = kd
        self.params = params
        self.noise = noise
        self.alphas_cumprod = alphas_cumprod
        self.store = gf.Store("solvers_kdiffusion")
        self.cases: list[dict] = []
        self.refused: list[dict] = []

    def denoiser(self, kind: str, quantize: bool, net):
        cls = getattr(self.kd.external, kind)
        return cls(net, self.alphas_cumprod, quantize=quantize)

    def sigmas(self, grid: str, n: int, den) -> torch.Tensor:
        sampling = self.kd.sampling
        sigma_min, sigma_max = den.sigma_min.item(), den.sigma_max.item()
        if grid == "karras":
            return sampling.get_sigmas_karras(n, sigma_min, sigma_max, rho=7.0)
        if grid == "discrete":
            return den.get_sigmas(n)
        if grid == "exponential":
            return sampling.get_sigmas_exponential(n, sigma_min, sigma_max)
        if grid == "polyexponential":
            return sampling.get_sigmas_polyexponential(n, sigma_min, sigma_max)
        if grid == "polyexponential-rho2":
            return sampling.get_sigmas_polyexponential(n, sigma_min, sigma_max, rho=2.0)
        if grid == "vp":
            return sampling.get_sigmas_vp(n)
        raise ValueError(grid)

    def grid(self, grid: str, n: int | None) -> None:
        net = TanhNet(self.params)
        den = self.denoiser("DiscreteEpsDDPMDenoiser", False, net)
        name = f"grid-{grid}-n{n}" if n is not None else f"grid-{grid}-full"
        sigmas = den.get_sigmas() if n is None else self.sigmas(grid, n, den)
        self.store.put(f"{name}/sigmas", sigmas)
        self.cases.append({"name": name, "grid": grid, "n": n, "grid_only": True, "nfe": 0})

    def case(
        self,
        sampler: str,
        grid: str,
        n: int,
        kind="DiscreteEpsDDPMDenoiser",
        quantize=False,
        tag="",
    ) -> None:
        fn_name, sampler_kwargs, noise_source = KD_SAMPLERS[sampler]
        fn = getattr(self.kd.sampling, fn_name)
        name = f"{sampler}-{grid}-n{n}{tag}"
        net = TanhNet(self.params)
        den = self.denoiser(kind, quantize, net)
        sigmas = self.sigmas(grid, n, den)
        x = self.noise * sigmas[0]

        den_sigma: list[torch.Tensor] = []

        def model(x_in, sigma, **kwargs):
            den_sigma.append(sigma.detach().clone())
            return den(x_in, sigma, **kwargs)

        callbacks: list[dict] = []

        def callback(info):
            callbacks.append({k: torch.as_tensor(v).detach().clone() for k, v in info.items()})

        noise_seed = gf.seed_for(f"solvers_kdiffusion/{name}/noise")
        generator = torch.Generator().manual_seed(noise_seed)
        sampler_draws: list[torch.Tensor] = []
        draw_sigmas: list[tuple[float, float]] = []

        def noise_sampler(sigma, sigma_next):
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype)
            sampler_draws.append(z.clone())
            draw_sigmas.append((float(sigma), float(sigma_next)))
            return z

        kwargs = dict(sampler_kwargs)
        if noise_source == "noise_sampler":
            kwargs["noise_sampler"] = noise_sampler
        like_draws: list[torch.Tensor] = []
        torch.manual_seed(noise_seed)  # the global generator, for torch.randn_like
        try:
            with recording_randn_like(like_draws):
                out = fn(model, x, sigmas, callback=callback, disable=True, **kwargs)
        except REFERENCE_ERRORS as error:
            self.refused.append({"name": name, "sampler": fn_name, "error": error_text(error)})
            return
        if noise_source != "randn_like" and like_draws:
            raise RuntimeError(f"{name}: unexpected torch.randn_like draws")
        if noise_source != "noise_sampler" and sampler_draws:
            raise RuntimeError(f"{name}: unexpected noise_sampler draws")
        draws = like_draws if noise_source == "randn_like" else sampler_draws

        put = self.store.put
        put(f"{name}/sigmas", sigmas)
        put(f"{name}/calls_x", stack([c[0] for c in net.calls]))
        put(f"{name}/calls_t", stack([c[1] for c in net.calls], (SHAPE[0],)))
        put(f"{name}/calls_out", stack([c[3] for c in net.calls]))
        put(f"{name}/calls_sigma", stack(den_sigma, (SHAPE[0],)))
        put(f"{name}/noise", stack(draws))
        if noise_source == "noise_sampler":
            put(f"{name}/noise_sigmas", np.array(draw_sigmas, dtype=np.float64).reshape(-1, 2))
        put(f"{name}/cb_x", stack([c["x"] for c in callbacks]))
        put(f"{name}/cb_i", np.array([int(c["i"]) for c in callbacks], dtype=np.int64))
        put(f"{name}/cb_sigma", stack([c["sigma"] for c in callbacks], ()))
        put(f"{name}/cb_sigma_hat", stack([c["sigma_hat"] for c in callbacks], ()))
        put(f"{name}/cb_denoised", stack([c["denoised"] for c in callbacks]))
        put(f"{name}/sample", out)
        self.cases.append(
            {
                "name": name,
                "sampler": fn_name,
                "sampler_kwargs": json_value(sampler_kwargs),
                "n": n,
                "grid": grid,
                "denoiser": kind,
                "quantize": quantize,
                "noise_source": noise_source,
                "noise_seed": noise_seed,
                "nfe": len(net.calls),
                "num_draws": len(draws),
            }
        )


def generate_kdiffusion(params, noise):
    kd = load_kdiffusion()
    # the linear-beta alphas_cumprod, as diffusers' DDPMScheduler holds it (float32)
    import diffusers

    ddpm = diffusers.DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, **BETAS["linear"])
    alphas_cumprod = ddpm.alphas_cumprod.clone()
    betas = torch.linspace(1e-4, 0.02, NUM_TRAIN_TIMESTEPS, dtype=torch.float32)
    if not torch.equal(alphas_cumprod, torch.cumprod(1.0 - betas, dim=0)):
        raise RuntimeError("DDPMScheduler alphas_cumprod differs from cumprod(1 - linspace betas)")

    run = KDiffRun(kd, params, noise, alphas_cumprod)
    store = run.store
    store.put_all("net", params)
    store.put("x_T_noise", noise)
    store.put("alphas_cumprod", alphas_cumprod)
    probe = run.denoiser("DiscreteEpsDDPMDenoiser", False, TanhNet(params))
    store.put("denoiser_sigmas", probe.sigmas)
    store.put("sigma_min", probe.sigma_min)
    store.put("sigma_max", probe.sigma_max)

    for sampler in KD_SAMPLERS:
        for grid in ("karras", "discrete"):
            for n in (5, 7, 10, 20):
                run.case(sampler, grid, n)
    for sampler in ("euler", "heun", "dpmpp-2m", "euler-a"):
        run.case(sampler, "discrete", 10, quantize=True, tag="-quantize")
        run.case(sampler, "karras", 10, quantize=True, tag="-quantize")
    for sampler in ("euler", "heun", "dpmpp-2m", "dpmpp-2m-sde", "dpmpp-3m-sde", "lms"):
        run.case(sampler, "karras", 10, kind="DiscreteVDDPMDenoiser", tag="-vden")
    for sampler in ("dpmpp-2m", "euler", "dpmpp-3m-sde"):
        run.case(sampler, "exponential", 10)
    for grid in (
        "karras",
        "exponential",
        "polyexponential",
        "polyexponential-rho2",
        "vp",
        "discrete",
    ):
        for n in (3, 13, 25, 99):
            run.grid(grid, n)
    run.grid("discrete", None)

    store.meta = {
        "reference": "k-diffusion samplers (k_diffusion/sampling.py, external.py), "
        "generate_solver_fixtures.py",
        "versions": versions(("k-diffusion", "torchsde", "scipy", "diffusers")),
        "stand_ins": kd.stand_ins,
        "shape": list(SHAPE),
        "net": "out = tanh(((A[c] * x) + ((Bt[c] * t) / 1000)) + D[c]), float32",
        "karras_args": "get_sigmas_karras(n, sigma_min.item(), sigma_max.item(), rho=7.0)",
        "x_init": "x_T_noise * sigmas[0] (float32)",
        "cases": run.cases,
        "refused": run.refused,
    }
    return store


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument(
        "--only", nargs="+", choices=("diffusers", "kdiffusion"), help="write only these files"
    )
    args = parser.parse_args(argv)
    selected = args.only or ["diffusers", "kdiffusion"]

    torch.set_default_dtype(torch.float32)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    import diffusers.utils.logging as diffusers_logging

    diffusers_logging.set_verbosity_error()

    params = net_params()
    noise = x_t_noise()
    args.out.mkdir(parents=True, exist_ok=True)
    status = 0
    for which in selected:
        tick = time.perf_counter()
        store = (generate_diffusers if which == "diffusers" else generate_kdiffusion)(params, noise)
        path = store.write(args.out)
        meta = store.meta
        print(
            f"{path.name}: {len(store.arrays)} arrays, {len(meta['cases'])} cases, "
            f"{len(meta['refused'])} refused, {path.stat().st_size / 1e6:.2f} MB, "
            f"{time.perf_counter() - tick:.1f} s; {meta['versions']}"
        )
        if store.nonfinite:
            print(f"non-finite values in {store.nonfinite}")
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
