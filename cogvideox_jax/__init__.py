"""CogVideoX in JAX/Flax NNX: models, conversion to and from diffusers, loading."""

from cogvideox_jax.components import (
    load_text_encoder,
    load_transformer,
    load_vae,
    save_transformer,
)
from cogvideox_jax.pipeline import Pipeline
from cogvideox_jax.t5 import T5Config, T5Encoder
from cogvideox_jax.transformer import VARIANTS, Transformer, TransformerConfig, transformer_config
from cogvideox_jax.vae import AutoencoderKL, VaeConfig, num_latent_frames

__all__ = [
    "AutoencoderKL",
    "Pipeline",
    "VaeConfig",
    "load_vae",
    "num_latent_frames",
    "VARIANTS",
    "T5Config",
    "T5Encoder",
    "Transformer",
    "TransformerConfig",
    "load_text_encoder",
    "load_transformer",
    "save_transformer",
    "transformer_config",
]
