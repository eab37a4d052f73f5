"""The T5 v1.1 encoder (CogVideoX's text encoder, T5-XXL) in Flax NNX, plus tokenization.

Must match transformers 5.23 `models/t5/modeling_t5.py` (`T5EncoderModel`) for v1.1 configs:
pre-norm blocks with RMS norm (no mean, no bias), unscaled attention logits plus a learned
relative-position bias that only the first layer owns and every layer reuses, a gated-GELU
feed-forward (original T5's "relu" and the other `feed_forward_proj` values are supported
too), no biases anywhere, and a final norm. Dropout is not implemented (inference and fine-tuning
of the text encoder run without it here).

Parameter names follow transformers' module tree so that conversion is a renaming plus a
transpose: `encoder.block.{i}.layer.0.SelfAttention.q.weight` becomes
`encoder/block/layer/0/SelfAttention/q/kernel` with the layers stacked on a leading axis. The
relative-position table lives in layer 0 in transformers; here it sits outside the stacked blocks
(`encoder/relative_attention_bias`) so that every stacked layer has the same parameters.

Shape letters: B batch, L query tokens, M key tokens, D model width, N heads, K head dim,
F feed-forward hidden, V vocabulary, R relative-position buckets.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from cogvideox_jax import sharding
from cogvideox_jax.layers import REMAT_POLICIES


def _gelu_exact(x):
    return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


# transformers' `ACT2FN` names (transformers/activations.py) that are a parameter-free function
# we can write in jax with the same formula. "prelu" and "xielu" own learned parameters and are
# left out. gelu_fast rounds sqrt(2/pi) to 10 digits, a difference float32 cannot hold.
ACTIVATIONS = {
    "gelu": _gelu_exact,
    "gelu_python": _gelu_exact,
    "gelu_10": lambda x: jnp.clip(_gelu_exact(x), -10.0, 10.0),
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_python_tanh": _gelu_tanh,
    "gelu_accurate": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),
    "relu6": jax.nn.relu6,
    "leaky_relu": lambda x: jax.nn.leaky_relu(x, negative_slope=0.01),  # torch's default slope
    "hardswish": jax.nn.hard_swish,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "linear": lambda x: x,
    "laplace": lambda x: 0.5 * (1.0 + jax.lax.erf((x - 0.707107) / (0.282095 * math.sqrt(2.0)))),
    "sqrtsoftplus": lambda x: jnp.sqrt(jax.nn.softplus(x)),
}


def parse_feed_forward_proj(value: str) -> tuple[bool, str]:
    """transformers' reading of `feed_forward_proj`: "ACT" or "gated-ACT" -> (is_gated_act,
    dense_act_fn), where "gated-gelu" alone means the tanh GELU ("gelu_new") for backward
    compatibility while "gelu" and "gated-gelu_python" are the exact erf GELU.

    Raises ValueError for a value transformers refuses or whose ACT is not in ACTIVATIONS.
    """
    gated, act = (True, value[len("gated-") :]) if value.startswith("gated-") else (False, value)
    if act not in ACTIVATIONS:
        raise ValueError(
            f"T5 config: feed_forward_proj={value!r} is not supported; supported: 'ACT' or "
            f"'gated-ACT' with ACT one of {sorted(ACTIVATIONS)}"
        )
    return gated, "gelu_new" if value == "gated-gelu" else act


@dataclasses.dataclass(frozen=True)
class T5Config:
    """A T5 encoder's architecture, in transformers' `T5Config` field names.

    `feed_forward_proj` is kept as transformers spells it (so it is written back unchanged);
    `is_gated_act` and `dense_act_fn` read it as transformers does. Its default is T5 v1.1's
    "gated-gelu", not transformers' "relu": every VARIANT is a v1.1 encoder.
    """

    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"

    def __post_init__(self):
        parse_feed_forward_proj(self.feed_forward_proj)  # refuses what we cannot compute

    @property
    def is_gated_act(self) -> bool:
        """Whether the feed-forward is wo(act(wi_0 x) * wi_1 x) rather than wo(act(wi x))."""
        return parse_feed_forward_proj(self.feed_forward_proj)[0]

    @property
    def dense_act_fn(self) -> str:
        """The feed-forward's activation, a key of ACTIVATIONS (transformers' ACT2FN name)."""
        return parse_feed_forward_proj(self.feed_forward_proj)[1]

    @classmethod
    def from_transformers(cls, config: dict[str, Any]) -> T5Config:
        """Build from a transformers `T5Config` dict (a `text_encoder/config.json`).

        Missing keys take transformers' defaults, so a sparse config means what it means there.
        """
        # (key, transformers' default, the only value this encoder implements)
        fixed = (
            ("model_type", "t5", "t5"),
            ("is_decoder", False, False),
        )
        for key, default, want in fixed:
            got = config.get(key, default)
            if got != want:
                absent = "" if key in config else " (transformers' default: the key is absent)"
                raise ValueError(
                    f"T5 config: {key}={got!r}{absent} is not supported, only {want!r}"
                )
        c = config
        return cls(
            vocab_size=c.get("vocab_size", 32128),
            d_model=c.get("d_model", 512),
            d_kv=c.get("d_kv", 64),
            d_ff=c.get("d_ff", 2048),
            num_layers=c.get("num_layers", 6),
            num_heads=c.get("num_heads", 8),
            relative_attention_num_buckets=c.get("relative_attention_num_buckets", 32),
            relative_attention_max_distance=c.get("relative_attention_max_distance", 128),
            layer_norm_epsilon=c.get("layer_norm_epsilon", 1e-6),
            feed_forward_proj=c.get("feed_forward_proj", "relu"),
        )

    def to_transformers(self) -> dict[str, Any]:
        """The equivalent transformers `T5Config` dict for a `T5EncoderModel`."""
        return {
            "architectures": ["T5EncoderModel"],
            "model_type": "t5",
            "d_ff": self.d_ff,
            "d_kv": self.d_kv,
            "d_model": self.d_model,
            "dropout_rate": 0.0,
            "feed_forward_proj": self.feed_forward_proj,
            "is_encoder_decoder": False,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "num_heads": self.num_heads,
            "num_layers": self.num_layers,
            "relative_attention_max_distance": self.relative_attention_max_distance,
            "relative_attention_num_buckets": self.relative_attention_num_buckets,
            "vocab_size": self.vocab_size,
        }


VARIANTS: dict[str, dict[str, Any]] = {
    # Source: text_encoder/config.json of the CogVideoX checkpoints (google/t5-v1_1-xxl);
    # checked by tests/test_t5.py against transformers' parameter count for this config.
    "t5-v1_1-xxl": dict(
        vocab_size=32128,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        layer_norm_epsilon=1e-6,
    ),
}


def t5_config(variant: str, **overrides) -> T5Config:
    """The T5Config of a key of VARIANTS, fields replaced by `overrides`."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown T5 variant {variant!r}; known: {sorted(VARIANTS)}")
    return T5Config(**{**VARIANTS[variant], **overrides})


