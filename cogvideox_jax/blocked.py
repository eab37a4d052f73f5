"""Blocked (flash-style) attention in plain JAX, with its own backward pass.

softmax(q k^T / sqrt(K)) v computed one (query block, key block) tile at a time with an online
softmax (running max and sum per query), so that no (L, L) array is ever materialised: memory is
O(L x block) instead of O(L^2), and each tile's logits, exponentials and products stay in cache.
The backward pass recomputes each tile's probabilities from the saved log-sum-exp, as in
FlashAttention-2 (Dao, arXiv 2307.08691), instead of storing them.

It exists for backends without a fused attention kernel in the library: on XLA:CPU the plain
`jax.nn.dot_product_attention(implementation="xla")` reads and writes the (B, N, L, L) logits
several times over and its probability-times-values product runs from main memory; tiled, the
same work is faster at CogVideoX's sequence lengths (BENCHMARKS.md, "Attention alone").
Numbers: logits, softmax statistics and accumulators in float32 whatever the input dtype; same
results as the unblocked softmax to float32 rounding (tests/test_attention_blocked.py).

Keys are never padded: the key tiles that fill a whole block go through the scan, and the
remainder (Lk mod block, a static size) is one more step of the same code after it. So without
`kv_valid` or segment ids no tile carries a mask (padded keys would need one in every tile, a
select over each tile's logits in both passes). Queries are padded to their block; padded rows
are dropped and get zero gradients (their output cotangent is zero).

Masks: `kv_valid` (keys at positions >= kv_valid get no weight) and segment ids (a query attends
only the keys with its id). A masked logit is a large finite negative number, not -inf, so that a
tile whose keys are all masked adds exact zeros once the row has seen a real key, and never NaN.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from cogvideox_jax import compiler

BLOCK_Q = 256
BLOCK_K = 512
# The logit a hidden key gets (as jax.nn.dot_product_attention's): exp(MASKED - m) is 0 in float32.
MASKED = -0.7 * float(np.finfo(np.float32).max)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    kv_valid: int | None = None,
    q_ids: jax.Array | None = None,
    kv_ids: jax.Array | None = None,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
) -> jax.Array:
    """q (B, Lq, N, K), k and v (B, Lk, N, K) -> (B, Lq, N, K) in q's dtype.

    kv_valid: a Python int, keys at positions >= it are ignored. q_ids (B, Lq) and kv_ids
    (B, Lk): int segment ids, both or neither. The query block is clipped to the 8-rounded query
    length, the key block to the key length."""
    b, lq, n, d = q.shape
    lk = k.shape[1]
    if k.shape != (b, lk, n, d) or v.shape != k.shape:
        raise ValueError(
            f"blocked attention needs k and v of shape {(b, lk, n, d)}, got {k.shape}, {v.shape}"
        )
    if (q_ids is None) != (kv_ids is None):
        raise ValueError("pass both q_ids and kv_ids, or neither")
    bq = min(block_q, _round_up(lq, 8))
    bk = min(block_k, lk)
    valid = lk if kv_valid is None else min(kv_valid, lk)

    def heads_first(x):  # (B, L, N, K) -> (B*N, L, K)
        return x.transpose(0, 2, 1, 3).reshape(b * n, x.shape[1], d)

    if q_ids is None:
        ids = None
    else:  # one row of ids per (batch, head); query padding gets an id no real token has
        qi = _pad(jnp.repeat(q_ids.astype(jnp.int32), n, axis=0), bq, 1, -1)
        ids = (qi, jnp.repeat(kv_ids.astype(jnp.int32), n, axis=0))
    o = _flash(_pad(heads_first(q), bq, 1), heads_first(k), heads_first(v), ids, valid, bq, bk)
    return o[:, :lq].reshape(b, n, lq, d).transpose(0, 2, 1, 3)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _pad(x, block, axis, value=0):
    extra = (-x.shape[axis]) % block
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _tiles(x, block):
    """(G, L, ...) -> (L / block, G, block, ...): the scan axis first."""
    g, length = x.shape[:2]
    x = x.reshape(g, length // block, block, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _untile(x):
    """(T, G, block, ...) -> (G, T * block, ...)."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])


def _logits(q, k, keep):
    """Scaled float32 logits of one tile, q (G, bq, K) with k (G, bk, K); keep (G|1, bq|1, bk)."""
    s = jnp.einsum("gqd,gkd->gqk", q, k, preferred_element_type=jnp.float32)
    s = s * (q.shape[-1] ** -0.5)
    return s if keep is None else jnp.where(keep, s, MASKED)


def _keep(key_ok, ids_q, ids_k):
    """Which logits of a tile count: valid keys (bk,) and, with segment ids, equal ids."""
    keep = None if key_ok is None else key_ok[None, None, :]
    if ids_q is not None:
        same = ids_q[:, :, None] == ids_k[:, None, :]
        keep = same if keep is None else keep & same
    return keep


def _varying(init, *like):
    """`init` typed as varying over every mesh axis any of `like` varies over: inside
    `jax.shard_map` a scan's initial carry must have the type of the carry it produces."""
    axes = set()
    for x in jax.tree.leaves(like):
        axis_type = getattr(jax.typeof(x), "manual_axis_type", None)  # jax 0.10's field
        axes |= set(getattr(axis_type, "varying", ()))
    if not axes:
        return init
    return jax.tree.map(lambda x: jax.lax.pcast(x, tuple(sorted(axes)), to="varying"), init)


