r"""Data pipeline throughput: decoded clips/s and packed clips/s, with 0 and N Grain workers.

  python -m bench.data [--files 8 --clips 24 --source-frames 100 --source-size 480x854 --fps 8
                        --frames 49 --size 480x720 --batches 10 --workers 2 --repeats 3]
                       [--smallest] [--out result.json]

Decode: H.264 mp4 files written here to a temporary folder (smooth moving patterns plus a
little noise, `--source-fps` 16), each read as `tools.prepare_data` reads a clip:
`data.video.load_clip` (PyAV decode of the whole stream, frame sampling at `--fps`, the largest
4k+1 frame count up to `--frames`, resize and centre crop to `--size`), through a Grain
pipeline, one clip per element.

Packing: `data.loader.train_dataset(..., packing=True)` over an in-memory stand-in for a
prepared latents dataset (records as data/prepared.py's "latents" kind: mean, logvar, T5 text),
CogVideoX-1.0-like latent shapes mixed (`SHAPES`), budgets from `data.packing.default_budget`.
Per clip this times the latent sample (mean + std * eps), patchify, the packer and batching.
The records are a few arrays reused for every index, so reading from disk is not timed.

Each stage runs with 0 workers (this process; Grain's default read threads still prefetch)
and with `--workers` Grain worker processes (mp_prefetch). The configurations alternate,
`--repeats` rounds, each round a fresh iterator; the time to its first element (start-up:
worker processes import this program's modules) and the clips/s after it are reported
separately (see `measure`); medians.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from pathlib import Path

import grain
import numpy as np

from data import loader, packing, video

# Latent (T, h, w) of CogVideoX 1.0 clips: 49 frames at 480x720 and its portrait, 25 frames,
# and a small square one.
SHAPES = [(13, 60, 90), (13, 90, 60), (7, 60, 90), (13, 40, 40)]
SMALLEST = dict(
    files=2,
    clips=3,
    source_frames=20,
    source_size=(64, 96),
    frames=9,
    size=(32, 48),
    shapes=[(3, 8, 12), (3, 12, 8), (2, 8, 12), (3, 8, 8)],
    text_len=8,
    text_dim=16,
    batches=2,
    workers=1,
)


def write_clips(folder: Path, count: int, frames: int, size: tuple[int, int], fps: int):
    """`count` mp4 files of (frames, H, W): moving colour gradients plus noise (not random
    pixels, whose encoding and decoding would be unlike a real video's)."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        t = np.arange(frames, dtype=np.float32)[:, None, None]
        phase = (xx / w * (2 + i) + yy / h + t * 0.05)[..., None] * np.array([1.0, 1.3, 1.7])
        clip = 0.5 + 0.4 * np.sin(2 * np.pi * phase)  # (F, H, W, 3) in [0.1, 0.9]
        clip += rng.normal(0, 0.03, clip.shape)
        path = folder / f"clip{i:03d}.mp4"
        video.write_mp4(path, clip.astype(np.float32), fps)
        paths.append(str(path))
    return paths


class ClipLoader:
    """path -> (F, H, W, 3) uint8 clip, as tools.prepare_data loads one (picklable)."""

    def __init__(self, fps: float, frames: int, size: tuple[int, int]):
        self.fps, self.frames, self.size = fps, frames, size

    def __call__(self, path: str) -> np.ndarray:
        return video.load_clip(path, fps=self.fps, max_frames=self.frames, size=self.size)


class LatentRecords:
    """Random-access "latents" records of the given (T, h, w) shapes, one fixed record per
    distinct shape (built once): record i has the shape shapes[i]."""

    def __init__(self, shapes, *, text_len: int, text_dim: int, channels: int = 16):
        self.shapes = np.asarray(shapes).reshape(-1, 3)
        rng = np.random.default_rng(0)
        self.records = {}
        for s in {tuple(int(v) for v in s) for s in self.shapes}:
            self.records[s] = {
                "latent_mean": rng.standard_normal((*s, channels), dtype=np.float32),
                "latent_logvar": rng.uniform(-3, 0, (*s, channels)).astype(np.float32),
                "text": rng.standard_normal((text_len, text_dim), dtype=np.float32),
                "caption": "a caption",
            }

    def __len__(self):
        return len(self.shapes)

    def __getitem__(self, i):
        s = tuple(int(v) for v in self.shapes[i])
        return {**self.records[s], "path": f"record {i}"}


def _prefetch(ds: grain.IterDataset, workers: int) -> grain.IterDataset:
    if not workers:
        return ds
    from absl import flags

    if not flags.FLAGS.is_parsed():  # mp_prefetch reads absl flags (unparsed outside app.run)
        flags.FLAGS.mark_as_parsed()
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))


def decode_stream(paths, load: ClipLoader, workers: int):
    """An endless iterator of decoded clips (the files in turn)."""
    ds = grain.MapDataset.source(list(paths)).repeat(None).map(load).to_iter_dataset()
    return iter(_prefetch(ds, workers))


def packed_stream(source: LatentRecords, budget: packing.Budget, batch_size: int, workers: int):
    ds = loader.train_dataset(
        source,
        source.shapes,
        batch_size=batch_size,
        rows=None,
        seed=0,
        packing=True,
        video_budget=budget.video,
        max_clips=budget.clips,
        workers=workers,
    )
    return iter(ds)


