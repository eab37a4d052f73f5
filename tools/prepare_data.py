r"""Prepare a video and image dataset for training: decoded clips, or VAE latents and T5 states.

  python -m tools.prepare_data SRC OUT [--fps 8] [--frames 49] [--size native|480x720]
  python -m tools.prepare_data SRC OUT --buckets 49x480x720,25x480x720,49x768x432
  python -m tools.prepare_data SRC OUT --buckets 49x480x720,1x480x720,1x768x768   # + images
  python -m tools.prepare_data SRC OUT --model MODEL_DIR    # latents + text embeddings

SRC is a folder with videos.txt (or images.txt) and prompts.txt, a .csv / .jsonl manifest (path,
caption) whose rows may mix images and videos (told apart by extension), or WebDataset shards
of captioned images (a .tar file or a folder of them, as img2dataset writes); see
data/sources.py. OUT is a TFDS dataset (ArrayRecord shards and TFDS metadata, written with
tensorflow-datasets, no TensorFlow), plus our meta.json, shapes and skipped list; read it with
`data.prepared.open_prepared(OUT)` or `tfds.builder_from_directory(OUT)` (format in
data/prepared.py).

An image becomes a one-frame clip: a record like a video's with frames (1, H, W, 3), or with
--model a latent with T = 1. Images take --size as videos do, or with --buckets the 1xHxW bucket
nearest their aspect ratio (videos take the others); an image that would have to be enlarged
more than --max_upscale times (2) to reach its size is skipped as too small. meta.json counts
the records of each modality ("modalities": {"image": n, "video": m}).

Without --model, records hold the clips as uint8 frames, by default at their own size (--size
native: height and width cropped down to multiples of 16), so that the run's encoder (the demo's
or input.encoder_model's) sees what was filmed. With --model (a diffusers-layout folder
with vae/, text_encoder/, tokenizer/), our VAE computes each clip's posterior (mean, logvar) and
our T5 its caption's states (the transformer's max_text_seq_length tokens, 226 if it has no
transformer/), in batches sharded over all local devices.

Entries that cannot be used are skipped and listed at the end and in OUT/skipped.jsonl
(--on_bad error stops at the first instead: listing problems first, then clips in order).
The output is written in shards of --shard_size entries; an interrupted run started again with
the same arguments continues after the last complete shard. A large dataset can be prepared in
slices, one process each: --shard_index i --num_shards n takes every n-th entry and writes
OUT/part-0000i-of-0000n/ (a TFDS dataset of its own); open_prepared(OUT) reads all the parts as
one dataset.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

import tools
from data import prepared
from data.sources import IMAGE, VIDEO, Entry, ShardReader, Skipped, list_dataset
from data.video import MAX_UPSCALE, NATIVE, BadClip, BadImage, load_clip, load_image

if TYPE_CHECKING:
    from cogvideox_jax.encoders import Encoder


class BadEntry(Exception):
    """Raised with --on_bad error: the first entry that cannot be used."""


def parse_size(text: str) -> tuple[int, int] | str:
    if text.lower() == NATIVE:
        return NATIVE
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--size must be HxW, e.g. 480x720, or native, got {text!r}"
        ) from None
    return h, w


def parse_buckets(text: str) -> list[tuple[int, int, int]]:
    try:
        out = [tuple(int(v) for v in b.lower().split("x")) for b in text.split(",") if b]
    except ValueError:
        out = []
    if not out or any(len(b) != 3 for b in out):
        raise argparse.ArgumentTypeError(f"--buckets must be FxHxW,FxHxW,..., got {text!r}")
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m tools.prepare_data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "src", help="dataset folder (videos.txt or images.txt + prompts.txt), .csv/.jsonl, .tar(s)"
    )
    p.add_argument("out", help="output folder")
    p.add_argument("--model", default=None, help="model folder: write latents, not clips")
    p.add_argument("--fps", type=float, default=8.0, help="frame rate clips are sampled at")
    p.add_argument("--frames", type=int, default=49, help="most frames a clip (--size mode)")
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--size",
        type=parse_size,
        default=None,
        help="HxW or native (default: 480x720 with --model, else native)",
    )
    group.add_argument(
        "--buckets", type=parse_buckets, default=None, help="FxHxW,... (1xHxW for images)"
    )
    p.add_argument(
        "--max_upscale",
        type=float,
        default=MAX_UPSCALE,
        help="skip images that need enlarging more than this to reach their size",
    )
    p.add_argument("--frame_multiple", type=int, default=4, help="4: 4k+1 frames; 8 for 1.5")
    p.add_argument("--eval_examples", type=int, default=0, help="first N entries -> 'eval'")
    p.add_argument("--on_bad", choices=["skip", "error"], default="skip")
    p.add_argument("--batch", type=int, default=8, help="encode batch (rounded up to devices)")
    p.add_argument("--shard_size", type=int, default=128, help="entries per output shard")
    p.add_argument("--shard_index", type=int, default=0, help="this slice of the listing")
    p.add_argument("--num_shards", type=int, default=1, help="number of slices")
    p.add_argument("--max_shards", type=int, default=None, help="debug: stop after k shards")
    args = p.parse_args(argv)
    if args.size is None and args.buckets is None:
        # Latents for a CogVideoX model are made at its resolution; raw clips keep theirs.
        args.size = (480, 720) if args.model else NATIVE
    if not 0 <= args.shard_index < args.num_shards:
        p.error(f"--shard_index ({args.shard_index}) must be in [0, {args.num_shards})")
    if args.shard_size < 1 or args.batch < 1:
        p.error("--shard_size and --batch must be positive")
    if args.max_upscale < 1:
        p.error(f"--max_upscale must be at least 1, got {args.max_upscale}")
    m = args.frame_multiple
    bad = [b for b in args.buckets or () if b[0] != 1 and ((b[0] - 1) % m or b[0] < m + 1)]
    if bad or (args.buckets is None and args.frames < m + 1):
        p.error(
            f"frame counts must be k * {m} + 1 with k >= 1 (--frame_multiple {m}), "
            f"or 1 for images: {bad}"
        )
    # Images go to the one-frame buckets, videos to the others.
    args.image_buckets = [b for b in args.buckets if b[0] == 1] if args.buckets else None
    args.video_buckets = [b for b in args.buckets if b[0] > 1] if args.buckets else None
    return args


def check_buckets(src: str, entries: list[Entry], args) -> None:
    """Refuse, before any work, --buckets with no bucket for a modality the dataset has."""
    if not args.buckets:
        return
    for modality, buckets, kind in [
        (IMAGE, args.image_buckets, "one-frame bucket (1xHxW)"),
        (VIDEO, args.video_buckets, f"video bucket ({args.frame_multiple}k+1 frames)"),
    ]:
        n = sum(e.modality == modality for e in entries)
        if n and not buckets:
            raise ValueError(f"{src}: {n} {modality} entries, but --buckets has no {kind}")


def listing_digest(entries: list[Entry], skipped: list[Skipped]) -> str:
    """A fingerprint of the listing, so that a resumed run refuses a changed dataset."""
    h = hashlib.sha256()
    for e in entries:
        h.update(json.dumps([e.name, e.caption]).encode())
        if e.member is not None:  # a WebDataset sample: which member is its image
            h.update(json.dumps(e.member).encode())
    for s in skipped:
        h.update(json.dumps([s.path, s.reason]).encode())
    return h.hexdigest()


def settings_of(args, digest: str, text_len: int | None, images: bool) -> dict:
    """What determines the output; a resumed run must match it exactly. `max_upscale` is one of
    them only for a dataset with images (video datasets keep the settings they had)."""
    settings = {
        "src": str(Path(args.src).resolve()),
        "listing_sha256": digest,
        "kind": "latents" if args.model else "clips",
        "model": str(Path(args.model).resolve()) if args.model else None,
        "text_len": text_len,
        "fps": args.fps,
        "frames": None if args.buckets else args.frames,
        "size": list(args.size) if isinstance(args.size, tuple) else args.size,
        "buckets": [list(b) for b in args.buckets] if args.buckets else None,
        "frame_multiple": args.frame_multiple,
        "eval_examples": args.eval_examples,
        "shard_size": args.shard_size,
        "shard_index": args.shard_index,
        "num_shards": args.num_shards,
    }
    if images:
        settings["max_upscale"] = args.max_upscale
    return settings


def check_settings(out: Path, settings: dict) -> None:
    """Record the settings in a new OUT, or refuse to resume one prepared differently."""
    path = out / "settings.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            lines = "; ".join(f"{k}: was {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"{out} was prepared with other settings; use a new OUT or the same "
                f"arguments ({lines})"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    prepared.atomic_write(path, json.dumps(settings, indent=1))


def text_length(model: Path) -> int:
    """The transformer's text length (diffusers' max_text_seq_length), 226 without one."""
    config = model / "transformer" / "config.json"
    if config.is_file():
        return int(json.loads(config.read_text()).get("max_text_seq_length", 226))
    return 226


def load_entry(e: Entry, args, reader: ShardReader) -> np.ndarray:
    """(F, H, W, 3) uint8: a video's clip, or an image as a one-frame clip. Raises BadClip (or
    BadImage) naming the entry and the reason it cannot be used."""
    if e.modality == VIDEO:
        return load_clip(
            e.path,
            fps=args.fps,
            max_frames=args.frames,
            frame_multiple=args.frame_multiple,
            size=args.size,
            buckets=args.video_buckets,
        )
    source = e.path
    if e.member is not None:  # a WebDataset sample: the image's bytes from its shard
        try:
            source = reader.read(e)
        except (tarfile.TarError, OSError, KeyError) as err:
            raise BadImage(e.name, f"unreadable ({type(err).__name__}: {err})") from err
    return load_image(
        source,
        name=e.name,
        size=args.size,
        buckets=args.image_buckets,
        max_upscale=args.max_upscale,
    )


def prepare_shard(
    entries: list[Entry], args, encoder, writer: prepared.ShardWriter, bar, reader: ShardReader
):
    """Write the records of one shard of entries. Clips (and images, one-frame clips) are
    written as they are decoded; with an encoder, clips of equal shape wait until a batch is
    full (or the shard ends), so latent records come in the order their batches were encoded."""
    pending: dict[tuple, list] = {}
    for e in entries:
        try:
            clip = load_entry(e, args, reader)
        except BadClip as err:
            if args.on_bad == "error":
                raise BadEntry(f"{e.name}: {err.reason}") from err
            writer.skip(e.name, err.reason)
            bar.update(1)
            continue
        if encoder is None:
            writer.add({"frames": clip, "caption": e.caption, "path": e.name}, clip.shape[:3])
        else:
            group = pending.setdefault(clip.shape, [])
            group.append((e, clip))
            if len(group) == encoder.batch:
                write_latents(pending.pop(clip.shape), encoder, writer)
        bar.update(1)
    for group in pending.values():
        write_latents(group, encoder, writer)


def write_latents(group: list[tuple[Entry, np.ndarray]], encoder: Encoder, writer) -> None:
    """Encode clips of one shape and their captions; add their latent records."""
    latents = encoder.latents([clip for _, clip in group])
    texts = encoder.texts([e.caption for e, _ in group])
    for (e, clip), (mean, logvar), text in zip(group, latents, texts, strict=True):
        record = {
            "latent_mean": mean.astype(np.float32),
            "latent_logvar": logvar.astype(np.float32),
            "text": text,
            "first_frame": clip[0],
            "caption": e.caption,
            "path": e.name,
        }
        writer.add(record, mean.shape[:3])


def split_entries(entries: list[Entry], args) -> dict[str, list[Entry]]:
    """'eval': the first --eval_examples usable entries, 'train': the rest; then this slice's
    every --num_shards-th entry of each."""
    n = args.eval_examples
    splits = {"train": entries[n:]}
    if n > 0:
        splits["eval"] = entries[:n]
    return {k: v[args.shard_index :: args.num_shards] for k, v in splits.items()}


def num_shards(entries: list, shard_size: int) -> int:
    """Shards of a split: one per --shard_size entries, and one (empty) for no entries, so
    that every split has a file for TFDS."""
    return max(1, -(-len(entries) // shard_size))


def finalize(out: Path, splits, args, settings, source_skipped, extra_meta, feats) -> dict:
    """From the shard sidecars: shapes.npy per split, skipped.jsonl, the TFDS metadata, and
    meta.json last, with the records of each modality per split and in all (told by the
    records' paths: a name is always the same modality)."""
    meta_splits, skipped, shard_counts = {}, [s.to_json() for s in source_skipped], {}
    total = {IMAGE: 0, VIDEO: 0}
    for split, entries in splits.items():
        folder = out / split
        num = num_shards(entries, args.shard_size)
        infos = [prepared.read_shard_info(out, split, k) for k in range(num)]
        shapes = np.asarray([s for i in infos for s in i["shapes"]], np.int64).reshape(-1, 3)
        folder.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.save(buf, shapes)
        prepared.atomic_write(folder / "shapes.npy", buf.getvalue())
        skipped += [s for i in infos for s in i["skipped"]]
        counts = [len(i["shapes"]) for i in infos]
        modality = {e.name: e.modality for e in entries}
        kinds = {IMAGE: 0, VIDEO: 0}
        for path in (p for i in infos for p in i["paths"]):
            kinds[modality[path]] += 1
        total = {k: total[k] + kinds[k] for k in total}
        meta_splits[split] = {
            "count": int(sum(counts)),
            "shard_counts": counts,
            "modalities": kinds,
        }
        shard_counts[split] = counts
    text = "".join(json.dumps(s) + "\n" for s in skipped)
    prepared.atomic_write(out / "skipped.jsonl", text)
    prepared.write_tfds_metadata(out, feats, shard_counts)
    meta = {
        "format": prepared.FORMAT,
        **settings,
        **extra_meta,
        "splits": meta_splits,
        "modalities": total,
        "num_skipped": len(skipped),
    }
    prepared.atomic_write(out / "meta.json", json.dumps(meta, indent=1))
    return {"skipped": skipped, "meta": meta}


def run(args) -> int:
    from tqdm.auto import tqdm

    out = Path(args.out)
    if args.num_shards > 1:
        out = out / prepared.part_name(args.shard_index, args.num_shards)
    entries, source_skipped = list_dataset(args.src)
    check_buckets(args.src, entries, args)
    model = Path(args.model) if args.model else None
    if model is not None and not model.is_dir():
        raise FileNotFoundError(f"--model {model}: not a folder")
    text_len = text_length(model) if model else None
    images = any(e.modality == IMAGE for e in entries)
    settings = settings_of(args, listing_digest(entries, source_skipped), text_len, images)
    check_settings(out, settings)
    if prepared.read_meta(out) is not None:
        print(f"{out}: already complete")
        return 0
    source_skipped = source_skipped[args.shard_index :: args.num_shards]
    if args.on_bad == "error" and source_skipped:
        s = source_skipped[0]
        raise BadEntry(f"{s.path}: {s.reason}")
    splits = split_entries(entries, args)
    encoder = None
    if model:
        # Imported here: without --model (clips only) this tool needs no JAX and starts faster.
        from cogvideox_jax.encoders import Encoder

        encoder = Encoder(model, text_len, args.batch)
    extra = encoder.meta() if encoder else {}
    feats = prepared.features(settings["kind"], {**settings, **extra})
    written = 0
    total = sum(map(len, splits.values()))
    with tqdm(total=total, unit="entry", desc="preparing") as bar, ShardReader() as reader:
        for split, items in splits.items():
            num = num_shards(items, args.shard_size)
            for k in range(num):
                shard = items[k * args.shard_size : (k + 1) * args.shard_size]
                if prepared.shard_done(out, split, k, num):
                    bar.update(len(shard))
                    continue
                if args.max_shards is not None and written >= args.max_shards:
                    print(f"stopped after {written} shards (--max_shards); run again to resume")
                    return 3
                writer = prepared.ShardWriter(out, split, k, num, feats)
                prepare_shard(shard, args, encoder, writer, bar, reader)
                writer.close()
                written += 1
    report = finalize(out, splits, args, settings, source_skipped, extra, feats)
    for s in report["skipped"]:
        print(f"skipped {s['path']}: {s['reason']}")
    counts = {k: v["count"] for k, v in report["meta"]["splits"].items()}
    kinds = report["meta"]["modalities"]
    print(f"wrote {out}: {counts}, modalities {kinds}, {len(report['skipped'])} skipped")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.model:  # only the encoders use jax (raw clips load none of the model code)
        from cogvideox_jax import runtime

        runtime.cpu_only_without_accelerators()
    try:
        return run(args)
    except BadEntry as e:
        return tools.error(e, " (--on_bad error)")
    except (FileNotFoundError, ValueError) as e:
        return tools.error(e)


if __name__ == "__main__":
    sys.exit(main())
