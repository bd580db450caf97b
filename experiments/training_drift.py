"""How fast float32 rounding grows during training: jaxdiff's train step against
denoising-diffusion-pytorch's Trainer loop, and against itself, on the digits preset.

Both sides start from the reference Unet's torch initialisation (converted) and are fed the same
batches, timesteps and noise; every 10 steps it prints both losses and gradient norms and the
whole-network relative difference of the online and EMA weights, and a control: jaxdiff against
jaxdiff started from weights perturbed by 2e-7. At lr 1e-3 both pairs drift apart at the same
exponential rate after ~50 steps (measured: 7.6e-5 vs 2.6e-5 at step 100, 3.7e-3 vs 1.5e-3 at
150): rounding amplified by training, not a difference of algorithm. The committed check of the
algorithm is tests/parity/test_training_parity.py.

    PYTHONPATH=. /work/cmpenv/bin/python experiments/training_drift.py 200   # steps; ~10 min
(the venv of experiments/compare_pytorch.py: jax and the CPU torch together).
"""

# ruff: noqa: E402, E501
import sys

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import compare_pytorch as cp
import jax
import jax.numpy as jnp
import numpy as np
from _reference import load_reference
from flax import traverse_util

from jaxdiff import losses, train
from jaxdiff import workdir as wd
from jaxdiff.convert import torch_state_dict_to_flax

torch, ddp = load_reference()
torch.set_num_threads(1)
STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 150
config = cp.run_config(0, STEPS)
torch.manual_seed(0)
net = ddp.Unet(**cp.unet_kwargs(config))
diffusion = ddp.GaussianDiffusion(
    net,
    image_size=16,
    timesteps=1000,
    objective="pred_noise",
    beta_schedule="cosine",
    auto_normalize=False,
)
from ema_pytorch import EMA

opt = torch.optim.Adam(diffusion.parameters(), lr=config.run.lr, betas=cp.ADAM_BETAS)
ema = EMA(diffusion, beta=cp.EMA_BETA, update_every=cp.EMA_EVERY)
unet = wd.build_model(config)
sd0 = {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}
params = torch_state_dict_to_flax(sd0, unet)
# init statistics: jaxdiff's own init vs torch's
own = unet.init(jax.random.PRNGKey(1), jnp.zeros((1, 16, 16, 1)), jnp.zeros((1,)))
fo, ft = traverse_util.flatten_dict(own), traverse_util.flatten_dict(params)
worst = []
for k in ft:
    a, b = np.asarray(fo[k]), np.asarray(ft[k])
    if a.size > 8 and b.std() > 0:
        worst.append((abs(a.std() / max(b.std(), 1e-12) - 1), "/".join(k), a.std(), b.std()))
worst.sort(reverse=True)
print("init std ratio worst:", worst[:6])
coeffs = wd.build_coeffs(config.diffusion)
optimizer = train.default_optimizer(config.run.lr)


def loss_fn(p, batch, key):
    per = losses.simple_loss(
        lambda x, time: unet.apply(p, x, time, train=True, rngs={"dropout": key}),
        coeffs,
        batch["image"],
        batch["t"],
        batch["noise"],
        objective="eps",
    )
    return jnp.mean(per), {}


step = train.make_train_step(loss_fn, optimizer, donate=False)
state = train.create_train_state(params, optimizer, jax.random.PRNGKey(0))
pert = jax.tree.map(
    lambda p: p * (1 + 1e-7 * np.random.default_rng(5).standard_normal(p.shape).astype(np.float32)),
    params,
)
state2 = train.create_train_state(pert, optimizer, jax.random.PRNGKey(0))
dataset = cp.training_dataset(config)
rng = np.random.default_rng(0)


def rel(a, b):
    fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    num = sum(float(np.sum((np.asarray(fa[k]) - np.asarray(fb[k])) ** 2)) for k in fa)
    den = sum(float(np.sum(np.asarray(fb[k]) ** 2)) for k in fa)
    return (num / den) ** 0.5


def torch_params(module):
    return torch_state_dict_to_flax(
        {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}, unet
    )


for s in range(STEPS):
    b = jaxdiff_batch = cp.jaxdiff.data.batch_at(dataset, s, 64, seed=0, flip=config.data.flip)
    x = cp.jaxdiff.data.to_unit_range(b)  # NHWC
    t = rng.integers(0, 1000, 64)
    noise = rng.standard_normal(x.shape).astype(np.float32)
    xt = torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))
    nt = torch.from_numpy(np.ascontiguousarray(noise.transpose(0, 3, 1, 2)))
    diffusion.train()
    loss = diffusion.p_losses(xt, torch.from_numpy(t), noise=nt)
    loss.backward()
    gn = float(torch.nn.utils.clip_grad_norm_(diffusion.parameters(), 1.0))
    opt.step()
    opt.zero_grad()
    ema.update()
    state, m = step(
        state,
        {"image": jnp.asarray(x), "t": jnp.asarray(t, jnp.int32), "noise": jnp.asarray(noise)},
    )
    batch = {"image": jnp.asarray(x), "t": jnp.asarray(t, jnp.int32), "noise": jnp.asarray(noise)}
    state2, _ = step(state2, batch)
    if (s + 1) % 10 == 0 or s < 3:
        print(
            f"   control: jax vs jax-perturbed params rel {rel(state2.params, state.params):.2e} ema {rel(state2.ema_params, state.ema_params):.2e}"
        )
        pe = rel(state.params, torch_params(net))
        ee = rel(state.ema_params, torch_params(ema.ema_model.model))
        print(
            f"step {s + 1}: loss torch {float(loss):.6f} jax {float(m['loss']):.6f} gn {gn:.4f} {float(m['grad_norm']):.4f} decay {float(m['ema_decay']):.4f} params rel {pe:.2e} ema rel {ee:.2e}",
            flush=True,
        )
