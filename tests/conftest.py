"""Test set-up: CPU only, 8 simulated devices, exact fp32 matmuls for parity checks.

The environment variables must be set before jax is imported anywhere.

Compiling dominates the trainer tests, so the session keeps a persistent compilation cache (a
temporary folder, unless JAX_COMPILATION_CACHE_DIR names one): a program compiled again, in this
process or in a `python -m train` child given `compile_env()`, is read back instead (under
pytest-xdist, as the README runs the suite, each worker process keeps its own). Under the
`fast_compile` fixture (or `fast_compiling()`), programs compile without XLA:CPU's backend
optimisation and LLVM's costlier passes.
"""

import atexit
import contextlib
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
    # Also programs that compile in a fraction of a second (the fast-compiled ones, mostly).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)

# Compiling dominates these tiny programs: jax_disable_most_optimizations (env
# JAX_DISABLE_MOST_OPTIMIZATIONS) compiles every program without XLA:CPU's backend optimisation
# and LLVM's costlier passes, about 2x sooner (the tests' tolerances are the same under it).
FAST = "jax_disable_most_optimizations"


def compile_env(devices: int = 8, fast: bool = True) -> dict:
    """os.environ for a child process on `devices` CPU devices that shares this session's
    compilation cache; `fast`: compiled as under the `fast_compile` fixture (a program that
    this process compiled under it is then read back from the cache)."""
    count = "--xla_force_host_platform_device_count"
    flags = [f for f in os.environ["XLA_FLAGS"].split() if not f.startswith(count)]
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": " ".join([*flags, f"{count}={devices}"]),
        "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
        FAST.upper(): "1" if fast else "0",
    }


@contextlib.contextmanager
def fast_compiling():
    """Every program compiled inside (jitted or eager) compiled with
    jax_disable_most_optimizations."""
    before = jax.config.read(FAST)
    jax.config.update(FAST, True)
    try:
        yield
    finally:
        jax.config.update(FAST, before)


@pytest.fixture(scope="module")
def fast_compile():
    """`fast_compiling` for the whole module (the trainer's steps, the demo's VAE, eager ops)."""
    with fast_compiling():
        yield
