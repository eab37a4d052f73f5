"""Import of the original SAT (SwissArmyTransformer) CogVideoX checkpoints, without torch.

The SAT releases hold a transformer `mp_rank_00_model_states.pt` (tensors under `module`, named
`model.diffusion_model.*`) and a VAE `3d-vae.pt` (under `state_dict`), both torch zip archives.
They are read here without torch (`TorchZipCheckpoint`: the pickle is rebuilt with tensor
references only, never running code from the file, and tensors are read on demand from the
memory-mapped archive).

Each tensor of the equivalent diffusers model is traced back to its SAT source: a rename, or a
chunk of one SAT tensor (the fused q/k/v projection, the 12-chunk adaptive-LayerNorm modulation
shared by norm1 and norm2). The decoder's up blocks are numbered the other way round. The result
then goes through the diffusers rules of `convert.py`, so the Orbax folder is the one
`diffusers-to-orbax` writes for the diffusers conversion of the same checkpoint.

SAT names: zai-org/CogVideo `sat/dit_video_concat.py` (transformer mixins) and
`sat/vae_modules/cp_enc_dec.py` (VAE), mapped as diffusers
`scripts/convert_cogvideox_to_diffusers.py` maps them. Accounting is strict: every SAT tensor is
used or matches `DROPPED`, and every tensor the model needs is present with its shape.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import mmap
import os
import pickle
import re
import shutil
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from cogvideox_jax import components, convert, weights
from cogvideox_jax.convert import ConversionError
from cogvideox_jax.transformer import VARIANTS, transformer_config
from cogvideox_jax.vae import VaeConfig, vae_config

TRANSFORMER_FILE = "mp_rank_00_model_states.pt"
VAE_FILE = "3d-vae.pt"
PREFIX = "model.diffusion_model."  # SAT's name for the transformer inside its diffusion engine
MAX_PROBLEMS = 40  # listed per error (a wrong --variant mismatches every tensor)

# diffusers name -> SAT name (after PREFIX); a tuple (SAT name, chunks, picked chunks) where the
# diffusers tensor is made of equal chunks of the SAT tensor's first axis. `_B`: a diffusers block,
# `_L`: a SAT layer (BaseTransformer's attention and MLP), `_A`: AdaLNMixin's per-layer modules.
_B, _L, _A = "transformer_blocks.{layer}.", "transformer.layers.{layer}.", "mixins.adaln_layer."
_QKV = _L + "attention.query_key_value.{wb}"  # rows: q, k, v
# AdaLNMixin's Linear gives 12 chunks: video shift/scale/gate for attention, the same for the MLP,
# then text's six; diffusers' norm1 takes the attention ones (video, text), norm2 the MLP ones.
_ADALN = _A + "adaLN_modulations.{layer}.1.{wb}"
TRANSFORMER_NAMES: dict[str, str | tuple[str, int, tuple[int, ...]]] = {
    "patch_embed.proj.{wb}": "mixins.patch_embed.proj.{wb}",  # Conv2d (1.0), Linear (1.5)
    "patch_embed.text_proj.{wb}": "mixins.patch_embed.text_proj.{wb}",
    "patch_embed.pos_embedding": "mixins.pos_embed.pos_embedding",  # learned (5B-I2V)
    "time_embedding.linear_1.{wb}": "time_embed.0.{wb}",
    "time_embedding.linear_2.{wb}": "time_embed.2.{wb}",
    "ofs_embedding.linear_1.{wb}": "ofs_embed.0.{wb}",  # 1.5-I2V
    "ofs_embedding.linear_2.{wb}": "ofs_embed.2.{wb}",
    _B + "norm1.norm.{wb}": _L + "input_layernorm.{wb}",
    _B + "norm1.linear.{wb}": (_ADALN, 12, (0, 1, 2, 6, 7, 8)),
    _B + "attn1.to_q.{wb}": (_QKV, 3, (0,)),
    _B + "attn1.to_k.{wb}": (_QKV, 3, (1,)),
    _B + "attn1.to_v.{wb}": (_QKV, 3, (2,)),
    _B + "attn1.norm_q.{wb}": _A + "query_layernorm_list.{layer}.{wb}",
    _B + "attn1.norm_k.{wb}": _A + "key_layernorm_list.{layer}.{wb}",
    _B + "attn1.to_out.0.{wb}": _L + "attention.dense.{wb}",
    _B + "norm2.norm.{wb}": _L + "post_attention_layernorm.{wb}",
    _B + "norm2.linear.{wb}": (_ADALN, 12, (3, 4, 5, 9, 10, 11)),
    _B + "ff.net.0.proj.{wb}": _L + "mlp.dense_h_to_4h.{wb}",
    _B + "ff.net.2.{wb}": _L + "mlp.dense_4h_to_h.{wb}",
    "norm_final.{wb}": "transformer.final_layernorm.{wb}",
    "norm_out.norm.{wb}": "mixins.final_layer.norm_final.{wb}",
    "norm_out.linear.{wb}": "mixins.final_layer.adaLN_modulation.1.{wb}",
    "proj_out.{wb}": "mixins.final_layer.linear.{wb}",
}

# SAT tensors that make no parameter here (full-match patterns), and why.
_P = re.escape(PREFIX)
DROPPED = {
    "transformer": {
        # Rotary3DPositionEmbeddingMixin's cos/sin tables (buffers in the 5B release).
        _P + r"mixins\.pos_embed\.freqs_(sin|cos)": "RoPE cache (recomputed)",
        # SAT BaseTransformer's own tables, replaced by the CogVideoX mixins (never used).
        _P + r"transformer\.(position|word)_embeddings\.weight": "unused SAT embedding",
        # Whole-engine training checkpoints also hold the frozen T5 and VAE.
        r"conditioner\..+": "frozen text encoder of a training checkpoint",
        r"first_stage_model\..+": "frozen VAE of a training checkpoint",
    },
    "vae": {r"loss\..+": "training loss (LPIPS, discriminator)"},
}
# Basic3DPositionEmbeddingMixin's fixed 3D sin-cos table (2B), recomputed from the config; a
# learned table of the same name is a parameter (5B-I2V).
_SINCOS = _P + r"mixins\.pos_embed\.pos_embedding"

# VAE config per released model. Source: diffusers scripts/convert_cogvideox_to_diffusers.py
# (--scaling_factor 1.15258426 for 2B, 0.7 for 5B; version 1.5 sets invert_scale_latents).
_VAE_BY_VARIANT = {
    "2b": dict(scaling_factor=1.15258426),
    "5b": dict(scaling_factor=0.7),
    "5b-i2v": dict(scaling_factor=0.7),
    "1.5-5b": dict(scaling_factor=0.7, invert_scale_latents=True),
    "1.5-5b-i2v": dict(scaling_factor=0.7, invert_scale_latents=True),
}


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one diffusers tensor comes from: chunks `picked` of `chunks` equal chunks of the
    first axis of SAT tensor `sat` (all of it when chunks == 1), concatenated."""

    sat: str
    chunks: int = 1
    picked: tuple[int, ...] = (0,)

    def shape(self, sat_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (sat_shape[0] // self.chunks * len(self.picked), *sat_shape[1:])

    def take(self, x: np.ndarray) -> np.ndarray:
        if self.chunks == 1:
            return x
        n = x.shape[0] // self.chunks
        return np.concatenate([x[i * n : (i + 1) * n] for i in self.picked])


def _template_regex(template: str) -> re.Pattern:
    fields = {"{layer}": r"(?P<layer>\d+)", "{wb}": r"(?P<wb>weight|bias)"}
    parts = re.split(r"(\{layer\}|\{wb\})", template)
    return re.compile("".join(fields[p] if p in fields else re.escape(p) for p in parts))


_TRANSFORMER_PATTERNS = [(_template_regex(k), v) for k, v in TRANSFORMER_NAMES.items()]


def transformer_source(name: str) -> Source:
    """The SAT source of a diffusers `CogVideoXTransformer3DModel` tensor name."""
    for regex, sat in _TRANSFORMER_PATTERNS:
        if m := regex.fullmatch(name):
            sat, chunks, picked = sat if isinstance(sat, tuple) else (sat, 1, (0,))
            return Source(PREFIX + sat.format(**m.groupdict()), chunks, picked)
    raise ValueError(f"no SAT name for transformer tensor {name!r}")


# diffusers VAE module paths -> SAT's (`{p}`: the rest of the name); other names are the same
# (conv_in, norm_out, conv_out). SAT's decoder lists its up blocks from the finest level
# (`self.up.insert(0, up)`), diffusers in the order they run: `{up}` is the reversed index.
_VAE_NAMES = [
    (r"encoder\.down_blocks\.(?P<i>\d+)\.resnets\.(?P<j>\d+)\.", "encoder.down.{i}.block.{j}."),
    (r"encoder\.down_blocks\.(?P<i>\d+)\.downsamplers\.0\.", "encoder.down.{i}.downsample."),
    (r"(?P<e>encoder|decoder)\.mid_block\.resnets\.0\.", "{e}.mid.block_1."),
    (r"(?P<e>encoder|decoder)\.mid_block\.resnets\.1\.", "{e}.mid.block_2."),
    (r"decoder\.up_blocks\.(?P<i>\d+)\.resnets\.(?P<j>\d+)\.", "decoder.up.{up}.block.{j}."),
    (r"decoder\.up_blocks\.(?P<i>\d+)\.upsamplers\.0\.", "decoder.up.{up}.upsample."),
]


def vae_source(name: str, num_levels: int) -> Source:
    """The SAT source of a diffusers `AutoencoderKLCogVideoX` tensor name."""
    name = name.replace(".conv_shortcut.", ".nin_shortcut.")  # the resnets' 1x1x1 Conv3d
    for pattern, sat in _VAE_NAMES:
        if m := re.fullmatch(pattern + r"(?P<p>.+)", name):
            fields = m.groupdict()
            if "i" in fields:
                fields["up"] = num_levels - 1 - int(fields["i"])
            return Source(sat.format(**fields) + fields["p"])
    return Source(name)


# Reading torch zip checkpoints without torch.

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "UntypedStorage": np.uint8,
}
_TORCH_DTYPES = {
    "float64": np.float64,
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64,
    "int32": np.int32,
    "int16": np.int16,
    "int8": np.int8,
    "uint8": np.uint8,
    "bool": np.bool_,
}


@dataclasses.dataclass(frozen=True)
class TensorRef:
    """A tensor in a torch checkpoint: its storage record, element offset, shape and strides."""

    key: str
    dtype: np.dtype
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class _Storage:
    key: str
    dtype: np.dtype | None  # None: a storage type this reader does not know


class _Opaque:
    """Stands for any object other than tensors and dicts (optimizer state, saved arguments):
    accepts every pickle operation and runs nothing."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


def _tensor(storage, offset, shape, stride, *args, dtype=None):
    if not isinstance(storage, _Storage):
        return _Opaque()
    dt = dtype if dtype is not None else storage.dtype
    if dt is None:
        raise ConversionError(f"tensor storage {storage.key!r} has a dtype this reader cannot read")
    return TensorRef(storage.key, np.dtype(dt), int(offset), tuple(shape), tuple(stride))


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _tensor
        if module == "torch._utils" and name == "_rebuild_tensor_v3":
            return lambda s, o, size, stride, grad, hooks, dtype, *m: _tensor(
                s, o, size, stride, dtype=dtype
            )
        if module == "torch._utils" and name.startswith("_rebuild_parameter"):
            return lambda data, *args: data
        if (module, name) == ("torch._tensor", "_rebuild_from_type_v2"):
            return lambda func, cls, args, state: func(*args)
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch", "Size"):
            return tuple
        if module == "torch" and name.endswith("Storage"):
            return ("storage-type", _STORAGE_DTYPES.get(name))
        if module == "torch" and name in _TORCH_DTYPES:
            return _TORCH_DTYPES[name]
        return type(name, (_Opaque,), {})

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise ConversionError(f"unknown persistent object {pid!r} in the checkpoint")
        storage_type, key = pid[1], str(pid[2])
        dtype = storage_type[1] if isinstance(storage_type, tuple) else None
        return _Storage(key, dtype)


class TorchZipCheckpoint:
    """A torch zip checkpoint (`torch.save` since torch 1.6) read without torch: `root` is the
    saved object with tensors as `TensorRef`s; `read` copies one out of the memory-mapped file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not zipfile.is_zipfile(self.path):
            raise ConversionError(
                f"{self.path}: not a torch zip checkpoint (saved by torch < 1.6, or with "
                "_use_new_zipfile_serialization=False: load and save it again with torch)"
            )
        with zipfile.ZipFile(self.path) as z:
            self._records = {i.filename: i for i in z.infolist()}
            pkl = [n for n in self._records if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pkl) != 1:
                raise ConversionError(f"{self.path}: a zip file but not a torch checkpoint")
            self._prefix = pkl[0][: -len("data.pkl")]
            order = self._prefix + "byteorder"
            if order in self._records and z.read(order) != b"little":
                raise ConversionError(f"{self.path}: big-endian checkpoints are not supported")
            self.root = _Unpickler(z.open(pkl[0])).load()
        self._file = open(self.path, "rb")
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)

    def read(self, t: TensorRef) -> np.ndarray:
        info = self._records.get(f"{self._prefix}data/{t.key}")
        if info is None or info.compress_type != zipfile.ZIP_STORED:
            raise ConversionError(f"{self.path}: storage {t.key!r} missing or compressed")
        start = info.header_offset
        if self._map[start : start + 4] != b"PK\x03\x04":
            raise ConversionError(f"{self.path}: bad zip entry for storage {t.key!r}")
        name_len, extra_len = struct.unpack("<HH", self._map[start + 26 : start + 30])
        count = info.file_size // t.dtype.itemsize
        last = t.offset + sum((n - 1) * s for n, s in zip(t.shape, t.stride, strict=True))
        if min(t.shape, default=1) > 0 and not 0 <= t.offset <= last < count:
            raise ConversionError(f"{self.path}: tensor outside its storage {t.key!r}")
        base = np.frombuffer(
            self._map, t.dtype, count=count, offset=start + 30 + name_len + extra_len
        )
        item = t.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            base[t.offset :], t.shape, [s * item for s in t.stride], writeable=False
        )
        return np.array(view)  # a copy: nothing keeps the mapping alive

    def close(self) -> None:
        try:
            self._map.close()
        except BufferError:  # an array still views it; it closes when that is collected
            pass
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# Conversion.


