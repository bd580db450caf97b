"""jaxdiff.metrics: streamed statistics, Fréchet distance, Inception Score, precision/recall.

Reference values are direct NumPy evaluations of the defining equations or closed forms;
pytorch-fid parity is in tests/parity/test_metrics_parity.py.
"""

import math
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import metrics

# float64 round-off of a covariance summed in another order, relative to max |sigma|.
F64_STATS_RTOL = 1e-12


def features(seed: int, n: int, dim: int, offset: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, dim)) @ rng.standard_normal((dim, dim)) + offset


def streamed(x: np.ndarray, sizes) -> tuple[np.ndarray, np.ndarray]:
    stats = metrics.init_feature_stats(x.shape[1])
    start = 0
    for size in sizes:
        stats = metrics.update_feature_stats(stats, x[start : start + size])
        start += size
    assert start == x.shape[0]
    return metrics.finalize_feature_stats(stats)


# ----------------------------------------------------------------------------------------------
# Streamed statistics


@pytest.mark.parametrize(
    "sizes",
    [[97], [1] * 97, [2, 0, 95], [50, 47], [13, 1, 30, 1, 52], [96, 1]],
    ids=["one", "ones", "empty_batch", "halves", "mixed", "last_one"],
)
@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_streamed_statistics_equal_one_shot(sizes, offset):
    x = features(0, 97, 12, offset)
    mu, sigma = streamed(x, sizes)
    ref_sigma = np.cov(x, rowvar=False)
    scale = np.max(np.abs(ref_sigma))
    np.testing.assert_allclose(mu, x.mean(axis=0), rtol=1e-14, atol=1e-14 * (1 + offset))
    np.testing.assert_allclose(sigma, ref_sigma, rtol=0, atol=F64_STATS_RTOL * scale)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    np.testing.assert_array_equal(sigma, sigma.T)


def test_streamed_statistics_stay_accurate_with_a_large_mean():
    # Raw sums of x x^T would lose ~16 digits at this offset; the centred merge loses none.
    x = features(1, 64, 4)
    mu, sigma = streamed(x + 1e8, [1] * 64)
    ref = np.cov(x, rowvar=False)
    np.testing.assert_allclose(sigma, ref, rtol=0, atol=1e-6 * np.max(np.abs(ref)))


def test_streamed_statistics_accept_jax_arrays_and_keep_constant_size():
    x = features(2, 40, 5).astype(np.float32)
    stats = metrics.init_feature_stats(5)
    for lo in range(0, 40, 8):
        stats = metrics.update_feature_stats(stats, jnp.asarray(x[lo : lo + 8]))
        assert stats.mean.shape == (5,) and stats.m2.shape == (5, 5)
        assert stats.m2.dtype == np.float64
    assert stats.count == 40
    mu, sigma = metrics.finalize_feature_stats(stats)
    ref = np.cov(x.astype(np.float64), rowvar=False)
    np.testing.assert_allclose(sigma, ref, rtol=0, atol=F64_STATS_RTOL * np.max(np.abs(ref)))


