"""Parameter mapping between diffusers checkpoints and our parameter trees, both ways, lossless.

Each model part has one ordered table of `Rule`s: a diffusers tensor name (with `{layer}` for the
index of a scanned block) <-> a path in our tree, and a pair of transforms that are pure
reshapes/transposes (so no value or dtype ever changes). All PyTorch layout differences live
here: torch Linear weights are (out, in), ours (in, out); attention weights are split per head;
patch (un)flattening is channels-last (t, i, j, c) here and channel-major (c, t, i, j) there.

Conversion is strict: every source tensor matches exactly one rule and is consumed once, every
target leaf is written once, and every shape equals the model's (checked from file headers
before any data is read). Tensors are streamed one target leaf at a time.

This module knows a model only by its config attributes and parameter shapes (a `ComponentSpec`)
and never builds one: `components.py` makes the spec of a config.json from the model classes,
loads and saves modules, and converts whole folders with the functions below.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import jax
import numpy as np

from cogvideox_jax import weights

Array = np.ndarray


@dataclasses.dataclass(frozen=True)
class Rule:
    """One diffusers tensor (one per layer when stacked) <-> one leaf of our tree."""

    theirs: str  # diffusers name; "{layer}" marks the index of a stacked (scanned) block
    ours: str  # "/"-separated path in our parameter tree
    to_ours: Callable[[Array], Array] = lambda x: x
    to_theirs: Callable[[Array], Array] = lambda x: x

    @property
    def stacked(self) -> bool:
        return "{layer}" in self.theirs

    @property
    def regex(self) -> re.Pattern:
        parts = self.theirs.split("{layer}")
        return re.compile(r"(?P<layer>\d+)".join(re.escape(p) for p in parts))


class ConversionError(ValueError):
    """A checkpoint does not match the model: lists every offending tensor name."""


def _linear(theirs: str, ours: str) -> list[Rule]:
    """torch Linear (out, in) weight and bias <-> our (in, out) kernel and bias."""
    return [
        Rule(f"{theirs}.weight", f"{ours}/kernel", lambda w: w.T, lambda k: k.T),
        Rule(f"{theirs}.bias", f"{ours}/bias"),
    ]


def _norm(theirs: str, ours: str) -> list[Rule]:
    return [Rule(f"{theirs}.weight", f"{ours}/scale"), Rule(f"{theirs}.bias", f"{ours}/bias")]


def transformer_rules(cfg) -> list[Rule]:
    """Rules for `CogVideoXTransformer3DModel` <-> `transformer.Transformer` of the
    `transformer.TransformerConfig` `cfg`."""
    d, n, k = cfg.width, cfg.num_heads, cfg.head_dim
    p, pt, c_in, c_out = cfg.patch_size, cfg.patch_size_t or 1, cfg.in_channels, cfg.out_channels
    if cfg.patch_size_t is None:  # Conv2d (D, C, i, j) -> (i*j*C, D)
        patch_in = lambda w: w.transpose(2, 3, 1, 0).reshape(p * p * c_in, d)
        patch_back = lambda x: x.reshape(p, p, c_in, d).transpose(3, 2, 0, 1)
    else:  # Linear (D, C*t*i*j) -> (t*i*j*C, D)
        patch_in = lambda w: w.reshape(d, c_in, pt, p, p).transpose(2, 3, 4, 1, 0).reshape(-1, d)
        patch_back = lambda x: x.reshape(pt, p, p, c_in, d).transpose(4, 3, 0, 1, 2).reshape(d, -1)
    # proj_out rows (C, [t,] i, j) -> our columns ([t,] i, j, C).
    out_w = lambda w: w.reshape(c_out, pt, p, p, d).transpose(1, 2, 3, 0, 4).reshape(-1, d).T
    out_w_back = lambda x: x.T.reshape(pt, p, p, c_out, d).transpose(3, 0, 1, 2, 4).reshape(-1, d)
    out_b = lambda b: b.reshape(c_out, pt, p, p).transpose(1, 2, 3, 0).reshape(-1)
    out_b_back = lambda x: x.reshape(pt, p, p, c_out).transpose(3, 0, 1, 2).reshape(-1)
    blk, ours_blk = "transformer_blocks.{layer}", "transformer_blocks"

    rules = [
        Rule("patch_embed.proj.weight", "patch_embed/proj/kernel", patch_in, patch_back),
        Rule("patch_embed.proj.bias", "patch_embed/proj/bias"),
        *_linear("patch_embed.text_proj", "patch_embed/text_proj"),
        *_linear("time_embedding.linear_1", "time_embedding/linear_1"),
        *_linear("time_embedding.linear_2", "time_embedding/linear_2"),
    ]
    if cfg.learned_posemb:
        rules.append(Rule("patch_embed.pos_embedding", "patch_embed/pos_embedding"))
    if cfg.ofs_embed_dim:
        rules += _linear("ofs_embedding.linear_1", "ofs_embedding/linear_1")
        rules += _linear("ofs_embedding.linear_2", "ofs_embedding/linear_2")
    for norm in ("norm1", "norm2"):
        rules += _linear(f"{blk}.{norm}.linear", f"{ours_blk}/{norm}/linear")
        rules += _norm(f"{blk}.{norm}.norm", f"{ours_blk}/{norm}/norm")
    for qkv in ("to_q", "to_k", "to_v"):
        rules += [
            Rule(
                f"{blk}.attn1.{qkv}.weight",
                f"{ours_blk}/attn1/{qkv}_kernel",
                lambda w: w.T.reshape(d, n, k),
                lambda x: x.reshape(d, n * k).T,
            ),
            Rule(
                f"{blk}.attn1.{qkv}.bias",
                f"{ours_blk}/attn1/{qkv}_bias",
                lambda b: b.reshape(n, k),
                lambda x: x.reshape(n * k),
            ),
        ]
    rules += [
        Rule(
            f"{blk}.attn1.to_out.0.weight",
            f"{ours_blk}/attn1/to_out_kernel",
            lambda w: w.T.reshape(n, k, d),
            lambda x: x.reshape(n * k, d).T,
        ),
        Rule(f"{blk}.attn1.to_out.0.bias", f"{ours_blk}/attn1/to_out_bias"),
        *_norm(f"{blk}.attn1.norm_q", f"{ours_blk}/attn1/norm_q"),
        *_norm(f"{blk}.attn1.norm_k", f"{ours_blk}/attn1/norm_k"),
        *_linear(f"{blk}.ff.net.0.proj", f"{ours_blk}/ff/proj"),
        *_linear(f"{blk}.ff.net.2", f"{ours_blk}/ff/out"),
        *_norm("norm_final", "norm_final"),
        *_linear("norm_out.linear", "norm_out/linear"),
        *_norm("norm_out.norm", "norm_out/norm"),
        Rule("proj_out.weight", "proj_out/kernel", out_w, out_w_back),
        Rule("proj_out.bias", "proj_out/bias", out_b, out_b_back),
    ]
    return rules


def t5_rules(cfg) -> list[Rule]:
    """Rules for transformers' `T5EncoderModel` <-> `t5.T5Encoder` of the `t5.T5Config` `cfg`."""
    d, n, k = cfg.d_model, cfg.num_heads, cfg.d_kv
    blk, ours = "encoder.block.{layer}.layer", "encoder/block/layer"
    rules = [
        Rule("shared.weight", "shared/embedding"),
        # transformers keeps the bucket table in layer 0 only; every layer uses it.
        Rule(
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            "encoder/relative_attention_bias/embedding",
        ),
        Rule("encoder.final_layer_norm.weight", "encoder/final_layer_norm/scale"),
        Rule(f"{blk}.0.layer_norm.weight", f"{ours}/0/layer_norm/scale"),
        Rule(f"{blk}.1.layer_norm.weight", f"{ours}/1/layer_norm/scale"),
        Rule(
            f"{blk}.0.SelfAttention.o.weight",
            f"{ours}/0/SelfAttention/o/kernel",
            lambda w: w.T.reshape(n, k, d),
            lambda x: x.reshape(n * k, d).T,
        ),
    ]
    for q in ("q", "k", "v"):
        rules.append(
            Rule(
                f"{blk}.0.SelfAttention.{q}.weight",
                f"{ours}/0/SelfAttention/{q}/kernel",
                lambda w: w.T.reshape(d, n, k),
                lambda x: x.reshape(d, n * k).T,
            )
        )
    # T5DenseGatedActDense has wi_0 and wi_1, T5DenseActDense ("relu" and other ungated) one wi.
    for w in ("wi_0", "wi_1", "wo") if cfg.is_gated_act else ("wi", "wo"):
        rules.append(
            Rule(
                f"{blk}.1.DenseReluDense.{w}.weight",
                f"{ours}/1/DenseReluDense/{w}/kernel",
                lambda x: x.T,
                lambda x: x.T,
            )
        )
    return rules


