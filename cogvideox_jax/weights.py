"""Weight files: streaming safetensors reading and writing, and Orbax parameter checkpoints.

Memory stays bounded by the largest tensor (or stacked leaf), not the model: safetensors are read
one tensor at a time through their headers, written by streaming each tensor to its offset (the
safetensors library can only write whole in-memory dicts), and Orbax checkpoints are written leaf
group by leaf group with Orbax's partial saving and read back with partial loading.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from safetensors import SafetensorError
from safetensors import safe_open as _safe_open

INDEX_SUFFIX = ".safetensors.index.json"

_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


def st_dtype(name: str) -> np.dtype:
    """numpy dtype of a safetensors dtype name ("BF16", "F32", ...)."""
    return np.dtype(_ST_DTYPES[name])


def safetensors_files(folder: Path) -> tuple[list[Path], dict | None]:
    """The weight files of a diffusers/transformers component folder, and its index (if sharded)."""
    indexes = sorted(folder.glob(f"*{INDEX_SUFFIX}"))
    if len(indexes) > 1:
        raise ValueError(f"{folder}: several safetensors index files: {[p.name for p in indexes]}")
    if indexes:
        index = json.loads(indexes[0].read_text())
        names = sorted(set(index["weight_map"].values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{indexes[0]}: lists missing files {missing}")
        return [folder / n for n in names], index
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights")
    if len(files) > 1:
        raise ValueError(f"{folder}: several *.safetensors files but no *{INDEX_SUFFIX}")
    return files, None


@contextlib.contextmanager
def safe_open(path, framework: str):
    """safetensors' `safe_open`, its errors (a truncated or corrupt file) naming the file."""
    try:
        with _safe_open(path, framework=framework) as f:
            yield f
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


class SafetensorsReader:
    """Reads tensors one at a time from one or several safetensors files (headers up front)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.files, self.index = safetensors_files(self.folder)
        self.file_of: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        self.file_metadata: dict[str, dict | None] = {}
        for path in self.files:
            with safe_open(path, framework="flax") as f:
                self.file_metadata[path.name] = f.metadata()
                for name in f.keys():
                    if name in self.file_of:
                        raise ValueError(
                            f"tensor {name!r} is stored twice ({self.file_of[name]}, {path})"
                        )
                    sl = f.get_slice(name)
                    self.file_of[name] = path
                    self.shapes[name] = tuple(sl.get_shape())
                    self.dtypes[name] = sl.get_dtype()
        if self.index is not None:
            listed = self.index["weight_map"]
            wrong = sorted(
                n
                for n in set(listed) | set(self.file_of)
                if listed.get(n) != getattr(self.file_of.get(n), "name", None)
            )
            if wrong:
                raise ValueError(f"{self.folder}: index and files disagree on tensors {wrong}")

    def read(self, name: str) -> np.ndarray:
        # The flax framework reads bfloat16 (numpy's cannot); arrays come back bit-exact.
        with safe_open(self.file_of[name], framework="flax") as f:
            return np.asarray(f.get_tensor(name))

    def layout(self) -> dict:
        """How the tensors were split into files, to write them back the same way."""
        return {
            "weight_map": {n: p.name for n, p in self.file_of.items()},
            "file_metadata": self.file_metadata,
            "index_metadata": None if self.index is None else self.index.get("metadata"),
            "index_name": None if self.index is None else _index_name(self.folder),
        }


def _index_name(folder: Path) -> str:
    return next(folder.glob(f"*{INDEX_SUFFIX}")).name


def default_layout(
    specs: Mapping[str, tuple[tuple[int, ...], np.dtype]],
    basename: str,
    max_shard_bytes: int = 10 * 2**30,
) -> dict:
    """diffusers-style file names: one file, or `-0000i-of-0000n` shards of <= max_shard_bytes."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, (shape, dtype) in specs.items():
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    n = len(shards)
    if n == 1:
        fnames = [f"{basename}.safetensors"]
    else:
        fnames = [f"{basename}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    return {
        "weight_map": {name: fnames[i] for i, names in enumerate(shards) for name in names},
        "file_metadata": {f: {"format": "pt"} for f in fnames},
        "index_metadata": None,
        "index_name": None if n == 1 else f"{basename}{INDEX_SUFFIX}",
    }


