"""Ensembles: one compiled program trains K models at once over a leading axis of train states.

The K members share a network, a loss and an optimiser; they differ in their numbers: the
initial params and run key (a seed ensemble), an optimiser hyperparameter held in the state
(the learning rate of :func:`jaxdiff.train.default_optimizer`), or an argument of the loss (a
per-member loss weight). The step is ``jax.jit(jax.vmap(step_fn))`` of the same
:func:`jaxdiff.train.make_step_fn` that :func:`jaxdiff.train.make_train_step` compiles, so every
member's numbers equal its own single run up to float32 summation order (the batched kernels
of a vmapped convolution or matmul may add in another order).

* :func:`stack_states` / :func:`unstack_states` / :func:`member`: K train states <-> one state
  whose every leaf has a leading axis K.
* :func:`create_ensemble_state`: K members from K seeds, optionally with per-member
  hyperparameters (:func:`with_hyperparams`).
* :func:`make_ensemble_train_step`: the compiled ``train_step(state, batch) -> (state,
  metrics)``, every metric with a leading axis K; the batch shared by all members or one per
  member; data parallel over a mesh's ``'data'`` axis, the members replicated or split over a
  second mesh axis.

Nothing here does I/O.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdiff.compilation import resolve_compiler_options
from jaxdiff.parallel import DATA_AXIS, check_batch, data_size
from jaxdiff.train import (
    DecayFn,
    LossFn,
    TrainState,
    create_train_state,
    make_step_fn,
)

__all__ = [
    "create_ensemble_state",
    "make_ensemble_train_step",
    "member",
    "num_members",
    "place_ensemble",
    "stack_states",
    "unstack_states",
    "with_hyperparams",
]


def _leading_sizes(tree: Any) -> set[int | None]:
    return {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree.leaves(tree)}


def num_members(stacked: Any) -> int:
    """K, the leading axis that every leaf of a stacked state (or any stacked pytree) shares."""
    sizes = _leading_sizes(stacked)
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"every leaf of a stacked state needs the same leading (member) axis, got sizes "
            f"{sorted(sizes, key=str)}"
        )
    (size,) = sizes
    return size


def stack_states(states: Sequence[TrainState]) -> TrainState:
    """K train states of one structure -> one state whose every leaf is ``stack`` of the K
    leaves (a leading member axis K). The result's buffers are new (the step may donate them)."""
    states = list(states)
    if not states:
        raise ValueError("stack_states needs at least one state")
    structures = {jax.tree.structure(s) for s in states}
    if len(structures) != 1:
        raise ValueError(
            "the states to stack differ in structure (params, optimiser or loss state); an "
            f"ensemble's members share one network and optimiser, got {len(structures)} "
            "structures"
        )
    first = jax.tree_util.tree_flatten_with_path(states[0])[0]
    for i, state in enumerate(states[1:], start=1):
        for (path, a), b in zip(first, jax.tree.leaves(state), strict=True):
            if np.shape(a) != np.shape(b) or jnp.result_type(a) != jnp.result_type(b):
                raise ValueError(
                    f"member {i}'s leaf {jax.tree_util.keystr(path)} is "
                    f"{jnp.result_type(b)}{list(np.shape(b))}, member 0's "
                    f"{jnp.result_type(a)}{list(np.shape(a))}"
                )
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def member(stacked: TrainState, i: int) -> TrainState:
    """Member i of a stacked state: every leaf's row i (a state for ``make_train_step``)."""
    k = num_members(stacked)
    if not -k <= i < k:
        raise ValueError(f"member index {i} is out of range for an ensemble of {k}")
    return jax.tree.map(lambda x: x[i], stacked)


def unstack_states(stacked: TrainState) -> list[TrainState]:
    """The K member states of a stacked state, in order (the inverse of :func:`stack_states`)."""
    return [member(stacked, i) for i in range(num_members(stacked))]


def with_hyperparams(stacked: TrainState, **values: Any) -> TrainState:
    """The stacked state with per-member optimiser hyperparameters, e.g.
    ``with_hyperparams(state, learning_rate=[1e-4, 3e-4, 1e-3])``.

    An optimiser wrapped in ``optax.inject_hyperparams`` (as
    :func:`jaxdiff.train.default_optimizer`) keeps its hyperparameters in its state and reads
    them from there at every update, so a stacked state whose rows differ trains each member
    with its own value in one program. Only a constant hyperparameter can be set this way: one
    given as a schedule is recomputed from the step count at every update.

    Args:
      stacked: a state with a leading member axis K.
      values: name -> K values (one per member).
    """
    k = num_members(stacked)
    found = set()

    def has_hyperparams(node):
        return isinstance(getattr(node, "hyperparams", None), dict)

    def replace(node):
        if not has_hyperparams(node):
            return node
        hyperparams = dict(node.hyperparams)
        for name, value in values.items():
            if name not in hyperparams:
                continue
            old = hyperparams[name]
            new = jnp.asarray(value, dtype=jnp.result_type(old))
            if new.shape != np.shape(old):
                raise ValueError(
                    f"hyperparameter {name!r} needs one value per member, shape "
                    f"{list(np.shape(old))} (K={k}), got {list(new.shape)}"
                )
            hyperparams[name] = new
            found.add(name)
        return node._replace(hyperparams=hyperparams)

    opt_state = jax.tree.map(replace, stacked.opt_state, is_leaf=has_hyperparams)
    missing = sorted(set(values) - found)
    if missing:
        raise ValueError(
            f"the optimiser state holds no injected hyperparameter {missing}; wrap the "
            "optimiser in optax.inject_hyperparams (as train.default_optimizer does)"
        )
    return stacked.replace(opt_state=opt_state)


