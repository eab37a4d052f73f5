"""Dataset listings: which videos and images a dataset has and their captions.

Layouts read:
  - a folder with `videos.txt` and `prompts.txt`: line i of each is the path (relative to the
    folder) and the caption of video i (the CogVideoX / finetrainers layout); or, the same way,
    `images.txt` and `prompts.txt` for images (one folder has one of the two listings);
  - a CSV file with columns `path` and `caption`;
  - a JSONL file with one {"path": ..., "caption": ...} object a line;
  - WebDataset tar shards, as img2dataset writes them: a `.tar` file, or a folder of `*.tar`
    files (read in name order). A sample is the members sharing a key (the member's path up to
    the first dot of its file name): an image (.jpg, .jpeg, .png, .webp or .bmp) and its
    caption, the text of a `.txt` member or else the "caption" (or "text") field of a `.json`
    one. A sample is named `<shard>.tar:<key>`, e.g. `00000.tar:000000123`.
A manifest row's file is an image or a video by its extension (IMAGE_EXTENSIONS,
VIDEO_EXTENSIONS), so one manifest can mix both; a row with another extension is skipped. The
rows of videos.txt are videos and those of images.txt images, whatever their extensions.
Manifest paths are relative to the manifest's folder, or absolute inside it. An entry that cannot
be used (no caption, a path leading out of the dataset folder, a missing file, an unknown file
type; a sample with no image or no caption, an unreadable shard) is returned as a `Skipped`
record instead of raising, so that one bad line does not stop a large job.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import posixpath
import tarfile
from pathlib import Path

IMAGE, VIDEO = "image", "video"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".wmv")


@dataclasses.dataclass(frozen=True)
class Entry:
    path: Path  # resolved, inside the dataset folder; for a WebDataset sample, its shard
    caption: str
    name: str  # the path as written in the listing, or "<shard>.tar:<key>"
    modality: str = VIDEO  # IMAGE or VIDEO
    member: str | None = None  # a WebDataset sample's image: its member name in the shard


@dataclasses.dataclass(frozen=True)
class Skipped:
    path: str  # as written in the listing
    reason: str

    def to_json(self) -> dict:
        return {"path": self.path, "reason": self.reason}


def list_dataset(src: str | os.PathLike) -> tuple[list[Entry], list[Skipped]]:
    """The usable entries of a dataset folder, manifest file or tar shard, in listing order, and
    the skipped ones. Raises FileNotFoundError/ValueError only when `src` itself is not a
    dataset."""
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such dataset folder, manifest or .tar shard")
    if src.suffix.lower() == ".tar" and src.is_file():
        return _tar_entries([src])
    if src.is_dir():
        listing = _folder_listing(src)
        if listing is None:
            return _tar_entries(sorted(p for p in src.glob("*.tar") if p.is_file()))
        root, (rows, modality) = src, listing
    elif src.suffix.lower() == ".csv":
        root, rows, modality = src.parent, _csv_rows(src), None
    elif src.suffix.lower() in (".jsonl", ".json"):
        root, rows, modality = src.parent, _jsonl_rows(src), None
    else:
        raise ValueError(
            f"{src}: a dataset is a folder with videos.txt or images.txt, a .csv, a .jsonl, "
            "a .tar shard or a folder of them"
        )
    entries, skipped = [], []
    root = root.resolve()
    for name, caption in rows:
        item = check_entry(root, name, caption, modality)
        (entries if isinstance(item, Entry) else skipped).append(item)
    return entries, skipped


def modality_of(name: str) -> str | None:
    """IMAGE or VIDEO by the file name's extension (any case), None for another extension."""
    ext = posixpath.splitext(name)[1].lower()
    return IMAGE if ext in IMAGE_EXTENSIONS else VIDEO if ext in VIDEO_EXTENSIONS else None


def check_entry(
    root: Path, name: str, caption: str | None, modality: str | None = None
) -> Entry | Skipped:
    """An Entry if `name` (relative to `root`, or absolute) is a file inside `root` (after
    following symlinks), the caption is not empty and the file is an image or a video: of
    `modality`, or when that is None, of the kind its extension names (`modality_of`); else the
    reason as a Skipped."""
    if not name:
        return Skipped(name, "empty path")
    if caption is None or not caption.strip():
        return Skipped(name, "missing caption")
    path = Path(name) if os.path.isabs(name) else root / name
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        return Skipped(name, f"outside the dataset folder {root}")
    if not resolved.is_file():
        return Skipped(name, "missing file")
    modality = modality or modality_of(name)
    if modality is None:
        ext = posixpath.splitext(name)[1] or "(none)"
        return Skipped(
            name,
            f"unknown file type {ext}: images are {', '.join(IMAGE_EXTENSIONS)}; videos are "
            f"{', '.join(VIDEO_EXTENSIONS)}",
        )
    return Entry(resolved, caption.strip(), name, modality)


