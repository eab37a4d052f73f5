"""The splash-attention wrapper, run by the Pallas interpreter on CPU, against XLA's attention:
padding to a block multiple, masked padding keys (kv_valid) and the gradient."""

import jax
import numpy as np
import pytest
from jax.sharding import AxisType

from cogvideox_jax import sharding, splash


@pytest.mark.parametrize("kv_valid", [None, 150])
def test_matches_dot_product_attention(kv_valid):
    q, k, v = jax.random.normal(jax.random.PRNGKey(0), (3, 1, 200, 2, 16))
    n = kv_valid or 200

    def ours(q):
        return splash.attention(q, k, v, kv_valid=kv_valid, interpret=True)

    def ref(q):
        return jax.nn.dot_product_attention(q, k[:, :n], v[:, :n])

    np.testing.assert_allclose(ours(q), ref(q), atol=2e-6)
    if kv_valid is not None:
        g, g_ref = (jax.grad(lambda q, f=f: (f(q) ** 2).sum())(q) for f in (ours, ref))
        np.testing.assert_allclose(g, g_ref, atol=2e-5)


def test_rejects_bad_kv_valid():
    q = np.zeros((1, 8, 1, 4), np.float32)
    with pytest.raises(ValueError, match="kv_valid"):
        splash.attention(q, q, q, kv_valid=9)


def test_under_a_mesh_shards_batch_heads_and_queries():
    """Under a (data 2, context 2, tensor 2) mesh the kernel runs in a shard_map: q split by
    batch, length and heads, k/v gathered along length."""
    mesh = jax.make_mesh((2, 1, 2, 2), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 4)
    q, k, v = jax.random.normal(jax.random.PRNGKey(1), (3, 2, 200, 2, 16))
    f = jax.jit(lambda q, k, v: splash.attention(q, k, v, kv_valid=190, interpret=True))
    with jax.set_mesh(mesh):
        o = f(q, k, v)
    ref = jax.nn.dot_product_attention(q, k[:, :190], v[:, :190])
    np.testing.assert_allclose(o, ref, atol=2e-6)
