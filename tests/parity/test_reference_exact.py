"""``tails="reference"`` reproduces the references' own float32 loss and bits/dim numbers.

jaxdiff's default decoder likelihood (``tails="exact"``) takes tail probabilities without
cancellation, so where a model fits poorly (the t = 0 decoder of the tanh models) it is more
accurate than improved-diffusion and denoising-diffusion-pytorch, and the other parity tests
bound the difference with the fixtures' float64 companions. Here the reference mode is held to
the float32 reference values themselves, with no float64 allowance, over every fixture of
improved-diffusion's likelihood, ``_vb_terms_bpd``, ``training_losses`` (values and gradients)
and ``calc_bpd_loop``, and of ``LearnedGaussianDiffusion.p_losses``; and the default mode is
shown to differ from them there, so that the option means something.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import gaussian, likelihood, losses, objectives
from tests.parity import test_bpd_parity as bpd
from tests.parity import test_gaussian_openai_parity as openai
from tests.parity import test_lucid_parity as lucid
from tests.parity._fixtures import load, nhwc, params_of, tanh_model

LIKELIHOOD, _ = load("likelihood_openai")

# Tolerances: float32 jaxdiff against float32 torch, both evaluating the same operations in the
# same order. What remains is libm rounding: XLA's exp/log and jaxdiff's tanh (within ~1 ulp of
# correctly rounded, like torch's) round differently from torch's in a few per cent of values,
# and near |tanh| = 1 one float32 step of a CDF (6e-8) is a relative step of 6e-8 / p in a bin
# of mass p. Elementwise log-likelihoods: bins of mass ~4e-4 carry 1.5e-4 of that in log p.
LL_RTOL = 3e-5
LL_ATOL = 2e-6
# Means over pixels of such terms (bits/dim): the elementwise errors average out.
VB_RTOL = 3e-6
# A KL between nearly equal Gaussians is a sum of O(1) terms that cancel: float32 leaves an
# absolute error of ~1e-7 per term (bits/dim), scaled by any weight applied to the VB term.
VB_ATOL = 1e-7
# Sums of T per-step terms (calc_bpd_loop's total) accumulate in a different order.
TOTAL_RTOL = 1e-5
# Parameter gradients: sums over the batch of terms that cancel; the error is relative to the
# gradient's largest component.
GRAD_RTOL = 1e-4


def assert_reference_close(actual, ref, rtol, atol, what, nonfinite=False):
    """|actual - ref| <= atol + rtol |ref| everywhere; a NaN or inf fails unless ``nonfinite``
    (a fixture whose reference is itself non-finite), and then it must sit exactly where the
    reference's is."""
    actual = np.asarray(actual, np.float64)
    ref = np.broadcast_to(np.asarray(ref, np.float64), actual.shape)
    finite = np.isfinite(ref)
    if not nonfinite:
        assert finite.all(), f"{what}: the reference has {int((~finite).sum())} non-finite values"
    same = np.array_equal(np.isnan(actual), np.isnan(ref)) and np.array_equal(
        np.isposinf(actual), np.isposinf(ref)
    )
    assert same and np.array_equal(np.isfinite(actual), finite), (
        f"{what}: non-finite values differ\nactual {actual}\nref    {ref}"
    )
    bound = atol + rtol * np.abs(ref)
    bad = finite & ~(np.abs(actual - ref) <= bound)
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {bad.size} elements differ beyond the bound\n"
        f"actual {actual[bad]}\nref    {ref[bad]}"
    )


def differs(actual, ref, rtol, atol):
    """Whether some finite element is outside the bound that the reference mode meets."""
    actual, ref = (np.asarray(a, np.float64) for a in (actual, ref))
    ref = np.broadcast_to(ref, actual.shape)
    return bool(np.any(np.isfinite(ref) & (np.abs(actual - ref) > atol + rtol * np.abs(ref))))


# ---- the discretised Gaussian log-likelihood -------------------------------------------------

