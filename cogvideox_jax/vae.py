"""CogVideoX's 3D causal VAE (`AutoencoderKLCogVideoX`) in Flax NNX, channels-last.

Must match diffusers `models/autoencoders/autoencoder_kl_cogvideox.py` @ 58eb52c0 (0.42.1), with
`CogVideoXDownsample3D` / `CogVideoXUpsample3D` from `downsampling.py` / `upsampling.py`. Paper:
CogVideoX (arXiv:2408.06072), section 2.1. Spec: cogvideox_numerics.md section 3.

Shape letters: B batch, T frames (video frames or latent frames, as the name says), H/W height and
width at the current resolution, C channels, G norm groups.

One set of weights runs the time axis three ways:
- frame batching (default): diffusers' chunking exactly. Chunks of 8 frames (2 latents when
  decoding), the first one also holding the remainder; causal-conv caches carried from chunk to
  chunk through `lax.scan`; GroupNorm statistics per chunk. Causal at chunk granularity.
- whole clip (`frame_batching=False`): one pass, GroupNorm statistics over the whole clip (so not
  causal: every output depends on every frame through the statistics).
- context parallel (`encode_context_parallel` / `decode_context_parallel`): the whole-clip result,
  with frames split over the `context` mesh axis.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from cogvideox_jax import compiler, sharding

# diffusers' `num_sample_frames_batch_size` and `num_latent_frames_batch_size`: the VAE was trained
# with these chunk lengths, so they are part of the model rather than a tuning knob.
ENCODE_CHUNK_FRAMES = 8
DECODE_CHUNK_LATENTS = 2
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
# diffusers hard-codes eps=1e-6 for the encoder's norm_out and every decoder norm; `norm_eps`
# reaches only the encoder's resnets.
FIXED_NORM_EPS = 1e-6

VARIANTS = {
    # Source: diffusers AutoencoderKLCogVideoX defaults, shared by every published CogVideoX VAE.
    "cogvideox": dict(
        block_out_channels=(128, 256, 256, 512),
        latent_channels=16,
        layers_per_block=3,
        norm_num_groups=32,
        norm_eps=1e-6,
        temporal_compression_ratio=4,
    ),
    # Tests only: same topology, tiny widths.
    "tiny": dict(
        block_out_channels=(8, 16, 16, 32),
        latent_channels=16,
        layers_per_block=1,
        norm_num_groups=2,
        norm_eps=1e-6,
        temporal_compression_ratio=4,
    ),
}


@dataclasses.dataclass(frozen=True)
class VaeConfig:
    """A CogVideoX VAE's architecture and latent scaling, in diffusers' `AutoencoderKLCogVideoX`
    config field names (`from_diffusers` / `to_diffusers`; the released ones in VARIANTS)."""

    block_out_channels: tuple[int, ...]
    latent_channels: int
    layers_per_block: int
    norm_num_groups: int
    norm_eps: float
    temporal_compression_ratio: int
    in_channels: int = 3
    out_channels: int = 3
    # Only used for diffusers' default tile size (half of these).
    sample_height: int = 480
    sample_width: int = 720
    # For callers; encode/decode work on unscaled latents. Pipelines feed the transformer
    # `z * scaling_factor`; image-to-video pipelines divide the image latents instead when
    # `invert_scale_latents` (CogVideoX1.5-I2V).
    scaling_factor: float = 1.15258426
    invert_scale_latents: bool = False

    @property
    def image_latent_scale(self) -> float:
        """The factor on an image-to-video model's first-frame latent (training and sampling)."""
        return image_latent_scale(self.scaling_factor, self.invert_scale_latents)

    def __post_init__(self):
        # Hub configs store lists and may store the ratio as a float (diffusers types it so).
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        ratio = self.temporal_compression_ratio
        if float(ratio).is_integer():
            object.__setattr__(self, "temporal_compression_ratio", int(ratio))
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(
                    f"block_out_channels ({self.block_out_channels}) must be multiples of "
                    f"norm_num_groups ({self.norm_num_groups})"
                )
        levels = math.log2(self.temporal_compression_ratio)
        if levels != int(levels) or not 0 <= levels < len(self.block_out_channels):
            raise ValueError(
                f"temporal_compression_ratio ({self.temporal_compression_ratio}) must be a power "
                f"of two below 2**{len(self.block_out_channels)}"
            )

    @property
    def spatial_compression(self) -> int:
        """Pixels per latent along height and width."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> VaeConfig:
        """A config from a diffusers `config.json` dict; refuses what this port does not build."""
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        merged = {**_DIFFUSERS_DEFAULTS, **config}
        n = len(merged["block_out_channels"])
        required = {
            "down_block_types": ["CogVideoXDownBlock3D"] * n,
            "up_block_types": ["CogVideoXUpBlock3D"] * n,
            "shift_factor": None,
            "latents_mean": None,
            "latents_std": None,
            "use_quant_conv": False,
            "use_post_quant_conv": False,
        }
        for key in config:
            if key not in _DIFFUSERS_DEFAULTS:
                raise ValueError(f"unsupported diffusers VAE config key {key!r}")
        for key, want in required.items():
            got = merged[key]
            if (list(got) if isinstance(got, (list, tuple)) else got) != want:
                raise ValueError(f"unsupported value {got!r} for {key!r}; this port needs {want!r}")
        if merged["act_fn"] not in ("silu", "swish"):
            raise ValueError(f"unsupported value {merged['act_fn']!r} for 'act_fn'; needs 'silu'")
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in merged.items() if k in fields})

    def to_diffusers(self) -> dict[str, Any]:
        """The equivalent diffusers `AutoencoderKLCogVideoX` config dict."""
        n = len(self.block_out_channels)
        out = dataclasses.asdict(self)
        out["block_out_channels"] = list(self.block_out_channels)
        out.update(
            down_block_types=["CogVideoXDownBlock3D"] * n,
            up_block_types=["CogVideoXUpBlock3D"] * n,
            act_fn="silu",
            shift_factor=None,
            latents_mean=None,
            latents_std=None,
            force_upcast=True,  # a pipeline hint only; kept for a faithful round trip
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        return out


def vae_config(variant: str, **overrides) -> VaeConfig:
    """The VaeConfig of a key of VARIANTS, fields replaced by `overrides`."""
    return VaeConfig(**{**VARIANTS[variant], **overrides})


_DIFFUSERS_DEFAULTS = vae_config("cogvideox").to_diffusers()


def image_latent_scale(scaling_factor: float, invert_scale_latents: bool) -> float:
    """An image-to-video condition latent is multiplied by `scaling_factor`, or divided by it
    where the VAE config says `invert_scale_latents` (CogVideoX1.5-I2V)."""
    return 1.0 / scaling_factor if invert_scale_latents else scaling_factor


def num_latent_frames(num_frames: int, temporal_compression_ratio: int = 4) -> int:
    """Latent frames for a clip of `num_frames` (4k+1 frames -> k+1 latents; 1 for an image)."""
    if num_frames < 1 or (num_frames - 1) % temporal_compression_ratio:
        raise ValueError(
            f"num_frames ({num_frames}) must be 1 + a multiple of {temporal_compression_ratio}"
        )
    return (num_frames - 1) // temporal_compression_ratio + 1


@dataclasses.dataclass(frozen=True)
class FrameShards:
    """How a clip's frames lie on the shards of mesh axis `axis` (context parallelism).

    Every shard holds the same number of frames. Global frames [first, end) are the clip; the
    `first` frames before it are copies of the clip's frame 0 and frames from `end` on are
    padding. The front copies make temporal resampling uniform across shards (a pair of copies
    averages to frame 0, an upsampled frame 0 is one more copy), so no shard treats its first frame
    specially; copies and padding are left out of GroupNorm statistics, and causality keeps the
    padding from reaching the clip.
    """

    axis: str
    first: int
    end: int

    def pooled(self) -> FrameShards:
        """The layout after temporal downsampling by 2 (frame pairs averaged)."""
        # Whole clip: an odd count keeps frame 0 alone and pairs the rest, an even count pairs all
        # frames. Uniform pairs agree when the clip starts on a pair's second frame (odd count) or
        # on a pair boundary (even count), i.e. when `end` is even.
        if self.end % 2:
            raise ValueError(f"{self} does not pool into whole-clip frame pairs")
        count = self.end - self.first
        return FrameShards(self.axis, (self.first - count % 2) // 2, self.end // 2)

    def doubled(self) -> FrameShards:
        """The layout after temporal upsampling by 2."""
        # Whole clip: an odd count upsamples frame 0 to one frame, so one more copy appears.
        return FrameShards(self.axis, 2 * self.first + (self.end - self.first) % 2, 2 * self.end)

    def frame_mask(self, local_frames: int) -> jax.Array:
        """(local_frames,) bool: which of this shard's frames belong to the clip (inside
        `shard_map` over `axis`)."""
        index = jax.lax.axis_index(self.axis) * local_frames + jnp.arange(local_frames)
        return (index >= self.first) & (index < self.end)  # (T,)


def _frames_before(x: jax.Array, count: int, axis: str) -> jax.Array:
    """The `count` frames that precede this shard's frames in the clip (a causal-conv halo).

    Shard 0 repeats its first frame, as whole-clip causal padding does. Each round passes every
    shard's last `count` known frames one shard on, so shards holding fewer than `count` frames
    still see far enough back.
    """
    first = jnp.repeat(x[:, :1], count, axis=1)  # (B, count, H, W, C)
    n = jax.lax.axis_size(axis)
    is_first = jax.lax.axis_index(axis) == 0
    halo = first
    for _ in range(-(-count // x.shape[1])):
        tail = jnp.concatenate([halo, x], axis=1)[:, -count:]  # (B, count, H, W, C)
        halo = jnp.where(
            is_first, first, jax.lax.ppermute(tail, axis, [(i, i + 1) for i in range(n - 1)])
        )
    return halo


def _conv_init(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int, dtype) -> jax.Array:
    # torch's default Conv init (uniform, bound 1/sqrt(fan_in)), so training from scratch starts
    # where the reference would. Drawn flat: with jax 0.10.2's partitionable threefry, XLA:CPU
    # takes ~15 s to compile a draw of some 5-D shapes, e.g. (3, 3, 3, 8, 9); 1-D draws take 0.2 s.
    bound = 1.0 / math.sqrt(fan_in)
    flat = jax.random.uniform(rngs.params(), (math.prod(shape),), dtype, -bound, bound)
    return flat.reshape(shape)


ChannelAxes = tuple[str | None, str | None]


class Conv(nnx.Module):
    """A 2D or 3D convolution over the middle axes of a channels-last array."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, ...],
        *,
        strides: tuple[int, ...] | None = None,
        padding: tuple[tuple[int, int], ...] | None = None,
        axes: ChannelAxes = ("conv_in", "conv_out"),
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
    ):
        fan_in = in_channels * math.prod(kernel_size)
        shape = (*kernel_size, in_channels, out_channels)
        kernel = _conv_init(rngs, shape, fan_in, param_dtype)
        self.kernel = sharding.param(kernel, (None,) * len(kernel_size) + axes)
        self.bias = sharding.param(_conv_init(rngs, (out_channels,), fan_in, param_dtype), axes[1:])
        self.strides = strides or (1,) * len(kernel_size)
        self.padding = padding or ((0, 0),) * len(kernel_size)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(self.dtype)
        x = x.astype(self.dtype)
        if len(self.strides) == 2:
            y = _conv2d(x, kernel, self.strides, self.padding)
        else:
            # A 3D convolution (stride 1 and no padding in time here) as the sum over its kt
            # temporal taps of 2D convolutions of the frames, batched over frames: the same
            # numbers, and on XLA:CPU the whole VAE encode runs 1.4x faster and the decode
            # 1.25x (bench/vae.py, BENCHMARKS.md).
            if self.strides[0] != 1 or self.padding[0] != (0, 0):
                raise ValueError("3D convolutions here have stride 1 and no padding in time")
            kt = kernel.shape[0]
            b, t = x.shape[:2]
            frames = t - kt + 1
            y = sum(
                _conv2d(
                    x[:, d : d + frames].reshape(b * frames, *x.shape[2:]),
                    kernel[d],
                    self.strides[1:],
                    self.padding[1:],
                )
                for d in range(kt)
            )
            y = y.reshape(b, frames, *y.shape[1:])
        return y + self.bias[...].astype(self.dtype)


