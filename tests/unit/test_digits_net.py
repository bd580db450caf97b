"""The shipped digits classifier: its accuracy, its provenance, and its weight file's checks."""

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import data
from jaxdiff.models import digits_net


@pytest.fixture(scope="module")
def variables():
    return digits_net.load_digits_net_variables()


def _predict(variables, images):
    return np.asarray(digits_net.DigitsNet().apply(variables, jnp.asarray(images)).logits).argmax(
        -1
    )


def test_shipped_weights_reach_95_percent_on_the_held_out_split(variables):
    test = data.load_digits(16, split="test")
    accuracy = float(np.mean(_predict(variables, test.images) == test.labels))
    assert accuracy >= 0.95, accuracy
    # the figure stated in the provenance record is the one the weights give
    assert accuracy == pytest.approx(digits_net.digits_net_provenance()["test_accuracy"], abs=1e-9)


@pytest.mark.parametrize("size", [8, 32])
def test_other_digit_sizes_are_resized_to_the_classifier_input(variables, size):
    test = data.load_digits(size, split="test")
    assert float(np.mean(_predict(variables, test.images) == test.labels)) >= 0.9


def test_provenance_names_the_file_it_describes():
    record = digits_net.digits_net_provenance()
    digest = hashlib.sha256(digits_net.WEIGHTS_PATH.read_bytes()).hexdigest()
    assert record["sha256"] == digest
    assert record["command"].startswith("python experiments/train_digits_net.py")
    assert {"seed", "epochs", "train_accuracy", "versions"} <= set(record)


def test_features_are_full_rank_on_the_training_split(variables):
    images = data.load_digits(16, split="train").images
    feats = np.asarray(digits_net.DigitsNet().apply(variables, jnp.asarray(images)).features)
    assert feats.shape == (len(images), digits_net.FEATURE_DIM)
    assert np.linalg.matrix_rank(np.cov(feats, rowvar=False)) == digits_net.FEATURE_DIM


def test_save_and_load_round_trip(variables, tmp_path):
    digits_net.save_digits_net_npz(variables, tmp_path / "w.npz")
    again = digits_net.load_digits_net_variables(tmp_path / "w.npz")
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_wrong_or_broken_weights_file_is_refused(variables, tmp_path):
    broken = tmp_path / "broken.npz"
    broken.write_bytes(digits_net.WEIGHTS_PATH.read_bytes()[:1000])
    with pytest.raises(ValueError, match="cannot read the digits classifier weights"):
        digits_net.load_digits_net_variables(broken)
    other = tmp_path / "other.npz"
    np.savez(other, **{"params/Conv_0/kernel": np.zeros((3, 3, 1, 8), np.float32)})
    with pytest.raises(
        ValueError, match=r"not a DigitsNet weights file: missing \['params/Conv_0/bias'"
    ):
        digits_net.load_digits_net_variables(other)


def test_input_checks(variables):
    net = digits_net.DigitsNet()
    with pytest.raises(ValueError, match="takes uint8 images"):
        net.apply(variables, jnp.zeros((2, 16, 16, 1), jnp.float32))
    with pytest.raises(ValueError, match=r"grayscale images \[N, H, W, 1\]"):
        net.apply(variables, jnp.zeros((2, 16, 16, 3), jnp.uint8))
