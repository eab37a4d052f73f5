"""The prepared-dataset format (written by `python -m tools.prepare_data`) and its reader.

A prepared dataset is a TensorFlow Datasets (TFDS) folder, written with tensorflow-datasets and
array_record (no TensorFlow needed), plus a few files of our own:

    dataset_info.json, features.json      TFDS metadata: splits, shard lengths, features
    cogvideox_prepared-<split>.array_record-00000-of-00003, ...
                              records (ArrayRecord, one serialised example per record), named by
                              the TFDS template {DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}
    meta.json                 settings and counts (records per split; per modality, "image"
                              and "video", in "modalities"); written last, so its presence
                              means complete
    settings.json             the preparation settings, compared when a run resumes
    skipped.jsonl             entries left out: {"path", "reason"} a line
    <split>/shapes.npy        (N, 3) int64: the (F, H, W) or (T, h, w) shape of each record
    <split>/shard-00000.json  per shard: shapes, paths and skipped entries; written after its
                              shard file (the resume marker)

So `tfds.builder_from_directory(OUT).as_data_source()["train"]` reads it too (Text fields come
back as bytes there; `open_prepared` returns str). A shard file appears under its final name only
when complete (it is written as <split>/shard-00000.array_record.partial, then renamed), and a
split with no entries still has one (empty) shard file, so every split is a TFDS split (TFDS
gives its info but cannot make a data source of it: `open_prepared` skips such parts).

A dataset prepared in slices (`--shard_index i --num_shards n`) is a folder of such folders,
`part-00000-of-00004/`, ... (each one a TFDS dataset); `open_prepared` reads all parts in order
as one dataset.

Records (the TFDS features; `open_prepared` gives numpy arrays and str; an image is a one-frame
clip, F = 1, and its latent has T = 1):
    clips:    frames (F, H, W, 3) uint8, caption, path (Text)
    latents:  latent_mean, latent_logvar (T, h, w, C) float32 (unscaled: not multiplied by the
              VAE scaling factor), text (S, Dt) float32 T5 states, first_frame (H, W, 3) uint8
              (the image-to-video condition), caption, path (Text)
Arrays are `tfds.features.Tensor(..., encoding="bytes")`: raw bytes, no compression (zlib saved
6-7% on a 49x480x720 clip and on latents, for 4x slower reads). Clip records follow the listing's
order; latent records the order their encode batches ran (clips of one shape are batched
together), the same on every run with the same arguments.
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

import numpy as np

KINDS = ("clips", "latents")
FIELDS = {
    "clips": ("frames", "caption", "path"),
    "latents": ("latent_mean", "latent_logvar", "text", "first_frame", "caption", "path"),
}
TEXT_FIELDS = ("caption", "path")
FORMAT = "cogvideox-prepared/2"
DATASET_NAME = "cogvideox_prepared"
FILENAME_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
_PART = re.compile(r"part-(\d{5})-of-(\d{5})")


def features(kind: str, meta: dict | None = None):
    """The `tfds.features.FeaturesDict` of a kind's records. Latents need `meta` with
    latent_channels, text_len and text_dim (the fixed sizes)."""
    import tensorflow_datasets as tfds

    def tensor(shape, dtype):
        return tfds.features.Tensor(shape=shape, dtype=dtype, encoding="bytes")

    text = {k: tfds.features.Text() for k in TEXT_FIELDS}
    if kind == "clips":
        return tfds.features.FeaturesDict(
            {"frames": tensor((None, None, None, 3), np.uint8), **text}
        )
    if kind != "latents":
        raise ValueError(f"unknown prepared kind {kind!r}; expected one of {KINDS}")
    missing = [k for k in ("latent_channels", "text_len", "text_dim") if k not in (meta or {})]
    if missing:
        raise ValueError(f"latent features need {missing} in the meta")
    c = meta["latent_channels"]
    return tfds.features.FeaturesDict(
        {
            "latent_mean": tensor((None, None, None, c), np.float32),
            "latent_logvar": tensor((None, None, None, c), np.float32),
            "text": tensor((meta["text_len"], meta["text_dim"]), np.float32),
            "first_frame": tensor((None, None, 3), np.uint8),
            **text,
        }
    )


def file_template(folder: Path, split: str):
    """The `tfds.core.ShardedFileTemplate` naming the shard files of `split` in `folder`."""
    import tensorflow_datasets as tfds

    return tfds.core.ShardedFileTemplate(
        data_dir=folder,
        template=FILENAME_TEMPLATE,
        dataset_name=DATASET_NAME,
        split=split,
        filetype_suffix="array_record",
    )


def shard_path(folder: Path, split: str, index: int, count: int) -> Path:
    """Shard `index` of `count` of `split`, by the TFDS template."""
    name = file_template(folder, split).sharded_filepath(shard_index=index, num_shards=count).name
    return Path(folder) / name


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
    """Writes shard `index` of `count` of a split into the dataset folder `out`, record by
    record: the ArrayRecord file as <split>/shard-k.array_record.partial, renamed on `close` to
    its TFDS name (`shard_path`), then the sidecar <split>/shard-k.json (shapes, paths,
    skipped). A shard counts as written once both exist (`shard_done`)."""

    def __init__(self, out: Path, split: str, index: int, count: int, feats):
        from array_record.python.array_record_module import ArrayRecordWriter

        folder = Path(out) / split
        folder.mkdir(parents=True, exist_ok=True)
        self.features = feats
        self.final = shard_path(out, split, index, count)
        self.sidecar = folder / f"{shard_name(index)}.json"
        self.tmp = folder / f"{shard_name(index)}.array_record.partial"
        self.writer = ArrayRecordWriter(str(self.tmp), "group_size:1")
        self.shapes, self.paths, self.skipped = [], [], []

    def add(self, example: dict, shape: tuple[int, int, int]) -> None:
        self.writer.write(self.features.serialize_example(example))
        self.shapes.append([int(v) for v in shape])
        self.paths.append(example["path"])

    def skip(self, path: str, reason: str) -> None:
        self.skipped.append({"path": path, "reason": reason})

    def close(self) -> None:
        self.writer.close()
        os.replace(self.tmp, self.final)
        info = {"shapes": self.shapes, "paths": self.paths, "skipped": self.skipped}
        atomic_write(self.sidecar, json.dumps(info))


def shard_done(out: Path, split: str, index: int, count: int) -> bool:
    sidecar = Path(out) / split / f"{shard_name(index)}.json"
    return sidecar.is_file() and shard_path(out, split, index, count).is_file()


def read_shard_info(out: Path, split: str, index: int) -> dict:
    return json.loads((Path(out) / split / f"{shard_name(index)}.json").read_text())


def write_tfds_metadata(out: Path, feats, shard_counts: dict[str, list[int]]) -> None:
    """dataset_info.json and features.json for the complete shards of every split in `out`
    ({split: records per shard}), so that `tfds.builder_from_directory(out)` opens it."""
    import tensorflow_datasets as tfds

    infos = []
    for split, counts in shard_counts.items():
        files = [shard_path(out, split, k, len(counts)) for k in range(len(counts))]
        infos.append(
            tfds.core.SplitInfo(
                name=split,
                shard_lengths=[int(n) for n in counts],
                num_bytes=sum(f.stat().st_size for f in files),
                filename_template=file_template(out, split),
            )
        )
    tfds.folder_dataset.write_metadata(
        data_dir=out,
        features=feats,
        split_infos=infos,
        filename_template=FILENAME_TEMPLATE,
        check_data=False,
        description="CogVideoX training data prepared by `python -m tools.prepare_data` "
        "(format: data/prepared.py; our settings in meta.json).",
    )


def decode_example(example: dict) -> dict:
    """A TFDS data-source example with str for the Text fields (TFDS gives bytes)."""
    return {k: v.decode("utf-8") if k in TEXT_FIELDS else v for k, v in example.items()}


class RecordSource:
    """Random access to the records of one split over the parts of a prepared dataset, each read
    through its TFDS data source; dicts of numpy arrays and str. What `grain.MapDataset.source`
    takes. Picklable: the TFDS sources open on first use (in each worker process), by one
    thread: Grain reads from many, and TFDS's lazy imports deadlock when several threads open
    sources at once."""

    def __init__(self, parts: list[str], split: str, counts: list[int]):
        self.parts, self.split, self.counts = [str(p) for p in parts], split, list(counts)
        self.starts = np.cumsum([0, *self.counts])
        self._sources = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _open(self) -> list:
        import tensorflow_datasets as tfds

        sources = []
        for part, count in zip(self.parts, self.counts, strict=True):
            if count == 0:  # TFDS cannot make a data source of a split with no records
                sources.append(None)
                continue
            src = tfds.builder_from_directory(part).as_data_source()[self.split]
            if len(src) != count:
                raise ValueError(
                    f"{part}: TFDS split {self.split!r} has {len(src)} records, meta.json {count}"
                )
            sources.append(src)
        return sources

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range: the source has {len(self)}")
        if self._sources is None:
            with self._lock:
                if self._sources is None:
                    self._sources = self._open()
        part = int(np.searchsorted(self.starts, index, side="right")) - 1
        return decode_example(self._sources[part][index - int(self.starts[part])])

    def __getstate__(self):
        state = dict(self.__dict__, _sources=None)
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state, _lock=threading.Lock())

    def __repr__(self) -> str:
        return f"RecordSource({self.split!r}: {len(self.parts)} parts, {len(self)} records)"


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
        # Records per modality, summed over the parts; absent in datasets prepared before it.
        if all("modalities" in m for m in metas):
            self.meta["modalities"] = {
                k: sum(m["modalities"].get(k, 0) for m in metas) for k in first["modalities"]
            }
        else:
            self.meta.pop("modalities", None)

    def _check_split(self, split: str) -> None:
        if split not in self.splits:
            raise KeyError(f"{self.parts[0]}: no split {split!r}; it has {list(self.splits)}")

    def source(self, split: str = "train") -> RecordSource:
        """Records of `split` in index order (all parts, each in shard order)."""
        self._check_split(split)
        counts = [m["splits"][split]["count"] for m in self._metas]
        return RecordSource(self.parts, split, counts)

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


def concatenate(datasets: list[Prepared]) -> Prepared:
    """Prepared datasets of one kind and splits as one, records one dataset after another (a
    mixture's datasets, train/inputs.py)."""
    return Prepared([p for d in datasets for p in d.parts], [m for d in datasets for m in d._metas])


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
