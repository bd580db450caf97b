"""openai's released checkpoints in jaxdiff: a ``.pt`` (or ``.npz``) state_dict of
improved-diffusion's or guided-diffusion's ``UNetModel`` and the flags it was made with become a
network, weights and process that ``jaxdiff sample`` and ``jaxdiff bpd`` run as the scripts
``image_sample.py``, ``classifier_sample.py`` and ``image_nll.py`` do.

The flags are the scripts' (``--image_size 64 --num_channels 128 --learn_sigma True
--diffusion_steps 4000 --noise_schedule cosine --timestep_respacing 250 ...``, read by
:mod:`jaxdiff.openai_script`); ``layout`` says whose defaults fill in the rest (the two
repositories differ, e.g. in ``rescale_timesteps``), and is required because a checkpoint does
not say where it comes from.

A guided-diffusion noisy classifier (``--classifier-checkpoint``, its ``--classifier_*`` flags)
guides sampling towards a label (Dhariwal & Nichol 2021), for a class-conditional model or an
unconditional one (the ``256x256_diffusion_uncond.pt`` use).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from jaxdiff import convert_openai, openai_script, train
from jaxdiff.config import Config, DataConfig, ModelConfig
from jaxdiff.networks import LabelledUNetModel
from jaxdiff.workdir import Loaded

__all__ = ["Classifier", "file_name_labels", "load_classifier", "load_model"]


class Classifier(NamedTuple):
    """A noisy classifier for :func:`jaxdiff.workdir.sample_fn`'s ``classifier``:
    ``apply(params, x, time) -> logits [B, num_classes]``."""

    apply: Callable[..., Any]
    params: Any
    num_classes: int
    image_size: int


def _weights(path: str | os.PathLike, model, flags_option: str) -> dict:
    """The Flax variables of ``model`` from the state_dict file ``path``; every failure a
    ValueError (or FileNotFoundError) naming the file."""
    state = convert_openai.load_openai_state_dict(path)
    try:
        variables = convert_openai.openai_state_dict_to_params(state, model)
    except ValueError as error:
        raise ValueError(
            f"{path}: {error} Pass the flags the checkpoint was made with ({flags_option}, "
            "as in the README of the repository that released it)."
        ) from None
    bad = train.nonfinite_leaves(variables)
    if bad:
        raise ValueError(
            f"{path} holds NaN or infinite weights ({len(bad)} arrays, e.g. {bad[0]}): the "
            "checkpoint is broken"
        )
    return variables


def load_model(
    checkpoint: str | os.PathLike,
    flags: str | Sequence[str],
    *,
    layout: str,
    data_dir: str | os.PathLike | None = None,
    dtype=None,
) -> tuple[Loaded, openai_script.OpenAIDiffusion]:
    """An openai checkpoint as a :class:`jaxdiff.workdir.Loaded` (step 0) and its process.

    Args:
      checkpoint: the ``.pt`` file the scripts save (``model.state_dict()``; needs torch) or
        a ``.npz`` of the same arrays.
      flags: the model and diffusion flags of ``script_util`` (see
        :func:`jaxdiff.openai_script.parse_flags`).
      layout: ``"improved"`` or ``"guided"``: whose defaults and network.
      data_dir: an image folder for bits/dim (``config.data.folder``).
      dtype: the network's compute dtype (None: bfloat16 with ``--use_fp16 True``).

    The configuration's ``model`` section records the network's width and classes for
    reading; the network itself is built from the flags.
    """
    net, diffusion = openai_script.create_model_and_diffusion(flags, layout=layout, dtype=dtype)
    variables = _weights(checkpoint, net, "--openai-flags")
    config = Config(
        model=ModelConfig(
            arch="openai",
            dim=net.model_channels,
            dim_mults=tuple(net.channel_mult),
            num_res_blocks=net.num_res_blocks,
            num_classes=net.num_classes,
            cond_drop_prob=0.0,
            use_scale_shift_norm=net.use_scale_shift_norm,
        ),
        diffusion=diffusion.config,
        data=DataConfig(
            dataset="folder",
            folder=None if data_dir is None else str(data_dir),
            image_size=net.image_size or _image_size(flags, layout),
            channels=3,
        ),
    )
    return Loaded(config, LabelledUNetModel(net), variables, 0), diffusion


def _image_size(flags, layout: str) -> int:
    return openai_script.parse_flags(flags, layout=layout)["image_size"]


def load_classifier(
    checkpoint: str | os.PathLike, flags: str | Sequence[str], *, dtype=None
) -> Classifier:
    """guided-diffusion's noisy classifier (``EncoderUNetModel``) from its checkpoint and its
    ``--classifier_*`` flags (see :func:`jaxdiff.openai_script.create_classifier_and_diffusion`)."""
    net, _ = openai_script.create_classifier_and_diffusion(flags, dtype=dtype)
    variables = _weights(checkpoint, net, "--classifier-flags")
    return Classifier(
        lambda params, x, time: net.apply(params, x, time),
        variables,
        net.out_channels,
        openai_script.parse_flags(flags, classifier=True)["image_size"],
    )


def file_name_labels(files: Sequence[str | os.PathLike]) -> np.ndarray:
    """Class labels as openai's ``image_datasets.load_data(class_cond=True)`` reads them: a
    file's class is its name up to the first ``_`` (``n01440764_10026.JPEG``), numbered in
    sorted order of the names."""
    names = [Path(f).name.split("_")[0] for f in files]
    index = {name: i for i, name in enumerate(sorted(set(names)))}
    return np.asarray([index[n] for n in names], np.int32)
