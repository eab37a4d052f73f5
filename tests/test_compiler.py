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


def test_cpu_matmuls_leave_ynnpack_and_long_sums_stay_accurate():
    """jax's default CPU compile hands a lone matmul to YNNPACK in this jaxlib; through
    `compiler.jit` it is XLA's own, with the same numbers. A reduction stays with YNNPACK."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 128), dtype=np.float32)

    def matmul(x):
        return x @ x.T

    default = _ynn_fused_ops(jax.jit(matmul).lower(x).compile().as_text())
    assert "dot" in default, f"jax's default no longer fuses dots into YNNPACK: {default}"
    ours = compiler.jit(matmul)
    assert _ynn_fused_ops(ours.lower(x).compile().as_text()) == set()
    np.testing.assert_allclose(ours(x), x.astype(np.float64) @ x.T, rtol=1e-5, atol=1e-4)

    y = rng.uniform(0, 1, 4_000_000).astype(np.float32)
    total = compiler.jit(jnp.sum)
    assert "reduce" in _ynn_fused_ops(total.lower(y).compile().as_text())
    want = y.astype(np.float64).sum()
    assert abs(float(total(y)) - want) / want < 1e-6
