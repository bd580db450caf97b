"""The Flax ClassConditionalUnet with converted weights against denoising-diffusion-pytorch's
classifier-free-guidance Unet, and its guidance against ``forward_with_cond_scale``.

Fixtures: ``fixtures/cfg_unet.npz`` from ``generate_cfg_unet_fixtures.py`` (see PROVENANCE.md):
per configuration the reference state_dict (every parameter redrawn), inputs, the eval-mode
outputs with every label kept (``cond_drop_prob=0``), every label dropped (``cond_drop_prob=1``,
jaxdiff's label -1), a per-example keep mask, and ``forward_with_cond_scale`` at four guidance
settings (jaxdiff: the two outputs combined by ``guided_output``). Also: the exact state_dict
round trip, and the conversion's and the network's errors.
"""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.convert import flax_to_torch_state_dict, torch_key_map, torch_state_dict_to_flax
from jaxdiff.guidance import guided_output
from jaxdiff.models import ClassConditionalUnet, cfg_unet_from_config
from tests.parity import test_unet_parity
from tests.parity._fixtures import FIXTURES, Tol, assert_close, load, nchw, nhwc

HERE = pathlib.Path(__file__).resolve().parent
PYTHON = os.environ.get("JAXDIFF_REFERENCE_PYTHON", sys.executable)

# Max |jaxdiff - reference| relative to max |reference output|, each ~10x the worst measured
# over the six cases (float32 round-off of ~30 layers summed in another order, as for the lucid
# Unet; a mapping or formula mistake moves the output by O(1e-3) to O(1)). Measured (CPU, jit):
#
#   case                          network (kept/dropped/mixed)  guided   guidance alone
#   default                       6.8e-7                        2.3e-6   6.5e-8
#   four_stages                   1.3e-6                        4.0e-6   1.8e-7
#   grayscale                     8.2e-7                        2.5e-6   1.4e-7
#   learned_sinusoidal_3_stages   9.4e-7                        2.6e-6   3.0e-7
#   learned_variance              7.3e-7                        1.8e-6   1.5e-7
#   random_fourier                1.4e-6                        4.1e-6   1.5e-7
#
# Network outputs; the worst is the Fourier-feature net, whose sin(2 pi t w) of |t| up to 11.5
# rounds differently in XLA and in torch.
CFG_UNET = Tol("cfg_unet", 1.5e-5, 0.0, scaled=True)
# Guided outputs from jaxdiff's two network outputs: the network's error times up to
# (cond_scale - 1) = 5.
CFG_GUIDED = Tol("cfg_guided", 4e-5, 0.0, scaled=True)
# guided_output alone, on the reference's own two outputs: float32 here against the reference's
# float64 projection (skipping the projection is off by 8.6e-2 or more; the rescale's ratio of
# two stds does not depend on their n vs n - 1 correction).
CFG_GUIDANCE = Tol("cfg_guidance", 3e-6, 0.0, scaled=True)


def _cases():
    _, meta = load("cfg_unet")
    return sorted(meta)


def _state_dict(arrays, case):
    prefix = f"{case}/state_dict/"
    return {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}


def _relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected| (NaN if either holds a NaN)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def _assert_close(actual, expected, tol: Tol, what: str):
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    err = _relative_error(actual, expected)
    assert err <= tol.rtol, f"{what}: relative error {err:.3g} > {tol.rtol:g}"  # False on NaN
    assert_close(actual, expected, tol, err_msg=what)


@pytest.fixture(scope="module")
def outputs():
    """Per case: (arrays, meta, {name: jaxdiff output NCHW}) from one compiled network."""
    arrays, meta = load("cfg_unet")
    results = {}
    for case in sorted(meta):
        info = meta[case]
        net = cfg_unet_from_config(info["config"])
        variables = torch_state_dict_to_flax(_state_dict(arrays, case), net)
        apply = jax.jit(lambda v, x, t, label, net=net: net.apply(v, x, t, label=label))
        x, time = nhwc(arrays[f"{case}/x"]), jnp.asarray(arrays[f"{case}/time"])
        label = jnp.asarray(arrays[f"{case}/label"], jnp.int32)
        mixed = jnp.where(jnp.asarray(arrays[f"{case}/keep_mask"]), label, -1)
        results[case] = {
            "kept": apply(variables, x, time, label),
            "dropped": apply(variables, x, time, jnp.full_like(label, -1)),
            "mixed": apply(variables, x, time, mixed),
        }
    return arrays, meta, results


