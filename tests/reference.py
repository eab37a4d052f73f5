"""Tiny random diffusers models and reference forwards, shared by the parity tests.

Every parameter and persistent buffer is perturbed (LayerNorm weights and biases included), so a
mapping or formula mistake anywhere shows up in the outputs.
"""

from __future__ import annotations

import types

import numpy as np
import torch

_BASE = dict(
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=4,
    out_channels=4,
    num_layers=2,
    text_embed_dim=16,
    time_embed_dim=16,
    max_text_seq_length=7,
    patch_size=2,
)
_V10 = dict(sample_height=6, sample_width=8, sample_frames=9)  # 3 latent frames, 3x4 patches
_V15 = dict(patch_size_t=2, patch_bias=False, sample_height=20, sample_width=20, sample_frames=13)

# Tiny stand-ins with the structure of every released variant.
TINY_TRANSFORMERS = {
    "2b": dict(**_BASE, **_V10),
    "5b": dict(**_BASE, **_V10, use_rotary_positional_embeddings=True),
    "5b-i2v": dict(
        **{**_BASE, "in_channels": 8},
        **_V10,
        use_rotary_positional_embeddings=True,
        use_learned_positional_embeddings=True,
    ),
    "1.5-5b": dict(**_BASE, **_V15, use_rotary_positional_embeddings=True),
    "1.5-5b-i2v": dict(
        **{**_BASE, "in_channels": 8},
        **_V15,
        use_rotary_positional_embeddings=True,
        ofs_embed_dim=16,
    ),
}


# The scheduler config the CogVideoX checkpoints ship (DDIM and DPM read the same keys).
SCHEDULER_CONFIG = dict(
    beta_schedule="scaled_linear",
    prediction_type="v_prediction",
    rescale_betas_zero_snr=True,
    set_alpha_to_one=True,
    timestep_spacing="trailing",
    clip_sample=False,
)


def perturb_(module: torch.nn.Module, seed: int, scale: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # state_dict(): parameters and persistent buffers, i.e. everything a checkpoint holds.
        for t in module.state_dict().values():
            if t.is_floating_point():
                t.add_(scale * torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.dtype))


def diffusers_transformer(variant: str, seed: int = 0, **overrides):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    model = CogVideoXTransformer3DModel(**{**TINY_TRANSFORMERS[variant], **overrides}).eval()
    perturb_(model, seed)
    return model


def rotary_tables(model, latent_frames: int, latent_h: int, latent_w: int):
    """RoPE tables exactly as the diffusers pipelines build them (None without RoPE)."""
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import CogVideoXPipeline

    if not model.config.use_rotary_positional_embeddings:
        return None
    fake = types.SimpleNamespace(vae_scale_factor_spatial=8, transformer=model)
    return CogVideoXPipeline._prepare_rotary_positional_embeddings(
        fake, latent_h * 8, latent_w * 8, latent_frames, torch.device("cpu")
    )


def transformer_forward(model, latents, text, timesteps, ofs=None) -> np.ndarray:
    """diffusers forward on channels-last numpy inputs; channels-last float32 output."""
    with torch.no_grad():
        out = transformer_forward_torch(model, latents, text, timesteps, ofs)
    return out.float().numpy()


def transformer_forward_torch(model, latents, text, timesteps, ofs=None) -> torch.Tensor:
    """`transformer_forward` as a channels-last torch tensor, differentiable."""
    dtype = next(model.parameters()).dtype
    x = torch.from_numpy(np.asarray(latents, np.float32)).permute(0, 1, 4, 2, 3).to(dtype)
    b, f, _, h, w = x.shape
    out = model(
        hidden_states=x,
        encoder_hidden_states=torch.from_numpy(np.asarray(text, np.float32)).to(dtype),
        timestep=torch.from_numpy(np.asarray(timesteps)),
        ofs=None if ofs is None else torch.full((1,), float(ofs), dtype=dtype),
        image_rotary_emb=rotary_tables(model, f, h, w),
        return_dict=False,
    )[0]
    return out.permute(0, 1, 3, 4, 2)


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


PROMPTS = [
    "a red fox jumps over a sleeping dog in the snow",
    "the camera pans slowly across a misty forest at dawn",
    "a panda plays an acoustic guitar in a bamboo grove",
    "waves crash on the rocky shore under a purple evening sky",
]


def build_tokenizer(folder) -> None:
    """A tiny T5 tokenizer (SentencePiece unigram trained here: the real one is not on PyPI) saved
    with transformers' T5Tokenizer to `folder`, plus its `spiece.model` in folder's parent."""
    import sentencepiece as spm
    import transformers

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(PROMPTS * 10),
        model_prefix=str(folder.parent / "spiece"),
        vocab_size=60,
        hard_vocab_limit=False,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    # T5's layout: pad 0, eos 1, unk 2, then 100 sentinel tokens at the end of the vocabulary.
    transformers.T5Tokenizer.from_pretrained(folder.parent, extra_ids=100).save_pretrained(folder)


def tiny_model_folder(folder, *, text_len: int, scaling_factor: float) -> None:
    """A tiny random diffusers-layout model folder for the data tools: the tiny diffusers VAE,
    a transformers T5 encoder of width 16, a T5 tokenizer, and a transformer config.json that
    gives the text length."""
    import json
    from pathlib import Path

    import transformers
    from diffusers import AutoencoderKLCogVideoX

    from cogvideox_jax import t5, vae

    folder = Path(folder)
    torch.manual_seed(0)
    cfg = vae.vae_config("tiny", scaling_factor=scaling_factor)
    autoencoder = AutoencoderKLCogVideoX(**cfg.to_diffusers()).eval()
    perturb_(autoencoder, 1, scale=0.05)
    autoencoder.save_pretrained(folder / "vae")
    build_tokenizer(folder / "tokenizer")
    t5_cfg = t5.T5Config(vocab_size=200, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=4)
    encoder = transformers.T5EncoderModel(transformers.T5Config(**t5_cfg.to_transformers()))
    perturb_(encoder.eval(), 2, scale=0.1)
    encoder.save_pretrained(folder / "text_encoder")
    (folder / "transformer").mkdir()
    config = {"max_text_seq_length": text_len}
    (folder / "transformer" / "config.json").write_text(json.dumps(config))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "CogVideoXPipeline"}))


def perturbed_model(variant: str, scale: float = 0.2, **kwargs):
    """Our tiny `variant` transformer (TINY_TRANSFORMERS; `kwargs` go to cj.Transformer, with
    `overrides` for config keys), every parameter moved off its initialisation by `scale` N(0, 1)
    noise (key 1): zero-initialised projections and unit norms included."""
    import jax
    from flax import nnx

    import cogvideox_jax as cj

    overrides = kwargs.pop("overrides", {})
    cfg = cj.TransformerConfig.from_diffusers(TINY_TRANSFORMERS[variant] | overrides)
    model = cj.Transformer(cfg, rngs=nnx.Rngs(0), **kwargs)
    state = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(state))))
    nnx.update(
        model, jax.tree.map(lambda p: p + scale * jax.random.normal(next(keys), p.shape), state)
    )
    return model
