"""Array conversion shared by the weight readers (``jaxdiff.convert`` and the networks' loaders)."""

import numpy as np


def to_numpy(value) -> np.ndarray:
    """A numpy array from a numpy / JAX array or a torch tensor (without importing torch)."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu()
        if str(value.dtype) in ("torch.bfloat16", "torch.float16"):
            value = value.float()
        value = value.numpy()
    return np.asarray(value)
