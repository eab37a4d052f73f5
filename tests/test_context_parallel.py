"""Context parallelism and mesh layouts: on 8 simulated devices, every layout gives one device's
loss and gradients; the attention entry point's padding mask, kernel dispatch and errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from cogvideox_jax import attention, diffusion, sharding
from train import objective
from train.dit import train_and_evaluate
from train.run import resolve

# (data, fsdp, context, tensor)
LAYOUTS = {
    "fsdp8": (1, 8, 1, 1),
    "data2_fsdp4": (2, 4, 1, 1),
    "context8": (1, 1, 8, 1),
    "fsdp2_context2_tensor2": (1, 2, 2, 2),
}
CONTEXT_LAYOUTS = [k for k, v in LAYOUTS.items() if v[2] > 1]

# 8 heads of 16 dims (the least that RoPE splits over t, h, w): ulysses divides the heads
# over 8 context shards, or 2 tensor x 2 context.
_HEADS = {"num_attention_heads": 8, "attention_head_dim": 16, "num_layers": 1}
# Latent (T, H, W) per variant: 7 text + 12 video tokens (5b), 7 + 6 (1.5, 2 frames a token).
# Neither 19 nor 13 divides by 2, 4 or 8, so every context layout pads the sequence.
_LATENTS = {"5b": (3, 4, 4), "1.5-5b": (2, 4, 6)}
_TEXT_LEN = 7


@functools.cache
def _model(variant, context_parallel, remat="none"):
    return ref.perturbed_model(
        variant, context_parallel=context_parallel, remat=remat, overrides=_HEADS
    )


def _inputs(variant):
    rng = np.random.default_rng(0)
    b, (t, h, w) = 8, _LATENTS[variant]
    z0 = rng.standard_normal((b, t, h, w, 4)).astype(np.float32)
    text = rng.standard_normal((b, _TEXT_LEN, 16)).astype(np.float32)
    noise = rng.standard_normal(z0.shape).astype(np.float32)
    timesteps = np.arange(b, dtype=np.int32) * 111 + 50
    return z0, text, timesteps, noise


def _value_and_grad(model, inputs, mesh=None):
    """Loss and parameter gradients of the trainer's diffusion loss (train/objective.py); placed
    by the default rules on `mesh` when given."""
    ab = jnp.asarray(diffusion.alphas_cumprod(diffusion.ScheduleConfig()), jnp.float32)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, rest, z0, text, t, noise):
        return objective.diffusion_loss(nnx.merge(graphdef, params, rest), z0, text, t, noise, ab)

    f = jax.jit(jax.value_and_grad(loss))
    if mesh is None:
        return _compile(f, params, rest, *inputs)
    with jax.set_mesh(mesh):
        specs = sharding.state_specs(params)
        params = jax.device_put(
            params, jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)
        )
        batch = NamedSharding(mesh, sharding.spec(("batch",)))
        return _compile(f, params, rest, *jax.device_put(inputs, batch))


def _compile(f, *args):
    """Run a jitted `f`, compiled without LLVM's costlier passes: compiling is where these tests
    spend their time (about 2.5x less), and the float32 operations stay the same."""
    fast = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
    return f.lower(*args).compile(compiler_options=fast)(*args)


def _is_spec(x):
    return isinstance(x, P)


@functools.cache
def _one_device(variant):
    loss, grads = _value_and_grad(_model(variant, "allgather"), _inputs(variant))
    return float(loss), jax.tree.map(np.asarray, grads)


# Every layout and mode for the 5B variant (RoPE); tensor splits run beside fsdp and context in
# fsdp2_context2_tensor2. The 1.5 variant (two frames a token, its patch
# embedding a Linear) runs under full remat (the shard_map inside nnx.remat inside nnx.scan):
# all its weights split (fsdp8), and both modes with tokens alone over context (context8) and
# beside fsdp and tensor splits; its other layouts run 5B's code.
CASES = [
    *(("5b", name, "allgather") for name in LAYOUTS),
    *(("5b", name, "ulysses") for name in CONTEXT_LAYOUTS),
    ("1.5-5b", "fsdp8", "allgather"),
    ("1.5-5b", "context8", "ulysses"),
    ("1.5-5b", "fsdp2_context2_tensor2", "allgather"),
    ("1.5-5b", "fsdp2_context2_tensor2", "ulysses"),
]
# The fast subset keeps the all-gather mode with every axis split at once (Ulysses is in it through
# tests/test_attention_blocked.py's context-parallel test).
FAST_CASES = {("5b", "fsdp2_context2_tensor2", "allgather")}
CASES = [c if c in FAST_CASES else pytest.param(*c, marks=pytest.mark.slow) for c in CASES]


@pytest.mark.parametrize("variant,layout,mode", CASES)
def test_layout_gives_one_device_loss_and_gradients(variant, layout, mode):
    want_loss, want_grads = _one_device(variant)
    mesh = jax.make_mesh(LAYOUTS[layout], sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 4)
    remat = "full" if variant == "1.5-5b" else "none"
    loss, grads = _value_and_grad(_model(variant, mode, remat), _inputs(variant), mesh)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    flat_want = dict(nnx.to_flat_state(want_grads))
    for path, g in nnx.to_flat_state(grads):
        err = ref.rel_l2(g[...], flat_want[path][...])
        assert err <= 1e-5, (path, err)


def _qkv(b=2, length=19, n=8, k=8, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((b, length, n, k)).astype(np.float32) for _ in range(3))


def test_kv_valid_hides_appended_keys():
    q, k, v = _qkv()
    want = attention.dot_product_attention(q, k, v, impl="xla")
    pad = ((0, 0), (0, 5), (0, 0), (0, 0))
    junk = 100.0 + np.zeros((2, 5, 8, 8), np.float32)
    k2, v2 = np.concatenate([k, junk], 1), np.concatenate([v, junk], 1)
    got = attention.dot_product_attention(np.pad(q, pad), k2, v2, impl="xla", kv_valid=19)
    np.testing.assert_allclose(got[:, :19], want, rtol=1e-6, atol=1e-6)


def _recording_splash(calls):
    """cogvideox_jax.splash.attention in the Pallas interpreter (CPU), recording what each shard
    passes it: per-shard shapes and the kv_valid int of its contract."""
    from cogvideox_jax import splash

    real = splash.attention

    def splash_attention(q, k, v, *, kv_valid=None):
        calls.append((q.shape, k.shape, kv_valid))
        return real(q, k, v, kv_valid=kv_valid, interpret=True)

    return splash, splash_attention


@pytest.mark.parametrize("mode", ["allgather", "ulysses"])
def test_splash_runs_per_shard_inside_context_parallel(monkeypatch, mode):
    calls = []
    module, recording = _recording_splash(calls)
    monkeypatch.setattr(module, "attention", recording)
    q, k, v = _qkv(length=20)
    want = attention.dot_product_attention(q, k, v, impl="xla", kv_valid=19)
    mesh = jax.make_mesh((1, 2, 2, 2), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 4)
    with jax.set_mesh(mesh):
        f = jax.jit(
            functools.partial(
                attention.dot_product_attention,
                impl="splash",
                kv_valid=19,
                context_parallel=mode,
            )
        )
        got = f(q, k, v)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # Batch over fsdp, heads over tensor; tokens over context: gathered K/V, or all heads
    # of a shard all-to-all'ed to full length.
    per_shard = {"allgather": ((1, 10, 4, 8), (1, 20, 4, 8)), "ulysses": ((1, 20, 2, 8),) * 2}
    assert calls == [(*per_shard[mode], 19)]


def test_ulysses_rejects_heads_that_do_not_divide():
    q, k, v = _qkv(length=8, n=6)
    mesh = jax.make_mesh((1, 1, 4, 2), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 4)
    with jax.set_mesh(mesh), pytest.raises(ValueError, match=r"\(3 of 6\).*context size 4"):
        jax.jit(
            functools.partial(attention.dot_product_attention, context_parallel="ulysses")
        ).trace(q, k, v)


def test_auto_is_xla_on_cpu_for_short_sequences_and_unknown_names_fail():
    assert attention.resolve("auto", jnp.bfloat16, 19) == "xla"
    q, k, v = _qkv(length=4)
    with pytest.raises(ValueError, match="attention impl"):
        attention.dot_product_attention(q, k, v, impl="flash")
    with pytest.raises(ValueError, match="context_parallel"):
        attention.dot_product_attention(q, k, v, context_parallel="ring")


def _runlocal_config():
    from configs import cogvideox_5b

    c = cogvideox_5b.get_config("sft,runlocal")
    c.evals.sample_prompts = ()  # samples are not looked at here
    return c


def test_validate_rejects_ulysses_when_heads_do_not_divide():
    c = _runlocal_config()  # 2 heads
    c.model.context_parallel = "ulysses"
    c.mesh.update(fsdp=2, context=4, num_devices=8)
    with pytest.raises(ValueError, match=r"\(2 of 2 heads, mesh.tensor=1\).*mesh.context=4"):
        resolve(c)
    c.mesh.update(fsdp=2, context=2, num_devices=4)
    resolve(c)
    c.model.context_parallel = "ring"
    with pytest.raises(ValueError, match="model.context_parallel"):
        resolve(c)


def test_mesh_minus_one_takes_the_remaining_devices():
    c = _runlocal_config()
    c.mesh.update(data=1, fsdp=-1, context=2, tensor=2, num_devices=0)
    assert resolve(c).mesh.shape == dict(data=1, fsdp=2, context=2, tensor=2)
    c.mesh.update(fsdp=2, context=-1, tensor=1)
    assert resolve(c).mesh.shape == dict(data=1, fsdp=2, context=4, tensor=1)


def test_config_rules_replace_only_the_names_they_state():
    rules = sharding.rules_with((("embed", "fsdp"), ("frames", ["context"])))
    table = dict(rules)
    assert table["embed"] == "fsdp" and table["frames"] == ("context",)
    assert {k: v for k, v in table.items() if k not in ("embed", "frames")} == {
        k: v for k, v in sharding.DEFAULT_RULES if k != "embed"
    }
    mesh = jax.make_mesh((1, 2, 4, 1), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 4)
    with jax.set_mesh(mesh):
        assert sharding.num_shards("length") == 4
        with sharding.use_rules(sharding.rules_with((("length", None),))):
            assert sharding.num_shards("length") == 1  # no context split: no padding
    assert sharding.num_shards("length") == 1  # outside a mesh


@pytest.mark.slow
def test_trainer_runs_context_parallel_with_rule_overrides(tmp_path):
    """Two steps of the 1.5 runlocal config on (fsdp 2, context 2) with Ulysses, weights kept
    whole over context by a per-run rule; 7 text + 8 video tokens, padded to 16."""
    from configs import cogvideox1_5_5b

    c = cogvideox1_5_5b.get_config("sft,runlocal")
    c.evals.sample_prompts = ()
    c.total_steps, c.evals.every_steps = 2, 100
    c.model.context_parallel = "ulysses"
    c.mesh.update(fsdp=2, context=2, num_devices=4)
    c.input.text_len = 7
    c.sharding_rules = (("embed", "fsdp"),)
    c.lock()
    row = train_and_evaluate(c, str(tmp_path))
    assert row["step"] == 2 and np.isfinite(row["loss"]), row
