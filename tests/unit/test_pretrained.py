"""``jaxdiff sample`` and ``jaxdiff bpd`` on openai checkpoints (``--openai-checkpoint``), from
randomly initialised networks written as their state_dicts (.npz, no torch): the command's
samples are the library's (``ddpm_sample`` / ``ddim_sample`` on the respaced process of the
flags, with the same noise), classifier guidance moves them, bits/dim runs over the respaced
chain, and every wrong input is a short error naming the file or the flag."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxdiff import cli, convert_openai, openai_script, pretrained, samplers

MODEL_FLAGS = (
    "--image_size 32 --num_channels 32 --num_res_blocks 1 "
    "--attention_resolutions 16 --learn_sigma True --diffusion_steps 40 "
    "--noise_schedule cosine --timestep_respacing 4 --class_cond True"
)
CLASSIFIER_FLAGS = (
    "--image_size 64 --classifier_width 32 --classifier_depth 1 "
    "--classifier_attention_resolutions 8 --diffusion_steps 40 --noise_schedule cosine"
)
GUIDED_FLAGS = (  # a 64x64 model, the smallest size guided-diffusion's classifier has
    "--image_size 64 --num_channels 32 --num_res_blocks 1 --attention_resolutions 8 "
    "--learn_sigma True --diffusion_steps 40 --noise_schedule cosine --timestep_respacing 3"
)


def _perturbed(variables, seed):
    """Every parameter moved off its initial value: zero-initialised output layers would
    otherwise make the network output zero whatever the mapping."""
    leaves, tree = jax.tree_util.tree_flatten(variables)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    moved = [
        leaf + 0.05 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree_util.tree_unflatten(tree, moved)


def _write(tmp_path, name, net, seed, *inputs):
    variables = _perturbed(net.init(jax.random.PRNGKey(seed), *inputs), seed)
    state = convert_openai.params_to_openai_state_dict(variables, net)
    path = tmp_path / f"{name}.npz"
    np.savez(path, **state)
    return path, variables


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("openai")
    net, _ = openai_script.create_model_and_diffusion(MODEL_FLAGS, layout="improved")
    x = jnp.zeros((1, 32, 32, 3))
    path, variables = _write(tmp, "model", net, 0, x, jnp.zeros(1), jnp.zeros(1, jnp.int32))
    return path, net, variables


@pytest.fixture(scope="module")
def guided_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("guided")
    net, _ = openai_script.create_model_and_diffusion(GUIDED_FLAGS, layout="guided")
    x = jnp.zeros((1, 64, 64, 3))
    model, _ = _write(tmp, "model", net, 1, x, jnp.zeros(1))
    clf, _ = openai_script.create_classifier_and_diffusion(CLASSIFIER_FLAGS)
    classifier, _ = _write(tmp, "classifier", clf, 2, x, jnp.zeros(1))
    return model, classifier


def _run(capsys, *argv):
    code = cli.main([argv[0], "--compilation-cache", "none", *map(str, argv[1:])])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _sample(capsys, path, out, *extra, flags=MODEL_FLAGS, layout="improved"):
    return _run(
        capsys, "sample", "--openai-checkpoint", path, "--openai-layout", layout,
        "--openai-flags", flags, "--out", out, "--quiet", *extra,
    )  # fmt: skip


def test_sample_is_the_library_ddpm_on_the_flags_respaced_process(model_file, tmp_path, capsys):
    path, net, variables = model_file
    code, out, err = _sample(capsys, path, tmp_path / "s", "--num", "3", "--class", "5")
    assert code == 0, err
    saved = np.load(tmp_path / "s.npz")
    assert saved["arr_0"].shape == (3, 32, 32, 3) and saved["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(saved["arr_1"], [5, 5, 5])
    assert (tmp_path / "s.png").is_file()

    # the same chain through the library: the respaced ("4") learned-range DDPM with the
    # noise jaxdiff.workdir.sample_fn draws (x_T row j from fold_in(key, j))
    _, diffusion = openai_script.create_model_and_diffusion(MODEL_FLAGS, layout="improved")
    assert diffusion.coeffs.num_timesteps == 4
    key = jax.random.PRNGKey(0)
    x_T = jnp.stack([jax.random.normal(jax.random.fold_in(key, j), (32, 32, 3)) for j in range(3)])
    y = jnp.full(3, 5, jnp.int32)
    result = samplers.ddpm_sample(
        lambda x, t: net.apply(variables, x, t, y),
        diffusion.coeffs,
        x_T,
        key=jax.random.fold_in(key, jnp.uint32(2**32 - 1)),
        mean_type="eps",
        var_type="learned_range",
    )
    expected = np.clip(np.rint((np.asarray(result.sample) + 1) * 127.5), 0, 255)
    assert np.abs(saved["arr_0"].astype(int) - expected.astype(int)).max() <= 1


def test_ddim_in_batches_gives_the_same_images(model_file, tmp_path, capsys):
    path, _, _ = model_file
    common = ("--sampler", "ddim", "--num", "3", "--class", "1")
    assert _sample(capsys, path, tmp_path / "a", *common)[0] == 0
    assert _sample(capsys, path, tmp_path / "b", *common, "--batch-size", "2")[0] == 0
    a, b = np.load(tmp_path / "a.npz")["arr_0"], np.load(tmp_path / "b.npz")["arr_0"]
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_classifier_guidance_moves_the_samples(guided_files, tmp_path, capsys):
    model, classifier = guided_files
    guided = ("--classifier-checkpoint", classifier, "--classifier-flags", CLASSIFIER_FLAGS)
    common = ("--num", "2", "--sampler", "ddim")
    runs = {}
    for name, extra in [
        ("plain", ()),  # an unconditional model takes no --class without a classifier
        ("scale0", (*guided, "--class", "3", "--classifier-scale", "0")),
        ("scale50", (*guided, "--class", "3", "--classifier_scale", "50")),
    ]:
        code, _, err = _sample(
            capsys, model, tmp_path / name, *common, *extra, flags=GUIDED_FLAGS, layout="guided"
        )
        assert code == 0, err
        runs[name] = np.load(tmp_path / f"{name}.npz")["arr_0"].astype(int)
    assert np.abs(runs["scale0"] - runs["plain"]).max() <= 1
    assert np.abs(runs["scale50"] - runs["plain"]).max() > 10


def test_bpd_on_an_image_folder(model_file, tmp_path, capsys):
    path, _, _ = model_file
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ["a_0.png", "a_1.png", "b_0.png"]:
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / name)
    code, out, err = _run(
        capsys, "bpd", "--openai-checkpoint", path, "--openai-layout", "improved",
        "--openai-flags", MODEL_FLAGS, "--data-dir", folder, "--quiet", "--batch-size", "2",
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    assert result["images"] == 3 and result["timesteps"] == 4 and result["step"] == 0
    assert np.isfinite(result["bits_per_dim"]) and result["bits_per_dim"] > 0
    np.testing.assert_array_equal(pretrained.file_name_labels(sorted(folder.iterdir())), [0, 0, 1])


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--openai-layout", "guided"), "image_size"),  # improved's 32 px multipliers
        (("--openai-layout", "improved", "--openai-flags", "--image_size 32"), "model.npz"),
        (("--openai-flags", MODEL_FLAGS), "--openai-layout improved or guided"),
        (("--openai-layout", "improved", "--openai-flags", "--batch_size 4"), "--batch-size"),
        (("--openai-layout", "improved", "--openai-flags", MODEL_FLAGS, "--workdir", "w"),
         "--workdir DIR"),
        (("--openai-layout", "improved", "--openai-flags", MODEL_FLAGS, "--step", "3"),
         "--step"),
    ],
)  # fmt: skip
def test_wrong_input_is_one_clear_line(model_file, tmp_path, capsys, extra, message):
    path, _, _ = model_file
    code, _, err = _run(
        capsys, "sample", "--openai-checkpoint", path, "--out", tmp_path / "x", *extra
    )
    assert code == 1 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 3


def test_a_checkpoint_of_another_configuration_names_the_keys(model_file, tmp_path, capsys):
    path, _, _ = model_file
    flags = MODEL_FLAGS.replace("--class_cond True", "--class_cond False")
    code, _, err = _sample(capsys, path, tmp_path / "x", flags=flags)
    assert code == 1 and str(path) in err and "label_emb.weight" in err


@pytest.mark.parametrize("content", [b"", b"junk" * 10, None])
def test_a_corrupt_or_missing_file_is_named(tmp_path, capsys, content):
    path = tmp_path / "broken.npz"
    if content is not None:
        path.write_bytes(content)
    code, _, err = _sample(capsys, path, tmp_path / "x")
    assert code == 1 and "broken.npz" in err and "Traceback" not in err


def test_a_classifier_of_another_image_size_is_refused(model_file, guided_files, tmp_path, capsys):
    path, _, _ = model_file
    _, classifier = guided_files
    code, _, err = _sample(
        capsys, path, tmp_path / "x", "--classifier-checkpoint", classifier,
        "--classifier-flags", CLASSIFIER_FLAGS,
    )  # fmt: skip
    assert code == 1 and "64x64" in err and "32x32" in err


def test_a_fast_solver_samples_an_openai_checkpoint(model_file, tmp_path, capsys):
    path, _, _ = model_file
    code, out, err = _sample(
        capsys, path, tmp_path / "f", "--sampler", "dpmpp-2m", "--steps", "3", "--num", "2"
    )
    assert code == 0, err
    saved = np.load(tmp_path / "f.npz")
    assert saved["arr_0"].shape == (2, 32, 32, 3) and saved["arr_0"].std() > 0
    np.testing.assert_array_equal(saved["arr_1"], [0, 1])  # no --class: sample j has class j


def test_a_pt_checkpoint_reads_as_its_npz(model_file, tmp_path, capsys):
    pytest.importorskip("torch", reason="reading a .pt file needs torch (the parity extra)")
    path, net, variables = model_file
    pt = tmp_path / "model.pt"
    convert_openai.save_openai_pt(pt, dict(np.load(path)))
    loaded, _ = pretrained.load_model(pt, MODEL_FLAGS, layout="improved")
    for a, b in zip(
        jax.tree_util.tree_leaves(loaded.params), jax.tree_util.tree_leaves(variables), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_readmes_openai_commands_build_the_released_networks():
    """The --openai-flags of the README's commands build the networks of the checkpoints they
    name (the parameter counts of improved-diffusion's CIFAR-10 model, 52.5M, and
    guided-diffusion's ImageNet-64 model, 296M), and the classifier's flags build."""
    import pathlib
    import re

    readme = (pathlib.Path(__file__).parents[2] / "README.md").read_text()
    text = readme.replace("\\\n", " ")
    sizes = {}
    for line in re.findall(r"jaxdiff (?:sample|bpd) --openai-checkpoint [^\n]*", text):
        flags = re.search(r'--openai-flags "([^"]*)"', line).group(1)
        if flags == "...":
            continue
        layout = re.search(r"--openai-layout (\w+)", line).group(1)
        net, _ = openai_script.create_model_and_diffusion(flags, layout=layout)
        size = net.image_size or openai_script.parse_flags(flags, layout=layout)["image_size"]
        args = [jnp.zeros((1, size, size, 3)), jnp.zeros(1)]
        if net.num_classes:
            args.append(jnp.zeros(1, jnp.int32))
        shapes = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), *args))  # noqa: B023
        sizes[line.split()[3]] = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
        classifier = re.search(r'--classifier-flags "([^"]*)"', line)
        if classifier:
            clf, _ = openai_script.create_classifier_and_diffusion(classifier.group(1))
            assert clf.out_channels == 1000
    assert len(sizes) == 2, sizes
    assert round(sizes["cifar10_uncond_50M_500K.pt"] / 1e6, 1) == 52.5
    assert round(sizes["64x64_diffusion.pt"] / 1e6) == 296
