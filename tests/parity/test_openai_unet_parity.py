"""openai's UNetModel, SuperResModel and EncoderUNetModel in Flax, with imported weights, against
the references (improved-diffusion 1bc7bbb, guided-diffusion 22e0df8).

Fixtures: ``fixtures/openai_unet.npz`` from ``generate_openai_unet_fixtures.py`` (see
PROVENANCE.md): per configuration the reference state_dict (every parameter redrawn; stored as
float16, the exact values the float32 network ran with), inputs and the eval-mode output. Also:
the exact state_dict round trip, the conversion's and the networks' errors, ``.pt`` files, and a
bfloat16 run.
"""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.convert_openai import (
    load_openai_pt,
    openai_key_map,
    openai_state_dict_to_params,
    params_to_openai_state_dict,
    save_openai_pt,
)
from jaxdiff.models.openai_unet import EncoderUNetModel, UNetModel, openai_model_from_config
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

# max |jaxdiff - reference| / max |reference output|, measured (2-core CPU, jit, float32 on both
# sides; tests/parity/PROVENANCE.md has the table too):
#
#   encoder_adaptive             2.2e-7    guided_updown_fractional_mult     2.8e-6
#   encoder_attention_avg_pool   2.0e-7    improved_class_scale_shift        1.3e-6
#   encoder_spatial              1.0e-6    improved_heads_upsample_dropout   1.2e-6
#   encoder_spatial_v2           9.8e-7    improved_no_res_blocks_widening   1.2e-6
#   guided_class_scale_shift     1.3e-6    improved_superres                 1.8e-6
#   guided_legacy_order_head_ch. 1.3e-6    guided_superres_new_order         1.6e-6
#   guided_new_order_head_ch.    1.5e-6
#
# float32 round-off of ~25 layers whose convolution, GroupNorm and attention sums run in another
# order in XLA and in PyTorch. 3e-5 is ~10x the worst. Mistakes measured against the same
# fixtures move the output by far more (smallest over the cases): sin before cos 1.9e-2, the
# lucid "half - 1" frequency denominator 1.6e-2, the other qkv head layout 4.4e-1, even the
# attention output scaled by 1.001 4.2e-4.
OPENAI_UNET = Tol("openai_unet", 3e-5, 0.0, scaled=True)
# bfloat16 torso against the float32 network on the same weights (8 bits of mantissa through
# ~25 layers): measured 1.4e-2 of the output's scale (guided_class_scale_shift).
BF16_RELATIVE = 0.1


def _cases():
    _, meta = load("openai_unet")
    return sorted(meta)


def _model(info, **options):
    if info["model"] != "EncoderUNetModel":
        options.setdefault("layout", info["repository"])
    return openai_model_from_config(info["kwargs"], model=info["model"], **options)


def _state_dict(arrays, owner: str) -> dict[str, np.ndarray]:
    """The case's state_dict as float32 (stored as float16: the same values, exactly)."""
    prefix = f"{owner}/state_dict/"
    return {
        k[len(prefix) :]: v.astype(np.float32) for k, v in arrays.items() if k.startswith(prefix)
    }


def _inputs(arrays, case, info):
    x, t = nhwc(arrays[f"{case}/x"]), jnp.asarray(arrays[f"{case}/t"])
    cond = {}
    if "y" in info["inputs"]:
        cond["y"] = jnp.asarray(arrays[f"{case}/y"], jnp.int32)
    if "low_res" in info["inputs"]:
        cond["low_res"] = nhwc(arrays[f"{case}/low_res"])
    return x, t, cond


def _run(model, variables, x, t, cond):
    return jax.jit(lambda v, x, t, cond: model.apply(v, x, t, **cond))(variables, x, t, cond)


def _relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected| (NaN if either holds a NaN)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


@pytest.fixture(scope="module")
def outputs():
    """Per case the jaxdiff output in the reference's layout (NCHW, or [B, K]), one jit each."""
    arrays, meta = load("openai_unet")
    results = {}
    for case, info in sorted(meta.items()):
        model = _model(info)
        variables = openai_state_dict_to_params(_state_dict(arrays, info["weights"]), model)
        out = _run(model, variables, *_inputs(arrays, case, info))
        results[case] = nchw(out) if out.ndim == 4 else np.asarray(out)
    return results


@pytest.mark.parametrize("case", _cases())
def test_flax_network_matches_reference(outputs, case):
    arrays, _ = load("openai_unet")
    actual, expected = outputs[case], arrays[f"{case}/out"]
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = _relative_error(actual, expected)
    assert err <= OPENAI_UNET.rtol, f"{case}: relative error {err:.3g}"  # False on NaN
    assert_close(actual, expected, OPENAI_UNET, err_msg=case)


def test_cases_cover_both_repositories_and_every_pool():
    _, meta = load("openai_unet")
    kinds = {(info["repository"], info["model"]) for info in meta.values()}
    assert {("improved", "UNetModel"), ("guided", "UNetModel")} <= kinds
    assert {("improved", "SuperResModel"), ("guided", "SuperResModel")} <= kinds
    pools = {i["kwargs"]["pool"] for i in meta.values() if i["model"] == "EncoderUNetModel"}
    assert pools == {"adaptive", "attention", "spatial", "spatial_v2"}


