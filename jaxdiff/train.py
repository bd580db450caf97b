"""The training step: state, optimiser, EMA, gradient accumulation, mixed precision, sharding.

A training run is a loop of ``state, metrics = train_step(state, batch)`` over a pure, jit-compiled
function made by :func:`make_train_step`; this module holds no I/O (checkpoints are
:mod:`jaxdiff.checkpoint`, data is :mod:`jaxdiff.data`).

* :class:`TrainState` is a pytree: params, EMA params, optimiser state, step and the base key.
  Step n draws its randomness from ``fold_in(key, n)``, so a run restored at step k continues
  exactly as an uninterrupted one.
* A loss is any ``loss_fn(params, batch, key) -> (scalar loss, aux metrics dict)``;
  :func:`jaxdiff.objectives.diffusion_loss_fn` (also ``train.diffusion_loss_fn``) builds one
  from a Flax ``apply`` function and any loss of the core.
* Defaults follow denoising-diffusion-pytorch's ``Trainer``: Adam(1e-4, betas (0.9, 0.99)) after
  clipping the global gradient norm to 1, and ema-pytorch's EMA (beta 0.995, every 10 steps, a
  warm-up decay, weights copied for the first 100 steps).
* Data parallelism is :mod:`jaxdiff.parallel` (``make_mesh``, ``shard_batch``, ``replicate``,
  also importable from here): the batch split along a ``'data'`` axis and the state
  replicated. The numbers do not depend on the device count beyond float summation order.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdiff.compilation import resolve_compiler_options
from jaxdiff.objectives import LOSSES, diffusion_loss_fn
from jaxdiff.parallel import DATA_AXIS, check_batch, data_size, make_mesh, replicate, shard_batch

__all__ = [
    "DATA_AXIS",
    "LOSSES",
    "TrainState",
    "constant_ema_decay",
    "create_train_state",
    "default_optimizer",
    "diffusion_loss_fn",
    "ema_pytorch_decay",
    "ema_update",
    "make_mesh",
    "make_step_fn",
    "make_train_step",
    "nonfinite_leaves",
    "replicate",
    "shard_batch",
]


LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
DecayFn = Callable[[jax.Array], jax.Array]


@flax.struct.dataclass
class TrainState:
    """Everything a training run carries from one step to the next (a pytree)."""

    step: jax.Array  # shape=(), int32: optimiser steps taken so far
    params: Any
    ema_params: Any
    opt_state: Any
    key: jax.Array  # shape=(2,), uint32: base key; step n uses fold_in(key, n)
    loss_state: Any = None  # the loss's own state, e.g. losses.LossSecondMomentState


# --------------------------------------------------------------------------------------------
# Optimiser and EMA
# --------------------------------------------------------------------------------------------


def default_optimizer(
    lr: float | optax.Schedule = 1e-4,
    b1: float = 0.9,
    b2: float = 0.99,
    max_grad_norm: float | None = 1.0,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """Adam after global-norm gradient clipping, as denoising-diffusion-pytorch's ``Trainer``.

    .. math:: g \\leftarrow g \\min(1, c / \\|g\\|_2),\\quad
        \\theta \\leftarrow \\theta - \\eta\\, \\hat m / (\\sqrt{\\hat v} + \\epsilon)

    The learning rate is injected as a hyperparameter (``optax.inject_hyperparams``), so it
    lives in the optimiser state and :func:`make_train_step` reports it as a metric; ``lr`` may
    be an optax schedule. torch's ``clip_grad_norm_`` divides by ``norm + 1e-6`` where optax
    divides by the norm: the clipped gradients differ by that relative 1e-6.

    Args:
      lr: learning rate, or a schedule of the step.
      b1, b2: Adam's moment decays (the Trainer's ``adam_betas``).
      max_grad_norm: clip threshold c, or None for no clipping.
      eps: Adam's epsilon (torch's default).
    """
    if not callable(lr) and not lr > 0:
        raise ValueError(f"lr must be > 0 or an optax schedule, got {lr!r}")
    for name, value in (("b1", b1), ("b2", b2)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm!r}")

    def make(learning_rate):
        adam = optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)
        if max_grad_norm is None:
            return adam
        return optax.chain(optax.clip_by_global_norm(max_grad_norm), adam)

    return optax.inject_hyperparams(make)(learning_rate=lr)


def ema_pytorch_decay(
    *,
    beta: float = 0.995,
    update_after_step: int = 100,
    update_every: int = 10,
    inv_gamma: float = 1.0,
    power: float = 2.0 / 3.0,
    min_value: float = 0.0,
) -> DecayFn:
    """ema-pytorch's EMA schedule (version 0.8.3) as a pure function of the step.

    The returned ``decay(s)`` is the decay applied by :func:`ema_update` after optimiser step s
    (s = ``TrainState.step`` before the step, i.e. the number of earlier EMA updates):

    * 0 (copy the weights) at s = 0 and at every s <= ``update_after_step`` that is a multiple
      of ``update_every``;
    * 1 (keep the EMA) when s is not a multiple of ``update_every``;
    * otherwise, with :math:`e = s - \\mathrm{update\\_after\\_step}`,

    .. math:: d(s) = \\mathrm{clip}\\big(1 - (1 + e / \\gamma)^{-p},\\ \\mathrm{min},
        \\ \\beta\\big).

    The defaults are those of denoising-diffusion-pytorch's ``Trainer`` (``ema_decay=0.995``,
    ``ema_update_every=10``) on top of ema-pytorch's (``update_after_step=100``,
    ``inv_gamma=1``, ``power=2/3``, ``min_value=0``).

    References: ema-pytorch ``EMA.get_current_decay`` and ``EMA.update``; the warm-up form is
    from Tan & Le's EfficientNet training code.
    """
    if not 0.0 <= min_value <= beta <= 1.0:
        raise ValueError(
            f"need 0 <= min_value <= beta <= 1, got min_value={min_value}, beta={beta}"
        )
    if update_every < 1 or update_after_step < 0:
        raise ValueError(
            f"need update_every >= 1 and update_after_step >= 0, got {update_every} and "
            f"{update_after_step}"
        )
    if not (inv_gamma > 0 and power > 0):
        raise ValueError(f"need inv_gamma > 0 and power > 0, got {inv_gamma} and {power}")

    def decay(step: jax.Array) -> jax.Array:
        s = jnp.asarray(step, jnp.int32)
        epoch = jnp.maximum(s - update_after_step, 0).astype(jnp.float32)
        warm = 1.0 - (1.0 + epoch / inv_gamma) ** (-power)
        warm = jnp.clip(warm, min_value, beta)
        copy = (s == 0) | (s <= update_after_step)
        value = jnp.where(copy, jnp.float32(0.0), warm)
        return jnp.where(s % update_every == 0, value, jnp.float32(1.0))

    return decay


def constant_ema_decay(decay: float) -> DecayFn:
    """A constant decay d at every step: ``ema <- d * ema + (1 - d) * params``."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay!r}")

    def fn(step: jax.Array) -> jax.Array:
        del step
        return jnp.float32(decay)

    return fn


