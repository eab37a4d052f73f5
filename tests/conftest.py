"""Test set-up: CPU only, 8 simulated devices, exact fp32 matmuls for parity checks.

The environment variables must be set before jax is imported anywhere.

Compiling dominates these tiny programs, so:
- XLA:CPU generates fusions with its older emitters (--xla_cpu_use_fusion_emitters=false),
  which compile in about half the time;
- every program compiles without XLA:CPU's backend optimisation and LLVM's costlier passes
  (jax_disable_most_optimizations: about 2x sooner, the same tolerances hold), except in tests
  marked `optimized`, one diffusers-parity check per component, which compile as users run;
- the test run keeps one persistent compilation cache (a temporary folder, unless
  JAX_COMPILATION_CACHE_DIR names one) that pytest-xdist's workers and the `python -m train`
  children given `compile_env()` share: a program compiled again is read back instead.
"""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

os.environ["JAX_PLATFORMS"] = "cpu"
# XLA:CPU's older loop fusion emitters compile these programs about 2x sooner than its MLIR
# fusion emitters (the default), for the same results within every tolerance here; they
# matter to compile time on CPU only (GPU and TPU runs never see the flag).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_cpu_use_fusion_emitters=false"
).strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Compiling dominates these tiny programs: jax_disable_most_optimizations (env
# JAX_DISABLE_MOST_OPTIMIZATIONS) compiles every program without XLA:CPU's backend optimisation
# and LLVM's costlier passes, about 2x sooner (the tests' tolerances are the same under it).
FAST = "jax_disable_most_optimizations"
jax.config.update(FAST, True)

if not jax.config.jax_compilation_cache_dir:
    # Made once by the first process (pytest-xdist's controller), inherited by its workers and
    # their children through the environment, removed by the process that made it.
    if "COGVIDEOX_JAX_TEST_CACHE" not in os.environ:
        os.environ["COGVIDEOX_JAX_TEST_CACHE"] = tempfile.mkdtemp(prefix="jax_cache_")
        atexit.register(shutil.rmtree, os.environ["COGVIDEOX_JAX_TEST_CACHE"], True)
    jax.config.update("jax_compilation_cache_dir", os.environ["COGVIDEOX_JAX_TEST_CACHE"])
    # Also programs that compile in a fraction of a second (the fast-compiled ones, mostly).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


# The README's command runs two pytest-xdist workers that each take whole files (--dist
# loadfile), handed out by default in order of test count. Handed out longest first instead (LPT
# scheduling), both workers stay busy to the end. Rough seconds per file of the whole suite on the
# 2-core machine; files not named here come after, in collection order.
FILE_SECONDS = {
    "test_train_data.py": 180,
    "test_train.py": 171,
    "test_pipeline.py": 165,
    "test_checkpoint_faults.py": 81,
    "test_vae.py": 80,
    "test_transformer.py": 71,
    "test_plan.py": 75,
    "test_bench.py": 63,
    "test_multihost.py": 54,
    "test_prepare_data.py": 46,
    "test_lora.py": 46,
    "test_export.py": 42,
    "test_context_parallel.py": 37,
    "test_convert.py": 32,
    "test_aot.py": 31,
    "test_data_pipeline.py": 29,
    "test_packing.py": 26,
    "test_t5.py": 25,
    "test_train_packed.py": 17,
}


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist's own order: by test count
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 0))  # stable: files stay whole


@pytest.fixture(autouse=True)
def _compile_mode(request):
    """Tests marked `optimized` compile with XLA's full optimisation, the others without. The
    flag is not part of jax's in-memory caches' keys, so they are cleared when it changes."""
    fast = request.node.get_closest_marker("optimized") is None
    if jax.config.read(FAST) != fast:
        jax.clear_caches()
        jax.config.update(FAST, fast)
    yield


def compile_env(devices: int = 8, fast: bool = True) -> dict:
    """os.environ for a child process on `devices` CPU devices that shares this session's
    compilation cache; `fast`: compiled without backend optimisation, as this process compiles
    outside `optimized` tests (a program it compiled is then read back from the cache)."""
    count = "--xla_force_host_platform_device_count"
    flags = [f for f in os.environ["XLA_FLAGS"].split() if not f.startswith(count)]
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": " ".join([*flags, f"{count}={devices}"]),
        "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
        FAST.upper(): "1" if fast else "0",
    }


def _shared_dir(tmp_path_factory) -> Path:
    """A folder every worker process of this test run shares (pytest-xdist's workers each get
    their own basetemp inside the run's folder); the basetemp itself in a single process."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def demo_vae(tmp_path_factory) -> Path:
    """The `demo_vae` folder that configs/demo.py:runlocal trains (train.demo.train_vae), trained
    once per test run: the first worker to ask trains it under a file lock, the others wait and
    reuse it. Tests copy it into a workdir, where the demo restores it instead of training."""
    import fcntl
    import importlib

    from train import demo

    shared = _shared_dir(tmp_path_factory)
    run = shared / "demo_vae_run"
    with open(shared / "demo_vae.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (run / "demo_vae" / "meta.json").is_file():
            cfg = importlib.import_module("configs.demo").get_config("runlocal")
            demo.train_vae(cfg, str(run))
    return run / "demo_vae"
