"""The Flax Unet, the PyTorch weight conversion and ``jaxdiff convert``: properties and errors.

Agreement with the reference's outputs is in tests/parity/test_unet_parity.py; here: exact
round trips, dropout, gradients, input and configuration errors, checkpoint unwrapping, the CLI.
"""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import cli, gaussian, losses, schedules
from jaxdiff.convert import (
    extract_unet_state_dict,
    flax_to_torch_state_dict,
    load_flax_params,
    save_flax_params,
    torch_key_map,
    torch_state_dict_to_flax,
)
from jaxdiff.models import Unet, unet_from_config
from jaxdiff.models.unet import Attention, LinearAttention
from tests.parity._fixtures import load

TINY = {"dim": 8, "dim_mults": (1, 2), "attn_heads": 2, "attn_dim_head": 4}


def _fixture_cases():
    return sorted(load("unet")[1])


def _fixture_state_dict(case):
    arrays, meta = load("unet")
    prefix = f"{case}/state_dict/"
    state = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
    return state, meta[case]["config"]


def _random_state_dict(config, seed=0):
    """A reference-layout state_dict drawn with numpy: kernels ~ N(0, 1/fan_in), the rest
    ~ N(0, 1) (norm gains 1 + N(0, 0.1^2)). Cheaper than ``Unet.init``, whose many small random
    programs take seconds to compile."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, entry in torch_key_map(config).items():
        value = rng.standard_normal(entry.torch_shape)
        if key.endswith(".weight") and len(entry.torch_shape) > 1:
            value /= np.sqrt(np.prod(entry.torch_shape[1:]))
        elif key.endswith(".g"):
            value = 1 + 0.1 * value
        out[key] = value.astype(np.float32)
    return out


def _random_variables(config, seed=0):
    return torch_state_dict_to_flax(_random_state_dict(config, seed), config)


def _assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def _inputs(unet, hw=(8, 8), batch=2, seed=0):
    x = np.random.default_rng(seed).standard_normal((batch, *hw, unet.channels))
    return jnp.asarray(x, jnp.float32), jnp.arange(batch, dtype=jnp.int32) * 7


# ----------------------------------------------------------------------------------------------
# Conversion round trips


@pytest.mark.parametrize("case", _fixture_cases())
def test_reference_state_dict_round_trip_is_exact(case):
    state, config = _fixture_state_dict(case)
    back = flax_to_torch_state_dict(torch_state_dict_to_flax(state, config), config)
    assert sorted(back) == sorted(state)
    for key, value in state.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        np.testing.assert_array_equal(back[key], value, err_msg=key)


# The smallest network: Unet.init compiles one random program per parameter shape (seconds).
SMALLEST = {"dim": 4, "dim_mults": (1,), "attn_heads": 1, "attn_dim_head": 2}


@pytest.fixture(scope="module")
def initialised():
    unet = Unet(**SMALLEST, random_fourier_features=True)
    x, t = _inputs(unet, hw=(2, 2), batch=1)
    return unet, unet.init(jax.random.key(1), x, t)


def test_init_params_round_trip_exactly(initialised):
    unet, variables = initialised
    state = flax_to_torch_state_dict(variables, unet)
    assert sorted(state) == sorted(torch_key_map(unet))
    again = torch_state_dict_to_flax(state, unet)
    _assert_trees_equal(again, variables)
    # the bare params tree is accepted too
    bare = flax_to_torch_state_dict(variables["params"], unet)
    assert all(np.array_equal(bare[k], state[k]) for k in state)


def test_init_uses_pytorch_default_ranges(initialised):
    params = initialised[1]["params"]
    bound = 1 / np.sqrt(7 * 7 * 3)  # init_conv fan_in
    kernel = np.abs(np.asarray(params["init_conv"]["kernel"]))  # 588 draws
    assert 0.9 * bound < kernel.max() <= bound
    assert np.abs(np.asarray(params["init_conv"]["bias"])).max() <= bound
    np.testing.assert_array_equal(np.asarray(params["downs_0"]["attn"]["norm"]["scale"]), 1.0)


# ----------------------------------------------------------------------------------------------
# Dropout, gradients, model_fn


@pytest.fixture(scope="module")
def dropout_net():
    unet = Unet(**TINY, dropout=0.4)
    x, t = _inputs(unet)
    return unet, _random_variables(TINY), x, t, jax.jit(unet.apply, static_argnames="train")


def test_eval_mode_is_deterministic_and_ignores_dropout(dropout_net):
    unet, variables, x, t, apply = dropout_net
    no_dropout = Unet(**TINY)
    a = apply(variables, x, t)
    np.testing.assert_array_equal(a, apply(variables, x, t))
    np.testing.assert_array_equal(a, jax.jit(no_dropout.apply)(variables, x, t))


def test_train_mode_dropout_depends_only_on_the_key(dropout_net):
    unet, variables, x, t, apply = dropout_net
    k1, k2 = jax.random.key(5), jax.random.key(6)
    a = apply(variables, x, t, train=True, rngs={"dropout": k1})
    np.testing.assert_array_equal(a, apply(variables, x, t, train=True, rngs={"dropout": k1}))
    assert not np.allclose(a, apply(variables, x, t, train=True, rngs={"dropout": k2}))
    assert not np.allclose(a, apply(variables, x, t))


def test_unet_is_a_model_fn_with_finite_gradients():
    unet = Unet(**SMALLEST, random_fourier_features=True)
    variables = _random_variables(unet)
    x, _ = _inputs(unet, hw=(4, 4))
    c = gaussian.make_coeffs(schedules.linear_beta_schedule(50))
    t = jnp.array([0, 49], jnp.int32)

    def loss(params):
        model_fn = lambda x_t, time: unet.apply(params, x_t, time)  # noqa: E731
        return losses.simple_loss(model_fn, c, x, t, jnp.ones_like(x)).mean()

    grads = jax.jit(jax.grad(loss))(variables)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree_util.tree_leaves(grads))
    # random Fourier features are fixed (requires_grad=False in the reference)
    np.testing.assert_array_equal(grads["params"]["time_fourier"]["weights"], 0.0)
    assert float(jnp.abs(grads["params"]["time_mlp_in"]["kernel"]).max()) > 0


# ----------------------------------------------------------------------------------------------
# No memory key/value slots (num_mem_kv=0)


def test_no_memory_slots_init_apply_gradients_and_conversion():
    # linear attention in the outer stage, full attention in the inner one and the middle
    config = {**SMALLEST, "dim_mults": (1, 2), "num_mem_kv": 0}
    unet = unet_from_config(config)
    x, t = _inputs(unet, hw=(4, 4))
    # init traced in full (compiling it takes minutes on a busy CPU); values from numpy
    shapes = jax.eval_shape(unet.init, jax.random.key(0), x, t)
    mems = {
        jax.tree_util.keystr(path): leaf.shape
        for path, leaf in jax.tree_util.tree_leaves_with_path(shapes)
        if path[-1].key == "mem_kv"
    }
    assert len(mems) == 5 and all(shape[2] == 0 for shape in mems.values()), mems
    variables = _random_variables(config)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), variables) == jax.tree.map(
        lambda a: (a.shape, a.dtype), shapes
    )
    loss = lambda v: jnp.mean(jnp.square(unet.apply(v, x, t)))  # noqa: E731
    out, grads = jax.jit(jax.value_and_grad(loss))(variables)
    assert np.isfinite(float(out)) and float(out) > 0
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree_util.tree_leaves(grads))
    # the reference's layout: linear attention [2, heads, d, 0], full attention [2, heads, 0, d]
    state = flax_to_torch_state_dict(variables, unet)
    assert state["downs.0.2.mem_kv"].shape == (2, 1, 2, 0)
    assert state["mid_attn.mem_kv"].shape == (2, 1, 0, 2)
    _assert_trees_equal(torch_state_dict_to_flax(state, unet), variables)


def _attention_input(channels=8, seed=0):
    x = np.random.default_rng(seed).standard_normal((2, 4, 4, channels))
    return jnp.asarray(x, jnp.float32)


def _layer_variables(layer, x, seed=1):
    """The layer's variables (init traced, not compiled), drawn N(0, 0.5^2) with numpy."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(layer.init, jax.random.key(0), x)
    return jax.tree.map(lambda a: jnp.asarray(0.5 * rng.standard_normal(a.shape), a.dtype), shapes)