def ema_update(ema_params: Any, params: Any, decay: jax.Array) -> Any:
    """One EMA step: ``ema + (1 - decay) * (params - ema)`` (torch's ``lerp_``).

    A decay of exactly 0 copies ``params`` and of exactly 1 keeps ``ema_params``, bit for bit.
    """

    def one(e, p):
        if not jnp.issubdtype(e.dtype, jnp.floating):
            return p
        d = decay.astype(e.dtype)
        lerped = e + (1 - d) * (p - e)
        return jnp.where(d == 0, p, jnp.where(d == 1, e, lerped))

    return jax.tree.map(one, ema_params, params)


def _decay_fn(ema: DecayFn | float | None) -> DecayFn:
    if ema is None:
        return ema_pytorch_decay()
    if callable(ema):
        return ema
    if isinstance(ema, (int, float)) and not isinstance(ema, bool):
        return constant_ema_decay(float(ema))
    raise ValueError(
        f"ema must be None (ema-pytorch's schedule), a decay in [0, 1] or a function of the "
        f"step, got {ema!r}"
    )


# --------------------------------------------------------------------------------------------
# State and step
# --------------------------------------------------------------------------------------------


def _raw_key(key: jax.Array) -> jax.Array:
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    if key.shape != (2,) or key.dtype != jnp.uint32:
        raise ValueError(
            "key must be a jax.random.PRNGKey (uint32[2]) or a threefry jax.random.key, got "
            f"{key.dtype}{list(key.shape)}"
        )
    return key


