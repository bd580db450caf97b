"""``jaxdiff eval`` and the quality evaluation during training, end to end on a tiny run."""

import json

import numpy as np
import pytest
from PIL import Image

from jaxdiff import cli, data, features

pytestmark = pytest.mark.slow

TINY = [
    "--dim", "8", "--dim-mults", "1,2", "--image-size", "8", "--timesteps", "20",
    "--batch-size", "8", "--num-samples", "4", "--sample-steps", "3", "--log-every", "2",
    "--sample-every", "1000",
]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("eval") / "run"
    args = ["train", "--workdir", str(workdir), "--steps", "4", "--save-every", "2", *TINY]
    assert cli.main(args + ["--eval-every", "2", "--eval-num", "65"]) == 0
    return workdir


def test_quality_is_logged_during_training(trained):
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "digits_fd" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert r["digits_fd"] > 0 and 1.0 <= r["digits_is"] <= 10.0
        assert 0.0 <= r["digits_precision"] <= 1.0 and 0.0 <= r["digits_recall"] <= 1.0
    assert (trained / "eval" / "reference-digits.npz").is_file()
    # the plot has the quality panel beside the loss
    assert Image.open(trained / "loss.png").size[0] > 1000


def test_eval_writes_a_table_and_json_and_reuses_the_reference(trained, capsys):
    reference = trained / "eval" / "reference-digits.npz"
    before = reference.stat().st_mtime_ns
    args = ["eval", "--workdir", str(trained), "--num", "70", "--steps", "3"]
    assert cli.main(args + ["--batch-size", "35", "--quiet"]) == 0
    out = capsys.readouterr()
    result = json.loads(out.out)
    assert "digits (real test split)" in out.err and "digits (samples)" in out.err
    assert result["digits"]["n"] == 70 and result["digits"]["fd"] > 0
    assert result["digits_floor"]["fd"] < result["digits"]["fd"]
    assert result["step"] == 4 and result["sampler"] == "ddim" and result["steps"] == 3
    table = json.loads((trained / "eval" / "results.json").read_text())
    assert table["4"]["ddim3_n70_seed0"]["digits"]["fd"] == result["digits"]["fd"]
    assert (trained / "eval" / "samples-4-ddim3_n70_seed0.png").is_file()
    assert reference.stat().st_mtime_ns == before  # computed once, during training
    # the same seed gives the same figure in another batch size (each sample's noise depends on
    # its index only; round-off between batch shapes may move a pixel across a uint8 step),
    # and another seed another figure
    assert cli.main(args + ["--batch-size", "70", "--quiet"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["digits"]["fd"] == pytest.approx(result["digits"]["fd"], rel=1e-3)
    assert cli.main(args + ["--seed", "1", "--quiet"]) == 0
    other = json.loads(capsys.readouterr().out)
    assert other["digits"]["fd"] != result["digits"]["fd"]
    assert set(json.loads((trained / "eval" / "results.json").read_text())["4"]) == {
        "ddim3_n70_seed0",
        "ddim3_n70_seed1",
    }


def test_eval_bad_input_gets_one_clear_line(trained, capsys, monkeypatch):
    monkeypatch.delenv(features.INCEPTION_ENV, raising=False)
    assert cli.main(["eval", "--workdir", str(trained), "--num", "10", "--steps", "3"]) == 1
    assert "needs at least N = 65 samples" in capsys.readouterr().err
    assert cli.main(["eval", "--workdir", str(trained), "--metric", "fid", "--steps", "3"]) == 1
    err = capsys.readouterr().err
    assert "weights-inception-2015-12-05-6726825d.pth" in err and "never downloads" in err
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit):  # argparse lists the choices
        cli.main(["eval", "--workdir", str(trained), "--sampler", "plms"])
    assert (
        "invalid choice: 'plms' (choose from 'ddim', 'ddpm', 'dpmpp-2m'" in capsys.readouterr().err
    )
    assert cli.main(["eval"]) == 1
    assert "give --workdir W" in capsys.readouterr().err
    assert cli.main(["eval", "--workdir", str(trained.parent / "nothing")]) == 1
    assert "not a jaxdiff workdir" in capsys.readouterr().err


def test_eval_of_two_folders_and_saved_statistics(tmp_path, capsys):
    images = data.load_digits(16, split="train").images
    for name, part in (("a", images[:100]), ("b", images[100:200])):
        (tmp_path / name).mkdir()
        for i, im in enumerate(part):
            Image.fromarray(im[..., 0]).save(tmp_path / name / f"{i}.png")
    stats = tmp_path / "a.npz"
    args = ["eval", "--metric", "digits", "--real", str(tmp_path / "a")]
    assert cli.main(args + ["--save-stats", str(stats)]) == 0
    assert stats.is_file()
    assert cli.main(args + ["--save-stats", str(stats)]) == 1
    assert "pass --force" in capsys.readouterr().err
    both = ["eval", "--metric", "digits", "--real", str(tmp_path / "b")]
    assert cli.main([*both, str(tmp_path / "a")]) == 0
    from_folder = json.loads(capsys.readouterr().out)["digits"]["fd"]
    assert cli.main([*both, str(stats)]) == 0
    from_file = json.loads(capsys.readouterr().out)["digits"]["fd"]
    assert from_folder == pytest.approx(from_file, rel=1e-9) and from_folder > 0
    assert cli.main(["eval", "--metric", "digits", "--real", str(tmp_path / "a")] * 1) == 1
    assert "--save-stats" in capsys.readouterr().err
    bad = tmp_path / "c"
    bad.mkdir()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(bad / "x.png")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(bad / "y.png")
    assert cli.main([*both, str(bad)]) == 1
    assert "mixes image sizes or channels" in capsys.readouterr().err


def _random_inception_npz(path):
    """FID's Inception with random weights of a sane scale (so features stay finite)."""
    from jaxdiff.models import inception

    rng = np.random.default_rng(0)
    arrays = {}
    for k, e in inception.inception_key_map().items():
        shape = e.torch_shape
        if k.endswith("running_var"):
            arrays[k] = (1.0 + rng.random(shape)).astype(np.float32)
        elif k.endswith("running_mean") or k.endswith("bias"):
            arrays[k] = np.zeros(shape, np.float32)
        elif len(shape) == 1:  # batch-norm scales
            arrays[k] = np.ones(shape, np.float32)
        else:
            fan_in = int(np.prod(shape[1:]))
            arrays[k] = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
    np.savez(path, **arrays)
    return path


def test_fid_extractor_from_the_environment(tmp_path, monkeypatch):
    weights = _random_inception_npz(tmp_path / "inception.npz")
    monkeypatch.setenv(features.INCEPTION_ENV, str(weights))
    fid = features.inception_extractor()
    assert (fid.name, fid.dim, fid.channels) == ("inception", 2048, 3)
    gray = data.load_digits(16, split="test").images[:4]
    s = features.image_statistics(fid, [gray], source="gray", batch_size=4)
    rgb = features.image_statistics(fid, [np.repeat(gray, 3, -1)], source="rgb", batch_size=4)
    assert s.sample.shape == (4, 2048) and np.isfinite(s.sample).all()
    np.testing.assert_array_equal(s.sample, rgb.sample)  # grayscale is repeated to RGB
    with pytest.raises(ValueError, match=r"2048-d features needs .* at least N = 2049"):
        features.quality(s, rgb)


def test_sample_and_eval_with_the_fast_solvers(trained, tmp_path, capsys):
    for sampler, extra, name in (
        ("dpmpp-2m", [], "dpmpp-2m-linspace4"),
        ("unipc-bh2", ["--grid", "trailing"], "unipc-bh2-trailing4"),
        ("heun", [], "heun-karras4"),
    ):
        args = ["sample", "--workdir", str(trained), "--sampler", sampler, "--steps", "4",
                "--num", "4", *extra]  # fmt: skip
        assert cli.main(args) == 0, capsys.readouterr().err
        images = np.load(trained / "samples" / f"{name}_seed0.npz")["images"]
        assert images.shape == (4, 8, 8, 1) and images.dtype == np.uint8
    assert cli.main(["sample", "--workdir", str(trained), "--grid", "karras"]) == 1
    assert "--grid applies to the fast solvers" in capsys.readouterr().err
    assert cli.main(["sample", "--workdir", str(trained), "--sampler", "dpmpp-3m", "--steps",
                     "2"]) == 1  # fmt: skip
    assert "needs at least 3 steps" in capsys.readouterr().err