def test_linear_attention_without_memory_is_the_softmax_over_pixels_alone():
    # one memory slot whose keys are -1e4 gets softmax weight exp(-1e4 - max) = 0 exactly:
    # the layer must equal the one without memory (float32 round-off at most; measured 0)
    x = _attention_input()
    empty = LinearAttention(heads=2, dim_head=4, num_mem_kv=0)
    one = LinearAttention(heads=2, dim_head=4, num_mem_kv=1)
    params = dict(_layer_variables(one, x)["params"])
    params["mem_kv"] = params["mem_kv"].at[0].set(-1e4)
    want = one.apply({"params": params}, x)
    params["mem_kv"] = params["mem_kv"][:, :, :0]
    got = empty.apply({"params": params}, x)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_full_attention_without_memory_is_softmax_attention_over_pixels():
    x = _attention_input()
    layer = Attention(heads=2, dim_head=4, num_mem_kv=0)
    variables = _layer_variables(layer, x)
    p = variables["params"]
    assert p["mem_kv"].shape == (2, 2, 0, 4)
    # the reference's math written out: RMSNorm, q k^T / sqrt(d) softmax over the pixels
    xs = x.reshape(2, 16, 8)
    norm = jnp.sqrt(jnp.sum(jnp.square(xs), axis=-1, keepdims=True))
    xn = xs / norm * p["norm"]["scale"][None, None] * np.sqrt(8.0)
    q, k, v = jnp.split((xn @ p["to_qkv"]["kernel"]).reshape(2, 16, 3, 2, 4), 3, axis=2)
    q, k, v = (a[:, :, 0] for a in (q, k, v))  # [B, N, heads, d]
    weights = jax.nn.softmax(jnp.einsum("bnhd,bmhd->bhnm", q, k) / 2.0, axis=-1)
    heads = jnp.einsum("bhnm,bmhd->bnhd", weights, v).reshape(2, 16, 8)
    want = (heads @ p["to_out"]["kernel"] + p["to_out"]["bias"][None, None]).reshape(x.shape)
    np.testing.assert_allclose(layer.apply(variables, x), want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Input and configuration errors


@pytest.fixture(scope="module")
def tiny():
    return Unet(**TINY), _random_variables(TINY)


def test_image_size_must_be_divisible(tiny):
    unet, variables = tiny
    with pytest.raises(ValueError, match=r"8x6 must be divisible by 4"):
        Unet(**{**TINY, "dim_mults": (1, 1, 2)}).apply({}, jnp.zeros((1, 8, 6, 3)), jnp.zeros((1,)))
    with pytest.raises(ValueError, match=r"8x9 must be divisible by 2"):
        unet.apply(variables, jnp.zeros((1, 8, 9, 3)), jnp.zeros((1,)))


def test_wrong_channel_count_and_nchw_are_rejected(tiny):
    unet, variables = tiny
    with pytest.raises(ValueError, match=r"4 channels .* channels=3"):
        unet.apply(variables, jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)))
    with pytest.raises(ValueError, match="NHWC"):
        unet.apply(variables, jnp.zeros((1, 3, 8, 8)), jnp.zeros((1,)))


