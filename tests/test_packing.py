"""Packed rows (several clips of different sizes per row, block-diagonal attention): every clip
in a pack gets what the per-clip forward gives it, on one device and under context parallelism;
segment-aware attention for each kernel; the per-token position tables."""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from flax import nnx
from jax.sharding import AxisType

import cogvideox_jax as cj
from cogvideox_jax import attention, posemb, sharding, splash, transformer

_TEXT_LEN = 7  # = the tiny configs' max_text_len (2B adds its sin-cos table to S = 7 rows)
# Latent (T, H, W) per clip; rows of a pack: three clips of other sizes and aspect ratios plus
# padding, and one clip alone. 1.5 needs even T (the data pads frames at the front).
_CLIPS = {
    "1.0": [[(3, 4, 6), (2, 6, 4), (1, 4, 4)], [(2, 4, 8)]],
    "1.5": [[(4, 4, 6), (2, 6, 4), (2, 4, 4)], [(2, 8, 4)]],
}
_BUDGET = 40  # video tokens a row
_GROUP = 3  # clips a row at most


@functools.cache
def _model(variant, context_parallel="allgather", remat="none", **overrides):
    """A tiny model of `variant`, every parameter perturbed."""
    return ref.perturbed_model(
        variant, context_parallel=context_parallel, remat=remat, overrides=overrides
    )


def _clips(cfg, seed=0):
    """Rows of clips (latents (T, H, W, C), text (S, Dt), timestep)."""
    rng = np.random.default_rng(seed)
    shapes = _CLIPS["1.5" if cfg.patch_size_t else "1.0"]
    times = iter([999, 13, 500, 250])
    return [
        [
            (
                rng.standard_normal((*shape, cfg.in_channels)).astype(np.float32),
                rng.standard_normal((_TEXT_LEN, cfg.text_embed_dim)).astype(np.float32),
                next(times),
            )
            for shape in row
        ]
        for row in shapes
    ]


