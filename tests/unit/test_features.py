"""Feature statistics for the quality metrics: streaming, files, folders, and bad input."""

import numpy as np
import pytest
from PIL import Image

from jaxdiff import data, evaluation, features, metrics


@pytest.fixture(scope="module")
def digits():
    return features.digits_extractor()


@pytest.fixture(scope="module")
def train_images():
    return data.load_digits(16, split="train").images


@pytest.fixture(scope="module")
def reference(digits, train_images):
    return features.image_statistics(digits, [train_images], source="train")


def _one_shot(extractor, images):
    feats, logits = extractor.apply(images)
    return np.asarray(feats, np.float64), np.asarray(logits)


def test_streamed_statistics_equal_one_shot(digits, train_images):
    images = train_images[:300]
    chunks = [images[:7], images[7:150], images[150:]]
    s = features.image_statistics(digits, chunks, source="x", batch_size=64, keep=100)
    feats, logits = _one_shot(digits, images)
    mu, sigma = metrics.finalize_feature_stats(s.stats)
    np.testing.assert_allclose(mu, feats.mean(0), rtol=0, atol=1e-5)
    np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), rtol=0, atol=1e-4)
    np.testing.assert_allclose(s.logits, logits, rtol=0, atol=1e-4)
    assert s.count == 300 and s.sample.shape == (100, 64)
    np.testing.assert_allclose(s.sample, feats[:100], rtol=0, atol=1e-4)


def test_real_test_split_is_far_closer_than_noise_or_blobs(digits, reference):
    test = data.load_digits(16, split="test").images
    fd_test = features.quality(features.image_statistics(digits, [test], source="test"), reference)[
        "fd"
    ]
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (300, 16, 16, 1)).astype(np.uint8)
    fd_noise = features.quality(
        features.image_statistics(digits, [noise], source="noise"), reference
    )["fd"]
    assert fd_test < fd_noise / 10, (fd_test, fd_noise)


def test_quality_needs_more_rows_than_the_feature_dimension(digits, reference, train_images):
    few = features.image_statistics(digits, [train_images[:64]], source="few")
    with pytest.raises(ValueError, match=r"at least N = 65 generated images, got 64"):
        features.quality(few, reference)


def test_statistics_of_other_networks_are_not_compared(digits, reference, train_images):
    s = features.image_statistics(digits, [train_images[:100]], source="x")
    other = s._replace(extractor="digits:0000")
    with pytest.raises(ValueError, match="different networks"):
        features.quality(other, reference)


def test_as_uint8_accepts_model_range_and_refuses_others():
    x = np.linspace(-1, 1, 16 * 16, dtype=np.float32).reshape(1, 16, 16, 1)
    np.testing.assert_array_equal(features.as_uint8(x), data.to_uint8(x))
    with pytest.raises(ValueError, match=r"floats in \[0, 255\], outside the expected \[-1, 1\]"):
        features.as_uint8(
            np.full((1, 4, 4, 1), 255.0, np.float32) * np.linspace(0, 1, 16).reshape(1, 4, 4, 1)
        )
    with pytest.raises(ValueError, match="NaN|outside"):
        features.as_uint8(np.full((1, 4, 4, 1), np.nan, np.float32))
    with pytest.raises(ValueError, match=r"\[N, H, W, C\] with C = 1 or 3"):
        features.as_uint8(np.zeros((4, 4, 1), np.uint8))
    with pytest.raises(ValueError, match="uint8 .* or floats"):
        features.as_uint8(np.zeros((1, 4, 4, 1), np.int64))


def test_rgb_images_are_refused_by_the_digits_metric(digits):
    with pytest.raises(ValueError, match="digits metric takes 1-channel images"):
        features.image_statistics(digits, [np.zeros((4, 16, 16, 3), np.uint8)], source="rgb")


def test_a_set_of_mixed_sizes_is_refused(digits):
    batches = [np.zeros((4, 16, 16, 1), np.uint8), np.zeros((4, 8, 8, 1), np.uint8)]
    with pytest.raises(ValueError, match="same size and channels"):
        features.image_statistics(digits, batches, source="mixed")


def _write_folder(root, images, mode="L"):
    root.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im[..., 0]).convert(mode).save(root / f"{i:04d}.png")


def test_folder_statistics_equal_array_statistics(digits, train_images, tmp_path):
    _write_folder(tmp_path / "a" / "sub", train_images[:90])
    from_folder = evaluation.real_statistics(tmp_path / "a", digits, batch_size=40)
    from_array = features.image_statistics(digits, [train_images[:90]], source="x")
    np.testing.assert_allclose(from_folder.stats.mean, from_array.stats.mean, atol=1e-6)
    np.testing.assert_allclose(from_folder.stats.m2, from_array.stats.m2, atol=1e-3)
    assert features.quality(from_folder, from_array)["fd"] == pytest.approx(0.0, abs=1e-3)


