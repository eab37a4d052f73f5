"""Full (non-causal) attention with the TPU splash kernel, in the layout of `attention.py`.

jax.experimental.pallas.ops.tpu.splash_attention works on one sample, (N, L, K) per input, and
needs lengths that are multiples of its blocks; this wrapper takes (B, L, N, K), scales q by
1/sqrt(K) (the kernel does not scale), pads the sequence to a block multiple and masks the
padded keys with segment ids (valid keys segment 0, padding 1; every query row is segment 0, so
no row is fully masked, which the kernel forbids), then vmaps over the batch and trims.
`kv_valid` marks keys from that position on as padding too (a joint sequence padded by its
caller, e.g. for context-parallel shards). Packed rows pass their own `segment_ids` instead; the
block padding then gets id -1 on the keys (no real query has it) and, on the queries, the id of
the first key (so no padded query row is empty either).

Mosaic kernels cannot be partitioned by GSPMD, so under a mesh the call runs in a `shard_map`
over the mesh axes that are not already manual: batch and heads stay sharded as the sharding
rules say, q keeps its `length` (context) sharding and k/v are gathered whole, the all-gather-KV
context parallelism of MaxText and maxdiffusion. Inside a caller's own shard_map over every axis
the kernel runs on the local arrays directly.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as sa
from jax.sharding import PartitionSpec

from cogvideox_jax import sharding

# Tiles for long sequences (17k-86k tokens): 512 rows of q and of k/v per step, the sizes MaxText
# uses by default (`sa_block_q` etc.); short sequences use a single block.
BLOCK = 512
LANES = 128  # block sizes must be multiples of the TPU lane width


def _block(length: int) -> int:
    return min(BLOCK, -(-length // LANES) * LANES)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    kv_valid: int | None = None,
    segment_ids: tuple[jax.Array, jax.Array] | None = None,
    interpret: bool = False,
) -> jax.Array:
    """softmax(q k^T / sqrt(K)) v for (B, L, N, K) inputs, keys at positions >= kv_valid
    ignored; segment_ids = (q ids (B, Lq), kv ids (B, Lk)) int32 >= 0: a query attends only keys
    of its id, and every query's id must occur among the keys. `interpret` runs the kernel in
    the Pallas interpreter (CPU tests)."""
    if k.shape != v.shape or q.shape[::2] != k.shape[::2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q, k, v must be (B, L, N, K) alike, got {q.shape, k.shape, v.shape}")
    length = k.shape[1]
    if kv_valid is not None and not 0 < kv_valid <= length:
        raise ValueError(f"kv_valid={kv_valid} must be in [1, {length}]")
    if segment_ids is not None:
        if kv_valid is not None:
            raise ValueError("pass kv_valid or segment_ids, not both")
        if segment_ids[0].shape != q.shape[:2] or segment_ids[1].shape != k.shape[:2]:
            raise ValueError(
                f"segment_ids must be ({q.shape[:2]}, {k.shape[:2]}), got "
                f"{tuple(i.shape for i in segment_ids)}"
            )
    local = functools.partial(_local, kv_valid=kv_valid, interpret=interpret)
    ids = () if segment_ids is None else tuple(segment_ids)
    mesh = jax.sharding.get_abstract_mesh()
    free = () if mesh.empty else tuple(a for a in mesh.axis_names if a not in mesh.manual_axes)
    if not free:
        return local(q, k, v, *ids)
    q_spec = _spec(("batch", "length", "act_heads", None), free)
    kv_spec = _spec(("batch", None, "act_heads", None), free)
    id_specs = (PartitionSpec(*q_spec[:2]), PartitionSpec(*kv_spec[:2]))[: len(ids)]
    f = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(q_spec, kv_spec, kv_spec, *id_specs),
        out_specs=q_spec,
        axis_names=frozenset(free),
        check_vma=False,  # pallas_call carries no varying-axes types
    )
    return f(q, k, v, *ids)


def _spec(names, axes) -> PartitionSpec:
    """The sharding rules' spec for logical `names`, restricted to mesh `axes`."""

    def keep(entry):
        entry = (entry,) if isinstance(entry, str) else entry or ()
        entry = tuple(a for a in entry if a in axes)
        return None if not entry else entry[0] if len(entry) == 1 else entry

    return PartitionSpec(*(keep(e) for e in sharding.spec(names)))


def _local(q, k, v, q_ids=None, kv_ids=None, *, kv_valid, interpret):
    """The kernel on local arrays: q (B, Lq, N, K) against k, v (B, L, N, K); ids (B, Lq) and
    (B, L) or None."""
    b, lq, n, d = q.shape
    length = k.shape[1]
    valid = length if kv_valid is None else kv_valid
    bq, bkv = _block(lq), _block(length)
    pq, pkv = -(-lq // bq) * bq, -(-length // bkv) * bkv

    def heads_first(x, padded):  # (B, L, N, K) -> (B, N, L', K), zero rows past L
        x = jnp.pad(x, ((0, 0), (0, padded - x.shape[1]), (0, 0), (0, 0)))
        return x.transpose(0, 2, 1, 3)

    q = heads_first(q * jnp.asarray(1 / math.sqrt(d), q.dtype), pq)
    k, v = heads_first(k, pkv), heads_first(v, pkv)
    if q_ids is not None:
        kv_ids = jnp.pad(kv_ids.astype(jnp.int32), ((0, 0), (0, pkv - length)), constant_values=-1)
        q_fill = jnp.broadcast_to(kv_ids[:, :1], (b, pq - lq))
        q_ids = jnp.concatenate([q_ids.astype(jnp.int32), q_fill], axis=1)  # (B, pq)
    elif valid < pkv:
        kv_ids = jnp.broadcast_to((jnp.arange(pkv) >= valid).astype(jnp.int32), (b, pkv))
        q_ids = jnp.zeros((b, pq), jnp.int32)
    sizes = sa.BlockSizes(
        block_q=bq,
        block_kv=bkv,
        block_kv_compute=bkv,
        block_q_dkv=bq,
        block_kv_dkv=bkv,
        block_kv_dkv_compute=bkv,
        block_q_dq=bq,
        block_kv_dq=bkv,
    )
    mask = sa.MultiHeadMask([sa.FullMask((pq, pkv))] * n)
    kernel = sa.make_splash_mha(
        mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
    )
    if q_ids is None:
        o = jax.vmap(lambda q, k, v: kernel(q, k, v))(q, k, v)
    else:
        o = jax.vmap(lambda q, k, v, qi, ki: kernel(q, k, v, segment_ids=sa.SegmentIds(qi, ki)))(
            q, k, v, q_ids, kv_ids
        )
    return o.transpose(0, 2, 1, 3)[:, :lq]  # (B, Lq, N, K)