def vae_rules(target_shapes: Mapping[str, tuple[int, ...]]) -> list[Rule]:
    """Rules for `AutoencoderKLCogVideoX` <-> `vae.AutoencoderKL`, read off the model tree.

    The trees match name for name; only the leaf names (`weight` -> `kernel` for convolutions,
    `scale` for norms) and the kernel layouts differ: torch (O, I, k...) vs ours (k..., I, O).
    """
    rules = []
    for path, shape in target_shapes.items():
        *module, leaf = path.split("/")
        theirs = ".".join(module) + (".bias" if leaf == "bias" else ".weight")
        if leaf == "kernel" and len(shape) == 5:  # Conv3d
            rules.append(
                Rule(
                    theirs,
                    path,
                    lambda w: w.transpose(2, 3, 4, 1, 0),
                    lambda x: x.transpose(4, 3, 0, 1, 2),
                )
            )
        elif leaf == "kernel" and len(shape) == 4:  # Conv2d
            rules.append(
                Rule(
                    theirs,
                    path,
                    lambda w: w.transpose(2, 3, 1, 0),
                    lambda x: x.transpose(3, 2, 0, 1),
                )
            )
        elif leaf in ("scale", "bias"):
            rules.append(Rule(theirs, path))
        else:
            raise ValueError(f"VAE parameter {path!r} {shape} has no conversion rule")
    return rules