def checkpoint_file(src: str | os.PathLike) -> Path:
    """The .pt file of SRC: the file itself, or in a folder: `mp_rank_00_model_states.pt`,
    `3d-vae.pt`, or the iteration folder named by a `latest` file (SAT's save layout)."""
    path = Path(src)
    if path.is_dir():
        if (path / "latest").is_file():
            path = path / (path / "latest").read_text().strip()
        found = [path / n for n in (TRANSFORMER_FILE, VAE_FILE) if (path / n).is_file()]
        if not found:
            raise FileNotFoundError(
                f"{path}: no {TRANSFORMER_FILE}, {VAE_FILE} or `latest` file naming an iteration "
                "folder"
            )
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.name == TRANSFORMER_FILE and (path.parent / "mp_rank_01_model_states.pt").exists():
        raise ConversionError(f"{path.parent}: a model-parallel checkpoint; merge the ranks first")
    return path


def state_dict(ckpt: TorchZipCheckpoint) -> tuple[str, dict[str, TensorRef]]:
    """(component kind, SAT tensors) of a checkpoint: the transformer's `module` or the VAE's
    `state_dict`, told apart by their names."""
    root = ckpt.root
    found = [k for k in ("module", "state_dict") if isinstance(root, Mapping) and k in root]
    if len(found) != 1:
        keys = sorted(map(str, root)) if isinstance(root, Mapping) else type(root).__name__
        raise ConversionError(
            f"{ckpt.path}: expected the tensors under 'module' (SAT transformer) or "
            f"'state_dict' (SAT VAE); found {keys}"
        )
    if not isinstance(root[found[0]], Mapping):
        raise ConversionError(f"{ckpt.path}: {found[0]!r} holds no tensors")
    tensors = dict(root[found[0]])
    bad = sorted(str(k) for k, v in tensors.items() if not isinstance(v, TensorRef))
    if bad:
        raise ConversionError(f"{ckpt.path}: entries that are not tensors: {bad}")
    if any(k.startswith(PREFIX) for k in tensors):
        return "transformer", tensors
    if any(k.startswith(("encoder.", "decoder.")) for k in tensors):
        return "vae", tensors
    raise ConversionError(
        f"{ckpt.path}: neither a SAT transformer ({PREFIX}*) nor a SAT VAE (encoder.*, decoder.*)"
    )


