"""jaxdiff.openai_script: openai's script flags read as the scripts read them, every refusal's
message, the defaults of each layout and what the flags build (no network is initialised here;
tests/parity/test_openai_script_parity.py holds the builds to the references)."""

import numpy as np
import pytest

from jaxdiff.openai_script import (
    CLASSIFIER_DEFAULTS,
    GUIDED_DEFAULTS,
    IMPROVED_DEFAULTS,
    SCRIPT_FLAGS,
    OpenAIDiffusion,
    create_classifier_and_diffusion,
    create_model_and_diffusion,
    parse_flags,
)

# ----------------------------------------------------------------------------------------------
# Parsing


def test_every_form_of_flags_parses_to_the_same_options():
    line = "--image_size 32 --dropout 0.3 --learn_sigma yes --attention_resolutions 16 --use_kl=T"
    expected = dict(
        GUIDED_DEFAULTS,
        image_size=32,
        dropout=0.3,
        learn_sigma=True,
        attention_resolutions="16",
        use_kl=True,
    )
    assert parse_flags(line) == expected
    assert parse_flags(line.split()) == expected
    mapping = {
        "image_size": 32,
        "--dropout": "0.3",
        "learn_sigma": True,
        "attention_resolutions": 16,
        "use_kl": "t",
    }
    assert parse_flags(mapping) == expected


def test_values_take_the_type_of_their_default():
    options = parse_flags(
        "--dropout 1 --num_heads_upsample -1 --num_channels ' 64 ' --timestep_respacing '' "
        "--noise_schedule cosine --class_cond 0",
        layout="improved",
    )
    assert options["dropout"] == 1.0 and type(options["dropout"]) is float
    assert options["num_heads_upsample"] == -1
    assert options["num_channels"] == 64  # int() strips, as argparse's type=int does
    assert options["timestep_respacing"] == ""
    assert options["noise_schedule"] == "cosine" and options["class_cond"] is False
    assert parse_flags("--timestep_respacing=")["timestep_respacing"] == ""
    assert parse_flags({"timestep_respacing": 250})["timestep_respacing"] == "250"
    # a flag given twice keeps its last value, as in argparse
    assert parse_flags("--image_size 64 --image_size 128")["image_size"] == 128


def test_defaults_of_each_layout():
    assert parse_flags("", layout="improved") == IMPROVED_DEFAULTS
    assert parse_flags([]) == GUIDED_DEFAULTS
    assert parse_flags({}, classifier=True) == CLASSIFIER_DEFAULTS
    # what differs between the repositories
    assert IMPROVED_DEFAULTS["rescale_timesteps"] and IMPROVED_DEFAULTS["rescale_learned_sigmas"]
    assert not GUIDED_DEFAULTS["rescale_timesteps"]
    assert not GUIDED_DEFAULTS["rescale_learned_sigmas"]
    assert "sigma_small" in IMPROVED_DEFAULTS and "sigma_small" not in GUIDED_DEFAULTS
    guided_only = {
        "num_head_channels",
        "channel_mult",
        "resblock_updown",
        "use_fp16",
        "use_new_attention_order",
    }
    assert set(GUIDED_DEFAULTS) - set(IMPROVED_DEFAULTS) == guided_only
    assert CLASSIFIER_DEFAULTS["classifier_pool"] == "attention"
    assert CLASSIFIER_DEFAULTS["classifier_attention_resolutions"] == "32,16,8"
    # parse_flags returns a copy
    parse_flags("")["image_size"] = 1
    assert GUIDED_DEFAULTS["image_size"] == 64


# ----------------------------------------------------------------------------------------------
# Refusals


def test_an_unknown_flag_is_named_with_close_matches_and_the_layouts_flags():
    with pytest.raises(ValueError) as raised:
        parse_flags("--image_sz 64", layout="improved")
    message = str(raised.value)
    assert "unknown flag --image_sz for improved-diffusion's model_and_diffusion_defaults()" in (
        message
    )
    assert "Did you mean --image_size?" in message
    assert "--sigma_small" in message and "--num_head_channels" not in message