def _pack(cfg, rows):
    """The packed-batch contract's arrays for `rows`, and the video slice of each clip."""
    p, pt = cfg.patch_size, cfg.patch_size_t or 1
    b, s, dt = len(rows), _TEXT_LEN, cfg.text_embed_dim
    batch = dict(
        video=np.zeros((b, _BUDGET, cfg.patch_features), np.float32),
        video_segment_ids=np.zeros((b, _BUDGET), np.int32),
        video_positions=np.zeros((b, _BUDGET, 3), np.int32),
        text=np.zeros((b, _GROUP * s, dt), np.float32),
        text_segment_ids=np.zeros((b, _GROUP * s), np.int32),
        grids=np.zeros((b, _GROUP, 3), np.int32),
        timesteps=np.zeros((b, _GROUP), np.int32),
    )
    slices = []
    for r, clips in enumerate(rows):
        start = 0
        for i, (lat, txt, t) in enumerate(clips):
            grid = (lat.shape[0] // pt, lat.shape[1] // p, lat.shape[2] // p)
            tokens = transformer.patchify(lat, p, pt)  # (L, P)
            span = slice(start, start + len(tokens))
            batch["video"][r, span] = tokens
            batch["video_segment_ids"][r, span] = i + 1
            coords = np.meshgrid(*(np.arange(n) for n in grid), indexing="ij")
            batch["video_positions"][r, span] = np.stack(coords, -1).reshape(-1, 3)
            batch["text"][r, i * s : (i + 1) * s] = txt
            batch["text_segment_ids"][r, i * s : (i + 1) * s] = i + 1
            batch["grids"][r, i], batch["timesteps"][r, i] = grid, t
            slices.append((r, span))
            start = span.stop
    assert start < _BUDGET or len(rows[0]) > 1  # every row here ends in padding
    return batch, slices


def _jit_run(model, method, *args):
    """model.method(*args) under jit, compiled without LLVM's costlier passes (as in
    tests/test_context_parallel.py: compiling is most of these tests' time)."""
    graphdef, state = nnx.split(model)
    ofs = 2.0 if model.cfg.ofs_embed_dim else None
    f = jax.jit(lambda state, *a: getattr(nnx.merge(graphdef, state), method)(*a, ofs=ofs))
    fast = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
    return np.asarray(f.lower(state, *args).compile(compiler_options=fast)(state, *args))


def _run_packed(model, batch, mesh=None):
    segments = {k: batch[k] for k in ("video_segment_ids", "video_positions")}
    segments |= {k: batch[k] for k in ("text_segment_ids", "grids")}
    args = (batch["video"], batch["text"], batch["timesteps"], segments)
    if mesh is None:
        return _jit_run(model, "packed", *args)
    with jax.set_mesh(mesh):
        return _jit_run(model, "packed", *args)


@pytest.mark.parametrize(
    "variant", ["5b", "1.5-5b-i2v", pytest.param("2b", marks=pytest.mark.slow)]
)
def test_packed_equals_per_clip_forward(variant):
    """5B: RoPE on the crop-region linspace; 1.5-I2V: arange RoPE, 2 frames a token, ofs; 2B:
    the sin-cos table. Different timesteps per clip."""
    model = _model(variant)
    cfg = model.cfg
    rows = _clips(cfg)
    batch, slices = _pack(cfg, rows)
    got = _run_packed(model, batch)
    out_features = (cfg.patch_size_t or 1) * cfg.patch_size**2 * cfg.out_channels
    assert got.shape == (2, _BUDGET, out_features)
    for (lat, txt, t), (r, span) in zip([c for row in rows for c in row], slices, strict=True):
        alone = _jit_run(model, "__call__", lat[None], txt[None], np.array([t]))  # (1, T, H, W, C)
        want = transformer.patchify(alone[0], cfg.patch_size, cfg.patch_size_t or 1)
        err = ref.rel_l2(got[r, span], want)
        assert err <= 1e-5, (variant, lat.shape, err)


def test_changing_one_clip_leaves_the_others_bit_identical():
    model = _model("5b")
    rows = _clips(model.cfg)
    batch, slices = _pack(model.cfg, rows)
    before = _run_packed(model, batch)
    (_, span1), (_, span2) = slices[0], slices[1]
    batch["video"][0, span2] += 3.0  # clip 2: other latents, text and timestep
    batch["text"][0, _TEXT_LEN : 2 * _TEXT_LEN] *= -1.0
    batch["timesteps"][0, 1] = 700
    after = _run_packed(model, batch)
    np.testing.assert_array_equal(after[0, span1], before[0, span1])
    np.testing.assert_array_equal(after[0, slices[2][1]], before[0, slices[2][1]])
    np.testing.assert_array_equal(after[1], before[1])
    assert not np.allclose(after[0, span2], before[0, span2])  # the change did reach clip 2


# 8 heads: ulysses splits the heads over 4 context shards. 21 text + 40 video tokens pad to 64.
_HEADS = {"num_attention_heads": 8, "attention_head_dim": 16, "num_layers": 1}


def _output_loss_and_grads(model, batch, mesh=None):
    """Packed outputs, and the loss mean(outputs on real tokens ** 2) with its gradients."""
    segments = {k: batch[k] for k in ("video_segment_ids", "video_positions")}
    segments |= {k: batch[k] for k in ("text_segment_ids", "grids")}
    real = (batch["video_segment_ids"] > 0)[..., None]
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, rest, *args):
        out = nnx.merge(graphdef, params, rest).packed(*args)
        return jnp.mean(jnp.where(real, out, 0.0) ** 2), out

    f = jax.jit(jax.value_and_grad(loss, has_aux=True))
    args = (params, rest, batch["video"], batch["text"], batch["timesteps"], segments)
    fast = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        (value, out), grads = f.lower(*args).compile(compiler_options=fast)(*args)
    return float(value), np.asarray(out), jax.tree.map(np.asarray, grads)