def _folder_listing(folder: Path) -> tuple[list[tuple[str, str | None]], str] | None:
    """The rows of a videos.txt or images.txt folder and their modality; None for a folder with
    neither but with .tar shards."""
    videos, images, prompts = folder / "videos.txt", folder / "images.txt", folder / "prompts.txt"
    if videos.is_file() and images.is_file():
        raise ValueError(
            f"{folder}: has both videos.txt and images.txt, but prompts.txt can caption one of "
            "them; list both in a CSV or JSONL manifest instead"
        )
    listing = videos if videos.is_file() else images if images.is_file() else None
    if listing is None:
        if any(p.is_file() for p in folder.glob("*.tar")):
            return None
        raise FileNotFoundError(
            f"{folder}: no videos.txt or images.txt (with prompts.txt) and no .tar shards"
        )
    if not prompts.is_file():
        raise FileNotFoundError(
            f"{folder}: no prompts.txt (a dataset folder has {listing.name} and prompts.txt)"
        )
    names = [line.strip() for line in listing.read_text().splitlines()]
    captions = prompts.read_text().splitlines()
    # Trailing blank lines of the listing are not entries; a missing prompt line is a skip.
    while names and not names[-1]:
        names.pop()
    rows = [(n, captions[i] if i < len(captions) else None) for i, n in enumerate(names)]
    return rows, VIDEO if listing is videos else IMAGE


def _csv_rows(path: Path) -> list[tuple[str, str | None]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"path", "caption"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(
                f"{path}: CSV needs columns 'path' and 'caption', missing {sorted(missing)}"
            )
        return [((row["path"] or "").strip(), row["caption"]) for row in reader]


def _jsonl_rows(path: Path) -> list[tuple[str, str | None]]:
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not JSON ({e})") from e
        if not isinstance(obj, dict) or "path" not in obj:
            raise ValueError(f"{path}:{i}: each line must be an object with 'path' and 'caption'")
        caption = obj.get("caption")
        rows.append((str(obj["path"]).strip(), caption if isinstance(caption, str) else None))
    return rows


_IMAGE_MEMBERS = tuple(ext[1:] for ext in IMAGE_EXTENSIONS)  # member extensions, in preference


def _tar_entries(shards: list[Path]) -> tuple[list[Entry], list[Skipped]]:
    """The samples of WebDataset shards, shard by shard in member order. A shard that tarfile
    cannot read to its end is skipped whole (one Skipped naming it)."""
    entries, skipped = [], []
    for shard in shards:
        shard = shard.resolve()
        try:
            with tarfile.open(shard) as tar:
                items = _tar_samples(shard, tar)
        except (tarfile.TarError, OSError) as e:
            skipped.append(Skipped(shard.name, f"unreadable tar shard ({type(e).__name__}: {e})"))
            continue
        for item in items:
            (entries if isinstance(item, Entry) else skipped).append(item)
    return entries, skipped


def _tar_samples(shard: Path, tar: tarfile.TarFile) -> list[Entry | Skipped]:
    """One Entry or Skipped per sample key of an open shard, in the order keys first appear."""
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    for member in tar:
        if not member.isfile():
            continue
        folder, base = posixpath.split(member.name)
        key, dot, ext = base.partition(".")
        if key and dot:
            samples.setdefault(posixpath.join(folder, key), {})[ext.lower()] = member
    out = []
    for key, members in samples.items():
        name = f"{shard.name}:{key}"
        image = next((members[ext] for ext in _IMAGE_MEMBERS if ext in members), None)
        caption = _sample_caption(tar, members) if image is not None else None
        if image is None:
            out.append(Skipped(name, f"no image member ({', '.join(IMAGE_EXTENSIONS)})"))
        elif caption is None:
            out.append(Skipped(name, "missing caption"))
        else:
            out.append(Entry(shard, caption, name, IMAGE, image.name))
    return out


def _sample_caption(tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo]) -> str | None:
    """A sample's caption: its .txt member's text, else its .json member's "caption" or "text"
    field; None if neither gives a non-blank one."""
    if "txt" in members:
        text = tar.extractfile(members["txt"]).read().decode("utf-8", errors="replace").strip()
        if text:
            return text
    if "json" in members:
        try:
            obj = json.loads(tar.extractfile(members["json"]).read())
        except ValueError:  # not JSON, or not UTF-8
            return None
        for field in ("caption", "text"):
            value = obj.get(field) if isinstance(obj, dict) else None
            if isinstance(value, str) and value.strip():
                return value.strip()
    return None


class ShardReader:
    """Reads the image bytes of WebDataset entries. The last shard read stays open (`close`, or
    use as a context manager): a listing's samples of one shard follow each other, and opening a
    shard reads all its member headers. Raises tarfile.TarError or OSError for a shard or member
    that cannot be read, KeyError for a member no longer there."""

    def __init__(self):
        self._path: Path | None = None
        self._tar: tarfile.TarFile | None = None
        self._members: dict[str, tarfile.TarInfo] = {}

    def read(self, entry: Entry) -> bytes:
        if entry.member is None:
            raise ValueError(f"{entry.name}: not a WebDataset sample")
        if entry.path != self._path:
            self.close()
            self._tar = tarfile.open(entry.path)
            self._path = entry.path
            self._members = {m.name: m for m in self._tar.getmembers()}
        return self._tar.extractfile(self._members[entry.member]).read()

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
        self._path, self._tar, self._members = None, None, {}

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
