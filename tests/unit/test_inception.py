"""FID's Inception (``jaxdiff.models.inception``): weight loading, its errors, input handling.

Agreement with torch-fidelity's outputs is in tests/parity/test_inception_parity.py; here: the
key map, exact layout changes, ``.npz`` / ``.pth`` loading, the error messages, the TF1 resize
and the pools' padding rules. Nothing here compiles the full network.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.models import inception
from jaxdiff.models.inception import (
    INCEPTION_WEIGHTS_FILE,
    INCEPTION_WEIGHTS_URL,
    InceptionE,
    InceptionV3FID,
    inception_key_map,
    inception_variables_from_state_dict,
    load_inception_state_dict,
    load_inception_variables,
    preprocess_inception,
    resize_bilinear_tf1,
    save_inception_npz,
)
from tests.parity._fixtures import load

CONV = "Mixed_6b.branch7x7_2.conv.weight"  # a 1x7 convolution: [O, I, 1, 7]


def _state_dict(seed=0):
    """Arrays of the reference's shapes; distinct values, so a wrong transpose shows."""
    rng = np.random.default_rng(seed)
    return {
        k: rng.standard_normal(e.torch_shape, dtype=np.float32)
        for k, e in inception_key_map().items()
    }


@pytest.fixture(scope="module")
def state():
    return _state_dict()


def _leaves(variables):
    return jax.tree_util.tree_leaves_with_path(variables)


def _assert_same_variables(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb, strict=True):
        assert x.dtype == y.dtype == jnp.float32, path
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


def test_key_map_matches_the_reference_layout():
    table = inception_key_map()
    _, meta = load("inception")
    layout = {k: tuple(s) for k, s in meta["__weights__"]["layout"]}
    assert {k: e.torch_shape for k, e in table.items()} == layout
    assert len(table) == 472
    assert sum(int(np.prod(s)) for s in layout.values()) == 23_885_392
    assert table["fc.weight"].torch_shape == (1008, 2048)
    assert table["Mixed_7c.branch_pool.bn.running_var"].path[0] == "batch_stats"


def test_conversion_moves_every_value_exactly(state):
    variables = inception_variables_from_state_dict(state)
    assert set(variables) == {"params", "batch_stats"}
    branch = variables["params"]["Mixed_6b"]["branch7x7_2"]
    np.testing.assert_array_equal(branch["conv"]["kernel"], state[CONV].transpose(2, 3, 1, 0))
    assert branch["conv"]["kernel"].shape == (1, 7, 128, 128)
    bn = variables["batch_stats"]["Mixed_6b"]["branch7x7_2"]["bn"]
    np.testing.assert_array_equal(bn["mean"], state["Mixed_6b.branch7x7_2.bn.running_mean"])
    np.testing.assert_array_equal(bn["var"], state["Mixed_6b.branch7x7_2.bn.running_var"])
    np.testing.assert_array_equal(branch["bn"]["scale"], state["Mixed_6b.branch7x7_2.bn.weight"])
    np.testing.assert_array_equal(variables["params"]["fc"]["kernel"], state["fc.weight"].T)
    moved = sum(int(np.prod(leaf.shape)) for _, leaf in _leaves(variables))
    assert moved == sum(v.size for v in state.values())


def test_variables_fit_the_module(state):
    """The converted tree has exactly the structure and shapes ``init`` gives."""
    variables = inception_variables_from_state_dict(state)
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.uint8)
    abstract = jax.eval_shape(InceptionV3FID().init, jax.random.key(0), x)
    shapes = jax.tree.map(lambda a: a.shape, abstract)
    assert jax.tree.map(lambda a: a.shape, variables) == shapes
    out = jax.eval_shape(InceptionV3FID().apply, variables, x)
    assert out.pool.shape == (1, 2048) and out.logits.shape == (1, 1008)
    assert out.logits_unbiased.dtype == jnp.float32


def test_num_batches_tracked_is_accepted_and_ignored(state):
    extra = dict(state, **{"Conv2d_1a_3x3.bn.num_batches_tracked": np.array(7)})
    _assert_same_variables(
        inception_variables_from_state_dict(extra), inception_variables_from_state_dict(state)
    )


