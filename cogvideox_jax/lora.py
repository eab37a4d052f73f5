"""Low-rank adapters (LoRA) on the transformer's projections, and their exchange with diffusers.

An adapter adds `scale * (x @ A) @ B` to a frozen projection `x @ W` (scale = alpha / rank; A is
initialised as PEFT does, kaiming-uniform, and B at zero, so a new adapter changes nothing).
Targets use diffusers' module names: `to_q`, `to_k`, `to_v`, `to_out.0` (attention, the default
of diffusers' CogVideoX LoRA scripts) and `ff.net.0.proj`, `ff.net.2` (feed-forward). Adapters
are `LoraParam`s (a kind of `nnx.Param`), attached to every block of a built transformer
(`attach`), so a run can train them alone: `nnx.split(model, LoraParam, ...)`.

Exchange format (diffusers / PEFT): `pytorch_lora_weights.safetensors` with keys
`transformer.transformer_blocks.{i}.attn1.to_q.lora_A.weight` (rank, in) and `.lora_B.weight`
(out, rank). `to_diffusers` folds the scale into B and states `lora_alpha = r` in the file's
`lora_adapter_metadata`, so every loader (diffusers' `load_lora_weights`, with or without
metadata support) applies exactly our adapter with no factor to remember. `from_diffusers`
reads PEFT files, with the scale from that metadata when present (alpha = rank otherwise).

Our own LoRA folder (`save` / `load`): `lora.json` (rank, alpha, targets and the transformer's
diffusers config) and `params/`, an Orbax checkpoint of the adapter tree (blocks stacked).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from cogvideox_jax import components, convert, weights
from cogvideox_jax.transformer import TransformerConfig

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata entry
CONFIG_FILE = "lora.json"
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclasses.dataclass(frozen=True)
class Target:
    module: str  # attribute path of the projection's module inside a block
    kernel: str  # the frozen kernel's attribute on that module
    adapter: str  # the adapter's attribute on that module
    in_ndim: int  # leading kernel axes that are inputs
    in_names: tuple[str | None, ...]  # logical axis names of those inputs
    out_names: tuple[str | None, ...]  # ... and of the outputs


TARGETS = {
    "to_q": Target("attn1", "to_q_kernel", "to_q_lora", 1, ("embed",), ("heads", "kv")),
    "to_k": Target("attn1", "to_k_kernel", "to_k_lora", 1, ("embed",), ("heads", "kv")),
    "to_v": Target("attn1", "to_v_kernel", "to_v_lora", 1, ("embed",), ("heads", "kv")),
    "to_out.0": Target("attn1", "to_out_kernel", "to_out_lora", 2, ("heads", "kv"), ("embed",)),
    "ff.net.0.proj": Target("ff/proj", "kernel", "lora", 1, ("embed",), ("mlp",)),
    "ff.net.2": Target("ff/out", "kernel", "lora", 1, ("mlp",), ("embed",)),
}


class LoraParam(nnx.Param):
    """An adapter matrix: the trainable part of a LoRA model."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Adapter rank, alpha (the scale is alpha / rank) and targets (keys of TARGETS)."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(
                f"LoRA targets {list(self.targets)}: each must be one of {list(TARGETS)}, "
                "at least one, no repeats"
            )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_json(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}

    @classmethod
    def from_json(cls, d: Mapping) -> LoraConfig:
        return cls(int(d["rank"]), float(d["alpha"]), tuple(d["targets"]))


def parse_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
    """'to_q,to_k' or a sequence -> a tuple of target names."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",")]
    return tuple(t for t in targets if t)


class Adapter(nnx.Module):
    """scale * (x @ a) @ b, with a (*in, rank) and b (rank, *out) (per block inside the scan)."""

    def __init__(self, a: LoraParam, b: LoraParam, in_ndim: int, scale: float, dtype):
        self.a, self.b = a, b
        self.in_ndim, self.scale, self.dtype = in_ndim, scale, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (..., *in) -> (..., *out) in the compute dtype."""
        a, b = self.a[...].astype(self.dtype), self.b[...].astype(self.dtype)
        xa = jnp.tensordot(x.astype(self.dtype), a, axes=self.in_ndim)
        return self.scale * jnp.tensordot(xa, b, axes=1)


def _module(block, path: str):
    for name in path.split("/"):
        block = getattr(block, name)
    return block