def test_folders_of_mixed_sizes_channels_or_broken_files_are_refused(train_images, tmp_path):
    _write_folder(tmp_path / "sizes", train_images[:3])
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "sizes" / "small.png")
    with pytest.raises(ValueError, match=r"mixes image sizes or channels: 3 of 16x16 .* 1 of 8x8"):
        features.folder_images(tmp_path / "sizes")
    _write_folder(tmp_path / "modes", train_images[:3])
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "modes" / "rgb.png")
    with pytest.raises(ValueError, match="with 3 channels"):
        features.folder_images(tmp_path / "modes")
    _write_folder(tmp_path / "broken", train_images[:3])
    (tmp_path / "broken" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image file .*bad.png"):
        features.folder_images(tmp_path / "broken")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .png"):
        features.folder_images(tmp_path / "empty")


def test_statistics_files_round_trip_and_read_pytorch_fid_files(digits, reference, tmp_path):
    path = features.save_statistics(reference, tmp_path / "ref.npz")
    again = features.load_statistics(path, digits)
    assert again.count == reference.count and again.extractor == reference.extractor
    np.testing.assert_array_equal(again.stats.m2, reference.stats.m2)
    np.testing.assert_array_equal(again.sample, reference.sample)
    mu, sigma = metrics.finalize_feature_stats(reference.stats)
    np.savez(tmp_path / "fid.npz", mu=mu, sigma=sigma)  # what pytorch-fid's --save-stats writes
    theirs = features.load_statistics(tmp_path / "fid.npz", digits)
    fd = features.quality(reference, theirs)["fd"]
    assert fd == pytest.approx(0.0, abs=1e-6)
    np.savez(tmp_path / "wrong.npz", mu=mu[:10], sigma=sigma[:10, :10])
    with pytest.raises(ValueError, match="10-d features; the digits metric has 64"):
        features.load_statistics(tmp_path / "wrong.npz", digits)
    np.savez(tmp_path / "other.npz", x=mu)
    with pytest.raises(ValueError, match="not a statistics file"):
        features.load_statistics(tmp_path / "other.npz", digits)


def test_cached_statistics_are_reused_and_recomputed_when_the_source_changes(
    digits, train_images, tmp_path
):
    calls = []

    def batches():
        calls.append(1)
        return [train_images[:80]]

    path = tmp_path / "ref.npz"
    a = features.cached_statistics(path, digits, "source A", batches)
    b = features.cached_statistics(path, digits, "source A", batches)
    assert len(calls) == 1 and a.count == b.count
    features.cached_statistics(path, digits, "source B", batches)
    assert len(calls) == 2


def test_fid_without_weights_names_the_file_and_where_it_is(monkeypatch):
    monkeypatch.delenv(features.INCEPTION_ENV, raising=False)
    with pytest.raises(ValueError, match=r"weights-inception-2015-12-05-6726825d.pth.*github.com"):
        features.inception_extractor()
    monkeypatch.setenv(features.INCEPTION_ENV, "/nonexistent/inception.npz")
    with pytest.raises(ValueError, match="not found at /nonexistent/inception.npz"):
        features.inception_extractor()


def test_a_folder_runs_reference_is_recomputed_when_the_folder_changes(
    digits, train_images, tmp_path
):
    from jaxdiff.config import Config, DataConfig

    _write_folder(tmp_path / "imgs", train_images[:70])
    config = Config(data=DataConfig(dataset="folder", folder=str(tmp_path / "imgs"), channels=1))
    first = evaluation.reference_statistics(config, digits, tmp_path / "eval")
    cached = evaluation.reference_statistics(config, digits, tmp_path / "eval")
    assert first.count == cached.count == 70 and first.source == cached.source
    Image.fromarray(train_images[70, ..., 0]).save(tmp_path / "imgs" / "new.png")
    again = evaluation.reference_statistics(config, digits, tmp_path / "eval")
    assert again.count == 71 and again.source != first.source


def test_a_folder_without_a_held_out_share_has_no_test_split_to_pretend(train_images, tmp_path):
    from jaxdiff import workdir
    from jaxdiff.config import DataConfig

    _write_folder(tmp_path / "imgs", train_images[:3])
    cfg = DataConfig(dataset="folder", folder=str(tmp_path / "imgs"), channels=1)
    with pytest.raises(ValueError, match=r"no test images at test_fraction 0.0 .*--split all"):
        workdir.load_dataset(cfg, "test")
    assert len(workdir.load_dataset(cfg, "train")) == 3  # trained on every file
