"""The typed configuration read from files and workdirs, and how ``jaxdiff train`` resolves it."""

import dataclasses
import json

import pytest

from jaxdiff import cli
from jaxdiff.config import PRESETS, Config, config_from_dict, load_config, load_config_file


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_config_round_trips_through_its_dict(name, tmp_path):
    preset = PRESETS[name]
    assert config_from_dict(json.loads(json.dumps(preset.to_dict()))) == preset
    (tmp_path / "config.json").write_text(json.dumps(preset.to_dict()))
    assert load_config(tmp_path) == preset


def test_a_partial_file_changes_only_what_it_names(tmp_path):
    base = PRESETS["digits32"]
    path = tmp_path / "c.toml"
    path.write_text("[model]\ndim = 8\n[run]\nlr = 1\n[diffusion]\nmin_snr_gamma = 5\n")
    config = load_config_file(path, base=base)
    assert config.model == dataclasses.replace(base.model, dim=8)
    assert config.run == dataclasses.replace(base.run, lr=1.0)
    assert isinstance(config.run.lr, float) and config.diffusion.min_snr_gamma == 5.0
    assert config.data == base.data
    json_path = tmp_path / "c.json"
    json_path.write_text(json.dumps({"model": {"dim_mults": [1, 2]}}))
    assert load_config_file(json_path).model.dim_mults == (1, 2)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"model": {"dimm": 3}}, "unknown model key(s) ['dimm']"),
        ({"modell": {}}, "unknown key(s) ['modell']"),
        ({"model": {"dim": "16"}}, "model.dim must be int, got '16'"),
        ({"model": {"dim": True}}, "model.dim must be int, got True"),
        ({"model": {"dim": 16.0}}, "model.dim must be int, got 16.0"),
        ({"model": {"dim_mults": [1, "2"]}}, "model.dim_mults must be"),
        ({"run": {"lr": None}}, "run.lr must be float, got None"),
        ({"data": {"flip": 1}}, "data.flip must be bool"),
        ({"diffusion": {"schedule": "foo"}}, "diffusion.schedule must be one of"),
        ({"run": [1]}, "run must be a mapping"),
    ],
)
def test_bad_values_are_named(values, message):
    with pytest.raises(ValueError) as info:
        config_from_dict(values)
    assert message in str(info.value)


def test_unreadable_files_are_named(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_config_file(tmp_path / "none.json")
    broken = tmp_path / "broken.toml"
    broken.write_text("[model\n")
    with pytest.raises(ValueError, match="broken.toml' is not valid TOML"):
        load_config_file(broken)
    (tmp_path / "config.json").write_text('{"model": {"dim": "x"}}')
    with pytest.raises(ValueError, match="not a valid jaxdiff config: model.dim must be int"):
        load_config(tmp_path)


def _printed(capsys, *argv) -> Config:
    assert cli.main(["train", *argv, "--print-config"]) == 0
    return config_from_dict(json.loads(capsys.readouterr().out))


def test_train_resolves_preset_file_workdir_and_flags(tmp_path, capsys):
    assert _printed(capsys, "--workdir", str(tmp_path / "new")) == PRESETS["digits"]
    assert not (tmp_path / "new").exists()  # printing writes nothing
    assert _printed(capsys, "--preset", "digits32").model == PRESETS["digits32"].model

    file = tmp_path / "c.json"
    file.write_text(json.dumps({"model": {"dim": 8}}))
    got = _printed(capsys, "--preset", "digits32", "--config", str(file), "--steps", "7")
    assert got.model.dim == 8 and got.data.image_size == 32 and got.run.steps == 7

    # a workdir's own config.json is the run: flags change only what they name
    workdir = tmp_path / "run"
    workdir.mkdir()
    saved = dataclasses.replace(PRESETS["digits"], model=dataclasses.replace(
        PRESETS["digits"].model, dim=24))  # fmt: skip
    (workdir / "config.json").write_text(json.dumps(saved.to_dict()))
    got = _printed(capsys, "--workdir", str(workdir), "--steps", "11")
    assert got.model.dim == 24 and got.run.steps == 11
    # an explicit preset is a new configuration (the checkpoints then refuse it)
    assert _printed(capsys, "--workdir", str(workdir), "--preset", "digits").model.dim == 16


def test_train_reports_a_bad_config_file_without_a_traceback(tmp_path, capsys):
    file = tmp_path / "c.json"
    file.write_text(json.dumps({"model": {"dim": "16"}}))
    assert cli.main(["train", "--workdir", str(tmp_path / "w"), "--config", str(file)]) == 1
    err = capsys.readouterr().err
    assert "model.dim must be int" in err and "Traceback" not in err
    assert not (tmp_path / "w").exists()


def test_every_preset_is_described_in_the_help(capsys):
    from jaxdiff.config import PRESET_HELP

    assert set(PRESET_HELP) == set(PRESETS)
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for name in PRESETS:
        assert f"{name}, " in out


def test_openai_arch_builds_the_unet_model_and_leaves_lucid_identities_alone():
    import jax
    import jax.numpy as jnp

    from jaxdiff import workdir as wd

    # workdirs written before the option keep matching: a lucid config names no openai field
    model_keys = set(PRESETS["digits"].identity()["model"])
    assert "arch" not in model_keys and "num_res_blocks" not in model_keys
    config = PRESETS["digits-openai"]
    assert config.identity()["model"]["arch"] == "openai"
    model = wd.build_model(config)
    net = model.net
    # 16x16 images: attention at 8x8 and 4x4 is at down-sampling rates 2 and 4
    assert net.attention_resolutions == (2, 4)
    assert (net.model_channels, net.channel_mult, net.num_res_blocks) == (32, (1, 2, 2), 1)
    assert net.out_channels == 2  # learned range variance of a grayscale image
    labelled = wd.build_model(config_from_dict({"model": {"num_classes": 3, "cond_drop_prob": 0.0}},
                                               config))  # fmt: skip
    x, t = jnp.zeros((2, 16, 16, 1)), jnp.array([0, 5])
    variables = labelled.init(jax.random.PRNGKey(0), x, t, label=jnp.array([0, 2]))
    assert "label_emb" in variables["params"]
    out = labelled.apply(variables, x, t, label=jnp.array([0, 2]))
    assert out.shape == (2, 16, 16, 2)
    with pytest.raises(ValueError, match="class"):
        labelled.apply(variables, x, t)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"model": {"arch": "openai", "dim": 48}}, "multiple of 32"),
        ({"model": {"arch": "openai", "dim": 32, "num_classes": 4}}, "--cond-drop-prob 0"),
        ({"model": {"arch": "openai", "dim": 32, "num_mem_kv": 2}}, "num_mem_kv"),
        ({"model": {"arch": "openai", "dim": 32, "attention_resolutions": [32]}}, "no level"),
        ({"model": {"use_new_attention_order": True}}, "--arch openai"),
        ({"model": {"arch": "flax"}}, "one of"),
    ],
)
def test_openai_arch_options_are_checked(values, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict(values)