def write_safetensors(
    folder: Path,
    specs: Mapping[str, tuple[tuple[int, ...], np.dtype]],
    tensors: Iterable[tuple[str, np.ndarray]],
    layout: dict,
) -> None:
    """Stream tensors into safetensors files laid out as `layout` says.

    `specs` (name -> shape, dtype) fixes every header before data is written; `tensors` then
    yields each (name, array) once, in any order.
    """
    weight_map = layout["weight_map"]
    if set(weight_map) != set(specs):
        extra, missing = sorted(set(weight_map) - set(specs)), sorted(set(specs) - set(weight_map))
        raise ValueError(
            f"file layout does not match the tensors: extra {extra}, missing {missing}"
        )
    handles, offsets = {}, {}
    try:
        for fname in sorted(set(weight_map.values())):
            names = sorted(n for n, f in weight_map.items() if f == fname)
            header, pos = {}, 0
            meta = layout["file_metadata"].get(fname)
            if meta is not None:
                header["__metadata__"] = meta
            for n in names:
                shape, dtype = specs[n]
                nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
                header[n] = {
                    "dtype": _ST_NAMES[np.dtype(dtype)],
                    "shape": list(shape),
                    "data_offsets": [pos, pos + nbytes],
                }
                pos += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
            f = open(folder / fname, "wb")
            handles[fname] = f
            f.write(struct.pack("<Q", len(raw)) + raw)
            base = 8 + len(raw)
            f.truncate(base + pos)
            for n in names:
                offsets[n] = base + header[n]["data_offsets"][0]
        written = set()
        for name, arr in tensors:
            shape, dtype = specs[name]
            if name in written or arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
                raise ValueError(f"tensor {name!r}: duplicate or not {shape} {dtype}")
            written.add(name)
            f = handles[weight_map[name]]
            f.seek(offsets[name])
            f.write(np.ascontiguousarray(arr).tobytes())
        if written != set(specs):
            raise ValueError(f"tensors never written: {sorted(set(specs) - written)}")
    finally:
        for f in handles.values():
            f.close()
    if layout.get("index_name"):
        index = {
            "metadata": layout.get("index_metadata") or {},
            "weight_map": dict(sorted(weight_map.items())),
        }
        if "total_size" not in index["metadata"] and layout.get("index_metadata") is None:
            index["metadata"]["total_size"] = sum(
                int(np.prod(s)) * np.dtype(d).itemsize for s, d in specs.values()
            )
        (folder / layout["index_name"]).write_text(json.dumps(index, indent=2) + "\n")


# Orbax parameter checkpoints (a pytree of numpy/jax arrays under `<path>`).


def nest(flat: Mapping[str, np.ndarray]) -> dict:
    """{"/"-path: array} -> nested dicts (the inverse of `flatten`)."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def flatten(tree: Mapping, prefix: str = "") -> dict:
    """Nested mappings -> {"/"-path: leaf}, paths prefixed by `prefix`."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, key + "/") if isinstance(v, Mapping) else {key: v})
    return out


def save_params(path: Path, leaves: Iterable[tuple[str, np.ndarray]], group_bytes: int = 2**30):
    """Write (path, array) leaves to an Orbax checkpoint at `path`, in groups of at most
    `group_bytes` (a larger leaf alone), so only one group is held at a time."""
    from orbax.checkpoint import v1 as ocp

    path = Path(path).resolve()  # Orbax requires absolute paths
    ctx = ocp.Context()
    # Orbax copies host arrays before writing, in case the caller mutates them meanwhile; ours
    # are never touched again, and the copy would double peak memory.
    ctx.memory.deepcopy_host_arrays = False
    group: dict[str, np.ndarray] = {}
    size = 0
    started = False
    with ctx:
        for name, arr in leaves:
            if group and size + arr.nbytes > group_bytes:  # a larger leaf is saved alone
                ocp.partial.save(path, nest(group))
                started, group, size = True, {}, 0
            group[name] = arr
            size += arr.nbytes
        if group or not started:
            ocp.partial.save(path, nest(group))
        ocp.partial.finalize(path)


def param_metadata(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Flat path -> (shape, dtype) of an Orbax parameter checkpoint, without reading data."""
    from orbax.checkpoint import v1 as ocp

    meta = ocp.metadata(Path(path).resolve()).metadata
    return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in flatten(meta).items()}


def load_params(path: Path, names: Iterable[str], sharding=None) -> dict[str, jax.Array]:
    """Read some leaves of an Orbax parameter checkpoint (others are not read)."""
    from orbax.checkpoint import v1 as ocp

    meta = param_metadata(path)
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = {n: jax.ShapeDtypeStruct(*meta[n], sharding=sharding) for n in names}
    ctx = ocp.Context()
    ctx.pytree.loading.partial_load = True
    with ctx:
        return flatten(ocp.load(Path(path).resolve(), nest(abstract)))