def relative_position_buckets(
    q_len: int, k_len: int, num_buckets: int, max_distance: int
) -> np.ndarray:
    """(L, M) int32 bucket of each key offset from each query, bidirectional (encoder).

    Half the buckets hold keys after the query. Within each half, the first half of the buckets
    are exact offsets and the rest grow logarithmically up to `max_distance` (everything further
    shares the last bucket). The logarithm runs in float32 in transformers' operation order,
    because truncating it to an integer makes the buckets sensitive to the last bit.
    """
    rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]  # (L, M) key minus query
    half = num_buckets // 2
    max_exact = half // 2
    dist = np.abs(rel)
    # The log branch is only used where dist >= max_exact; clamping keeps log(0) out of it.
    far = np.maximum(dist, max_exact).astype(np.float32)
    log_ratio = np.log(far / np.float32(max_exact)) / np.float32(math.log(max_distance / max_exact))
    far_bucket = max_exact + (log_ratio * np.float32(half - max_exact)).astype(np.int64)
    far_bucket = np.minimum(far_bucket, half - 1)
    bucket = np.where(rel > 0, half, 0) + np.where(dist < max_exact, dist, far_bucket)
    return bucket.astype(np.int32)


class RMSNorm(nnx.Module):
    """transformers' T5LayerNorm: x / rms(x) * scale, statistics and scale in float32."""

    def __init__(self, dim, eps, *, dtype, param_dtype):
        self.scale = sharding.param(jnp.ones((dim,), param_dtype), (None,))
        self.eps, self.dtype = eps, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
        return y.astype(self.dtype)


