"""jaxdiff against improved-diffusion (1bc7bbb) on openai's UNetModel, side by side in one
process: one network call and a whole respaced DDPM chain (``p_sample_loop``, what
``image_sample.py`` runs), on the same weights.

Both sides build the network and the process from the same script flags (default: the
improved-diffusion README's CIFAR-10 L_hybrid model, 52.5M parameters, respaced to 25 steps):
the reference with its ``script_util.create_model_and_diffusion``, jaxdiff with
``jaxdiff.openai_script.create_model_and_diffusion``; the reference's randomly initialised and
perturbed weights go through ``jaxdiff.convert_openai``, and the two outputs are checked to agree
before anything is timed. Measured, each the median of ``--repeats`` runs after a warm-up call:

* one network call on a batch (PyTorch eager under ``no_grad``; jaxdiff's ``apply`` jitted);
* the respaced DDPM chain with learned sigma and clipping (``p_sample_loop`` against
  ``jaxdiff.samplers.ddpm_sample`` in one jitted program);
* jaxdiff's first calls (tracing and XLA compilation; PyTorch eager has none).

The reference runs first, then jaxdiff (XLA's CPU threads stay busy for a moment after a call).
Writes ``--out`` (JSON) and the same name with ``.md``; ratio = jaxdiff's time over the
reference's (< 1: jaxdiff is faster). Needs torch==2.13.0 next to jaxdiff and the
improved-diffusion package folder (``git archive`` of 1bc7bbb; no other dependency is imported).
From the repository root:

    IMPROVED_DIFFUSION_DIR=/path/holding/improved_diffusion PYTHONPATH=. \\
        python experiments/bench_openai.py
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shlex
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import compilation, convert_openai, openai_script, samplers

CIFAR10 = (
    "--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3 "
    "--diffusion_steps 4000 --noise_schedule cosine --timestep_respacing 25"
)
ROWS = (
    ("network_call_s", "one network call (s)"),
    ("ddpm_chain_s", "respaced DDPM chain (s)"),
    ("first_network_call_s", "first network call (s)"),
    ("first_chain_s", "first chain call (s)"),
)


def median_time(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def reference(folder: str, options: dict, seed: int):
    """improved-diffusion's model (perturbed weights) and diffusion, and torch."""
    sys.path.insert(0, folder)
    import torch
    from improved_diffusion import script_util

    torch.manual_seed(seed)
    model, diffusion = script_util.create_model_and_diffusion(**options)
    with torch.no_grad():  # off the initial values: the output conv starts at zero
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return torch, model.eval(), diffusion


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--improved-diffusion", default=os.environ.get("IMPROVED_DIFFUSION_DIR"))
    parser.add_argument("--flags", default=CIFAR10, help="improved-diffusion's script flags")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default="experiments/results/openai_cpu.json")
    args = parser.parse_args(argv)
    if not args.improved_diffusion:
        parser.error("needs --improved-diffusion DIR (or $IMPROVED_DIFFUSION_DIR)")

    options = openai_script.parse_flags(args.flags, layout="improved")
    torch, ref_model, ref_diffusion = reference(args.improved_diffusion, options, args.seed)
    net, diffusion = openai_script.create_model_and_diffusion(args.flags, layout="improved")
    state = {k: v.detach().numpy() for k, v in ref_model.state_dict().items()}
    variables = convert_openai.openai_state_dict_to_params(state, net)
    size, b = options["image_size"], args.batch
    rng = np.random.default_rng(args.seed)
    x = rng.standard_normal((b, 3, size, size)).astype(np.float32)
    times = np.linspace(0, diffusion.coeffs.num_timesteps - 1, b).astype(np.int64)
    model_t = np.asarray(diffusion.coeffs.model_times)[times].astype(np.float32)

    # --- the reference: its wrapped model maps the respaced index to the network time
    x_t, t_t = torch.from_numpy(x), torch.from_numpy(times)
    wrapped = ref_diffusion._wrap_model(ref_model)
    with torch.no_grad():
        ref_out = wrapped(x_t, t_t).numpy()
        ref_call, ref_calls = median_time(lambda: wrapped(x_t, t_t), args.repeats)
        noise = torch.from_numpy(x)
        chain = lambda: ref_diffusion.p_sample_loop(  # noqa: E731
            ref_model, (b, 3, size, size), noise=noise, clip_denoised=True, progress=False
        )
        chain()
        ref_chain, ref_chains = median_time(chain, args.repeats)

    # --- jaxdiff, channels-last
    opts = compilation.compiler_options()
    apply = jax.jit(lambda v, x, t: net.apply(v, x, t), compiler_options=opts)
    x_j, t_j = jnp.asarray(np.moveaxis(x, 1, -1)), jnp.asarray(model_t)
    start = time.perf_counter()
    ours = apply(variables, x_j, t_j).block_until_ready()
    first_call = time.perf_counter() - start
    scale = float(np.abs(ref_out).max())
    error = float(np.abs(np.moveaxis(np.asarray(ours), -1, 1) - ref_out).max()) / scale
    if not error < 1e-4:
        raise SystemExit(f"the two networks disagree: {error:.3g} of the largest output")
    our_call, our_calls = median_time(
        lambda: apply(variables, x_j, t_j).block_until_ready(), args.repeats
    )

    @jax.jit(compiler_options=opts)
    def sample(v, x_T, key):
        fn = lambda x, t: net.apply(v, x, t)  # noqa: E731
        out = samplers.ddpm_sample(
            fn, diffusion.coeffs, x_T, key=key, mean_type="eps", var_type="learned_range"
        )
        return out.sample

    key = jax.random.PRNGKey(args.seed)
    start = time.perf_counter()
    sample(variables, x_j, key).block_until_ready()
    first_chain = time.perf_counter() - start
    our_chain, our_chains = median_time(
        lambda: sample(variables, x_j, key).block_until_ready(), args.repeats
    )

    result = {
        "flags": args.flags,
        "batch": b,
        "steps": int(diffusion.coeffs.num_timesteps),
        "repeats": args.repeats,
        "parameters": int(sum(p.numel() for p in ref_model.parameters())),
        "output_error_relative": error,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {jax.devices()[0].device_kind}",
        "versions": {"jax": jax.__version__, "torch": torch.__version__},
        "reference": {"network_call_s": ref_call, "ddpm_chain_s": ref_chain,
                      "network_call_runs": ref_calls, "ddpm_chain_runs": ref_chains},
        "jaxdiff": {"network_call_s": our_call, "ddpm_chain_s": our_chain,
                    "first_network_call_s": first_call, "first_chain_s": first_chain,
                    "network_call_runs": our_calls, "ddpm_chain_runs": our_chains},
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"openai UNetModel, {result['parameters'] / 1e6:.1f}M parameters, batch {b}, "
        f"{result['steps']}-step respaced DDPM; {result['machine']}; jax {jax.__version__}, "
        f"torch {torch.__version__}; median of {args.repeats}; outputs agree within "
        f"{error:.1e} of the largest",
        "",
        "| what | improved-diffusion | jaxdiff | ratio |",
        "|---|---|---|---|",
    ]
    for name, label in ROWS:
        ref_value, ours_value = result["reference"].get(name), result["jaxdiff"][name]
        ratio = f"{ours_value / ref_value:.2f}" if ref_value else "-"
        ref_text = f"{ref_value:.3f}" if ref_value else "- (eager)"
        lines.append(f"| {label} | {ref_text} | {ours_value:.3f} | {ratio} |")
    lines.append("")
    command = shlex.join(["python", "experiments/bench_openai.py", *(argv or sys.argv[1:])])
    lines.append(f"Command: `PYTHONPATH=. {command}`")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
