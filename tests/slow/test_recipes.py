"""Every loss type, variance type and optimiser option reachable from ``jaxdiff train``, end to
end on a tiny configuration: it trains from a fresh workdir, resumes exactly (a run stopped at
step 2 and continued to 4 ends with the parameters of a run that went to 4 at once), samples
with its own process and evaluates bits/dim with its own variance."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from jaxdiff import checkpoint, cli, convert_openai
from jaxdiff import config as cfg
from jaxdiff import workdir as wd
from tests.slow._xla_cache import CACHE
from tests.slow.test_cli_end_to_end import TINY, _jaxdiff

pytestmark = pytest.mark.slow

RECIPES = {
    # the presets: improved DDPM's L_hybrid and L_vlb with importance sampling of t, the
    # continuous-time v model, the class-conditional model
    "hybrid": ["--preset", "digits-hybrid"],
    "vlb_importance": ["--preset", "digits-vlb"],
    "continuous_v_preset": ["--preset", "digits-continuous"],
    "class_conditional": ["--preset", "digits-cond"],
    # openai's UNetModel: the preset (L_hybrid), and class-conditional with its other options
    "openai_preset": ["--preset", "digits-openai", "--dim", "32", "--attention-resolutions", "4"],
    "openai_class_conditional": [
        "--arch", "openai", "--dim", "32", "--num-res-blocks", "1", "--attention-resolutions",
        "8,4", "--num-classes", "10", "--cond-drop-prob", "0", "--resblock-updown",
        "--use-new-attention-order", "--num-head-channels", "16", "--dropout", "0.1",
    ],
    "learned_kl": ["--loss", "openai", "--var-type", "learned", "--loss-type", "kl"],
    "prev_x_fixed_large": [
        "--loss", "openai", "--objective", "prev_x", "--var-type", "fixed_large",
        "--loss-type", "rescaled_mse", "--rescale-timesteps",
    ],
    "continuous_v": ["--loss", "continuous", "--objective", "v", "--log-snr-shift", "0.5"],
    "x0_selfcond_offset_minsnr": [
        "--objective", "x0", "--self-condition", "--offset-noise-strength", "0.1",
        "--min-snr-gamma", "5",
    ],
    "v_adamw_cosine_accum": [
        "--objective", "v", "--optimizer", "adamw", "--weight-decay", "0.01", "--lr-decay",
        "cosine", "--warmup-steps", "2", "--decay-steps", "4", "--grad-accum-steps", "2",
        "--ema-update-every", "1",
        "--ema-update-after-step", "1",
    ],
}  # fmt: skip


def _train(workdir, steps, flags):
    args = ["train", "--workdir", str(workdir), "--steps", str(steps), "--save-every", "2",
            "--compilation-cache", CACHE, *TINY, *flags]  # fmt: skip
    result = _jaxdiff(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_trains_resumes_samples_and_evaluates(tmp_path, recipe):
    flags = RECIPES[recipe]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _train(straight, 4, flags)
    _train(resumed, 2, flags)
    again = _jaxdiff("train", "--workdir", str(resumed), "--steps", "4")  # config.json's flags
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from the checkpoint of step 2" in again.stderr
    config, _, a = wd.restored(straight, None)
    if flags[0] == "--preset":  # the preset's recipe, at the tiny size
        preset = cfg.PRESETS[flags[1]]
        assert config.diffusion == dataclasses.replace(preset.diffusion, timesteps=20)
        assert config.model.num_classes == preset.model.num_classes
    _, _, b = wd.restored(resumed, None)
    assert int(a.step) == int(b.step) == 4 == checkpoint.latest_step(resumed)
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)

    # the recipe is the one asked for, and its per-quartile losses are logged
    saved = cfg.load_config(straight)
    assert saved == config and cfg.validate(saved) is saved
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in rows)
    if config.diffusion.loss != "continuous":
        # logged (null in a window whose batches drew no t of that quarter)
        assert all(f"loss_q{q}" in r for r in rows for q in range(4))
        assert any(r[f"loss_q{q}"] is not None for r in rows for q in range(4))
    d = config.diffusion
    if d.loss == "openai" and "mse" in d.loss_type:
        assert all(r["mse"] is not None for r in rows)
        if d.var_type.startswith("learned"):  # L_hybrid's second term
            assert all(r["vb"] is not None for r in rows)
    if config.optim.lr_decay == "cosine":
        assert config.optim.decay_steps == 4
        lrs = [r["learning_rate"] for r in rows]
        # warming up at step 2, decayed at step 4: below the peak either way (0.5 lr both)
        assert all(0 <= lr < config.run.lr for lr in lrs)

    conditional = config.model.num_classes is not None
    openai = config.model.arch == "openai"
    label = ["--class", "3"] + ([] if openai else ["--guidance-scale", "3"]) if conditional else []
    for sampler in (["--sampler", "ddim", "--steps", "3"], ["--sampler", "ddpm", "--steps", "5"]):
        out = tmp_path / f"s_{sampler[1]}"
        result = _jaxdiff("sample", "--workdir", str(straight), "--num", "4", "--out", str(out),
                          *sampler, *label)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        images = np.load(out.with_suffix(".npz"))["images"]
        assert images.shape == (4, 8, 8, 1) and images.dtype == np.uint8

    if openai:  # exports as the state_dict of guided-diffusion's UNetModel
        result = _jaxdiff("export", "--workdir", str(straight), "--out", str(tmp_path / "e.npz"))
        assert result.returncode == 0, result.stderr[-3000:]
        assert "guided-diffusion's UNetModel(**" in result.stdout
        _, model, state = wd.restored(straight, None)
        exported = dict(np.load(tmp_path / "e.npz"))
        back = convert_openai.openai_state_dict_to_params(exported, model.net)
        for x, y in zip(_leaves(back), _leaves(state.ema_params), strict=True):
            np.testing.assert_array_equal(x, y)
    elif conditional:  # exports as the reference's class-conditional Unet
        result = _jaxdiff("export", "--workdir", str(straight), "--out", str(tmp_path / "e.npz"))
        assert result.returncode == 0, result.stderr[-3000:]
        assert "classifier_free_guidance.Unet(**" in result.stdout and '"num_classes": 10' in (
            result.stdout
        )

    result = _jaxdiff("bpd", "--workdir", str(straight), "--quiet")
    if config.diffusion.loss == "continuous":
        assert result.returncode == 1 and "continuous-time" in result.stderr
        assert "Traceback" not in result.stderr
        return
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["var_type"] == config.diffusion.var_type
    assert 0 < report["bits_per_dim"] < 1000  # 4 steps of training: finite, not small


def test_bad_recipe_flags_are_named_before_anything_runs(tmp_path):
    workdir = tmp_path / "w"
    cases = [
        (["--var-type", "learned_range"], "--loss openai"),
        (["--loss", "openai", "--objective", "v"], "v needs --loss simple or continuous"),
        (["--loss", "continuous", "--timestep-sampler", "loss-second-moment"], "discrete"),
        (["--weight-decay", "0.1"], "--optimizer adamw"),
        (["--grad-accum-steps", "3"], "not divisible by grad_accum_steps"),
        (["--num-classes", "10", "--self-condition"], "no self-conditioning"),
        (["--loss", "nope"], "invalid choice"),
        (["--arch", "openai", "--dim", "16"], "multiple of 32"),
        (
            [
                "--arch",
                "openai",
                "--dim",
                "32",
                "--attention-resolutions",
                "4",
                "--num-classes",
                "10",
            ],
            "--cond-drop-prob 0",
        ),
        (
            ["--arch", "openai", "--dim", "32", "--attention-resolutions", "4", "--self-condition"],
            "options of the lucid Unet",
        ),
        (["--num-res-blocks", "3"], "pass --arch openai"),
        (["--arch", "openai", "--dim", "32", "--attention-resolutions", "16"], "no level"),
    ]
    for flags, message in cases:
        result = _jaxdiff("train", "--workdir", str(workdir), *TINY, *flags)
        assert result.returncode != 0 and message in result.stderr, (flags, result.stderr)
        assert "Traceback" not in result.stderr
    assert not workdir.exists()


def test_sampling_and_bpd_refuse_what_the_model_was_not_trained_for(tmp_path):
    """A learned-variance model with a fixed-variance flag; an unconditional model given a
    class; a conditional model without one, with a label out of range, and guided without
    label dropout: each a clear error, and nothing written."""
    learned, cond = tmp_path / "learned", tmp_path / "cond"
    _train(learned, 2, RECIPES["hybrid"])
    _train(cond, 2, ["--num-classes", "10", "--cond-drop-prob", "0"])
    out = tmp_path / "nothing"
    learned_its = "learned its variance"
    cases = [
        (["sample", "--workdir", str(learned), "--var-type", "fixed_small"], learned_its),
        (["bpd", "--workdir", str(learned), "--var-type", "fixed_large"], learned_its),
        (["sample", "--workdir", str(learned), "--class", "3"], "unconditional"),
        (["sample", "--workdir", str(cond)], "class-conditional (10 classes)"),
        (["sample", "--workdir", str(cond), "--class", "10"], "in [0, 10)"),
        (["sample", "--workdir", str(cond), "--class", "2", "--guidance-scale", "3"],
         "label dropout"),
    ]  # fmt: skip
    for args, message in cases:
        result = _jaxdiff(*args, "--out", str(out)) if args[0] == "sample" else _jaxdiff(*args)
        assert result.returncode == 1 and message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert not out.with_suffix(".png").exists()
    # a grid with one row per class
    grid = tmp_path / "grid"
    assert cli.main(["sample", "--workdir", str(cond), "--class", "all", "--num", "2",
                     "--steps", "2", "--out", str(grid)]) == 0  # fmt: skip
    saved = np.load(grid.with_suffix(".npz"))
    assert saved["images"].shape == (20, 8, 8, 1)
    np.testing.assert_array_equal(saved["labels"], np.repeat(np.arange(10), 2))
