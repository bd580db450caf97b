"""Sampling imported openai networks with jaxdiff's samplers, step by step against the
references' own sampling loops (improved-diffusion 1bc7bbb, guided-diffusion 22e0df8), and
classifier guidance with guided-diffusion's noisy classifier.

Fixture: ``fixtures/openai_sampling.npz`` from ``generate_openai_sampling_fixtures.py`` (see
PROVENANCE.md, "openai sampling"): three networks with every parameter redrawn (their
state_dicts, float16 values), and per case x_T, every per-step Gaussian draw, every step's
sample and pred_xstart, the time the network got at each step and, with guidance, the time the
classifier got and the gradient it returned.

jaxdiff runs the same chains: the state_dicts through :mod:`jaxdiff.convert_openai`, the table
from :func:`jaxdiff.gaussian.make_coeffs` (betas of :func:`jaxdiff.schedules.
get_named_beta_schedule`, the same respacing and ``rescale_timesteps``),
:func:`jaxdiff.samplers.ddpm_sample` / :func:`~jaxdiff.samplers.ddim_sample` with the recorded
x_T and noise (``var_type="learned_range"``, ``clip_denoised=True``), and
:func:`jaxdiff.guidance.classifier_cond_fn` over the imported ``EncoderUNetModel`` with
``model_kwargs={"y": labels}`` (the labels go to the class-conditional network and to the
classifier, as in guided-diffusion's ``classifier_sample.py``).

Tolerances, from the measured errors (2-core CPU, jit, float32 on both sides), with margin:

* ``OPENAI_CHAIN``: every step's sample and pred_x0, |jaxdiff - reference| <= 1e-3 + 1e-4
  |reference|. Measured over the seven cases and every step, with the XLA options these tests
  compile with (``FAST_COMPILE``) / XLA's default options: samples 2.4e-5 / 6.9e-5
  (guided_ddim_unguided / improved_ddim_eta1), pred_x0 1.3e-4 / 1.4e-4 (the guided chains);
  the worst element uses 0.12 / 0.135 of its allowance (7x margin). The source is the
  networks' float32 round-off (~1e-6 of their output, ``OPENAI_UNET`` in
  test_openai_unet_parity.py) amplified by x0 = (x - sqrt(1 - abar) eps) / sqrt(abar):
  1 / sqrt(abar) is 157 at the linear schedule's step 999 and 2000 at the cosine 100-step
  table's step 99, where most of x0 is then clipped.
* ``CLASSIFIER_GRAD``: the classifier gradient at each step's recorded state, relative to
  max |gradient|: 1e-4; measured 5.7e-6 (backward through ~15 float32 layers summed in another
  order).
* Guidance is real: the guided chains leave the unguided ones by 0.13 to 0.29 per step (DDPM)
  and 0.18 to 2.05 (DDIM; max |difference|, classifier scale 4), at least 97x (DDPM) and 137x
  (DDIM) the chain's allowance at that step; the test requires 50x at every step. Feeding the
  classifier the respaced index instead of the mapped time moves the chains by 0.30 (DDPM) and
  2.0 (DDIM) from the reference, time 0 by 0.21 and 2.0.
"""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import gaussian, schedules
from jaxdiff.convert_openai import openai_state_dict_to_params
from jaxdiff.guidance import classifier_cond_fn
from jaxdiff.models.openai_unet import openai_model_from_config
from jaxdiff.samplers import ddim_sample, ddpm_sample
from tests.parity._fixtures import (
    Tol,
    assert_close,
    load,
    nchw,
    nhwc,
    openai_references_available,
    regenerated_equals_committed,
)

HERE = pathlib.Path(__file__).resolve().parent
NAME = "openai_sampling"

