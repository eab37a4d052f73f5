"""The one attention entry point of the library; kernel choice lives here and nowhere else.

Layout (B, L, N, K): batch, tokens, heads, head dim. Scale 1/sqrt(K), no mask: CogVideoX attends
over the whole [text; video] sequence, text padding included (diffusers' CogVideoXAttnProcessor2_0).
Logits and softmax run in float32 whatever the input dtype (jax.nn.dot_product_attention's XLA
path).
"""

from __future__ import annotations

import jax

IMPLEMENTATIONS = ("xla", "cudnn", "splash")  # splash: TPU only (cogvideox_jax.splash)


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str = "xla"
) -> jax.Array:
    """softmax(q k^T / sqrt(K)) v for (B, L, N, K) inputs."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    if impl == "splash":
        from cogvideox_jax import splash  # imports Pallas' TPU kernels only when asked for

        return splash.attention(q, k, v)
    return jax.nn.dot_product_attention(q, k, v, implementation=impl)
