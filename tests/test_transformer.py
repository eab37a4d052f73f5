"""The expert transformer against diffusers' CogVideoXTransformer3DModel, for every variant."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
import torch
from flax import nnx

import cogvideox_jax as cj
from cogvideox_jax import components, layers, posemb, sharding, transformer

# (latent frames, latent height, latent width) per variant: native size, then another
# resolution, aspect ratio and frame count (1.5 needs an even frame count).
SIZES = {
    "2b": [(3, 6, 8), (2, 4, 10)],
    "5b": [(3, 6, 8), (2, 4, 10), (5, 8, 6)],
    "5b-i2v": [(3, 6, 8), (2, 6, 8)],  # the learned table is fixed to the sample H x W
    "1.5-5b": [(4, 6, 8), (2, 4, 10)],
    "1.5-5b-i2v": [(4, 6, 8), (6, 8, 6)],
}


def _inputs(cfg, f, h, w, seed=0, batch=2):
    rng = np.random.default_rng(seed)
    lat = rng.standard_normal((batch, f, h, w, cfg.in_channels)).astype(np.float32)
    txt = rng.standard_normal((batch, cfg.max_text_len, cfg.text_embed_dim)).astype(np.float32)
    t = np.array([999, 13, 500, 0][:batch])
    ofs = 2.0 if cfg.ofs_embed_dim else None
    return lat, txt, t, ofs


@pytest.fixture(scope="module", params=list(ref.TINY_TRANSFORMERS))
def pair(request, tmp_path_factory):
    """(variant, diffusers model, its saved folder, our model loaded from that folder)."""
    variant = request.param
    model = ref.diffusers_transformer(variant, seed=list(ref.TINY_TRANSFORMERS).index(variant))
    folder = tmp_path_factory.mktemp(variant)
    model.save_pretrained(folder)
    return variant, model, folder, cj.load_transformer(folder)


def _pairs(*fast):
    """Run a `pair` test on every variant, the ones not in `fast` only in the whole suite."""
    return pytest.mark.parametrize(
        "pair",
        [
            v if v in fast else pytest.param(v, marks=pytest.mark.slow)
            for v in ref.TINY_TRANSFORMERS
        ],
        indirect=True,
    )


@pytest.mark.optimized  # compiled as users run (conftest)
def test_parity_fp32(pair):
    variant, theirs, _, ours = pair
    for f, h, w in SIZES[variant]:
        lat, txt, t, ofs = _inputs(ours.cfg, f, h, w)
        want = ref.transformer_forward(theirs, lat, txt, t, ofs)
        got = np.asarray(ours(lat, txt, t, ofs=ofs))
        assert got.shape == want.shape
        assert ref.rel_l2(got, want) <= 1e-5, (variant, (f, h, w), ref.rel_l2(got, want))


@_pairs("2b")
def test_gradients_match_diffusers(pair, tmp_path):
    """Every parameter's gradient of <output, w> (fixed random w) against torch autograd's
    through diffusers. Torch's gradients go through the converter: they are saved as the
    weights of a diffusers checkpoint and loaded into our layout."""
    variant, theirs, _, ours = pair
    f, h, w = SIZES[variant][0]
    lat, txt, t, ofs = _inputs(ours.cfg, f, h, w)
    weights = (
        np.random.default_rng(1)
        .standard_normal(lat.shape[:-1] + (ours.cfg.out_channels,))
        .astype(np.float32)
    )

    model = copy.deepcopy(theirs)
    out = ref.transformer_forward_torch(model, lat, txt, t, ofs)
    (out * torch.from_numpy(weights)).sum().backward()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.zeros_like(p) if p.grad is None else p.grad)
    model.save_pretrained(tmp_path)
    want = nnx.state(cj.load_transformer(tmp_path), nnx.Param)

    got = nnx.grad(lambda m: jnp.sum(m(lat, txt, t, ofs=ofs) * weights))(ours)
    want, got = nnx.to_flat_state(want), nnx.to_flat_state(got)
    assert [k for k, _ in got] == [k for k, _ in want]
    for (path, a), (_, b) in zip(got, want, strict=True):
        a, b = np.asarray(a[...]), np.asarray(b[...])
        if not ours.cfg.rope and path[-2:] == ("norm_k", "bias"):
            # Without RoPE a key bias adds the same q.b to all of a query's logits, which the
            # softmax cancels: the gradient is zero, and both sides give rounding noise.
            assert max(np.linalg.norm(a), np.linalg.norm(b)) < 1e-4, (variant, path)
            continue
        assert np.linalg.norm(b) > 0, (variant, path)  # every parameter takes part
        assert ref.rel_l2(a, b) <= 1e-5, (variant, path, ref.rel_l2(a, b))  # 3.0e-6 at most


@pytest.mark.optimized  # compiled as users run (conftest)
@_pairs("2b")
def test_bf16_close_to_fp32_reference(pair):
    variant, theirs, folder, _ = pair
    ours = cj.load_transformer(folder, dtype=jnp.bfloat16)
    assert ours.patch_embed.proj.kernel[...].dtype == jnp.bfloat16
    f, h, w = SIZES[variant][0]
    lat, txt, t, ofs = _inputs(ours.cfg, f, h, w)
    want = ref.transformer_forward(theirs, lat, txt, t, ofs)
    got = np.asarray(ours(lat, txt, t, ofs=ofs).astype(jnp.float32))
    err = ref.rel_l2(got, want)
    assert 1e-4 < err <= 3e-2, err  # really bf16 (not fp32), and within bf16 rounding


@pytest.mark.parametrize("pair", ["2b"], indirect=True)  # conversions: test_convert.py
def test_orbax_and_diffusers_folders_give_identical_outputs(pair, tmp_path):
    variant, _, folder, ours = pair
    components.convert("diffusers-to-orbax", folder, tmp_path / "orbax")
    reloaded = cj.load_transformer(tmp_path / "orbax")
    lat, txt, t, ofs = _inputs(ours.cfg, *SIZES[variant][-1], seed=3)
    np.testing.assert_array_equal(
        np.asarray(reloaded(lat, txt, t, ofs=ofs)), np.asarray(ours(lat, txt, t, ofs=ofs))
    )


# Published parameter counts (diffusers `num_parameters()`; persistent buffers excluded).
PARAM_COUNTS = {
    "2b": 1_693_783_872,
    "5b": 5_570_283_072,
    "5b-i2v": 5_570_479_680,
    "1.5-5b": 5_570_676_352,
    "1.5-5b-i2v": 5_571_594_880,
}


@pytest.mark.parametrize("variant", list(PARAM_COUNTS))
def test_variants_match_published_sizes(variant):
    cfg = cj.transformer_config(variant)
    model = nnx.eval_shape(lambda: cj.Transformer(cfg, rngs=nnx.Rngs(0)))  # nothing allocated
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert sum(int(np.prod(p.shape)) for p in params) == PARAM_COUNTS[variant]
    buffers = jax.tree.leaves(nnx.state(model, layers.Buffer))
    want = [(1, 17776, 3072)] if variant == "5b-i2v" else []
    assert [tuple(b.shape) for b in buffers] == want


def test_variant_configs_round_trip_through_diffusers_config():
    for variant in PARAM_COUNTS:
        cfg = cj.transformer_config(variant)
        assert cj.TransformerConfig.from_diffusers(cfg.to_diffusers()) == cfg


def _perturbed(cfg, **kw):
    model = cj.Transformer(cfg, rngs=nnx.Rngs(0), **kw)
    state = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(state))))
    nnx.update(
        model, jax.tree.map(lambda p: p + 0.2 * jax.random.normal(next(keys), p.shape), state)
    )
    return model


@pytest.mark.slow  # a block's recompute is in the fast subset (the next test)
@pytest.mark.parametrize("remat", ["full", "save_dots", "save_attention", "offload_dots"])
def test_remat_policies_give_same_outputs_and_gradients(remat):
    cfg = cj.TransformerConfig.from_diffusers(ref.TINY_TRANSFORMERS["5b"] | {"num_layers": 3})
    base = _perturbed(cfg)
    other = _perturbed(cfg, remat=remat)
    lat, txt, t, _ = _inputs(cfg, 2, 4, 4)

    def loss(model):
        return jnp.mean(model(lat, txt, t) ** 2)

    (l0, g0), (l1, g1) = (nnx.value_and_grad(loss)(m) for m in (base, other))
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=False):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


def test_a_block_keeps_only_its_products_inputs_for_the_backward():
    """What one block keeps from its forward for its backward (the leaves of `jax.vjp`'s
    function), in units of one (tokens, width) activation. Wanted: the block input, the two
    modulated norms, pre-norm q and k, the attention kernel's q, k, v and output (and the
    output again, in the out-projection's layout), the attention's and the MLP's updates (for
    their gates), the residual between them, and the MLP's pre-activation and GELU output (4
    units each): 21, plus the RoPE tables and the parameters (0.9). Without recomputing norms,
    modulation, RoPE and GELU in the backward, autodiff kept 60: three copies of each
    LayerNorm's input, five of the GELU's, the per-token scales and gates."""
    d, n, k, e, s, length = 64, 2, 32, 16, 5, 1000
    block = transformer.Block(
        d, n, k, e, 1e-5, attention_impl="blocked", context_parallel="allgather",
        dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0),
    )  # fmt: skip
    graph, params, rest = nnx.split(block, nnx.Param, ...)
    keys = jax.random.split(jax.random.key(1), 3)
    h = jax.random.normal(keys[0], (1, s + length, d))
    temb = jax.random.normal(keys[1], (1, e))
    angles = jax.random.uniform(keys[2], (s + length, k))
    is_text = np.arange(s + length) < s

    def run(h, params):
        return nnx.merge(graph, params, rest)(h, temb, jnp.cos(angles), jnp.sin(angles), is_text)

    _, backward = jax.vjp(run, h, params)
    kept = sum(leaf.size for leaf in jax.tree.leaves(backward)) / h.size
    assert 21 <= kept <= 23, kept  # 22.9


def test_every_parameter_has_logical_axes_of_its_rank():
    model = nnx.eval_shape(
        lambda: cj.Transformer(cj.transformer_config("5b-i2v"), rngs=nnx.Rngs(0))
    )
    for path, var in nnx.to_flat_state(nnx.state(model, (nnx.Param, layers.Buffer))):
        names = sharding.logical_axes(var)
        assert len(names) == len(var.shape), path
        assert all(n is not None for n in names) or len(var.shape) <= 3, path
        if path[0] == "transformer_blocks":
            assert names[0] == "layers", path


def test_bad_inputs_fail_with_the_rule():
    cfg = cj.TransformerConfig.from_diffusers(ref.TINY_TRANSFORMERS["1.5-5b-i2v"])
    model = cj.Transformer(cfg, rngs=nnx.Rngs(0))
    lat, txt, t, _ = _inputs(cfg, 4, 4, 4, batch=1)
    with pytest.raises(ValueError, match="multiple of patch_size_t"):
        model(lat[:, :3], txt, t, ofs=2.0)
    with pytest.raises(ValueError, match="pass ofs"):
        model(lat, txt, t)
    with pytest.raises(ValueError, match=r"latents must be \(B, T, H, W, 8\)"):
        model(lat[..., :4], txt, t, ofs=2.0)
    cfg2b = cj.TransformerConfig.from_diffusers(ref.TINY_TRANSFORMERS["2b"])
    lat, txt, t, _ = _inputs(cfg2b, 3, 4, 4, batch=1)
    with pytest.raises(ValueError, match="text length must be 7"):
        cj.Transformer(cfg2b, rngs=nnx.Rngs(0))(lat, txt[:, :5], t)
    with pytest.raises(ValueError, match="activation_fn"):
        cj.TransformerConfig.from_diffusers(ref.TINY_TRANSFORMERS["5b"] | {"activation_fn": "gelu"})


@pytest.mark.parametrize("heads", [24, 40])
def test_rotary_tables_diffusers_cannot_build_are_refused_at_load(heads, tmp_path):
    """A RoPE head size that is not a multiple of 16 fails in diffusers' forward (its rotary
    table has another width), and here at load, with the reason."""
    theirs = ref.diffusers_transformer("5b", attention_head_dim=heads)
    cfg = cj.TransformerConfig.from_diffusers(ref.TINY_TRANSFORMERS["5b"])
    lat, txt, t, _ = _inputs(cfg, 3, 6, 8, batch=1)
    with pytest.raises((AssertionError, RuntimeError)):
        ref.transformer_forward(theirs, np.asarray(lat), np.asarray(txt), np.asarray(t))
    theirs.save_pretrained(tmp_path)
    want = rf"attention_head_dim={heads}: the 3D rotary .* multiple of 16 \(diffusers cannot"
    with pytest.raises(ValueError, match=want):
        cj.load_transformer(tmp_path)


def test_sincos_tables_diffusers_cannot_build_are_refused():
    from diffusers import CogVideoXTransformer3DModel

    config = ref.TINY_TRANSFORMERS["2b"] | {"num_attention_heads": 1, "attention_head_dim": 20}
    with pytest.raises(ValueError):  # diffusers builds its sin-cos table in __init__
        CogVideoXTransformer3DModel(**config)
    want = r"num_attention_heads x attention_head_dim = 20: the 3D sin-cos .* multiple of 16"
    with pytest.raises(ValueError, match=want):
        cj.TransformerConfig.from_diffusers(config)


@pytest.mark.parametrize(
    "start,end,steps",
    [(0, 12.0, 13), (2, 26.4375, 24), (3, 5 * 7 / 8, 8), (0, 0.0, 1), (1, 44.1, 45)],
)
def test_linspace_matches_torch(start, end, steps):
    # Equal up to the last bits of torch's SIMD-width-dependent vectorised kernel.
    want = torch.linspace(start, end, steps, dtype=torch.float32).numpy()
    np.testing.assert_allclose(posemb.torch_linspace_f32(start, end, steps), want, rtol=3e-7)


@pytest.mark.parametrize("grid", [(13, 30, 45), (13, 48, 85), (7, 17, 30)])
def test_rope_tables_match_diffusers(grid):
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    t, h, w = grid
    crops = get_resize_crop_region_for_grid((h, w), 45, 30)
    want = get_3d_rotary_pos_embed(64, crops, (h, w), t)
    got = posemb.rope_3d(64, *posemb.rope_grid_linspace(t, h, w, 30, 45))
    for g, wnt in zip(got, want, strict=False):
        # Positions agree to the last bit of float32 (see test above), angles up to ~45 rad.
        np.testing.assert_allclose(g, wnt.numpy(), atol=5e-6, rtol=0)
