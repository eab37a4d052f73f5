"""Logical axis names for parameters and activations, and the rules that map them to a mesh.

Model code never names mesh axes. Parameters carry logical names in their `logical_axes`
metadata (set with `param`), activations are pinned with `constrain`. A run maps the names to
mesh axes with a rules table, so FSDP, tensor or context parallelism is a rules change, not a
model change (the idea MaxText popularised). A run states only the rules it changes
(`rules_with`). This is the only module that maps names to mesh axes; attention.py's
`shard_map` takes its specs from `mesh_spec`.

Vocabulary (parameters | activations):
  embed    model width of a weight               | act_embed  model width of an activation
  heads    attention heads                        | act_heads  heads of q/k/v/attention output
  kv       head dim                               | batch      batch
  mlp      feed-forward hidden                    | length     token (or frame) axis
  layers   stacked-layer axis of scanned blocks   | act_mlp    feed-forward hidden activation
  conv_in / conv_out   convolution channels (VAE)
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Mapping, Sequence

import jax
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import NamedSharding, PartitionSpec

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

MESH_AXES = ("data", "fsdp", "context", "tensor")

# Weights are FSDP-sharded over `fsdp` and `context` (as MaxText and maxdiffusion do): context
# parallel groups hold disjoint token shards and would otherwise replicate every weight.
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", "context"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("embed", ("fsdp", "context")),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("conv_in", None),
    ("conv_out", ("fsdp", "context")),
)

_RULES: contextvars.ContextVar[Rules] = contextvars.ContextVar("rules", default=DEFAULT_RULES)


@contextlib.contextmanager
def use_rules(rules: Rules):
    """Use `rules` for `constrain` and `spec` inside the block."""
    token = _RULES.set(tuple(rules))
    try:
        yield
    finally:
        _RULES.reset(token)


def param(value: jax.Array, names: Sequence[str | None]) -> nnx.Param:
    """A parameter whose axes carry logical names (one per dimension)."""
    if len(names) != value.ndim:
        raise ValueError(f"logical names {tuple(names)} do not match shape {value.shape}")
    return nnx.Param(value, logical_axes=tuple(names))


def logical_axes(variable: nnx.Variable) -> tuple[str | None, ...]:
    """The logical names of a variable (all None when it has none)."""
    names = variable.get_metadata().get("logical_axes")
    ndim = len(variable.shape)
    return tuple(names) if names is not None else (None,) * ndim


def add_layer_axis(module: nnx.Module) -> None:
    """Prefix `layers` to the names of every variable of a module built under `nnx.vmap`."""
    for _, var in nnx.iter_graph(module):
        if isinstance(var, nnx.Variable) and "logical_axes" in var.get_metadata():
            names = var.get_metadata()["logical_axes"]
            if len(names) + 1 == len(var.shape):
                var.set_metadata(logical_axes=("layers", *names))


def spec(names: Sequence[str | None], rules: Rules | None = None) -> PartitionSpec:
    """Map logical names to a PartitionSpec; a mesh axis is used at most once (first name wins)."""
    table = dict(_RULES.get() if rules is None else rules)
    used: set[str] = set()
    out = []
    for name in names:
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def rules_with(overrides: Rules | Sequence[Sequence]) -> Rules:
    """DEFAULT_RULES with each name of `overrides` remapped (names it adds are appended): a
    run's `config.sharding_rules` states only what it changes."""
    new = {name: tuple(t) if isinstance(t, list) else t for name, t in overrides}
    out = tuple((name, new.pop(name, target)) for name, target in DEFAULT_RULES)
    return out + tuple(new.items())


