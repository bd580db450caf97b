"""``jaxdiff.openai_script`` against openai's ``script_util`` (improved-diffusion 1bc7bbb,
guided-diffusion 22e0df8): the same options from the same flags, the same network (state_dict
keys and shapes), the same process (betas, respacing, the network's times, mean / variance /
loss types) and, for small networks with imported weights, the same ``p_mean_variance``.

Fixture: ``fixtures/openai_script.npz`` from ``generate_openai_script_fixtures.py`` (see
PROVENANCE.md). The small networks' weights are not stored: ``redraw`` (_redraw.py) rebuilds them
(the generator's counter-based rule), and a CRC-32 per parameter proves they are the same.
"""

import functools
import pathlib
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import gaussian, schedules
from jaxdiff.convert_openai import openai_key_map, openai_state_dict_to_params
from jaxdiff.openai_script import (
    CLASSIFIER_DEFAULTS,
    GUIDED_DEFAULTS,
    IMPROVED_DEFAULTS,
    create_classifier_and_diffusion,
    create_model_and_diffusion,
    parse_flags,
)
from tests.parity._fixtures import (
    F64_TABLE,
    Tol,
    assert_close,
    load,
    nchw,
    nhwc,
    openai_references_available,
    regenerated_equals_committed,
)
from tests.parity._redraw import redraw

HERE = pathlib.Path(__file__).resolve().parent
NAME = "openai_script"

# Tolerances (measured on a 2-core CPU, jit, float32 on both sides; PROVENANCE.md has the table).
# The coefficient table is float32, the reference's betas float64: rounding to nearest is within
# 2**-24 relative (measured 5.85e-8); 2**-23 allows one more ulp. The float64 host path
# (schedules.respace_betas) is held to F64_TABLE (measured 1.1e-11 relative: NumPy's cos against
# math.cos in the cosine schedule, then 1 - abar_t / abar_s cancels; the linear ones are exact).
BETAS_F32 = Tol("openai_script_betas", 2.0**-23, 0.0)
# The network output, relative to max |output| (float32 round-off through ~30 layers summed in
# another order; OPENAI_UNET of test_openai_unet_parity.py): measured 2.4e-6.
NETWORK = Tol("openai_script_network", 3e-5, 0.0, scaled=True)
# p_mean_variance on that output, ~10x the worst measured over the cases:
PROCESS = {
    # relative to max |mean|: 1.5e-6
    "mean": Tol("openai_script_mean", 1.5e-5, 0.0, scaled=True),
    # elementwise relative (beta-tilde spans decades over t; 0 at t = 0 for fixed_small): 2.0e-6
    "variance": Tol("openai_script_variance", 2e-5, 1e-12),
    # absolute, the learned-range interpolation of logs up to ~12 in size: 1.9e-6
    "log_variance": Tol("openai_script_log_variance", 0.0, 2e-5),
    # relative to max |pred_xstart| (<= 1, clipped): 2.6e-5, the network's error times
    # sqrt(1 / abar - 1), ~10 at the last step of the cosine DDIM chain
    "pred_xstart": Tol("openai_script_pred_xstart", 3e-4, 0.0, scaled=True),
}

MEAN_TYPES = {"EPSILON": "eps", "START_X": "x0", "PREVIOUS_X": "prev_x"}
VAR_TYPES = {
    "FIXED_SMALL": "fixed_small",
    "FIXED_LARGE": "fixed_large",
    "LEARNED": "learned",
    "LEARNED_RANGE": "learned_range",
}
LOSS_TYPES = {
    "MSE": "mse",
    "RESCALED_MSE": "rescaled_mse",
    "KL": "kl",
    "RESCALED_KL": "rescaled_kl",
}


def _cases(group: str) -> list[str]:
    _, meta = load(NAME)
    return sorted(case for case, info in meta.items() if info["group"] == group)


def _create(info, flags=None, **options):
    flags = info["flags"] if flags is None else flags
    if info["kind"] == "classifier":
        return create_classifier_and_diffusion(flags, **options)
    return create_model_and_diffusion(flags, layout=info["repository"], **options)


def _state_dict(case: str, info) -> dict[str, np.ndarray]:
    state = {k: redraw(case, k, tuple(shape)) for k, shape in info["state_dict"]}
    crcs = {k: zlib.crc32(v.astype(np.float16).tobytes()) for k, v in state.items()}
    assert crcs == info["crc32"], f"{case}: the redraw differs from the generator's"
    return state


# ----------------------------------------------------------------------------------------------
# Options, defaults, refusals


def test_defaults_are_the_references():
    _, meta = load(NAME)
    for case, ours in (
        ("defaults_improved", IMPROVED_DEFAULTS),
        ("defaults_guided", GUIDED_DEFAULTS),
        ("defaults_classifier", CLASSIFIER_DEFAULTS),
    ):
        theirs = [tuple(item) for item in meta[case]["defaults"]]
        assert list(ours.items()) == theirs, case  # names, order, values
        assert [type(v) for v in ours.values()] == [type(v) for _, v in theirs], case


