"""Training on packed rows: the packed loss is the mean of the per-clip losses of the unpacked
objective (same model, clips, timesteps and noise), and gradients agree too."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import cogvideox_jax as cj
from cogvideox_jax import diffusion, transformer
from data import packing
from train import objective

FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

TINY = dict(
    num_layers=2,
    num_heads=2,
    head_dim=16,
    text_embed_dim=12,
    time_embed_dim=16,
    max_text_len=6,
    sample_height=8,
    sample_width=12,
    sample_frames=9,
)


def _f64(x):
    return np.asarray(x, np.float64)


def _perturbed(variant):
    cfg = cj.transformer_config(variant, **TINY)
    model = cj.Transformer(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):  # zero-initialised projections and unit norms included
            noise = 0.1 * rng.standard_normal(var.shape).astype(np.float32)
            var[...] = jnp.asarray(np.asarray(var[...]) + noise)  # (numpy: no compile per shape)
    return cfg, model


def _pack(cfg, clips, texts, budget, max_clips):
    """One packed row (batch of 1) from latents (T, h, w, C) and texts (S, Dt), by hand."""
    p, pt = cfg.patch_size, cfg.patch_size_t or 1
    s = texts[0].shape[0]
    video = np.zeros((1, budget, cfg.patch_features), np.float32)
    vseg = np.zeros((1, budget), np.int32)
    vpos = np.zeros((1, budget, 3), np.int32)
    text = np.zeros((1, max_clips * s, texts[0].shape[1]), np.float32)
    tseg = np.zeros((1, max_clips * s), np.int32)
    grids = np.zeros((1, max_clips, 3), np.int32)
    at = 0
    for i, (z, e) in enumerate(zip(clips, texts, strict=True)):
        z = packing.pad_front_frames(z, pt)  # an image (T = 1) on 1.5: its frame twice
        tok = transformer.patchify(z, p, pt)
        grid = (z.shape[0] // pt, z.shape[1] // p, z.shape[2] // p)
        n = tok.shape[0]
        video[0, at : at + n] = tok
        vseg[0, at : at + n] = i + 1
        vpos[0, at : at + n] = np.stack(
            np.meshgrid(*map(np.arange, grid), indexing="ij"), -1
        ).reshape(-1, 3)
        text[0, i * s : (i + 1) * s] = e
        tseg[0, i * s : (i + 1) * s] = i + 1
        grids[0, i] = grid
        at += n
    return dict(
        video=video,
        video_segment_ids=vseg,
        video_positions=vpos,
        text=text,
        text_segment_ids=tseg,
        grids=grids,
    )


@pytest.mark.parametrize("variant", [pytest.param("5b", marks=pytest.mark.slow), "1.5-5b"])
def test_packed_loss_is_the_mean_of_per_clip_losses(variant):
    """A row of three clips and an image (one latent frame; on 1.5 front-padded to two, as the
    bucketed objective pads it) against each one's unpacked loss."""
    cfg, model = _perturbed(variant)
    pt = cfg.patch_size_t or 1
    rng = np.random.default_rng(2)
    shapes = [(2 * pt, 4, 6), (1 * pt, 6, 4), (2 * pt, 2, 2), (1, 4, 4)]
    clips = [rng.standard_normal((*sh, cfg.in_channels)).astype(np.float32) for sh in shapes]
    texts = [rng.standard_normal((6, cfg.text_embed_dim)).astype(np.float32) for _ in shapes]
    batch = _pack(cfg, clips, texts, budget=40, max_clips=4)
    t = np.array([[50, 400, 930, 700]], np.int32)
    # The unpacked losses see what the bucketed objective sees: latents padded to pt frames.
    clips = [packing.pad_front_frames(z, pt) for z in clips]
    shapes = [z.shape[:3] for z in clips]
    ab = jnp.asarray(diffusion.alphas_cumprod(diffusion.ScheduleConfig()), jnp.float32)
    noise = rng.standard_normal(batch["video"].shape).astype(np.float32)
    inputs = dict(
        z0=jnp.asarray(batch["video"]),
        text=jnp.asarray(batch["text"]),
        t=jnp.asarray(t),
        noise=jnp.asarray(noise),
        segments={k: jnp.asarray(batch[k]) for k in objective.SEGMENT_KEYS},
    )
    recipe = objective.Recipe(scaling_factor=1.0, eus_groups=1, text_dropout=0.0, ofs=None)
    packed = objective.Packed(recipe, cfg, text_len=6)

    def packed_loss(m):
        return packed.loss(m, inputs, ab)

    def per_clip_loss(m):
        losses, at = [], 0
        for i, z in enumerate(clips):
            n = int(np.prod(shapes[i])) // (pt * cfg.patch_size**2)
            tok_noise = noise[0, at : at + n]
            at += n
            z_noise = transformer.unpatchify(
                tok_noise[None], shapes[i][0], *shapes[i][1:], cfg.patch_size, pt, cfg.in_channels
            )
            losses.append(
                objective.diffusion_loss(
                    m,
                    jnp.asarray(z[None]),
                    jnp.asarray(texts[i][None]),
                    jnp.asarray(t[0, i : i + 1]),
                    z_noise,
                    ab,
                )
            )
        return jnp.mean(jnp.stack(losses))

    graphdef, params = nnx.split(model)

    def grads(fn):
        # One jitted program per objective, compiled without LLVM's costlier passes (compiling
        # is where this test spends its time; the float32 operations stay the same).
        f = jax.jit(jax.value_and_grad(lambda p: fn(nnx.merge(graphdef, p))))
        return f.lower(params).compile(compiler_options=FAST)(params)

    (lp, gp), (lc, gc) = grads(packed_loss), grads(per_clip_loss)
    np.testing.assert_allclose(float(lp), float(lc), rtol=1e-5)
    flat_p, flat_c = jax.tree.leaves(gp), jax.tree.leaves(gc)
    worst = max(
        float(np.linalg.norm(a - b) / (np.linalg.norm(b) + 1e-12))
        for a, b in zip(map(_f64, flat_p), map(_f64, flat_c), strict=True)
    )
    assert worst < 1e-4, worst
    # A clip's loss weighs as one clip whatever its size: the mean is not token-weighted.
    assert abs(float(lp) - float(lc)) < 1e-5 * abs(float(lc)) + 1e-7


def test_packing_efficiency_and_flops_count_only_clips():
    cfg = cj.transformer_config("5b", **TINY)
    rng = np.random.default_rng(0)
    clips = [rng.standard_normal((2, 4, 6, 16)).astype(np.float32)]
    texts = [rng.standard_normal((6, 12)).astype(np.float32)]
    batch = _pack(cfg, clips, texts, budget=20, max_clips=2)
    assert np.isclose(float(objective.efficiency(batch)), (12 + 6) / (20 + 12))
    from cogvideox_jax import flops

    want = flops.train_flops(cfg, 6, 12)
    recipe = objective.Recipe(scaling_factor=1.0, eus_groups=1, text_dropout=0.1, ofs=None)
    outputs = objective.Packed(recipe, cfg, text_len=6).step_outputs(batch)
    tokens, step_flops = objective.Packed(recipe, cfg, text_len=6).counts(outputs)
    assert tokens == 12 + 6 and np.isclose(step_flops, want, rtol=1e-12)