@dataclasses.dataclass
class Plan:
    """Which source tensor(s) make each target leaf: `sources[path]` lists one name, or one
    name per layer (in layer order) for stacked leaves."""

    rules: dict[str, Rule]
    sources: dict[str, list[str]]


def plan_to_ours(
    rules: list[Rule],
    source_shapes: Mapping[str, tuple[int, ...]],
    target_shapes: Mapping[str, tuple[int, ...]],
    num_layers: int,
) -> Plan:
    """Match every source tensor to exactly one target leaf and check all shapes.

    Raises ConversionError listing unmatched, ambiguous, missing, duplicated and mis-shaped
    tensors, before any tensor data is read.
    """
    problems: list[str] = []
    by_target: dict[str, dict[int | None, str]] = {r.ours: {} for r in rules}
    rule_of = {r.ours: r for r in rules}
    for name in source_shapes:
        hits = [(r, m) for r in rules if (m := r.regex.fullmatch(name))]
        if not hits:
            problems.append(f"unexpected tensor {name!r} (matches no rule)")
            continue
        if len(hits) > 1:
            problems.append(f"tensor {name!r} matches several rules: {[r.ours for r, _ in hits]}")
            continue
        rule, m = hits[0]
        layer = int(m["layer"]) if rule.stacked else None
        if rule.stacked and not 0 <= layer < num_layers:
            problems.append(f"tensor {name!r}: layer {layer} outside 0..{num_layers - 1}")
            continue
        by_target[rule.ours][layer] = name

    sources: dict[str, list[str]] = {}
    for path, rule in rule_of.items():
        got = by_target[path]
        if path not in target_shapes:
            problems += [
                f"tensor {n!r} maps to {path!r}, which the model does not have"
                for n in got.values()
            ]
            continue
        want_layers = range(num_layers) if rule.stacked else [None]
        missing = [rule.theirs.format(layer=i) for i in want_layers if i not in got]
        problems += [f"missing tensor {n!r}" for n in missing]
        if missing:
            continue
        names = [got[i] for i in want_layers]
        shape = tuple(target_shapes[path][1:] if rule.stacked else target_shapes[path])
        want = source_shape(rule, shape)
        for n in names:
            if tuple(source_shapes[n]) != want:
                problems.append(
                    f"tensor {n!r} has shape {tuple(source_shapes[n])}, model expects {want}"
                )
        sources[path] = names
    unmapped = sorted(set(target_shapes) - set(rule_of))
    problems += [f"model parameter {p!r} has no rule" for p in unmapped]
    if problems:
        raise ConversionError("checkpoint does not match the model:\n  " + "\n  ".join(problems))
    return Plan(rules=rule_of, sources=sources)


