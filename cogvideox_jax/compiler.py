"""The XLA options this library compiles its programs with, chosen per backend, and two reductions
that XLA:CPU does badly in their plain form (an accurate mean, a fast row maximum).

XLA:CPU in jaxlib 0.10 hands the matmuls, reductions and some elementwise fusions of a program to
YNNPACK. At the shapes of this model none of them pays (measurements in BENCHMARKS.md, sections
"Transformer train step" and "2026-11-22: a different CPU, YNNPACK off"):
- its matmuls: in a profile of the CPU training step the blocked-attention tiles ran slower
  through YNNPACK than the tile product left to XLA's own kernel;
- its elementwise fusions: the VAE's frame-batched convolutions lost time in them;
- its reductions: a sum over the token axis (a bias or modulation gradient of the training step)
  took many times longer as a YNNPACK call than reading its inputs takes, and the train step
  ran faster without them.
So on CPU the library's jitted programs use no YNNPACK fusion. Other backends get no options.

XLA's own CPU reduction adds a long row sequentially, which loses accuracy as the row grows: the
mean of the training loss's squared errors drifts measurably from float64's. `mean` averages one
axis at a time instead (at most a few hundred terms per sum in this model's shapes), which keeps
it close to float64's (tests/test_compiler.py; figures in BENCHMARKS.md). The trainer's
diffusion losses (train/objective.py, also the held-out loss) and the VAE's GroupNorm use it.

XLA:CPU also reduces a row with `jnp.max` much more slowly than with a sum: `maximum` must return
NaN when either side is NaN, and that loop is not vectorised. A softmax only needs its row
maximum as a shift, so `rowmax` reduces with a plain comparison and select instead (BENCHMARKS.md,
"2026-11-22, later"). The attention kernels (`attention`'s xla kernel, `blocked`) use it.

The options are per-program `compiler_options` of `jax.jit`, not process-wide XLA flags, so what a
user compiles themselves is left as they set it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# The exact list of YNNPACK fusion kinds to use (it replaces jax's default one): none.
CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def options(backend: str | None = None) -> dict[str, str] | None:
    """`compiler_options` for a program compiled for `backend` (default: jax's default)."""
    backend = backend or jax.default_backend()
    return dict(CPU_OPTIONS) if backend == "cpu" else None


def mean(x: jax.Array, axis=None, keepdims: bool = False) -> jax.Array:
    """`jnp.mean(x, axis, keepdims)` taken one axis at a time, last axis first. A mean of means
    over equal-sized groups is the same mean, and each sum stays short, so a mean over many
    elements is accurate on backends (XLA:CPU) that add a reduction's terms one after another."""
    axes = range(x.ndim) if axis is None else (axis,) if isinstance(axis, int) else axis
    axes = sorted((a % x.ndim for a in axes), reverse=True)
    for a in axes:
        x = jnp.mean(x, axis=a, keepdims=True)
    return x if keepdims else jnp.squeeze(x, axis=tuple(axes))


def rowmax(x: jax.Array) -> jax.Array:
    """The maximum of `x` over its last axis, with no gradient: a softmax's shift. A NaN in a row
    may be passed over (a softmax shifted by it is NaN all the same, through its own terms)."""
    x = jax.lax.stop_gradient(x)
    init = np.array(-np.inf, x.dtype)
    return jax.lax.reduce(x, init, lambda a, b: jnp.where(a > b, a, b), (x.ndim - 1,))


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

    # Ahead-of-time lowering (tools.aot): the module as (graphdef, state), the state's leaves
    # may be ShapeDtypeStructs with shardings.
    call.lower_split = jitted.lower
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