def _key_tiles(k, v, ids, valid, bk):
    """What both passes go over, key tile by key tile: (k, v, key validity (bk,) or None, key
    ids) stacked for the whole tiles (the scan), and the same for the remainder tile (None when
    the block divides Lk)."""
    lk = k.shape[1]
    whole = lk - lk % bk
    positions = np.arange(lk)
    key_ids = None if ids is None else ids[1]

    def part(start, stop, tiled):
        def cut(x):
            x = x[:, start:stop]
            return _tiles(x, bk) if tiled else x

        ok = None
        if valid < lk:
            ok = jnp.asarray(positions[start:stop] < valid)
            ok = ok.reshape(-1, bk) if tiled else ok
        return cut(k), cut(v), ok, None if key_ids is None else cut(key_ids)

    return part(0, whole, True), part(whole, lk, False) if whole < lk else None


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _flash(q, k, v, ids, valid, bq, bk):
    return _forward(q, k, v, ids, valid, bq, bk)[0]


def _forward(q, k, v, ids, valid, bq, bk):
    """q (G, Lq, K) padded to its block, k and v (G, Lk, K) -> out (G, Lq, K), lse (G, Lq)."""
    g, lq, d = q.shape
    kv_x, kv_rest = _key_tiles(k, v, ids, valid, bk)

    def one_query_tile(x):
        qt, qid = x

        def step(carry, y):
            m, denom, acc = carry
            kt, vt, ok, kid = y
            s = _logits(qt, kt, _keep(ok, qid, kid))
            m_new = jnp.maximum(m, compiler.rowmax(s))
            p = jnp.exp(s - m_new[..., None])
            scale = jnp.exp(m - m_new)
            denom = denom * scale + p.sum(-1)
            acc = acc * scale[..., None] + jnp.einsum("gqk,gkd->gqd", p, vt.astype(jnp.float32))
            return (m_new, denom, acc), None

        init = (
            jnp.full((g, bq), MASKED, jnp.float32),
            jnp.zeros((g, bq), jnp.float32),
            jnp.zeros((g, bq, d), jnp.float32),
        )
        init = _varying(init, q, k, v, ids)
        carry, _ = jax.lax.scan(step, init, kv_x)
        if kv_rest is not None:
            carry, _ = step(carry, kv_rest)
        m, denom, acc = carry
        return acc / denom[..., None], m + jnp.log(denom)

    q_x = (_tiles(q, bq), None if ids is None else _tiles(ids[0], bq))
    out, lse = jax.lax.map(one_query_tile, q_x)
    return _untile(out).astype(q.dtype), _untile(lse)


def _forward_rule(q, k, v, ids, valid, bq, bk):
    out, lse = _forward(q, k, v, ids, valid, bq, bk)
    return out, (q, k, v, ids, out, lse)


def _backward_rule(valid, bq, bk, res, d_out):
    q, k, v, ids, out, lse = res
    g, lq, d = q.shape
    f32 = jnp.float32
    scale = d**-0.5
    # D_i = sum_d dO_id O_id: the softmax backward's row term, once per query.
    delta = (d_out.astype(f32) * out.astype(f32)).sum(-1)
    q_x = (
        _tiles(q, bq),
        _tiles(d_out.astype(f32), bq),
        _tiles(lse, bq),
        _tiles(delta, bq),
        None if ids is None else _tiles(ids[0], bq),
    )

    def one_key_tile(dq, y):
        kt, vt, ok, kid = y
        bk = kt.shape[1]

        def step(carry, x):
            dk, dv = carry
            (qt, dot, lse_t, delta_t, qid), dq_t = x
            # transposed tiles (G, bk, bq): the key-side products need no transpose
            st = jnp.einsum("gkd,gqd->gkq", kt, qt, preferred_element_type=f32) * scale
            keep = _keep(ok, qid, kid)
            if keep is not None:
                st = jnp.where(jnp.swapaxes(keep, 1, 2), st, MASKED)
            pt = jnp.exp(st - lse_t[:, None, :])
            dv = dv + jnp.einsum("gkq,gqd->gkd", pt, dot)
            dpt = jnp.einsum("gkd,gqd->gkq", vt.astype(f32), dot)
            dst = pt * (dpt - delta_t[:, None, :]) * scale
            dk = dk + jnp.einsum("gkq,gqd->gkd", dst, qt.astype(f32))
            dq_t = dq_t + jnp.einsum("gkq,gkd->gqd", dst, kt.astype(f32))
            return (dk, dv), dq_t

        zeros = _varying(jnp.zeros((g, bk, d), f32), q, k, v, ids, d_out)
        (dk, dv), dq = jax.lax.scan(step, (zeros, zeros), (q_x, dq))
        return dq, (dk, dv)

    kv_x, kv_rest = _key_tiles(k, v, ids, valid, bk)
    dq0 = _varying(jnp.zeros((lq // bq, g, bq, d), f32), q, k, v, ids, d_out)
    dq, (dk, dv) = jax.lax.scan(one_key_tile, dq0, kv_x)
    dk, dv = _untile(dk), _untile(dv)
    if kv_rest is not None:
        dq, (dk_rest, dv_rest) = one_key_tile(dq, kv_rest)
        dk = jnp.concatenate([dk, dk_rest], axis=1)
        dv = jnp.concatenate([dv, dv_rest], axis=1)
    d_ids = (
        None if ids is None else jax.tree.map(lambda i: np.zeros(i.shape, jax.dtypes.float0), ids)
    )
    return (
        _untile(dq).astype(q.dtype),
        dk.astype(k.dtype),
        dv.astype(v.dtype),
        d_ids,
    )


_flash.defvjp(_forward_rule, _backward_rule)