def test_bad_time_and_self_condition_inputs(tiny):
    unet, variables = tiny
    x = jnp.zeros((2, 8, 8, 3))
    with pytest.raises(ValueError, match="time must be"):
        unet.apply(variables, x, jnp.zeros((3,)))
    with pytest.raises(ValueError, match="self_condition=False"):
        unet.apply(variables, x, jnp.zeros((2,)), x)
    self_cond = Unet(**TINY, self_condition=True)
    with pytest.raises(ValueError, match="x_self_cond must have the shape"):
        self_cond.apply({}, x, jnp.zeros((2,)), x[:1])


@pytest.mark.parametrize(
    "options, match",
    [
        ({"dim": 7}, "even dim >= 4"),
        ({"dim": 2}, "even dim >= 4"),
        ({"dim": 8, "dim_mults": ()}, "dim_mults"),
        ({"dim": 8, "dim_mults": (1, 0)}, "dim_mults"),
        ({"dim": 8, "attn_heads": (2, 2, 2)}, "attn_heads has 3 entries"),
        ({"dim": 8, "dim_mults": (1, 2), "attn_dim_head": (4,)}, "attn_dim_head has 1"),
        ({"dim": 8, "dim_mults": (1, 2), "full_attn": (True,)}, "full_attn has 1"),
        ({"dim": 8, "full_attn": "yes"}, "full_attn must be"),
        ({"dim": 8, "dropout": 1.0}, "dropout"),
        ({"dim": 8, "learned_sinusoidal_cond": True, "learned_sinusoidal_dim": 5}, "even"),
        ({"dim": 8, "channels": 0}, "channels"),
        ({"dim": 8, "init_dim": 0}, "init_dim"),
        ({"dim": 8, "num_mem_kv": -1}, "num_mem_kv"),
        ({"dim": 8, "dtype": "int8"}, "floating dtype"),
        ({"dim": 8, "dtype": "fp8-ish"}, "floating dtype"),
        ({"dim": 8, "remat": "yes"}, "remat must be a bool"),
    ],
)
def test_bad_options_are_rejected_at_construction(options, match):
    with pytest.raises(ValueError, match=match):
        Unet(**options)


def _with_dropout_key(unet, variables, x, t):
    return unet.apply(variables, x, t, train=True, rngs={"dropout": jax.random.PRNGKey(3)})


