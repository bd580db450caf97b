"""Host data: the digits dataset and its held-out split, image folders, deterministic and
resumable batches, bad input."""

import ast
import pathlib

import numpy as np
import pytest
from PIL import Image

from jaxdiff import data

# Pillow resizes a float32 ("F") image in float32; ours runs in float64.
PIL_BILINEAR_ATOL = 1e-4
NUM_DIGITS = 1797
NUM_TEST = 184  # digits_split's count for test_fraction 0.1 (content hashes, fixed)


def test_data_module_keeps_jax_out():
    tree = ast.parse(pathlib.Path(data.__file__).read_text())
    roots = {
        alias.name.split(".")[0]
        for n in ast.walk(tree)
        if isinstance(n, ast.Import)
        for alias in n.names
    }
    roots |= {
        n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
    }
    assert not roots & {"jax", "jaxlib", "flax", "optax", "orbax"}, roots


@pytest.mark.parametrize("size", data.DIGITS_SIZES)
def test_digits_shapes_and_range(size):
    train = data.load_digits(size)
    test = data.load_digits(size, split="test")
    assert train.images.shape == (NUM_DIGITS - NUM_TEST, size, size, 1)
    assert test.images.shape == (NUM_TEST, size, size, 1)
    assert train.images.dtype == np.uint8 and train.image_shape == (size, size, 1)
    assert train.images.min() == 0 and train.images.max() == 255


def test_nearest_digits_repeat_the_8x8_pixels_and_bilinear_matches_pillow():
    native = data.load_digits(8, split="all").images
    nearest = data.load_digits(32, split="all", resize="nearest").images
    np.testing.assert_array_equal(nearest, native.repeat(4, axis=1).repeat(4, axis=2))
    # 0..16 maps to 0..255: v * 255 / 16 rounded.
    assert set(np.unique(native)) <= {round(v * 255 / 16) for v in range(17)}

    rng = np.random.default_rng(0)
    image = rng.uniform(0, 255, (8, 8)).astype(np.float32)
    for size in (16, 32):
        ours = data.resize_images(image[None, :, :, None], size)[0, :, :, 0]
        pil = np.asarray(Image.fromarray(image, mode="F").resize((size, size), Image.BILINEAR))
        np.testing.assert_allclose(ours, pil, atol=PIL_BILINEAR_ATOL)


def test_test_split_is_deterministic_and_disjoint_from_train():
    train = data.load_digits(8).images
    test = data.load_digits(8, split="test").images
    everything = data.load_digits(8, split="all").images
    assert len(train) + len(test) == len(everything) == NUM_DIGITS
    train_set = {im.tobytes() for im in train}
    assert not any(im.tobytes() in train_set for im in test)
    np.testing.assert_array_equal(data.load_digits(8, split="test").images, test)
    # Every class is represented in the held-out split.
    from sklearn.datasets import load_digits

    digits = load_digits()
    mask = data.digits_split(digits.images)
    assert mask.sum() == NUM_TEST and set(digits.target[mask]) == set(range(10))


