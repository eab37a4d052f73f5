"""Spatially tiled VAE encode/decode, as diffusers' `AutoencoderKLCogVideoX.enable_tiling()`.

Must match `tiled_encode` / `tiled_decode` in diffusers
`models/autoencoders/autoencoder_kl_cogvideox.py` @ 58eb52c0. Tiles overlap; each is run through
the VAE on its own (own GroupNorm statistics, so the result differs from an untiled run), blended
linearly into the tile above and the tile to its left, cropped, and stitched. Inputs that fit in
one tile are not tiled, as in diffusers.

Tile sizes are in pixels for both directions (latent tiles are pixel tiles / 8); by default half
of the config's sample size (240 x 360 for CogVideoX), with overlap factors 1/6 (height) and 1/5
(width). Shape letters as in `vae.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cogvideox_jax.vae import AutoencoderKL, diagonal_gaussian

OVERLAP_HEIGHT = 1 / 6
OVERLAP_WIDTH = 1 / 5


def encode_tiled(
    vae: AutoencoderKL,
    video: jax.Array,
    *,
    tile_height: int | None = None,
    tile_width: int | None = None,
    overlap_height: float = OVERLAP_HEIGHT,
    overlap_width: float = OVERLAP_WIDTH,
    frame_batching: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Tiled `vae.encode`: posterior (mean, logvar) of video (B, T, H, W, 3)."""
    tile_h, tile_w, latent_h, latent_w = _tile_sizes(vae, tile_height, tile_width)
    H, W = video.shape[2:4]
    if H <= tile_h and W <= tile_w:
        return vae.encode(video, frame_batching=frame_batching)
    tiles = [
        [
            vae.encode_moments(
                video[:, :, i : i + tile_h, j : j + tile_w], frame_batching=frame_batching
            )
            for j in range(0, W, int(tile_w * (1 - overlap_width)))
        ]
        for i in range(0, H, int(tile_h * (1 - overlap_height)))
    ]
    blend = (int(latent_h * overlap_height), int(latent_w * overlap_width))
    # The logvar clamp comes after blending, as in diffusers.
    return diagonal_gaussian(_stitch(tiles, blend, (latent_h - blend[0], latent_w - blend[1])))


def decode_tiled(
    vae: AutoencoderKL,
    z: jax.Array,
    *,
    tile_height: int | None = None,
    tile_width: int | None = None,
    overlap_height: float = OVERLAP_HEIGHT,
    overlap_width: float = OVERLAP_WIDTH,
    frame_batching: bool = True,
) -> jax.Array:
    """Tiled `vae.decode`: unscaled latents (B, T', h, w, 16) -> video (B, T, 8h, 8w, 3)."""
    tile_h, tile_w, latent_h, latent_w = _tile_sizes(vae, tile_height, tile_width)
    h, w = z.shape[2:4]
    if h <= latent_h and w <= latent_w:
        return vae.decode(z, frame_batching=frame_batching)
    tiles = [
        [
            vae.decode(z[:, :, i : i + latent_h, j : j + latent_w], frame_batching=frame_batching)
            for j in range(0, w, int(latent_w * (1 - overlap_width)))
        ]
        for i in range(0, h, int(latent_h * (1 - overlap_height)))
    ]
    blend = (int(tile_h * overlap_height), int(tile_w * overlap_width))
    return _stitch(tiles, blend, (tile_h - blend[0], tile_w - blend[1]))


def _tile_sizes(vae, tile_height, tile_width):
    cfg = vae.cfg
    tile_h = tile_height or cfg.sample_height // 2
    tile_w = tile_width or cfg.sample_width // 2
    # int(a / b), as diffusers writes it (the same as a // b for the positive sizes used here).
    factor = cfg.spatial_compression
    return tile_h, tile_w, int(tile_h / factor), int(tile_w / factor)


def _stitch(tiles, blend, keep):
    """Blend each tile into its (already blended) upper and left neighbours, crop to `keep`,
    concatenate. Raster order matters: diffusers blends in place, so later tiles see blended
    neighbours."""
    rows = []
    for i, row in enumerate(tiles):
        for j, tile in enumerate(row):
            if i > 0:
                tile = _blend(tiles[i - 1][j], tile, blend[0], axis=2)
            if j > 0:
                tile = _blend(row[j - 1], tile, blend[1], axis=3)
            row[j] = tile
        rows.append(jnp.concatenate([t[:, :, : keep[0], : keep[1]] for t in row], axis=3))
    return jnp.concatenate(rows, axis=2)  # (B, T, H, W, C)


def _blend(a: jax.Array, b: jax.Array, extent: int, axis: int) -> jax.Array:
    """Ramp linearly from the end of `a` into the start of `b` over `extent` rows or columns."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    if extent == 0:
        return b
    shape = [1] * b.ndim
    shape[axis] = extent
    w = (np.arange(extent) / extent).reshape(shape)  # float64, like diffusers' Python scalars
    a_tail = jax.lax.slice_in_dim(a, a.shape[axis] - extent, None, axis=axis)
    b_head, b_rest = jnp.split(b, [extent], axis=axis)
    mixed = a_tail * (1 - w).astype(b.dtype) + b_head * w.astype(b.dtype)
    return jnp.concatenate([mixed, b_rest], axis=axis)