@pytest.mark.parametrize("case", _cases("published") + _cases("small"))
def test_flags_parse_as_the_scripts_parse_them(case):
    _, meta = load(NAME)
    info = meta[case]
    parsed = parse_flags(
        info["flags"], layout=info["repository"], classifier=info["kind"] == "classifier"
    )
    assert parsed == info["options"]
    assert {k: type(v) for k, v in parsed.items()} == {
        k: type(v) for k, v in info["options"].items()
    }
    if info.get("script_flags"):  # what the README line adds for the sampling script
        with pytest.raises(ValueError, match="leave it out of the model flags"):
            _create(info, f"{info['flags']} {info['script_flags']}")


def test_booleans_take_str2bools_spellings():
    _, meta = load(NAME)
    for spelling, value in meta["str2bool"]["spellings"].items():
        for flags in ({"learn_sigma": spelling}, [f"--learn_sigma={spelling}"]):
            if value is None:
                with pytest.raises(ValueError, match="--learn_sigma takes a boolean"):
                    parse_flags(flags)
            else:
                assert parse_flags(flags)["learn_sigma"] is value, spelling


# what jaxdiff's message names, for each refusal of the references
REFUSALS = {
    "improved_image_size_128": "unsupported --image_size 128",
    "guided_image_size_32": "unsupported --image_size 32",
    "classifier_image_size_32": "unsupported --image_size 32",
    "guided_fractional_channel_mult": "--channel_mult takes comma-separated integers",
    "improved_sigmoid_schedule": "unknown --noise_schedule 'sigmoid'",
}


@pytest.mark.parametrize("case", _cases("refused"))
def test_what_the_references_refuse_is_refused(case):
    _, meta = load(NAME)
    info = meta[case]
    with pytest.raises(ValueError) as raised:
        _create(info)
    assert REFUSALS[case] in str(raised.value), (info["error"], str(raised.value))


# ----------------------------------------------------------------------------------------------
# Published configurations: the network's keys and shapes, the process


def _check_diffusion(diffusion, reference, arrays, prefix: str, options) -> None:
    config, coeffs = diffusion.config, diffusion.coeffs
    assert config.loss == "openai"
    assert (config.schedule, config.timesteps) == (
        options["noise_schedule"],
        options["diffusion_steps"],
    )
    assert config.objective == MEAN_TYPES[reference["mean_type"]]
    assert config.var_type == VAR_TYPES[reference["var_type"]]
    assert config.loss_type == LOSS_TYPES[reference["loss_type"]]
    assert config.rescale_timesteps is reference["rescale_timesteps"]
    assert coeffs.num_timesteps == reference["num_timesteps"]
    betas = arrays[f"{prefix}/betas"]
    assert_close(coeffs.betas, betas, BETAS_F32, err_msg=f"{prefix} betas (float32)")
    # the float64 host path the table is built from
    steps = schedules.space_timesteps(config.timesteps, diffusion.respacing or "")
    np.testing.assert_array_equal(steps, arrays[f"{prefix}/timestep_map"], err_msg=prefix)
    full = schedules.get_named_beta_schedule(config.schedule, config.timesteps)
    betas64, _ = schedules.respace_betas(full, steps)
    assert_close(betas64, betas, F64_TABLE, err_msg=f"{prefix} betas (float64)")
    # the network's time at every step: exactly what the wrapped model passes
    times = arrays[f"{prefix}/model_times"]
    np.testing.assert_array_equal(np.asarray(coeffs.model_times), times, err_msg=prefix)


@pytest.mark.parametrize("case", _cases("published"))
def test_published_network_has_the_references_keys_and_shapes(case):
    _, meta = load(NAME)
    info = meta[case]
    model, _ = _create(info)
    # the key map comes from jax.eval_shape(model.init): nothing is materialised
    ours = {k: tuple(entry.torch_shape) for k, entry in openai_key_map(model).items()}
    theirs = {k: tuple(shape) for k, shape in info["state_dict"]}
    assert sorted(ours) == sorted(theirs)
    assert ours == theirs
    fp16 = info["options"].get("use_fp16") or info["options"].get("classifier_use_fp16")
    assert model.dtype == ("bfloat16" if fp16 else None)


@pytest.mark.parametrize("case", _cases("published"))
def test_published_diffusion_matches(case):
    arrays, meta = load(NAME)
    info = meta[case]
    _, diffusion = _create(info)
    assert diffusion.respacing is None
    _check_diffusion(diffusion, info["diffusion"], arrays, case, info["options"])
    flags = f"{info['flags']} --timestep_respacing {info['respacing']}"
    _, respaced = _create(info, flags)
    assert respaced.respacing == info["respacing"]
    _check_diffusion(respaced, info["respaced"], arrays, f"{case}/respaced", info["options"])


