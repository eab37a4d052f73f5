"""The XLA options this library compiles its programs with, chosen per backend.

XLA:CPU in jaxlib 0.10 hands the matmuls, reductions and some elementwise fusions of a program to
YNNPACK. At the shapes of this model its matmuls are the slower choice: in the profiled CPU
training step (BENCHMARKS.md) the blocked-attention tiles ran at 57-100 GFLOP/s through YNNPACK
and at up to 163 GFLOP/s through XLA's own kernel, and the VAE's frame-batched convolutions lost
time in YNNPACK's elementwise fusions around them. Its reductions are kept: with no YNNPACK
fusion at all, the bench's first-step loss moved 2.6e-5 (relative) away from PyTorch's, against
9e-8 with YNNPACK's reductions (which reduction makes the difference was not traced). So on CPU
the library's jitted programs use YNNPACK for reduction fusions only (which may still take in
the matmul that feeds a reduction). Other backends get no options.

These are per-program `compiler_options` of `jax.jit`, not process-wide XLA flags, so what a
user compiles themselves is left as they set it.
"""

from __future__ import annotations

import functools

import jax

# The exact list of YNNPACK fusion kinds to use (it replaces jax's default one).
CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


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


def module_jit(fun=None, *, static_argnames=()):
    """For a function whose first argument is an NNX module it only reads (no state updates come
    back): `jit` of it, the module passed as (graphdef, state). The stand-in for `nnx.jit`,
    which takes no compiler options."""
    if fun is None:
        return functools.partial(module_jit, static_argnames=static_argnames)
    from flax import nnx

    def merged(graphdef, state, *args, **kwargs):
        return fun(nnx.merge(graphdef, state), *args, **kwargs)

    jitted = jit(merged, static_argnums=(0,), static_argnames=static_argnames)

    @functools.wraps(fun)
    def call(module, *args, **kwargs):
        graphdef, state = nnx.split(module)
        return jitted(graphdef, state, *args, **kwargs)

    return call


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
