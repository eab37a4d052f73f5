"""Dataset listings: which video files a dataset has and their captions.

Three layouts are read:
  - a folder with `videos.txt` and `prompts.txt`: line i of each is the path (relative to the
    folder) and the caption of video i (the CogVideoX / finetrainers layout);
  - a CSV file with columns `path` and `caption`;
  - a JSONL file with one {"path": ..., "caption": ...} object a line.
Manifest paths are relative to the manifest's folder, or absolute inside it. An entry that cannot
be used (no caption, a path leading out of the dataset folder, a missing file) is returned as a
`Skipped` record instead of raising, so that one bad line does not stop a large job.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Entry:
    path: Path  # resolved, inside the dataset folder
    caption: str
    name: str  # the path as written in the listing


@dataclasses.dataclass(frozen=True)
class Skipped:
    path: str  # as written in the listing
    reason: str

    def to_json(self) -> dict:
        return {"path": self.path, "reason": self.reason}


def list_dataset(src: str | os.PathLike) -> tuple[list[Entry], list[Skipped]]:
    """The usable entries of a dataset folder or manifest file, in listing order, and the skipped
    ones. Raises FileNotFoundError/ValueError only when `src` itself is not a dataset."""
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such dataset folder or manifest")
    if src.is_dir():
        root, rows = src, _folder_rows(src)
    elif src.suffix.lower() == ".csv":
        root, rows = src.parent, _csv_rows(src)
    elif src.suffix.lower() in (".jsonl", ".json"):
        root, rows = src.parent, _jsonl_rows(src)
    else:
        raise ValueError(f"{src}: a dataset is a folder with videos.txt, a .csv or a .jsonl")
    entries, skipped = [], []
    root = root.resolve()
    for name, caption in rows:
        item = check_entry(root, name, caption)
        (entries if isinstance(item, Entry) else skipped).append(item)
    return entries, skipped


def check_entry(root: Path, name: str, caption: str | None) -> Entry | Skipped:
    """An Entry if `name` (relative to `root`, or absolute) is a file inside `root` (after
    following symlinks) and the caption is not empty; else the reason as a Skipped."""
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
    return Entry(resolved, caption.strip(), name)


def _folder_rows(folder: Path) -> list[tuple[str, str | None]]:
    videos, prompts = folder / "videos.txt", folder / "prompts.txt"
    for f in (videos, prompts):
        if not f.is_file():
            raise FileNotFoundError(
                f"{folder}: no {f.name} (a dataset folder has videos.txt and prompts.txt)"
            )
    names = [line.strip() for line in videos.read_text().splitlines()]
    captions = prompts.read_text().splitlines()
    # Trailing blank lines of videos.txt are not entries; a missing prompt line is a skip.
    while names and not names[-1]:
        names.pop()
    return [(n, captions[i] if i < len(captions) else None) for i, n in enumerate(names)]


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
