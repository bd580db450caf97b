"""jaxdiff's train step trains as denoising-diffusion-pytorch's ``Trainer`` loop does.

``fixtures/training.npz`` (``generate_training_fixtures.py``) holds the reference's loop run step by
step on drawn timesteps and noise: Adam (0.9, 0.99) after ``clip_grad_norm_`` (or none), and
ema-pytorch's ``EMA`` with a short warm-up so that copies and decays both occur. Here
``make_train_step`` with ``default_optimizer`` and ``ema_pytorch_decay`` is fed the same initial
weights (converted from the reference's state_dict), the same batches, timesteps and noise, and
must give the same loss and gradient norm at every step and the same online and EMA weights.

Training amplifies float32 rounding (kernels that sum in another order): at the digits
preset's learning rate (1e-3) a perturbation of 2e-7 of the initial weights grows to ~1e-5
(relative, whole network) within 100 steps and ~1e-3 within 150, in jaxdiff alone as between
jaxdiff and torch, so the fixture's cases train at 1e-4 (the Trainer's default) and 3e-4, where
60 steps stay in the range in which the two runs agree to ~1e-7. The tolerances below are ~10x
the errors measured (``python -m pytest tests/parity/test_training_parity.py -s -n 0`` prints
them).
"""

import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxdiff import gaussian, losses, schedules, train
from jaxdiff.convert import torch_state_dict_to_flax
from jaxdiff.models import unet_from_config
from tests.parity._fixtures import FIXTURES, load, nhwc
from tests.parity.test_unet_parity import HERE, PYTHON, _reference_available

ARRAYS, META = load("training")
OBJECTIVES = {"pred_noise": "eps", "pred_v": "v", "pred_x0": "x0"}
# Worst errors measured over both cases, every step: loss 3.5e-7 relative, gradient norm 8.8e-6
# (a norm of gradients that partly cancel), weights 8.6e-8 (online and EMA, at every snapshot).
LOSS_RTOL = 4e-6
NORM_RTOL = 1e-4
WEIGHTS_RTOL = 1e-6  # ||jaxdiff - reference|| / ||reference|| over the whole network


def _state_dict(case: str, prefix: str) -> dict:
    head = f"{case}/{prefix}/"
    return {k[len(head) :]: ARRAYS[k] for k in ARRAYS if k.startswith(head)}


def _relative(actual, expected) -> float:
    a, e = traverse_util.flatten_dict(actual), traverse_util.flatten_dict(expected)
    assert a.keys() == e.keys()
    num = sum(float(np.sum((np.asarray(a[k], np.float64) - np.asarray(e[k])) ** 2)) for k in e)
    den = sum(float(np.sum(np.asarray(e[k], np.float64) ** 2)) for k in e)
    value = (num / den) ** 0.5
    assert np.isfinite(value), "non-finite weights"
    return value


@pytest.mark.parametrize("case", sorted(META))
def test_train_step_follows_reference_loop(case):
    info = META[case]
    unet = unet_from_config(info["unet"])
    diffusion = info["diffusion"]
    betas = schedules.get_named_beta_schedule(diffusion["beta_schedule"], diffusion["timesteps"])
    coeffs = gaussian.make_coeffs(betas, convention="lucidrains")
    objective = OBJECTIVES[diffusion["objective"]]
    min_snr = 5.0 if diffusion.get("min_snr_loss_weight") else None

    def loss_fn(params, batch, key):
        def model_fn(x, time):
            return unet.apply(params, x, time, train=True, rngs={"dropout": key})

        per_example = losses.simple_loss(
            model_fn,
            coeffs,
            batch["x"],
            batch["t"],
            batch["noise"],
            objective=objective,
            min_snr_gamma=min_snr,
        )
        return jnp.mean(per_example), {}

    ema = info["ema"]
    optimizer = train.default_optimizer(
        info["lr"], *info["adam_betas"], max_grad_norm=info["max_grad_norm"]
    )
    decay = train.ema_pytorch_decay(
        beta=ema["beta"],
        update_after_step=ema["update_after_step"],
        update_every=ema["update_every"],
    )
    step_fn = train.make_train_step(loss_fn, optimizer, ema=decay, donate=False)
    params = torch_state_dict_to_flax(_state_dict(case, "init"), unet)
    state = train.create_train_state(params, optimizer, jax.random.PRNGKey(0))

    got_loss, got_norm, errors = [], [], {}
    for s in range(info["steps"]):
        batch = {
            "x": nhwc(ARRAYS[f"{case}/x_start"][s]),
            "t": jnp.asarray(ARRAYS[f"{case}/t"][s], jnp.int32),
            "noise": nhwc(ARRAYS[f"{case}/noise"][s]),
        }
        state, metrics = step_fn(state, batch)
        got_loss.append(float(metrics["loss"]))
        got_norm.append(float(metrics["grad_norm"]))
        if s + 1 in info["snapshots"]:
            for which, tree in (("online", state.params), ("ema", state.ema_params)):
                want = torch_state_dict_to_flax(_state_dict(case, f"{which}_{s + 1}"), unet)
                errors[f"{which}_{s + 1}"] = _relative(tree, want)

    want_loss, want_norm = ARRAYS[f"{case}/loss"], ARRAYS[f"{case}/grad_norm"]
    loss_err = np.abs(np.array(got_loss) - want_loss) / np.abs(want_loss)
    norm_err = np.abs(np.array(got_norm) - want_norm) / np.abs(want_norm)
    print(
        f"\n{case}: loss rel err max {loss_err.max():.2e}, grad norm {norm_err.max():.2e}, "
        + ", ".join(f"{k} {v:.2e}" for k, v in errors.items())
    )
    assert (loss_err <= LOSS_RTOL).all(), (
        f"loss differs at steps {np.nonzero(~(loss_err <= LOSS_RTOL))[0]}"
    )
    assert (norm_err <= NORM_RTOL).all(), (
        f"grad norm differs at steps {np.nonzero(~(norm_err <= NORM_RTOL))[0]}"
    )
    for name, err in errors.items():
        assert err <= WEIGHTS_RTOL, f"{name} weights differ: relative {err:.2e}"
    # the EMA is not the online network (decays happened), and training moved the weights
    assert _relative(state.ema_params, state.params) > 1e-3
    assert _relative(state.params, params) > 1e-3


@pytest.mark.live
@pytest.mark.skipif(
    not _reference_available(),
    reason="live training parity needs torch 2.13.0 + denoising-diffusion-pytorch 2.3.4 + "
    "ema-pytorch 0.8.3 in this Python or in $JAXDIFF_REFERENCE_PYTHON (see PROVENANCE.md); the "
    "committed fixture is checked by test_train_step_follows_reference_loop",
)
def test_reference_reproduces_training_fixture(tmp_path):
    subprocess.run(
        [PYTHON, str(HERE / "generate_training_fixtures.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh, stored = np.load(tmp_path / "training.npz"), np.load(FIXTURES / "training.npz")
    assert sorted(fresh.files) == sorted(stored.files)
    for key in stored.files:
        np.testing.assert_array_equal(fresh[key], stored[key], err_msg=key)