# ----------------------------------------------------------------------------------------------
# Conversion


def _owners():
    _, meta = load("openai_unet")
    return sorted({info["weights"] for info in meta.values()})


@pytest.mark.parametrize("owner", _owners())
def test_state_dict_round_trip_is_exact(owner):
    arrays, meta = load("openai_unet")
    model = _model(meta[owner])
    state = _state_dict(arrays, owner)
    assert sorted(state) == sorted(openai_key_map(model))
    back = params_to_openai_state_dict(openai_state_dict_to_params(state, model), model)
    assert sorted(back) == sorted(state)
    for key, value in state.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def _fixture(case="improved_class_scale_shift"):
    arrays, meta = load("openai_unet")
    return _state_dict(arrays, meta[case]["weights"]), _model(meta[case])


def test_missing_and_unexpected_keys_are_named():
    state, model = _fixture()
    del state["middle_block.1.qkv.weight"]
    state["middle_block.1.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError) as info:
        openai_state_dict_to_params(state, model)
    message = str(info.value)
    assert "does not match the UNetModel configuration" in message
    assert "Missing 1 key(s): middle_block.1.qkv.weight" in message
    assert "Unexpected 1 key(s): middle_block.1.extra.weight" in message
    assert "another configuration" in message and "num_classes" in message


def test_a_checkpoint_of_another_configuration_is_refused_by_name():
    state, model = _fixture()
    with pytest.raises(ValueError, match=r"Unexpected 1 key\(s\): label_emb\.weight.*num_classes"):
        openai_state_dict_to_params(state, model.clone(num_classes=None))
    no_scale_shift = model.clone(use_scale_shift_norm=False)
    with pytest.raises(ValueError, match=r"emb_layers\.1\.weight: got \(64, 128\), expected \(32"):
        openai_state_dict_to_params(state, no_scale_shift)
    state["input_blocks.0.0.weight"] = np.zeros((32, 4, 3, 3), np.float32)
    with pytest.raises(ValueError, match=r"input_blocks\.0\.0\.weight: got \(32, 4, 3, 3\)"):
        openai_state_dict_to_params(state, model)
    classifier = EncoderUNetModel(3, 32, 10, 1, (2,), channel_mult=(1, 1))
    with pytest.raises(ValueError, match="it is a UNetModel's, not a classifier's"):
        openai_state_dict_to_params(state, classifier)
    with pytest.raises(ValueError, match="one prefix"):
        openai_state_dict_to_params({f"module.{k}": v for k, v in state.items()}, model)


def test_flax_tree_errors_name_the_parameter():
    state, model = _fixture()
    params = openai_state_dict_to_params(state, model)["params"]
    params = {**params, "label_emb": {}}
    with pytest.raises(ValueError, match=r"Missing 1 key.*label_emb/embedding"):
        params_to_openai_state_dict(params, model)


def test_unsupported_options_are_refused():
    base = dict(in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1)
    with pytest.raises(ValueError, match=r"dims=3 is not supported.*dims=2"):
        UNetModel(**base, attention_resolutions=(), dims=3)
    with pytest.raises(ValueError, match="resblock_updown is not an option of improved"):
        UNetModel(**base, attention_resolutions=(), resblock_updown=True, layout="improved")
    with pytest.raises(ValueError, match="integer channel_mult starting at 1"):
        UNetModel(**base, attention_resolutions=(), channel_mult=(2, 2), layout="improved")
    with pytest.raises(ValueError, match="GroupNorm"):
        UNetModel(**{**base, "model_channels": 16}, attention_resolutions=())
    with pytest.raises(ValueError, match="32 channels cannot be split into heads"):
        UNetModel(**base, attention_resolutions=(1,), channel_mult=(1,), num_heads=3)
    with pytest.raises(ValueError, match="num_head_channels=12"):
        UNetModel(**base, attention_resolutions=(1,), channel_mult=(1,), num_head_channels=12)
    with pytest.raises(ValueError, match="pool must be one of"):
        EncoderUNetModel(**base, attention_resolutions=(), pool="max")
    with pytest.raises(ValueError, match="needs num_head_channels"):
        EncoderUNetModel(**base, attention_resolutions=(), image_size=8, pool="attention")
    with pytest.raises(ValueError, match=r"unknown UNetModel option\(s\) \['pool'\]"):
        openai_model_from_config({**base, "attention_resolutions": [], "pool": "adaptive"})


def test_configs_round_trip_and_map_the_execution_flags():
    _, meta = load("openai_unet")
    for info in meta.values():
        model = _model(info)
        assert openai_model_from_config(model.config(), model=info["model"]) == model
    kwargs = dict(meta["guided_class_scale_shift"]["kwargs"], use_fp16=True, use_checkpoint=True)
    assert openai_model_from_config(kwargs).dtype == "bfloat16"
    assert openai_model_from_config(kwargs, dtype="float32").dtype == "float32"


# ----------------------------------------------------------------------------------------------
# .pt files

_PT_CASES = {
    "junk.pt": (b"not a checkpoint " * 8, "neither a zip archive nor a pickle"),
    "empty.pt": (b"", r"is empty \(0 bytes\)"),
    "truncated.pt": (b"PK\x03\x04" + b"\x00" * 40, "truncated or damaged zip"),
}


@pytest.mark.parametrize("name", sorted(_PT_CASES))
def test_unreadable_pt_files_name_the_file(tmp_path, name):
    data, match = _PT_CASES[name]
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ValueError, match=match) as info:
        load_openai_pt(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_openai_pt(tmp_path / "absent.pt")


def test_pt_without_torch_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    path = tmp_path / "model.pt"
    path.write_bytes(b"\x80\x02x")
    with pytest.raises(ValueError, match=r"needs PyTorch.*pip install torch==2\.13\.0"):
        load_openai_pt(path)
    with pytest.raises(ValueError, match=r"needs PyTorch.*pip install torch==2\.13\.0"):
        save_openai_pt(tmp_path / "out.pt", {"a": np.zeros(2, np.float32)})


def test_pt_round_trip_and_corrupt_files_with_torch(tmp_path):
    torch = pytest.importorskip("torch")
    state, model = _fixture("encoder_attention_avg_pool")
    path = save_openai_pt(tmp_path / "classifier.pt", state)
    back = load_openai_pt(path)
    assert sorted(back) == sorted(state)
    for key, value in state.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    openai_state_dict_to_params(back, model)
    with pytest.raises(FileExistsError):
        save_openai_pt(path, state)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(ValueError, match="truncated or damaged zip"):
        load_openai_pt(cut)
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], listed)
    with pytest.raises(ValueError, match="holds a list"):
        load_openai_pt(listed)
    nested = tmp_path / "nested.pt"
    torch.save({"model": {"w": torch.zeros(2)}}, nested)
    with pytest.raises(ValueError, match="not a state_dict of tensors: 'model' holds a dict"):
        load_openai_pt(nested)