def source_shape(rule: Rule, target_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The diffusers shape that maps to `target_shape` (by tracing the inverse transform)."""
    spec = jax.ShapeDtypeStruct(target_shape, np.float32)
    return tuple(jax.eval_shape(rule.to_theirs, spec).shape)


def build_leaf(plan: Plan, path: str, read: Callable[[str], Array]) -> Array:
    """Read and transform the source tensor(s) of one target leaf (stacking layers)."""
    rule, names = plan.rules[path], plan.sources[path]
    if not rule.stacked:
        return np.asarray(rule.to_ours(read(names[0])))
    first = np.asarray(rule.to_ours(read(names[0])))
    out = np.empty((len(names), *first.shape), first.dtype)
    out[0] = first
    for i, name in enumerate(names[1:], start=1):
        out[i] = rule.to_ours(read(name))
    return out


def split_leaf(rule: Rule, value: Array) -> Iterable[tuple[str, Array]]:
    """Our leaf -> (diffusers name, tensor) pairs, one per layer for stacked leaves."""
    if not rule.stacked:
        yield rule.theirs, np.ascontiguousarray(rule.to_theirs(value))
        return
    for i in range(value.shape[0]):
        yield rule.theirs.format(layer=i), np.ascontiguousarray(rule.to_theirs(value[i]))


# Component folders: diffusers' (config.json + safetensors) or ours (config.json, MARKER, Orbax
# PARAMS_DIR).

# Host memory per conversion step: leaves are read and written in groups of about this size.
STREAM_GROUP_BYTES = 64 * 2**20  # a larger leaf goes alone
MARKER = "cogvideox_jax.json"  # in every component folder this library writes
PARAMS_DIR = "params"


@dataclasses.dataclass
class ComponentSpec:
    """What converting one component needs: its rules and the model's parameter shapes
    (`components.component_spec` makes it from a config.json)."""

    kind: str  # "transformer" | "vae" | "text_encoder"
    rules: list[Rule]
    target_shapes: dict[str, tuple[int, ...]]
    num_layers: int
    weights_basename: str  # the file name stem diffusers / transformers use
    # Tensors some checkpoints store twice (tied weights): alias -> the name the rules read.
    aliases: dict[str, str] = dataclasses.field(default_factory=dict)


def component_kind(config: Mapping) -> str | None:
    """Which supported component a config.json describes, or None."""
    if config.get("_class_name") == "CogVideoXTransformer3DModel":
        return "transformer"
    if config.get("_class_name") == "AutoencoderKLCogVideoX":
        return "vae"
    if config.get("model_type") == "t5" and "T5EncoderModel" in config.get("architectures", []):
        return "text_encoder"
    return None


def read_config(folder: Path) -> dict:
    """A component folder's config.json."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json")
    return json.loads(cfg_path.read_text())


def is_orbax_component(folder: Path) -> bool:
    """Whether `folder` is a component folder this library wrote (it holds MARKER)."""
    return (Path(folder) / MARKER).is_file()


def _source_plan(folder: Path, spec: ComponentSpec) -> tuple[weights.SafetensorsReader, Plan, list]:
    """Read headers, drop verified duplicates of tied tensors, and plan the conversion."""
    reader = weights.SafetensorsReader(folder)
    shapes = dict(reader.shapes)
    present = []
    for alias, name in spec.aliases.items():
        if alias in shapes and name in shapes:
            a, b = reader.read(alias), reader.read(name)
            if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
                raise ConversionError(
                    f"tensor {alias!r} should be a copy of {name!r} (tied) but differs"
                )
            del shapes[alias]
            present.append(alias)
    return reader, plan_to_ours(spec.rules, shapes, spec.target_shapes, spec.num_layers), present


def read_leaves(
    folder: str | os.PathLike, spec: ComponentSpec, sharding=None
) -> tuple[np.dtype, Iterator[tuple[str, Array | jax.Array]]]:
    """The leaves of a diffusers or Orbax component folder in our layout, checked against `spec`.

    Returns:
      (the dtype most tensors are stored in, an iterator of ("/"-path, array)). Leaves are read
      lazily, one (group) at a time: diffusers tensors as numpy arrays, Orbax leaves as jax
      arrays placed by `sharding` (None: the default device).
    """
    folder = Path(folder)
    if is_orbax_component(folder):
        meta = weights.param_metadata(folder / PARAMS_DIR)
        _check_orbax_shapes(folder, meta, spec)

        def orbax_leaves():
            for group in _groups(meta):
                yield from weights.load_params(folder / PARAMS_DIR, group, sharding).items()

        return _main_dtype(d for _, d in meta.values()), orbax_leaves()
    reader, plan, _ = _source_plan(folder, spec)
    leaves = ((p, build_leaf(plan, p, reader.read)) for p in plan.sources)
    return _main_dtype(weights.st_dtype(d) for d in reader.dtypes.values()), leaves


def _main_dtype(dtypes: Iterable[np.dtype]) -> np.dtype:
    """The dtype most tensors are stored in (checkpoints may keep a few in float32)."""
    counts: dict[np.dtype, int] = {}
    for d in dtypes:
        counts[np.dtype(d)] = counts.get(np.dtype(d), 0) + 1
    return max(counts, key=counts.get)


def _check_orbax_shapes(folder, meta, spec: ComponentSpec):
    problems = [f"missing parameter {p!r}" for p in spec.target_shapes if p not in meta]
    problems += [f"unexpected parameter {p!r}" for p in meta if p not in spec.target_shapes]
    problems += [
        f"parameter {p!r} has shape {meta[p][0]}, model expects {s}"
        for p, s in spec.target_shapes.items()
        if p in meta and meta[p][0] != s
    ]
    if problems:
        raise ConversionError(
            f"{folder}: checkpoint does not match the model:\n  " + "\n  ".join(problems)
        )


def staging(dst: Path, overwrite: bool) -> Path:
    """A new empty folder beside `dst` to write its content into, then `commit` it; raises
    FileExistsError if dst exists and not `overwrite`."""
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists (pass --overwrite, or overwrite=True, to replace it)")
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, dst: Path) -> None:
    """Replace dst by the finished staging folder (a crash before this leaves dst untouched)."""
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{os.getpid()}"
        dst.rename(old)
        tmp.rename(dst)
        shutil.rmtree(old)
    else:
        tmp.rename(dst)


