"""The library's per-backend XLA options reach the programs it compiles."""

import re

import jax
import jax.numpy as jnp
import numpy as np

from cogvideox_jax import compiler


def test_options_per_backend():
    assert compiler.options("cpu") == compiler.CPU_OPTIONS
    assert compiler.options("tpu") is None and compiler.options("gpu") is None
    topology_free = type("AbstractMesh", (), {})()  # no devices: the default backend's
    assert compiler.mesh_options(topology_free) == compiler.options()


def _ynn_fused_ops(hlo: str) -> set[str]:
    """The HLO opcodes inside the YNNPACK fusions of a compiled module's text."""
    called = set(re.findall(r"%ynn_fusion[.\d]* = .*calls=%([\w.]+)", hlo))
    ops = set()
    for name in called:
        body = re.search(r"%" + re.escape(name) + r" \(.*?\n\}", hlo, re.S).group(0)
        ops |= set(re.findall(r"= \S+ (\w[\w-]*)\(", body))
    return ops


def test_cpu_programs_leave_ynnpack_and_long_means_stay_accurate():
    """jax's default CPU compile hands matmuls and reductions to YNNPACK in this jaxlib; through
    `compiler.jit` neither is, with the same numbers. XLA's own sum of a long row drifts from
    float64's; `compiler.mean` of the same elements does not."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 128), dtype=np.float32)

    def matmul(x):
        return x @ x.T

    default = _ynn_fused_ops(jax.jit(matmul).lower(x).compile().as_text())
    assert "dot" in default, f"jax's default no longer fuses dots into YNNPACK: {default}"
    ours = compiler.jit(matmul)
    assert _ynn_fused_ops(ours.lower(x).compile().as_text()) == set()
    np.testing.assert_allclose(ours(x), x.astype(np.float64) @ x.T, rtol=1e-5, atol=1e-4)

    # The train-step benchmark's loss elements: (B, T, H, W, C) squared errors.
    y = np.square(rng.standard_normal((1, 13, 30, 44, 16), dtype=np.float32))
    want = y.astype(np.float64).mean()
    assert "reduce" in _ynn_fused_ops(jax.jit(jnp.mean).lower(y).compile().as_text())
    plain = compiler.jit(jnp.mean)
    assert _ynn_fused_ops(plain.lower(y).compile().as_text()) == set()
    drift = abs(float(plain(y)) - want) / want
    assert drift > 1e-6, f"XLA's CPU sum is accurate now ({drift:.1e}): compiler.mean may go"
    nested = compiler.jit(compiler.mean)
    assert abs(float(nested(y)) - want) / want < 5e-7  # 6e-8 measured

    # Axes, keepdims and negative axes as jnp.mean takes them.
    z = rng.standard_normal((2, 3, 4, 5), dtype=np.float32)
    for axis, keepdims in [(None, False), ((1, 3), True), ((-1, 0), False), (2, False)]:
        np.testing.assert_allclose(
            compiler.mean(z, axis, keepdims), np.mean(z, axis, keepdims=keepdims), rtol=1e-6
        )
