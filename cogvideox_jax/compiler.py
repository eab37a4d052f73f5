"""The XLA options this library compiles its programs with, chosen per backend.

XLA:CPU in jaxlib 0.10 hands the matmuls (and some reductions and elementwise fusions) of a
program to YNNPACK. At the shapes of this model its matmuls are the slower choice: in the
profiled CPU training step (BENCHMARKS.md) the blocked-attention tiles ran at 57-100 GFLOP/s
through YNNPACK and at 163 GFLOP/s through XLA's own kernel, and the whole step took 11.2 s
instead of 12.6 s without it; a 3x3 convolution over frames took 0.09 s instead of 0.12 s. So on
CPU the library's jitted programs turn YNNPACK fusions off. Other backends get no options.

These are per-program `compiler_options` of `jax.jit`, not process-wide XLA flags, so what a
user compiles themselves is left as they set it.
"""

from __future__ import annotations

import jax

CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}  # "": no YNNPACK fusion of any kind


def options(backend: str | None = None) -> dict[str, str] | None:
    """`compiler_options` for a program compiled for `backend` (default: jax's default)."""
    backend = backend or jax.default_backend()
    return dict(CPU_OPTIONS) if backend == "cpu" else None


def mesh_options(mesh) -> dict[str, str] | None:
    """`options` for the platform of `mesh`'s devices (an AOT mesh of TPU devices compiled on a
    CPU host gets the TPU's: none)."""
    devices = getattr(mesh, "devices", None)
    return options(None if devices is None else devices.flat[0].platform)


def jit(fun, **kwargs):
    """`jax.jit(fun, **kwargs)` with `options()` for the default backend, chosen when the
    returned function is first called or lowered (not at import, when jax may not yet have
    initialised its backends, e.g. before `jax.distributed.initialize`)."""
    return _Jit(fun, kwargs)


class _Jit:
    def __init__(self, fun, kwargs):
        self._fun, self._kwargs, self._jitted = fun, kwargs, None

    def _get(self):
        if self._jitted is None:
            self._jitted = jax.jit(self._fun, compiler_options=options(), **self._kwargs)
        return self._jitted

    def __call__(self, *args, **kwargs):
        return self._get()(*args, **kwargs)

    def lower(self, *args, **kwargs):
        return self._get().lower(*args, **kwargs)

    def trace(self, *args, **kwargs):
        return self._get().trace(*args, **kwargs)
