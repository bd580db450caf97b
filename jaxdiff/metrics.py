"""Sample-quality metrics: statistics in, numbers out.

Every function here runs on the host in float64 NumPy/SciPy. Features may arrive as device
(JAX) arrays or NumPy arrays; they are copied to host float64 once, so the metrics do not depend
on the compute dtype of the network that produced them.

* Streamed feature statistics (``init_feature_stats`` / ``update_feature_stats`` /
  ``finalize_feature_stats``): the mean and unbiased covariance of any number of feature rows in
  O(D^2) memory.
* ``frechet_distance``: the Fréchet distance between two Gaussians, the number FID reports, with
  pytorch-fid 0.3.0's handling of near-singular covariance products.
* ``inception_score``: exp E_x KL(p(y|x) || p(y)) over splits.
* ``precision_recall``: improved precision and recall from k-NN manifolds.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np
import scipy.linalg

# pytorch-fid's tolerance on the imaginary part of the diagonal of sqrtm(sigma1 sigma2), above
# which the covariances are not both positive semi-definite and the distance is undefined.
IMAGINARY_ATOL = 1e-3


class FeatureStats(NamedTuple):
    """Running statistics of feature rows (Chan, Golub & LeVeque 1979 pairwise form).

    ``m2`` is the sum of centred outer products, sum_i (x_i - mean)(x_i - mean)^T, not raw
    second moments, so merging a batch never subtracts two large nearly equal numbers.
    """

    count: int  # rows seen so far
    mean: np.ndarray  # shape=[D], float64
    m2: np.ndarray  # shape=[D, D], float64


def _host_float64(x, name: str) -> np.ndarray:
    array = np.asarray(x, dtype=np.float64)
    if not np.isfinite(array).all():
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise ValueError(
            f"{name} has {bad} non-finite values (NaN or inf); metrics need finite features"
        )
    return array


def init_feature_stats(dim: int) -> FeatureStats:
    """Empty statistics for features of dimension ``dim`` (count 0, zero mean and M2).

    Args:
      dim: the feature dimension D (2048 for FID's Inception pool features).

    Returns:
      ``FeatureStats(count=0, mean=zeros[D], m2=zeros[D, D])`` in float64.
    """
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    dim = int(dim)
    return FeatureStats(0, np.zeros(dim, np.float64), np.zeros((dim, dim), np.float64))


def update_feature_stats(stats: FeatureStats, features) -> FeatureStats:
    """Merge a batch of feature rows into ``stats`` (Chan et al. pairwise update).

    With the running (n_a, mean_a, M2_a) and the batch's own (n_b, mean_b, M2_b),
    delta = mean_b - mean_a, n = n_a + n_b:

    .. math::
        mean = mean_a + delta n_b / n, \\qquad
        M2 = M2_a + M2_b + delta delta^T n_a n_b / n.

    Raw sums of x and x x^T would lose about log10(|mean|^2 / var) digits of the covariance to
    cancellation in float64 (Inception features are non-negative with means of the order of their
    spread); the centred form keeps every merge at the round-off of the batch itself.

    Args:
      stats: statistics so far (from ``init_feature_stats``).
      features: [N, D] feature rows, a NumPy or JAX array of any float dtype; N may be 0 or 1.

    Returns:
      The updated statistics (new arrays; ``stats`` is not modified).

    References:
      Chan, Golub & LeVeque, "Updating formulae and a pairwise algorithm for computing sample
      variances" (1979), eq. 2.1.
    """
    dim = stats.mean.shape[0]
    batch = _host_float64(features, "features")
    if batch.ndim != 2 or batch.shape[1] != dim:
        raise ValueError(
            f"features must have shape [N, {dim}] (rows of dimension {dim}), got {batch.shape}"
        )
    n_b = batch.shape[0]
    if n_b == 0:
        return stats
    mean_b = batch.mean(axis=0)
    centred = batch - mean_b
    m2_b = centred.T @ centred
    n = stats.count + n_b
    delta = mean_b - stats.mean
    mean = stats.mean + delta * (n_b / n)
    m2 = stats.m2 + m2_b + np.outer(delta, delta) * (stats.count * n_b / n)
    return FeatureStats(n, mean, m2)


def finalize_feature_stats(stats: FeatureStats) -> tuple[np.ndarray, np.ndarray]:
    """The mean and unbiased covariance of every row seen: (mu, sigma = M2 / (N - 1)).

    ``sigma`` equals ``np.cov(features, rowvar=False)`` (the statistics pytorch-fid stores). It
    needs N >= 2 rows. With N <= D the covariance has rank at most N - 1 < D (rank-deficient):
    a ``RuntimeWarning`` says so, and ``frechet_distance`` may then need pytorch-fid's eps
    offset; a full-rank covariance of dimension D needs at least N = D + 1 rows.

    Returns:
      (mu [D], sigma [D, D]), float64.
    """
    n, dim = stats.count, stats.mean.shape[0]
    if n < 2:
        raise ValueError(
            f"a covariance needs at least N = 2 feature rows, got N = {n}; a full-rank "
            f"covariance of dimension D = {dim} needs N >= {dim + 1}"
        )
    if n <= dim:
        warnings.warn(
            f"covariance of D = {dim} features from only N = {n} rows is rank-deficient "
            f"(rank <= {n - 1}); use N >= {dim + 1} rows for a full-rank covariance (the "
            f"Fréchet distance then relies on the eps offset for singular products)",
            RuntimeWarning,
            stacklevel=2,
        )
    sigma = stats.m2 / (n - 1)
    # M2 is symmetric in exact arithmetic; the outer-product merges keep it so up to round-off.
    sigma = 0.5 * (sigma + sigma.T)
    return stats.mean.copy(), sigma


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), as pytorch-fid computes it.

    .. math::
        d^2 = \\|mu_1 - mu_2\\|^2 + Tr(\\Sigma_1 + \\Sigma_2 - 2 (\\Sigma_1 \\Sigma_2)^{1/2})

    The square root is the principal one of the product, ``scipy.linalg.sqrtm`` (Schur method).
    Near-singular products are handled as pytorch-fid 0.3.0's ``calculate_frechet_distance``
    does: when that square root has non-finite entries, ``eps * I`` is added to both covariances
    and the root is recomputed (with a ``RuntimeWarning``). A complex root is accepted when the
    imaginary parts of its diagonal are within ``IMAGINARY_ATOL`` (1e-3) of zero, and its real
    part is used; larger ones mean the inputs are not covariances, and raise ``ValueError``.
    All arithmetic is float64 whatever the input dtype.

    Args:
      mu1, mu2: [D] means (scalars are read as D = 1).
      sigma1, sigma2: [D, D] covariances.
      eps: the diagonal offset of the singular-product path (pytorch-fid's default 1e-6).

    Returns:
      The squared Fréchet distance d^2 (what FID reports) as a Python float.

    References:
      Fréchet (1957); Dowson & Landau (1982), "The Fréchet distance between multivariate normal
      distributions"; Heusel et al. (2017), "GANs trained by a two time-scale update rule
      converge to a local Nash equilibrium", eq. 6 (FID); pytorch-fid 0.3.0.
    """
    if not (isinstance(eps, (int, float, np.floating)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    mu1 = np.atleast_1d(_host_float64(mu1, "mu1"))
    mu2 = np.atleast_1d(_host_float64(mu2, "mu2"))
    sigma1 = np.atleast_2d(_host_float64(sigma1, "sigma1"))
    sigma2 = np.atleast_2d(_host_float64(sigma2, "sigma2"))
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(
            f"mu1 and mu2 must be vectors of one length, got {mu1.shape} and {mu2.shape}"
        )
    dim = mu1.shape[0]
    for name, sigma in (("sigma1", sigma1), ("sigma2", sigma2)):
        if sigma.shape != (dim, dim):
            raise ValueError(
                f"{name} must have shape ({dim}, {dim}) to match the means, got {sigma.shape}"
            )

    root = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(root).all():
        warnings.warn(
            f"sqrtm(sigma1 sigma2) is not finite (a singular product); adding {eps} to the "
            "diagonal of both covariances, as pytorch-fid does",
            RuntimeWarning,
            stacklevel=2,
        )
        offset = eps * np.eye(dim)
        root = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if not np.isfinite(root).all():
            raise ValueError(
                f"sqrtm(sigma1 sigma2) is not finite even with eps = {eps} on the diagonal; "
                "pass a larger eps or covariances from more samples"
            )
    if np.iscomplexobj(root):
        imag = np.abs(np.diagonal(root).imag)
        if not (imag <= IMAGINARY_ATOL).all():
            raise ValueError(
                f"sqrtm(sigma1 sigma2) has an imaginary diagonal component of "
                f"{float(np.max(np.abs(root.imag))):.3g} (allowed {IMAGINARY_ATOL}): sigma1 and "
                "sigma2 must be positive semi-definite covariances"
            )
        root = root.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(root))


def _sqrtm(a: np.ndarray) -> np.ndarray:
    # frechet_distance reacts to singular products itself (the eps path), so SciPy's warning
    # about them would only repeat it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        return scipy.linalg.sqrtm(a)


def _softmax_and_log(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return np.exp(log_p), log_p


def inception_score(logits=None, *, probs=None, splits: int = 10) -> tuple[float, float]:
    """Inception Score: the mean and standard deviation over splits of exp E_x KL(p(y|x) || p(y)).

    .. math::
        IS_s = \\exp\\Big(\\frac{1}{|X_s|} \\sum_{x \\in X_s} \\sum_y p(y|x)
               [\\log p(y|x) - \\log \\hat p_s(y)]\\Big), \\qquad
        \\hat p_s(y) = \\frac{1}{|X_s|} \\sum_{x \\in X_s} p(y|x)

    Convention (Salimans et al.'s code and torch-fidelity's ``isc_features_to_metric``): the N
    samples are cut, in the order given, into ``splits`` contiguous parts, part i being rows
    ``i*N//splits`` to ``(i+1)*N//splits``; the marginal p(y) is each part's own mean; the result
    is (mean, population std (ddof=0)) of the per-part scores. torch-fidelity shuffles the rows
    first (``np.random.RandomState(2020).permutation(N)``, its default); pass rows in that order
    to reproduce its numbers. Terms with p(y|x) = 0 contribute 0.

    Args:
      logits: [N, K] classifier logits (softmax is taken in float64, with log-softmax for
        log p(y|x), as torch-fidelity does), or
      probs: [N, K] class probabilities (rows must sum to 1 within 1e-6); exactly one of the two.
      splits: number of parts, 1 <= splits <= N.

    Returns:
      (mean, std) of the per-split scores, Python floats. Uniform predictions give 1; confident
      predictions spread evenly over K classes give K.

    References:
      Salimans et al. (2016), "Improved techniques for training GANs", section 4.
    """
    if (logits is None) == (probs is None):
        raise ValueError("pass exactly one of logits= or probs= to inception_score")
    name = "logits" if probs is None else "probs"
    x = _host_float64(logits if probs is None else probs, name)
    if x.ndim != 2 or x.shape[1] < 1:
        raise ValueError(f"{name} must have shape [N, K] (samples x classes), got {x.shape}")
    n = x.shape[0]
    if (
        isinstance(splits, bool)
        or not isinstance(splits, (int, np.integer))
        or not (1 <= splits <= n)
    ):
        raise ValueError(f"splits must be an integer in [1, N = {n}], got {splits!r}")
    if probs is None:
        p, log_p = _softmax_and_log(x)
    else:
        if (x < 0).any() or not np.allclose(x.sum(axis=1), 1.0, rtol=0.0, atol=1e-6):
            raise ValueError(
                "probs must be non-negative with rows summing to 1 (within 1e-6); pass raw "
                "classifier outputs as logits= instead"
            )
        p = x
        with np.errstate(divide="ignore"):
            log_p = np.log(p)
    scores = []
    for i in range(int(splits)):
        lo, hi = i * n // splits, (i + 1) * n // splits
        p_s, log_p_s = p[lo:hi], log_p[lo:hi]
        log_marginal = np.log(p_s.mean(axis=0))
        # p log p -> 0 as p -> 0: zero-probability terms are dropped, not 0 * -inf.
        terms = p_s * np.where(p_s > 0, log_p_s - log_marginal, 0.0)
        scores.append(math.exp(terms.sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _check_block_size(block_size) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)):
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    if block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    return int(block_size)


def _squared_distances(a: np.ndarray, b: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
    """||a_i - b_j||^2 = |a_i|^2 + |b_j|^2 - 2 a_i.b_j, clipped at 0 against round-off."""
    d2 = (a * a).sum(axis=1)[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d2, 0.0)


def manifold_radii(features, k: int = 3, block_size: int = 1024) -> np.ndarray:
    """Radius of each feature's k-NN hypersphere: the distance to its k-th nearest other row.

    The distances are computed ``block_size`` rows at a time ([block_size, N] in memory). The
    point itself (distance 0) is not one of its neighbours; duplicate rows count as neighbours at
    distance 0.

    Args:
      features: [N, D] features, N > k.
      k: neighbourhood size (3 in Kynkäänniemi et al.).
      block_size: rows per distance block.

    Returns:
      [N] float64 radii.

    References:
      Kynkäänniemi et al. (2019), "Improved precision and recall metric for assessing generative
      models", section 3 (eq. 2).
    """
    x = _host_float64(features, "features")
    block_size = _check_block_size(block_size)
    if x.ndim != 2:
        raise ValueError(f"features must have shape [N, D], got {x.shape}")
    n = x.shape[0]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if n <= k:
        raise ValueError(f"k-NN radii with k = {k} need at least N = {k + 1} rows, got N = {n}")
    x_sq = (x * x).sum(axis=1)
    radii = np.empty(n, np.float64)
    for lo in range(0, n, block_size):
        d2 = _squared_distances(x[lo : lo + block_size], x, x_sq)
        rows = np.arange(d2.shape[0])
        # the row itself is excluded by name (its computed distance may be a round-off above 0)
        d2[rows, lo + rows] = -1.0
        radii[lo : lo + block_size] = np.partition(d2, k, axis=1)[:, k]
    return np.sqrt(radii)


def _coverage(queries: np.ndarray, support: np.ndarray, radii: np.ndarray, block_size: int):
    """Fraction of query rows within radii[j] of some support row j."""
    support_sq = (support * support).sum(axis=1)
    radii_sq = radii * radii
    inside = 0
    for lo in range(0, queries.shape[0], block_size):
        d2 = _squared_distances(queries[lo : lo + block_size], support, support_sq)
        inside += int(np.count_nonzero((d2 <= radii_sq[None, :]).any(axis=1)))
    return inside / queries.shape[0]


def precision_recall(real, fake, k: int = 3, block_size: int = 1024) -> tuple[float, float]:
    """Improved precision and recall of ``fake`` against ``real`` features (k-NN manifolds).

    With the manifold of a set S the union of balls B(s, r_k(s)), r_k(s) the distance from s to
    its k-th nearest neighbour in S (``manifold_radii``):

    .. math::
        precision = \\frac{1}{|F|} \\sum_{f \\in F} 1[f \\in manifold(R)], \\qquad
        recall = \\frac{1}{|R|} \\sum_{r \\in R} 1[r \\in manifold(F)]

    A point on a sphere's boundary counts as inside (``<=``). Distances are computed in blocks of
    ``block_size`` rows, so memory is O(block_size * max(|R|, |F|)).

    Args:
      real: [N_r, D] real features, N_r > k.
      fake: [N_f, D] generated features, N_f > k.
      k: neighbourhood size (3, the paper's default).
      block_size: rows per distance block.

    Returns:
      (precision, recall), Python floats in [0, 1].

    References:
      Kynkäänniemi et al. (2019), "Improved precision and recall metric for assessing generative
      models", eq. 1-2.
    """
    real_x = _host_float64(real, "real")
    fake_x = _host_float64(fake, "fake")
    if real_x.ndim != 2 or fake_x.ndim != 2 or real_x.shape[1] != fake_x.shape[1]:
        raise ValueError(
            f"real and fake must have shapes [N_r, D] and [N_f, D] with one D, got "
            f"{real_x.shape} and {fake_x.shape}"
        )
    block_size = _check_block_size(block_size)
    real_radii = manifold_radii(real_x, k, block_size)
    fake_radii = manifold_radii(fake_x, k, block_size)
    precision = _coverage(fake_x, real_x, real_radii, block_size)
    recall = _coverage(real_x, fake_x, fake_radii, block_size)
    return precision, recall
