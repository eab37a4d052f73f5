"""Logical axis names -> mesh shardings: the rules, and a sharded forward equal to one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import cogvideox_jax as cj
from cogvideox_jax import sharding


def test_spec_maps_names_and_uses_each_mesh_axis_once():
    assert sharding.spec(("layers", "embed", "heads", "kv")) == P(
        None, ("fsdp", "context"), "tensor", None
    )
    assert sharding.spec(("batch", "length", "act_embed")) == P(("data", "fsdp"), "context", None)
    # A mesh axis already used by an earlier dimension is not used twice.
    assert sharding.spec(("embed", "embed")) == P(("fsdp", "context"), None)
    rules = (("embed", "fsdp"), ("mlp", "fsdp"))
    assert sharding.spec(("embed", "mlp"), rules) == P("fsdp", None)
    with sharding.use_rules((("embed", "tensor"),)):
        assert sharding.spec(("embed",)) == P("tensor")


def test_constrain_is_a_no_op_outside_a_mesh():
    x = jnp.ones((2, 3))
    assert sharding.constrain(x, ("batch", "act_embed")) is x


def test_param_rejects_names_of_the_wrong_rank():
    with pytest.raises(ValueError, match="do not match shape"):
        sharding.param(jnp.ones((2, 3)), ("embed",))


@pytest.mark.parametrize(
    "shape", [(8, 1, 1, 1), (1, 4, 1, 2), (2, 2, 2, 1)]
)  # data, fsdp, context, tensor
def test_sharded_forward_equals_one_device(shape):
    """Placing the parameters by the default rules changes where they live, not the result."""
    cfg = cj.TransformerConfig.from_diffusers(
        ref.TINY_TRANSFORMERS["5b"] | {"num_attention_heads": 4, "attention_head_dim": 16}
    )
    model = cj.Transformer(cfg, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(state))))
    nnx.update(
        model, jax.tree.map(lambda p: p + 0.2 * jax.random.normal(next(keys), p.shape), state)
    )
    rng = np.random.default_rng(0)
    lat = rng.standard_normal((8, 3, 6, 8, 4)).astype(np.float32)
    txt = rng.standard_normal((8, 7, 16)).astype(np.float32)
    t = np.arange(8) * 100
    forward = nnx.jit(lambda m, *a: m(*a))
    want = np.asarray(forward(model, lat, txt, t))

    mesh = jax.make_mesh(shape, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 4)
    with jax.set_mesh(mesh):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        specs = sharding.state_specs(params)
        shardings = jax.tree.map(
            lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P)
        )
        params = jax.device_put(params, shardings)
        kernel = params["transformer_blocks"]["ff"]["proj"]["kernel"][...]
        assert kernel.sharding.spec == sharding.spec(("layers", "embed", "mlp"))
        assert len(kernel.sharding.device_set) == 8
        batch = NamedSharding(mesh, sharding.spec(("batch",)))
        got = forward(
            nnx.merge(graphdef, params, rest), *(jax.device_put(a, batch) for a in (lat, txt, t))
        )
    # Sharded reductions add in another order: equal up to float32 rounding.
    assert ref.rel_l2(got, want) <= 1e-5, ref.rel_l2(got, want)
