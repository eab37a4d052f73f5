"""The library's per-backend XLA options reach the programs it compiles."""

import jax
import jax.numpy as jnp
import numpy as np

from cogvideox_jax import compiler


def test_options_per_backend():
    assert compiler.options("cpu") == compiler.CPU_OPTIONS
    assert compiler.options("tpu") is None and compiler.options("gpu") is None
    topology_free = type("AbstractMesh", (), {})()  # no devices: the default backend's
    assert compiler.mesh_options(topology_free) == compiler.options()


def test_cpu_programs_compile_without_ynnpack_fusions():
    """A matmul-and-reduce program: jax's default CPU compile hands it to YNNPACK in this
    jaxlib; compiled through `compiler.jit`, none of it is, and the numbers are the same."""
    x = np.random.default_rng(0).standard_normal((64, 128), dtype=np.float32)

    def f(x):
        return jnp.tanh(x @ x.T).sum(-1)

    ours = compiler.jit(f)
    assert "ynn_fusion" not in ours.lower(x).compile().as_text()
    np.testing.assert_allclose(ours(x), jax.jit(f)(x), rtol=1e-5)
    assert "ynn_fusion" in jax.jit(f).lower(x).compile().as_text(), (
        "jax's default CPU compile no longer uses YNNPACK: revisit compiler.CPU_OPTIONS"
    )