class Embed(nnx.Module):
    """A lookup table (transformers' nn.Embedding; `weight` there, `embedding` here)."""

    def __init__(self, num, dim, names, *, stddev, param_dtype, rngs):
        table = stddev * jax.random.normal(rngs.params(), (num, dim), param_dtype)
        self.embedding = sharding.param(table, names)

    def __call__(self, ids) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0)


class Einsum(nnx.Module):
    """A bias-free projection `einsum(spec, x, kernel)` with a head-split kernel where useful.

    Initialised like transformers' T5 (normal, `stddev` given per weight) rather than by fan-in:
    T5's query init carries the 1/sqrt(K) logit scale that its attention leaves out.
    """

    def __init__(self, spec, shape, names, *, stddev, dtype, param_dtype, rngs):
        kernel = stddev * jax.random.normal(rngs.params(), shape, param_dtype)
        self.kernel = sharding.param(kernel, names)
        self.spec, self.dtype = spec, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.einsum(self.spec, x.astype(self.dtype), self.kernel[...].astype(self.dtype))


class Attention(nnx.Module):
    """T5Attention for self-attention: no 1/sqrt(K) scale, an additive (N, L, M) position bias.

    Written out here rather than through `attention.dot_product_attention`, whose contract is the
    scaled, bias-free attention of the video transformer.
    """

    def __init__(self, dim, num_heads, head_dim, *, dtype, param_dtype, rngs):
        def proj(std):
            return Einsum(
                "BLD,DNK->BLNK",
                (dim, num_heads, head_dim),
                ("embed", "heads", "kv"),
                stddev=std,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )

        self.q = proj((dim * head_dim) ** -0.5)
        self.k = proj(dim**-0.5)
        self.v = proj(dim**-0.5)
        self.o = Einsum(
            "BLNK,NKD->BLD",
            (num_heads, head_dim, dim),
            ("heads", "kv", "embed"),
            stddev=(num_heads * head_dim) ** -0.5,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.dtype = dtype

    def __call__(self, h: jax.Array, bias: jax.Array) -> jax.Array:
        """h (B, L, D); bias (1 or B, N, L, L) float32 -> (B, L, D)."""
        names = ("batch", "length", "act_heads", None)
        q = sharding.constrain(self.q(h), names)  # (B, L, N, K)
        k = sharding.constrain(self.k(h), names)
        v = sharding.constrain(self.v(h), names)
        logits = jnp.einsum("BLNK,BMNK->BNLM", q, k, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(logits + bias, axis=-1).astype(self.dtype)
        o = jnp.einsum("BNLM,BMNK->BLNK", probs, v)  # (B, L, N, K)
        o = checkpoint_name(o, "attn_out")
        return self.o(o)


class FeedForward(nnx.Module):
    """transformers' T5DenseActDense: wo(act(wi x)), original T5's "relu" and other ungated ACTs."""

    def __init__(self, dim, hidden, act, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.wi = Einsum("BLD,DF->BLF", (dim, hidden), ("embed", "mlp"), stddev=dim**-0.5, **kw)
        self.wo = Einsum("BLF,FD->BLD", (hidden, dim), ("mlp", "embed"), stddev=hidden**-0.5, **kw)
        self.act = act  # a key of ACTIVATIONS

    def __call__(self, h: jax.Array) -> jax.Array:
        a = ACTIVATIONS[self.act](self.wi(h))
        return self.wo(sharding.constrain(a, ("batch", "length", "act_mlp")))


class GatedFeedForward(nnx.Module):
    """transformers' T5DenseGatedActDense: wo(act(wi_0 x) * wi_1 x); v1.1's act is "gelu_new"
    (tanh GELU)."""

    def __init__(self, dim, hidden, act, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.wi_0 = Einsum("BLD,DF->BLF", (dim, hidden), ("embed", "mlp"), stddev=dim**-0.5, **kw)
        self.wi_1 = Einsum("BLD,DF->BLF", (dim, hidden), ("embed", "mlp"), stddev=dim**-0.5, **kw)
        self.wo = Einsum("BLF,FD->BLD", (hidden, dim), ("mlp", "embed"), stddev=hidden**-0.5, **kw)
        self.act = act  # a key of ACTIVATIONS

    def __call__(self, h: jax.Array) -> jax.Array:
        a = ACTIVATIONS[self.act](self.wi_0(h)) * self.wi_1(h)
        return self.wo(sharding.constrain(a, ("batch", "length", "act_mlp")))


class SelfAttentionLayer(nnx.Module):
    """transformers' T5LayerSelfAttention: h + attention(norm(h))."""

    def __init__(self, dim, num_heads, head_dim, eps, *, dtype, param_dtype, rngs):
        self.SelfAttention = Attention(
            dim, num_heads, head_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.layer_norm = RMSNorm(dim, eps, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, h, bias):
        return h + self.SelfAttention(self.layer_norm(h), bias)


class FeedForwardLayer(nnx.Module):
    """transformers' T5LayerFF: h + feed_forward(norm(h)), gated or not as `feed_forward_proj`
    says (the module keeps transformers' name `DenseReluDense` whatever its activation)."""

    def __init__(self, dim, hidden, eps, feed_forward_proj, *, dtype, param_dtype, rngs):
        gated, act = parse_feed_forward_proj(feed_forward_proj)
        ff = GatedFeedForward if gated else FeedForward
        self.DenseReluDense = ff(dim, hidden, act, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm = RMSNorm(dim, eps, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, h):
        return h + self.DenseReluDense(self.layer_norm(h))


class Block(nnx.Module):
    """transformers' T5Block (encoder): `layer` holds [self-attention, feed-forward], as there."""

    def __init__(
        self, dim, num_heads, head_dim, hidden, eps, feed_forward_proj, *, dtype, param_dtype, rngs
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer = nnx.List(
            [
                SelfAttentionLayer(dim, num_heads, head_dim, eps, **kw),
                FeedForwardLayer(dim, hidden, eps, feed_forward_proj, **kw),
            ]
        )

    def __call__(self, h, bias):
        h = self.layer[1](self.layer[0](h, bias))
        return sharding.constrain(h, ("batch", "length", "act_embed"))


class Stack(nnx.Module):
    """transformers' T5Stack (encoder) without its token embedding: blocks and a final norm."""

    def __init__(
        self,
        num_layers,
        dim,
        num_heads,
        head_dim,
        hidden,
        num_buckets,
        max_distance,
        eps,
        feed_forward_proj,
        *,
        remat,
        dtype,
        param_dtype,
        rngs,
    ):
        self.relative_attention_bias = Embed(
            num_buckets,
            num_heads,
            (None, "heads"),
            stddev=dim**-0.5,
            param_dtype=param_dtype,
            rngs=rngs,
        )

        @nnx.split_rngs(splits=num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs):
            return Block(
                dim,
                num_heads,
                head_dim,
                hidden,
                eps,
                feed_forward_proj,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )

        self.block = make_blocks(rngs)
        sharding.add_layer_axis(self.block)
        self.final_layer_norm = RMSNorm(dim, eps, dtype=dtype, param_dtype=param_dtype)
        self.num_buckets, self.max_distance, self.remat = num_buckets, max_distance, remat

    def position_bias(self, length: int) -> jax.Array:
        """(1, N, L, L) float32, computed once and shared by all layers as transformers does."""
        buckets = relative_position_buckets(length, length, self.num_buckets, self.max_distance)
        table = self.relative_attention_bias.embedding[...].astype(jnp.float32)  # (R, N)
        bias = jnp.take(table, buckets, axis=0)  # (L, L, N)
        return bias.transpose(2, 0, 1)[None]  # (1, N, L, L)

    def __call__(self, h: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
        """h (B, L, D) embeddings; attention_mask (B, L), nonzero = attend."""
        bias = self.position_bias(h.shape[1])
        if attention_mask is not None:
            # Masked keys get the most negative float32, as transformers' padding mask does.
            keep = attention_mask.astype(bool)[:, None, None, :]  # (B, 1, 1, M)
            bias = jnp.where(keep, bias, jnp.finfo(jnp.float32).min)  # (B, N, L, M)

        def body(h, block):
            return block(h, bias)

        if self.remat != "none":
            body = nnx.remat(body, policy=REMAT_POLICIES[self.remat], prevent_cse=False)

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def run(h, block):
            return body(h, block)

        return self.final_layer_norm(run(h, self.block))


class T5Encoder(nnx.Module):
    """transformers' `T5EncoderModel`: token ids (B, L) -> last hidden state (B, L, d_model)."""

    def __init__(
        self,
        cfg: T5Config,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        remat: str = "none",
        rngs: nnx.Rngs,
    ):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {remat!r}")
        self.cfg, self.dtype = cfg, dtype
        self.shared = Embed(
            cfg.vocab_size,
            cfg.d_model,
            ("vocab", "embed"),
            stddev=1.0,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.encoder = Stack(
            cfg.num_layers,
            cfg.d_model,
            cfg.num_heads,
            cfg.d_kv,
            cfg.d_ff,
            cfg.relative_attention_num_buckets,
            cfg.relative_attention_max_distance,
            cfg.layer_norm_epsilon,
            feed_forward_proj=cfg.feed_forward_proj,
            remat=remat,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """input_ids (B, L) int -> last hidden state (B, L, D) in the compute dtype.

        attention_mask (B, L), nonzero = attend: keys where it is zero get no weight. CogVideoX
        passes none: its 226 tokens attend to the padding too.
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (B, L), got shape {input_ids.shape}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask {attention_mask.shape} must match input_ids {input_ids.shape}"
            )
        h = self.shared(input_ids).astype(self.dtype)  # (B, L, D)
        h = sharding.constrain(h, ("batch", "length", "act_embed"))
        return self.encoder(h, attention_mask)


def load_tokenizer(folder):
    """The tokenizer of a model folder's tokenizer/ (`spiece.model` or `tokenizer.json`), of the
    class its tokenizer_config.json names: T5Tokenizer for CogVideoX's, PreTrainedTokenizerFast
    for an exported demo run's word-level one; T5Tokenizer where no tokenizer_config.json says.

    transformers is imported here so that the model code above needs only jax.
    """
    from transformers import AutoTokenizer, T5Tokenizer

    if (Path(folder) / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(folder))
    return T5Tokenizer.from_pretrained(str(folder))


def tokenize(tokenizer, prompts: str | Sequence[str], max_length: int = 226) -> np.ndarray:
    """(B, max_length) int32 ids: eos appended, truncated, right-padded; the CogVideoX pipelines'
    call (diffusers' `_get_t5_prompt_embeds`)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_tensors="np",
    ).input_ids
    return np.asarray(ids, dtype=np.int32)