def test_too_few_samples_say_what_n_is_needed():
    stats = metrics.init_feature_stats(8)
    with pytest.raises(ValueError, match=r"at least N = 2 .* got N = 0.*N >= 9"):
        metrics.finalize_feature_stats(stats)
    stats = metrics.update_feature_stats(stats, np.ones((1, 8)))
    with pytest.raises(ValueError, match=r"got N = 1"):
        metrics.finalize_feature_stats(stats)
    stats = metrics.update_feature_stats(stats, features(3, 4, 8))
    with pytest.warns(RuntimeWarning, match=r"rank-deficient.*N >= 9"):
        metrics.finalize_feature_stats(stats)
    stats = metrics.update_feature_stats(stats, features(4, 4, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics.finalize_feature_stats(stats)  # N = 9 > D: full rank, no warning


def test_bad_feature_batches_are_rejected():
    stats = metrics.init_feature_stats(3)
    with pytest.raises(ValueError, match=r"shape \[N, 3\].*\(4, 2\)"):
        metrics.update_feature_stats(stats, np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"shape \[N, 3\]"):
        metrics.update_feature_stats(stats, np.zeros(3))
    with pytest.raises(ValueError, match="non-finite"):
        metrics.update_feature_stats(stats, np.array([[0.0, np.nan, 1.0]]))
    for dim in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="dim must be a positive integer"):
            metrics.init_feature_stats(dim)


# ----------------------------------------------------------------------------------------------
# Fréchet distance


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    rng = np.random.default_rng(5)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    a, b = rng.random(16) + 0.1, rng.random(16) + 0.1
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert isinstance(got, float)
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_frechet_distance_is_symmetric_and_zero_on_itself():
    x, y = features(6, 200, 10), features(7, 150, 10, 0.5)
    mu1, s1 = x.mean(0), np.cov(x, rowvar=False)
    mu2, s2 = y.mean(0), np.cov(y, rowvar=False)
    d12 = metrics.frechet_distance(mu1, s1, mu2, s2)
    np.testing.assert_allclose(metrics.frechet_distance(mu2, s2, mu1, s1), d12, rtol=1e-10)
    assert d12 > 0
    assert abs(metrics.frechet_distance(mu1, s1, mu1, s1)) < 1e-10 * np.trace(s1)


def test_frechet_distance_rejects_bad_inputs():
    mu, s = np.zeros(3), np.eye(3)
    with pytest.raises(ValueError, match="one length"):
        metrics.frechet_distance(mu, s, np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match=r"sigma2 must have shape \(3, 3\)"):
        metrics.frechet_distance(mu, s, mu, np.eye(2))
    with pytest.raises(ValueError, match="sigma1 has 1 non-finite"):
        metrics.frechet_distance(mu, np.diag([1.0, np.inf, 1.0]), mu, s)
    with pytest.raises(ValueError, match="eps must be"):
        metrics.frechet_distance(mu, s, mu, s, eps=-1.0)
    with pytest.raises(ValueError, match="imaginary diagonal component"):
        metrics.frechet_distance(mu, s, mu, -s)


# ----------------------------------------------------------------------------------------------
# Inception Score


def direct_inception_score(p: np.ndarray, splits: int) -> tuple[float, float]:
    n, scores = p.shape[0], []
    for i in range(splits):
        part = p[i * n // splits : (i + 1) * n // splits]
        marginal = part.mean(axis=0)
        kl = [
            sum(pi * math.log(pi / qi) for pi, qi in zip(row, marginal, strict=True) if pi > 0)
            for row in part
        ]
        scores.append(math.exp(sum(kl) / len(kl)))
    return float(np.mean(scores)), float(np.std(scores))


def test_uniform_predictions_score_one():
    mean, std = metrics.inception_score(np.zeros((50, 7)), splits=5)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("k", [2, 5, 10])
def test_confident_even_predictions_score_k(k):
    probs = np.tile(np.eye(k), (6, 1))  # every split of k rows holds each class once
    mean, std = metrics.inception_score(probs=probs, splits=6)
    assert mean == pytest.approx(k, rel=1e-12) and std == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("n, splits", [(103, 10), (40, 1), (33, 33)])
def test_inception_score_equals_direct_evaluation(n, splits):
    logits = np.random.default_rng(n).standard_normal((n, 9)) * 3.0
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    expected = direct_inception_score(p, splits)
    got = metrics.inception_score(logits, splits=splits)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    got = metrics.inception_score(probs=p, splits=splits)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    # softmax is shift-invariant; float32 device logits lose only float32 precision
    got = metrics.inception_score(logits + 100.0, splits=splits)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
    single = metrics.inception_score(jnp.asarray(logits, jnp.float32), splits=splits)
    np.testing.assert_allclose(single, expected, rtol=1e-5, atol=1e-6)


def test_inception_score_rejects_bad_inputs():
    with pytest.raises(ValueError, match="exactly one"):
        metrics.inception_score()
    with pytest.raises(ValueError, match="exactly one"):
        metrics.inception_score(np.zeros((4, 2)), probs=np.ones((4, 2)) / 2)
    with pytest.raises(ValueError, match=r"splits must be an integer in \[1, N = 4\]"):
        metrics.inception_score(np.zeros((4, 2)), splits=5)
    with pytest.raises(ValueError, match="rows summing to 1"):
        metrics.inception_score(probs=np.ones((4, 2)), splits=2)
    with pytest.raises(ValueError, match=r"shape \[N, K\]"):
        metrics.inception_score(np.zeros(4), splits=1)


# ----------------------------------------------------------------------------------------------
# Precision and recall


def brute_force_precision_recall(real, fake, k):
    def radii(x):
        d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    def coverage(q, s, r):
        d = np.sqrt(((q[:, None, :] - s[None, :, :]) ** 2).sum(-1))
        return float(np.mean((d <= r[None, :]).any(axis=1)))

    return coverage(fake, real, radii(real)), coverage(real, fake, radii(fake))


@pytest.mark.parametrize("k, block_size", [(3, 1024), (3, 7), (1, 1), (5, 16)])
def test_precision_recall_equals_brute_force(k, block_size):
    rng = np.random.default_rng(10 + k)
    real = rng.standard_normal((60, 6))
    fake = rng.standard_normal((45, 6)) * 1.3 + 0.4
    expected = brute_force_precision_recall(real, fake, k)
    assert 0.0 < expected[0] < 1.0 and 0.0 < expected[1] < 1.0
    got = metrics.precision_recall(real, fake, k=k, block_size=block_size)
    assert got == expected
    radii = metrics.manifold_radii(real, k=k, block_size=block_size)
    d = np.sqrt(((real[:, None] - real[None]) ** 2).sum(-1))
    np.testing.assert_allclose(radii, np.sort(d, axis=1)[:, k], rtol=1e-9)


def test_identical_sets_have_full_precision_and_recall():
    x = features(11, 50, 8)
    assert metrics.precision_recall(x, x) == (1.0, 1.0)
    assert metrics.precision_recall(x, x.copy(), block_size=9) == (1.0, 1.0)


def test_far_apart_clusters_have_zero_precision_and_recall():
    rng = np.random.default_rng(12)
    real = rng.standard_normal((40, 4))
    fake = rng.standard_normal((30, 4)) + 100.0
    assert metrics.precision_recall(real, fake) == (0.0, 0.0)


def test_a_subset_has_full_precision_and_partial_recall():
    rng = np.random.default_rng(13)
    cluster_a = rng.standard_normal((30, 4))
    cluster_b = rng.standard_normal((30, 4)) + 50.0
    real = np.concatenate([cluster_a, cluster_b])
    # fakes are the reals of cluster A: all inside the real manifold; they cover exactly the 30
    # reals of A (distance 0) and none of B.
    precision, recall = metrics.precision_recall(real, cluster_a.copy(), block_size=8)
    assert precision == 1.0
    assert recall == 0.5


def test_precision_recall_rejects_bad_inputs():
    x = np.zeros((10, 3))
    with pytest.raises(ValueError, match="one D"):
        metrics.precision_recall(x, np.zeros((10, 4)))
    with pytest.raises(ValueError, match=r"need at least N = 4 rows, got N = 3"):
        metrics.precision_recall(x, np.zeros((3, 3)))
    with pytest.raises(ValueError, match="k must be a positive integer"):
        metrics.precision_recall(x, x, k=0)
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        metrics.precision_recall(x, x, block_size=0)
    with pytest.raises(ValueError, match="fake has 1 non-finite"):
        metrics.precision_recall(x, np.where(np.arange(30).reshape(10, 3) == 4, np.nan, 0.0))