@pytest.mark.slow  # about 2 minutes on the 2-core test machine: two U-Net gradient compiles
def test_remat_changes_neither_parameters_nor_values_nor_gradients():
    config = {**TINY, "dropout": 0.1, "full_attn": (False, True)}
    plain = unet_from_config(config)
    remat = unet_from_config(config, remat=True)
    x, t = _inputs(plain)
    variables = plain.init(jax.random.PRNGKey(0), x, t)
    _assert_trees_equal(variables, remat.init(jax.random.PRNGKey(0), x, t))

    def loss(unet):
        return lambda v: jnp.sum(jnp.square(_with_dropout_key(unet, v, x, t)))

    value, grads = jax.jit(jax.value_and_grad(loss(plain)))(variables)
    value_r, grads_r = jax.jit(jax.value_and_grad(loss(remat)))(variables)
    np.testing.assert_allclose(value_r, value, rtol=1e-6)
    # the recomputed forward is the same program, fused differently: float32 round-off
    # relative to each gradient's scale
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.max(np.abs(b))),
        grads_r,
        grads,
    )


def test_unknown_execution_option_is_named():
    with pytest.raises(ValueError, match="unknown Unet execution option"):
        unet_from_config(TINY, precision="high")


def test_configs_from_json_and_presets():
    unet = unet_from_config(json.dumps({**TINY, "full_attn": [True, False]}))
    assert unet.dim_mults == (1, 2) and unet.full_attn == (True, False)
    assert unet_from_config(unet.config()) == unet
    assert unet_from_config("tiny").dim == 8
    with pytest.raises(ValueError, match=r"unknown Unet option\(s\) \['heads'\]"):
        unet_from_config({"dim": 8, "heads": 2})
    with pytest.raises(ValueError, match="neither a preset"):
        unet_from_config("no-such-preset")


def test_reference_full_attn_truthiness():
    # None, False and () mean "innermost stage only"; True means every stage.
    for value in (None, False, ()):
        assert [s.full_attn for s in Unet(dim=8, full_attn=value).stages()] == [0, 0, 0, 1]
    assert all(s.full_attn for s in Unet(dim=8, full_attn=True).stages())


# ----------------------------------------------------------------------------------------------
# State dicts from another configuration


def test_missing_and_unexpected_keys_are_named():
    state = _random_state_dict(TINY)
    del state["downs.0.2.mem_kv"]
    state["downs.0.2.extra"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError) as info:
        torch_state_dict_to_flax(state, TINY)
    message = str(info.value)
    assert "Missing 1 key(s): downs.0.2.mem_kv" in message
    assert "Unexpected 1 key(s): downs.0.2.extra" in message
    assert "another configuration" in message


def test_mis_shaped_keys_are_named():
    state = _random_state_dict(TINY)
    state["final_conv.weight"] = np.zeros((6, 8, 1, 1), np.float32)
    with pytest.raises(ValueError, match=r"final_conv\.weight: got \(6, 8, 1, 1\), expected"):
        torch_state_dict_to_flax(state, TINY)


def test_state_dict_of_another_configuration_is_rejected():
    other = _random_state_dict({**TINY, "learned_variance": True, "full_attn": True})
    with pytest.raises(ValueError) as info:
        torch_state_dict_to_flax(other, TINY)
    assert "to_out.1.g" in str(info.value)  # linear-attention keys the other net lacks
    wrapped = {f"model.{k}": v for k, v in _random_state_dict(TINY).items()}
    with pytest.raises(ValueError, match="wrapper prefix"):
        torch_state_dict_to_flax(wrapped, TINY)


def test_flax_tree_errors_name_the_parameter(tiny):
    unet, variables = tiny
    params = jax.tree_util.tree_map(lambda a: a, variables["params"])
    del params["mid_attn"]["mem_kv"]
    with pytest.raises(ValueError, match="Missing 1 key.*mid_attn/mem_kv"):
        flax_to_torch_state_dict(params, unet)
    with pytest.raises(ValueError, match=r"final_conv/kernel \(PyTorch final_conv\.weight\)"):
        flax_to_torch_state_dict(variables, {**TINY, "out_dim": 4})


# ----------------------------------------------------------------------------------------------
# Checkpoint unwrapping (torch-free: the structures torch.load returns, with numpy values)