def _conv2d(x, kernel, strides, padding):
    """(N, H, W, C) x (kh, kw, C, O) -> (N, H', W', O)."""
    layout = ("NHWC", "HWIO", "NHWC")
    return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=layout)


class CausalConv3d(nnx.Module):
    """3D conv, zero-padded in space and causally padded in time with the `kt - 1` frames before.

    Those frames come from the previous chunk (`cache`), the previous shard (`shards`), or, at the
    start of the clip, are copies of frame 0. Returns the output and the cache for the next chunk:
    the last `kt - 1` frames of the padded input.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        axes: ChannelAxes = ("conv_in", "conv_out"),
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
    ):
        self.time_pad = kernel_size - 1
        pad = ((kernel_size - 1) // 2,) * 2
        kw = dict(axes=axes, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv = Conv(
            in_channels, out_channels, (kernel_size,) * 3, padding=((0, 0), pad, pad), **kw
        )

    def __call__(
        self, x: jax.Array, cache: jax.Array | None = None, shards: FrameShards | None = None
    ) -> tuple[jax.Array, jax.Array | None]:
        if not self.time_pad:
            return self.conv(x), None
        if shards is not None:
            halo = _frames_before(x, self.time_pad, shards.axis)
        elif cache is None:
            halo = jnp.repeat(x[:, :1], self.time_pad, axis=1)
        else:
            halo = cache
        x = jnp.concatenate([halo, x], axis=1)  # (B, kt - 1 + T, H, W, C)
        return self.conv(x), x[:, -self.time_pad :]


class GroupNorm(nnx.Module):
    """torch `nn.GroupNorm`: contiguous channel groups, statistics over (T, H, W) and the group's
    channels jointly per sample, two-pass variance, in float32."""

    def __init__(self, num_channels: int, num_groups: int, eps: float, *, dtype, param_dtype, rngs):
        del rngs  # torch initialises the affine parameters to ones and zeros
        self.scale = sharding.param(jnp.ones((num_channels,), param_dtype), ("conv_out",))
        self.bias = sharding.param(jnp.zeros((num_channels,), param_dtype), ("conv_out",))
        self.num_groups = num_groups
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array, shards: FrameShards | None = None) -> jax.Array:
        B, T, H, W, C = x.shape
        G = self.num_groups
        xg = x.astype(jnp.float32).reshape(B, T, H, W, G, C // G)  # contiguous channel groups
        mean = _group_mean(xg, shards)
        var = _group_mean(jnp.square(xg - mean), shards)
        y = ((xg - mean) * jax.lax.rsqrt(var + self.eps)).reshape(B, T, H, W, C)
        return (y * self.scale[...] + self.bias[...]).astype(self.dtype)


def _group_mean(xg: jax.Array, shards: FrameShards | None) -> jax.Array:
    """Mean of (B, T, H, W, G, Cg) over all but B and G; over the clip's frames on all shards.
    Averaged one axis at a time (`compiler.mean`): accurate on the CPU at any frame size."""
    if shards is None:
        return compiler.mean(xg, (1, 2, 3, 5), keepdims=True)
    T = xg.shape[1]
    mask = shards.frame_mask(T).astype(xg.dtype)[:, None, None, None, None]  # (T, 1, 1, 1, 1)
    per_frame = compiler.mean(xg, (2, 3, 5), keepdims=True)  # (B, T, 1, 1, G, 1)
    total = jax.lax.psum((per_frame * mask).sum(1, keepdims=True), shards.axis)
    return total / (shards.end - shards.first)


def _repeat_to(z: jax.Array, T: int, H: int, W: int) -> jax.Array:
    """torch nearest `interpolate(z, size=(T, H, W))` for the integer factors the decoder uses."""
    _, t, h, w, _ = z.shape
    if T % t or H % h or W % w:
        raise ValueError(f"cannot resize latents {(t, h, w)} to {(T, H, W)} by whole factors")
    z = jnp.repeat(z, T // t, axis=1)
    return jnp.repeat(jnp.repeat(z, H // h, axis=2), W // w, axis=3)  # (B, T, H, W, C)


class SpatialNorm(nnx.Module):
    """Decoder norm: GroupNorm(f) * conv_y(zq) + conv_b(zq), zq = latents resized to f's frames."""

    def __init__(
        self, f_channels: int, zq_channels: int, num_groups: int, *, dtype, param_dtype, rngs
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm_layer = GroupNorm(f_channels, num_groups, FIXED_NORM_EPS, **kw)
        self.conv_y = CausalConv3d(zq_channels, f_channels, 1, **kw)
        self.conv_b = CausalConv3d(zq_channels, f_channels, 1, **kw)

    def __call__(self, f: jax.Array, zq: jax.Array, shards: FrameShards | None = None) -> jax.Array:
        _, T, H, W, _ = f.shape
        # 1x1x1 convs commute with nearest resizing: run them at latent resolution.
        yb = jnp.concatenate([self.conv_y(zq)[0], self.conv_b(zq)[0]], axis=-1)  # (B, Tz, h, w, 2C)
        if shards is None and T > 1 and T % 2:
            # An odd frame count means frame 0 came from latent 0 alone (see Upsample).
            first, rest = _repeat_to(yb[:, :1], 1, H, W), _repeat_to(yb[:, 1:], T - 1, H, W)
            yb = jnp.concatenate([first, rest], axis=1)
        else:
            yb = _repeat_to(yb, T, H, W)  # (B, T, H, W, 2C)
        y, b = jnp.split(yb, 2, axis=-1)
        return self.norm_layer(f, shards) * y + b


class ResnetBlock(nnx.Module):
    """norm -> SiLU -> causal conv, twice, plus a (1x1x1 conv) shortcut. Decoder blocks use
    SpatialNorm conditioned on the latents (`zq_channels`), encoder blocks plain GroupNorm."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_groups: int,
        eps: float,
        zq_channels: int | None,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if zq_channels is None:
            self.norm1 = GroupNorm(in_channels, num_groups, eps, **kw)
            self.norm2 = GroupNorm(out_channels, num_groups, eps, **kw)
        else:
            self.norm1 = SpatialNorm(in_channels, zq_channels, num_groups, **kw)
            self.norm2 = SpatialNorm(out_channels, zq_channels, num_groups, **kw)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3, **kw)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3, **kw)
        shortcut = in_channels != out_channels
        self.conv_shortcut = Conv(in_channels, out_channels, (1,) * 3, **kw) if shortcut else None

    def __call__(self, x, cache=None, *, zq=None, shards=None):
        cache = cache or {}
        norm1 = self.norm1(x, shards) if zq is None else self.norm1(x, zq, shards)
        h, conv1 = self.conv1(jax.nn.silu(norm1), cache.get("conv1"), shards)
        norm2 = self.norm2(h, shards) if zq is None else self.norm2(h, zq, shards)
        h, conv2 = self.conv2(jax.nn.silu(norm2), cache.get("conv2"), shards)
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h, {"conv1": conv1, "conv2": conv2}


def _resnets(in_channels, out_channels, num_layers, **kw) -> nnx.List:
    return nnx.List(
        ResnetBlock(in_channels if i == 0 else out_channels, out_channels, **kw)
        for i in range(num_layers)
    )


def _run_resnets(resnets, x, cache, zq, shards):
    caches = []
    for i, resnet in enumerate(resnets):
        x, c = resnet(x, None if cache is None else cache[i], zq=zq, shards=shards)
        caches.append(c)
    return x, caches


def _pair_mean(x: jax.Array) -> jax.Array:
    B, T, H, W, C = x.shape
    return x.reshape(B, T // 2, 2, H, W, C).mean(axis=2)  # (B, T/2, H, W, C)


class Downsample(nnx.Module):
    """Optional 2x temporal average pooling (frame 0 kept alone when the count is odd), then a 3x3
    stride-2 conv per frame after zero-padding only the right and bottom edges."""

    def __init__(self, channels: int, *, compress_time: bool, dtype, param_dtype, rngs):
        self.compress_time = compress_time
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv = Conv(channels, channels, (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)), **kw)

    def __call__(self, x: jax.Array, shards: FrameShards | None = None) -> jax.Array:
        if self.compress_time:
            if shards is None and x.shape[1] % 2:
                rest = _pair_mean(x[:, 1:]) if x.shape[1] > 1 else x[:, 1:]
                x = jnp.concatenate([x[:, :1], rest], axis=1)  # (B, 1 + (T-1)/2, H, W, C)
            else:
                x = _pair_mean(x)
        B, T, H, W, C = x.shape
        y = self.conv(x.reshape(B * T, H, W, C))  # (B*T, H/2, W/2, C)
        return y.reshape(B, T, *y.shape[1:])


class Upsample(nnx.Module):
    """Nearest 2x upsampling in space, and in time when `compress_time` (frame 0 is not repeated
    in time when the count is odd, a single frame is never repeated), then a 3x3 conv per frame."""

    def __init__(self, channels: int, *, compress_time: bool, dtype, param_dtype, rngs):
        self.compress_time = compress_time
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv = Conv(channels, channels, (3, 3), padding=((1, 1), (1, 1)), **kw)

    def __call__(self, x: jax.Array, shards: FrameShards | None = None) -> jax.Array:
        if self.compress_time and shards is not None:
            x = jnp.repeat(x, 2, axis=1)
        elif self.compress_time and x.shape[1] > 1:
            if x.shape[1] % 2:
                rest = jnp.repeat(x[:, 1:], 2, axis=1)
                x = jnp.concatenate([x[:, :1], rest], axis=1)  # (B, 2T - 1, H, W, C)
            else:
                x = jnp.repeat(x, 2, axis=1)  # (B, 2T, H, W, C)
        x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)  # (B, T, 2H, 2W, C)
        B, T, H, W, C = x.shape
        y = self.conv(x.reshape(B * T, H, W, C))  # (B*T, H, W, C)
        return y.reshape(B, T, H, W, C)


class DownBlock(nnx.Module):
    """Encoder stage: resnets, then an optional Downsample. Also serves as the encoder mid block."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_layers: int,
        num_groups: int,
        eps: float,
        downsample: bool,
        compress_time: bool,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        norm = dict(num_groups=num_groups, eps=eps, zq_channels=None)
        self.resnets = _resnets(in_channels, out_channels, num_layers, **norm, **kw)
        resample = Downsample(out_channels, compress_time=compress_time, **kw)
        self.downsamplers = nnx.List([resample]) if downsample else None
        self.compress_time = downsample and compress_time

    def __call__(self, x, cache=None, shards=None):
        x, cache = _run_resnets(self.resnets, x, cache, None, shards)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x, shards)
        return x, cache


