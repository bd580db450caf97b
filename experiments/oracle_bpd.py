"""Bits/dim of an x0 oracle (a model that predicts x0 exactly) on a constant image, for the
schedules and variance types of improved-diffusion, next to upstream calc_bpd_loop's figure read
from the parity fixtures. Run: python experiments/oracle_bpd.py
"""

import json
import pathlib
import time

import jax
import numpy as np

from jaxdiff import gaussian, likelihood, schedules

FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "tests/parity/fixtures/bpd_openai.npz"


def main() -> None:
    data = np.load(FIXTURE)
    meta = json.loads(str(data["__meta__"]))
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
    print("| schedule | T | variance | image | jaxdiff bpd | upstream bpd | seconds |")
    print("|---|---|---|---|---|---|---|")
    for case, m in sorted(meta.items()):
        if m["kind"] != "oracle":
            continue
        c = gaussian.make_coeffs(
            schedules.get_named_beta_schedule(m["schedule"], m["T"]), rescale_timesteps=True
        )
        x0 = np.moveaxis(data[f"{case}/x0"], 1, -1)
        run = jax.jit(
            lambda key, x0=x0, m=m, c=c: (
                likelihood.calc_bpd_loop(
                    lambda x, t: x0, c, x0, key=key, mean_type="x0", var_type=m["var_type"].lower()
                ).total_bpd
            )
        )
        run(jax.random.PRNGKey(0)).block_until_ready()
        start = time.perf_counter()
        ours = float(np.mean(run(jax.random.PRNGKey(1)).block_until_ready()))
        seconds = time.perf_counter() - start
        upstream = float(np.mean(data[f"{case}/total_bpd"]))
        image = "0" if m["constant"] == 0 else "pixel 128"
        print(
            f"| {m['schedule']} | {m['T']} | {m['var_type'].lower()} | {image} | {ours:.6f} | "
            f"{upstream:.6f} | {seconds:.2f} |"
        )


if __name__ == "__main__":
    main()
