"""The one attention entry point of the library; kernel choice and context parallelism live here.

Layout (B, L, N, K): batch, tokens, heads, head dim. Scale 1/sqrt(K). CogVideoX attends over the
whole [text; video] sequence, text padding included (diffusers' CogVideoXAttnProcessor2_0); the
only mask is `kv_valid`, which hides the tokens the transformer appends so that the sequence
divides over the context-parallel shards. Logits and softmax run in float32 whatever the input
dtype (all kernels below).

Kernels (`impl`):
  xla     jax.nn.dot_product_attention(implementation="xla"); every backend.
  cudnn   cuDNN flash attention through jax.nn.dot_product_attention; GPU, bf16/fp16 only.
  splash  `cogvideox_jax.splash.attention(q, k, v, *, kv_valid=None)`, the TPU Pallas splash
          kernel (imported on first use). Contract: q (B, Lq, N, K), k and v (B, Lk, N, K), one
          device's shard (it is called inside `jax.shard_map` whenever a mesh is set); keys at
          positions >= kv_valid (a Python int, or None for all) get zero weight; returns
          (B, Lq, N, K) in q's dtype, softmax(q k^T / sqrt(K)) v.
  auto    cudnn on GPU for bf16/fp16 inputs, splash on TPU, xla otherwise.

Context parallelism (`context_parallel`), used when the current mesh (jax.set_mesh) splits the
token axis (the `length` rule of cogvideox_jax.sharding, `context` by default); the batch stays
split as `batch` and the heads as `act_heads`:
  allgather  each shard keeps its queries and all-gathers K and V (memory O(L) per device for
             K/V; simplest, no constraint on heads).
  ulysses    all-to-all from token-sharded to head-sharded, full-length attention on the local
             heads, all-to-all back (DeepSpeed-Ulysses, arXiv 2309.14509). The heads of a tensor
             shard must divide by the number of token shards.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from cogvideox_jax import sharding

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
CONTEXT_PARALLEL = ("allgather", "ulysses")

_NAMES = ("batch", "length", "act_heads", None)  # the logical axes of q, k, v and the output


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    impl: str = "auto",
    kv_valid: int | None = None,
    context_parallel: str = "allgather",
) -> jax.Array:
    """softmax(q k^T / sqrt(K)) v for (B, L, N, K) inputs; keys at positions >= kv_valid (a
    Python int) are ignored."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    if context_parallel not in CONTEXT_PARALLEL:
        raise ValueError(
            f"context_parallel must be one of {CONTEXT_PARALLEL}, got {context_parallel!r}"
        )
    impl = resolve(impl, q.dtype)
    mesh = jax.sharding.get_abstract_mesh()
    cp = sharding.num_shards("length")
    # Without a mesh, or with an unsplit token axis, the XLA and cuDNN calls are partitioned by
    # the compiler (batch and heads); a Pallas kernel is not, so splash always runs per shard.
    if mesh.empty or (cp == 1 and impl != "splash"):
        return _kernel(q, k, v, impl, kv_valid)
    if q.shape[1] % cp:
        raise ValueError(
            f"{q.shape[1]} tokens do not divide over {cp} context shards; the transformer pads "
            "its sequence to a multiple of sharding.num_shards('length')"
        )
    spec = sharding.mesh_spec(_NAMES, q.shape)  # (batch, length, heads, None) mesh axes
    length_axes = spec[1]
    if cp == 1:
        body = functools.partial(_kernel, impl=impl, kv_valid=kv_valid)
    elif context_parallel == "allgather":
        body = functools.partial(_allgather, axes=length_axes, impl=impl, kv_valid=kv_valid)
    else:
        heads = q.shape[2] // _size(spec[2], mesh)
        if heads % cp:
            raise ValueError(
                f"ulysses context parallelism needs the heads of a tensor shard ({heads} of "
                f"{q.shape[2]}) to divide by the context size {cp}; use "
                "context_parallel='allgather' or another mesh"
            )
        body = functools.partial(_ulysses, axes=length_axes, impl=impl, kv_valid=kv_valid)
    # Pallas' splash kernel declares its outputs without varying-axes types, which
    # check_vma=True rejects ("manual_axis_type ... must not be None"; found by tools.aot).
    check_vma = impl != "splash"
    return jax.shard_map(body, in_specs=(spec,) * 3, out_specs=spec, check_vma=check_vma)(q, k, v)


def resolve(impl: str, dtype) -> str:
    """The kernel `impl="auto"` stands for on the default backend (others unchanged)."""
    if impl != "auto":
        return impl
    backend = jax.default_backend()
    if backend == "tpu":
        return "splash"
    if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "xla"


def _kernel(q, k, v, impl, kv_valid):
    """One device's (or the compiler-partitioned) attention; K/V may be longer than q."""
    if kv_valid is not None and kv_valid >= k.shape[1]:
        kv_valid = None
    if impl == "splash":
        from cogvideox_jax import splash

        return splash.attention(q, k, v, kv_valid=kv_valid)
    lengths = None if kv_valid is None else jnp.full((q.shape[0],), kv_valid, jnp.int32)
    return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation=impl)


def _allgather(q, k, v, *, axes, impl, kv_valid):
    """Local queries (b, L/c, n, K) against the gathered keys and values (b, L, n, K)."""
    k, v = (jax.lax.all_gather(x, axes, axis=1, tiled=True) for x in (k, v))
    return _kernel(q, k, v, impl, kv_valid)


def _ulysses(q, k, v, *, axes, impl, kv_valid):
    """(b, L/c, n, K) -> all heads' tokens (b, L, n/c, K) -> attention -> (b, L/c, n, K)."""
    to_heads = functools.partial(
        jax.lax.all_to_all, axis_name=axes, split_axis=2, concat_axis=1, tiled=True
    )
    o = _kernel(to_heads(q), to_heads(k), to_heads(v), impl, kv_valid)
    return jax.lax.all_to_all(o, axes, split_axis=1, concat_axis=2, tiled=True)


def _size(entry, mesh) -> int:
    axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
    return int(np.prod([mesh.shape[a] for a in axes]))