class UpBlock(nnx.Module):
    """Decoder stage: latent-conditioned resnets, then an optional Upsample. Also serves as the
    decoder mid block."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_layers: int,
        num_groups: int,
        zq_channels: int,
        upsample: bool,
        compress_time: bool,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        norm = dict(num_groups=num_groups, eps=FIXED_NORM_EPS, zq_channels=zq_channels)
        self.resnets = _resnets(in_channels, out_channels, num_layers, **norm, **kw)
        resample = Upsample(out_channels, compress_time=compress_time, **kw)
        self.upsamplers = nnx.List([resample]) if upsample else None
        self.compress_time = upsample and compress_time

    def __call__(self, x, zq, cache=None, shards=None):
        x, cache = _run_resnets(self.resnets, x, cache, zq, shards)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, shards)
        return x, cache


def _child(cache, key):
    return None if cache is None else cache[key]


class Encoder(nnx.Module):
    """Video (B, T, H, W, in) -> moments (B, T', H/8, W/8, 2 * latent): mean then logvar."""

    def __init__(
        self,
        in_channels: int,
        latent_channels: int,
        block_out_channels: tuple[int, ...],
        layers_per_block: int,
        num_groups: int,
        eps: float,
        temporal_compression_ratio: int,
        *,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        time_levels = int(math.log2(temporal_compression_ratio))
        widths = block_out_channels
        # The RGB axis (3) cannot be split over a mesh, so it gets no logical name.
        self.conv_in = CausalConv3d(in_channels, widths[0], 3, axes=(None, "conv_out"), **kw)
        stage = dict(num_groups=num_groups, eps=eps, **kw)
        self.down_blocks = nnx.List(
            DownBlock(
                widths[max(i - 1, 0)],
                widths[i],
                num_layers=layers_per_block,
                downsample=i < len(widths) - 1,
                compress_time=i < time_levels,
                **stage,
            )
            for i in range(len(widths))
        )
        mid = dict(num_layers=2, downsample=False, compress_time=False)
        self.mid_block = DownBlock(widths[-1], widths[-1], **mid, **stage)
        self.norm_out = GroupNorm(widths[-1], num_groups, FIXED_NORM_EPS, **kw)
        self.conv_out = CausalConv3d(widths[-1], 2 * latent_channels, 3, **kw)

    def __call__(
        self, x: jax.Array, cache: dict | None = None, shards: FrameShards | None = None
    ) -> tuple[jax.Array, dict]:
        new = {"down_blocks": []}
        x, new["conv_in"] = self.conv_in(x, _child(cache, "conv_in"), shards)
        for i, block in enumerate(self.down_blocks):
            x, block_cache = block(x, _child(_child(cache, "down_blocks"), i), shards)
            new["down_blocks"].append(block_cache)
            if shards is not None and block.compress_time:
                shards = shards.pooled()
        x, new["mid_block"] = self.mid_block(x, _child(cache, "mid_block"), shards)
        x = jax.nn.silu(self.norm_out(x, shards))
        x, new["conv_out"] = self.conv_out(x, _child(cache, "conv_out"), shards)
        return x, new


class Decoder(nnx.Module):
    """Latents (B, T', h, w, latent) -> video (B, T, 8h, 8w, out); every norm is a SpatialNorm
    conditioned on the latents themselves."""

    def __init__(
        self,
        latent_channels: int,
        out_channels: int,
        block_out_channels: tuple[int, ...],
        layers_per_block: int,
        num_groups: int,
        temporal_compression_ratio: int,
        *,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        time_levels = int(math.log2(temporal_compression_ratio))
        widths = tuple(reversed(block_out_channels))
        self.conv_in = CausalConv3d(latent_channels, widths[0], 3, **kw)
        stage = dict(num_groups=num_groups, zq_channels=latent_channels, **kw)
        mid = dict(num_layers=2, upsample=False, compress_time=False)
        self.mid_block = UpBlock(widths[0], widths[0], **mid, **stage)
        self.up_blocks = nnx.List(
            UpBlock(
                widths[max(i - 1, 0)],
                widths[i],
                num_layers=layers_per_block + 1,
                upsample=i < len(widths) - 1,
                compress_time=i < time_levels,
                **stage,
            )
            for i in range(len(widths))
        )
        self.norm_out = SpatialNorm(widths[-1], latent_channels, num_groups, **kw)
        self.conv_out = CausalConv3d(widths[-1], out_channels, 3, axes=("conv_in", None), **kw)

    def __call__(
        self, z: jax.Array, cache: dict | None = None, shards: FrameShards | None = None
    ) -> tuple[jax.Array, dict]:
        new = {"up_blocks": []}
        x, new["conv_in"] = self.conv_in(z, _child(cache, "conv_in"), shards)
        x, new["mid_block"] = self.mid_block(x, z, _child(cache, "mid_block"), shards)
        for i, block in enumerate(self.up_blocks):
            x, block_cache = block(x, z, _child(_child(cache, "up_blocks"), i), shards)
            new["up_blocks"].append(block_cache)
            if shards is not None and block.compress_time:
                shards = shards.doubled()
        x = jax.nn.silu(self.norm_out(x, z, shards))
        x, new["conv_out"] = self.conv_out(x, _child(cache, "conv_out"), shards)
        return x, new


def _run_in_chunks(step, x: jax.Array, chunk: int) -> jax.Array:
    """diffusers' frame batching: chunk 0 is `chunk + T % chunk` frames (all of them when
    T < 2 * chunk), the rest `chunk` each, run in order with the causal caches carried along."""
    B, T = x.shape[:2]
    first = T if T < 2 * chunk else chunk + T % chunk
    y0, cache = step(x[:, :first], None)
    if first == T:
        return y0
    rest = x[:, first:].reshape(B, (T - first) // chunk, chunk, *x.shape[2:])
    rest = jnp.moveaxis(rest, 1, 0)  # (N, B, chunk, H, W, C)

    def body(cache, xc):
        y, cache = step(xc, cache)
        return cache, y

    _, ys = jax.lax.scan(body, cache, rest)  # (N, B, t, H', W', C')
    ys = jnp.moveaxis(ys, 0, 1).reshape(B, -1, *ys.shape[3:])  # (B, N * t, H', W', C')
    return jnp.concatenate([y0, ys], axis=1)


def diagonal_gaussian(moments: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean, logvar) of the posterior from the encoder's moments; logvar clamped to [-30, 20]."""
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)


def sample_latents(rng: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """A posterior sample mean + std * N(0, 1) (diffusers' `latent_dist.sample()`)."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)


class AutoencoderKL(nnx.Module):
    """The CogVideoX VAE. Video (B, T, H, W, 3) in [-1, 1] with T = 4k+1 <-> unscaled latents
    (B, k+1, H/8, W/8, 16); other frame counts as diffusers takes them (`encode_moments`). Use
    under `jax.jit`: frame batching scans over chunks."""

    def __init__(
        self, cfg: VaeConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs
    ):
        self.cfg = cfg
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        blocks = (cfg.block_out_channels, cfg.layers_per_block, cfg.norm_num_groups)
        ratio = cfg.temporal_compression_ratio
        self.encoder = Encoder(
            cfg.in_channels, cfg.latent_channels, *blocks, cfg.norm_eps, ratio, **kw
        )
        self.decoder = Decoder(cfg.latent_channels, cfg.out_channels, *blocks, ratio, **kw)

    def encode_moments(self, video: jax.Array, *, frame_batching: bool = True) -> jax.Array:
        """The encoder's raw output (B, T', H/8, W/8, 2 * latent), before the logvar clamp. Any
        frame count T >= 1 is taken, as diffusers takes it: each 2x temporal downsampling keeps
        an odd count's first frame alone and pairs the rest (T' = (T - 1) / 4 + 1 for T = 4k+1),
        and pairs all frames of an even count (T = 8k gives 2k latents, in chunks of 8)."""
        _check_channels(video, self.cfg.in_channels, "video")
        if video.shape[1] < 1:
            raise ValueError(f"video must have at least 1 frame, got {video.shape}")
        if not frame_batching:
            return self.encoder(video)[0]
        return _run_in_chunks(self.encoder, video, ENCODE_CHUNK_FRAMES)

    def encode(
        self, video: jax.Array, *, frame_batching: bool = True
    ) -> tuple[jax.Array, jax.Array]:
        """Posterior (mean, logvar), each (B, T', H/8, W/8, latent), of video (B, T, H, W, 3) in
        [-1, 1] with T = 4T' - 3. `frame_batching`: diffusers' chunks of frames with per-chunk
        GroupNorm statistics (results equal diffusers'); False: GroupNorm sees the whole clip."""
        return diagonal_gaussian(self.encode_moments(video, frame_batching=frame_batching))

    def decode(self, z: jax.Array, *, frame_batching: bool = True) -> jax.Array:
        """Unscaled latents (B, T', h, w, latent) -> video (B, T, 8h, 8w, 3): T = 4T' - 3 for odd
        T'. An even T' gives 4T' frames with no special first frame, as in diffusers."""
        _check_channels(z, self.cfg.latent_channels, "latents")
        if not frame_batching:
            return self.decoder(z)[0]
        return _run_in_chunks(self.decoder, z, DECODE_CHUNK_LATENTS)


def _check_channels(x: jax.Array, channels: int, what: str) -> None:
    if x.ndim != 5 or x.shape[-1] != channels:
        raise ValueError(f"{what} must be (B, T, H, W, {channels}), got {x.shape}")


# Jitted here because shard_map run eagerly dispatches op by op (tens of seconds for a tiny
# model); inside a caller's jit this inner jit is simply inlined.
@functools.partial(jax.jit, static_argnames=("graphdef", "mesh", "shards"))
def _context_parallel(graphdef, state, x, *, mesh, shards: FrameShards):
    def local(state, x):
        return nnx.merge(graphdef, state)(x, None, shards)[0]

    # Weights enter replicated; frames are split over the axis, the batch is not split.
    frames = P(None, shards.axis)
    return jax.shard_map(local, mesh=mesh, in_specs=(P(), frames), out_specs=frames)(state, x)


def _pad_frames(x: jax.Array, front: int, total: int) -> jax.Array:
    """`front` copies of frame 0, the clip, then copies of its last frame up to `total` frames."""
    back = total - front - x.shape[1]
    parts = [jnp.repeat(x[:, :1], front, axis=1), x, jnp.repeat(x[:, -1:], back, axis=1)]
    return jnp.concatenate(parts, axis=1)  # (B, total, H, W, C)


def encode_context_parallel(
    vae: AutoencoderKL, video: jax.Array, mesh: jax.sharding.Mesh, *, axis: str = "context"
) -> tuple[jax.Array, jax.Array]:
    """Whole-clip `vae.encode(video, frame_batching=False)` with frames split over mesh `axis`.

    Layout (r = temporal compression, n shards): r - 1 copies of frame 0 go in front, so the clip
    becomes r * T' frames and every r of them make one latent; copies of the last frame go at the
    end up to r * n * ceil(T' / n) frames. Each shard then holds r * ceil(T' / n) frames and
    returns ceil(T' / n) latents (the padding's latents are dropped). Causal-conv halos come from
    the previous shard by `ppermute`; GroupNorm statistics are psum-reduced over the clip's frames
    only (see `FrameShards`).
    """
    cfg = vae.cfg
    _check_channels(video, cfg.in_channels, "video")
    r = cfg.temporal_compression_ratio
    latents = num_latent_frames(video.shape[1], r)
    n = mesh.shape[axis]
    per_shard = -(-latents // n)
    x = _pad_frames(video, r - 1, r * per_shard * n)
    shards = FrameShards(axis, first=r - 1, end=r * latents)
    moments = _context_parallel(*nnx.split(vae.encoder), x, mesh=mesh, shards=shards)
    return diagonal_gaussian(moments[:, :latents])


def decode_context_parallel(
    vae: AutoencoderKL, z: jax.Array, mesh: jax.sharding.Mesh, *, axis: str = "context"
) -> jax.Array:
    """Whole-clip `vae.decode(z, frame_batching=False)` with latent frames split over mesh `axis`.

    The latents are padded at the end to a multiple of the shard count. Inside, every latent
    becomes r frames (uniform temporal upsampling); for odd T' the extra copies of frame 0 that
    this makes at the front are dropped, as is the padding.
    """
    _check_channels(z, vae.cfg.latent_channels, "latents")
    latents = z.shape[1]
    n = mesh.shape[axis]
    x = _pad_frames(z, 0, -(-latents // n) * n)
    shards = FrameShards(axis, first=0, end=latents)
    video = _context_parallel(*nnx.split(vae.decoder), x, mesh=mesh, shards=shards)
    for block in vae.decoder.up_blocks:
        if block.compress_time:
            shards = shards.doubled()
    return video[:, shards.first : shards.end]
