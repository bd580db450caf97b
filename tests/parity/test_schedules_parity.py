"""Schedules, coefficient tables and respacing against the references' own numbers."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import gaussian, losses, schedules
from tests.parity._fixtures import F64_TABLE, LOG_SNR, TABLE, assert_close, load

ARR, META = load("schedules")
LUCID_CASES = sorted(k for k, v in META.items() if v.get("reference") == "lucid" and "T" in v)
OPENAI_CASES = sorted(k for k in META if k.startswith("openai/"))
# Both references name the table entries alike; lucid's loss weights are checked separately.
SHARED = [
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
]
GAMMAS = {"off": None, "g5": 5.0, "g3": 3.0}
OBJECTIVES = ["pred_noise", "pred_x0", "pred_v"]


def _betas(meta):
    return schedules.get_named_beta_schedule(meta["schedule"], meta["T"], **meta["schedule_kwargs"])


@pytest.mark.parametrize("case", LUCID_CASES)
def test_lucid_tables(case):
    meta = META[case]
    betas = _betas(meta)
    # float64 betas: the same formula in float64 on both sides.
    assert_close(betas, ARR[f"{case}/betas_f64"], F64_TABLE, err_msg=f"{case}/betas_f64")
    c = gaussian.make_coeffs(betas, convention="lucidrains")
    for name in SHARED:
        if f"{case}/{name}" in ARR:
            assert_close(getattr(c, name), ARR[f"{case}/{name}"], TABLE, err_msg=f"{case}/{name}")
    for objective in OBJECTIVES:
        for tag, gamma in GAMMAS.items():
            key = f"{case}/loss_weight/{objective}/{tag}"
            assert_close(losses.loss_weight(c.snr, objective, gamma), ARR[key], TABLE, err_msg=key)


@pytest.mark.parametrize("case", OPENAI_CASES)
def test_openai_tables(case):
    meta = META[case]
    betas = schedules.get_named_beta_schedule(meta["schedule"], meta["T"])
    assert_close(betas, ARR[f"{case}/betas"], F64_TABLE, err_msg=f"{case}/betas")
    if "error" in meta:
        # improved-diffusion cannot build a one-step process (it indexes beta-tilde_1); jaxdiff
        # can, and falls back to beta_0 for the t = 0 variance.
        assert meta["T"] == 1
        c = gaussian.make_coeffs(betas)
        assert bool(jnp.all(jnp.isfinite(c.posterior_log_variance_clipped)))
        return
    c = gaussian.make_coeffs(betas, convention="openai")
    # improved-diffusion keeps float64 tables and casts each gathered value to float32.
    for name in meta["stored"]:
        expected = ARR[f"{case}/{name}"].astype(np.float32)
        assert_close(getattr(c, name), expected, TABLE, err_msg=f"{case}/{name}")


@pytest.mark.parametrize(
    "case",
    [
        "lucid_ct/linear",
        "lucid_ct/cosine",
        "simple/cosine",
        "simple/shifted",
        "simple/interpolated",
    ],
)
def test_continuous_log_snr(case):
    t = jnp.asarray(ARR[f"{case}/t"])
    fn = {
        "lucid_ct/linear": schedules.log_snr_schedule("linear"),
        "lucid_ct/cosine": schedules.log_snr_schedule("cosine"),
        "simple/cosine": schedules.log_snr_schedule("simple_cosine"),
        "simple/shifted": schedules.log_snr_schedule(
            "simple_cosine", shift=schedules.resolution_shift(64, 32)
        ),
        "simple/interpolated": schedules.interpolated_log_snr(
            schedules.simple_cosine_log_snr, 64, 32, 64
        ),
    }[case]
    # log-SNR near t = 0 comes from log(expm1(~1e-4)) or log(tan(~3e-4)) (see LOG_SNR).
    assert_close(fn(t), ARR[f"{case}/log_snr"], LOG_SNR, err_msg=case)


RESP, RESP_META = load("respacing")


def _lists(prefix):
    values, offsets = RESP[f"{prefix}/values"], RESP[f"{prefix}/offsets"]
    return [values[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]


@pytest.mark.parametrize("num_timesteps", [1000, 4000])
def test_every_section_count(num_timesteps):
    prefix = f"openai/space_all/{num_timesteps}"
    ns = RESP[f"{prefix}/ns"]
    expected = _lists(prefix)
    assert len(ns) == len(expected)
    for n, want in zip(ns, expected, strict=True):
        np.testing.assert_array_equal(
            schedules.space_timesteps(num_timesteps, str(int(n))), want, err_msg=f"N={n}"
        )


def test_every_ddim_count():
    prefix = "openai/ddim_all/1000"
    for n, want in zip(RESP[f"{prefix}/ns"], _lists(prefix), strict=True):
        np.testing.assert_array_equal(schedules.space_timesteps(1000, f"ddim{n}"), want)
    invalid = RESP[f"{prefix}/invalid"]
    assert len(invalid) + len(RESP[f"{prefix}/ns"]) == 1000
    for n in invalid:
        with pytest.raises(ValueError, match=f"ddim{n}"):
            schedules.space_timesteps(1000, f"ddim{n}")


SINGLE = sorted(k for k in RESP_META if k.startswith("openai/space/"))


@pytest.mark.parametrize("case", SINGLE)
def test_single_specs(case):
    meta = RESP_META[case]
    if "error" in meta:
        with pytest.raises(ValueError):
            schedules.space_timesteps(meta["T"], meta["spec"])
    else:
        np.testing.assert_array_equal(
            schedules.space_timesteps(meta["T"], meta["spec"]), RESP[case]
        )


SPACED = sorted(k for k in RESP_META if k.startswith("openai/spaced/"))


@pytest.mark.parametrize("case", SPACED)
def test_spaced_diffusion_tables(case):
    meta = RESP_META[case]
    betas = schedules.get_named_beta_schedule(meta["schedule"], meta["T"])
    c = gaussian.make_coeffs(betas, respacing=meta["spec"])
    np.testing.assert_array_equal(np.asarray(c.model_times), RESP[f"{case}/timestep_map"])
    kept = schedules.space_timesteps(meta["T"], meta["spec"])
    new_betas, _ = schedules.respace_betas(betas, kept)
    assert_close(new_betas, RESP[f"{case}/betas"], F64_TABLE, err_msg=f"{case}/betas")
    for name in gaussian.DiffusionCoeffs._fields:
        key = f"{case}/{name}"
        if key in RESP and name != "timestep_map":
            assert_close(getattr(c, name), RESP[key].astype(np.float32), TABLE, err_msg=key)