def create_train_state(
    params: Any,
    optimizer: optax.GradientTransformation,
    key: jax.Array,
    *,
    loss_state: Any = None,
    mesh: Mesh | None = None,
) -> TrainState:
    """A fresh :class:`TrainState` at step 0, with the EMA params a copy of ``params``.

    Args:
      params: model parameters (e.g. ``module.init(...)`` output, float32).
      optimizer: an optax transformation, e.g. :func:`default_optimizer`.
      key: base key of the run; step n draws ``fold_in(key, n)``.
      loss_state: state of a stateful loss, e.g.
        ``losses.loss_second_moment_init(T)`` for :func:`diffusion_loss_fn`'s importance
        sampling; None for a plain loss.
      mesh: replicate the state over this mesh (see :func:`make_mesh`).

    The state's buffers are copies, never the caller's arrays: the train step donates them.
    """
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=params,
        opt_state=_init_optimizer(optimizer, params),
        key=_raw_key(jnp.asarray(key)),
        loss_state=loss_state,
    )
    # One fresh buffer per leaf: donation rejects a buffer that appears twice (params and
    # ema_params start equal), and the caller's arrays must survive the first step.
    state = jax.tree.map(lambda x: jnp.array(x, copy=True), state)
    return state if mesh is None else replicate(state, mesh)


def _init_optimizer(optimizer: optax.GradientTransformation, params: Any) -> Any:
    # an optax schedule mixes Python floats with the int32 step count (see make_train_step)
    with jax.numpy_dtype_promotion("standard"):
        return optimizer.init(params)


def _cast_floating(tree: Any, dtype) -> Any:
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


def _learning_rate(opt_state: Any) -> jax.Array | None:
    def has_hyperparams(node):
        return isinstance(getattr(node, "hyperparams", None), dict)

    for node in jax.tree.leaves(opt_state, is_leaf=has_hyperparams):
        if has_hyperparams(node) and "learning_rate" in node.hyperparams:
            return jnp.asarray(node.hyperparams["learning_rate"], jnp.float32)
    return None


def nonfinite_leaves(tree: Any) -> list[str]:
    """The paths (``jax.tree_util.keystr``) of the floating leaves of ``tree`` that hold a NaN
    or an infinity; empty when every value is finite. Reads the arrays to the host."""
    bad = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        value = np.asarray(jax.device_get(leaf))
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            bad.append(jax.tree_util.keystr(path))
    return bad