def _member_sharding(mesh: Mesh, member_axis: str | None) -> NamedSharding:
    return NamedSharding(mesh, P() if member_axis is None else P(member_axis))


def _check_member_axis(mesh: Mesh | None, member_axis: str | None, num_models: int) -> None:
    if member_axis is None:
        return
    if mesh is None:
        raise ValueError(f"member_axis={member_axis!r} needs a mesh with an axis of that name")
    if member_axis == DATA_AXIS or member_axis not in mesh.shape:
        raise ValueError(
            f"member_axis must name a mesh axis other than {DATA_AXIS!r}, got {member_axis!r} "
            f"for a mesh with axes {mesh.axis_names}"
        )
    if num_models % mesh.shape[member_axis]:
        raise ValueError(
            f"{num_models} members do not split over the mesh's {member_axis!r} axis of size "
            f"{mesh.shape[member_axis]}; use a multiple of {mesh.shape[member_axis]}"
        )


def place_ensemble(stacked: Any, mesh: Mesh, member_axis: str | None = None) -> Any:
    """Put a stacked pytree on ``mesh``: replicated, or its member axis split over the mesh
    axis ``member_axis``."""
    _check_member_axis(mesh, member_axis, num_members(stacked))
    return jax.device_put(stacked, _member_sharding(mesh, member_axis))


def create_ensemble_state(
    init_fn: Callable[[jax.Array], Any],
    optimizer: optax.GradientTransformation,
    seeds: Sequence[int] | Sequence[jax.Array] | jax.Array,
    *,
    hyperparams: Mapping[str, Any] | None = None,
    loss_state: Any = None,
    mesh: Mesh | None = None,
    member_axis: str | None = None,
) -> TrainState:
    """K fresh members, one per seed, stacked (:func:`stack_states`).

    Member i, from seed (or key) ``k_i``, is
    ``create_train_state(init_fn(fold_in(k_i, 1)), optimizer, fold_in(k_i, 2))``: the key
    convention of :func:`jaxdiff.workdir.initial_state`, so a member from seed s starts as a
    single run with ``run.seed = s`` whose ``init_fn`` is the same.

    Args:
      init_fn: ``init_fn(key) -> params``, e.g.
        ``lambda k: unet.init(k, jnp.zeros((1, H, W, C)), jnp.zeros((1,)))``.
      optimizer: the members' optax transformation (the one the step is built with).
      seeds: K integer seeds or K keys (``jax.random.PRNGKey``), K >= 1.
      hyperparams: per-member optimiser hyperparameters, name -> K values, set by
        :func:`with_hyperparams` (e.g. ``{"learning_rate": [1e-4, 3e-4]}``).
      loss_state: a stateful loss's initial state, the same for every member.
      mesh, member_axis: place the state on ``mesh`` (:func:`place_ensemble`).
    """
    if isinstance(seeds, (jax.Array, np.ndarray)) and np.ndim(seeds) == 2:
        keys = list(seeds)
    else:
        keys = [
            jax.random.PRNGKey(s) if isinstance(s, (int, np.integer)) else jnp.asarray(s)
            for s in seeds
        ]
    if not keys:
        raise ValueError("an ensemble needs at least one seed (K >= 1), got none")
    states = [
        create_train_state(
            init_fn(jax.random.fold_in(key, 1)),
            optimizer,
            jax.random.fold_in(key, 2),
            loss_state=loss_state,
        )
        for key in keys
    ]
    stacked = stack_states(states)
    if hyperparams:
        stacked = with_hyperparams(stacked, **hyperparams)
    return stacked if mesh is None else place_ensemble(stacked, mesh, member_axis)