def infer_variant(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """The released transformer variant (`transformer.VARIANTS`) a SAT checkpoint's shapes match."""
    proj = shapes.get(PREFIX + "mixins.patch_embed.proj.weight")
    if proj is None:
        raise ConversionError(f"missing tensor {PREFIX}mixins.patch_embed.proj.weight")
    block = re.compile(re.escape(PREFIX) + r"transformer\.layers\.(\d+)\.")
    layers = {int(m[1]) for n in shapes if (m := block.match(n))}
    seen = dict(
        width=proj[0],
        num_layers=len(layers),
        linear_patches=len(proj) == 2,
        patch_features=int(np.prod(proj[1:])),
        ofs=PREFIX + "ofs_embed.0.weight" in shapes,
    )
    matches = []
    for name in VARIANTS:
        cfg = transformer_config(name)
        facts = dict(
            width=cfg.width,
            num_layers=cfg.num_layers,
            linear_patches=cfg.patch_size_t is not None,
            patch_features=cfg.patch_features,
            ofs=cfg.ofs_embed_dim is not None,
        )
        if facts == seen:
            matches.append(name)
    if len(matches) != 1:
        what = "matches no released variant" if not matches else f"matches {matches}"
        raise ConversionError(
            f"the checkpoint ({seen}) {what}: pass --variant, or --config with a diffusers "
            "config.json"
        )
    return matches[0]


def component_config(kind: str, shapes, variant: str | None, config: str | os.PathLike | None):
    """The diffusers config.json dict of the converted component, and where it came from."""
    if config is not None:
        cfg = json.loads(Path(config).read_text())
        if convert.component_kind(cfg) != kind:
            raise ConversionError(
                f"{config}: not a {kind} config (_class_name={cfg.get('_class_name')!r})"
            )
        return cfg, f"config {config}"
    if kind == "vae":
        if variant is None:
            raise ConversionError(
                "a SAT VAE checkpoint does not say which model it belongs to (the scaling "
                f"factor differs): pass --variant ({', '.join(_VAE_BY_VARIANT)}) or --config"
            )
        return vae_config("cogvideox", **_VAE_BY_VARIANT[variant]).to_diffusers(), variant
    how = "given" if variant else "inferred from shapes"
    variant = variant or infer_variant(shapes)
    return transformer_config(variant).to_diffusers(), f"variant {variant} ({how})"


def trace(kind: str, shapes: Mapping[str, tuple[int, ...]], spec, cfg: Mapping):
    """Sources of every diffusers tensor the model needs and the dropped SAT names, after
    checking that each SAT tensor is used or dropped, is present, and has the model's shape."""
    rules = {r.ours: r for r in spec.rules}
    want: dict[str, tuple[int, ...]] = {}  # diffusers name -> shape the model needs
    for path, shape in spec.target_shapes.items():
        rule = rules[path]
        one = convert.source_shape(rule, shape[1:] if rule.stacked else shape)
        for i in range(spec.num_layers) if rule.stacked else [None]:
            want[rule.theirs.format(layer=i)] = one
    if kind == "transformer":
        source = transformer_source
    else:
        levels = len(VaeConfig.from_diffusers(cfg).block_out_channels)
        source = lambda n: vae_source(n, levels)
    sources = {n: source(n) for n in want}
    dropped = dict(DROPPED[kind])
    if kind == "transformer" and not cfg.get("use_learned_positional_embeddings"):
        dropped[_SINCOS] = "fixed sin-cos table (recomputed)"

    used = {s.sat for s in sources.values()}
    problems, drops = [], {}
    for name in shapes:
        why = next((w for p, w in dropped.items() if re.fullmatch(p, name)), None)
        if why is not None:
            drops.setdefault(why, []).append(name)
        elif name not in used:
            problems.append(f"unexpected SAT tensor {name!r} (matches no rule)")
    by_sat: dict[str, list[str]] = {}
    for n, s in sources.items():
        by_sat.setdefault(s.sat, []).append(n)
    for sat, names in by_sat.items():
        if sat not in shapes:
            problems.append(f"missing SAT tensor {sat!r} (for {', '.join(names)})")
            continue
        got = tuple(shapes[sat])
        s = sources[names[0]]
        if not got or got[0] % s.chunks or any(sources[n].shape(got) != want[n] for n in names):
            need = [want[n] for n in names]
            problems.append(
                f"SAT tensor {sat!r} has shape {got}; the model needs {need} for {names}"
                + (f" ({s.chunks} equal chunks of its first axis)" if s.chunks > 1 else "")
            )
    if problems:
        shown = problems[:MAX_PROBLEMS]
        if len(problems) > MAX_PROBLEMS:
            shown.append(f"... and {len(problems) - MAX_PROBLEMS} more")
        raise ConversionError("SAT checkpoint does not match the model:\n  " + "\n  ".join(shown))
    return sources, drops


def sat_to_orbax(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    variant: str | None = None,
    config: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> list[str]:
    """Convert a SAT transformer or VAE checkpoint to an Orbax component folder; returns a report.

    The diffusers config.json comes from `config` (a path), else from `variant` (a key of
    `transformer.VARIANTS`), else (transformer only) from the variant its shapes match.
    """
    if variant is not None and config is not None:
        raise ValueError("pass a variant or a config, not both")
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {sorted(VARIANTS)}")
    path = checkpoint_file(src)
    dst = Path(dst)
    with TorchZipCheckpoint(path) as ckpt:
        kind, tensors = state_dict(ckpt)
        shapes = {n: t.shape for n, t in tensors.items()}
        cfg, origin = component_config(kind, shapes, variant, config)
        spec = components.component_spec(cfg)
        sources, drops = trace(kind, shapes, spec, cfg)
        plan = convert.plan_to_ours(
            spec.rules,
            {n: s.shape(shapes[s.sat]) for n, s in sources.items()},
            spec.target_shapes,
            spec.num_layers,
        )
        read = lambda n: sources[n].take(ckpt.read(tensors[sources[n].sat]))
        tmp = convert.staging(dst, overwrite)
        try:
            leaves = ((p, convert.build_leaf(plan, p, read)) for p in plan.sources)
            weights.save_params(
                tmp / convert.PARAMS_DIR, leaves, group_bytes=convert.STREAM_GROUP_BYTES
            )
            if config is not None:
                shutil.copy2(config, tmp / "config.json")
            else:
                (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
            marker = {"format": 1, "component": kind, "source": "sat", "aliases": []}
            (tmp / convert.MARKER).write_text(json.dumps(marker, indent=1) + "\n")
            convert.commit(tmp, dst)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    report = [f"read SAT {kind} {path} ({len(tensors)} tensors), {origin}"]
    for why, names in drops.items():
        more = ", ..." if len(names) > 3 else ""
        report.append(f"dropped {why}: {len(names)} tensors ({', '.join(names[:3])}{more})")
    report.append(f"converted {len(sources)} diffusers tensors into {len(plan.sources)} leaves")
    return report
