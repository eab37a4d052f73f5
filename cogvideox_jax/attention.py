"""The one attention entry point of the library; kernel choice and context parallelism live here.

Layout (B, L, N, K): batch, tokens, heads, head dim. Scale 1/sqrt(K). CogVideoX attends over the
whole [text; video] sequence, text padding included (diffusers' CogVideoXAttnProcessor2_0). Two
masks, never both: `kv_valid` hides the tokens the transformer appends so that the sequence
divides over the context-parallel shards; `segment_ids` (B, L) int32 makes attention
block-diagonal for packed rows of several clips (a token attends exactly the tokens with its
id; the packer's padding, id 0, attends only padding). Logits and softmax run in float32
whatever the input dtype (all kernels below).

Kernels (`impl`):
  xla     the whole (Lq, Lk) softmax at once in plain JAX (`_softmax_attention`); every
          backend. Our own rather than jax.nn.dot_product_attention(implementation="xla"),
          which is slower on XLA:CPU at the sampling benchmark's shapes (BENCHMARKS.md,
          "2026-11-22, later"). The row maximum is `compiler.rowmax`, the row sums a product
          with a ones vector, and a scale that is a power of two (head dim 64: 1/8) multiplies
          q instead of the logits, which gives the same logits bit for bit with one pass less
          over them.
  cudnn   cuDNN flash attention through jax.nn.dot_product_attention; GPU, bf16/fp16 only.
          Segment ids become its boolean `mask`, which jax 0.10 turns into an additive
          (B, 1, Lq, Lk) bias (`combine_bias_and_mask`): correct, but O(L^2) memory. cuDNN's
          own packed layout (q/kv offsets) needs each segment contiguous, and a packed joint
          sequence is not ([text of clips 1..G; video of clips 1..G]).
  splash  `cogvideox_jax.splash.attention(q, k, v, *, kv_valid=None, segment_ids=None)`, the
          TPU Pallas splash kernel (imported on first use). Contract: q (B, Lq, N, K), k and v
          (B, Lk, N, K), one device's shard (it is called inside `jax.shard_map` whenever a
          mesh is set); keys at positions >= kv_valid (a Python int, or None for all) get zero
          weight; segment_ids (q ids (B, Lq), kv ids (B, Lk)) go to the kernel's SegmentIds;
          returns (B, Lq, N, K) in q's dtype, softmax(q k^T / sqrt(K)) v.
  blocked `cogvideox_jax.blocked.attention`: flash-style tiles with an online softmax and its own
          backward, in plain JAX; every backend. O(L x block) memory instead of O(L^2), and on
          XLA:CPU faster than `xla` at CogVideoX's lengths (BENCHMARKS.md, "Attention alone").
  auto    cudnn on GPU for bf16/fp16 inputs, splash on TPU, blocked on CPU for sequences of at
          least BLOCKED_MIN_LENGTH tokens, xla otherwise.

Context parallelism (`context_parallel`), used when the current mesh (jax.set_mesh) splits the
token axis (the `length` rule of cogvideox_jax.sharding, `context` by default); the batch stays
split as `batch` and the heads as `act_heads`:
  allgather  each shard keeps its queries and all-gathers K and V (memory O(L) per device for
             K/V; simplest, no constraint on heads).
  ulysses    all-to-all from token-sharded to head-sharded, full-length attention on the local
             heads, all-to-all back (DeepSpeed-Ulysses, arXiv 2309.14509). The heads of a tensor
             shard must divide by the number of token shards.
Segment ids are sharded like the tokens; both modes all-gather them for the keys (and ulysses
for its full-length queries too).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from cogvideox_jax import blocked, compiler, sharding

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash", "blocked")
BLOCKED_MIN_LENGTH = 1024  # below it, on CPU, `auto` keeps the unblocked xla kernel
CONTEXT_PARALLEL = ("allgather", "ulysses")

_NAMES = ("batch", "length", "act_heads", None)  # the logical axes of q, k, v and the output


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    impl: str = "auto",
    kv_valid: int | None = None,
    segment_ids: jax.Array | None = None,
    context_parallel: str = "allgather",
) -> jax.Array:
    """softmax(q k^T / sqrt(K)) v for (B, L, N, K) inputs -> (B, L, N, K) in q's dtype; keys at
    positions >= kv_valid (a Python int) are ignored; with segment_ids (B, L) int32 (q and k/v
    the same sequence) a query attends only the keys of its own id. `impl` and
    `context_parallel`: see the module docstring."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    if context_parallel not in CONTEXT_PARALLEL:
        raise ValueError(
            f"context_parallel must be one of {CONTEXT_PARALLEL}, got {context_parallel!r}"
        )
    if segment_ids is not None:
        if kv_valid is not None:
            raise ValueError("pass kv_valid or segment_ids, not both (give padding its own id)")
        if segment_ids.shape != q.shape[:2] or q.shape[1] != k.shape[1]:
            raise ValueError(
                f"segment_ids must be (B, L) = {q.shape[:2]} for self-attention over one "
                f"sequence, got {segment_ids.shape} with k {k.shape}"
            )
    impl = resolve(impl, q.dtype, q.shape[1])
    mesh = jax.sharding.get_abstract_mesh()
    cp = sharding.num_shards("length")
    # Without a mesh, or with an unsplit token axis, the XLA and cuDNN calls are partitioned by
    # the compiler (batch and heads); a Pallas kernel is not, so splash always runs per shard.
    if mesh.empty or (cp == 1 and impl != "splash"):
        return _kernel(q, k, v, impl, kv_valid, segment_ids, segment_ids)
    if q.shape[1] % cp:
        raise ValueError(
            f"{q.shape[1]} tokens do not divide over {cp} context shards; the transformer pads "
            "its sequence to a multiple of sharding.num_shards('length')"
        )
    spec = sharding.mesh_spec(_NAMES, q.shape)  # (batch, length, heads, None) mesh axes
    length_axes = spec[1]
    kw = dict(impl=impl, kv_valid=kv_valid)
    if cp == 1:
        body = _local
    elif context_parallel == "allgather":
        body = functools.partial(_allgather, axes=length_axes)
    else:
        heads = q.shape[2] // _size(spec[2], mesh)
        if heads % cp:
            raise ValueError(
                f"ulysses context parallelism needs the heads of a tensor shard ({heads} of "
                f"{q.shape[2]}) to divide by the context size {cp}; use "
                "context_parallel='allgather' or another mesh"
            )
        body = functools.partial(_ulysses, axes=length_axes)
    body = functools.partial(body, **kw)
    # Pallas' splash kernel declares its outputs without varying-axes types, which
    # check_vma=True rejects ("manual_axis_type ... must not be None"; found by tools.aot).
    check_vma = impl != "splash"
    if segment_ids is None:
        f = jax.shard_map(
            lambda q, k, v: body(q, k, v, None),
            in_specs=(spec,) * 3,
            out_specs=spec,
            check_vma=check_vma,
        )
        return f(q, k, v)
    ids_spec = P(spec[0], spec[1])  # sharded like the tokens
    f = jax.shard_map(body, in_specs=(spec,) * 3 + (ids_spec,), out_specs=spec, check_vma=check_vma)
    return f(q, k, v, segment_ids)


