"""Positional encodings of the CogVideoX transformer: timestep sinusoid, 3D sin-cos, 3D RoPE.

Must match diffusers 0.42.1 `models/embeddings.py` (`get_timestep_embedding`,
`get_3d_sincos_pos_embed`, `get_3d_rotary_pos_embed`, `apply_rotary_emb`) and the grids the
CogVideoX pipelines build (`get_resize_crop_region_for_grid`,
`_prepare_rotary_positional_embeddings`).
Tables that depend only on shapes are built in numpy at trace time (they are constants of the
compiled program); only the timestep sinusoid and the rotation itself run in JAX.

Shapes: T latent (or temporal-patch) frames, H/W patch-grid height/width, K head dim, D width.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


def timestep_sinusoid(t: jax.Array, dim: int) -> jax.Array:
    """(B,) timesteps -> (B, dim) float32 [cos | sin] (flip_sin_to_cos=True, freq shift 0)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, dim) [sin | cos], frequencies in float64 as diffusers computes them."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.outer(pos.astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_3d(
    dim: int, t: int, h: int, w: int, spatial_scale: float, temporal_scale: float
) -> np.ndarray:
    """(t*h*w, dim) float64 table, rows in (t, h, w) order: [temporal D/4 | w-half | h-half]."""
    dim_s, dim_t = 3 * dim // 4, dim // 4
    # Positions are float32 divisions (as torch), promoted to float64 by the frequency product.
    gw = np.arange(w, dtype=np.float32) / np.float32(spatial_scale)
    gh = np.arange(h, dtype=np.float32) / np.float32(spatial_scale)
    gt = np.arange(t, dtype=np.float32) / np.float32(temporal_scale)
    ww, hh = np.meshgrid(gw, gh, indexing="xy")  # (h, w) each
    # The first half encodes the column (w) index: the MAE convention diffusers follows.
    spatial = np.concatenate(
        [_sincos_1d(dim_s // 2, ww.reshape(-1)), _sincos_1d(dim_s // 2, hh.reshape(-1))], axis=1
    )  # (h*w, dim_s)
    temporal = _sincos_1d(dim_t, gt)  # (t, dim_t)
    table = np.concatenate(
        [
            np.broadcast_to(temporal[:, None, :], (t, h * w, dim_t)),
            np.broadcast_to(spatial[None, :, :], (t, h * w, dim_s)),
        ],
        axis=-1,
    )  # (t, h*w, dim)
    return table.reshape(t * h * w, dim)


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps, dtype=float32) as torch's scalar kernel computes it.

    torch fills the first half forwards from `start` and the second half backwards from `end`
    with a float32 step. Its vectorised CPU kernel (fused multiply-adds over SIMD lanes) can
    differ from this in the last bit or two, depending on the machine's vector width.
    """
    start32, end32 = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([start32], np.float32)
    step = (end32 - start32) / np.float32(steps - 1)
    idx = np.arange(steps)
    halfway = steps // 2
    fwd = start32 + step * idx.astype(np.float32)
    bwd = end32 - step * (steps - idx - 1).astype(np.float32)
    return np.where(idx < halfway, fwd, bwd).astype(np.float32)


def crop_region(grid_h: int, grid_w: int, base_w: int, base_h: int):
    """Centre crop of the base grid with the input's aspect ratio (Python banker's rounding)."""
    if grid_h / grid_w > base_h / base_w:
        rh, rw = base_h, int(round(base_h / grid_h * grid_w))
    else:
        rw, rh = base_w, int(round(base_w / grid_w * grid_h))
    top, left = int(round((base_h - rh) / 2.0)), int(round((base_w - rw) / 2.0))
    return (top, left), (top + rh, left + rw)


def rope_grid_linspace(t: int, h: int, w: int, base_h: int, base_w: int):
    """CogVideoX 1.0 positions: the crop region of the (base_h, base_w) grid, sampled h x w."""
    (top, left), (bottom, right) = crop_region(h, w, base_w, base_h)
    gh = torch_linspace_f32(top, bottom * (h - 1) / h, h)
    gw = torch_linspace_f32(left, right * (w - 1) / w, w)
    gt = torch_linspace_f32(0, t * (t - 1) / t, t)
    return gt, gh, gw


def rope_grid_arange(t: int, h: int, w: int, max_h: int, max_w: int):
    """CogVideoX 1.5 positions: plain aranges sliced from a (max_h, max_w) table."""
    if h > max_h or w > max_w:
        raise ValueError(
            f"patch grid {h}x{w} exceeds the RoPE table {max_h}x{max_w} "
            "(sample_height/patch_size x sample_width/patch_size)"
        )
    return tuple(np.arange(n, dtype=np.float32) for n in (t, h, w))


def _rope_1d(dim: int, pos: np.ndarray, theta: float = 10000.0):
    freqs = np.float32(1.0) / (
        np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    )
    angles = np.outer(pos.astype(np.float32), freqs).astype(np.float32)  # (M, dim/2)
    # Pairs (2k, 2k+1) share a frequency: repeat-interleave.
    return np.repeat(np.cos(angles), 2, axis=1), np.repeat(np.sin(angles), 2, axis=1)


def rope_3d(head_dim: int, gt: np.ndarray, gh: np.ndarray, gw: np.ndarray):
    """cos, sin tables (t*h*w, K) float32; axis split K/4 (t), 3K/8 (h), 3K/8 (w)."""
    dim_t, dim_hw = head_dim // 4, head_dim // 8 * 3
    parts = [_rope_1d(d, g) for d, g in ((dim_t, gt), (dim_hw, gh), (dim_hw, gw))]
    t, h, w = len(gt), len(gh), len(gw)

    def combine(i):
        ct, ch, cw = (p[i] for p in parts)
        full = np.concatenate(
            [
                np.broadcast_to(ct[:, None, None], (t, h, w, ct.shape[-1])),
                np.broadcast_to(ch[None, :, None], (t, h, w, ch.shape[-1])),
                np.broadcast_to(cw[None, None, :], (t, h, w, cw.shape[-1])),
            ],
            axis=-1,
        )  # (t, h, w, K)
        return full.reshape(t * h * w, head_dim)

    return combine(0), combine(1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate interleaved pairs of x (B, L, N, K) by (L, K) tables, or per row (B, L, K) ones
    (packed rows); math in float32."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    cos, sin = cos[..., None, :], sin[..., None, :]  # (L, 1, K) or (B, L, 1, K)
    out = x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin
    return out.astype(x.dtype)


# ---- Per-token versions for packed rows (several clips, each with its own grid) ----
# The same formulas as above, evaluated in JAX from integer token positions (t, h, w) and the
# token's clip grid (T, H, W), since a packed batch's grids are data rather than shapes.


# Python's float64 `round(base_h / grid_h * grid_w)` rounds twice, so a few grids whose exact
# quotient is a tie (k + 1/2) round the other way: found once per base grid up to this size.
_CROP_EXACT_UP_TO = 1024


@functools.cache
def _crop_exceptions(base_w: int, base_h: int) -> np.ndarray:
    """(E, 6) int32 rows (h, w, top, left, bottom, right) where `crop_region` (Python floats)
    differs from the exact-quotient rounding of `crop_region_tokens`, for h, w up to 1024."""
    h, w = np.meshgrid(*(np.arange(1, _CROP_EXACT_UP_TO + 1),) * 2, indexing="ij")
    tall = h / w > base_h / base_w
    rh = np.where(tall, base_h, np.round(base_w / w * h)).astype(np.int64)  # as crop_region
    rw = np.where(tall, np.round(base_h / h * w), base_w).astype(np.int64)
    top, left = np.round((base_h - rh) / 2.0), np.round((base_w - rw) / 2.0)
    want = np.stack([top, left, top + rh, left + rw], -1).astype(np.int64)
    got = np.stack(_crop_exact(np, h, w, base_w, base_h), -1)
    bad = np.any(want != got, axis=-1)
    return np.concatenate([h[bad][:, None], w[bad][:, None], want[bad]], -1).astype(np.int32)


def _crop_exact(xp, h, w, base_w, base_h):
    """crop_region on integer arrays with the exact quotient rounded (ties to even)."""

    def round_div(a, b):  # round(a / b), a >= 0 and b > 0 integers
        q, r = a // b, a % b
        return q + ((2 * r > b) | ((2 * r == b) & (q % 2 == 1))).astype(q.dtype)

    tall = h * base_w > base_h * w  # grid_h / grid_w > base_h / base_w
    rh = xp.where(tall, base_h, round_div(base_w * h, w))
    rw = xp.where(tall, round_div(base_h * w, h), base_w)
    top, left = round_div(base_h - rh, 2), round_div(base_w - rw, 2)
    return top, left, top + rh, left + rw


def crop_region_tokens(grid_h: jax.Array, grid_w: jax.Array, base_w: int, base_h: int):
    """`crop_region` elementwise on int arrays -> (top, left, bottom, right) int32 arrays; exactly
    Python's rounding for grids up to 1024 x 1024 (beyond, the exact quotient's rounding)."""
    h, w = jnp.maximum(grid_h, 1).astype(jnp.int32), jnp.maximum(grid_w, 1).astype(jnp.int32)
    region = jnp.stack(_crop_exact(jnp, h, w, base_w, base_h), -1)  # (..., 4)
    exc = _crop_exceptions(base_w, base_h)
    if len(exc):
        hit = (h[..., None] == exc[:, 0]) & (w[..., None] == exc[:, 1])  # (..., E)
        fix = jnp.einsum("...e,ef->...f", hit.astype(jnp.int32), exc[:, 2:])
        region = jnp.where(hit.any(-1)[..., None], fix, region)
    return tuple(jnp.unstack(region, axis=-1))


def linspace_at(start: jax.Array, end: jax.Array, steps: jax.Array, i: jax.Array) -> jax.Array:
    """torch_linspace_f32(start, end, steps)[i] elementwise (float32 start/end, int steps, i)."""
    start, end = start.astype(jnp.float32), end.astype(jnp.float32)
    step = (end - start) / jnp.maximum(steps - 1, 1).astype(jnp.float32)
    fwd = start + step * i.astype(jnp.float32)
    bwd = end - step * (steps - i - 1).astype(jnp.float32)
    return jnp.where(steps == 1, start, jnp.where(i < steps // 2, fwd, bwd))


def rope_positions_linspace(pos: jax.Array, grid: jax.Array, region: jax.Array):
    """`rope_grid_linspace` per token: pos, grid (..., 3) int (t, h, w) and the clip's crop
    region (..., 4) int (top, left, bottom, right) -> gt, gh, gw float32 (...,)."""
    (pt, ph, pw), (t, h, w) = jnp.unstack(pos, axis=-1), jnp.unstack(grid, axis=-1)
    top, left, bottom, right = jnp.unstack(region, axis=-1)

    def end(stop, n):  # stop * (n - 1) / n: one float32 rounding (numpy: float64, then float32)
        return (stop * (n - 1)).astype(jnp.float32) / jnp.maximum(n, 1).astype(jnp.float32)

    gt = linspace_at(jnp.zeros_like(t), end(t, t), t, pt)
    gh = linspace_at(top, end(bottom, h), h, ph)
    gw = linspace_at(left, end(right, w), w, pw)
    return gt, gh, gw


def _rope_1d_tokens(dim: int, pos: jax.Array, theta: float = 10000.0):
    freqs = np.float32(1.0) / (
        np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    )
    angles = pos.astype(jnp.float32)[..., None] * freqs  # (..., dim/2), float32 as _rope_1d
    return jnp.repeat(jnp.cos(angles), 2, axis=-1), jnp.repeat(jnp.sin(angles), 2, axis=-1)


def rope_3d_tokens(head_dim: int, gt: jax.Array, gh: jax.Array, gw: jax.Array):
    """`rope_3d` for per-token coordinates (...,) -> cos, sin (..., K) float32."""
    dim_t, dim_hw = head_dim // 4, head_dim // 8 * 3
    parts = [_rope_1d_tokens(d, g) for d, g in ((dim_t, gt), (dim_hw, gh), (dim_hw, gw))]
    return tuple(jnp.concatenate([p[i] for p in parts], axis=-1) for i in (0, 1))


# Positions along one axis that `sincos_3d_tokens` looks up in numpy-built rows (bit-identical
# to `sincos_3d`); beyond, it computes them in float32 (a few 1e-6 off: XLA divides by the
# broadcast scale through a reciprocal, and the angle is a float32 product).
_SINCOS_ROWS = 512


@functools.cache
def _sincos_rows(dim: int, scale: float) -> np.ndarray:
    """(_SINCOS_ROWS, dim) float32: `_sincos_1d(dim, i / scale)` for i = 0, 1, ..."""
    pos = np.arange(_SINCOS_ROWS, dtype=np.float32) / np.float32(scale)
    return _sincos_1d(dim, pos).astype(np.float32)


def _sincos_1d_tokens(dim: int, idx: jax.Array, scale: float) -> jax.Array:
    """`_sincos_1d(dim, idx / scale)` for integer positions idx (...,) -> (..., dim) float32."""
    looked_up = jnp.asarray(_sincos_rows(dim, scale))[jnp.clip(idx, 0, _SINCOS_ROWS - 1)]
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = (idx.astype(jnp.float32) / np.float32(scale))[..., None] * omega.astype(np.float32)
    computed = jnp.concatenate([jnp.sin(out), jnp.cos(out)], axis=-1)
    return jnp.where((idx < _SINCOS_ROWS)[..., None], looked_up, computed)


def sincos_3d_tokens(
    dim: int, pos: jax.Array, spatial_scale: float, temporal_scale: float
) -> jax.Array:
    """`sincos_3d` rows for token positions pos (..., 3) int (t, h, w) -> (..., dim) float32
    (a row depends on the position only, not on the grid size)."""
    dim_s, dim_t = 3 * dim // 4, dim // 4
    t, h, w = jnp.unstack(jnp.asarray(pos, jnp.int32), axis=-1)
    return jnp.concatenate(
        [
            _sincos_1d_tokens(dim_t, t, temporal_scale),
            _sincos_1d_tokens(dim_s // 2, w, spatial_scale),
            _sincos_1d_tokens(dim_s // 2, h, spatial_scale),
        ],
        axis=-1,
    )
