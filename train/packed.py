"""The training objective on packed batches (multi-resolution frame packing, data/packing.py).

A packed row holds up to G clips ("segments" 1..G, 0 = padding) of different (frames, height,
width): per video token its patch features, segment id and (t, h, w) position in its own clip;
per clip its S text tokens, its token grid, and here its own timestep, text dropout and noise.
The transformer attends block-diagonally by segment (Transformer.packed), so each clip sees what
it would see alone, and the loss is the mean over clips of each clip's mean squared velocity
error: the unpacked objective's per-sample mean, averaged over the clips of the global batch.

Shape letters: B rows, V video tokens, Tt text tokens (G * S), G clips per row, P patch features.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cogvideox_jax import flops

SEGMENT_KEYS = ("video_segment_ids", "video_positions", "text_segment_ids", "grids")


def is_packed(batch) -> bool:
    """Whether `batch` holds packed rows (else equal-shape clips)."""
    return "video_segment_ids" in batch


def _per_token(x: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """Per-segment values x (B, G) -> per-token values (B, N) (padding takes segment 1's)."""
    index = jnp.clip(segment_ids - 1, 0, x.shape[1] - 1)
    return jnp.take_along_axis(x, index, axis=1)


def clip_tokens(batch) -> jax.Array:
    """(B, G) video tokens of each clip slot of the rows (0 where the slot holds no clip)."""
    grids = batch["grids"]
    return jnp.where(jnp.any(grids > 0, axis=-1), grids.prod(-1), 0)


def prepare(batch, key, sc, *, train: bool) -> dict:
    """Packed batch -> loss inputs {z0, text, t (B, G), noise, segments} (t is None when not
    `train`: evaluation sets its fixed timesteps). EUS bands run over the B * G clip slots."""
    from train.dit import eus_timesteps  # the same sampler as the unpacked objective

    k_t, k_noise, k_drop = jax.random.split(key, 3)
    z0 = batch["video"] * sc.scaling_factor  # (B, V, P)
    text = batch["text"]
    b, g = batch["grids"].shape[:2]
    if train:
        keep = jax.random.uniform(k_drop, (b, g)) >= sc.text_dropout  # per clip
        text = jnp.where(_per_token(keep, batch["text_segment_ids"])[..., None], text, 0.0)
        t = eus_timesteps(k_t, b * g, sc.eus_groups, sc.num_timesteps).reshape(b, g)
    else:
        t = None
    return dict(
        z0=z0,
        text=text,
        t=t,
        noise=jax.random.normal(k_noise, z0.shape, z0.dtype),
        segments={k: batch[k] for k in SEGMENT_KEYS},
    )


def loss(model, z0, text, t, noise, segments, ab, ofs=None) -> jax.Array:
    """Mean over the batch's clips of each clip's mean((v_pred - v)^2) over its tokens and
    features, equal to the unpacked loss of the same clips (train.dit.diffusion_loss)."""
    seg = segments["video_segment_ids"]  # (B, V)
    a = ab[_per_token(t, seg)][..., None]  # (B, V, 1) alpha_bar of each token's clip
    x_t = jnp.sqrt(a) * z0 + jnp.sqrt(1.0 - a) * noise
    v = (jnp.sqrt(a) * noise - jnp.sqrt(1.0 - a) * z0).astype(jnp.float32)
    v_pred = model.packed(x_t, text, t, segments, ofs=ofs).astype(jnp.float32)
    per_token = jnp.mean(jnp.square(v_pred - v), axis=-1)  # (B, V)
    g = t.shape[1]
    onehot = (seg[..., None] == jnp.arange(1, g + 1)).astype(jnp.float32)  # (B, V, G)
    sums = jnp.einsum("bv,bvg->bg", per_token, onehot)
    counts = onehot.sum(1)  # (B, G) video tokens per clip
    used = counts > 0
    per_clip = jnp.where(used, sums / jnp.maximum(counts, 1.0), 0.0)
    return per_clip.sum() / jnp.maximum(used.sum(), 1)


def efficiency(batch) -> jax.Array:
    """Real tokens / token budget of the batch: (text + video tokens of clips) / (B * (Tt + V))."""
    real = (batch["video_segment_ids"] > 0).sum() + (batch["text_segment_ids"] > 0).sum()
    budget = batch["video_segment_ids"].size + batch["text_segment_ids"].size
    return real / budget


def step_counts(clip_tokens, tcfg, text_len: int, lora=None) -> tuple[float, float]:
    """(tokens, model FLOPs) of a step's clips from their video token counts (B, G) (on the
    host): each clip counts its own text and video tokens, and cogvideox_jax.flops of its own
    length, since attention is per clip (a pack costs the sum of its clips)."""
    lengths = np.asarray(clip_tokens, np.float64)
    lengths = lengths[lengths > 0]
    tokens = lengths.sum() + lengths.size * text_len
    return float(tokens), float(flops.train_flops(tcfg, text_len, lengths, lora).sum())
