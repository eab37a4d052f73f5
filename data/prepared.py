"""The prepared-dataset format (written by `python -m tools.prepare_data`) and its reader.

A prepared dataset is a folder:

    meta.json                 settings and counts; written last, so its presence means complete
    settings.json             the preparation settings, compared when a run resumes
    skipped.jsonl             entries left out: {"path", "reason"} a line
    <split>/shard-00000.array_record, ...   records (ArrayRecord, one record per example)
    <split>/shard-00000.json  per shard: the (F, H, W) or (T, h, w) shape, path of each record
                              and the entries it skipped; written after its shard (resume marker)

A dataset prepared in slices (`--shard_index i --num_shards n`) is a folder of such folders,
`part-00000-of-00004/`, ...; `open_prepared` reads all parts in order as one dataset.

Records (numpy arrays and str):
    clips:    frames (F, H, W, 3) uint8, caption, path
    latents:  latent_mean, latent_logvar (T, h, w, C) float32 (unscaled: not multiplied by the
              VAE scaling factor), text (S, Dt) float32 T5 states, first_frame (H, W, 3) uint8
              (the image-to-video condition), caption, path
Each record is an `.npz` archive (numpy's format, no pickle) of those fields. Clip records follow
the listing's order; latent records the order their encode batches ran (clips of one shape are
batched together), the same on every run with the same arguments.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import numpy as np

KINDS = ("clips", "latents")
FIELDS = {
    "clips": ("frames", "caption", "path"),
    "latents": ("latent_mean", "latent_logvar", "text", "first_frame", "caption", "path"),
}
FORMAT = "cogvideox-prepared/1"
_PART = re.compile(r"part-(\d{5})-of-(\d{5})")


def encode_record(example: dict) -> bytes:
    """A record's bytes: the fields as an uncompressed .npz archive (str fields as numpy str)."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in example.items()})
    return buf.getvalue()


def decode_record(data: bytes) -> dict:
    """The inverse of `encode_record`: numpy arrays, and str for text fields."""
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: str(z[k]) if z[k].dtype.kind == "U" else z[k] for k in z.files}


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def part_name(index: int, count: int) -> str:
    return f"part-{index:05d}-of-{count:05d}"


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write a file under a temporary name and rename it: readers see all of it or nothing."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


class ShardWriter:
    """Writes shard `index` of a split folder record by record: the ArrayRecord file under a
    temporary name, renamed on `close`, then the sidecar json (shapes, paths, skipped). A shard
    counts as written once its sidecar exists (`shard_done`)."""

    def __init__(self, folder: Path, index: int):
        from array_record.python.array_record_module import ArrayRecordWriter

        folder.mkdir(parents=True, exist_ok=True)
        self.final = folder / f"{shard_name(index)}.array_record"
        self.sidecar = folder / f"{shard_name(index)}.json"
        self.tmp = folder / f".{self.final.name}.partial"
        self.writer = ArrayRecordWriter(str(self.tmp), "group_size:1")
        self.shapes, self.paths, self.skipped = [], [], []

    def add(self, example: dict, shape: tuple[int, int, int]) -> None:
        self.writer.write(encode_record(example))
        self.shapes.append([int(v) for v in shape])
        self.paths.append(example["path"])

    def skip(self, path: str, reason: str) -> None:
        self.skipped.append({"path": path, "reason": reason})

    def close(self) -> None:
        self.writer.close()
        os.replace(self.tmp, self.final)
        info = {"shapes": self.shapes, "paths": self.paths, "skipped": self.skipped}
        atomic_write(self.sidecar, json.dumps(info))


def shard_done(folder: Path, index: int) -> bool:
    return (folder / f"{shard_name(index)}.json").is_file() and (
        folder / f"{shard_name(index)}.array_record"
    ).is_file()


def read_shard_info(folder: Path, index: int) -> dict:
    return json.loads((folder / f"{shard_name(index)}.json").read_text())