def resolve(impl: str, dtype, length: int | None = None) -> str:
    """The kernel `impl="auto"` stands for on the default backend (others unchanged), for a
    sequence of `length` tokens (None: long)."""
    if impl != "auto":
        return impl
    backend = jax.default_backend()
    if backend == "tpu":
        return "splash"
    if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    if backend == "cpu" and (length is None or length >= BLOCKED_MIN_LENGTH):
        return "blocked"
    return "xla"


def _kernel(q, k, v, impl, kv_valid, q_ids=None, kv_ids=None):
    """One device's (or the compiler-partitioned) attention; K/V may be longer than q.
    q_ids (B, Lq) and kv_ids (B, Lk): segment ids, or both None."""
    if kv_valid is not None and kv_valid >= k.shape[1]:
        kv_valid = None
    if impl == "splash":
        from cogvideox_jax import splash  # TPU only: spares other backends the Pallas TPU import

        if q_ids is None:
            return splash.attention(q, k, v, kv_valid=kv_valid)
        return splash.attention(q, k, v, segment_ids=(q_ids, kv_ids))
    if impl == "blocked":
        return blocked.attention(q, k, v, kv_valid=kv_valid, q_ids=q_ids, kv_ids=kv_ids)
    mask = None if q_ids is None else (q_ids[:, None, :, None] == kv_ids[:, None, None, :])
    if impl == "cudnn":
        lengths = None if kv_valid is None else jnp.full((q.shape[0],), kv_valid, jnp.int32)
        return jax.nn.dot_product_attention(
            q, k, v, mask=mask, key_value_seq_lengths=lengths, implementation="cudnn"
        )  # mask (B, 1, Lq, Lk)
    if kv_valid is not None:
        mask = jnp.asarray(np.arange(k.shape[1]) < kv_valid)  # (Lk,)
    return _softmax_attention(q, k, v, mask)


