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
    "shape",  # data, fsdp, context, tensor
    [
        (8, 1, 1, 1),
        *(pytest.param(s, marks=pytest.mark.slow) for s in [(1, 4, 1, 2), (2, 2, 2, 1)]),
    ],
)
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


# Representative weights of the full-size 5B model and the specs the default rules must give
# them on a (data 1, fsdp 64, context 4, tensor 2) mesh: written out, not derived.
FSDP = ("fsdp", "context")
EXPECTED_5B = {
    "transformer_blocks/attn1/to_q_kernel": ((42, 3072, 48, 64), P(None, FSDP, "tensor", None)),
    "transformer_blocks/attn1/to_v_bias": ((42, 48, 64), P(None, "tensor", None)),
    "transformer_blocks/attn1/to_out_kernel": ((42, 48, 64, 3072), P(None, "tensor", None, FSDP)),
    "transformer_blocks/attn1/norm_q/scale": ((42, 64), P(None, None)),
    "transformer_blocks/ff/proj/kernel": ((42, 3072, 12288), P(None, FSDP, "tensor")),
    "transformer_blocks/ff/proj/bias": ((42, 12288), P(None, "tensor")),
    "transformer_blocks/ff/out/kernel": ((42, 12288, 3072), P(None, "tensor", FSDP)),
    "transformer_blocks/norm1/linear/kernel": ((42, 512, 18432), P(None, None, FSDP)),
    "transformer_blocks/norm2/norm/scale": ((42, 3072), P(None, None)),
    "patch_embed/proj/kernel": ((64, 3072), P(None, FSDP)),
    "patch_embed/text_proj/kernel": ((4096, 3072), P(None, FSDP)),
    "time_embedding/linear_1/kernel": ((3072, 512), P(FSDP, None)),
    "norm_out/linear/kernel": ((512, 6144), P(None, FSDP)),
    "norm_final/scale": ((3072,), P(None)),
    "proj_out/kernel": ((3072, 64), P(FSDP, None)),
}


def test_full_size_5b_parameters_get_the_expected_specs():
    """The trainer's placement of the abstract 5B model (nothing allocated) on an abstract mesh."""
    model = nnx.eval_shape(lambda: cj.Transformer(cj.transformer_config("5b"), rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    mesh = jax.sharding.AbstractMesh((1, 64, 4, 2), sharding.MESH_AXES)
    shardings = sharding.state_shardings(params, mesh, sharding.DEFAULT_RULES)
    flat = {
        "/".join(str(k.key) for k in path): (x.shape, s.spec)
        for (path, x), (_, s) in zip(
            jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(params))[0],
            jax.tree_util.tree_flatten_with_path(shardings)[0],
            strict=True,
        )
    }
    assert {k: flat[k] for k in EXPECTED_5B} == EXPECTED_5B
    for name, (shape, spec) in flat.items():
        assert len(spec) == len(shape), name
        if name.startswith("transformer_blocks/"):
            assert spec[0] is None, name  # the scanned layer axis is never split
        if np.prod(shape) >= 2**20:  # every large weight is split over fsdp x context (256)
            assert FSDP in tuple(spec), name


def test_batches_arrive_sharded_as_the_batch_rule_constrains_activations():
    """One owner for the batch's layout: with the `batch` rule overridden (fsdp only, the data
    axis replicating), the trainer's input pipeline builds its global batches with the sharding
    that `constrain(x, ("batch", ...))` gives the model's activations, and tools.aot compiles the
    train step for batches laid out so."""
    from configs import cogvideox_5b
    from data import pipeline
    from train import inputs
    from train.program import make_program
    from train.run import resolve

    c = cogvideox_5b.get_config("sft,runlocal")
    c.mesh.update(data=2, fsdp=4, num_devices=8)
    c.batch_size = c.evals.batch_size = 8
    default = resolve(c).batch_sharding.spec
    c.sharding_rules = (("batch", "fsdp"),)
    run = resolve(c)
    assert default == P(("data", "fsdp")) and run.batch_sharding.spec == P("fsdp")
    rows = pipeline.process_rows(run.batch_sharding, c.batch_size)
    train, _ = inputs.datasets(run, rows, rows)
    batch = pipeline.global_batch(next(iter(train)), run.batch_sharding, c.batch_size)
    with run.on_mesh():
        acts = jax.jit(lambda x: sharding.constrain(x, ("batch", "length", "act_embed")))
        h = acts(jnp.zeros((c.batch_size, 6, 32)))
    for x in jax.tree.leaves(batch):
        assert x.sharding.is_equivalent_to(run.batch_sharding, x.ndim)
        assert x.sharding.spec[0] == h.sharding.spec[0] == "fsdp"
    _, abstract_batch, _ = make_program(run).abstract_train_args()  # tools.aot's batch
    for x in jax.tree.leaves(abstract_batch):
        assert x.sharding == run.batch_sharding
