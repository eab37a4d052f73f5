"""Analytic transformer FLOPs against two independent counts: one from the parameter shapes of a
built model, one from XLA's cost analysis of the compiled forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import cogvideox_jax as cj
from cogvideox_jax import flops


def _shape_count(model, text_len, video_tokens):
    """2 * kernel size per row: rows are tokens, text or video tokens, or samples (embeddings)."""
    cfg = model.cfg
    total = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = "/".join(str(p) for p in path)
        if "kernel" not in path[-1]:
            continue
        size = int(np.prod(var.shape))
        if name.startswith("transformer_blocks"):
            per_layer = size // cfg.num_layers
            rows = 1 if "/norm" in name else text_len + video_tokens
            total += cfg.num_layers * 2 * per_layer * rows
        elif name.startswith(("patch_embed/proj", "proj_out")):
            total += 2 * size * video_tokens
        elif name.startswith("patch_embed/text_proj"):
            total += 2 * size * text_len
        else:  # time / ofs embeddings, norm_out: once per sample
            total += 2 * size
    n = text_len + video_tokens
    return total + cfg.num_layers * 4 * n * n * cfg.width


@pytest.mark.parametrize("variant", ["2b", "1.5-5b-i2v"])
def test_matches_parameter_shapes(variant):
    over = dict(num_layers=2, num_heads=3, head_dim=16, text_embed_dim=12, time_embed_dim=10)
    if variant.endswith("i2v"):
        over["ofs_embed_dim"] = 6
    cfg = cj.transformer_config(variant, **over)
    model = nnx.eval_shape(lambda: cj.Transformer(cfg, rngs=nnx.Rngs(0)))
    assert flops.transformer_flops(cfg, 7, 40) == _shape_count(model, 7, 40)
    assert flops.train_flops(cfg, 7, 40) == 3 * flops.transformer_flops(cfg, 7, 40)


def test_close_to_xla_cost_analysis():
    """XLA also counts elementwise work, so it is a little above the matmul-only count. One
    layer: XLA's cost analysis counts the body of the layer scan (a while loop) only once."""
    cfg = cj.transformer_config(
        "5b", num_layers=1, num_heads=4, head_dim=64, text_embed_dim=64, time_embed_dim=64
    )
    model = nnx.eval_shape(lambda: cj.Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    b, t, h, w, s = 2, 3, 8, 8, 16
    args = (
        jax.ShapeDtypeStruct((b, t, h, w, 16), jnp.float32),
        jax.ShapeDtypeStruct((b, s, 64), jnp.float32),
        jax.ShapeDtypeStruct((b,), jnp.int32),
    )

    def forward(state, x, text, ts):
        return nnx.merge(graphdef, state)(x, text, ts)

    cost = jax.jit(forward).lower(state, *args).compile().cost_analysis()
    xla = cost["flops"]
    ours = b * flops.transformer_flops(cfg, s, t * (h // 2) * (w // 2))
    assert 1.0 <= xla / ours < 1.15, (xla, ours)


def test_published_scale():
    """CogVideoX-5B at 49x480x720: 226 + 13*30*45 tokens, ~3.3e14 forward FLOPs per sample
    (maxdiffusion's formula, as in the project's scale notes)."""
    cfg = cj.transformer_config("5b")
    f = flops.transformer_flops(cfg, 226, 13 * 30 * 45)
    assert 3.2e14 < f < 3.45e14


def test_lora_training_counts_frozen_weights_twice():
    """With LoRA the base weights get no gradient: exactly against the adapters' shapes on a built
    model, and roughly against XLA's cost analysis of the gradient for the adapters alone."""
    from cogvideox_jax import lora

    cfg = cj.transformer_config(
        "5b", num_layers=1, num_heads=4, head_dim=64, text_embed_dim=64, time_embed_dim=64
    )
    lcfg = lora.LoraConfig(8, 8.0, ("to_q", "to_v", "ff.net.0.proj", "ff.net.2"))

    def build():
        model = cj.Transformer(cfg, rngs=nnx.Rngs(0))
        lora.attach(model, lcfg, rngs=nnx.Rngs(1))
        return model

    model = nnx.eval_shape(build)
    b, t, h, w, s = 2, 3, 8, 8, 16
    n, video = s + t * (h // 2) * (w // 2), t * (h // 2) * (w // 2)
    adapter_fwd = sum(2 * v.size * n for v in jax.tree.leaves(nnx.state(model, lora.LoraParam)))
    fwd = flops.transformer_flops(cfg, s, video)
    attention = 4 * n * n * cfg.width
    want = 2 * (fwd - attention) + 3 * attention + 3 * adapter_fwd
    assert flops.train_flops(cfg, s, video, lcfg) == want

    graphdef, adapters, rest = nnx.split(model, lora.LoraParam, ...)
    args = (
        jax.ShapeDtypeStruct((b, t, h, w, 16), jnp.float32),
        jax.ShapeDtypeStruct((b, s, 64), jnp.float32),
        jax.ShapeDtypeStruct((b,), jnp.int32),
    )

    def loss(a, r, x, text, ts):  # pure dicts in, Variables built inside the trace
        parts = jax.tree.map(lambda v: v, (adapters, rest))
        nnx.replace_by_pure_dict(parts[0], a)
        nnx.replace_by_pure_dict(parts[1], r)
        return jnp.sum(nnx.merge(graphdef, *parts)(x, text, ts) ** 2)

    pure = (nnx.to_pure_dict(adapters), nnx.to_pure_dict(rest))
    cost = jax.jit(jax.grad(loss)).lower(*pure, *args).compile().cost_analysis()
    # XLA prunes the gradients nothing needs, which our count (every frozen matmul passes its
    # input gradient on) keeps: in this one-block model, the block's input and the embedding
    # and modulation matmuls (0.91 measured). Elementwise work adds a few percent on top.
    ratio = cost["flops"] / (b * want)
    assert 0.85 <= ratio < 1.2, ratio