@pytest.mark.parametrize("case", _cases())
@pytest.mark.parametrize("which", ["kept", "dropped", "mixed"])
def test_flax_cfg_unet_matches_reference(outputs, case, which):
    arrays, meta, results = outputs
    out = results[case][which]
    assert out.shape[-1] == meta[case]["out_dim"]
    _assert_close(nchw(out), arrays[f"{case}/out_{which}"], CFG_UNET, f"{case} {which}")


@pytest.mark.parametrize("case", _cases())
def test_guided_output_matches_forward_with_cond_scale(outputs, case):
    arrays, meta, results = outputs
    cond, uncond = results[case]["kept"], results[case]["dropped"]
    for name, kwargs in meta[case]["guidance"].items():
        kwargs = dict(kwargs)
        scale, phi = kwargs.pop("cond_scale"), kwargs.pop("rescaled_phi")
        guided = jax.jit(guided_output, static_argnames="remove_parallel_component")(
            cond, uncond, scale, phi, **kwargs
        )
        _assert_close(nchw(guided), arrays[f"{case}/guided/{name}"], CFG_GUIDED, f"{case} {name}")


@pytest.mark.parametrize("case", _cases())
def test_guided_output_alone_matches_forward_with_cond_scale(case):
    arrays, meta = load("cfg_unet")
    cond = jnp.asarray(arrays[f"{case}/out_kept"])
    uncond = jnp.asarray(arrays[f"{case}/out_dropped"])
    for name, kwargs in meta[case]["guidance"].items():
        kwargs = dict(kwargs)
        scale, phi = kwargs.pop("cond_scale"), kwargs.pop("rescaled_phi")
        guided = guided_output(cond, uncond, scale, phi, **kwargs)
        _assert_close(guided, arrays[f"{case}/guided/{name}"], CFG_GUIDANCE, f"{case} {name}")


# ----------------------------------------------------------------------------------------------
# Conversion


@pytest.mark.parametrize("case", _cases())
def test_reference_state_dict_round_trip_is_exact(case):
    arrays, meta = load("cfg_unet")
    state, config = _state_dict(arrays, case), meta[case]["config"]
    assert sorted(state) == sorted(torch_key_map(config))
    back = flax_to_torch_state_dict(torch_state_dict_to_flax(state, config), config)
    assert sorted(back) == sorted(state)
    for key, value in state.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def _fixture(case="default"):
    arrays, meta = load("cfg_unet")
    return dict(_state_dict(arrays, case)), meta[case]["config"]


def test_missing_and_unexpected_keys_are_named():
    state, config = _fixture()
    del state["null_classes_emb"]
    state["classes_emb.extra"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError) as info:
        torch_state_dict_to_flax(state, config)
    message = str(info.value)
    assert "does not match the ClassConditionalUnet configuration" in message
    assert "Missing 1 key(s): null_classes_emb" in message
    assert "Unexpected 1 key(s): classes_emb.extra" in message
    assert "num_classes" in message


def test_mis_shaped_keys_are_named():
    state, config = _fixture()
    with pytest.raises(ValueError, match=r"classes_emb\.weight: got \(10, 4\), expected \(9, 4\)"):
        torch_state_dict_to_flax(state, {**config, "num_classes": 9})
    state["downs.0.3.weight"] = np.zeros((4, 4, 3, 3), np.float32)
    with pytest.raises(ValueError, match=r"downs\.0\.3\.weight: got \(4, 4, 3, 3\), expected"):
        torch_state_dict_to_flax(state, config)