def test_published_cases_cover_both_repositories_and_every_size():
    _, meta = load(NAME)
    published = [meta[c] for c in _cases("published")]
    sizes = {(i["repository"], i["kind"], i["options"]["image_size"]) for i in published}
    assert {("improved", "model", s) for s in (32, 64, 256)} <= sizes
    assert {("guided", "model", s) for s in (64, 128, 256, 512)} <= sizes
    assert {("guided", "classifier", s) for s in (64, 128, 256)} <= sizes


# ----------------------------------------------------------------------------------------------
# Small networks with weights: the network's time and output, then p_mean_variance


@functools.cache
def small_result(case: str) -> dict[str, np.ndarray]:
    """The jaxdiff network's time and output (NCHW) and its p_mean_variance, for a small case
    (one jit each; each case is its own test, so that pytest-xdist spreads them)."""
    arrays, meta = load(NAME)
    info = meta[case]
    model, diffusion = _create(info)
    variables = openai_state_dict_to_params(_state_dict(case, info), model)
    x, t = nhwc(arrays[f"{case}/x"]), jnp.asarray(arrays[f"{case}/t"], jnp.int32)
    cond = {"y": jnp.asarray(arrays[f"{case}/y"], jnp.int32)} if "y" in info["inputs"] else {}
    time = diffusion.coeffs.model_times[t]  # what SpacedDiffusion's wrapped model passes
    out = jax.jit(lambda v, x, time, cond: model.apply(v, x, time, **cond))(
        variables, x, time, cond
    )
    result = {"model_t": np.asarray(time), "model_out": out}
    if info["kind"] == "model":
        d = diffusion.config
        p = gaussian.p_mean_variance(
            diffusion.coeffs,
            out,
            x,
            t,
            mean_type=d.objective,
            var_type=d.var_type,
            clip_denoised=True,
        )
        result.update(mean=p.mean, variance=p.variance, log_variance=p.log_variance)
        result["pred_xstart"] = p.pred_x0
    return {k: nchw(v) if v.ndim == 4 else np.asarray(v) for k, v in result.items()}


@pytest.mark.parametrize("case", _cases("small"))
def test_small_network_matches_reference(case):
    arrays, meta = load(NAME)
    info = meta[case]
    ours = small_result(case)
    # the whole chain of times: respaced step -> original timestep (-> x 1000 / T)
    np.testing.assert_array_equal(ours["model_t"], arrays[f"{case}/model_t"], err_msg=case)
    assert_close(ours["model_out"], arrays[f"{case}/model_out"], NETWORK, err_msg=case)
    # a wrong time (the respaced step itself) moves the output far beyond the tolerance
    assert info["raw_step_change"] > 100 * NETWORK.rtol
    if info["kind"] == "model":
        for name, tol in PROCESS.items():
            expected = arrays[f"{case}/{name}"]
            assert_close(ours[name], expected, tol, err_msg=f"{case} {name}")


@pytest.mark.parametrize("case", _cases("small"))
def test_small_network_keys_are_the_references(case):
    _, meta = load(NAME)
    info = meta[case]
    model, _ = _create(info)
    ours = {k: tuple(entry.torch_shape) for k, entry in openai_key_map(model).items()}
    assert ours == {k: tuple(shape) for k, shape in info["state_dict"]}


def test_small_cases_cover_the_options():
    _, meta = load(NAME)
    small = [meta[c] for c in _cases("small")]
    seen = {
        (name, info["options"].get(name))
        for info in small
        for name in info["options"]
        if isinstance(info["options"][name], bool) or name == "noise_schedule"
    }
    for name in ("learn_sigma", "use_scale_shift_norm", "predict_xstart", "rescale_timesteps"):
        assert {(name, True), (name, False)} <= seen, name
    for option in ("class_cond", "resblock_updown", "use_new_attention_order", "use_kl"):
        assert (option, True) in seen, option
    assert {("noise_schedule", "linear"), ("noise_schedule", "cosine")} <= seen
    var_types = {info["diffusion"]["var_type"] for info in small if info["kind"] == "model"}
    assert var_types == {"LEARNED_RANGE", "FIXED_SMALL", "FIXED_LARGE"}
    assert any(info["kind"] == "classifier" for info in small)


# ----------------------------------------------------------------------------------------------
# Live mode


@pytest.mark.live
@pytest.mark.skipif(
    not openai_references_available(),
    reason="live openai script_util parity needs torch 2.13.0 in this Python or in "
    "$JAXDIFF_REFERENCE_PYTHON, IMPROVED_DIFFUSION_DIR and GUIDED_DIFFUSION_DIR (see "
    "PROVENANCE.md); the committed fixture is checked by the other tests here",
)
def test_reference_reproduces_openai_script_fixture(tmp_path):
    regenerated_equals_committed("generate_openai_script_fixtures.py", NAME, tmp_path)
