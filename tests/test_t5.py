"""The T5 v1.1 encoder against transformers' T5EncoderModel; the CogVideoX tokenizer call."""

import dataclasses
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
import safetensors.numpy
import torch
import transformers
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from transformers.activations import ACT2FN
from transformers.models.t5.modeling_t5 import T5Attention

import cogvideox_jax as cj
from cogvideox_jax import components, sharding, t5

# Tiny stand-in with T5 v1.1's structure. N * K = 24 != d_model, so a swapped head axis fails.
TINY = t5.T5Config(
    vocab_size=100,
    d_model=32,
    d_kv=6,
    d_ff=48,
    num_layers=3,
    num_heads=4,
    relative_attention_num_buckets=16,
    relative_attention_max_distance=40,
)
LENGTH = 226  # CogVideoX's text length


def _torch_encoder(cfg: t5.T5Config, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.T5EncoderModel(transformers.T5Config(**cfg.to_transformers())).eval()
    # Every parameter, norm weights included. A larger scale makes the unscaled logits so peaked
    # that fp32 runs of either implementation drift ~1e-5 from a float64 run.
    ref.perturb_(model, seed, scale=0.1)
    return model


def _ours(theirs, cfg=TINY, **kw):
    """Our encoder with the weights of `theirs`, through the library's loader and converter."""
    with tempfile.TemporaryDirectory() as folder:
        theirs.save_pretrained(folder)
        loaded = cj.load_text_encoder(folder)
    model = t5.T5Encoder(cfg, rngs=nnx.Rngs(0), **kw)
    dtype = kw.get("param_dtype", jnp.float32)
    nnx.update(model, jax.tree.map(lambda x: x.astype(dtype), nnx.state(loaded, nnx.Param)))
    return model


def _ids(cfg, batch=2, seed=0):
    """Prompts of different lengths, each ended by eos (1) and padded with 0 to 226 tokens."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((batch, LENGTH), np.int32)
    for b, n in enumerate([37, 180, 226, 5][:batch]):
        ids[b, :n] = rng.integers(2, cfg.vocab_size, n)
        ids[b, min(n, LENGTH - 1)] = 1
    return ids


def _torch_forward(model, ids, mask=None):
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(ids).long(),
            attention_mask=None if mask is None else torch.from_numpy(mask).long(),
        )
    return out.last_hidden_state.float().numpy()


@pytest.fixture(scope="module")
def pair():
    theirs = _torch_encoder(TINY)
    return theirs, _ours(theirs)


@pytest.mark.optimized  # compiled as users run (conftest)
def test_parity_fp32(pair):
    theirs, ours = pair
    ids = _ids(TINY)
    want = _torch_forward(theirs, ids)
    got = np.asarray(nnx.jit(lambda m, x: m(x))(ours, ids))
    assert got.shape == (2, LENGTH, TINY.d_model) and got.dtype == np.float32
    err = ref.rel_l2(got, want)
    print(f"fp32 rel L2 vs transformers: {err:.2e}")
    assert err <= 1e-5, err


def test_parity_with_padding_mask(pair):
    theirs, ours = pair
    ids = _ids(TINY, seed=1)
    mask = (np.cumsum(ids == 1, axis=1) - (ids == 1)) == 0  # up to and including eos
    want = _torch_forward(theirs, ids, mask.astype(np.int64))
    got = np.asarray(nnx.jit(lambda m, x, k: m(x, k))(ours, ids, mask))
    err = ref.rel_l2(got, want)
    print(f"masked fp32 rel L2 vs transformers: {err:.2e}")
    assert err <= 1e-5, err
    assert ref.rel_l2(got, np.asarray(ours(ids))) > 1e-3  # the mask does change the output


@pytest.mark.optimized  # compiled as users run (conftest)
@pytest.mark.parametrize(
    "param_dtype", [pytest.param(jnp.float32, marks=pytest.mark.slow), jnp.bfloat16]
)
def test_bf16_close_to_fp32_reference(pair, param_dtype):
    theirs, _ = pair
    ours = _ours(theirs, dtype=jnp.bfloat16, param_dtype=param_dtype)
    assert ours.encoder.block.layer[1].DenseReluDense.wo.kernel[...].dtype == param_dtype
    ids = _ids(TINY)
    got = nnx.jit(lambda m, x: m(x))(ours, ids)
    assert got.dtype == jnp.bfloat16
    err = ref.rel_l2(np.asarray(got.astype(jnp.float32)), _torch_forward(theirs, ids))
    print(f"bf16 (params {jnp.dtype(param_dtype).name}) rel L2 vs fp32 transformers: {err:.2e}")
    assert 1e-4 < err <= 3e-2, err  # really bf16 (not fp32), and within bf16 rounding


@pytest.mark.slow  # recompute is in the fast subset through test_transformer.py
@pytest.mark.parametrize("remat", ["full", "save_dots", "save_attention"])
def test_remat_gives_same_outputs_and_gradients(pair, remat):
    theirs, base = pair
    other = _ours(theirs, remat=remat)
    ids = _ids(TINY)[:, :64]

    def loss(model):
        return jnp.mean(model(ids) ** 2)

    (l0, g0), (l1, g1) = (nnx.jit(nnx.value_and_grad(loss))(m) for m in (base, other))
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


def test_sharded_run_matches_unsharded(pair):
    _, ours = pair
    ids = _ids(TINY, batch=4)
    want = np.asarray(ours(ids))
    # Auto axes: the model pins activations with sharding constraints and lets XLA do the rest.
    auto = (jax.sharding.AxisType.Auto,) * 4
    mesh = jax.make_mesh((2, 2, 1, 2), sharding.MESH_AXES, axis_types=auto)
    graphdef, state = nnx.split(ours)
    specs = sharding.state_specs(state)
    with jax.set_mesh(mesh):
        state = jax.device_put(state, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
        assert state["shared"]["embedding"][...].sharding.spec == P(None, ("fsdp", "context"))

        @jax.jit
        def run(state, ids):
            return nnx.merge(graphdef, state)(ids)

        got = run(state, jax.device_put(ids, NamedSharding(mesh, sharding.spec(("batch", None)))))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 40), (8, 20)])
def test_relative_position_buckets_match_transformers(num_buckets, max_distance):
    q_len, k_len = 300, 700
    rel = torch.arange(k_len)[None, :] - torch.arange(q_len)[:, None]
    want = T5Attention._relative_position_bucket(rel, True, num_buckets, max_distance).numpy()
    got = t5.relative_position_buckets(q_len, k_len, num_buckets, max_distance)
    np.testing.assert_array_equal(got, want)


def _xxl_expected_count(c: t5.T5Config) -> int:
    attention = 4 * c.d_model * c.num_heads * c.d_kv  # q, k, v, o
    feed_forward = 3 * c.d_model * c.d_ff  # wi_0, wi_1, wo
    per_layer = attention + feed_forward + 2 * c.d_model  # + two norm scales
    table = c.relative_attention_num_buckets * c.num_heads
    return c.vocab_size * c.d_model + table + c.num_layers * per_layer + c.d_model


def test_xxl_variant_has_transformers_parameter_count_and_tree():
    cfg = t5.t5_config("t5-v1_1-xxl")
    model = nnx.eval_shape(lambda: t5.T5Encoder(cfg, rngs=nnx.Rngs(0)))  # nothing allocated
    flat = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    count = sum(int(np.prod(v.shape)) for v in flat.values())
    assert count == _xxl_expected_count(cfg) == 4_762_310_656

    with torch.device("meta"):
        theirs = transformers.T5EncoderModel(transformers.T5Config(**cfg.to_transformers()))
    assert count == theirs.num_parameters()  # counts the tied shared/embed_tokens table once

    layers, d, n, k, f = 24, 4096, 64, 64, 10240
    block = "encoder/block/layer"
    want = {
        "shared/embedding": ((32128, d), ("vocab", "embed")),
        "encoder/relative_attention_bias/embedding": ((32, n), (None, "heads")),
        f"{block}/0/SelfAttention/q/kernel": (
            (layers, d, n, k),
            ("layers", "embed", "heads", "kv"),
        ),
        f"{block}/0/SelfAttention/k/kernel": (
            (layers, d, n, k),
            ("layers", "embed", "heads", "kv"),
        ),
        f"{block}/0/SelfAttention/v/kernel": (
            (layers, d, n, k),
            ("layers", "embed", "heads", "kv"),
        ),
        f"{block}/0/SelfAttention/o/kernel": (
            (layers, n, k, d),
            ("layers", "heads", "kv", "embed"),
        ),
        f"{block}/0/layer_norm/scale": ((layers, d), ("layers", None)),
        f"{block}/1/DenseReluDense/wi_0/kernel": ((layers, d, f), ("layers", "embed", "mlp")),
        f"{block}/1/DenseReluDense/wi_1/kernel": ((layers, d, f), ("layers", "embed", "mlp")),
        f"{block}/1/DenseReluDense/wo/kernel": ((layers, f, d), ("layers", "mlp", "embed")),
        f"{block}/1/layer_norm/scale": ((layers, d), ("layers", None)),
        "encoder/final_layer_norm/scale": ((d,), (None,)),
    }
    got = {name: (tuple(v.shape), sharding.logical_axes(v)) for name, v in flat.items()}
    assert got == want


def test_config_round_trips_and_rejects_other_t5_flavours():
    cfg = t5.t5_config("t5-v1_1-xxl")
    assert t5.T5Config.from_transformers(cfg.to_transformers()) == cfg
    saved = transformers.T5Config(**TINY.to_transformers()).to_dict()  # what config.json holds
    assert t5.T5Config.from_transformers(saved) == TINY
    # An absent feed_forward_proj is transformers' default, original T5's ungated "relu".
    no_proj = {k: v for k, v in saved.items() if k != "feed_forward_proj"}
    assert t5.T5Config.from_transformers(no_proj) == dataclasses.replace(
        TINY, feed_forward_proj="relu"
    )
    with pytest.raises(ValueError, match="is_decoder"):
        t5.T5Config.from_transformers(saved | {"is_decoder": True})
    with pytest.raises(ValueError, match="model_type"):
        t5.T5Config.from_transformers(saved | {"model_type": "umt5"})
    with pytest.raises(ValueError, match="unknown T5 variant"):
        t5.t5_config("t5-xxl")
    with pytest.raises(ValueError, match="remat"):
        t5.T5Encoder(TINY, remat="all", rngs=nnx.Rngs(0))


def test_tokenize_matches_the_pipelines_call(tmp_path):
    ref.build_tokenizer(tmp_path / "tokenizer")
    lines = ref.PROMPTS
    prompts = [lines[0], "short", " ".join(lines * 20)]  # the last one is truncated

    for folder in (tmp_path / "tokenizer", tmp_path):  # tokenizer.json, and spiece.model only
        tok = t5.load_tokenizer(folder)
        got = t5.tokenize(tok, prompts)
        want = tok(
            prompts,
            padding="max_length",
            max_length=226,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        ).input_ids.numpy()
        assert got.dtype == np.int32 and got.shape == (3, 226)
        np.testing.assert_array_equal(got, want)
        n = int(np.sum(got[1] != 0))  # "short" + eos, then padding
        assert got[1, n - 1] == tok.eos_token_id == 1 and (got[1, n:] == tok.pad_token_id).all()
        assert got[2, -1] == 1 and (got[2] != 0).all()  # truncated prompts keep their eos
        np.testing.assert_array_equal(t5.tokenize(tok, "short"), got[1:2])


# transformers' default "relu", v1.1's "gated-gelu" (tanh GELU) and the spellings other T5
# checkpoints use; every other activation is checked elementwise below.
FEED_FORWARDS = [
    "relu",
    "gated-gelu",
    "gelu",
    "gated-relu",
    "gated-silu",
    "silu",
    "gelu_pytorch_tanh",
    "gated-gelu_python",
]
SMALL = dataclasses.replace(TINY, num_layers=2)


@pytest.mark.parametrize("proj", FEED_FORWARDS)
def test_parity_for_each_feed_forward_proj(proj):
    cfg = dataclasses.replace(SMALL, feed_forward_proj=proj)
    theirs = _torch_encoder(cfg)
    their_cfg = theirs.config
    assert (cfg.is_gated_act, cfg.dense_act_fn) == (their_cfg.is_gated_act, their_cfg.dense_act_fn)
    ours = _ours(theirs, cfg)  # the tree must match the loader's, wi or wi_0 and wi_1
    ids = _ids(cfg)[:, :64]
    want = _torch_forward(theirs, ids)
    got = np.asarray(nnx.jit(lambda m, x: m(x))(ours, ids))
    err, max_abs = ref.rel_l2(got, want), float(np.max(np.abs(got - want)))
    print(f"{proj}: fp32 rel L2 {err:.2e}, max abs {max_abs:.2e} vs transformers")
    assert err <= 1e-5, err


def test_activations_match_transformers_act2fn():
    # Everything in ACT2FN but the two activations with learned parameters.
    assert set(ACT2FN) - set(t5.ACTIVATIONS) == {"prelu", "xielu"}
    x = np.linspace(-12.0, 12.0, 4801, dtype=np.float32)
    for name, fn in t5.ACTIVATIONS.items():
        want = ACT2FN[name](torch.from_numpy(x)).numpy()
        got = np.asarray(jax.jit(fn)(x))
        # atol: where GELU's 1 + erf cancels (x < -4) the two erfs differ by float32 rounding.
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6, err_msg=name)
        print(f"{name}: max abs {np.max(np.abs(got - want)):.1e} vs ACT2FN")


def test_ungated_encoder_round_trips_through_orbax_and_back(tmp_path):
    cfg = dataclasses.replace(SMALL, feed_forward_proj="relu")
    theirs = _torch_encoder(cfg)
    theirs.save_pretrained(tmp_path / "src")
    ours = cj.load_text_encoder(tmp_path / "src")
    assert ours.cfg == cfg
    assert isinstance(ours.encoder.block.layer[1].DenseReluDense, t5.FeedForward)

    (tmp_path / "orbax").mkdir()
    components.write_orbax_module(ours, tmp_path / "orbax", "text_encoder", cfg.to_transformers())
    components.convert("orbax-to-diffusers", tmp_path / "orbax", tmp_path / "back")
    src = safetensors.numpy.load_file(tmp_path / "src/model.safetensors")
    back = safetensors.numpy.load_file(tmp_path / "back/model.safetensors")
    assert "encoder.block.1.layer.1.DenseReluDense.wi.weight" in back
    assert sorted(back) == sorted(src)
    for name, want in src.items():
        np.testing.assert_array_equal(back[name], want, err_msg=name)

    again = transformers.T5EncoderModel.from_pretrained(tmp_path / "back").eval()
    assert again.config.feed_forward_proj == "relu" and not again.config.is_gated_act
    ids = _ids(cfg)[:, :32]
    np.testing.assert_array_equal(_torch_forward(again, ids), _torch_forward(theirs, ids))


def test_config_round_trips_every_feed_forward_proj_and_refuses_others():
    for proj in [*FEED_FORWARDS, *(f"gated-{a}" for a in t5.ACTIVATIONS), *t5.ACTIVATIONS]:
        cfg = dataclasses.replace(TINY, feed_forward_proj=proj)
        saved = transformers.T5Config(**cfg.to_transformers()).to_dict()
        assert saved["feed_forward_proj"] == proj
        assert t5.T5Config.from_transformers(saved) == cfg
    for bad in ("gated-foo", "prelu", "gated-xielu", "foo-relu", "gated-gated-relu", "GELU"):
        with pytest.raises(ValueError, match=f"feed_forward_proj='{bad}' is not supported.*relu"):
            t5.T5Config.from_transformers(TINY.to_transformers() | {"feed_forward_proj": bad})
        with pytest.raises(ValueError, match="feed_forward_proj"):
            dataclasses.replace(TINY, feed_forward_proj=bad)