def _softmax_attention(q, k, v, keep=None):
    """The `xla` kernel: (B, Lq, N, K) queries, (B, Lk, N, K) keys and values -> (B, Lq, N, K);
    keys where `keep` (broadcastable to (B, 1, Lq, Lk)) is False get zero weight. Logits, softmax
    and the weighted sum accumulate in float32; the weights meet v in v's dtype, as in
    jax.nn.dot_product_attention. A row with no key kept averages all its keys (all its logits
    are the same large negative number), as there."""
    f32 = jnp.float32
    scale = q.shape[-1] ** -0.5
    if math.log2(scale).is_integer():  # exact in any float: the same logits, bit for bit
        q = q * jnp.asarray(scale, q.dtype)
        s = jnp.einsum("bqnk,bsnk->bnqs", q, k, preferred_element_type=f32)
    else:
        s = jnp.einsum("bqnk,bsnk->bnqs", q, k, preferred_element_type=f32) * scale
    if keep is not None:
        s = jnp.where(keep, s, blocked.MASKED)
    p = jnp.exp(s - compiler.rowmax(s)[..., None])
    denom = p @ jnp.ones(p.shape[-1], f32)  # (B, N, Lq)
    o = jnp.einsum("bnqs,bsnk->bnqk", p.astype(v.dtype), v, preferred_element_type=f32)
    return (o / denom[..., None]).transpose(0, 2, 1, 3).astype(q.dtype)


def _local(q, k, v, ids, *, impl, kv_valid):
    """The kernel on one shard when the token axis is not split."""
    return _kernel(q, k, v, impl, kv_valid, ids, ids)


def _allgather(q, k, v, ids, *, axes, impl, kv_valid):
    """Local queries (b, L/c, n, K) against the gathered keys and values (b, L, n, K)."""
    k, v = (jax.lax.all_gather(x, axes, axis=1, tiled=True) for x in (k, v))
    kv_ids = None if ids is None else jax.lax.all_gather(ids, axes, axis=1, tiled=True)
    return _kernel(q, k, v, impl, kv_valid, ids, kv_ids)


def _ulysses(q, k, v, ids, *, axes, impl, kv_valid):
    """(b, L/c, n, K) -> all heads' tokens (b, L, n/c, K) -> attention -> (b, L/c, n, K)."""
    to_heads = functools.partial(
        jax.lax.all_to_all, axis_name=axes, split_axis=2, concat_axis=1, tiled=True
    )
    ids = None if ids is None else jax.lax.all_gather(ids, axes, axis=1, tiled=True)
    o = _kernel(to_heads(q), to_heads(k), to_heads(v), impl, kv_valid, ids, ids)
    return jax.lax.all_to_all(o, axes, split_axis=1, concat_axis=2, tiled=True)


def _size(entry, mesh) -> int:
    axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
    return int(np.prod([mesh.shape[a] for a in axes]))