@pytest.mark.slow  # context parallelism is in the fast subset through test_context_parallel.py
@pytest.mark.parametrize("mode", ["allgather", "ulysses"])
def test_packed_under_context_parallelism_equals_one_device(mode):
    """(fsdp 2, context 4): outputs, loss and every parameter gradient; ulysses under full
    remat (the segment ids closed over by nnx.remat inside nnx.scan)."""
    want_model = _model("5b", **_HEADS)
    batch, _ = _pack(want_model.cfg, _clips(want_model.cfg))
    want_loss, want_out, want_grads = _output_loss_and_grads(want_model, batch)
    mesh = jax.make_mesh((1, 2, 4, 1), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 4)
    model = _model("5b", mode, "full" if mode == "ulysses" else "none", **_HEADS)
    loss, out, grads = _output_loss_and_grads(model, batch, mesh)
    real = batch["video_segment_ids"] > 0
    assert ref.rel_l2(out[real], want_out[real]) <= 1e-5
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    flat_want = dict(nnx.to_flat_state(want_grads))
    for path, g in nnx.to_flat_state(grads):
        assert ref.rel_l2(g[...], flat_want[path][...]) <= 1e-5, path


def test_bad_packed_inputs_fail_with_the_rule():
    model = _model("5b-i2v")
    batch, _ = _pack(model.cfg, _clips(model.cfg))
    with pytest.raises(ValueError, match="learned position table"):
        _run_packed(model, batch)
    model = _model("5b")
    batch, _ = _pack(model.cfg, _clips(model.cfg))
    segments = {k: batch[k] for k in ("video_segment_ids", "video_positions", "grids")}
    args = batch["video"], batch["text"], batch["timesteps"]
    with pytest.raises(ValueError, match=r"segments\['text_segment_ids'\] must be \(2, 21\)"):
        model.packed(*args, segments)
    segments["text_segment_ids"] = batch["text_segment_ids"]
    with pytest.raises(ValueError, match=r"timesteps must be \(2, G\)"):
        model.packed(*args[:2], batch["timesteps"][:, 0], segments)
    with pytest.raises(ValueError, match=r"segments\['grids'\] must be \(2, 2, 3\)"):
        model.packed(*args[:2], batch["timesteps"][:, :2], segments)


def _segment_qkv(b=2, length=200, n=2, k=16, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((b, length, n, k)).astype(np.float32) for _ in range(3))
    # Row 0: segments in two non-contiguous regions (as [text; video]) and padding 0 at the end.
    ids = np.zeros((b, length), np.int32)
    ids[0, :30], ids[0, 30:60], ids[0, 60:130], ids[0, 130:170] = 1, 2, 1, 2
    ids[1, :120], ids[1, 120:] = 1, 3
    return q, k, v, ids


def _per_segment_reference(q, k, v, ids):
    """Attention of each segment's tokens among themselves, one segment at a time."""
    out = np.zeros_like(q)
    for r in range(q.shape[0]):
        for s in np.unique(ids[r]):
            idx = np.flatnonzero(ids[r] == s)
            sub = (x[r : r + 1, idx] for x in (q, k, v))
            out[r, idx] = np.asarray(jax.nn.dot_product_attention(*sub))[0]
    return out


def test_xla_segment_mask_is_attention_within_each_segment():
    q, k, v, ids = _segment_qkv()
    got = attention.dot_product_attention(q, k, v, impl="xla", segment_ids=ids)
    np.testing.assert_allclose(got, _per_segment_reference(q, k, v, ids), atol=2e-6)


def test_splash_segment_ids_match_xla():
    q, k, v, ids = _segment_qkv()
    want = attention.dot_product_attention(q, k, v, impl="xla", segment_ids=ids)
    got = splash.attention(q, k, v, segment_ids=(ids, ids), interpret=True)
    np.testing.assert_allclose(got, want, atol=2e-6)


