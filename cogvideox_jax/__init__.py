"""CogVideoX in JAX/Flax NNX."""