def test_the_other_architecture_is_named():
    state, config = _fixture()
    lucid = {k: v for k, v in config.items() if k not in ("num_classes", "cond_drop_prob")}
    with pytest.raises(ValueError, match="classifier_free_guidance.Unet's; pass its config"):
        torch_state_dict_to_flax(state, lucid)
    del state["classes_emb.weight"]
    with pytest.raises(ValueError, match="looks like a \\(lucid\\) Unet's"):
        torch_state_dict_to_flax(state, config)


def test_flax_tree_errors_name_the_parameter():
    state, config = _fixture()
    params = dict(torch_state_dict_to_flax(state, config)["params"])
    del params["null_classes_emb"]
    with pytest.raises(ValueError, match="Missing 1 key.*null_classes_emb"):
        flax_to_torch_state_dict(params, config)


# ----------------------------------------------------------------------------------------------
# Labels and guidance

_TINY = {"dim": 4, "num_classes": 3, "dim_mults": (1,), "attn_heads": 1, "attn_dim_head": 2}


@pytest.fixture(scope="module")
def tiny():
    net = ClassConditionalUnet(**_TINY)
    rng = np.random.default_rng(0)
    state = {
        k: rng.standard_normal(e.torch_shape).astype(np.float32)
        for k, e in torch_key_map(net).items()
    }
    x = jnp.asarray(rng.standard_normal((3, 2, 2, 3)), jnp.float32)
    return net, torch_state_dict_to_flax(state, net), x, jnp.array([0, 10, 999])


def test_label_is_required(tiny):
    net, variables, x, t = tiny
    with pytest.raises(ValueError, match=r"needs label=.*\[0, 3\).*-1 for no class"):
        net.apply(variables, x, t)
    with pytest.raises(ValueError, match="label must be an integer array"):
        net.apply(variables, x, t, label=jnp.zeros(3))


def test_concrete_labels_out_of_range_are_rejected(tiny):
    net, variables, x, t = tiny
    for bad in ([0, 3, 1], [-2, 0, 1]):
        with pytest.raises(ValueError, match=r"label values must be in \[-1, 3\)"):
            net.apply(variables, x, t, label=jnp.array(bad))


def test_traced_labels_are_clamped_and_minus_one_is_the_null_class(tiny):
    net, variables, x, t = tiny
    apply = jax.jit(lambda v, label: net.apply(v, x, t, label=label))
    # under jit nothing is checked: a label >= num_classes reads the last class, a negative one
    # the null embedding (bitwise: the same rows of the same program)
    clamped = apply(variables, jnp.array([5, -7, 1]))
    np.testing.assert_array_equal(clamped, apply(variables, jnp.array([2, -1, 1])))
    # -1 uses null_classes_emb: the output moves with it and with no class row
    params = dict(variables["params"])
    params["null_classes_emb"] = params["null_classes_emb"] + 1.0
    moved = apply({"params": params}, jnp.array([-1, -1, 0]))
    base = apply(variables, jnp.array([-1, -1, 0]))
    assert float(jnp.abs(moved - base)[:2].max()) > 1e-3
    np.testing.assert_array_equal(moved[2], base[2])


def test_remat_and_bfloat16_execution_options(tiny):
    net, variables, x, t = tiny
    label = jnp.array([2, -1, 0])

    def loss(v, model):
        return jnp.mean(jnp.square(model.apply(v, x, t, label=label)))

    value, grads = jax.jit(jax.value_and_grad(lambda v: loss(v, net)))(variables)
    value_r, grads_r = jax.jit(jax.value_and_grad(lambda v: loss(v, net.clone(remat=True))))(
        variables
    )
    np.testing.assert_allclose(value_r, value, rtol=1e-6)
    # the same math recomputed in another fusion: float32 round-off, relative to each
    # parameter's largest gradient (measured 6.6e-7; single entries that cancel are off by more
    # relative to themselves)
    for a, b in zip(jax.tree.leaves(grads_r), jax.tree.leaves(grads), strict=True):
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * float(jnp.max(jnp.abs(b)))
    out = jax.jit(lambda v: net.apply(v, x, t, label=label))(variables)
    half = jax.jit(lambda v: net.clone(dtype="bfloat16").apply(v, x, t, label=label))(variables)
    assert half.dtype == jnp.float32
    # bfloat16 keeps 8 bits of mantissa: measured 8.7e-3 of the output's scale
    assert float(jnp.max(jnp.abs(half - out)) / jnp.max(jnp.abs(out))) <= 8e-2