def test_a_flag_of_the_other_layout_or_of_the_classifier_says_so():
    with pytest.raises(ValueError, match=r"--num_head_channels is a flag of guided-diffusion: "):
        parse_flags("--num_head_channels 64", layout="improved")
    with pytest.raises(ValueError, match=r"pass layout='improved'"):
        parse_flags("--sigma_small True")
    with pytest.raises(ValueError, match=r"parse it with classifier=True"):
        parse_flags("--classifier_depth 4")
    with pytest.raises(ValueError, match=r"flag of the diffusion model, not of the classifier"):
        create_classifier_and_diffusion("--num_channels 64")
    with pytest.raises(ValueError, match=r"classifier is guided-diffusion's"):
        parse_flags("", layout="improved", classifier=True)
    with pytest.raises(ValueError, match=r"layout must be one of"):
        parse_flags("", layout="openai")


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        ("--learn_sigma maybe", r"--learn_sigma takes a boolean \(yes, true, t, y, 1 or no, "),
        ("--learn_sigma on", r"--learn_sigma takes a boolean .*got 'on'"),
        ({"learn_sigma": 1}, r"--learn_sigma takes a boolean .*got 1"),
        ("--num_channels 3.5", r"--num_channels takes an integer, got '3\.5'"),
        ({"num_channels": True}, r"--num_channels takes an integer, got True"),
        ("--dropout high", r"--dropout takes a number \(float\), got 'high'"),
        ({"noise_schedule": 1.5}, r"--noise_schedule takes a string, got 1\.5"),
        ("--image_size", r"--image_size needs a value: an integer"),
        ("--class_cond --learn_sigma True", r"--class_cond needs a value: a boolean"),
        ("--dropout -x", r"--dropout needs a value: a number"),
        ("64 --image_size 64", r"unexpected argument '64': flags are written --name value"),
        ("-image_size 64", r"unexpected argument '-image_size'"),
        ("--image_size '64", r"cannot split the flags .*No closing quotation"),
        (64, r"flags must be a string .*got int"),
    ],
)
def test_bad_values_name_the_flag_and_the_type(flags, match):
    with pytest.raises(ValueError, match=match):
        parse_flags(flags)


@pytest.mark.parametrize("name", SCRIPT_FLAGS)
def test_the_scripts_own_flags_are_refused_as_jaxdiffs_options(name):
    with pytest.raises(ValueError) as raised:
        parse_flags(f"--image_size 64 --{name} 1")
    message = str(raised.value)
    assert f"--{name} is a flag of openai's sampling scripts" in message
    assert f"(jaxdiff's option: {SCRIPT_FLAGS[name]})" in message
    with pytest.raises(ValueError, match="jaxdiff's option"):
        create_classifier_and_diffusion({name: "1"})


def test_script_flags_are_the_sampling_scripts_flags():
    assert set(SCRIPT_FLAGS) == {
        "clip_denoised",
        "num_samples",
        "batch_size",
        "use_ddim",
        "model_path",
        "classifier_path",
        "classifier_scale",
        "data_dir",
    }
    assert not set(SCRIPT_FLAGS) & (set(GUIDED_DEFAULTS) | set(CLASSIFIER_DEFAULTS))


# ----------------------------------------------------------------------------------------------
# The network


def test_channel_mult_by_image_size_differs_between_the_repositories():
    def mult(size, layout, extra=""):
        return create_model_and_diffusion(f"--image_size {size} {extra}", layout=layout)[0]

    assert mult(32, "improved").channel_mult == (1, 2, 2, 2)
    assert mult(64, "improved").channel_mult == mult(64, "guided").channel_mult == (1, 2, 3, 4)
    assert mult(256, "improved").channel_mult == mult(256, "guided").channel_mult
    assert mult(128, "guided").channel_mult == (1, 1, 2, 3, 4)
    assert mult(512, "guided", "--num_channels 256").channel_mult == (0.5, 1, 1, 2, 2, 4, 4)
    assert mult(32, "guided", "--channel_mult 1,2").channel_mult == (1, 2)
    with pytest.raises(ValueError, match=r"unsupported --image_size 128 for improved-diffusion"):
        mult(128, "improved")
    with pytest.raises(ValueError, match=r"unsupported --image_size 32 for guided-diffusion's"):
        mult(32, "guided")
    with pytest.raises(ValueError, match=r"any size with --channel_mult"):
        mult(48, "guided")
    with pytest.raises(ValueError, match=r"--channel_mult takes comma-separated integers"):
        mult(32, "guided", "--channel_mult 0.5,1")
    classifier = create_classifier_and_diffusion("--image_size 512")[0]
    assert classifier.channel_mult == (0.5, 1, 1, 2, 2, 4, 4)
    with pytest.raises(ValueError, match=r"unsupported --image_size 32 for guided-diffusion's"):
        create_classifier_and_diffusion("--image_size 32")


def test_the_network_gets_create_models_arguments():
    model, _ = create_model_and_diffusion(
        "--image_size 64 --num_channels 64 --attention_resolutions 32,16,8,128 --learn_sigma True "
        "--class_cond True --dropout 0.1 --num_head_channels 32 --resblock_updown True "
        "--use_new_attention_order True --use_checkpoint True"
    )
    assert model.attention_resolutions == (2, 4, 8)  # 64 // 128 = 0 matches no level
    assert (model.in_channels, model.out_channels, model.num_classes) == (3, 6, 1000)
    assert (model.model_channels, model.dropout, model.num_head_channels) == (64, 0.1, 32)
    assert model.resblock_updown and model.use_new_attention_order
    assert model.layout == "guided" and model.image_size == 64
    improved, _ = create_model_and_diffusion("--image_size 32", layout="improved")
    assert improved.layout == "improved" and improved.out_channels == 3
    assert improved.num_classes is None and improved.attention_resolutions == (2, 4)
    for bad in ("", "16,x", "0", "-8"):
        with pytest.raises(ValueError, match=r"--attention_resolutions takes comma-separated"):
            create_model_and_diffusion({"attention_resolutions": bad})
    with pytest.raises(ValueError, match=r"flags give a UNetModel that cannot be built: .*heads"):
        create_model_and_diffusion("--num_heads 3")