def test_extract_from_trainer_ema_and_diffusion_state_dicts():
    unet_sd = _random_state_dict(TINY, seed=1)
    ema_sd = _random_state_dict(TINY, seed=2)
    buffers = {"betas": np.ones(10), "loss_weight": np.ones(10)}
    diffusion = {**{f"model.{k}": v for k, v in unet_sd.items()}, **buffers}
    ema = {
        "initted": np.array(True),
        "step": np.array(3),
        **{f"ema_model.model.{k}": v for k, v in ema_sd.items()},
        **{f"online_model.model.{k}": v for k, v in unet_sd.items()},
        **{f"ema_model.{k}": v for k, v in buffers.items()},
    }
    trainer = {"step": 3, "model": diffusion, "ema": ema, "opt": {}, "version": "2.3.4"}

    def same(a, b):
        return sorted(a) == sorted(b) and all(a[k] is b[k] for k in b)

    assert same(extract_unet_state_dict(unet_sd), unet_sd)
    assert same(extract_unet_state_dict(diffusion), unet_sd)
    assert same(extract_unet_state_dict(trainer), ema_sd)
    assert same(extract_unet_state_dict(trainer, which="model"), unet_sd)
    assert same(extract_unet_state_dict(ema), ema_sd)
    assert same(extract_unet_state_dict(ema, which="model"), unet_sd)
    assert same(extract_unet_state_dict(ema, prefix="online_model.model."), unet_sd)
    with pytest.raises(ValueError, match="no 'ema' entry"):
        extract_unet_state_dict({"model": diffusion})
    with pytest.raises(ValueError, match="no Unet weights found"):
        extract_unet_state_dict(buffers)


# ----------------------------------------------------------------------------------------------
# msgpack files and the CLI


def test_msgpack_params_round_trip_and_check(tmp_path, tiny):
    unet, variables = tiny
    path = save_flax_params(variables, tmp_path / "p.msgpack")
    loaded = load_flax_params(path, unet)
    _assert_trees_equal(loaded, variables)
    with pytest.raises(FileExistsError):
        save_flax_params(variables, path)
    with pytest.raises(ValueError, match="does not match"):
        load_flax_params(path, {**TINY, "learned_sinusoidal_cond": True})


def test_cli_convert_round_trip_and_no_overwrite(tmp_path, capsys):
    state = _random_state_dict(TINY, seed=3)
    np.savez(tmp_path / "in.npz", **state)
    config = tmp_path / "unet.json"
    config.write_text(json.dumps(TINY))
    forward = ["convert", "--config", str(config), "--in", str(tmp_path / "in.npz")]
    forward += ["--out", str(tmp_path / "p.msgpack")]
    assert cli.main(forward) == 0
    back = ["convert", "--to-torch", "--config", json.dumps(TINY)]
    back += ["--in", str(tmp_path / "p.msgpack"), "--out", str(tmp_path / "out.npz")]
    assert cli.main(back) == 0
    with np.load(tmp_path / "out.npz") as out:
        assert sorted(out.files) == sorted(state)
        for key, value in state.items():
            np.testing.assert_array_equal(out[key], value, err_msg=key)

    before = (tmp_path / "p.msgpack").read_bytes()
    capsys.readouterr()
    assert cli.main(forward) == 1
    assert "exists; pass --force" in capsys.readouterr().err
    assert (tmp_path / "p.msgpack").read_bytes() == before
    assert cli.main([*forward, "--force"]) == 0

    assert cli.main([*back[:3], "cifar-small", *back[4:], "--force"]) == 1  # other config
    assert "does not match the Unet configuration" in capsys.readouterr().err


def test_cli_pt_files_with_torch(tmp_path):
    torch = pytest.importorskip("torch", reason="reading and writing .pt files needs torch")
    state = _random_state_dict(TINY, seed=4)
    torch.save(
        {"model": {f"model.{k}": torch.from_numpy(v) for k, v in state.items()}}, tmp_path / "t.pt"
    )
    args = ["convert", "--config", json.dumps(TINY), "--which", "model"]
    assert (
        cli.main([*args, "--in", str(tmp_path / "t.pt"), "--out", str(tmp_path / "p.msgpack")]) == 0
    )
    back = [
        "convert",
        "--to-torch",
        "--config",
        json.dumps(TINY),
        "--in",
        str(tmp_path / "p.msgpack"),
    ]
    assert cli.main([*back, "--out", str(tmp_path / "u.pt")]) == 0
    loaded = torch.load(tmp_path / "u.pt", weights_only=True)
    for key, value in state.items():
        np.testing.assert_array_equal(loaded[key].numpy(), value, err_msg=key)


def test_models_convert_and_cli_import_no_torch():
    code = (
        "import sys, jaxdiff.models, jaxdiff.convert, jaxdiff.cli\n"
        "print(','.join(m for m in sys.modules if m.split('.')[0] == 'torch'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
