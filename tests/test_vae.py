"""Tests for cogvideox_jax/vae.py and cogvideox_jax/vae_tiling.py.

The parity tests run diffusers' `AutoencoderKLCogVideoX` (torch, CPU) as the reference, on random
weights with every parameter perturbed, loaded through the library's converter. Shapes are kept
tiny (16x24 pixels, widths 8-32) and batch 2 everywhere, so jitted programs are shared
between tests.
"""

import functools
import tempfile

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import PartitionSpec as P

import cogvideox_jax as cj
from cogvideox_jax import sharding, vae_tiling
from cogvideox_jax import vae as vae_lib

HEIGHT, WIDTH = 16, 24
CONFIGS = {
    "tiny": vae_lib.vae_config("tiny"),
    "wide_groups": vae_lib.vae_config(
        "tiny",
        block_out_channels=(8, 8, 16, 24),
        norm_num_groups=4,
        layers_per_block=2,
        latent_channels=4,
        norm_eps=1e-5,
    ),
}


@functools.partial(jax.jit, static_argnames=("graphdef", "frame_batching"))
def _moments(graphdef, state, video, frame_batching=True):
    return nnx.merge(graphdef, state).encode_moments(video, frame_batching=frame_batching)


@functools.partial(jax.jit, static_argnames=("graphdef", "frame_batching"))
def _decode(graphdef, state, z, frame_batching=True):
    return nnx.merge(graphdef, state).decode(z, frame_batching=frame_batching)


def _rel(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def _to_torch(x):

    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(x), -1, 1)))


def _from_torch(t):
    return np.moveaxis(t.detach().numpy(), 1, -1)  # (B, C, T, H, W) -> (B, T, H, W, C)


@functools.cache
def _jax_model(name: str):
    return vae_lib.AutoencoderKL(CONFIGS[name], rngs=nnx.Rngs(0))


@functools.cache
def _models(name: str):
    """(diffusers model, our model) with the same random, fully perturbed weights."""
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    model = diffusers.AutoencoderKLCogVideoX(**cfg.to_diffusers()).eval()
    with torch.no_grad():
        for p in model.parameters():
            # Norm weights start at 1 and biases at 0: move every one of them.
            p.add_(0.2 * torch.randn_like(p) * (p.std() if p.std() > 0 else 1.0))
    with tempfile.TemporaryDirectory() as folder:  # through the library's converter
        model.save_pretrained(folder)
        vae = cj.load_vae(folder)
    return model, vae


def _video(num_frames, seed=0, height=HEIGHT, width=WIDTH):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (2, num_frames, height, width, 3)).astype(np.float32)