def component_to_orbax(src: Path, out: Path, spec: ComponentSpec) -> None:
    """Write the diffusers component folder `src` (of the spec `spec`) as our Orbax component
    folder into the existing folder `out`, recording the safetensors file layout to restore."""
    reader, plan, aliases = _source_plan(src, spec)
    leaves = ((p, build_leaf(plan, p, reader.read)) for p in plan.sources)
    weights.save_params(out / PARAMS_DIR, leaves, group_bytes=STREAM_GROUP_BYTES)
    shutil.copy2(src / "config.json", out / "config.json")
    marker = {
        "format": 1,
        "component": spec.kind,
        "safetensors_layout": reader.layout(),
        "aliases": aliases,
    }
    (out / MARKER).write_text(json.dumps(marker, indent=1) + "\n")


def component_to_diffusers(src: Path, out: Path, spec: ComponentSpec) -> None:
    """Write our Orbax component folder `src` (of the spec `spec`) as a diffusers component
    folder into the existing folder `out`, in the file layout it came from when recorded."""
    meta = weights.param_metadata(src / PARAMS_DIR)
    _check_orbax_shapes(src, meta, spec)
    rules = {r.ours: r for r in spec.rules}
    specs: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    for path, (shape, dtype) in meta.items():
        rule = rules[path]
        one = shape[1:] if rule.stacked else shape
        theirs = source_shape(rule, one)
        for i in range(shape[0]) if rule.stacked else [None]:
            specs[rule.theirs.format(layer=i)] = (theirs, dtype)
    marker = json.loads((src / MARKER).read_text())
    aliases = {a: spec.aliases[a] for a in marker.get("aliases", [])}
    for alias, name in aliases.items():
        specs[alias] = specs[name]
    layout = marker.get("safetensors_layout")
    if layout is None or set(layout["weight_map"]) != set(specs):
        layout = weights.default_layout(specs, spec.weights_basename)

    def tensors():
        for group in _groups(meta):
            for path, value in weights.load_params(src / PARAMS_DIR, group).items():
                for name, tensor in split_leaf(rules[path], np.asarray(value)):
                    yield name, tensor
                    yield from ((a, tensor) for a, n in aliases.items() if n == name)

    weights.write_safetensors(out, specs, tensors(), layout)
    shutil.copy2(src / "config.json", out / "config.json")


def _groups(meta):
    """Leaf names in groups of at most STREAM_GROUP_BYTES (a larger leaf alone), in order."""
    group, size = [], 0
    for path, (shape, dtype) in meta.items():
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if group and size + nbytes > STREAM_GROUP_BYTES:
            yield group
            group, size = [], 0
        group.append(path)
        size += nbytes
    if group:
        yield group