def _select(condition: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where ``condition`` holds, else ``old``, leaf by leaf (a traced scalar)."""
    return jax.tree.map(lambda a, b: jnp.where(condition, a, b), new, old)


def _micro_batches(x: jax.Array, num: int, mesh: Mesh | None) -> jax.Array:
    """[B, ...] -> [num, B / num, ...] with micro-batch i = x[i::num].

    Strided, so that every device keeps its own rows: a device's contiguous block of the
    batch holds an equal share of each micro-batch, and no data moves between devices.
    """
    split = jnp.moveaxis(x.reshape((x.shape[0] // num, num) + x.shape[1:]), 1, 0)
    if mesh is not None:
        split = jax.lax.with_sharding_constraint(split, NamedSharding(mesh, P(None, DATA_AXIS)))
    return split


def make_step_fn(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    ema: DecayFn | float | None = None,
    grad_accum_steps: int = 1,
    compute_dtype: Any = None,
    mesh: Mesh | None = None,
    skip_nonfinite: bool = True,
) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]:
    """The un-jitted ``step_fn(state, batch) -> (state, metrics)`` that :func:`make_train_step`
    compiles: one step as documented there, its arguments the same.

    A pure function of its inputs, for transformations of the step itself: ``jax.vmap`` over a
    leading axis of states (:func:`jaxdiff.ensemble.make_ensemble_train_step`) or a custom
    ``jit``/``scan``. ``mesh`` only places the micro-batches of gradient accumulation along the
    ``'data'`` axis; the caller's ``jit`` shards the step's inputs.
    """
    if not isinstance(grad_accum_steps, int) or grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps must be an int >= 1, got {grad_accum_steps!r}")
    if compute_dtype is not None and not jnp.issubdtype(jnp.dtype(compute_dtype), jnp.floating):
        raise ValueError(f"compute_dtype must be a floating dtype or None, got {compute_dtype!r}")
    decay_fn = _decay_fn(ema)

    def loss_and_grad(params, batch, key, loss_state):
        def objective(p):
            if compute_dtype is not None:
                p = _cast_floating(p, compute_dtype)
            if loss_state is None:
                loss, aux = loss_fn(p, batch, key)
                new_loss_state = None
            else:
                loss, aux = loss_fn(p, batch, key, loss_state)
                aux = dict(aux)
                if "loss_state" not in aux:
                    raise ValueError(
                        "the state carries a loss_state, so loss_fn must return its new value "
                        "as aux['loss_state']"
                    )
                new_loss_state = aux.pop("loss_state")
            aux = {k: jnp.asarray(v, jnp.float32) for k, v in aux.items()}
            return jnp.asarray(loss, jnp.float32), (aux, new_loss_state)

        (loss, (aux, new_loss_state)), grads = jax.value_and_grad(objective, has_aux=True)(params)
        return loss, aux, new_loss_state, grads

    def step_fn(state: TrainState, batch: Any):
        step_key = jax.random.fold_in(state.key, state.step)
        if grad_accum_steps == 1:
            loss, aux, loss_state, grads = loss_and_grad(
                state.params, batch, jax.random.fold_in(step_key, 0), state.loss_state
            )
        else:
            micro = jax.tree.map(lambda x: _micro_batches(x, grad_accum_steps, mesh), batch)

            def body(carry, inputs):
                grad_sum, loss_state = carry
                i, micro_batch = inputs
                loss, aux, loss_state, grads = loss_and_grad(
                    state.params, micro_batch, jax.random.fold_in(step_key, i), loss_state
                )
                grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
                return (grad_sum, loss_state), (loss, aux)

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            steps = jnp.arange(grad_accum_steps, dtype=jnp.int32)
            (grad_sum, loss_state), (loss, aux) = jax.lax.scan(
                body, (zeros, state.loss_state), (steps, micro)
            )
            grads = jax.tree.map(lambda g: g / grad_accum_steps, grad_sum)
            loss = jnp.mean(loss)
            aux = {k: jnp.mean(v) for k, v in aux.items()}

        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        # optax mixes Python floats with int32 step counts (Adam's bias correction), which
        # strict dtype promotion rejects; its own numerics are float32 either way.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = decay_fn(state.step)
        ema_params = ema_update(state.ema_params, params, decay)
        # A NaN or Inf anywhere in the gradient makes the sum of squares non-finite.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        skipped = jnp.zeros((), jnp.float32)
        if skip_nonfinite:
            skipped = jnp.where(finite, 0.0, 1.0).astype(jnp.float32)
            keep = functools.partial(_select, finite)
            params, ema_params = keep(params, state.params), keep(ema_params, state.ema_params)
            opt_state = keep(opt_state, state.opt_state)
            loss_state = keep(loss_state, state.loss_state)
        metrics = {
            **aux,
            "loss": loss,
            "grad_norm": grad_norm,
            "ema_decay": decay,
            "skipped": skipped,
        }
        learning_rate = _learning_rate(opt_state)
        if learning_rate is not None:
            metrics["learning_rate"] = learning_rate
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            ema_params=ema_params,
            opt_state=opt_state,
            loss_state=loss_state,
        )
        return new_state, metrics

    return step_fn


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    ema: DecayFn | float | None = None,
    grad_accum_steps: int = 1,
    compute_dtype: Any = None,
    mesh: Mesh | None = None,
    donate: bool = True,
    compiler_options: str | Mapping[str, Any] | None = "auto",
    steps_per_call: int = 1,
    skip_nonfinite: bool = True,
) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]:
    """Build the jit-compiled ``train_step(state, batch) -> (state, metrics)``.

    One step, with k = ``fold_in(state.key, state.step)``:

    .. math:: g = \\frac{1}{A} \\sum_{i<A} \\nabla_\\theta L(\\theta, b_i,
        \\mathrm{fold\\_in}(k, i)),\\quad \\theta' = \\theta + \\mathrm{opt}(g),\\quad
        \\bar\\theta' = \\bar\\theta + (1 - d(s)) (\\theta' - \\bar\\theta)

    with A = ``grad_accum_steps`` micro-batches ``b_i = batch[i::A]`` scanned with
    ``lax.scan`` (their mean gradient equals the whole batch's for a loss that is a batch
    mean), d the EMA decay of the step.

    Args:
      loss_fn: ``loss_fn(params, batch, key) -> (loss, aux)``, ``loss`` a scalar and ``aux`` a
        dict of scalar metrics (averaged over micro-batches). When the state carries a
        ``loss_state`` the call is ``loss_fn(params, batch, key, loss_state)`` and
        ``aux["loss_state"]`` must hold its new value (threaded through the micro-batches).
      optimizer: an optax transformation (see :func:`default_optimizer`).
      ema: None for ema-pytorch's schedule (:func:`ema_pytorch_decay`), a float for a
        constant decay, or any ``decay(step)`` function.
      grad_accum_steps: A >= 1.
      compute_dtype: e.g. ``jnp.bfloat16``: the loss sees the floating params cast to it
        (:func:`diffusion_loss_fn` then also casts the network input); gradients, params and
        optimiser state stay in their own dtype (float32).
      mesh: data-parallel mesh (:func:`make_mesh`): the batch is sharded along its ``'data'``
        axis and the state replicated. None runs on the arrays' own devices.
      donate: donate the state's buffers to the step (the input state is invalid afterwards).
      compiler_options: XLA options for the step's compile: ``"auto"`` for
        :func:`jaxdiff.compilation.compiler_options` (faster CPU kernels), None for XLA's
        defaults, or a dict.
      steps_per_call: K >= 1 train steps per call, run by one ``lax.scan`` in one dispatch
        (for small models on accelerators, where launching a step costs more than running
        it). The batch then has a leading axis of K (one batch per step, ``[K, B, ...]``) and
        every metric one value per step ``[K]``; the result equals K single-step calls.

      skip_nonfinite: when the loss or any gradient component is NaN or infinite, leave the
        params, EMA params, optimiser and loss state as they were and only advance the step (so
        the next step sees the next batch and key); the step's ``skipped`` metric is 1. This is
        optax's ``apply_if_finite`` with the count kept outside the state: a caller stops a run
        after N consecutive skips (the ``jaxdiff`` runner's ``max_nonfinite_steps``). False
        applies every update, NaN included.

    Returns:
      ``train_step``; its metrics are ``loss``, ``grad_norm`` (before clipping), ``ema_decay``,
      ``skipped`` (1.0 when the update was skipped as non-finite, else 0.0),
      ``learning_rate`` when the optimiser state holds one, and the loss's aux. A global batch
      that is not divisible by the device count (times A) raises a ValueError.
    """
    if not isinstance(steps_per_call, int) or steps_per_call < 1:
        raise ValueError(f"steps_per_call must be an int >= 1, got {steps_per_call!r}")
    step_fn = make_step_fn(
        loss_fn,
        optimizer,
        ema=ema,
        grad_accum_steps=grad_accum_steps,
        compute_dtype=compute_dtype,
        mesh=mesh,
        skip_nonfinite=skip_nonfinite,
    )
    num_devices = data_size(mesh)

    def multi_step_fn(state: TrainState, batches: Any):
        return jax.lax.scan(step_fn, state, batches)

    jit_kwargs: dict[str, Any] = {
        "donate_argnums": (0,) if donate else (),
        "compiler_options": resolve_compiler_options(compiler_options),
    }
    if mesh is not None:
        replicated = NamedSharding(mesh, P())
        batch_spec = P(DATA_AXIS) if steps_per_call == 1 else P(None, DATA_AXIS)
        jit_kwargs["in_shardings"] = (replicated, NamedSharding(mesh, batch_spec))
        jit_kwargs["out_shardings"] = (replicated, replicated)
    compiled = jax.jit(step_fn if steps_per_call == 1 else multi_step_fn, **jit_kwargs)

    def train_step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        if steps_per_call > 1:
            leading = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree.leaves(batch)}
            if leading != {steps_per_call}:
                raise ValueError(
                    f"with steps_per_call={steps_per_call} every leaf of the batch needs a "
                    f"leading axis of {steps_per_call} (one batch per step), got {leading}"
                )
            # the shape of one step's batch, without touching the data
            one = jax.tree.map(lambda x: np.broadcast_to(np.int8(0), np.shape(x)[1:]), batch)
            check_batch(one, num_devices, grad_accum_steps)
        else:
            check_batch(batch, num_devices, grad_accum_steps)
        return compiled(state, batch)

    train_step.jitted = compiled  # for .lower() / cost analysis
    return train_step