def test_the_classifier_gets_create_classifiers_arguments():
    classifier, diffusion = create_classifier_and_diffusion(
        "--image_size 128 --classifier_depth 4 --classifier_pool adaptive "
        "--classifier_attention_resolutions 16"
    )
    assert (classifier.out_channels, classifier.num_head_channels) == (1000, 64)
    assert (classifier.model_channels, classifier.num_res_blocks) == (128, 4)
    assert classifier.attention_resolutions == (8,) and classifier.pool == "adaptive"
    assert classifier.use_scale_shift_norm and classifier.resblock_updown
    assert diffusion.config.var_type == "fixed_large" and diffusion.config.loss_type == "mse"
    with pytest.raises(ValueError, match=r"EncoderUNetModel that cannot be built: pool must be"):
        create_classifier_and_diffusion("--classifier_pool max")


def test_use_fp16_gives_bfloat16_unless_dtype_is_given():
    assert create_model_and_diffusion("--use_fp16 True")[0].dtype == "bfloat16"
    assert create_model_and_diffusion("--use_fp16 False")[0].dtype is None
    assert create_model_and_diffusion("--use_fp16 True", dtype="float32")[0].dtype == "float32"
    assert create_model_and_diffusion("", dtype="bfloat16")[0].dtype == "bfloat16"
    classifier = create_classifier_and_diffusion("--classifier_use_fp16 True")[0]
    assert classifier.dtype == "bfloat16"
    with pytest.raises(ValueError, match="unknown flag --use_fp16 for improved"):
        create_model_and_diffusion("--use_fp16 True", layout="improved")


# ----------------------------------------------------------------------------------------------
# The process


RESCALED = "--rescale_learned_sigmas 1"


@pytest.mark.parametrize(
    ("layout", "flags", "expected"),
    [
        ("improved", "", ("eps", "fixed_large", "rescaled_mse")),
        ("guided", "", ("eps", "fixed_large", "mse")),
        ("improved", "--sigma_small True", ("eps", "fixed_small", "rescaled_mse")),
        ("improved", "--learn_sigma T --sigma_small T", ("eps", "learned_range", "rescaled_mse")),
        ("improved", "--learn_sigma T --use_kl T", ("eps", "learned_range", "rescaled_kl")),
        ("guided", f"--use_kl True {RESCALED}", ("eps", "fixed_large", "rescaled_kl")),
        ("guided", f"--predict_xstart True {RESCALED}", ("x0", "fixed_large", "rescaled_mse")),
    ],
)  # fmt: skip
def test_create_gaussian_diffusions_choices(layout, flags, expected):
    _, diffusion = create_model_and_diffusion(flags, layout=layout)
    d = diffusion.config
    assert isinstance(diffusion, OpenAIDiffusion) and d.loss == "openai"
    assert (d.objective, d.var_type, d.loss_type) == expected
    assert d.rescale_timesteps is (layout == "improved")  # the layouts' defaults
    assert (d.schedule, d.timesteps) == ("linear", 1000)


def test_respacing_and_the_networks_times():
    _, full = create_model_and_diffusion("--diffusion_steps 4000", layout="improved")
    assert full.respacing is None and full.coeffs.num_timesteps == 4000
    np.testing.assert_array_equal(full.coeffs.model_times[:3], [0.0, 0.25, 0.5])  # x 1000 / T
    _, spaced = create_model_and_diffusion("--noise_schedule cosine --timestep_respacing ddim25")
    assert spaced.respacing == "ddim25" and spaced.coeffs.num_timesteps == 25
    np.testing.assert_array_equal(spaced.coeffs.model_times[:3], [0.0, 40.0, 80.0])
    assert spaced.config.schedule == "cosine"


def test_process_flags_are_checked():
    with pytest.raises(ValueError, match=r"unknown --noise_schedule 'sigmoid'.*linear and cosine"):
        create_model_and_diffusion("--noise_schedule sigmoid")
    with pytest.raises(ValueError, match=r"--diffusion_steps must be a positive integer, got 0"):
        create_model_and_diffusion("--diffusion_steps 0")
    with pytest.raises(ValueError, match=r"'ddim30' cannot be met"):
        create_model_and_diffusion("--timestep_respacing ddim30 --diffusion_steps 100")
