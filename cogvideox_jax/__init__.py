"""CogVideoX in JAX/Flax NNX: models, conversion to and from diffusers, loading."""

from cogvideox_jax.convert import convert, load_transformer
from cogvideox_jax.transformer import VARIANTS, Transformer, TransformerConfig, transformer_config

__all__ = [
    "VARIANTS",
    "Transformer",
    "TransformerConfig",
    "convert",
    "load_transformer",
    "transformer_config",
]