# ----------------------------------------------------------------------------------------------
# The networks


def test_bfloat16_torso_is_finite_and_close_to_float32(outputs):
    arrays, meta = load("openai_unet")
    case = "guided_class_scale_shift"
    model = _model(meta[case], dtype="bfloat16")
    variables = openai_state_dict_to_params(_state_dict(arrays, meta[case]["weights"]), model)
    out = _run(model, variables, *_inputs(arrays, case, meta[case]))
    assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
    err = _relative_error(nchw(out), outputs[case])
    assert err <= BF16_RELATIVE, err  # False on NaN
    assert err > 0  # it did compute in bfloat16


def test_inputs_are_checked_and_dropout_runs_in_train_mode():
    model = UNetModel(1, 32, 1, 1, (), channel_mult=(1,), dropout=0.5, num_classes=3)
    x, t, y = jnp.ones((2, 4, 4, 1)), jnp.array([0, 9]), jnp.array([0, 2])
    # random weights everywhere (the zero-initialised output convs would hide the dropout)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x, t, y)
    rng = np.random.default_rng(1)
    variables = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32), shapes)
    apply = jax.jit(model.apply, static_argnames="train")
    eval_out = apply(variables, x, t, y)
    key = {"dropout": jax.random.key(2)}
    train_out = apply(variables, x, t, y, train=True, rngs=key)
    assert float(jnp.max(jnp.abs(train_out - eval_out))) > 1e-3
    np.testing.assert_array_equal(apply(variables, x, t, y, train=True, rngs=key), train_out)
    # the checks run before any layer (eagerly here: the label range needs concrete labels)
    with pytest.raises(ValueError, match="channels-last"):
        model.apply(variables, jnp.ones((2, 1, 4, 4)), t, y)
    with pytest.raises(ValueError, match="pass y"):
        model.apply(variables, x, t)
    with pytest.raises(ValueError, match=r"y values must be in \[0, 3\)"):
        model.apply(variables, x, t, jnp.array([0, 3]))
    with pytest.raises(ValueError, match=r"t must be \[B\]"):
        model.apply(variables, x, jnp.zeros(3), y)


# ----------------------------------------------------------------------------------------------
# Live mode


@pytest.mark.live
@pytest.mark.skipif(
    not openai_references_available(),
    reason="live openai UNet parity needs torch 2.13.0 in this Python or in "
    "$JAXDIFF_REFERENCE_PYTHON, IMPROVED_DIFFUSION_DIR and GUIDED_DIFFUSION_DIR (see "
    "PROVENANCE.md); the committed fixture is checked by test_flax_network_matches_reference",
)
def test_reference_reproduces_openai_unet_fixture(tmp_path):
    regenerated_equals_committed("generate_openai_unet_fixtures.py", "openai_unet", tmp_path)
