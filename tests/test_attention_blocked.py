"""The blocked (flash-style) attention kernel against the unblocked softmax of
`jax.nn.dot_product_attention(implementation="xla")`: outputs and all three input gradients, with
every mask it supports, ragged lengths, several tiles per axis, inside both context-parallel
modes, and in the transformer. The library's own unblocked kernel (`impl="xla"`) against the
same reference, and `compiler.rowmax`, which both kernels use."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from flax import nnx
from jax.sharding import AxisType

from cogvideox_jax import attention, blocked, compiler, sharding


def _qkv(b, lq, lk, n, k, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, lq, n, k))
    kv = (rng.standard_normal((b, lk, n, k)) for _ in range(2))
    return tuple(jnp.asarray(x, dtype) for x in (q, *kv))


def _segments(b, length, seed=0):
    """Random ids 0..3, shuffled so that segments are not contiguous (as in a packed joint
    [text; video] row)."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(0, 4, (b, length)), jnp.int32)


def _xla(q, k, v, kv_valid=None, ids=None):
    lengths = None if kv_valid is None else jnp.full((q.shape[0],), kv_valid, jnp.int32)
    mask = None if ids is None else ids[:, None, :, None] == ids[:, None, None, :]
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, key_value_seq_lengths=lengths, implementation="xla"
    )


def _value_and_grads(f, q, k, v):
    """f's output and the gradients of <f(q, k, v), w> for a fixed random w."""
    w = jnp.asarray(np.random.default_rng(9).standard_normal(q.shape), jnp.float32)
    loss = lambda q, k, v: (f(q, k, v).astype(jnp.float32) * w).sum()  # noqa: E731
    return jax.jit(f)(q, k, v), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def _assert_close(got, want, tol):
    (o1, g1), (o0, g0) = got, want
    assert ref.rel_l2(o1, o0) <= tol, ref.rel_l2(o1, o0)
    for name, a, b in zip("qkv", g1, g0, strict=True):
        assert ref.rel_l2(a, b) <= tol, (name, ref.rel_l2(a, b))


# (batch, Lq, Lk, kv_valid, segment ids, block_q, block_k): lengths that are not multiples of the
# blocks, several tiles on both axes, keys longer than queries (the all-gather shard's view), a
# kv_valid that leaves whole key tiles masked, one that ends inside the key remainder (the tile
# that is not a whole block), one tile covering everything.
CASES = [
    (2, 100, 100, None, False, 32, 16),
    (2, 100, 100, 70, False, 32, 16),
    (1, 50, 120, 90, False, 16, 32),
    (1, 37, 37, 5, False, 8, 8),
    (1, 40, 45, 43, False, 16, 16),
    (2, 130, 130, None, True, 32, 16),
    (1, 64, 64, None, False, 256, 512),
]


@pytest.mark.parametrize("b,lq,lk,kv_valid,seg,bq,bk", CASES)
def test_matches_unblocked_softmax(b, lq, lk, kv_valid, seg, bq, bk):
    q, k, v = _qkv(b, lq, lk, 3, 16)
    ids = _segments(b, lq) if seg else None
    want = _value_and_grads(lambda q, k, v: _xla(q, k, v, kv_valid, ids), q, k, v)
    got = _value_and_grads(
        lambda q, k, v: blocked.attention(
            q, k, v, kv_valid=kv_valid, q_ids=ids, kv_ids=ids, block_q=bq, block_k=bk
        ),
        q,
        k,
        v,
    )
    _assert_close(got, want, 2e-6)


def test_bfloat16_inputs_keep_float32_statistics():
    """bf16 in, bf16 out: as close to the float32 reference as the unblocked bf16 kernel is."""
    q, k, v = _qkv(2, 96, 96, 2, 32, dtype=jnp.bfloat16)
    f32 = _value_and_grads(_xla, *(x.astype(jnp.float32) for x in (q, k, v)))
    unblocked = _value_and_grads(_xla, q, k, v)
    got = _value_and_grads(functools.partial(blocked.attention, block_q=32, block_k=16), q, k, v)
    assert got[0].dtype == jnp.bfloat16 and got[1][0].dtype == jnp.bfloat16
    err_unblocked = ref.rel_l2(unblocked[0], f32[0])
    assert ref.rel_l2(got[0], f32[0]) <= 1.5 * err_unblocked + 1e-3


@pytest.mark.parametrize("b,lq,lk,kv_valid,seg", list(dict.fromkeys(c[:5] for c in CASES)))
def test_xla_kernel_matches_jax(b, lq, lk, kv_valid, seg):
    """`impl="xla"` is the library's own softmax (attention._softmax_attention), not jax's."""
    q, k, v = _qkv(b, lq, lk, 3, 16)
    ids = _segments(b, lq) if seg else None
    want = _value_and_grads(lambda q, k, v: _xla(q, k, v, kv_valid, ids), q, k, v)
    got = _value_and_grads(
        lambda q, k, v: attention._kernel(q, k, v, "xla", kv_valid, ids, ids), q, k, v
    )
    _assert_close(got, want, 1e-6)


