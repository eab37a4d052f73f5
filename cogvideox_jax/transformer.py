"""The CogVideoX expert transformer (arXiv 2408.06072, section 2.2) in Flax NNX.

Must match diffusers 0.42.1 `models/transformers/cogvideox_transformer_3d.py`
(`CogVideoXTransformer3DModel`) for all released variants; see VARIANTS.

Text and video tokens run through the blocks as one joint sequence [text; video] (text first,
`join`/`split` below), so every block is a per-token computation plus full attention. The expert
adaptive LayerNorm picks the text or the video modulation per token. Holding one sequence also
means context parallelism shards a single length axis, and RoPE tables simply carry the identity
rotation on text rows. Under a mesh that splits that axis the sequence gets padding tokens at
the end up to a multiple of the shard count (hidden as keys, dropped after the blocks), so text
sits on the first shard and every position is global.

`Transformer.packed` runs rows packed with several clips of different sizes (the packed-batch
layout of the data pipeline): the joint sequence is [text of clips 1..G; video of clips 1..G],
attention is block-diagonal by segment id, and each token takes its own clip's timestep
modulation and positions, so each clip gets what it would get alone.

Shape letters: B batch, T latent frames, H/W latent height/width, C channels, S text tokens,
L video tokens, D width, N heads, K head dim, F MLP hidden, E time-embedding width.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from cogvideox_jax import attention, posemb, sharding
from cogvideox_jax.layers import REMAT_POLICIES, Buffer, LayerNorm, Linear, kernel_init, layer_norm


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """The architecture of a CogVideoX transformer (diffusers' config.json through
    `from_diffusers` / `to_diffusers`; the released ones in VARIANTS)."""

    num_layers: int
    num_heads: int
    head_dim: int = 64
    in_channels: int = 16
    out_channels: int = 16
    text_embed_dim: int = 4096
    time_embed_dim: int = 512
    ofs_embed_dim: int | None = None  # 1.5-I2V: embedding of the "ofs" scalar added to temb
    patch_size: int = 2
    patch_size_t: int | None = None  # 1.5: 2 latent frames per token, Linear patch embedding
    rope: bool = True  # 3D RoPE; otherwise the fixed 3D sin-cos table (2B)
    learned_posemb: bool = False  # 5B-I2V: a learned table on top of RoPE, fixed to sample size
    sample_height: int = 60  # latent size the model was trained at: sets the RoPE grid
    sample_width: int = 90
    sample_frames: int = 49  # pixel frames (diffusers' convention): 49 -> 13 latent frames
    max_text_len: int = 226
    temporal_compression_ratio: int = 4
    norm_eps: float = 1e-5
    spatial_interpolation_scale: float = 1.875
    temporal_interpolation_scale: float = 1.0

    def __post_init__(self):
        # The positional tables split features into (t, h, w) parts of 1/4, 3/8 and 3/8, each
        # made of (sin, cos) pairs: a multiple of 16 is what diffusers can build (checked for
        # every even size up to 128 against get_3d_rotary_pos_embed / get_3d_sincos_pos_embed).
        if self.rope and self.head_dim % 16:
            raise ValueError(
                f"attention_head_dim={self.head_dim}: the 3D rotary embedding "
                "(use_rotary_positional_embeddings) splits each head into 1/4 temporal and 3/8 "
                "+ 3/8 spatial (sin, cos) pairs, so attention_head_dim must be a multiple of 16 "
                "(diffusers cannot build that table either)"
            )
        if not self.rope and self.width % 16:
            raise ValueError(
                f"num_attention_heads x attention_head_dim = {self.width}: the 3D sin-cos "
                "positional table splits the width into 1/4 temporal and 3/8 + 3/8 spatial "
                "(sin, cos) pairs, so the width must be a multiple of 16 (diffusers cannot "
                "build that table either)"
            )

    @property
    def width(self) -> int:
        """D, the model width: num_heads * head_dim."""
        return self.num_heads * self.head_dim

    @property
    def patch_features(self) -> int:
        """Features of one video token before the patch embedding: pt * p * p * in_channels."""
        return (self.patch_size_t or 1) * self.patch_size**2 * self.in_channels

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> TransformerConfig:
        """Build from a diffusers `CogVideoXTransformer3DModel` config.json dict."""
        fixed = {
            "activation_fn": "gelu-approximate",
            "timestep_activation_fn": "silu",
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "norm_elementwise_affine": True,
            "attention_bias": True,
            "dropout": 0.0,
        }
        for key, want in fixed.items():
            if key in config and config[key] != want:
                raise ValueError(
                    f"config.json: {key}={config[key]!r} is not supported (only {want!r})"
                )
        if config.get("patch_size_t") is None and config.get("patch_bias", True) is not True:
            raise ValueError("config.json: patch_bias=False is only supported with patch_size_t")
        if config.get("use_learned_positional_embeddings") and not config.get(
            "use_rotary_positional_embeddings"
        ):
            raise ValueError("config.json: learned positional embeddings require rotary embeddings")
        c = dict(config)
        return cls(
            num_layers=c.get("num_layers", 30),
            num_heads=c.get("num_attention_heads", 30),
            head_dim=c.get("attention_head_dim", 64),
            in_channels=c.get("in_channels", 16),
            out_channels=c.get("out_channels") or 16,
            text_embed_dim=c.get("text_embed_dim", 4096),
            time_embed_dim=c.get("time_embed_dim", 512),
            ofs_embed_dim=c.get("ofs_embed_dim") or None,
            patch_size=c.get("patch_size", 2),
            patch_size_t=c.get("patch_size_t"),
            rope=bool(c.get("use_rotary_positional_embeddings", False)),
            learned_posemb=bool(c.get("use_learned_positional_embeddings", False)),
            sample_height=c.get("sample_height", 60),
            sample_width=c.get("sample_width", 90),
            sample_frames=c.get("sample_frames", 49),
            max_text_len=c.get("max_text_seq_length", 226),
            temporal_compression_ratio=c.get("temporal_compression_ratio", 4),
            norm_eps=c.get("norm_eps", 1e-5),
            spatial_interpolation_scale=c.get("spatial_interpolation_scale", 1.875),
            temporal_interpolation_scale=c.get("temporal_interpolation_scale", 1.0),
        )

    def to_diffusers(self) -> dict[str, Any]:
        """The equivalent diffusers config.json dict."""
        return {
            "_class_name": "CogVideoXTransformer3DModel",
            "activation_fn": "gelu-approximate",
            "attention_bias": True,
            "attention_head_dim": self.head_dim,
            "dropout": 0.0,
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "in_channels": self.in_channels,
            "max_text_seq_length": self.max_text_len,
            "norm_elementwise_affine": True,
            "norm_eps": self.norm_eps,
            "num_attention_heads": self.num_heads,
            "num_layers": self.num_layers,
            "ofs_embed_dim": self.ofs_embed_dim,
            "out_channels": self.out_channels,
            "patch_bias": self.patch_size_t is None,  # 1.5's Linear has a bias regardless
            "patch_size": self.patch_size,
            "patch_size_t": self.patch_size_t,
            "sample_frames": self.sample_frames,
            "sample_height": self.sample_height,
            "sample_width": self.sample_width,
            "spatial_interpolation_scale": self.spatial_interpolation_scale,
            "temporal_compression_ratio": self.temporal_compression_ratio,
            "temporal_interpolation_scale": self.temporal_interpolation_scale,
            "text_embed_dim": self.text_embed_dim,
            "time_embed_dim": self.time_embed_dim,
            "timestep_activation_fn": "silu",
            "use_learned_positional_embeddings": self.learned_posemb,
            "use_rotary_positional_embeddings": self.rope,
        }


# Source: diffusers scripts/convert_cogvideox_to_diffusers.py (per-version arguments) and the
# SAT configs; checked by tests/test_transformer.py against the published parameter counts.
_V10 = dict(patch_size=2, patch_size_t=None, sample_height=60, sample_width=90, sample_frames=49)
_V15 = dict(patch_size=2, patch_size_t=2, sample_height=300, sample_width=300, sample_frames=81)
VARIANTS: dict[str, dict[str, Any]] = {
    "2b": dict(num_layers=30, num_heads=30, rope=False, **_V10),
    "5b": dict(num_layers=42, num_heads=48, rope=True, **_V10),
    "5b-i2v": dict(
        num_layers=42, num_heads=48, rope=True, learned_posemb=True, in_channels=32, **_V10
    ),
    "1.5-5b": dict(num_layers=42, num_heads=48, rope=True, **_V15),
    "1.5-5b-i2v": dict(
        num_layers=42, num_heads=48, rope=True, in_channels=32, ofs_embed_dim=512, **_V15
    ),
}


def transformer_config(variant: str, **overrides) -> TransformerConfig:
    """The TransformerConfig of a released variant (a key of VARIANTS), fields replaced by
    `overrides`."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown transformer variant {variant!r}; known: {sorted(VARIANTS)}")
    return TransformerConfig(**{**VARIANTS[variant], **overrides})


