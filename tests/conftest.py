"""Test set-up: CPU only, 8 simulated devices, exact fp32 matmuls for parity checks.

The environment variables must be set before jax is imported anywhere.

Compiling dominates the trainer tests, so the session keeps a persistent compilation cache (a
temporary folder, unless JAX_COMPILATION_CACHE_DIR names one): a program compiled again, in this
process or in a `python -m train` child given `compile_env()`, is read back instead. The
`fast_compile` fixture compiles the library's CPU programs without LLVM's costlier passes.
"""

import atexit
import os
import shutil
import tempfile

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

if not jax.config.jax_compilation_cache_dir:
    _CACHE = tempfile.mkdtemp(prefix="jax_cache_")
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", _CACHE)

# XLA:CPU options that shorten compiling (about 2x for these tiny programs); the float32
# operations stay the same.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def compile_env(devices: int = 8, fast: bool = True) -> dict:
    """os.environ for a child process on `devices` CPU devices that shares this session's
    compilation cache; `fast`: compiled with FAST_COMPILE (as under the `fast_compile` fixture)."""
    flags = [f"--xla_force_host_platform_device_count={devices}"]
    if fast:
        flags += [f"--{k}={str(v).lower()}" for k, v in FAST_COMPILE.items()]
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": " ".join(flags),
        "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
    }


@pytest.fixture(scope="module")
def fast_compile():
    """The library's CPU programs (compiler.options: the trainer's steps, the sampling pipeline)
    compiled with FAST_COMPILE for the module's tests."""
    from cogvideox_jax import compiler

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compiler, "CPU_OPTIONS", {**compiler.CPU_OPTIONS, **FAST_COMPILE})
        yield
