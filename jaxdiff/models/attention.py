"""The attention layers of the denoising-diffusion-pytorch networks, channels-last Flax linen.

``LinearAttention`` (Shen et al. 2021) and ``Attention`` (softmax over all pixels), both with
an RMSNorm in front (the reference's ``PreNorm``) and ``num_mem_kv`` learned memory key/value
slots prepended to the sequence; the residual is added by the caller. Their parameters are
named like the reference's modules (``to_qkv``, ``to_out``, ``mem_kv``), so
:mod:`jaxdiff.convert` maps them one to one.

Reference: lucidrains/denoising-diffusion-pytorch 2.3.4.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models.layers import RMSNorm, _torch_bias_init, _torch_kernel_init

__all__ = ["Attention", "LinearAttention"]


class _Params(nn.Module):
    """A layer's parameters without its computation: ``(kernel [fan_in, features], bias)``.

    Named and initialised like the ``nn.Dense`` it stands for (bias only with ``use_bias``), so
    checkpoints and :mod:`jaxdiff.convert` see the same tree; the attention layers below apply
    the kernels in per-head pieces.
    """

    fan_in: int
    features: int
    use_bias: bool = True

    @nn.compact
    def __call__(self):
        kernel = self.param(
            "kernel", _torch_kernel_init(), (self.fan_in, self.features), jnp.float32
        )
        if not self.use_bias:
            return kernel, None
        return kernel, self.param("bias", _torch_bias_init(self.fan_in), (self.features,))


class _AttentionBase(nn.Module):
    """Shared parts of the two attention layers, computed head by head.

    XLA on CPU turns every [B, N, heads, d] <-> [B, heads, N, d] transposition, and the
    gradient of every slice of a wide projection, into a copy of the whole activation; at 32x32
    those copies cost more than the attention's arithmetic. So every head gets its own
    [B, N, d] projections from a column block of the (unchanged) ``to_qkv`` kernel, and each
    per-head product is a plain batched matmul. ``cifar-small``, batch 16, forward + backward
    on 2 CPU cores: 505 -> 470 ms; the attention layers alone now run faster than PyTorch's
    (see BENCHMARKS.md).
    """

    heads: int
    dim_head: int
    num_mem_kv: int
    dtype: Any = None

    def _setup(self, x):
        """Pre-norm; return the normalised [B, N, C] input, the to_qkv kernel and the memory
        key/values [2, heads, M, d]."""
        b, hh, ww, c = x.shape
        x = RMSNorm(name="norm")(x).reshape(b, hh * ww, c)
        kernel, _ = _Params(c, 3 * self.heads * self.dim_head, False, name="to_qkv")()
        return x, kernel.astype(x.dtype), self._memory().astype(x.dtype)

    def _memory(self) -> jax.Array:
        """The memory key/values [2, heads, num_mem_kv, d], a parameter ``mem_kv`` ~ N(0, 1)
        (present, empty, when num_mem_kv is 0). Layers without the parameter override this."""
        return self.param(
            "mem_kv",
            nn.initializers.normal(1.0),
            (2, self.heads, self.num_mem_kv, self.dim_head),
            jnp.float32,
        )

    def _project(self, x, kernel, which: int, head: int):
        """q (which=0), k (1) or v (2) of one head: [B, N, d]."""
        start = (which * self.heads + head) * self.dim_head
        return jnp.dot(x, kernel[:, start : start + self.dim_head])


class LinearAttention(_AttentionBase):
    """Linear attention (Shen et al. 2021, "Efficient Attention") with memory key/values.

    .. math::
        q \\leftarrow \\mathrm{softmax}_d(q) / \\sqrt{d},\\quad
        k \\leftarrow \\mathrm{softmax}_n(k),\\quad
        \\mathrm{out}_{n e} = \\sum_d q_{n d} \\sum_m k_{m d} v_{m e}

    followed by a 1x1 convolution and an RMSNorm. The residual is added by the caller.

    Computed as ``out = q_all @ W`` with ``W[b] = concat_h(context_h[b] @ to_out_h)``, a
    [heads * d, C] matrix per image: the per-head outputs are never formed, and the softmax of
    q over d works on a free [B, N, heads, d] view of one projection.
    """

    @nn.compact
    def __call__(self, x):
        b, hh, ww, c = x.shape
        hidden = self.heads * self.dim_head
        x, kernel, mem = self._setup(x)
        out_kernel, out_bias = _Params(hidden, c, name="to_out")()
        out_kernel, out_bias = out_kernel.astype(x.dtype), out_bias.astype(x.dtype)
        q = jnp.dot(x, kernel[:, :hidden]).reshape(b, hh * ww, self.heads, self.dim_head)
        q = jax.nn.softmax(q.astype(jnp.float32), axis=-1) * self.dim_head**-0.5
        q = q.astype(x.dtype).reshape(b, hh * ww, hidden)
        mixed = []
        for h in range(self.heads):
            k = self._project(x, kernel, 1, h).astype(jnp.float32)
            v = self._project(x, kernel, 2, h)
            # softmax of k over the memory slots and the N pixels together, without
            # concatenating them: shared maximum, one normaliser. With num_mem_kv = 0 it is
            # the softmax over the pixels alone (the reference concatenates zero slots).
            peak = jnp.max(k, axis=1, keepdims=True)  # [B, 1, d]
            if self.num_mem_kv:
                mem_k, mem_v = mem[0, h].astype(jnp.float32), mem[1, h]  # [M, d]
                peak = jnp.maximum(peak, jnp.max(mem_k, axis=0)[None, None])
            weight = jnp.exp(k - peak)
            total = jnp.sum(weight, axis=1)  # [B, d]
            context = jnp.einsum("bnd,bne->bde", weight.astype(v.dtype), v)
            if self.num_mem_kv:
                mem_weight = jnp.exp(mem_k[None] - peak)  # [B, M, d]
                total = total + jnp.sum(mem_weight, axis=1)
                context = context + jnp.einsum("bmd,me->bde", mem_weight.astype(v.dtype), mem_v)
            context = (context.astype(jnp.float32) / total[:, :, None]).astype(x.dtype)
            rows = out_kernel[h * self.dim_head : (h + 1) * self.dim_head]
            mixed.append(jnp.einsum("bde,ec->bdc", context, rows))
        out = jnp.einsum("bni,bic->bnc", q, jnp.concatenate(mixed, axis=1))
        out = (out + out_bias[None, None]).reshape(b, hh, ww, c)
        return RMSNorm(name="to_out_norm")(out)


class Attention(_AttentionBase):
    """Multi-head softmax attention over all pixels, with memory key/values.

    ``softmax(q k^T / sqrt(d)) v`` then a 1x1 convolution; the residual is added by the caller.
    """

    @nn.compact
    def __call__(self, x):
        b, hh, ww, c = x.shape
        x, kernel, mem = self._setup(x)
        out_kernel, out_bias = _Params(self.heads * self.dim_head, c, name="to_out")()
        out_kernel, out_bias = out_kernel.astype(x.dtype), out_bias.astype(x.dtype)
        out = out_bias[None, None]
        for h in range(self.heads):
            q = self._project(x, kernel, 0, h) * self.dim_head**-0.5
            k = self._project(x, kernel, 1, h)
            v = self._project(x, kernel, 2, h)
            k = jnp.concatenate([jnp.broadcast_to(mem[0, h], (b, *mem.shape[2:])), k], axis=1)
            v = jnp.concatenate([jnp.broadcast_to(mem[1, h], (b, *mem.shape[2:])), v], axis=1)
            logits = jnp.einsum("bnd,bmd->bnm", q, k).astype(jnp.float32)
            weights = jax.nn.softmax(logits, axis=-1).astype(x.dtype)
            rows = out_kernel[h * self.dim_head : (h + 1) * self.dim_head]
            out = out + jnp.dot(jnp.einsum("bnm,bmd->bnd", weights, v), rows)
        return out.reshape(b, hh, ww, c)
