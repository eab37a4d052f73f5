"""What the command-line programs set before jax starts its backends.

jax probes every backend it knows on first use, the TPU one through libtpu when libtpu is
installed (the `aot` and `test` extras install it to compile for TPU slices on any machine). On a
machine without TPU chips that probe fails, harmlessly but loudly: libtpu prints "could not
determine TPU accelerator type", an "unexpected worker hostname" error and a source-location
trace on every start. `cpu_only_without_accelerators` keeps jax to the CPU where there is nothing
else to find, and changes nothing on TPU VMs, on machines with a GPU plugin, or where
JAX_PLATFORMS is set.
"""

from __future__ import annotations

import glob
import importlib.metadata
import os

GPU_PLUGINS = ("jax-cuda12-plugin", "jax-cuda13-plugin", "jax-rocm7-plugin", "jax-rocm-plugin")


def has_tpu_chips() -> bool:
    """Whether TPU chips are attached (jax's own PCI check; the accelerator device files where
    that is unavailable)."""
    try:
        from jax._src import hardware_utils

        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except Exception:  # a jax without the helper: the devices TPU VMs expose
        return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def has_gpu_plugin() -> bool:
    for name in GPU_PLUGINS:
        try:
            importlib.metadata.distribution(name)
            return True
        except importlib.metadata.PackageNotFoundError:
            continue
    return False


def cpu_only_without_accelerators() -> None:
    """Set JAX_PLATFORMS=cpu when it is unset and the machine has no TPU chips and no GPU
    plugin. Call before jax first uses a device."""
    if os.environ.get("JAX_PLATFORMS") or has_gpu_plugin() or has_tpu_chips():
        return
    os.environ["JAX_PLATFORMS"] = "cpu"
    try:
        import jax

        jax.config.update("jax_platforms", "cpu")  # read at import: set it too
    except ImportError:
        pass