def join(ctx: jax.Array, x: jax.Array) -> jax.Array:
    """(B, S, D), (B, L, D) -> the joint sequence (B, S + L, D), text first."""
    return jnp.concatenate([ctx, x], axis=1)


def split(h: jax.Array, text_len: int) -> tuple[jax.Array, jax.Array]:
    """(B, S + L, D) -> text (B, S, D), video (B, L, D)."""
    return h[:, :text_len], h[:, text_len:]


def patchify(x, p: int, pt: int = 1):
    """(..., T, H, W, C) -> (..., (T/pt)(H/p)(W/p), pt*p*p*C): tokens in (t, h, w) order, features
    in (pt, p, p, C) order. Only reshape/transpose, so numpy and jax arrays alike."""
    *lead, t, h, w, c = x.shape
    n = len(lead)
    x = x.reshape(*lead, t // pt, pt, h // p, p, w // p, p, c)
    x = x.transpose(*range(n), n, n + 2, n + 4, n + 1, n + 3, n + 5, n + 6)
    return x.reshape(*lead, (t // pt) * (h // p) * (w // p), pt * p * p * c)  # (..., L, F)


def unpatchify(x, t: int, h: int, w: int, p: int, pt: int, c: int):
    """The inverse of `patchify`: (..., L, pt*p*p*c) -> (..., T, H, W, c)."""
    *lead, _, _ = x.shape
    n = len(lead)
    x = x.reshape(*lead, t // pt, h // p, w // p, pt, p, p, c)
    x = x.transpose(*range(n), n, n + 3, n + 1, n + 4, n + 2, n + 5, n + 6)
    return x.reshape(*lead, t, h, w, c)  # (..., T/pt, pt, H/p, p, W/p, p, C) merged


def _recomputed(fn, static_argnums=()):
    """`fn` under `jax.checkpoint`, for the elementwise work between a block's products (norms,
    modulation, RoPE, GELU, gating): the backward keeps fn's inputs and recomputes the rest,
    where autodiff alone kept every intermediate (three copies of a LayerNorm's input, five of
    the GELU's, the per-token scales and gates). So a block keeps far fewer activations for its
    backward (counted by tests/test_transformer.py), and a train step needs much less temporary
    memory (BENCHMARKS.md, "what the train step keeps for its backward"). No products inside,
    so a block-level remat policy (`REMAT_POLICIES`) still decides alone which products are
    kept. prevent_cse=False: these run inside the layer scan, whose forward and backward are
    separate loops."""
    return jax.checkpoint(fn, prevent_cse=False, static_argnums=static_argnums)


class TimestepEmbedding(nnx.Module):
    """Linear -> SiLU -> Linear (no activation after: every consumer applies its own SiLU)."""

    def __init__(self, din, dout, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_1 = Linear(din, dout, ("embed", None), **kw)
        self.linear_2 = Linear(dout, dout, (None, None), **kw)

    def __call__(self, x):
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class ExpertAdaLN(nnx.Module):
    """LayerNorm with separate text and video modulation (diffusers' CogVideoXLayerNormZero).

    One linear gives 6 chunks in the order shift, scale, gate (video), then shift, scale, gate
    (text); the LayerNorm itself is shared by both modalities.
    """

    def __init__(self, time_embed_dim, dim, eps, *, dtype, param_dtype, rngs):
        self.linear = Linear(
            time_embed_dim,
            6 * dim,
            (None, "embed"),
            zero_init=True,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.norm = LayerNorm(dim, eps, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, h, temb, is_text, segment_ids=None, mod=None):
        """h (B, S + L, D), temb (B, E), is_text (S + L,) bool -> (modulated h, mod), where mod
        (B, 6D) is the modulation `_gated_residual` takes the gate from. Packed rows: temb
        (B, G, E) per segment and segment_ids (B, S + L), mod (B, G, 6D) (see `_per_token`).
        `mod`: this norm's linear of silu(temb) when the caller has computed it already (the
        transformer does, for every layer at once: `_modulations`)."""
        if mod is None:
            mod = self.linear(jax.nn.silu(temb))  # (B, 6D) or (B, G, 6D)
        norm = self.norm
        n = _modulated_norm(
            h, norm.scale[...], norm.bias[...], mod, is_text, segment_ids, norm.eps, norm.dtype
        )
        return n, mod


@functools.partial(_recomputed, static_argnums=(6, 7))
def _modulated_norm(h, ln_scale, ln_bias, mod, is_text, segment_ids, eps, dtype):
    """LN(h) * (1 + scale) + shift with each token's (text or video) scale and shift."""
    shift, scale, _ = _per_token(mod, is_text, segment_ids)  # (B, S + L, D) each
    return layer_norm(h, ln_scale, ln_bias, eps, dtype) * (1 + scale) + shift


@_recomputed
def _gated_residual(h, y, mod, is_text, segment_ids=None):
    """h + gate * y, with each token's gate from an `ExpertAdaLN` modulation `mod`."""
    _, _, gate = _per_token(mod, is_text, segment_ids)
    return h + gate * y


def _per_token(mod, is_text, segment_ids=None):
    """Each token's (shift, scale, gate) (B, S + L, D) from the six chunks (video shift, scale,
    gate, then text's): one set `mod` (B, 6D), or one per segment (B, G, 6D) picked by the
    token's id (1..G; padding's 0 takes segment 1's, its outputs are never used)."""
    if segment_ids is None:
        video, text = jnp.split(mod[:, None, :], 2, axis=-1)  # (B, 1, 3D) each
        picked = jnp.where(is_text[None, :, None], text, video)  # (B, S + L, 3D)
    else:
        b, g, six_d = mod.shape
        rows = mod.reshape(b, 2 * g, six_d // 2)  # (B, 2G, 3D): segment 1 video, text, 2 ...
        row = 2 * jnp.maximum(segment_ids - 1, 0) + jnp.asarray(is_text, jnp.int32)
        picked = jnp.take_along_axis(rows, row[..., None], axis=1)  # (B, S + L, 3D)
    return jnp.split(picked, 3, axis=-1)


class Attention(nnx.Module):
    """Joint self-attention with per-head q/k LayerNorm and RoPE on video tokens only."""

    def __init__(
        self, dim, num_heads, head_dim, *, impl, context_parallel, dtype, param_dtype, rngs
    ):
        def proj():
            k = kernel_init(0, (1, 2))(rngs.params(), (dim, num_heads, head_dim), param_dtype)
            b = jnp.zeros((num_heads, head_dim), param_dtype)
            return (
                sharding.param(k, ("embed", "heads", "kv")),
                sharding.param(b, ("heads", "kv")),
            )

        self.to_q_kernel, self.to_q_bias = proj()
        self.to_k_kernel, self.to_k_bias = proj()
        self.to_v_kernel, self.to_v_bias = proj()
        out = kernel_init((0, 1), 2)(rngs.params(), (num_heads, head_dim, dim), param_dtype)
        self.to_out_kernel = sharding.param(out, ("heads", "kv", "embed"))
        self.to_out_bias = sharding.param(jnp.zeros((dim,), param_dtype), ("embed",))
        self.norm_q = LayerNorm(head_dim, 1e-6, dtype=dtype, param_dtype=param_dtype)
        self.norm_k = LayerNorm(head_dim, 1e-6, dtype=dtype, param_dtype=param_dtype)
        self.impl, self.context_parallel, self.dtype = impl, context_parallel, dtype
        # LoRA adapters (cogvideox_jax.lora.attach), None without.
        self.to_q_lora, self.to_k_lora = nnx.data(None), nnx.data(None)
        self.to_v_lora, self.to_out_lora = nnx.data(None), nnx.data(None)

    def _project(self, h, kernel, bias, lora):
        y = jnp.einsum("BLD,DNK->BLNK", h, kernel[...].astype(self.dtype))
        if lora is not None:
            y = y + lora(h)
        y = y + bias[...].astype(self.dtype)
        return sharding.constrain(y, ("batch", "length", "act_heads", None))

    def __call__(self, h, cos, sin, kv_valid=None, segment_ids=None, reference=False):
        """h (B, S + L, D); cos/sin (S + L, K) (or per row (B, S + L, K)) with identity rows for
        text -> (B, S + L, D). Tokens from `kv_valid` on are padding: no token attends to them;
        with segment_ids (B, S + L) a token attends only its own segment. `reference`: see
        `Transformer.__call__`."""
        q = self._project(h, self.to_q_kernel, self.to_q_bias, self.to_q_lora)  # (B, S+L, N, K)
        k = self._project(h, self.to_k_kernel, self.to_k_bias, self.to_k_lora)
        v = self._project(h, self.to_v_kernel, self.to_v_bias, self.to_v_lora)
        q, k = (
            _normed_rope(x, norm.scale[...], norm.bias[...], cos, sin, norm.eps, norm.dtype)
            for x, norm in ((q, self.norm_q), (k, self.norm_k))
        )
        attend = functools.partial(
            attention.dot_product_attention,
            impl=self.impl,
            context_parallel=self.context_parallel,
        )
        if reference:
            o = _reference_attention(attend, q, k, v, kv_valid)
        else:
            o = attend(q, k, v, kv_valid=kv_valid, segment_ids=segment_ids)  # (B, S+L, N, K)
        o = checkpoint_name(o, "attn_out")
        y = jnp.einsum("BLNK,NKD->BLD", o, self.to_out_kernel[...].astype(self.dtype))
        if self.to_out_lora is not None:
            y = y + self.to_out_lora(o)
        return y + self.to_out_bias[...].astype(self.dtype)


def _reference_attention(attend, q, k, v, kv_valid):
    """Reference attention (DDIM-inversion reconstruction): rows [sampled; reference], halves of
    the batch. Each sampled row attends to its own tokens and to the matching reference row's
    (keys and values joined along the sequence, RoPE already on both); reference rows attend to
    themselves. Padding tokens (from kv_valid) move to the end of the joined keys."""
    half = q.shape[0] // 2
    n = k.shape[1] if kv_valid is None else kv_valid
    pad = k.shape[1] - n

    def joined(x):
        parts = [x[:half, :n], x[half:, :n]]
        if pad:
            parts.append(jnp.zeros((half, 2 * pad) + x.shape[2:], x.dtype))
        return sharding.constrain(
            jnp.concatenate(parts, axis=1), ("batch", "length", "act_heads", None)
        )

    sampled = attend(q[:half], joined(k), joined(v), kv_valid=2 * n if pad else None)
    own = attend(q[half:], k[half:], v[half:], kv_valid=kv_valid)
    return jnp.concatenate([sampled, own])


@functools.partial(_recomputed, static_argnums=(5, 6))
def _normed_rope(x, scale, bias, cos, sin, eps, dtype):
    """RoPE(LN(x)) over the head dim of x (B, S + L, N, K): the q/k norm and rotation."""
    return posemb.apply_rope(layer_norm(x, scale, bias, eps, dtype), cos, sin)


_gelu = _recomputed(lambda x: jax.nn.gelu(x, approximate=True))


class FeedForward(nnx.Module):
    """Linear -> GELU (tanh approximation) -> Linear (diffusers' ff.net.0.proj and ff.net.2)."""

    def __init__(self, dim, hidden, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.proj = Linear(dim, hidden, ("embed", "mlp"), **kw)
        self.out = Linear(hidden, dim, ("mlp", "embed"), **kw)

    def __call__(self, h):
        a = _gelu(self.proj(h))
        return self.out(sharding.constrain(a, ("batch", "length", "act_mlp")))


class Block(nnx.Module):
    """One expert-transformer block on the joint sequence [text; video].

    `is_text` marks the text tokens; they take the text half of each modulation (diffusers' enc_*
    chunks), video tokens the video half. Residual updates are gated per token the same way.
    """

    def __init__(
        self,
        dim,
        num_heads,
        head_dim,
        time_embed_dim,
        eps,
        *,
        attention_impl,
        context_parallel,
        dtype,
        param_dtype,
        rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = ExpertAdaLN(time_embed_dim, dim, eps, **kw)
        self.attn1 = Attention(
            dim,
            num_heads,
            head_dim,
            impl=attention_impl,
            context_parallel=context_parallel,
            **kw,
        )
        self.norm2 = ExpertAdaLN(time_embed_dim, dim, eps, **kw)
        self.ff = FeedForward(dim, 4 * dim, **kw)

    def __call__(
        self,
        h,
        temb,
        cos,
        sin,
        is_text,
        kv_valid=None,
        segment_ids=None,
        mods=(None, None),
        reference=False,
    ):
        """h (B, S + L, D), temb (B, E) -> (B, S + L, D); cos/sin, kv_valid, segment_ids and
        reference as `Attention` takes them. `mods`: norm1's and norm2's modulations if computed
        already (`ExpertAdaLN`)."""
        n, mod = self.norm1(h, temb, is_text, segment_ids, mods[0])
        attn = self.attn1(n, cos, sin, kv_valid, segment_ids, reference)
        h = _gated_residual(h, attn, mod, is_text, segment_ids)
        n, mod = self.norm2(h, temb, is_text, segment_ids, mods[1])
        h = _gated_residual(h, self.ff(n), mod, is_text, segment_ids)
        return sharding.constrain(h, ("batch", "length", "act_embed"))


class PatchEmbed(nnx.Module):
    """Video patches and text embeddings to width D; the 5B-I2V learned position table."""

    def __init__(self, cfg: TransformerConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.proj = Linear(cfg.patch_features, cfg.width, (None, "embed"), **kw)
        self.text_proj = Linear(cfg.text_embed_dim, cfg.width, (None, "embed"), **kw)
        if cfg.learned_posemb:
            # Initialised as diffusers does: the sin-cos table at the sample size, zero text rows.
            table = _sincos_table(cfg, *_sample_grid(cfg))
            self.pos_embedding = Buffer(
                jnp.asarray(table[None], param_dtype), logical_axes=(None, None, "embed")
            )

    def __call__(self, patches, text):
        """patches (B, L, patch_features), text (B, S, text_embed_dim) -> (B, S + L, D)."""
        # Each row's tokens whole on its batch shard before the text and video are joined: the
        # projections' outputs would otherwise follow their kernels' sharding (the width over
        # fsdp and context), and joining them along a context-sharded token axis made XLA gather
        # every row of the batch onto every chip (8 GB per micro-batch for 1.5-5B at 161 frames
        # on v5p-64; BENCHMARKS.md, "Where a step's time goes"). The blocks' constraint then
        # splits the tokens over `context`, a local slice.
        whole = ("batch", None, "act_embed")
        text = sharding.constrain(self.text_proj(text), whole)
        return join(text, sharding.constrain(self.proj(patches), whole))


def _sample_grid(cfg: TransformerConfig) -> tuple[int, int, int]:
    """(T, H, W) token grid at the sample size (diffusers' pos_embedding buffer size)."""
    t = (cfg.sample_frames - 1) // cfg.temporal_compression_ratio + 1
    return t, cfg.sample_height // cfg.patch_size, cfg.sample_width // cfg.patch_size


def _sincos_table(cfg: TransformerConfig, t: int, h: int, w: int) -> np.ndarray:
    """(S + t*h*w, D) float64: zero text rows, then the 3D sin-cos video rows."""
    video = posemb.sincos_3d(
        cfg.width, t, h, w, cfg.spatial_interpolation_scale, cfg.temporal_interpolation_scale
    )
    return np.concatenate([np.zeros((cfg.max_text_len, cfg.width)), video], axis=0)


class Transformer(nnx.Module):
    """`CogVideoXTransformer3DModel`: latents (B, T, H, W, C), text (B, S, text_embed_dim) and
    timesteps (B,) -> v-prediction (B, T, H, W, out_channels)."""

    def __init__(
        self,
        cfg: TransformerConfig,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        remat: str = "none",
        attention_impl: str = "auto",
        context_parallel: str = "allgather",
        rngs: nnx.Rngs,
    ):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {remat!r}")
        if attention_impl not in attention.IMPLEMENTATIONS:
            raise ValueError(f"attention_impl must be one of {attention.IMPLEMENTATIONS}")
        if context_parallel not in attention.CONTEXT_PARALLEL:
            raise ValueError(f"context_parallel must be one of {attention.CONTEXT_PARALLEL}")
        self.cfg, self.dtype, self.remat = cfg, dtype, remat
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d = cfg.width
        self.patch_embed = PatchEmbed(cfg, **kw)
        self.time_embedding = TimestepEmbedding(d, cfg.time_embed_dim, **kw)
        if cfg.ofs_embed_dim:
            self.ofs_embedding = TimestepEmbedding(cfg.ofs_embed_dim, cfg.ofs_embed_dim, **kw)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs):
            return Block(
                d,
                cfg.num_heads,
                cfg.head_dim,
                cfg.time_embed_dim,
                cfg.norm_eps,
                attention_impl=attention_impl,
                context_parallel=context_parallel,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )

        self.transformer_blocks = make_blocks(rngs)
        sharding.add_layer_axis(self.transformer_blocks)
        self.norm_final = LayerNorm(d, cfg.norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.norm_out = _OutputNorm(cfg.time_embed_dim, d, cfg.norm_eps, **kw)
        out = (cfg.patch_size_t or 1) * cfg.patch_size**2 * cfg.out_channels
        self.proj_out = Linear(d, out, ("embed", None), zero_init=True, **kw)

    def __call__(
        self,
        latents: jax.Array,
        text_embeds: jax.Array,
        timesteps: jax.Array,
        *,
        ofs: jax.Array | float | None = None,
        reference: bool = False,
    ) -> jax.Array:
        """The v-prediction of one clip per row.

        Args:
          latents: (B, T, H, W, in_channels) noisy latents; image-to-video models take the image
            latents after them on the channel axis. With patch_size_t (1.5), T is a multiple of
            it (the pipelines pad at the front).
          text_embeds: (B, S, text_embed_dim) T5 states; S = max_text_len for the models with an
            absolute position table (2B, 5B-I2V).
          timesteps: (B,) or a scalar, integer or float.
          ofs: the 1.5-I2V ofs scalar (the pipelines pass 2.0); required when the model has an
            ofs embedding.
          reference: the rows are [sampled; reference], two halves of the batch, and each
            sampled row's attention also takes the keys and values of its reference row (the
            reference attention of diffusers' community CogVideoX DDIM-inversion script;
            `Pipeline(reference_latents=...)`). The reference rows run as they would alone.

        Returns:
          (B, T, H, W, out_channels) in the compute dtype.
        """
        cfg = self.cfg
        b, t, h, w, _ = latents.shape
        self._check_inputs(latents, text_embeds, ofs)
        if reference and b % 2:
            raise ValueError(f"reference attention needs [sampled; reference] rows, got {b}")
        s = text_embeds.shape[1]
        temb = self._time_embedding(jnp.broadcast_to(jnp.asarray(timesteps), (b,)), ofs)

        hh = self.patch_embed(self._patchify(latents), text_embeds)  # (B, S + L, D)
        grid = (
            (t + (cfg.patch_size_t or 1) - 1) // (cfg.patch_size_t or 1),
            h // cfg.patch_size,
            w // cfg.patch_size,
        )
        pos = self._absolute_posemb(*grid)
        if pos is not None:
            hh = hh + pos
        n = hh.shape[1]
        # Context parallelism splits the tokens evenly: append padding tokens (identity RoPE,
        # video modulation) that attention hides as keys, and drop them after the blocks.
        pad = -n % sharding.num_shards("length")
        hh = jnp.pad(hh, ((0, 0), (0, pad), (0, 0)))  # (B, S + L + pad, D)
        cos, sin = self._rope_tables(*grid, text_len=s, pad=pad)
        is_text = np.arange(n + pad) < s
        hh = sharding.constrain(hh, ("batch", "length", "act_embed"))

        hh = self._run_blocks(hh, temb, cos, sin, is_text, n if pad else None, reference=reference)

        _, x = split(hh[:, :n], s)
        x = self.norm_out(self.norm_final(x), temb)
        return self._unpatchify(self.proj_out(x), t, h, w)

    def packed(
        self,
        video: jax.Array,
        text: jax.Array,
        timesteps: jax.Array,
        segments: dict[str, jax.Array],
        *,
        ofs: jax.Array | float | None = None,
    ) -> jax.Array:
        """Rows packed with several clips (NaViT-style, arXiv 2307.06304), each clip computed as
        if it ran alone: its own timestep, positions and attention block.

        Args:
          video: (B, V, P) patch tokens (`patchify` of each clip's latents; 1.5: frames padded at
            the front to an even count), zeros on padding.
          text: (B, Tt, text_embed_dim), each clip's text rows one clip after another.
          timesteps: (B, G) one per segment (entries of unused segments are ignored).
          segments: video_segment_ids (B, V) and text_segment_ids (B, Tt) int32 (1..G, 0 on
            padding), video_positions (B, V, 3) int32 (t, h, w) in the clip's token grid and
            grids (B, G, 3) int32 (each segment's token grid).
          ofs: the 1.5-I2V ofs scalar, the same for every clip.

        Returns:
          (B, V, patch features of out_channels) in the compute dtype: each video token's
          prediction before `unpatchify`; arbitrary on padding.
        """
        cfg = self.cfg
        self._check_packed(video, text, timesteps, segments, ofs)
        b, v, _ = video.shape
        tt, g = text.shape[1], timesteps.shape[1]
        video_ids = jnp.asarray(segments["video_segment_ids"], jnp.int32)
        text_ids = jnp.asarray(segments["text_segment_ids"], jnp.int32)
        positions = jnp.asarray(segments["video_positions"], jnp.int32)
        grids = jnp.asarray(segments["grids"], jnp.int32)
        temb = self._time_embedding(jnp.asarray(timesteps).reshape(b * g), ofs)
        temb = temb.reshape(b, g, -1)  # (B, G, E)

        hh = self.patch_embed(video, text)  # (B, Tt + V, D)
        real = (video_ids > 0)[..., None]  # (B, V, 1)
        if not cfg.rope:
            pos = posemb.sincos_3d_tokens(
                cfg.width,
                positions,
                cfg.spatial_interpolation_scale,
                cfg.temporal_interpolation_scale,
            )  # (B, V, D)
            pos = jnp.where(real, pos, 0.0).astype(self.dtype)
            hh = hh + jnp.pad(pos, ((0, 0), (tt, 0), (0, 0)))  # zero text rows
        n = tt + v
        pad = -n % sharding.num_shards("length")  # padding: its own segment, id 0
        hh = jnp.pad(hh, ((0, 0), (0, pad), (0, 0)))  # (B, Tt + V + pad, D)
        ids = jnp.pad(jnp.concatenate([text_ids, video_ids], axis=1), ((0, 0), (0, pad)))
        cos, sin = packed_rope_tables(cfg, positions, grids, video_ids)  # (B, V, K)
        cos = jnp.pad(cos, ((0, 0), (tt, pad), (0, 0)), constant_values=1.0)  # (B, N + pad, K)
        sin = jnp.pad(sin, ((0, 0), (tt, pad), (0, 0)))
        is_text = np.arange(n + pad) < tt
        hh = sharding.constrain(hh, ("batch", "length", "act_embed"))

        hh = self._run_blocks(hh, temb, cos, sin, is_text, None, ids)

        x = self.norm_out(self.norm_final(hh[:, tt:n]), temb, video_ids)  # (B, V, D)
        return self.proj_out(x)

    def _check_packed(self, video, text, timesteps, segments, ofs):
        cfg = self.cfg
        if cfg.learned_posemb:
            raise ValueError(
                "the learned position table (5B-I2V) covers only the sample grid, one clip a "
                "row: this model cannot run packed rows"
            )
        if video.ndim != 3 or video.shape[-1] != cfg.patch_features:
            raise ValueError(f"video must be (B, V, {cfg.patch_features}), got {video.shape}")
        b, v, _ = video.shape
        if text.ndim != 3 or text.shape[0] != b or text.shape[2] != cfg.text_embed_dim:
            raise ValueError(f"text must be ({b}, Tt, {cfg.text_embed_dim}), got {text.shape}")
        g = timesteps.shape[1] if timesteps.ndim == 2 else None
        want = {
            "video_segment_ids": (b, v),
            "video_positions": (b, v, 3),
            "text_segment_ids": (b, text.shape[1]),
            "grids": (b, g, 3),
        }
        if g is None or timesteps.shape[0] != b:
            raise ValueError(f"timesteps must be ({b}, G), one per segment, got {timesteps.shape}")
        for key, shape in want.items():
            if key not in segments or tuple(segments[key].shape) != shape:
                got = segments[key].shape if key in segments else "missing"
                raise ValueError(f"segments[{key!r}] must be {shape}, got {got}")
        if cfg.ofs_embed_dim and ofs is None:
            raise ValueError("this model has an ofs embedding: pass ofs (the pipelines use 2.0)")

    def _time_embedding(self, timesteps, ofs):
        """(M,) timesteps (and ofs, broadcast) -> temb (M, E)."""
        cfg, m = self.cfg, timesteps.shape[0]
        temb = self.time_embedding(
            posemb.timestep_sinusoid(timesteps, cfg.width).astype(self.dtype)
        )
        if cfg.ofs_embed_dim:
            ofs = jnp.broadcast_to(jnp.asarray(ofs, jnp.float32).reshape(-1), (m,))
            temb = temb + self.ofs_embedding(
                posemb.timestep_sinusoid(ofs, cfg.ofs_embed_dim).astype(self.dtype)
            )
        return temb

    def _check_inputs(self, latents, text_embeds, ofs):
        cfg = self.cfg
        if latents.ndim != 5 or latents.shape[-1] != cfg.in_channels:
            raise ValueError(
                f"latents must be (B, T, H, W, {cfg.in_channels}), got {latents.shape}"
            )
        b, t, h, w, _ = latents.shape
        if h % cfg.patch_size or w % cfg.patch_size:
            raise ValueError(
                f"latent height/width {h}x{w} must be multiples of patch_size {cfg.patch_size}"
            )
        if cfg.patch_size_t and t % cfg.patch_size_t:
            raise ValueError(
                f"{t} latent frames: must be a multiple of patch_size_t={cfg.patch_size_t} "
                "(pad the latents at the front, as the CogVideoX 1.5 pipelines do)"
            )
        if (
            text_embeds.ndim != 3
            or text_embeds.shape[0] != b
            or text_embeds.shape[2] != cfg.text_embed_dim
        ):
            raise ValueError(
                f"text_embeds must be ({b}, S, {cfg.text_embed_dim}), got {text_embeds.shape}"
            )
        if (not cfg.rope or cfg.learned_posemb) and text_embeds.shape[1] != cfg.max_text_len:
            raise ValueError(
                f"this model adds an absolute position table: text length must be "
                f"{cfg.max_text_len}, got {text_embeds.shape[1]}"
            )
        if cfg.learned_posemb and (h, w) != (cfg.sample_height, cfg.sample_width):
            raise ValueError(
                f"the learned position table only covers {cfg.sample_height}x{cfg.sample_width} "
                f"latents, got {h}x{w}"
            )
        if cfg.ofs_embed_dim and ofs is None:
            raise ValueError("this model has an ofs embedding: pass ofs (the pipelines use 2.0)")

    def _patchify(self, latents):
        """(B, T, H, W, C) -> (B, L, [pt,] p, p, C) flattened; tokens in (t, h, w) order."""
        return patchify(latents, self.cfg.patch_size, self.cfg.patch_size_t or 1)

    def _unpatchify(self, x, t, h, w):
        """(B, L, [pt,] p, p, C_out) flattened -> (B, T, H, W, C_out)."""
        cfg = self.cfg
        return unpatchify(x, t, h, w, cfg.patch_size, cfg.patch_size_t or 1, cfg.out_channels)

    def _absolute_posemb(self, t, h, w):
        """The (S + L, D) table added to [text; video] embeddings, or None (RoPE-only models)."""
        cfg = self.cfg
        if cfg.rope and not cfg.learned_posemb:
            return None
        if cfg.learned_posemb and (t, h, w) == _sample_grid(cfg):
            return self.patch_embed.pos_embedding[...][0].astype(self.dtype)
        # Other sizes (and 5B-I2V at other frame counts) use the fixed table, as diffusers does;
        # rounded once from float64 to the compute dtype, like torch's `.to(embeds.dtype)`.
        return jnp.asarray(_sincos_table(cfg, t, h, w).astype(self.dtype))

    def _rope_tables(self, t, h, w, *, text_len, pad=0):
        """(S + L + pad, K) cos/sin float32 tables; text and padding rows are the identity."""
        cfg = self.cfg
        k = cfg.head_dim
        if not cfg.rope:
            cos, sin = np.ones((t * h * w, k), np.float32), np.zeros((t * h * w, k), np.float32)
        elif cfg.patch_size_t is None:
            base_h, base_w = cfg.sample_height // cfg.patch_size, cfg.sample_width // cfg.patch_size
            cos, sin = posemb.rope_3d(k, *posemb.rope_grid_linspace(t, h, w, base_h, base_w))
        else:
            max_h, max_w = cfg.sample_height // cfg.patch_size, cfg.sample_width // cfg.patch_size
            cos, sin = posemb.rope_3d(k, *posemb.rope_grid_arange(t, h, w, max_h, max_w))
        cos = np.concatenate(
            [np.ones((text_len, k), np.float32), cos, np.ones((pad, k), np.float32)]
        )
        sin = np.concatenate(
            [np.zeros((text_len, k), np.float32), sin, np.zeros((pad, k), np.float32)]
        )
        return jnp.asarray(cos), jnp.asarray(sin)

    def _run_blocks(self, h, temb, cos, sin, is_text, kv_valid, segment_ids=None, reference=False):
        blocks = self.transformer_blocks
        mods = tuple(_modulations(n.linear, temb, self.dtype) for n in (blocks.norm1, blocks.norm2))

        def body(h, block, mods):
            return block(h, temb, cos, sin, is_text, kv_valid, segment_ids, mods, reference)

        policy = REMAT_POLICIES[self.remat]
        if self.remat != "none":
            body = nnx.remat(body, policy=policy, prevent_cse=False)

        @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=nnx.Carry)
        def run(h, block, mods):
            return body(h, block, mods)

        return run(h, blocks, mods)


def _modulations(linear: Linear, temb: jax.Array, dtype) -> jax.Array:
    """Every layer's adaLN modulation, linear(silu(temb)) for the stacked (layers, E, 6D) `linear`:
    (layers, B, 6D), or (layers, B, G, 6D) for packed rows' temb (B, G, E). One batched product
    before the layer scan: inside it, XLA:CPU first copies each layer's (E, 6D) kernel out of
    the stack for a product with only B rows, and those copies were a visible part of a sampling
    step (BENCHMARKS.md, "Measurements formerly in docstrings")."""
    kernel = linear.kernel[...].astype(dtype)
    x = jax.nn.silu(temb).astype(dtype)
    y = jnp.einsum("l...e,led->l...d", jnp.broadcast_to(x, kernel.shape[:1] + x.shape), kernel)
    bias = linear.bias[...].astype(dtype)  # (layers, 6D)
    y = y + bias.reshape(bias.shape[:1] + (1,) * (y.ndim - 2) + bias.shape[1:])
    # Sharded like the kernel's output axis, so that each device multiplies its own shard of the
    # stacked kernels (otherwise the partitioner may gather all layers' kernels at once).
    return sharding.constrain(y, ("layers",) + (None,) * (y.ndim - 2) + ("embed",))


def packed_rope_tables(
    cfg: TransformerConfig, positions: jax.Array, grids: jax.Array, video_ids: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Each video token's RoPE cos/sin (B, V, K) float32 from positions (B, V, 3) and its clip's
    grid (grids (B, G, 3) picked by video_ids (B, V)): the coordinates `Transformer._rope_tables`
    gives the clip alone; identity on padding and without RoPE."""
    b, v, _ = positions.shape
    k = cfg.head_dim
    if not cfg.rope:
        return jnp.ones((b, v, k), jnp.float32), jnp.zeros((b, v, k), jnp.float32)
    seg = jnp.maximum(video_ids - 1, 0)[..., None]  # (B, V, 1)
    grid = jnp.take_along_axis(grids, seg, axis=1)  # (B, V, 3): the token's clip grid
    base_h, base_w = cfg.sample_height // cfg.patch_size, cfg.sample_width // cfg.patch_size
    if cfg.patch_size_t is None:
        region = jnp.stack(
            posemb.crop_region_tokens(grids[..., 1], grids[..., 2], base_w, base_h), -1
        )  # (B, G, 4), per clip
        region = jnp.take_along_axis(region, seg, axis=1)  # (B, V, 4)
        coords = posemb.rope_positions_linspace(positions, grid, region)
    else:  # 1.5: plain aranges (grids beyond the table size are not checked here)
        coords = jnp.unstack(positions.astype(jnp.float32), axis=-1)
    cos, sin = posemb.rope_3d_tokens(k, *coords)  # (B, V, K)
    real = (video_ids > 0)[..., None]
    return jnp.where(real, cos, 1.0), jnp.where(real, sin, 0.0)


class _OutputNorm(nnx.Module):
    """diffusers' AdaLayerNorm(chunk_dim=1): LN(x) * (1 + scale) + shift, shift chunk first."""

    def __init__(self, time_embed_dim, dim, eps, *, dtype, param_dtype, rngs):
        self.linear = Linear(
            time_embed_dim,
            2 * dim,
            (None, "embed"),
            zero_init=True,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.norm = LayerNorm(dim, eps, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x, temb, segment_ids=None):
        """x (B, L, D), temb (B, E); or per segment (B, G, E) with segment_ids (B, L)."""
        mod = self.linear(jax.nn.silu(temb))  # (B, 2D) or (B, G, 2D)
        if segment_ids is None:
            mod = mod[:, None, :]  # (B, 1, 2D)
        else:
            seg = jnp.maximum(segment_ids - 1, 0)[..., None]
            mod = jnp.take_along_axis(mod, seg, axis=1)  # (B, L, 2D)
        shift, scale = jnp.split(mod, 2, axis=-1)
        return self.norm(x) * (1 + scale) + shift
