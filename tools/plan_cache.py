"""A cache of compiled plans (tools.aot): the memory figures and the optimised HLO text of a
config's train step for a topology, so that a repeated plan or mesh search costs no compile.

Keyed by the config (its JSON), the topology, the jax and libtpu versions, the compiler flags
(`LIBTPU_INIT_ARGS`) and the source of this repository's model and trainer packages
(cogvideox_jax/, train/, configs/): a change to any of them is a new key. Entries are written
atomically (a temporary folder renamed into place), so an interrupted search leaves no half
entry.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import tempfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DIR = os.path.join(
    os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "cogvideox_jax", "plans"
)


@functools.cache
def _versions() -> str:
    out = []
    for dist in ("jax", "jaxlib", "libtpu"):
        try:
            out.append(f"{dist}={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            out.append(f"{dist}=none")
    return ",".join(out)


@functools.cache
def _source_digest() -> str:  # once per process: a search keys many candidates
    h = hashlib.sha256()
    for pkg in ("cogvideox_jax", "train", "configs"):
        for f in sorted((ROOT / pkg).rglob("*.py")):
            h.update(str(f.relative_to(ROOT)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def key(config, topology: str) -> str:
    h = hashlib.sha256()
    flags = os.environ.get("LIBTPU_INIT_ARGS", "")  # compiler flags change the plan
    parts = (config.to_json(sort_keys=True), topology, _versions(), _source_digest())
    for part in parts + ((flags,) if flags else ()):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def has(cache_dir: str, k: str) -> bool:
    return (Path(cache_dir) / k / "figures.json").is_file()


def load(cache_dir: str, k: str) -> tuple[dict, str | None] | None:
    d = Path(cache_dir) / k
    try:
        figures = json.loads((d / "figures.json").read_text())
    except (OSError, ValueError):
        return None
    hlo = d / "hlo.txt.gz"
    text = gzip.decompress(hlo.read_bytes()).decode() if hlo.exists() else None
    return figures, text


def store(cache_dir: str, k: str, figures: dict, hlo: str | None) -> None:
    base = Path(cache_dir)
    base.mkdir(parents=True, exist_ok=True)
    if (base / k).exists():
        return
    tmp = Path(tempfile.mkdtemp(prefix=f".{k}.", dir=base))
    (tmp / "figures.json").write_text(json.dumps(figures))
    if hlo is not None:
        (tmp / "hlo.txt.gz").write_bytes(gzip.compress(hlo.encode(), compresslevel=6))
    try:
        tmp.rename(base / k)
    except OSError:  # another process stored the same plan first
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