def _clips_in(batch: dict) -> int:
    return int((np.asarray(batch["grids"]).prod(-1) > 0).sum())


def measure(streams: dict, items: int, count, repeats: int) -> dict[str, dict]:
    """Per pipeline, the medians over `repeats` alternating rounds of the start-up time (to the
    first element) and of the clips/s after it. A round starts a fresh iterator
    (`streams[name]()`) and takes `items` elements from it; `count(element)` = its clips.
    Fresh iterators, because Grain prefetches in background threads and processes: one kept
    between rounds would fill its buffer while the other configuration is being timed."""
    if items < 2:
        raise ValueError(f"need at least 2 elements per round (the first is start-up), got {items}")
    rates = {name: [] for name in streams}
    first = {name: [] for name in streams}
    for _ in range(repeats):
        for name, start in streams.items():
            t0 = time.perf_counter()
            it = start()
            next(it)
            t1, clips = time.perf_counter(), 0
            for _ in range(items - 1):
                clips += count(next(it))
            rates[name].append(clips / (time.perf_counter() - t1))
            first[name].append(t1 - t0)
            close = getattr(it, "close", None)
            if close is not None:
                close()
            del it
    return {
        name: {"clips_per_s": float(np.median(r)), "startup_s": float(np.median(first[name]))}
        for name, r in rates.items()
    }


def _size(text: str) -> tuple[int, int]:
    h, _, w = text.partition("x")
    try:
        return int(h), int(w)
    except ValueError:
        raise argparse.ArgumentTypeError(f"sizes are HxW (e.g. 480x720), got {text!r}") from None


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.data")
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--clips", type=int, default=24, help="decoded clips per round")
    parser.add_argument("--source-frames", type=int, default=100)
    parser.add_argument("--source-size", type=_size, default=(480, 854))
    parser.add_argument("--source-fps", type=int, default=16)
    parser.add_argument("--fps", type=float, default=8)
    parser.add_argument("--frames", type=int, default=49)
    parser.add_argument("--size", type=_size, default=(480, 720))
    parser.add_argument("--records", type=int, default=64)
    parser.add_argument("--text-len", type=int, default=226)
    parser.add_argument("--text-dim", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=2, help="packed rows per batch")
    parser.add_argument("--batches", type=int, default=10, help="packed batches per round")
    parser.add_argument("--workers", type=int, default=2, help="N, the worker processes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smallest", action="store_true", help="tiny sizes: seconds (CI)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    # Imported here: Grain's worker processes import this module, and these bring jax and torch.
    from bench.train_step import machine_facts, sig, write_json

    shapes = SHAPES
    if args.smallest:
        overrides = dict(SMALLEST)
        shapes = overrides.pop("shapes")
        for key, value in overrides.items():
            setattr(args, key, value)
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1 (0 is always measured), got {args.workers}")
    configs = {"workers_0": 0, f"workers_{args.workers}": args.workers}

    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        paths = write_clips(Path(d), args.files, args.source_frames, args.source_size, 16)
        write_s = time.perf_counter() - t0
        load = ClipLoader(args.fps, args.frames, args.size)
        clip_shape = load(paths[0]).shape
        streams = {
            name: functools.partial(decode_stream, paths, load, n) for name, n in configs.items()
        }
        decode = measure(streams, args.clips, lambda _: 1, args.repeats)
        for row in decode.values():
            row["frames_per_s"] = row["clips_per_s"] * clip_shape[0]
        del streams

    source = LatentRecords(
        [shapes[i % len(shapes)] for i in range(args.records)],
        text_len=args.text_len,
        text_dim=args.text_dim,
    )
    tokens = packing.video_tokens(source.shapes, 2, None)
    budget = packing.default_budget(tokens, text_len=args.text_len)
    streams = {
        name: functools.partial(packed_stream, source, budget, args.batch, n)
        for name, n in configs.items()
    }
    packed = measure(streams, args.batches, _clips_in, args.repeats)
    for row in packed.values():
        row["video_tokens_per_s"] = row["clips_per_s"] * float(tokens.mean())
    for row in (*decode.values(), *packed.values()):
        row.update({k: sig(v) for k, v in row.items()})
    del streams

    result = {
        "benchmark": "data",
        "decode": {
            "files": args.files,
            "clips_per_round": args.clips,
            "source_fhw": [args.source_frames, *args.source_size],
            "source_fps": 16,
            "clip_fhw": list(clip_shape[:3]),
            "fps": args.fps,
            "write_files_s": sig(write_s),
            **decode,
        },
        "packing": {
            "latent_shapes_thw": [list(s) for s in shapes],
            "text": [args.text_len, args.text_dim],
            "rows_per_batch": args.batch,
            "batches_per_round": args.batches,
            "video_budget": budget.video,
            "max_clips": budget.clips,
            "simulated_efficiency": sig(budget.efficiency, 3),
            **packed,
        },
        "repeats": args.repeats,
        "machine": machine_facts(),
    }
    print(f"{'':10}{'decoded clips/s':>17}{'packed clips/s':>16}")
    for name in configs:
        print(f"{name:10}{decode[name]['clips_per_s']:>17}{packed[name]['clips_per_s']:>16}")
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