OPENAI_CHAIN = Tol("openai_chain", 1e-4, 1e-3)
CLASSIFIER_GRAD = Tol("classifier_grad", 1e-4, 0.0, scaled=True)
# guided minus unguided must exceed this many times the chain's allowed error, at every step
GUIDANCE_MARGIN = 50.0
# These tiny programs spend almost all their time compiling; XLA's backend optimisation level 0
# cuts that by a third on the 2-core CPU (the errors above were measured with it; the default
# level gives errors of the same size). Only on CPU, where it was measured.
FAST_COMPILE = {"xla_backend_optimization_level": "0"} if jax.default_backend() == "cpu" else {}


def _cases():
    _, meta = load(NAME)
    return sorted(k for k in meta if not k.startswith("__"))


def _state_dict(arrays, name: str) -> dict[str, np.ndarray]:
    prefix = f"{name}/state_dict/"
    return {
        k[len(prefix) :]: v.astype(np.float32) for k, v in arrays.items() if k.startswith(prefix)
    }


@functools.cache
def _networks():
    """name -> (Flax module, variables) of the fixture's three networks."""
    arrays, meta = load(NAME)
    info = meta["__networks__"]
    models = {
        "improved_unet": openai_model_from_config(
            info["improved_unet"]["kwargs"], layout="improved"
        ),
        "guided_unet": openai_model_from_config(info["guided_unet"]["kwargs"], layout="guided"),
        "classifier": openai_model_from_config(
            info["classifier"]["kwargs"], model="EncoderUNetModel"
        ),
    }
    return {
        name: (model, openai_state_dict_to_params(_state_dict(arrays, name), model))
        for name, model in models.items()
    }


def _coeffs(info):
    betas = schedules.get_named_beta_schedule(info["noise_schedule"], info["diffusion_steps"])
    return gaussian.make_coeffs(
        betas,
        respacing=info["timestep_respacing"],
        convention="openai",
        rescale_timesteps=info["rescale_timesteps"],
    )


def _logits_fn(variables, classifier):
    return lambda x, t: classifier.apply(variables, x, t)


def _noise(arrays, chain):
    """[S, B, C, H, W] -> [S, B, H, W, C]."""
    return jnp.asarray(np.moveaxis(arrays[f"{chain}/noise"], 2, -1))


# What must agree between cases that share one compiled sampler (all but eta and the chain).
_SHARED = ("network", "loop", "diffusion_steps", "noise_schedule", "timestep_respacing",
           "rescale_timesteps", "classifier_scale")  # fmt: skip


