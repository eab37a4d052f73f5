"""Layers the model files share: Linear, an affine LayerNorm, the fan-in kernel initialiser, the
variable type of persistent buffers, and the block-level remat policies.

Each layer keeps its parameters in `param_dtype` and computes in `dtype`; LayerNorm statistics
are float32 whatever the dtype. Parameters carry logical axis names (`sharding.param`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cogvideox_jax import sharding


class Buffer(nnx.Variable):
    """A stored, non-trained tensor (diffusers' persistent buffers: 5B-I2V's position table).
    Converted and loaded with the parameters (`nnx.state(model, (nnx.Param, Buffer))`)."""


# Which activations a scanned block keeps for its backward, by the name models take as `remat`.
# "attn_out" is the `checkpoint_name` of the attention output in both the transformer and T5.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention": jax.checkpoint_policies.save_only_these_names("attn_out"),
    # Saves what save_dots saves, in host memory (the `pinned_host` memory kind; TPU and GPU,
    # and XLA's CPU backend, which makes it a copy).
    "offload_dots": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}


def kernel_init(in_axes, out_axes):
    """Truncated-normal initialiser with variance 1 / fan-in, fan-in over the kernel's `in_axes`
    (an int or a tuple of axes; a head-split kernel has two)."""
    return jax.nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axes, out_axes
    )


class Linear(nnx.Module):
    """x @ kernel + bias, plus an optional LoRA adapter's term: (..., din) -> (..., dout).

    Args:
      din, dout: input and output features.
      names: logical axis names of the (din, dout) kernel; the bias takes `names[1:]`.
      zero_init: a zero kernel instead of `kernel_init`'s draw.
    """

    def __init__(self, din, dout, names, *, zero_init=False, dtype, param_dtype, rngs):
        init = jax.nn.initializers.zeros if zero_init else kernel_init(0, 1)
        self.kernel = sharding.param(init(rngs.params(), (din, dout), param_dtype), names)
        self.bias = sharding.param(jnp.zeros((dout,), param_dtype), names[1:])
        self.dtype = dtype
        self.lora = nnx.data(None)  # a LoRA adapter (cogvideox_jax.lora.attach)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x.astype(self.dtype) @ self.kernel[...].astype(self.dtype)
        if self.lora is not None:
            y = y + self.lora(x)
        return y + self.bias[...].astype(self.dtype)


class LayerNorm(nnx.Module):
    """Affine LayerNorm over the last axis (`dim` features); statistics (two-pass variance) and
    affine in float32, cast back to `dtype`."""

    def __init__(self, dim, eps, *, dtype, param_dtype):
        self.scale = sharding.param(jnp.ones((dim,), param_dtype), (None,))
        self.bias = sharding.param(jnp.zeros((dim,), param_dtype), (None,))
        self.eps, self.dtype = eps, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return layer_norm(x, self.scale[...], self.bias[...], self.eps, self.dtype)


def layer_norm(x, scale, bias, eps: float, dtype):
    """`LayerNorm` as a function of its parameters: x (..., dim), scale and bias (dim,) ->
    (..., dim) in `dtype`. For callers that fuse it with more elementwise work."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(dtype)
