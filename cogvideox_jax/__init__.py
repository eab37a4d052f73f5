"""CogVideoX in JAX/Flax NNX: models, conversion to and from diffusers, loading."""

from cogvideox_jax.convert import load_transformer, save_transformer
from cogvideox_jax.transformer import VARIANTS, Transformer, TransformerConfig, transformer_config

__all__ = [
    "VARIANTS",
    "Transformer",
    "TransformerConfig",
    "load_transformer",
    "save_transformer",
    "transformer_config",
]