def _kaiming_uniform(key, shape, fan_in, dtype):
    """PEFT's lora_A initialisation (torch Linear's default): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def attach(model, cfg: LoraConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32) -> None:
    """Add fresh adapters (B = 0: the model's output is unchanged) to every block of `model`."""
    blocks = model.transformer_blocks
    for name in cfg.targets:
        t = TARGETS[name]
        mod = _module(blocks, t.module)
        if getattr(mod, t.adapter, None) is not None:
            raise ValueError(f"the model already has a LoRA adapter on {name}")
        kernel = getattr(mod, t.kernel)
        layers, shape = kernel.shape[0], kernel.shape[1:]
        ins, outs = shape[: t.in_ndim], shape[t.in_ndim :]
        a = _kaiming_uniform(
            rngs.params(), (layers, *ins, cfg.rank), int(np.prod(ins)), param_dtype
        )
        b = jnp.zeros((layers, cfg.rank, *outs), param_dtype)
        setattr(
            mod,
            t.adapter,
            Adapter(
                LoraParam(a, logical_axes=("layers", *t.in_names, None)),
                LoraParam(b, logical_axes=("layers", None, *t.out_names)),
                t.in_ndim,
                cfg.scale,
                model.dtype,
            ),
        )


def adapter_paths(cfg: LoraConfig) -> list[str]:
    """The '/'-paths of the adapter matrices in the model's state (blocks stacked)."""
    out = []
    for name in cfg.targets:
        t = TARGETS[name]
        out += [f"transformer_blocks/{t.module}/{t.adapter}/{m}" for m in ("a", "b")]
    return out


def adapters(model) -> dict[str, np.ndarray]:
    """The adapter matrices of `model` as host arrays, by '/'-path."""
    state = nnx.to_pure_dict(nnx.state(model, LoraParam))
    return {k: np.asarray(v) for k, v in weights.flatten(state).items()}


def load_adapters(model, cfg: LoraConfig, tree: Mapping[str, np.ndarray]) -> None:
    """Attach adapters to `model` and set them from '/'-path arrays (as `adapters` returns)."""
    attach(model, cfg, rngs=nnx.Rngs(0))
    state = nnx.state(model, LoraParam)
    flat = weights.flatten(nnx.to_pure_dict(state))
    missing, extra = sorted(set(flat) - set(tree)), sorted(set(tree) - set(flat))
    if missing or extra:
        raise ValueError(f"LoRA tensors do not match {cfg}: missing {missing}, unexpected {extra}")
    for k, v in flat.items():
        if tuple(tree[k].shape) != tuple(v.shape):
            raise ValueError(f"LoRA tensor {k}: shape {tuple(tree[k].shape)}, model {v.shape}")
    values = {k: jnp.asarray(tree[k], v.dtype) for k, v in flat.items()}
    nnx.replace_by_pure_dict(state, weights.nest(values))
    nnx.update(model, state)


def merge(model) -> None:
    """Fold every adapter into its kernel (W + scale * A @ B, in float32) and remove it."""
    blocks = model.transformer_blocks
    for t in TARGETS.values():
        mod = _module(blocks, t.module)
        ad = getattr(mod, t.adapter, None)
        if ad is None:
            continue
        kernel = getattr(mod, t.kernel)
        a, b = jnp.asarray(ad.a[...], jnp.float32), jnp.asarray(ad.b[...], jnp.float32)
        delta = jax.vmap(lambda a, b: jnp.tensordot(a, b, axes=1))(a, b)
        kernel[...] = (kernel[...].astype(jnp.float32) + ad.scale * delta).astype(kernel.dtype)
        setattr(mod, t.adapter, None)


def fuse(model, cfg: LoraConfig, tree, *, scale: float = 1.0) -> None:
    """Merge adapters into `model`'s weights at `scale` times their strength (diffusers'
    `fuse_lora(lora_scale=...)`): sampling then costs what the base model costs."""
    load_adapters(model, dataclasses.replace(cfg, alpha=cfg.alpha * scale), tree)
    merge(model)


# ---- diffusers (PEFT) format ----


def _diffusers_name(name: str, layer: int, which: str) -> str:
    mod = f"attn1.{name}" if name in ("to_q", "to_k", "to_v", "to_out.0") else name
    return f"transformer.transformer_blocks.{layer}.{mod}.lora_{which}.weight"


def to_diffusers(cfg: LoraConfig, tree: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our adapters -> PEFT tensors (A (rank, in), B * scale (out, rank)), float32 or as stored."""
    out = {}
    for name in cfg.targets:
        t = TARGETS[name]
        base = f"transformer_blocks/{t.module}/{t.adapter}"
        a, b = np.asarray(tree[f"{base}/a"]), np.asarray(tree[f"{base}/b"])
        for i in range(a.shape[0]):
            ai = a[i].reshape(-1, cfg.rank).T
            bi = b[i].reshape(cfg.rank, -1).T
            if cfg.scale != 1.0:
                bi = (bi.astype(np.float32) * np.float32(cfg.scale)).astype(bi.dtype)
            out[_diffusers_name(name, i, "A")] = np.ascontiguousarray(ai)
            out[_diffusers_name(name, i, "B")] = np.ascontiguousarray(bi)
    return out


def diffusers_metadata(cfg: LoraConfig) -> dict[str, str]:
    """safetensors metadata for `to_diffusers`' tensors (the scale is folded: alpha = rank)."""
    peft = {
        "transformer.r": cfg.rank,
        "transformer.lora_alpha": cfg.rank,
        "transformer.target_modules": sorted(cfg.targets),
    }
    return {METADATA_KEY: json.dumps(peft, indent=2, sort_keys=True), "format": "pt"}


_KEY = re.compile(
    r"^(?:transformer\.)?transformer_blocks\.(?P<layer>\d+)\.(?:attn1\.)?"
    r"(?P<target>to_q|to_k|to_v|to_out\.0|ff\.net\.0\.proj|ff\.net\.2)\.lora_(?P<w>[AB])\.weight$"
)


def _peft_scale(metadata: Mapping[str, str] | None, rank: int, source: str) -> float:
    """alpha / rank from diffusers' `lora_adapter_metadata` (1.0 without it, as diffusers does)."""
    if not metadata or METADATA_KEY not in metadata:
        return 1.0
    meta = json.loads(metadata[METADATA_KEY])
    meta = {k.removeprefix("transformer."): v for k, v in meta.items()}
    for pattern in ("rank_pattern", "alpha_pattern"):
        if meta.get(pattern):
            raise ValueError(f"{source}: per-module {pattern} is not supported (uniform LoRA only)")
    r = int(meta.get("r", rank))
    if r != rank:
        raise ValueError(f"{source}: metadata says r={r} but the tensors have rank {rank}")
    return float(meta.get("lora_alpha", r)) / r


def from_diffusers(
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None,
    tcfg: TransformerConfig,
    *,
    source: str = "LoRA",
) -> tuple[LoraConfig, dict[str, np.ndarray]]:
    """PEFT tensors (keys as diffusers writes them, with or without `transformer.`) -> our
    LoraConfig (alpha = rank * the file's scale) and adapter tree. Strict: every key must be a
    LoRA A/B of a supported target, every block must carry the same targets, ranks agree."""
    found: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    unknown = []
    for key, value in tensors.items():
        m = _KEY.match(key)
        if m is None:
            unknown.append(key)
            continue
        found.setdefault((m["target"], m["w"]), {})[int(m["layer"])] = np.asarray(value)
    if unknown:
        raise ValueError(
            f"{source}: tensors that are not LoRA weights of a supported target "
            f"({list(TARGETS)}): {sorted(unknown)[:8]}{' ...' if len(unknown) > 8 else ''}"
        )
    targets = tuple(t for t in TARGETS if (t, "A") in found or (t, "B") in found)
    if not targets:
        raise ValueError(f"{source}: no LoRA tensors")
    n = tcfg.num_layers
    ranks = set()
    for t in targets:
        for w in "AB":
            layers = found.get((t, w), {})
            missing = sorted(set(range(n)) - set(layers))
            extra = sorted(set(layers) - set(range(n)))
            if missing or extra:
                raise ValueError(
                    f"{source}: {t}.lora_{w} must be present in each of the model's {n} blocks "
                    f"(missing blocks {missing}, blocks beyond the model {extra})"
                )
            ranks |= {v.shape[0] if w == "A" else v.shape[1] for v in layers.values()}
    if len(ranks) != 1:
        raise ValueError(f"{source}: the LoRA ranks differ between modules ({sorted(ranks)})")
    rank = ranks.pop()
    scale = _peft_scale(metadata, rank, source)
    cfg = LoraConfig(rank, rank * scale, targets)
    d, heads, kv = tcfg.width, tcfg.num_heads, tcfg.head_dim
    shapes = {  # (in shape, out shape) in our layout
        "to_q": ((d,), (heads, kv)),
        "to_k": ((d,), (heads, kv)),
        "to_v": ((d,), (heads, kv)),
        "to_out.0": ((heads, kv), (d,)),
        "ff.net.0.proj": ((d,), (4 * d,)),
        "ff.net.2": ((4 * d,), (d,)),
    }
    tree = {}
    for name in targets:
        t, (ins, outs) = TARGETS[name], shapes[name]
        a_list, b_list = [], []
        for i in range(n):
            a, b = found[(name, "A")][i], found[(name, "B")][i]
            want_a, want_b = (rank, int(np.prod(ins))), (int(np.prod(outs)), rank)
            if a.shape != want_a or b.shape != want_b:
                raise ValueError(
                    f"{source}: block {i} {name}: lora_A {a.shape} / lora_B {b.shape}, "
                    f"expected {want_a} / {want_b} for this model"
                )
            a_list.append(a.T.reshape(*ins, rank))
            b_list.append(b.T.reshape(rank, *outs))
        base = f"transformer_blocks/{t.module}/{t.adapter}"
        tree[f"{base}/a"] = np.stack(a_list)
        tree[f"{base}/b"] = np.stack(b_list)
    return cfg, tree


def read_diffusers(path: str | Path, tcfg: TransformerConfig):
    """A diffusers LoRA (`pytorch_lora_weights.safetensors` or the folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / DIFFUSERS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such LoRA file")
    with safe_open(str(path), framework="np") as f:
        metadata = f.metadata()
    return from_diffusers(load_file(str(path)), metadata, tcfg, source=str(path))


def write_diffusers(folder: str | Path, cfg: LoraConfig, tree: Mapping[str, np.ndarray]) -> Path:
    """Write `pytorch_lora_weights.safetensors` into `folder` (created); returns the file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / DIFFUSERS_FILE
    tmp = out.with_suffix(".tmp")
    save_file(to_diffusers(cfg, tree), str(tmp), metadata=diffusers_metadata(cfg))
    tmp.rename(out)
    return out


# ---- our LoRA folder ----


def save(folder: str | Path, cfg: LoraConfig, tcfg: TransformerConfig, tree, *, overwrite=False):
    """Write an Orbax LoRA folder (lora.json + params/); it appears only once complete."""
    folder = Path(folder)
    tmp = convert.staging(folder, overwrite)
    try:
        weights.save_params(tmp / "params", ((k, np.asarray(v)) for k, v in sorted(tree.items())))
        meta = {"format": 1, "lora": cfg.to_json(), "transformer": tcfg.to_diffusers()}
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        convert.commit(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_folder(path: str | Path) -> bool:
    """Whether `path` is our LoRA folder (it holds CONFIG_FILE)."""
    return (Path(path) / CONFIG_FILE).is_file()


def load(path: str | Path, tcfg: TransformerConfig | None = None):
    """(LoraConfig, adapter tree) from our LoRA folder or a diffusers LoRA file/folder (the
    latter needs `tcfg`, the transformer it adapts)."""
    path = Path(path)
    if is_folder(path):
        meta = json.loads((path / CONFIG_FILE).read_text())
        cfg = LoraConfig.from_json(meta["lora"])
        stored = TransformerConfig.from_diffusers(meta["transformer"])
        if tcfg is not None and stored != tcfg:
            raise ValueError(f"{path}: a LoRA for {stored}, not for the model {tcfg}")
        names = list(weights.param_metadata(path / "params"))
        tree = {k: np.asarray(v) for k, v in weights.load_params(path / "params", names).items()}
        return cfg, tree
    if tcfg is None:
        raise ValueError(f"{path}: reading a diffusers LoRA needs the transformer's config")
    return read_diffusers(path, tcfg)


def write_merged(
    base: str | Path, cfg: LoraConfig, tree, out: str | Path, *, overwrite: bool = False
) -> list[str]:
    """The base transformer with the adapters merged (`merge`), written as a diffusers folder in
    the base's stored dtype. A whole model folder as `base` gives a whole model folder, its other
    entries copied as they are. The result appears at `out` only once complete."""
    base, out = Path(base), Path(out)
    whole = (base / "model_index.json").is_file()
    model = components.load_transformer(base)
    load_adapters(model, cfg, tree)
    merge(model)
    tmp = convert.staging(out, overwrite)
    report = []
    try:
        dst = tmp / "transformer" if whole else tmp
        with tempfile.TemporaryDirectory(dir=tmp.parent) as scratch:
            components.save_transformer(model, Path(scratch) / "orbax")
            dst.mkdir(parents=True, exist_ok=True)
            components.convert_component("orbax-to-diffusers", Path(scratch) / "orbax", dst)
        report.append(f"merged rank-{cfg.rank} LoRA on {list(cfg.targets)} into transformer")
        if whole:
            for entry in sorted(base.iterdir()):
                if entry.name == "transformer":
                    continue
                if entry.is_dir():
                    shutil.copytree(entry, tmp / entry.name)
                else:
                    shutil.copy2(entry, tmp / entry.name)
                report.append(f"copied {entry.name}")
        convert.commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report