# (fixture, case, probability floor): improved-diffusion's grid and its floor-underflow grid,
# denoising-diffusion-pytorch's grid (learned_gaussian_diffusion's helper, floor 1e-15).
LIKELIHOOD_GRIDS = [
    ("likelihood_openai", "discretized_gaussian_log_likelihood", 1e-12),
    ("likelihood_openai", "discretized_gaussian_log_likelihood_underflow", 1e-12),
    ("gaussian_lucid", "likelihood/discretized", 1e-15),
]


def _log_likelihood(fixture, name, floor, tails):
    arrays, _ = load(fixture)
    x, means, log_scales = (
        jnp.asarray(arrays[f"{name}/{k}"]) for k in ("x", "means", "log_scales")
    )
    ll = likelihood.discretized_gaussian_log_likelihood(
        x, means=means, log_scales=log_scales, log_floor=floor, tails=tails
    )
    return ll, arrays[f"{name}/out"]


@pytest.mark.parametrize("fixture, name, floor", LIKELIHOOD_GRIDS)
def test_log_likelihood_reproduces_the_reference(fixture, name, floor):
    ll, ref = _log_likelihood(fixture, name, floor, "reference")
    assert_reference_close(ll, ref, LL_RTOL, LL_ATOL, name)


def test_default_log_likelihood_differs_from_the_reference():
    # The underflow grid is all floors and certainties, where the two modes agree.
    for fixture, name, floor in (LIKELIHOOD_GRIDS[0], LIKELIHOOD_GRIDS[2]):
        ll, ref = _log_likelihood(fixture, name, floor, "exact")
        assert differs(ll, ref, LL_RTOL, LL_ATOL), name


def test_reference_tails_keep_gradients_finite():
    # Both branches of every where() are evaluated: floors keep the unused ones finite.
    x = jnp.asarray(LIKELIHOOD["discretized_gaussian_log_likelihood_underflow/x"])
    means = jnp.asarray(LIKELIHOOD["discretized_gaussian_log_likelihood_underflow/means"])

    def total(m, s):
        ll = likelihood.discretized_gaussian_log_likelihood(
            x, means=m, log_scales=s, tails="reference"
        )
        return jnp.sum(ll)

    grads = jax.grad(total, argnums=(0, 1))(means, jnp.full_like(x, -1.0))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)


def test_tails_is_validated():
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="'exact'.*'reference'"):
        likelihood.discretized_gaussian_log_likelihood(x, means=x, log_scales=x, tails="ref")
    with pytest.raises(ValueError, match="unknown tails 'torch'"):
        losses.training_losses(
            lambda x, t: x,
            openai.coeffs(openai.PROCESSES[0]),
            jnp.zeros((1, 2, 2, 3)),
            jnp.zeros((1,), jnp.int32),
            jnp.zeros((1, 2, 2, 3)),
            tails="torch",
        )
    c = openai.coeffs(openai.PROCESSES[0])
    with pytest.raises(ValueError, match="unknown tails 'torch'"):
        objectives.diffusion_loss_fn(lambda p, x, t: x, c, loss="openai", tails="torch")
    with pytest.raises(ValueError, match="tails='reference' is supported with loss='openai'"):
        objectives.diffusion_loss_fn(lambda p, x, t: x, c, loss="simple", tails="reference")


def test_openai_loss_fn_passes_tails_through():
    """objectives.diffusion_loss_fn(loss="openai", tails=...) is training_losses' tails=."""
    case = "cosine/T37/start_x/fixed_large"
    params = params_of(openai.ARR, case)
    x0, _, _ = openai.inputs(openai.META[case]["process"])
    # A one-step chain: every draw of t is 0, the decoder term.
    c = gaussian.make_coeffs(np.array([0.02]))
    key = jax.random.PRNGKey(3)
    noise = jax.random.normal(jax.random.fold_in(key, 1), x0.shape, x0.dtype)
    t = jnp.zeros((x0.shape[0],), jnp.int32)
    values = {}
    for tails in likelihood.TAILS:
        kwargs = dict(mean_type="x0", var_type="fixed_large", loss_type="kl", tails=tails)
        loss_fn = objectives.diffusion_loss_fn(
            lambda p, x, time: tanh_model(p)(x, time), c, loss="openai", train=False, **kwargs
        )
        values[tails], _ = loss_fn(params, x0, key)
        direct = losses.training_losses(tanh_model(params), c, x0, t, noise, **kwargs)["loss"]
        np.testing.assert_allclose(values[tails], jnp.mean(direct), rtol=1e-6)
    assert differs(values["exact"], values["reference"], VB_RTOL, VB_ATOL)