@pytest.mark.parametrize("mode", ["allgather", "ulysses"])
def test_splash_segment_ids_per_shard_under_context_parallelism(monkeypatch, mode):
    """The real kernel (Pallas interpreter) per shard on (fsdp 2, context 2, tensor 2): the ids
    are sharded with the queries and gathered for the keys."""
    real = splash.attention
    monkeypatch.setattr(splash, "attention", functools.partial(real, interpret=True), raising=True)
    q, k, v, ids = _segment_qkv(length=24, n=8, k=8)
    ids[0, 20:] = 0
    want = attention.dot_product_attention(q, k, v, impl="xla", segment_ids=ids)
    mesh = jax.make_mesh((1, 2, 2, 2), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 4)
    f = functools.partial(attention.dot_product_attention, impl="splash", context_parallel=mode)
    with jax.set_mesh(mesh):
        got = jax.jit(lambda q, k, v, ids: f(q, k, v, segment_ids=ids))(q, k, v, ids)
    np.testing.assert_allclose(got, want, atol=2e-6)


@pytest.mark.slow  # the packed forward tests use these tables
@pytest.mark.parametrize("variant", ["5b", "1.5-5b"])
def test_per_token_rope_matches_the_per_clip_tables(variant):
    """The published sizes' grids (30 x 45 base, 5B), other aspect ratios and the tie grids
    where Python's float rounding of the crop region differs from the exact quotient's."""
    cfg = cj.transformer_config(variant)
    model = nnx.eval_shape(lambda: cj.Transformer(cfg, rngs=nnx.Rngs(0)))  # only cfg is used
    grids = [(13, 30, 45), (7, 48, 85), (2, 11, 66), (3, 44, 11), (1, 1, 1)]
    if variant == "1.5-5b":
        grids = [(11, 60, 85), (3, 17, 30), (1, 1, 1)]
    for grid in grids:
        want_cos, want_sin = model._rope_tables(*grid, text_len=0)
        pos = np.stack(np.meshgrid(*(np.arange(n) for n in grid), indexing="ij"), -1)
        pos = pos.reshape(1, -1, 3)
        ids = np.ones(pos.shape[:2], np.int32)
        cos, sin = transformer.packed_rope_tables(cfg, pos, np.array([[grid]]), ids)
        # The same float32 angles; cos and sin themselves within an ulp or two (6e-8 measured).
        np.testing.assert_allclose(cos[0], want_cos, atol=2.5e-7, rtol=0)
        np.testing.assert_allclose(sin[0], want_sin, atol=2.5e-7, rtol=0)


def test_per_token_sincos_rows_equal_the_table():
    """2B's table (at a narrower width) at its own size and at 2x: bit-identical (looked-up
    rows); a position beyond the looked-up rows (computed in float32) within a few ulps of its
    angle."""
    cfg = cj.transformer_config("2b", num_heads=2)
    for grid, atol in [((13, 30, 45), 0.0), ((3, 60, 90), 0.0), ((2, 3, 600), 1e-4)]:
        want = transformer._sincos_table(cfg, *grid)[cfg.max_text_len :].astype(np.float32)
        pos = np.stack(np.meshgrid(*(np.arange(n) for n in grid), indexing="ij"), -1)
        scales = cfg.spatial_interpolation_scale, cfg.temporal_interpolation_scale
        got = posemb.sincos_3d_tokens(cfg.width, pos.reshape(-1, 3), *scales)
        np.testing.assert_allclose(got, want, atol=atol, rtol=0)


def test_patchify_round_trips_numpy_and_jax():
    x = np.random.default_rng(0).standard_normal((2, 4, 6, 8, 3)).astype(np.float32)
    for pt in (1, 2):
        tokens = transformer.patchify(x, 2, pt)
        assert tokens.shape == (2, (4 // pt) * 3 * 4, pt * 2 * 2 * 3)
        np.testing.assert_array_equal(transformer.unpatchify(tokens, 4, 6, 8, 2, pt, 3), x)
        np.testing.assert_array_equal(transformer.patchify(jnp.asarray(x), 2, pt), tokens)
    # Token (t, h, w) = (1, 2, 3) of pt=1 holds pixel rows 4:6, cols 6:8 of frame 1.
    tok = transformer.patchify(x, 2, 1)[0, 1 * 12 + 2 * 4 + 3]
    np.testing.assert_array_equal(tok, x[0, 1, 4:6, 6:8].reshape(-1))
