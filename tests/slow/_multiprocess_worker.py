"""One JAX process of tests/slow/test_multiprocess.py: train the tiny run into a workdir.

    python -m tests.slow._multiprocess_worker WORKDIR STEPS PROCESS_ID NUM_PROCESSES PORT

With NUM_PROCESSES > 1 it joins the others over ``jax.distributed`` on 127.0.0.1:PORT (gloo
collectives on the CPU, one device per process); with 1 it runs alone on the devices that
``XLA_FLAGS=--xla_force_host_platform_device_count`` gives it. The configuration is ``config()``,
shared with the test so that both sides restore the same structure.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAXDIFF_COMPILATION_CACHE", "none")

import jax  # noqa: E402

from jaxdiff import runner  # noqa: E402


def config(steps: int) -> runner.Config:
    """The tiny run: a one-stage U-Net of width 8 on 8x8 digits (the smallest to compile), a
    checkpoint every 2 steps."""
    return runner.Config(
        model=runner.ModelConfig(dim=8, dim_mults=(1,)),
        diffusion=runner.DiffusionConfig(timesteps=20),
        data=runner.DataConfig(image_size=8),
        run=runner.RunConfig(
            steps=steps,
            batch_size=8,
            save_every=2,
            keep=2,
            log_every=2,
            sample_every=1000,
            num_samples=4,
            sample_steps=2,
            eval_every=0,
        ),
    )


def main(argv: list[str]) -> int:
    workdir, steps, process_id, num_processes, port = argv
    process_id, num_processes = int(process_id), int(num_processes)
    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    if num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{port}",
            num_processes=num_processes,
            process_id=process_id,
            local_device_ids=[0],
            initialization_timeout=60,
        )
    state = runner.train_and_evaluate(config(int(steps)), workdir)
    print(
        f"process {jax.process_index()}/{jax.process_count()} done at step {int(state.step)} "
        f"on {jax.device_count()} devices",
        flush=True,
    )
    if num_processes > 1:
        jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