def test_xla_kernel_in_bfloat16():
    """bf16 in, bf16 out, outputs and gradients as close to float32's as jax's bf16 kernel."""
    q, k, v = _qkv(2, 96, 96, 2, 32, dtype=jnp.bfloat16)
    f32 = _value_and_grads(_xla, *(x.astype(jnp.float32) for x in (q, k, v)))
    jax_bf16 = _value_and_grads(_xla, q, k, v)
    got = _value_and_grads(lambda q, k, v: attention._kernel(q, k, v, "xla", None), q, k, v)
    assert got[0].dtype == jnp.bfloat16 and got[1][0].dtype == jnp.bfloat16
    assert ref.rel_l2(got[0], f32[0]) <= 1.5 * ref.rel_l2(jax_bf16[0], f32[0]) + 1e-3
    for name, a, b, c in zip("qkv", got[1], jax_bf16[1], f32[1], strict=True):
        assert ref.rel_l2(a, c) <= 1.5 * ref.rel_l2(b, c) + 1e-3, name


def test_rowmax():
    """The row maximum both kernels shift their logits by: exact, any float dtype, large negative
    (masked) values and -inf included, and no gradient."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 37), dtype=np.float32) * 50
    x[0, 0, :] = blocked.MASKED
    x[0, 1, 5:] = -np.inf
    x[1, 2, :] = -np.inf
    for dtype in (jnp.float32, jnp.bfloat16):
        xd = jnp.asarray(x, dtype)
        got = jax.jit(compiler.rowmax)(xd)
        assert got.dtype == dtype and got.shape == (2, 3)
        np.testing.assert_array_equal(got, np.max(np.asarray(xd), axis=-1))
    grad = jax.grad(lambda x: (compiler.rowmax(x) * 3.0).sum())(jnp.asarray(x[1:, :2]))
    np.testing.assert_array_equal(grad, 0.0)


def test_rejects_mismatched_inputs():
    q, k, v = _qkv(1, 8, 8, 2, 4)
    with pytest.raises(ValueError, match="k and v of shape"):
        blocked.attention(q, k[:, :, :1], v)
    with pytest.raises(ValueError, match="both q_ids and kv_ids"):
        blocked.attention(q, k, v, q_ids=jnp.zeros((1, 8), jnp.int32))


def test_auto_picks_blocked_for_long_sequences_on_cpu():
    assert attention.resolve("auto", jnp.float32, attention.BLOCKED_MIN_LENGTH) == "blocked"
    assert attention.resolve("auto", jnp.bfloat16, 19) == "xla"
    assert attention.resolve("blocked", jnp.float32, 19) == "blocked"


@pytest.mark.parametrize("mode", ["allgather", "ulysses"])
@pytest.mark.parametrize("seg", [False, True])
def test_inside_context_parallelism(mode, seg):
    """Sequence over 2 context shards, batch over fsdp, heads over tensor: the blocked kernel per
    shard (padding mask or gathered segment ids) equals one device's unblocked attention."""
    q, k, v = _qkv(2, 40, 40, 8, 8)
    ids = _segments(2, 40) if seg else None
    kw = dict(segment_ids=ids) if seg else dict(kv_valid=37)
    want = _value_and_grads(
        lambda q, k, v: attention.dot_product_attention(q, k, v, impl="xla", **kw), q, k, v
    )
    mesh = jax.make_mesh((1, 2, 2, 2), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 4)
    with jax.set_mesh(mesh):
        got = _value_and_grads(
            lambda q, k, v: attention.dot_product_attention(
                q, k, v, impl="blocked", context_parallel=mode, **kw
            ),
            q,
            k,
            v,
        )
    _assert_close(got, want, 2e-6)


@pytest.mark.slow
def test_transformer_with_blocked_attention():
    """A tiny 5B-style transformer (RoPE) with impl='blocked' gives the 'xla' model's output."""
    rng = np.random.default_rng(0)
    latents = jnp.asarray(rng.standard_normal((2, 3, 4, 4, 4)), jnp.float32)
    text = jnp.asarray(rng.standard_normal((2, 7, 16)), jnp.float32)
    t = jnp.asarray([10, 900], jnp.int32)
    outs = [
        _forward(ref.perturbed_model("5b", attention_impl=impl), latents, text, t)
        for impl in ("xla", "blocked")
    ]
    assert ref.rel_l2(outs[1], outs[0]) <= 1e-5


def _forward(model, *args):
    """model(*args), one jitted program compiled without LLVM's costlier passes (compiling is
    where this test spends its time; the float32 operations stay the same)."""
    graphdef, state = nnx.split(model)
    f = jax.jit(lambda state, *args: nnx.merge(graphdef, state)(*args))
    fast = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
    return f.lower(state, *args).compile(compiler_options=fast)(state, *args)