class RecordSource:
    """Random access to the records of ArrayRecord files, decoded to dicts; what
    `grain.MapDataset.source` takes. Picklable: the reader opens on first use."""

    def __init__(self, paths: list[str], count: int):
        self.paths, self.count, self._reader = list(paths), count, None

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < self.count:
            raise IndexError(f"record {index} out of range: the source has {self.count}")
        if self._reader is None:
            from array_record.python.array_record_data_source import ArrayRecordDataSource

            self._reader = ArrayRecordDataSource(self.paths)
        return decode_record(self._reader[index])

    def __getstate__(self):
        return {"paths": self.paths, "count": self.count, "_reader": None}

    def __repr__(self) -> str:
        return f"RecordSource({len(self.paths)} files, {self.count} records)"


class Prepared:
    """An opened prepared dataset (see the module docstring); use `open_prepared`."""

    def __init__(self, parts: list[Path], metas: list[dict]):
        self.parts, self._metas = parts, metas
        first = metas[0]
        self.kind: str = first["kind"]
        self.splits: tuple[str, ...] = tuple(first["splits"])
        counts = {s: sum(m["splits"][s]["count"] for m in metas) for s in self.splits}
        skipped = sum(m["num_skipped"] for m in metas)
        self.meta: dict = {**first, "counts": counts, "num_skipped": skipped, "parts": len(parts)}

    def _check_split(self, split: str) -> None:
        if split not in self.splits:
            raise KeyError(f"{self.parts[0]}: no split {split!r}; it has {list(self.splits)}")

    def source(self, split: str = "train") -> RecordSource:
        """Records of `split` in index order (all parts, each in shard order)."""
        self._check_split(split)
        paths = [
            str(part / split / f"{shard_name(i)}.array_record")
            for part, meta in zip(self.parts, self._metas, strict=True)
            for i, n in enumerate(meta["splits"][split]["shard_counts"])
            if n  # an empty ArrayRecord file holds no keys to read
        ]
        return RecordSource(paths, self.meta["counts"][split])

    def shapes(self, split: str = "train") -> np.ndarray:
        """(N, 3) int64: (F, H, W) of each clip, or (T, h, w) of each latent, in index order,
        read from the stored index (no record is read)."""
        self._check_split(split)
        arrays = [np.load(part / split / "shapes.npy") for part in self.parts]
        return np.concatenate(arrays).astype(np.int64).reshape(-1, 3)

    def skipped(self) -> list[dict]:
        """The entries left out, {"path", "reason"}, from every part."""
        out = []
        for part in self.parts:
            lines = (part / "skipped.jsonl").read_text().splitlines()
            out += [json.loads(line) for line in lines if line]
        return out


def read_meta(folder: Path) -> dict | None:
    """meta.json of a complete prepared folder, or None if it has none."""
    path = Path(folder) / "meta.json"
    if not path.is_file():
        return None
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, this reader needs {FORMAT!r}")
    return meta


def open_prepared(data_dir: str | os.PathLike) -> Prepared:
    """A prepared dataset folder (or a folder of its `part-i-of-n` slices, all complete)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir}: no such prepared dataset folder")
    meta = read_meta(data_dir)
    if meta is not None:
        return Prepared([data_dir], [meta])
    parts = sorted(p for p in data_dir.iterdir() if _PART.fullmatch(p.name) and p.is_dir())
    if not parts:
        hint = " (preparation not finished?)" if (data_dir / "settings.json").exists() else ""
        raise FileNotFoundError(
            f"{data_dir}: not a prepared dataset: no meta.json and no part-*-of-* folders{hint}"
        )
    total = int(_PART.fullmatch(parts[0].name).group(2))
    want = [part_name(i, total) for i in range(total)]
    missing = [n for n in want if read_meta(data_dir / n) is None]
    if missing or len(parts) != total:
        raise FileNotFoundError(f"{data_dir}: incomplete parts (no meta.json): {missing}")
    metas = [read_meta(p) for p in parts]
    for p, m in zip(parts, metas, strict=True):
        if (m["kind"], m["splits"].keys()) != (metas[0]["kind"], metas[0]["splits"].keys()):
            raise ValueError(f"{p}: kind/splits differ from {parts[0]}")
    return Prepared(parts, metas)