def _latents(cfg, num_latents, seed=1, height=HEIGHT // 8, width=WIDTH // 8):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(2, num_latents, height, width, cfg.latent_channels)).astype(np.float32)


@pytest.mark.parametrize(
    "name", ["tiny", *(pytest.param(n, marks=pytest.mark.slow) for n in CONFIGS if n != "tiny")]
)
def test_matches_diffusers(name):

    model, vae = _models(name)
    graphdef, state = nnx.split(vae)
    assert vae_lib.VaeConfig.from_diffusers(dict(model.config)) == CONFIGS[name]
    # 1 frame: one chunk, no scan; 33: a first chunk of 9 frames, then a scan over 3 chunks
    # carrying the causal caches (4 x 8 frames; 9 latents: 3, then 3 x 2). 9 and 17 frames run
    # no other path (9: the first chunk alone; 17: a one-chunk scan).
    for num_frames in (1, 33) if name == "tiny" else (33,):  # 1 frame: the same code at any width
        video = _video(num_frames)
        with torch.no_grad():
            posterior = model.encode(_to_torch(video)).latent_dist
        mean, logvar = vae_lib.diagonal_gaussian(_moments(graphdef, state, video))
        assert _rel(mean, _from_torch(posterior.mean)) <= 1e-4, num_frames
        assert _rel(logvar, _from_torch(posterior.logvar)) <= 1e-4, num_frames

        z = _latents(vae.cfg, mean.shape[1])
        with torch.no_grad():
            ref = _from_torch(model.decode(_to_torch(z)).sample)
        ours = _decode(graphdef, state, z)
        assert ours.shape == video.shape
        assert _rel(ours, ref) <= 1e-4, num_frames


@pytest.mark.slow
@pytest.mark.optimized  # compiled as users run (conftest)
@pytest.mark.slow
def test_any_frame_count_matches_diffusers():
    """Frame counts other than 4k+1, as diffusers takes them: 8 (one even chunk: 2 latents) and
    16 (an even first chunk, then a scan); decoded back from the latents."""
    model, vae = _models("tiny")
    graphdef, state = nnx.split(vae)
    for num_frames, num_latents, decoded in ((8, 2, 8), (16, 4, 16)):
        video = _video(num_frames, height=16, width=24)
        with torch.no_grad():
            posterior = model.encode(_to_torch(video)).latent_dist
            z = posterior.mean
            want = _from_torch(model.decode(z).sample)
        mean, _ = vae_lib.diagonal_gaussian(_moments(graphdef, state, video))
        assert mean.shape[1] == num_latents
        assert _rel(mean, _from_torch(posterior.mean)) <= 1e-4, num_frames
        got = _decode(graphdef, state, _from_torch(z))
        assert got.shape[1] == want.shape[1] == decoded
        assert _rel(got, want) <= 1e-4, num_frames


def test_whole_clip_matches_diffusers_single_pass():

    model, vae = _models("tiny")
    graphdef, state = nnx.split(vae)
    video, z = _video(17), _latents(vae.cfg, 5)
    with torch.no_grad():
        ref_moments = _from_torch(model.encoder(_to_torch(video))[0])
        ref_video = _from_torch(model.decoder(_to_torch(z))[0])
    assert _rel(_moments(graphdef, state, video, frame_batching=False), ref_moments) <= 1e-4
    assert _rel(_decode(graphdef, state, z, frame_batching=False), ref_video) <= 1e-4
    # GroupNorm statistics per chunk vs per clip: the two modes really differ.
    assert _rel(_moments(graphdef, state, video), ref_moments) > 1e-3


@pytest.mark.slow
def test_encode_is_causal():
    vae = _jax_model("tiny")
    graphdef, state = nnx.split(vae)
    video = _video(17)
    base = np.asarray(_moments(graphdef, state, video))
    # Frames 9..16 form the second chunk (latents 3, 4); frame 12 sits inside it.
    for t in (9, 12, 16):
        changed = video.copy()
        changed[:, t] += 0.5
        out = np.asarray(_moments(graphdef, state, changed))
        np.testing.assert_array_equal(out[:, :3], base[:, :3])
        assert np.abs(out[:, 3:] - base[:, 3:]).max() > 1e-3


@pytest.mark.slow
def test_decode_is_causal():
    vae = _jax_model("tiny")
    graphdef, state = nnx.split(vae)
    z = _latents(vae.cfg, 5)
    base = np.asarray(_decode(graphdef, state, z))
    changed = z.copy()
    changed[:, 3] += 0.5  # latents [0, 3) decode to frames [0, 9)
    out = np.asarray(_decode(graphdef, state, changed))
    np.testing.assert_array_equal(out[:, :9], base[:, :9])
    assert np.abs(out[:, 9:] - base[:, 9:]).max() > 1e-3


@pytest.mark.slow
def test_context_parallel_matches_whole_clip():
    assert jax.device_count() == 8
    mesh = jax.make_mesh((8,), ("context",), axis_types=(jax.sharding.AxisType.Auto,))
    vae = _jax_model("tiny")
    graphdef, state = nnx.split(vae)
    # 17 frames: 5 latents padded to 8, one latent per shard (halos span two shards).
    # 33 frames: 9 latents padded to 16.
    for num_frames in (17, 33):
        video = _video(num_frames, seed=num_frames)
        mean, logvar = vae_lib.diagonal_gaussian(
            _moments(graphdef, state, video, frame_batching=False)
        )
        cp_mean, cp_logvar = jax.jit(vae_lib.encode_context_parallel, static_argnums=2)(
            vae, video, mesh
        )
        assert _rel(cp_mean, mean) <= 1e-5 and _rel(cp_logvar, logvar) <= 1e-5, num_frames
    # An odd latent count (frame 0 special) and an even one (no special frame, 4T' frames).
    for num_latents in (5, 4):
        z = _latents(vae.cfg, num_latents, seed=num_latents)
        ref = _decode(graphdef, state, z, frame_batching=False)
        out = jax.jit(vae_lib.decode_context_parallel, static_argnums=2)(vae, z, mesh)
        assert out.shape == ref.shape
        assert _rel(out, ref) <= 1e-5, num_latents


def test_tiled_matches_diffusers_tiled():

    model, vae = _models("tiny")
    # Tiles of 32x48 pixels (4x6 latents): 48x64 needs 2x2 tiles in both directions.
    tiling = dict(tile_height=32, tile_width=48, overlap_height=1 / 4, overlap_width=1 / 3)
    model.enable_tiling(
        tile_sample_min_height=32,
        tile_sample_min_width=48,
        tile_overlap_factor_height=1 / 4,
        tile_overlap_factor_width=1 / 3,
    )
    try:
        video = _video(9, height=48, width=64)
        z = _latents(vae.cfg, 3, height=6, width=8)
        with torch.no_grad():
            posterior = model.encode(_to_torch(video)).latent_dist
            ref_video = _from_torch(model.decode(_to_torch(z)).sample)
    finally:
        model.disable_tiling()
    mean, logvar = jax.jit(lambda x: vae_tiling.encode_tiled(vae, x, **tiling))(video)
    assert _rel(mean, _from_torch(posterior.mean)) <= 1e-4
    assert _rel(logvar, _from_torch(posterior.logvar)) <= 1e-4
    out = jax.jit(lambda z: vae_tiling.decode_tiled(vae, z, **tiling))(z)
    assert out.shape == ref_video.shape == (2, 9, 48, 64, 3)
    assert _rel(out, ref_video) <= 1e-4


def test_shapes_and_frame_counts():
    cfg = CONFIGS["tiny"]
    vae = _jax_model("tiny")
    for num_frames, num_latents in ((1, 1), (5, 2), (13, 4), (49, 13)):
        assert vae_lib.num_latent_frames(num_frames) == num_latents
        video = jax.ShapeDtypeStruct((2, num_frames, HEIGHT, WIDTH, 3), jnp.float32)
        latent_shape = (2, num_latents, HEIGHT // 8, WIDTH // 8, cfg.latent_channels)
        for frame_batching in (True, False):
            mean, logvar = jax.eval_shape(
                functools.partial(vae.encode, frame_batching=frame_batching), video
            )
            assert mean.shape == logvar.shape == latent_shape
            out = jax.eval_shape(functools.partial(vae.decode, frame_batching=frame_batching), mean)
            # An even latent count has no lone first latent: 4T' frames, as in diffusers.
            frames = num_frames if num_latents % 2 else 4 * num_latents
            assert out.shape == (2, frames, HEIGHT, WIDTH, 3)
    with pytest.raises(ValueError, match="num_frames"):
        vae_lib.num_latent_frames(8)  # training clips are 4k+1 frames; the VAE takes any count


@pytest.mark.slow
def test_dtypes_and_logical_axes():
    def make():
        return vae_lib.AutoencoderKL(
            CONFIGS["tiny"], dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0)
        )

    params = nnx.state(nnx.eval_shape(make), nnx.Param)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    specs = sharding.state_specs(params)  # raises unless every axis has a logical name (or None)
    assert jax.tree.structure(specs, is_leaf=lambda s: isinstance(s, P)).num_leaves == len(
        jax.tree.leaves(params)
    )
    # 17 frames: the chunk scan's carried caches must keep their dtypes.
    video = jax.ShapeDtypeStruct((1, 17, HEIGHT, WIDTH, 3), jnp.float32)
    mean, _ = jax.eval_shape(lambda x: make().encode(x), video)
    assert mean.dtype == jnp.bfloat16
    assert jax.eval_shape(lambda z: make().decode(z), mean).dtype == jnp.bfloat16


def test_diagonal_gaussian_split_and_clamp():
    mean = jnp.arange(8.0).reshape(1, 1, 1, 2, 4)
    logvar = jnp.array([-50.0, -1.0, 3.0, 40.0] * 2).reshape(1, 1, 1, 2, 4)
    m, lv = vae_lib.diagonal_gaussian(jnp.concatenate([mean, logvar], axis=-1))
    np.testing.assert_array_equal(m, mean)
    np.testing.assert_array_equal(lv, jnp.clip(logvar, -30.0, 20.0))
    sample = vae_lib.sample_latents(jax.random.key(0), m, jnp.full_like(m, -60.0))
    np.testing.assert_allclose(sample, m, atol=1e-6)


def test_config_round_trip_and_validation():
    cfg = vae_lib.vae_config("cogvideox", scaling_factor=0.7, invert_scale_latents=True)
    hub = {"_class_name": "AutoencoderKLCogVideoX", "_diffusers_version": "0.30.0"}
    assert vae_lib.VaeConfig.from_diffusers({**hub, **cfg.to_diffusers()}) == cfg
    assert vae_lib.VaeConfig.from_diffusers({}) == vae_lib.vae_config("cogvideox")
    with pytest.raises(ValueError, match="use_quant_conv"):
        vae_lib.VaeConfig.from_diffusers({"use_quant_conv": True})
    with pytest.raises(ValueError, match="down_block_types"):
        vae_lib.VaeConfig.from_diffusers({"down_block_types": ["DownEncoderBlock2D"] * 4})
    with pytest.raises(ValueError, match="frobnicate"):
        vae_lib.VaeConfig.from_diffusers({"frobnicate": 1})
    with pytest.raises(ValueError, match="norm_num_groups"):
        vae_lib.vae_config("tiny", norm_num_groups=3)
