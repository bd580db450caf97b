"""Write failures on a real, small tmpfs (run by tests/unit/test_checkpoint_faults.py inside
``unshare -m``, so that the mount is private to this process and vanishes with it).

    python -m tests.unit._checkpoint_fault_worker MOUNTPOINT

Prints one JSON line per scenario on stdout: which error class was raised, its message, and the
steps left on disk. Everything else the libraries print goes to stderr, which the test counts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxdiff import checkpoint, train  # noqa: E402

SIZE = "2m"  # the tmpfs; the big state below needs about 6.4 MB (params, EMA, Adam's mu, nu)


def state(step: int, n: int) -> train.TrainState:
    w = np.random.default_rng(step).standard_normal((n,)).astype(np.float32)
    s = train.create_train_state(
        {"w": jnp.asarray(w)}, train.default_optimizer(), jax.random.key(1)
    )
    return s.replace(step=jnp.int32(step))


def scenario(name: str, workdir: str, fn) -> None:
    try:
        result = {"returned": repr(fn())}
    except Exception as err:  # noqa: BLE001 - reported to the test
        result = {"error": type(err).__name__, "message": str(err)}
    result["steps"] = checkpoint.all_steps(workdir)
    result["entries"] = sorted(os.listdir(checkpoint.checkpoint_dir(workdir)))
    print(json.dumps({"scenario": name, **result}), flush=True)


def main(mnt: str) -> None:
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs", mnt], check=True)
    wd = os.path.join(mnt, "run")
    small, big = 1000, 400_000

    with checkpoint.Checkpoints(wd, keep=1, save_every=2, async_save=False) as ckpt:
        scenario("first", wd, lambda: ckpt.save(state(2, small)))
        # keep=1: a successful step 4 would rotate step 2 out; the failed one must not.
        scenario("full_sync", wd, lambda: ckpt.save(state(4, big)))
        scenario("retry_after_full", wd, lambda: ckpt.save(state(4, small)))

    with checkpoint.Checkpoints(wd, keep=1, save_every=2, async_save=True) as ckpt:
        scenario("full_async_started", wd, lambda: ckpt.save(state(6, big)))
        # The background failure surfaces at the next save, naming its step.
        scenario("full_async_next_save", wd, lambda: ckpt.save(state(8, small)))
        scenario("full_async_wait", wd, lambda: (ckpt.save(state(10, big)), ckpt.wait()))

    restored = checkpoint.restore(wd, state(0, small))
    same = bool(np.array_equal(np.asarray(restored.params["w"]), state(4, small).params["w"]))
    print(json.dumps({"scenario": "restore_after_faults", "equal": same}), flush=True)

    subprocess.run(["mount", "-o", "remount,ro", mnt], check=True)
    for mode in (False, True):
        with checkpoint.Checkpoints(wd, keep=1, save_every=2, async_save=mode) as ckpt:
            scenario(
                f"read_only_async={mode}", wd, lambda: (ckpt.save(state(12, small)), ckpt.wait())
            )

    fresh = os.path.join(mnt, "fresh")
    for name, fn in {
        "read_only_new_workdir": lambda: checkpoint.Checkpoints(fresh),
        "read_only_lock": lambda: checkpoint.WorkdirLock(wd).acquire(),
    }.items():
        try:
            fn()
            result = {"returned": "ok"}
        except Exception as err:  # noqa: BLE001 - reported to the test
            result = {"error": type(err).__name__, "message": str(err)}
        print(json.dumps({"scenario": name, **result}), flush=True)
    subprocess.run(["umount", mnt], check=True)


if __name__ == "__main__":
    main(sys.argv[1])