def test_batches_are_a_function_of_seed_and_step():
    dataset = data.load_digits(8)
    n, size = len(dataset), 64
    per_epoch = data.steps_per_epoch(n, size)
    steps = 2 * per_epoch + 3  # crosses two epoch boundaries
    run = list(data.batches(dataset, size, seed=5, num_steps=steps))
    again = list(data.batches(dataset, size, seed=5, num_steps=steps))
    other = next(data.batches(dataset, size, seed=6))
    assert all(b.shape == (size, 8, 8, 1) and b.dtype == np.uint8 for b in run)
    for a, b in zip(run, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(run[0], other)

    # Resuming at any step gives exactly the uninterrupted batches.
    for start in (1, per_epoch - 1, per_epoch, per_epoch + 2):
        resumed = list(data.batches(dataset, size, seed=5, start_step=start, num_steps=3))
        for i, batch in enumerate(resumed):
            np.testing.assert_array_equal(batch, run[start + i])
            np.testing.assert_array_equal(batch, data.batch_at(dataset, start + i, size, seed=5))

    # One epoch sees each example at most once; the next epoch reorders them.
    index = {im.tobytes(): i for i, im in enumerate(dataset.images)}
    seen = [index[im.tobytes()] for b in run[:per_epoch] for im in b]
    assert len(seen) == len(set(seen)) == per_epoch * size
    next_epoch = [index[im.tobytes()] for b in run[per_epoch : 2 * per_epoch] for im in b]
    assert seen != next_epoch


def test_processes_split_the_global_batch_and_flips_are_deterministic():
    dataset = data.load_digits(8)
    whole = data.batch_at(dataset, 7, 16, seed=1, flip=True)
    parts = [
        data.batch_at(dataset, 7, 16, seed=1, flip=True, process_index=p, process_count=4)
        for p in range(4)
    ]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    plain = data.batch_at(dataset, 7, 16, seed=1)
    mirrored = np.array([not np.array_equal(a, b) for a, b in zip(whole, plain, strict=True)])
    assert 0 < mirrored.sum() < 16
    np.testing.assert_array_equal(whole[mirrored], plain[mirrored][:, :, ::-1])
    np.testing.assert_array_equal(whole, data.batch_at(dataset, 7, 16, seed=1, flip=True))


def test_unit_range_round_trip():
    pixels = np.arange(256, dtype=np.uint8)
    x = data.to_unit_range(pixels)
    assert x.dtype == np.float32 and x[0] == -1.0 and x[-1] == 1.0
    np.testing.assert_array_equal(data.to_uint8(x), pixels)


def _write(path: pathlib.Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_image_folder_resizes_the_shorter_side_and_crops_the_centre(tmp_path):
    wide = np.zeros((20, 60, 3), np.uint8)  # H 20, W 60: black | white | black thirds
    wide[:, 20:40] = 255
    _write(tmp_path / "a" / "wide.png", wide)
    _write(tmp_path / "b" / "c" / "solid.jpg", np.full((30, 30, 3), (200, 10, 10), np.uint8))
    _write(tmp_path / "small.JPEG", np.full((5, 7), 77, np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")

    folder = data.ImageFolder(tmp_path, 10, channels=3)
    names = [p.relative_to(tmp_path).as_posix() for p in folder.files]
    assert names == ["a/wide.png", "b/c/solid.jpg", "small.JPEG"]
    images = folder.get(np.arange(3))
    assert images.shape == (3, 10, 10, 3) and images.dtype == np.uint8
    # 20x60 -> 10x30, centre 10x10 = the white middle third (its edge columns antialiased).
    assert images[0][:, 1:-1].min() == 255 and images[0].min() > 128
    np.testing.assert_allclose(images[1].reshape(-1, 3).mean(0), (200, 10, 10), atol=3)
    np.testing.assert_array_equal(images[2], np.full((10, 10, 3), 77))

    gray = data.ImageFolder(tmp_path, 10, channels=1).load()
    assert gray.images.shape == (3, 10, 10, 1)
    batch = data.batch_at(gray, 0, 2, seed=0)
    assert batch.shape == (2, 10, 10, 1)


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        data.ImageFolder(tmp_path / "missing", 8)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"empty'.*holds no .png/.jpg/.jpeg files"):
        data.ImageFolder(tmp_path / "empty", 8)
    _write(tmp_path / "mixed" / "good.png", np.zeros((8, 8), np.uint8))
    bad = tmp_path / "mixed" / "sub" / "bad.png"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\x89PNG but not really")
    with pytest.raises(ValueError, match=rf"cannot read image file '{bad}'"):
        data.ImageFolder(tmp_path / "mixed", 8)
    with pytest.raises(ValueError, match=r"channel count 4.*\[1, 3\]"):
        data.ImageFolder(tmp_path / "mixed", 8, channels=4)


def test_a_file_that_breaks_after_the_scan_is_named_when_loaded(tmp_path):
    path = tmp_path / "x.png"
    _write(path, np.zeros((8, 8), np.uint8))
    folder = data.ImageFolder(tmp_path, 8, channels=1)
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=rf"cannot read image file '{path}'"):
        folder.get(np.array([0]))


def test_bad_arguments():
    dataset = data.load_digits(8)
    with pytest.raises(ValueError, match=r"digits image size 12.*\[8, 16, 32\]"):
        data.load_digits(12)
    with pytest.raises(ValueError, match=r"split 'val'.*'train'"):
        data.load_digits(8, split="val")
    with pytest.raises(ValueError, match=r"resize method 'cubic'.*'bilinear'"):
        data.load_digits(16, resize="cubic")
    with pytest.raises(ValueError, match="test_fraction"):
        data.load_digits(8, test_fraction=1.0)
    with pytest.raises(ValueError, match=r"batch_size 5000 exceeds the 1613 examples"):
        data.batch_at(dataset, 0, 5000, seed=0)
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        data.batch_at(dataset, 0, 16, seed=0, process_count=3)
    with pytest.raises(ValueError, match="uint8"):
        data.ArrayDataset(np.zeros((2, 4, 4, 1), np.float32))


def test_a_folder_is_rgb_when_any_file_is_in_colour(tmp_path):
    _write(tmp_path / "gray" / "a.png", np.full((8, 8), 10, np.uint8))
    _write(tmp_path / "gray" / "b.png", np.full((8, 8), 20, np.uint8))
    gray = data.ImageFolder(tmp_path / "gray", 8, channels=None)
    assert gray.channels == gray.detected_channels == 1 and gray.modes == {"L": 2}
    _write(tmp_path / "gray" / "c.png", np.full((8, 8, 3), (200, 10, 10), np.uint8))
    mixed = data.ImageFolder(tmp_path / "gray", 8, channels=None)
    assert mixed.channels == 3 and mixed.modes == {"L": 2, "RGB": 1}
    assert mixed.load().images.shape == (3, 8, 8, 3)
    assert data.mode_channels("LA") == 1 and data.mode_channels("RGBA") == 3


def test_the_run_records_the_channel_count_and_warns_on_conversion(tmp_path):
    import dataclasses

    from jaxdiff import workdir as wd
    from jaxdiff.config import PRESETS, DataConfig

    digits = PRESETS["digits"]
    assert digits.data.channels is None and digits.identity()["data"]["channels"] == 1
    assert wd.resolve_channels(digits) == (dataclasses.replace(
        digits, data=dataclasses.replace(digits.data, channels=1)), None)  # fmt: skip
    with pytest.raises(ValueError, match="digits are grayscale"):
        wd.resolve_channels(dataclasses.replace(digits, data=DataConfig(channels=3)))

    _write(tmp_path / "rgb" / "a.png", np.full((8, 8, 3), (200, 10, 10), np.uint8))
    _write(tmp_path / "gray" / "a.png", np.full((8, 8), 10, np.uint8))

    def folder(name, channels):
        cfg = DataConfig(dataset="folder", folder=str(tmp_path / name), image_size=8,
                         channels=channels)  # fmt: skip
        config, note = wd.resolve_channels(dataclasses.replace(digits, data=cfg))
        return config.data.channels, note

    assert folder("rgb", None) == (3, None) and folder("gray", None) == (1, None)
    assert folder("rgb", 3) == (3, None)
    channels, note = folder("rgb", 1)
    assert channels == 1 and "holds RGB images (1 RGB)" in note and "to grayscale" in note
    channels, note = folder("gray", 3)
    assert channels == 3 and "holds grayscale images (1 L)" in note and "to RGB" in note


def test_a_folder_holds_out_a_share_by_file_name(tmp_path):
    """The held-out split of an image folder: disjoint from training, about the fraction asked,
    fixed by each file's name (a file keeps its side when others come), labels numbered over
    the whole folder, and a clear error where a side would be empty."""
    import dataclasses

    from jaxdiff import config as cfg
    from jaxdiff import workdir as wd

    for i in range(40):
        _write(tmp_path / f"c{i % 4}" / f"{i}.png", np.full((8, 8), i, np.uint8))
    splits = {s: data.ImageFolder(tmp_path, 8, channels=1, split=s, test_fraction=0.25)
              for s in ("train", "test", "all")}  # fmt: skip
    names = {s: {p.relative_to(tmp_path).as_posix() for p in f.files} for s, f in splits.items()}
    assert names["train"].isdisjoint(names["test"])
    assert names["train"] | names["test"] == names["all"] and len(names["all"]) == 40
    assert 4 <= len(names["test"]) <= 16  # 10 expected of 40 at 0.25
    mask = data.folder_split(sorted(names["all"]), 0.25)
    assert {n for n, m in zip(sorted(names["all"]), mask, strict=True) if m} == names["test"]
    # labels: the class of each file's subfolder, numbered over the whole folder
    for f in splits.values():
        assert f.class_names == ("c0", "c1", "c2", "c3")
        assert [f.class_names[y] for y in f.labels] == [p.parent.name for p in f.files]
    # a new file moves no other file across
    _write(tmp_path / "c0" / "new.png", np.zeros((8, 8), np.uint8))
    again = data.ImageFolder(tmp_path, 8, channels=1, split="test", test_fraction=0.25)
    assert names["test"] <= {p.relative_to(tmp_path).as_posix() for p in again.files}
    assert not data.folder_split(sorted(names["all"]), 0.0).any()

    with pytest.raises(ValueError, match=r"no test images at test_fraction 0.0 .*--test-fraction"):
        data.ImageFolder(tmp_path, 8, split="test")
    with pytest.raises(ValueError, match=r"test_fraction must be in \[0, 1\)"):
        data.folder_split(["a.png"], 1.0)
    # the run's configuration: trained on the rest, measured on the held-out share
    config = cfg.Config(data=cfg.DataConfig(dataset="folder", folder=str(tmp_path), image_size=8,
                                            channels=1, test_fraction=0.25))  # fmt: skip
    assert cfg.validate(config) is config
    assert len(wd.load_dataset(config.data, "test")) == len(again)
    assert len(wd.load_dataset(config.data, "train")) == 41 - len(again)
    assert config.identity()["data"]["test_fraction"] == 0.25
    assert "test_fraction" not in cfg.Config().identity()["data"]  # older workdirs still match
    with pytest.raises(ValueError, match="the digits have their fixed held-out split"):
        cfg.validate(dataclasses.replace(config, data=cfg.DataConfig(test_fraction=0.1)))


def test_prefetch_yields_every_step_in_order_computed_ahead_and_raises_at_its_step():
    import threading
    import time

    seen = []

    def fn(step):
        seen.append(threading.current_thread().name)
        time.sleep(0.01 * (step % 3))  # out-of-order completion
        if step == 7:
            raise ValueError("cannot read image file 'x.png'")
        return step * 10

    out = []
    with pytest.raises(ValueError, match="x.png"):
        for step, value in data.prefetch(fn, 2, 20, depth=3, workers=2):
            out.append((step, value))
    assert out == [(s, s * 10) for s in range(2, 7)]
    assert all(name.startswith("jaxdiff-data") for name in seen)
    assert len(seen) <= 7 - 2 + 3  # never more than depth steps ahead
    assert list(data.prefetch(lambda s: -s, 0, 3)) == [(0, 0), (1, -1), (2, -2)]
    assert list(data.prefetch(lambda s: s, 5, 5)) == []
    with pytest.raises(ValueError, match="depth and workers must be >= 1"):
        list(data.prefetch(lambda s: s, 0, 3, depth=0))


def test_training_streams_a_folder_batch_by_batch_with_the_same_batches(tmp_path):
    """A folder run no longer decodes every image up front: the training dataset is the
    ImageFolder itself, and its batches equal those of the fully loaded folder."""
    from jaxdiff import workdir as wd
    from jaxdiff.config import DataConfig

    for i in range(12):
        _write(tmp_path / f"{i}.png", np.full((8, 8), 20 * i, np.uint8))
    cfg = DataConfig(dataset="folder", folder=str(tmp_path), image_size=8, channels=1)
    streamed = wd.load_dataset(cfg, "train")
    assert isinstance(streamed, data.ImageFolder)
    loaded = streamed.load()
    for step in range(4):
        a, b = (data.batch_at(d, step, 5, seed=3, flip=True) for d in (streamed, loaded))
        np.testing.assert_array_equal(a, b)