def test_configs_round_trip_and_are_checked():
    net = cfg_unet_from_config({**_TINY, "dim_mults": [1]})
    assert net.dim_mults == (1,) and net.cond_drop_prob == 0.5
    assert cfg_unet_from_config(net.config()) == net
    assert cfg_unet_from_config("cfg-tiny").num_classes == 10
    assert cfg_unet_from_config(net, remat=True).remat
    with pytest.raises(ValueError, match=r"unknown ClassConditionalUnet option\(s\) \['dropout'\]"):
        cfg_unet_from_config({**_TINY, "dropout": 0.1})
    with pytest.raises(ValueError, match=r"needs \['num_classes'\]"):
        cfg_unet_from_config({"dim": 8})
    with pytest.raises(ValueError, match=r"cond_drop_prob must be in \[0, 1\]"):
        ClassConditionalUnet(**{**_TINY, "cond_drop_prob": 1.5})
    with pytest.raises(ValueError, match="attn_heads must be a positive int"):
        ClassConditionalUnet(**{**_TINY, "attn_heads": (1, 2)})


def test_guided_output_reference_shortcuts_and_classic_form():
    rng = np.random.default_rng(3)
    cond, uncond = (jnp.asarray(rng.standard_normal((2, 4, 4, 3)), jnp.float32) for _ in "cu")
    # scale 1 returns the conditional output exactly, rescaled_phi 0 the unrescaled one
    np.testing.assert_array_equal(guided_output(cond, uncond, 1.0, 0.7), cond)
    plain = guided_output(cond, uncond, 3.0, remove_parallel_component=False)
    np.testing.assert_allclose(plain, uncond + 3.0 * (cond - uncond), rtol=1e-5, atol=1e-5)
    # the parallel part of the update is removed: the guided update is orthogonal to cond
    update = guided_output(cond, uncond, 3.0) - cond
    dots = jnp.sum((update * cond).reshape(2, -1), axis=-1)
    assert float(jnp.abs(dots).max()) < 1e-4
    # full rescale (phi = 1) restores the conditional output's unbiased std per example
    rescaled = guided_output(cond, uncond, 5.0, 1.0)
    std = lambda a: jnp.std(a.reshape(2, -1), axis=-1, ddof=1)  # noqa: E731
    np.testing.assert_allclose(std(rescaled), std(cond), rtol=1e-5)
    with pytest.raises(ValueError, match="one shape"):
        guided_output(cond, uncond[:1], 3.0)


# ----------------------------------------------------------------------------------------------
# Live mode


@pytest.mark.live
@pytest.mark.skipif(
    not test_unet_parity._reference_available(),
    reason="live cfg Unet parity needs torch 2.13.0 + denoising-diffusion-pytorch 2.3.4 in this "
    "Python or in $JAXDIFF_REFERENCE_PYTHON (see PROVENANCE.md); the committed fixture is "
    "checked by test_flax_cfg_unet_matches_reference",
)
def test_reference_reproduces_cfg_unet_fixture(tmp_path):
    subprocess.run(
        [PYTHON, str(HERE / "generate_cfg_unet_fixtures.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh, stored = np.load(tmp_path / "cfg_unet.npz"), np.load(FIXTURES / "cfg_unet.npz")
    assert sorted(fresh.files) == sorted(stored.files)
    for key in stored.files:
        np.testing.assert_array_equal(fresh[key], stored[key], err_msg=key)