# ---- improved-diffusion: _vb_terms_bpd and training_losses -----------------------------------


def _vb_terms(case, clip, tails):
    """vb_terms_bpd from the reference's own model output and x_t: the diffusion math alone."""
    arr, meta = openai.ARR, openai.META[case]
    process = meta["process"]
    x0, _, t = openai.inputs(process)
    vb, _ = likelihood.vb_terms_bpd(
        openai.coeffs(process),
        nhwc(arr[f"{case}/model_output"]),
        x0,
        nhwc(arr[f"{process}/q_sample"]),
        t,
        mean_type=meta["mean_type"].lower(),
        var_type=meta["var_type"].lower(),
        clip_denoised=clip,
        tails=tails,
    )
    return vb, t


def _vb_scale(loss_type, c):
    """The weight improved-diffusion applies to the VB term in this loss type's terms."""
    if loss_type == "RESCALED_KL":
        return float(c.num_timesteps)
    return max(c.num_timesteps / 1000.0, 1.0) if loss_type == "RESCALED_MSE" else 1.0


def _openai_grads(case, tails):
    """The tanh model's parameter gradients of every training loss type of a case.

    One reverse pass gives the gradients of the three sums that every loss type is made of: the
    KL loss (``kl``; ``rescaled_kl`` is T times it), and the ``mse`` and unweighted ``vb``
    terms of the hybrid loss (``mse`` adds them, ``rescaled_mse`` weights vb by T / 1000)."""
    arr, meta = openai.ARR, openai.META[case]
    process = meta["process"]
    c = openai.coeffs(process)
    x0, noise, t = openai.inputs(process)
    kwargs = dict(
        mean_type=meta["mean_type"].lower(), var_type=meta["var_type"].lower(), tails=tails
    )
    learned = meta["var_type"].startswith("LEARNED")

    def sums(p):
        model_fn = tanh_model(p)
        kl = losses.training_losses(model_fn, c, x0, t, noise, loss_type="kl", **kwargs)
        out = [jnp.sum(kl["loss"])]
        if learned:
            hybrid = losses.training_losses(
                model_fn, c, x0, t, noise, loss_type="mse", vb_weight=1.0, **kwargs
            )
            out += [jnp.sum(hybrid["mse"]), jnp.sum(hybrid["vb"])]
        return jnp.stack(out)

    jac = jax.jacrev(sums)(params_of(arr, case))
    steps = float(c.num_timesteps)
    grads = {"KL": {k: g[0] for k, g in jac.items()}}
    grads["RESCALED_KL"] = {k: steps * g[0] for k, g in jac.items()}
    if learned:
        grads["MSE"] = {k: g[1] + g[2] for k, g in jac.items()}
        grads["RESCALED_MSE"] = {k: g[1] + steps / 1000.0 * g[2] for k, g in jac.items()}
    return grads


@pytest.mark.parametrize("case", openai.MODEL_CASES)
def test_openai_losses_reproduce_the_reference(case):
    arr, meta = openai.ARR, openai.META[case]
    for clip, tag in ((True, "clip"), (False, "noclip")):
        vb, _ = _vb_terms(case, clip, "reference")
        key = f"{case}/vb_terms_bpd/{tag}/output"
        assert_reference_close(vb, arr[key], VB_RTOL, VB_ATOL, key)

    # The loss terms from the reference's own model output (the diffusion math alone) ...
    process = meta["process"]
    c = openai.coeffs(process)
    x0, noise, t = openai.inputs(process)
    out_ref = nhwc(arr[f"{case}/model_output"])
    for loss_type, keys in meta["training_loss_keys"].items():
        terms = losses.training_losses(
            lambda x, time: out_ref,
            c,
            x0,
            t,
            noise,
            mean_type=meta["mean_type"].lower(),
            var_type=meta["var_type"].lower(),
            loss_type=loss_type.lower(),
            tails="reference",
        )
        assert set(terms) == set(keys), (set(terms), keys)
        prefix = f"{case}/training_losses/{loss_type}"
        for name in keys:
            atol = VB_ATOL * (_vb_scale(loss_type, c) if name != "mse" else 1.0)
            assert_reference_close(
                terms[name], arr[f"{prefix}/{name}"], VB_RTOL, atol, f"{prefix}/{name}"
            )

    # ... and the gradients of every loss with a VB term through the tanh model (the fixed
    # variances' mse losses have none: nothing that tails= changes; test_gaussian_openai_parity).
    for loss_type, grads in _openai_grads(case, "reference").items():
        for name in ("W", "b", "s"):
            key = f"{case}/training_losses/{loss_type}/grad_{name}"
            atol = GRAD_RTOL * float(np.max(np.abs(arr[key])))
            assert_reference_close(grads[name], arr[key], 0.0, atol, key)