def make_ensemble_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    num_models: int,
    ema: DecayFn | float | None = None,
    grad_accum_steps: int = 1,
    compute_dtype: Any = None,
    mesh: Mesh | None = None,
    member_axis: str | None = None,
    donate: bool = True,
    compiler_options: str | Mapping[str, Any] | None = "auto",
    skip_nonfinite: bool = True,
    share_batch: bool = True,
    member_args: Mapping[str, Any] | None = None,
) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]:
    """Build the jit-compiled ``train_step(state, batch) -> (state, metrics)`` of K members.

    ``jax.jit(jax.vmap(step_fn))`` over the leading member axis of a stacked state, ``step_fn``
    being :func:`jaxdiff.train.make_step_fn` with the same arguments: member i's step is the
    computation :func:`jaxdiff.train.make_train_step` does on ``member(state, i)`` (its key, its
    step count, its non-finite guard: one member's NaN skips only that member's update), in one
    compiled program for all K; the numbers agree up to float32 summation order.

    Args:
      loss_fn: as for :func:`jaxdiff.train.make_train_step`; with ``member_args`` it is called
        as ``loss_fn(params, batch, key[, loss_state], **args_i)``.
      optimizer: the optax transformation of every member. Per-member constant
        hyperparameters live in the state (:func:`with_hyperparams`).
      num_models: K >= 1, the member count every state and per-member input must have.
      ema, grad_accum_steps, compute_dtype, donate, compiler_options, skip_nonfinite: as for
        :func:`jaxdiff.train.make_train_step`, the same for every member.
      mesh: data-parallel mesh: the batch is sharded along its ``'data'`` axis (axis 0 of a
        shared batch, axis 1 of per-member batches) and the members replicated, or
      member_axis: the name of a second mesh axis to split the members over (K a multiple of
        its size; e.g. ``Mesh(devices.reshape(2, n), ("members", "data"))``).
      share_batch: True: every member sees the same batch ``[B, ...]`` (a seed ensemble over
        identical data). False: one batch per member, every leaf ``[K, B, ...]``.
      member_args: per-member keyword arguments of the loss, name -> a pytree whose every leaf
        has a leading axis K, e.g. ``{"weight": jnp.array([0.5, 1.0, 2.0])}``. They are an
        input of the compiled step, not constants folded into it.

    Returns:
      ``train_step``; its metrics are those of ``make_train_step``, each ``[K]`` (one value per
      member). ``train_step.jitted`` is the compiled function (for ``.lower()``), called as
      ``jitted(state, batch, member_args)``.
    """
    if isinstance(num_models, bool) or not isinstance(num_models, int) or num_models < 1:
        raise ValueError(f"num_models must be an int >= 1 (K members), got {num_models!r}")
    _check_member_axis(mesh, member_axis, num_models)
    num_devices = data_size(mesh)
    member_args = {} if member_args is None else dict(member_args)
    member_args = jax.tree.map(jnp.asarray, member_args)
    for name, tree in member_args.items():
        sizes = _leading_sizes(tree)
        if sizes != {num_models}:
            raise ValueError(
                f"member_args[{name!r}] needs a leading axis of num_models={num_models} on "
                f"every leaf (one value per member), got {sorted(sizes, key=str)}"
            )
    step_kwargs = dict(
        ema=ema,
        grad_accum_steps=grad_accum_steps,
        compute_dtype=compute_dtype,
        mesh=mesh,
        skip_nonfinite=skip_nonfinite,
    )
    make_step_fn(loss_fn, optimizer, **step_kwargs)  # rejects bad static arguments now

    def member_step(state: TrainState, batch: Any, args: dict[str, Any]):
        member_loss = functools.partial(loss_fn, **args) if args else loss_fn
        return make_step_fn(member_loss, optimizer, **step_kwargs)(state, batch)

    ensemble_fn = jax.vmap(
        member_step, in_axes=(0, None if share_batch else 0, 0), spmd_axis_name=member_axis
    )
    jit_kwargs: dict[str, Any] = {
        "donate_argnums": (0,) if donate else (),
        "compiler_options": resolve_compiler_options(compiler_options),
    }
    if mesh is not None:
        members = _member_sharding(mesh, member_axis)
        batch_spec = P(DATA_AXIS) if share_batch else P(member_axis, DATA_AXIS)
        jit_kwargs["in_shardings"] = (members, NamedSharding(mesh, batch_spec), members)
        jit_kwargs["out_shardings"] = (members, members)
    compiled = jax.jit(ensemble_fn, **jit_kwargs)
    if mesh is not None:
        member_args = place_ensemble(member_args, mesh, member_axis) if member_args else {}

    def train_step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        sizes = _leading_sizes(state)
        if sizes != {num_models}:
            raise ValueError(
                f"the state needs a leading member axis of num_models={num_models} on every "
                f"leaf (see stack_states), got leading sizes {sorted(sizes, key=str)}"
            )
        if share_batch:
            check_batch(batch, num_devices, grad_accum_steps)
        else:
            leading = _leading_sizes(batch)
            if leading != {num_models}:
                raise ValueError(
                    f"with share_batch=False every leaf of the batch needs a leading axis of "
                    f"num_models={num_models} (one batch per member, [K, B, ...]), got "
                    f"{sorted(leading, key=str)}"
                )
            one = jax.tree.map(lambda x: np.broadcast_to(np.int8(0), np.shape(x)[1:]), batch)
            check_batch(one, num_devices, grad_accum_steps)
        return compiled(state, batch, member_args)

    train_step.jitted = compiled
    return train_step
