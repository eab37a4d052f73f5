"""Analytic FLOPs of the CogVideoX transformer (model FLOPs, for MFU and tools.aot).

Counted: every matmul, as 2 * (input features) * (output features) per row it is applied to.
  - per token of the joint sequence, in each of the num_layers blocks: q, k, v, out projections
    (4 D^2) and the feed-forward (2 * 4 D^2): 24 D^2 FLOPs;
  - attention, full and non-causal over S + L tokens: Q K^T and A V, 2 * (S + L)^2 * D each, so
    4 (S + L)^2 D per block (no causal halving; maxdiffusion's `calculate_tflops` counts the same);
  - the patch embedding (video tokens), text projection (text tokens) and output projection
    (video tokens);
  - the per-sample matmuls of the time (and ofs) embedding and of the 2 adaptive LayerNorms per
    block plus the output norm (negligible, counted for completeness).
Not counted: LayerNorms, RoPE, GELU, softmax, residual adds and gates (elementwise, a few percent
at most), and remat recomputation. Training is 3 x forward (the backward pass has two matmuls
per forward matmul), the convention of MaxText and maxdiffusion. With LoRA the base weights are
frozen: their matmuls need no weight gradient (2 x forward: the input gradient is counted
everywhere, although the first block's input and the embeddings need none), while attention (no
weights) and the adapters (2 * rank * (in + out) per token each) stay at 3 x.
"""

from __future__ import annotations

from cogvideox_jax.transformer import TransformerConfig


def transformer_flops(cfg: TransformerConfig, text_len: int, video_tokens: int) -> int:
    """Forward FLOPs for one sample of `text_len` text and `video_tokens` video tokens."""
    d, e, n = cfg.width, cfg.time_embed_dim, text_len + video_tokens
    per_token_block = 2 * (4 * d * d + 2 * d * 4 * d)
    attention = 4 * n * n * d
    adaln = 2 * 2 * e * 6 * d  # norm1 and norm2 linears, once per sample
    blocks = cfg.num_layers * (n * per_token_block + attention + adaln)
    patch_out = (cfg.patch_size_t or 1) * cfg.patch_size**2 * cfg.out_channels
    embed = 2 * video_tokens * cfg.patch_features * d + 2 * text_len * cfg.text_embed_dim * d
    head = 2 * video_tokens * d * patch_out + 2 * e * 2 * d  # proj_out, norm_out's linear
    time = 2 * (d * e + e * e)
    if cfg.ofs_embed_dim:
        time += 2 * 2 * cfg.ofs_embed_dim**2
    return blocks + embed + head + time


# Input and output widths of the LoRA targets (cogvideox_jax.lora), in units of the model width.
_LORA_DIMS = {
    "to_q": (1, 1),
    "to_k": (1, 1),
    "to_v": (1, 1),
    "to_out.0": (1, 1),
    "ff.net.0.proj": (1, 4),
    "ff.net.2": (4, 1),
}


def train_flops(cfg: TransformerConfig, text_len: int, video_tokens: int, lora=None) -> int:
    """Model FLOPs of one training sample: 3 x forward (remat recomputation not counted); with
    `lora` (a `cogvideox_jax.lora.LoraConfig`) the frozen weights' matmuls count 2 x forward."""
    forward = transformer_flops(cfg, text_len, video_tokens)
    if lora is None:
        return 3 * forward
    d, n = cfg.width, text_len + video_tokens
    attention = cfg.num_layers * 4 * n * n * d
    per_token = sum(2 * lora.rank * (i + o) * d for i, o in map(_LORA_DIMS.get, lora.targets))
    adapters = cfg.num_layers * n * per_token
    return 2 * (forward - attention) + 3 * attention + 3 * adapters