def mesh_spec(
    names: Sequence[str | None],
    shape: Sequence[int],
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    rules: Rules | None = None,
) -> PartitionSpec:
    """`spec(names, rules)` on `mesh` (default: the current mesh) for an array of `shape`: mesh
    axes the mesh lacks, or whose size does not divide their dimension, are dropped (that
    dimension is replicated: tiny models on many devices)."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    out = []
    for dim, entry in zip(shape, spec(names, rules), strict=True):
        entry = _drop_missing(entry, () if mesh.empty else mesh.axis_names)
        out.append(entry if entry is None or dim % _size(entry, mesh) == 0 else None)
    return PartitionSpec(*out)


def named_sharding(
    mesh: jax.sharding.Mesh, names: Sequence[str | None], shape: Sequence[int], rules: Rules
) -> NamedSharding:
    """The NamedSharding of an array of `shape` whose axes have the logical `names`."""
    return NamedSharding(mesh, mesh_spec(names, shape, mesh, rules))


def batch_sharding(mesh: jax.sharding.Mesh, rules: Rules) -> NamedSharding:
    """How a batch (leading axis `batch`, the rest whole) is laid out on `mesh` under `rules`:
    the sharding the input pipeline builds its global arrays with, and the one the model's
    `constrain(x, ("batch", ...))` pins its activations to."""
    entry = _drop_missing(spec(("batch",), rules)[0], mesh.axis_names)
    return NamedSharding(mesh, PartitionSpec(entry))


def state_shardings(abstract_vars: nnx.State, mesh: jax.sharding.Mesh, rules: Rules) -> dict:
    """NamedShardings (a pure dict) for an nnx.State of (abstract) Variables, from their logical
    names; mesh axes that do not divide a dimension are dropped from it."""
    shardings = jax.tree.map(
        lambda v: named_sharding(mesh, logical_axes(v), v.shape, rules),
        abstract_vars,
        is_leaf=lambda v: isinstance(v, nnx.Variable),
    )
    return nnx.to_pure_dict(shardings)


def axis_size(name: str, mesh_shape: Mapping[str, int], rules: Rules) -> int:
    """How many pieces a mesh of `mesh_shape` (axis name -> size) cuts the logical axis `name`
    into under `rules` (before any divisibility check): the batch's data shards for "batch"."""
    entry = spec((name,), rules)[0]
    axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
    return int(math.prod(mesh_shape.get(a, 1) for a in axes))


def mesh_shape(sizes: Mapping[str, int], num_devices: int, limit: int = 0) -> dict[str, int]:
    """Mesh axis sizes (MESH_AXES order) from requested `sizes` (one may be -1: the remaining
    devices) over `num_devices` devices, or the first `limit` of them when 0 < limit."""
    requested = [sizes[a] for a in MESH_AXES]
    n = min(num_devices, limit) if limit > 0 else num_devices
    fixed = math.prod(s for s in requested if s != -1)
    if requested.count(-1) > 1 or any(s < 1 and s != -1 for s in requested) or n % fixed:
        raise ValueError(
            f"mesh (data, fsdp, context, tensor) = {requested}: sizes must be >= 1 or -1 (at "
            f"most one) and their product must divide the {n} devices used"
        )
    return {a: n // fixed if s == -1 else s for a, s in zip(MESH_AXES, requested, strict=True)}


def make_mesh(shape: Mapping[str, int], devices: Sequence) -> jax.sharding.Mesh:
    """The (data, fsdp, context, tensor) mesh of `shape` over the first devices of `devices`."""
    sizes = tuple(shape[a] for a in MESH_AXES)
    devices = list(devices)[: math.prod(sizes)]
    # Like jax.make_mesh, but a mesh axis may split a physical one (jax.make_mesh allows that on
    # v5e only): context=2 over a v5p 4x4x4 torus needs it.
    grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
    return jax.sharding.Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)


def num_shards(name: str) -> int:
    """How many pieces the current mesh and rules cut the logical axis `name` into (1 outside a
    mesh): the transformer pads its token axis to a multiple of `num_shards("length")`."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    entry = _drop_missing(spec((name,))[0], mesh.axis_names)
    return 1 if entry is None else _size(entry, mesh)


def _size(entry, mesh) -> int:
    axes = (entry,) if isinstance(entry, str) else entry
    return int(math.prod(mesh.shape[a] for a in axes))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Pin an activation's sharding to the current mesh, from one logical name (or None) per axis
    of x; a no-op outside a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    ps = spec(names)
    ps = PartitionSpec(*(_drop_missing(p, mesh.axis_names) for p in ps))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, ps))


def _drop_missing(entry, axis_names):
    if entry is None:
        return None
    axes = (entry,) if isinstance(entry, str) else entry
    axes = tuple(a for a in axes if a in axis_names)
    return None if not axes else axes[0] if len(axes) == 1 else axes


def state_specs(state: nnx.State, rules: Rules | None = None) -> nnx.State:
    """PartitionSpecs for every variable of a state, from their logical names."""
    return jax.tree.map(
        lambda v: spec(logical_axes(v), rules),
        state,
        is_leaf=lambda v: isinstance(v, nnx.Variable),
    )