@functools.cache
def _chains(cases: tuple[str, ...]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """jaxdiff's chains of ``cases`` (one compiled sampler; eta is traced, so DDIM eta 0 and 1
    share it): case -> (trajectory, pred_x0), each [S, B, C, H, W] in the reference's layout."""
    arrays, meta = load(NAME)
    info = meta[cases[0]]
    for case in cases:
        assert all(meta[case][k] == info[k] for k in _SHARED), (case, cases[0])
    nets = _networks()
    model, unet_vars = nets[info["network"]]
    classifier, classifier_vars = nets["classifier"]
    c = _coeffs(info)
    scale = info["classifier_scale"]

    def run(unet_vars, classifier_vars, x_T, noise, y, eta):
        def model_fn(x, t, **cond):
            return model.apply(unet_vars, x, t, **cond)

        kwargs = dict(
            noise=noise,
            var_type="learned_range",
            clip_denoised=True,
            return_trajectory=True,
            model_kwargs=None if y is None else {"y": y},
        )
        if scale is not None:
            kwargs["cond_fn"] = classifier_cond_fn(_logits_fn(classifier_vars, classifier), scale)
        if eta is None:
            return ddpm_sample(model_fn, c, x_T, **kwargs)
        return ddim_sample(model_fn, c, x_T, eta=eta, **kwargs)

    compiled = jax.jit(run, compiler_options=FAST_COMPILE)
    results = {}
    for case in cases:
        chain, eta = meta[case]["chain"], meta[case]["eta"]
        y = arrays.get(f"{chain}/y")
        out = compiled(
            unet_vars,
            classifier_vars,
            nhwc(arrays[f"{chain}/x_T"]),
            _noise(arrays, chain),
            None if y is None else jnp.asarray(y, jnp.int32),
            None if eta is None else jnp.float32(eta),
        )
        results[case] = tuple(np.moveaxis(np.asarray(a), -1, 2) for a in out[1:])
    return results


def _check_chain(case: str, trajectory: np.ndarray, pred_x0: np.ndarray) -> None:
    """Every step's sample and pred_x0 within OPENAI_CHAIN (assert_close fails on NaN)."""
    arrays, _ = load(NAME)
    expected_x, expected_x0 = arrays[f"{case}/sample"], arrays[f"{case}/pred_xstart"]
    assert trajectory.shape == expected_x.shape and pred_x0.shape == expected_x0.shape
    for i in range(expected_x.shape[0]):
        assert_close(trajectory[i], expected_x[i], OPENAI_CHAIN, err_msg=f"{case} step {i} x")
        assert_close(pred_x0[i], expected_x0[i], OPENAI_CHAIN, err_msg=f"{case} step {i} x0")


def test_cases_cover_both_repositories_loops_and_guidance():
    _, meta = load(NAME)
    cases = {k: v for k, v in meta.items() if not k.startswith("__")}
    kinds = {(v["repository"], v["loop"], v["eta"], v["classifier_scale"] is not None)
             for v in cases.values()}  # fmt: skip
    assert ("improved", "p_sample_loop_progressive", None, False) in kinds
    assert ("improved", "ddim_sample_loop_progressive", 0.0, False) in kinds
    assert ("improved", "ddim_sample_loop_progressive", 1.0, False) in kinds
    assert ("guided", "p_sample_loop_progressive", None, True) in kinds
    assert ("guided", "ddim_sample_loop_progressive", 0.0, True) in kinds
    assert {v["rescale_timesteps"] for v in cases.values()} == {True, False}


@pytest.mark.parametrize("case", _cases())
def test_model_times_match_what_the_reference_network_got(case):
    """The respaced table's model_times are exactly the times the reference's _WrappedModel fed
    the network (fractional for 4000 steps rescaled), and the classifier got the same."""
    arrays, meta = load(NAME)
    c = _coeffs(meta[case])
    expected = arrays[f"{case}/model_t"].astype(np.float64)  # [S, B], first step first
    times = np.asarray(c.model_times, np.float64)[::-1]
    np.testing.assert_array_equal(np.broadcast_to(times[:, None], expected.shape), expected)
    assert c.num_timesteps == meta[case]["num_steps"]
    if meta[case]["classifier_scale"] is not None:
        np.testing.assert_array_equal(arrays[f"{case}/cond_t"], arrays[f"{case}/model_t"])


def test_improved_ddpm_chain_matches_reference_step_by_step():
    """improved-diffusion p_sample_loop: cosine, 4000 steps respaced "10", rescaled times."""
    _check_chain("improved_ddpm", *_chains(("improved_ddpm",))["improved_ddpm"])


def test_improved_ddim_chains_match_reference_step_by_step():
    """improved-diffusion ddim_sample_loop, eta 0 and eta 1: cosine, 100 steps respaced by the
    section counts "3,4" (uneven steps)."""
    cases = ("improved_ddim_eta0", "improved_ddim_eta1")
    for case, (trajectory, pred_x0) in _chains(cases).items():
        _check_chain(case, trajectory, pred_x0)


@pytest.mark.parametrize("chain", ["guided_ddpm", "guided_ddim"])
def test_classifier_guided_chains_match_reference_and_guidance_is_not_negligible(chain):
    """guided-diffusion p_sample_loop (respaced "10") / ddim_sample_loop (respaced "ddim10"),
    with the classifier (classifier_sample.py's cond_fn, scale 4) and without it, from the same
    x_T, noise and labels: both match step by step, and they differ from each other at every
    step by more than GUIDANCE_MARGIN times the tolerance, in the reference and in jaxdiff."""
    arrays, _ = load(NAME)
    on_case, off_case = f"{chain}_classifier", f"{chain}_unguided"
    on, off = _chains((on_case,))[on_case], _chains((off_case,))[off_case]
    _check_chain(on_case, *on)
    _check_chain(off_case, *off)
    on_ref, off_ref = arrays[f"{on_case}/sample"], arrays[f"{off_case}/sample"]
    for i in range(on_ref.shape[0]):
        allowed = OPENAI_CHAIN.atol + OPENAI_CHAIN.rtol * float(np.max(np.abs(on_ref[i])))
        ref_gap = float(np.max(np.abs(on_ref[i] - off_ref[i])))
        gap = float(np.max(np.abs(on[0][i] - off[0][i])))
        assert ref_gap > GUIDANCE_MARGIN * allowed, (i, ref_gap, allowed)  # False on NaN
        assert gap > GUIDANCE_MARGIN * allowed, (i, gap, allowed)


def test_classifier_gradient_matches_reference_at_every_step():
    """classifier_cond_fn on the states the reference's classifier saw (x_T, then each step's
    sample) at its time inputs, against the gradient classifier_sample.py's cond_fn returned."""
    arrays, meta = load(NAME)
    model, variables = _networks()["classifier"]
    step = jax.jit(
        lambda x, t, y, scale: classifier_cond_fn(_logits_fn(variables, model), scale)(x, t, y=y),
        compiler_options=FAST_COMPILE,
    )
    for chain in ("guided_ddpm", "guided_ddim"):
        case = f"{chain}_classifier"
        states = np.concatenate([arrays[f"{chain}/x_T"][None], arrays[f"{case}/sample"][:-1]])
        y = jnp.asarray(arrays[f"{chain}/y"], jnp.int32)
        scale = jnp.float32(meta[case]["classifier_scale"])
        for i, (x, t) in enumerate(zip(states, arrays[f"{case}/cond_t"], strict=True)):
            got = nchw(step(nhwc(x), jnp.asarray(t, jnp.float32), y, scale))
            expected = arrays[f"{case}/cond_grad"][i]
            assert float(np.max(np.abs(expected))) > 1e-2, "the gradient is not negligible"
            assert_close(got, expected, CLASSIFIER_GRAD, err_msg=f"{case} step {i} gradient")


def test_class_conditional_unet_samples_with_concrete_labels():
    """The labels as a plain array in model_kwargs (not a jit argument), the way a user calls
    ddpm_sample: the unguided guided-diffusion chain must still match the reference."""
    arrays, meta = load(NAME)
    case, chain = "guided_ddpm_unguided", "guided_ddpm"
    model, variables = _networks()["guided_unet"]
    out = ddpm_sample(
        lambda x, t, **cond: model.apply(variables, x, t, **cond),
        _coeffs(meta[case]),
        nhwc(arrays[f"{chain}/x_T"]),
        noise=_noise(arrays, chain),
        var_type="learned_range",
        clip_denoised=True,
        return_trajectory=True,
        model_kwargs={"y": jnp.asarray(arrays[f"{chain}/y"], jnp.int32)},
    )
    trajectory, pred_x0 = (np.moveaxis(np.asarray(a), -1, 2) for a in out[1:])
    _check_chain(case, trajectory, pred_x0)


# ----------------------------------------------------------------------------------------------
# Live mode


@pytest.mark.live
@pytest.mark.skipif(
    not openai_references_available(),
    reason="live openai sampling parity needs torch 2.13.0 in this Python or in "
    "$JAXDIFF_REFERENCE_PYTHON, IMPROVED_DIFFUSION_DIR and GUIDED_DIFFUSION_DIR (see "
    "PROVENANCE.md); the committed fixture is checked by the other tests here",
)
def test_reference_reproduces_openai_sampling_fixture(tmp_path):
    regenerated_equals_committed("generate_openai_sampling_fixtures.py", NAME, tmp_path)