@pytest.mark.parametrize(
    "change, named",
    [
        (lambda sd: sd.pop(CONV), CONV),
        (lambda sd: sd.update({"model.fc.weight": sd["fc.weight"]}), "model.fc.weight"),
        (lambda sd: sd.update({"fc.bias": np.zeros(1000, np.float32)}), "fc.bias: (1000,)"),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_wrong_state_dict_names_keys_and_the_file(state, change, named):
    wrong = dict(state)
    change(wrong)
    with pytest.raises(ValueError) as info:
        inception_variables_from_state_dict(wrong)
    message = str(info.value)
    assert named in message and INCEPTION_WEIGHTS_FILE in message
    assert INCEPTION_WEIGHTS_URL in message


def test_missing_or_unreadable_file_names_the_file_and_url(tmp_path):
    with pytest.raises(ValueError, match="not found") as info:
        load_inception_variables(tmp_path / INCEPTION_WEIGHTS_FILE)
    assert INCEPTION_WEIGHTS_URL in str(info.value)
    assert str(info.value).count("\n") <= 1
    garbage = tmp_path / "weights.npz"
    garbage.write_bytes(b"not an npz file")
    with pytest.raises(ValueError, match="cannot read") as info:
        load_inception_variables(garbage)
    assert INCEPTION_WEIGHTS_URL in str(info.value)
    other = tmp_path / "other.npz"
    np.savez(other, weight=np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="is not FID's Inception"):
        load_inception_variables(other)


def test_npz_loads_without_torch(state, tmp_path):
    path = tmp_path / "inception.npz"
    np.savez(path, **state)
    assert set(load_inception_state_dict(path)) == set(state)
    _assert_same_variables(
        load_inception_variables(path), inception_variables_from_state_dict(state)
    )


def test_pth_and_npz_give_identical_variables(state, tmp_path):
    torch = pytest.importorskip("torch", reason="reading and writing .pth files needs torch")
    pth, npz = tmp_path / INCEPTION_WEIGHTS_FILE, tmp_path / "inception.npz"
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, pth)
    assert save_inception_npz(pth, npz) == npz
    with pytest.raises(FileExistsError):
        save_inception_npz(pth, npz)
    from_pth, from_npz = load_inception_variables(pth), load_inception_variables(npz)
    _assert_same_variables(from_pth, from_npz)
    _assert_same_variables(from_pth, inception_variables_from_state_dict(state))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="cannot read"):
        load_inception_variables(garbage)


@pytest.mark.parametrize(
    "images, match",
    [
        (jnp.zeros((1, 32, 32, 3), jnp.float32), "uint8"),
        (jnp.zeros((1, 3, 32, 32), jnp.uint8), r"\[N, H, W, 3\]"),
        (jnp.zeros((32, 32, 3), jnp.uint8), r"\[N, H, W, 3\]"),
    ],
)
def test_bad_images_are_rejected(images, match):
    with pytest.raises(ValueError, match=match):
        preprocess_inception(images)


def test_preprocess_scales_and_keeps_299_unchanged():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (1, 299, 299, 3), dtype=np.uint8)
    images[0, 0, 0] = (0, 128, 255)
    x = np.asarray(preprocess_inception(jnp.asarray(images)))
    assert x.shape == (1, 299, 299, 3) and x.dtype == np.float32
    np.testing.assert_array_equal(x, (images.astype(np.float32) - 128) / 128)
    np.testing.assert_array_equal(x[0, 0, 0], [-1.0, 0.0, 127 / 128])


@pytest.mark.parametrize("in_size, out_size", [(5, 13), (13, 5), (32, 299), (7, 7)])
def test_resize_is_tf1_bilinear_on_a_ramp(in_size, out_size):
    """A ramp f(i) = i maps to its value at i * in / out, clamped at the last pixel (TF1,
    align_corners=False: no half-pixel offset); a constant image stays constant."""
    resize = jax.jit(resize_bilinear_tf1, static_argnums=1)
    ramp = np.broadcast_to(np.arange(in_size, dtype=np.float32), (1, 4, in_size))[..., None]
    out = np.asarray(resize(jnp.asarray(ramp), (4, out_size)))[0, 0, :, 0]
    coord = np.arange(out_size) * in_size / out_size
    np.testing.assert_allclose(out, np.minimum(coord, in_size - 1), rtol=1e-6, atol=1e-5)
    flat = resize(jnp.full((1, in_size, 3, 2), 42.0), (out_size, 5))
    np.testing.assert_array_equal(flat, 42.0)


def test_avg_pool_ignores_padding_and_max_pool_pads_with_minus_inf():
    ones = jnp.ones((1, 5, 6, 2))
    np.testing.assert_array_equal(inception._avg_pool_3x3_valid_count(ones), ones)
    ramp = jnp.arange(30.0).reshape(1, 5, 6, 1)
    corner = float(inception._avg_pool_3x3_valid_count(ramp)[0, 0, 0, 0])
    assert corner == pytest.approx((0 + 1 + 6 + 7) / 4)
    negative = -jnp.ones((1, 4, 4, 1))
    np.testing.assert_array_equal(inception._max_pool_3x3_same(negative), negative)
    with pytest.raises(ValueError, match="pool must be"):
        InceptionE(pool="mean").init(jax.random.key(0), jnp.zeros((1, 3, 3, 4)))
