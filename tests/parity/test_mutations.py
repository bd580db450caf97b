"""The parity suite fails on small wrong numbers: each mutation below changes one coefficient
table entry or one kernel by 1e-4 relative, and the parity checks of that family must fail
under it (and pass without it).

The parity test functions are called directly; the module-level ``coeffs`` caches are cleared
around each mutation so that mutated tables never leak into other tests.
"""

from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import gaussian, likelihood, losses
from tests.parity import (
    test_bpd_parity,
    test_gaussian_openai_parity,
    test_likelihood_parity,
    test_lucid_parity,
    test_samplers_parity,
    test_schedules_parity,
    test_unet_parity,
)
from tests.parity._fixtures import load

EPS = 1e-4
CACHED = (test_gaussian_openai_parity, test_lucid_parity, test_samplers_parity, test_bpd_parity)


@pytest.fixture(autouse=True)
def fresh_coefficient_caches():
    def clear():
        for module in CACHED:
            module.coeffs.cache_clear()

    clear()
    yield
    clear()


def scaled_output(fn):
    """fn with its (first) output multiplied by 1 + EPS."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        if isinstance(out, tuple):
            items = (out[0] * (1 + EPS), *out[1:])
            return type(out)(*items) if hasattr(out, "_fields") else items
        return out * (1 + EPS)

    return wrapped


def one_table_entry(field: str, index: int, convention: str | None = None):
    """make_coeffs with entry ``index`` of table ``field`` multiplied by 1 + EPS."""
    original = gaussian.make_coeffs

    def make_coeffs(*args, **kwargs):
        c = original(*args, **kwargs)
        if convention is not None and kwargs.get("convention", "openai") != convention:
            return c
        table = getattr(c, field)
        return c._replace(**{field: table.at[index].multiply(1 + EPS)})

    return make_coeffs


def fails_under(monkeypatch, target, name, replacement, check):
    """check passes as it is, and raises AssertionError with target.name replaced."""
    check()
    with monkeypatch.context() as m:
        m.setattr(target, name, replacement)
        for module in CACHED:
            module.coeffs.cache_clear()
        with pytest.raises(AssertionError):
            check()


def _first(cases, *words):
    return next(c for c in cases if all(w in c for w in words))


OPENAI_PROCESS = "linear/T1000"
OPENAI_CASE = _first(test_gaussian_openai_parity.MODEL_CASES, "linear/T1000/", "epsilon/learned_r")
LUCID_PROCESS = "cosine/T1000"
LUCID_CASE = "cosine/T1000/pred_noise"


# Tables ------------------------------------------------------------------------------------------


def test_alphas_cumprod_entry(monkeypatch):
    case = _first(test_schedules_parity.LUCID_CASES, "cosine", "1000")
    fails_under(
        monkeypatch,
        gaussian,
        "make_coeffs",
        one_table_entry("alphas_cumprod", 500),
        lambda: test_schedules_parity.test_lucid_tables(case),
    )


@pytest.mark.parametrize("field", ["posterior_mean_coef1", "sqrt_alphas_cumprod"])
def test_process_table_entry_at_t1(monkeypatch, field):
    """q_sample and the q posterior at t = 1, where the values are smallest."""
    fails_under(
        monkeypatch,
        gaussian,
        "make_coeffs",
        one_table_entry(field, 1),
        lambda: test_gaussian_openai_parity.test_process(OPENAI_PROCESS),
    )


def test_posterior_log_variance_entry(monkeypatch):
    """A variance table entry only the model-level checks see (p_mean_variance, VB terms)."""
    t_mid = int(test_gaussian_openai_parity.ARR[f"{OPENAI_PROCESS}/inputs/t"][2])
    fails_under(
        monkeypatch,
        gaussian,
        "make_coeffs",
        one_table_entry("posterior_log_variance_clipped", t_mid),
        lambda: test_gaussian_openai_parity.test_model_case(OPENAI_CASE),
    )


# Process math ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kernel", ["predict_x0_from_eps", "predict_v", "q_posterior_mean_variance"]
)
def test_process_kernel(monkeypatch, kernel):
    fails_under(
        monkeypatch,
        gaussian,
        kernel,
        scaled_output(getattr(gaussian, kernel)),
        lambda: test_lucid_parity.test_process(LUCID_PROCESS),
    )


def test_p_mean_variance_mean(monkeypatch):
    fails_under(
        monkeypatch,
        gaussian,
        "p_mean_variance",
        scaled_output(gaussian.p_mean_variance),
        lambda: test_gaussian_openai_parity.test_model_case(OPENAI_CASE),
    )


# Likelihood and losses ---------------------------------------------------------------------------


def test_normal_kl(monkeypatch):
    fails_under(
        monkeypatch,
        likelihood,
        "normal_kl",
        scaled_output(likelihood.normal_kl),
        test_likelihood_parity.test_normal_kl,
    )


def test_discretized_log_likelihood(monkeypatch):
    fails_under(
        monkeypatch,
        likelihood,
        "discretized_gaussian_log_likelihood",
        scaled_output(likelihood.discretized_gaussian_log_likelihood),
        test_likelihood_parity.test_discretized_log_likelihood,
    )


def test_normal_kl_inside_bits_per_dim(monkeypatch):
    case = _first(test_bpd_parity.TANH, "cosine/T20/epsilon/learned_range")
    fails_under(
        monkeypatch,
        likelihood,
        "normal_kl",
        scaled_output(likelihood.normal_kl),
        lambda: test_bpd_parity.test_tanh_model_bits_per_dim(case),
    )


def test_loss_weight(monkeypatch):
    """Min-SNR / objective weights of the lucid loss (and with them, its gradients)."""
    case = "cosine/T1000/pred_v"
    fails_under(
        monkeypatch,
        losses,
        "loss_weight",
        scaled_output(losses.loss_weight),
        lambda: test_lucid_parity.test_objective_case(case),
    )


# Samplers and networks ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, test",
    [
        ("openai_ddpm", "test_openai_ddpm"),
        ("guided_cond_mean", "test_guided_diffusion_classifier_guidance"),
    ],
)
def test_model_output_in_sampling_chains(monkeypatch, kind, test):
    """The network output inside a whole chain. (A 1e-4 change in one step of a DDIM chain is
    below CHAIN, which the ill-conditioned chains need; one-step DDIM is in MODEL checks.)"""
    case = test_samplers_parity.cases(kind)[0]
    original = test_samplers_parity.model
    fails_under(
        monkeypatch,
        test_samplers_parity,
        "model",
        lambda c: scaled_output(original(c)),
        lambda: getattr(test_samplers_parity, test)(case),
    )


def test_unet_output(monkeypatch):
    """The Flax Unet's output scaled by 1 + EPS (the test jits ``unet.apply``; the patched
    ``jax.jit`` of its module scales what the jitted function returns)."""

    def scaled_jit(fn):
        return jax.jit(lambda *args, **kwargs: fn(*args, **kwargs) * (1 + EPS))

    case = "one_stage"  # the smallest network
    assert case in load("unet")[1]
    fails_under(
        monkeypatch,
        test_unet_parity,
        "jax",
        types.SimpleNamespace(jit=scaled_jit),
        lambda: test_unet_parity.test_flax_unet_matches_reference(case),
    )


def test_a_mutation_smaller_than_the_float32_error_passes(monkeypatch):
    """The other direction: a change of 1e-8 relative (below float32 resolution) to one table
    entry is not flagged, so the failures above come from the mutation's size."""
    original = gaussian.make_coeffs

    def make_coeffs(*args, **kwargs):
        c = original(*args, **kwargs)
        table = np.asarray(c.sqrt_alphas_cumprod, np.float64)
        table[1] *= 1 + 1e-8
        return c._replace(sqrt_alphas_cumprod=jnp.asarray(table, jnp.float32))

    monkeypatch.setattr(gaussian, "make_coeffs", make_coeffs)
    test_gaussian_openai_parity.test_process(OPENAI_PROCESS)