# One process's cases: every mean type and variance type, t = 0 among its timesteps.
DEFAULT_CASES = [c for c in openai.MODEL_CASES if openai.META[c]["process"] == "cosine/T37"]


def test_default_openai_losses_differ_from_the_reference():
    """At t = 0, where the decoder of a poorly fitting tanh model sits in the CDF's tails."""
    differing = []
    for case in DEFAULT_CASES:
        vb, t = _vb_terms(case, False, "exact")
        at0 = np.asarray(t) == 0
        ref = openai.ARR[f"{case}/vb_terms_bpd/noclip/output"]
        if differs(np.asarray(vb)[at0], ref[at0], VB_RTOL, VB_ATOL):
            differing.append(case)
    # The x0 and previous-x models fit x0 worst at t = 0: there the default is off.
    assert len(differing) >= len(DEFAULT_CASES) // 4, differing
    # So are the gradients of the KL loss, which the t = 0 decoder term dominates.
    case = "cosine/T37/start_x/fixed_large"
    grads = _openai_grads(case, "exact")["KL"]
    ref = {n: openai.ARR[f"{case}/training_losses/KL/grad_{n}"] for n in ("W", "b", "s")}
    assert any(
        differs(grads[n], ref[n], 0.0, GRAD_RTOL * float(np.max(np.abs(ref[n])))) for n in ref
    )


# ---- improved-diffusion: calc_bpd_loop -------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("mean_type", "var_type", "clip", "tails"))
def _bpd_tanh(params, c, x0, noise, *, mean_type, var_type, clip, tails):
    result = likelihood.calc_bpd_loop(
        tanh_model(params),
        c,
        x0,
        noise=noise,
        mean_type=mean_type,
        var_type=var_type,
        clip_denoised=clip,
        tails=tails,
    )
    return result.vb, result.total_bpd


@functools.partial(jax.jit, static_argnames=("var_type", "clip"))
def _bpd_oracle(c, x0, noise, *, var_type, clip):
    result = likelihood.calc_bpd_loop(
        lambda x, t: x0,
        c,
        x0,
        noise=noise,
        mean_type="x0",
        var_type=var_type,
        clip_denoised=clip,
        tails="reference",
    )
    return result.vb, result.total_bpd


def _bpd_tanh_case(case, tails):
    meta = bpd.META[case]
    c = bpd.coeffs(meta["schedule"], meta["T"], meta["respacing"], meta["rescale_timesteps"])
    return _bpd_tanh(
        params_of(bpd.ARR, case),
        c,
        nhwc(bpd.ARR[f"{case}/x0"]),
        bpd.noise_by_timestep(meta),
        mean_type=meta["mean_type"].lower(),
        var_type=meta["var_type"].lower(),
        clip=meta["clip_denoised"],
        tails=tails,
    )


def _check_bpd(case, vb, total):
    meta = bpd.META[case]
    # The reference stacks per-step terms in loop order (T-1 .. 0); jaxdiff indexes them by t.
    vb = np.asarray(vb)[:, bpd.ARR[meta["t_order_key"]]]
    # linear T=20 has beta = 1 at its last step: the reference's NaNs must be jaxdiff's too.
    nonfinite = bool(meta.get("nonfinite_outputs"))
    assert_reference_close(vb, bpd.ARR[f"{case}/vb"], VB_RTOL, VB_ATOL, f"{case}/vb", nonfinite)
    assert_reference_close(
        total, bpd.ARR[f"{case}/total_bpd"], TOTAL_RTOL, VB_ATOL, f"{case}/total", nonfinite
    )


