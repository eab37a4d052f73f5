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
from collections.abc import Sequence

import jax
from flax import nnx
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


def mesh_spec(names: Sequence[str | None], shape: Sequence[int]) -> PartitionSpec:
    """`spec(names)` on the current mesh for an array of `shape`: mesh axes the mesh lacks, or
    whose size does not divide their dimension, are dropped (that dimension is replicated)."""
    mesh = jax.sharding.get_abstract_mesh()
    out = []
    for dim, entry in zip(shape, spec(names), strict=True):
        entry = _drop_missing(entry, () if mesh.empty else mesh.axis_names)
        out.append(entry if entry is None or dim % _size(entry, mesh) == 0 else None)
    return PartitionSpec(*out)


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
    """Pin an activation's sharding to the current mesh; a no-op outside a mesh."""
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