@pytest.mark.parametrize("case", bpd.TANH)
def test_tanh_model_bits_per_dim_reproduce_the_reference(case):
    _check_bpd(case, *_bpd_tanh_case(case, "reference"))


@pytest.mark.parametrize("case", bpd.ORACLE)
def test_x0_oracle_bits_per_dim_reproduce_the_reference(case):
    meta = bpd.META[case]
    c = bpd.coeffs(meta["schedule"], meta["T"], None, meta["rescale_timesteps"])
    vb, total = _bpd_oracle(
        c,
        nhwc(bpd.ARR[f"{case}/x0"]),
        bpd.noise_by_timestep(meta),
        var_type=meta["var_type"].lower(),
        clip=meta["clip_denoised"],
    )
    _check_bpd(case, vb, total)


def test_default_bits_per_dim_differ_from_the_reference():
    case = "tanh/cosine/T20/start_x/fixed_large"
    vb, total = _bpd_tanh_case(case, "exact")
    vb = np.asarray(vb)[:, bpd.ARR[bpd.META[case]["t_order_key"]]]
    assert differs(vb[:, -1], bpd.ARR[f"{case}/vb"][:, -1], VB_RTOL, VB_ATOL)  # t = 0
    assert differs(total, bpd.ARR[f"{case}/total_bpd"], TOTAL_RTOL, VB_ATOL)


# ---- denoising-diffusion-pytorch: LearnedGaussianDiffusion.p_losses --------------------------


def _lucid_losses(case, tails):
    meta = lucid.META[case]
    c = lucid.coeffs(meta["process"])
    x0, noise, t = lucid.inputs(meta["process"])

    def total(p):
        terms = losses.training_losses(
            tanh_model(p),
            c,
            x0,
            t,
            noise,
            mean_type="eps",
            var_type="learned_range",
            loss_type="mse",
            vb_weight=meta["vb_loss_weight"],
            log_floor=1e-15,
            tails=tails,
        )
        return jnp.sum(terms["loss"]), terms

    (_, terms), grads = jax.value_and_grad(total, has_aux=True)(params_of(lucid.ARR, case))
    return t, terms, grads


@pytest.mark.parametrize("case", lucid.LEARNED_CASES)
def test_lucid_learned_losses_reproduce_the_reference(case):
    t, terms, grads = _lucid_losses(case, "reference")
    prefix = f"{case}/p_losses"
    weight = lucid.META[case]["vb_loss_weight"]
    vb_ref = np.where(
        np.asarray(t) == 0,
        lucid.ARR[f"{prefix}/pieces/decoder_nll"],
        lucid.ARR[f"{prefix}/pieces/kl"],
    )
    assert_reference_close(
        np.asarray(terms["vb"]) / weight, vb_ref, VB_RTOL, VB_ATOL, f"{prefix}/vb"
    )
    assert_reference_close(
        terms["loss"], lucid.ARR[f"{prefix}/loss"], VB_RTOL, VB_ATOL, f"{prefix}/loss"
    )
    for name in ("W", "b", "s"):
        ref = lucid.ARR[f"{prefix}/grad_{name}"]
        atol = GRAD_RTOL * float(np.max(np.abs(ref)))
        assert_reference_close(grads[name], ref, 0.0, atol, f"{prefix}/grad_{name}")


def test_default_lucid_learned_losses_differ_from_the_reference():
    differing = []
    for case in lucid.LEARNED_CASES:
        t, terms, _ = _lucid_losses(case, "exact")
        prefix = f"{case}/p_losses"
        at0 = np.asarray(t) == 0
        weight = lucid.META[case]["vb_loss_weight"]
        if differs(
            (np.asarray(terms["vb"]) / weight)[at0],
            lucid.ARR[f"{prefix}/pieces/decoder_nll"][at0],
            VB_RTOL,
            VB_ATOL,
        ):
            differing.append(case)
    assert differing
