"""Training and evaluation input over a prepared dataset: equal-shape buckets or packed rows.

    ds = loader.train_dataset(prepared.source("train"), prepared.shapes("train"),
                              batch_size=..., rows=pipeline.process_rows(sharding, batch_size),
                              seed=..., packing=True, patch_size=2, patch_size_t=None,
                              video_budget=V, max_clips=G)
    it = iter(ds)  # a grain.DatasetIterator: get_state / set_state, saved with the checkpoint

`source[i]` is a record of kind "latents" {"latent_mean" (T, h, w, C), "latent_logvar",
"text" (S, Dt), "first_frame" (H, W, 3) uint8, "caption", "path"} or of kind "clips"
{"frames" (F, H, W, 3) uint8, "caption", "path"}; `shapes` (N, 3) holds each record's latent
(T, h, w) or pixel (F, H, W) shape, known without reading it. For clips, `encode(record)` maps a
record to {"latent_mean", "latent_logvar", "text"[, "first_frame"]} and runs in the main process
(it calls JAX); `latent_shape(F, H, W) -> (T, h, w)` turns pixel shapes into latent shapes.

Latent sampling: every use of a clip draws z = mean + exp(logvar / 2) * eps, eps ~ N(0, 1) from
numpy's default_rng((seed, position)), where `position` is the use's place in the global stream
of clips (all epochs, before the split between processes): another epoch draws another sample,
a resumed run (or one with another number of processes) the same one. logvar is clamped to
[-30, 20] first, as diffusers' DiagonalGaussianDistribution does.

Bucketing (packing=False): global batches of `batch_size` clips of one shape; the plan (which
clips form each batch, per epoch, `bucket_plan`) is computed from `shapes` on every process, and
each process loads its `rows` of each batch (as data/pipeline.py does); incomplete bucket
remainders are dropped each epoch (`dropped_per_epoch`). A batch is {"latents" (b, T, h, w, C)
unscaled, "text" (b, S, Dt)[, "image" (b, H, W, 3) float32 in [-1, 1]]}.

Packing (packing=True): every process plans the same global packed batches from the clips'
token counts alone (`pack_plan`: Grain's best-fit packer over the global stream of clips,
shuffled per epoch, with stand-ins of each clip's size), and loads its own rows of each (`rows`
must be a contiguous block of the global batch). As with bucketing, the plan, and so the
iterator position, is the same on every process: a run resumed with another number of processes
continues the same stream of global batches, and one process sees the batches that two would.
A batch is the packed-batch contract with len(rows) rows. For one pass (repeat=False) the last
global batch is completed with all-padding rows.

workers > 0: bucketing reads records (and samples, unless `encode` is given) in that many Grain
worker processes (mp_prefetch); packing reads the clips of a batch in that many threads and
prepares the next batches in a background thread (the plan runs in the main process). `encode`
and the batching stay in the main process.
"""

from __future__ import annotations

import concurrent.futures
import functools
from collections.abc import Callable

import grain
import numpy as np

from data import packing as packing_lib


def sample_latent(mean: np.ndarray, logvar: np.ndarray, *, seed: int, position: int):
    """mean + exp(logvar / 2) * eps with eps ~ N(0, 1) from default_rng((seed, position))."""
    eps = np.random.default_rng((seed, position)).standard_normal(mean.shape, dtype=np.float32)
    std = np.exp(0.5 * np.clip(np.asarray(logvar, np.float32), -30.0, 20.0))
    return (np.asarray(mean, np.float32) + std * eps).astype(np.float32)


def _buckets(shapes: np.ndarray) -> list[np.ndarray]:
    """Indices of the records of each distinct shape, shapes in lexicographic order."""
    shapes = np.asarray(shapes).reshape(-1, 3)
    _, inverse = np.unique(shapes, axis=0, return_inverse=True)
    return [np.flatnonzero(inverse.reshape(-1) == k) for k in range(inverse.max() + 1)]


def dropped_per_epoch(shapes: np.ndarray, batch_size: int) -> int:
    """Clips left out of every bucketing epoch (each bucket's remainder modulo batch_size)."""
    return int(sum(len(b) % batch_size for b in _buckets(shapes)))


def bucket_plan(shapes: np.ndarray, batch_size: int, *, seed: int, epoch: int, shuffle: bool):
    """(num_batches, batch_size) record indices: epoch `epoch`'s global batches, each of one
    shape. Shuffled: each bucket permuted, cut into full batches, and the batches permuted, all
    from default_rng((seed, epoch)); unshuffled: buckets in shape order, indices ascending."""
    rng = np.random.default_rng((seed, epoch))
    out = []
    for idx in _buckets(shapes):
        idx = rng.permutation(idx) if shuffle else idx
        n = len(idx) // batch_size
        out.append(idx[: n * batch_size].reshape(n, batch_size))
    plan = np.concatenate(out) if out else np.zeros((0, batch_size), np.int64)
    return rng.permutation(plan) if shuffle else plan


def train_dataset(
    source,
    shapes: np.ndarray,
    *,
    batch_size: int,
    rows: np.ndarray | None,
    seed: int,
    packing: bool,
    patch_size: int = 2,
    patch_size_t: int | None = None,
    video_budget: int | None = None,
    max_clips: int | None = None,
    num_bins: int = 16,
    text_len: int | None = None,
    workers: int = 0,
    encode: Callable[[dict], dict] | None = None,
    latent_shape: Callable[[int, int, int], tuple[int, int, int]] | None = None,
    image: bool = False,
    shuffle: bool = True,
    repeat: bool = True,
    mixture: list[tuple[int, float]] | None = None,
) -> grain.IterDataset:
    """This process's batches (see the module docstring); `rows`: its rows of each global batch
    (data.pipeline.process_rows; None: all). Packing needs `video_budget` and `max_clips`
    (packing.default_budget proposes them), and text_len S (None: read from record 0), and
    keeps `num_bins` rows open; `encode` and `latent_shape` are for clips records.

    `mixture`: the source is several datasets one after another, [(records, weight), ...] in
    order; the stream mixes them by weight (`mixed_picks`): packing draws each clip from dataset
    d in the share weight_d / sum(weights), each dataset walked in its own reshuffled epochs;
    bucketing draws each global batch from one dataset in that share, from that dataset's own
    bucket plan. Training streams only (repeat)."""
    shapes = np.asarray(shapes).reshape(-1, 3)
    if len(shapes) != len(source):
        raise ValueError(f"shapes has {len(shapes)} rows but the source {len(source)} records")
    if (encode is None) != (latent_shape is None):
        raise ValueError("encode and latent_shape go together (both for clips records, or none)")
    if mixture is not None:
        if sum(n for n, _ in mixture) != len(shapes) or min(w for _, w in mixture) <= 0:
            raise ValueError(f"mixture {mixture}: record counts must add up to {len(shapes)}, "
                             "weights must be positive")  # fmt: skip
        if not repeat:
            raise ValueError("a mixture is a training stream (repeat=True)")
    rows = np.arange(batch_size) if rows is None else np.asarray(rows)
    order = dict(seed=seed, shuffle=shuffle, repeat=repeat)
    finish = functools.partial(_example, seed=seed, image=image)
    if not packing:
        load, main = _stages(source, finish, encode)
        if mixture is None:
            ds = _bucket_stream(shapes, batch_size, rows, **order)
        else:
            items = _MixedBucketItems(shapes, mixture, batch_size, rows, seed=seed, shuffle=shuffle)
            ds = grain.MapDataset.range(1).repeat(None).map_with_index(items)
        ds = _prefetch(ds.map(lambda items: [load(it) for it in items]).to_iter_dataset(), workers)
        ds = ds if main is None else ds.map(lambda exs: [main(e) for e in exs])
        return ds.map(_stack)

    if video_budget is None or max_clips is None:
        raise ValueError("packing needs video_budget and max_clips (see default_budget)")
    if text_len is None and encode is not None:
        raise ValueError("packing clips records (encode given) needs text_len")
    text_len = np.shape(source[0]["text"])[0] if text_len is None else text_len
    lat = shapes if latent_shape is None else np.array([latent_shape(*s) for s in shapes])
    _check_budget(source, lat, patch_size, patch_size_t, video_budget)
    tokens = functools.partial(
        _tokens,
        patch_size=patch_size,
        patch_size_t=patch_size_t,
        video_budget=video_budget,
        text_len=text_len,
    )
    load, main = _stages(source, _then(finish, tokens), encode)
    sizes = packing_lib.video_tokens(lat, patch_size, patch_size_t)
    budget = dict(video_budget=video_budget, max_clips=max_clips, text_len=text_len)
    plan = pack_plan(sizes, batch_size, rows, **budget, num_bins=num_bins, mixture=mixture, **order)
    ds = plan.map(_PackedRows(load if main is None else _then(load, main), budget, workers))
    if workers:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=2)
    return ds


def pack_plan(
    sizes: np.ndarray,
    batch_size: int,
    rows: np.ndarray,
    *,
    video_budget: int,
    max_clips: int,
    text_len: int,
    num_bins: int,
    seed: int,
    shuffle: bool,
    repeat: bool,
    mixture: list[tuple[int, float]] | None = None,
) -> grain.IterDataset:
    """This process's rows of each global packed batch, as lists of (position, record index):
    Grain's best-fit packer over the global clip stream (mixed by weight with `mixture`), fed
    stand-ins of each clip's size (`sizes`: video tokens per record), so the plan is the same on
    every process and needs no record read."""
    k, _ = _row_block(rows, batch_size)

    def stand_in(item):
        return packing_lib.stand_in(int(sizes[item[1]]), text_len, clip=item)

    if mixture is None:
        ds = _clip_stream(len(sizes), seed=seed, shuffle=shuffle, repeat=repeat)
    else:
        ds = _mixed_clip_stream(mixture, seed=seed, shuffle=shuffle)
    packed = packing_lib.best_fit(
        ds.map(stand_in).to_iter_dataset(),
        video_budget=video_budget,
        max_clips=max_clips,
        text_len=text_len,
        num_bins=num_bins,
    )
    b = len(rows)

    def block(global_rows):
        global_rows = list(global_rows) + [[]] * (batch_size - len(global_rows))
        return global_rows[k * b : (k + 1) * b]

    plan = packed.map(lambda row: [(int(p), int(i)) for p, i in row["clip"]])
    return plan.batch(batch_size, drop_remainder=repeat, batch_fn=block)


class _PackedRows:
    """Planned rows [[(position, index), ...], ...] -> a packed batch (the contract's keys):
    each clip loaded (`load`, in `workers` threads when > 0) and put in its row in plan order."""

    def __init__(self, load, budget: dict, workers: int):
        self.load, self.budget, self.workers = load, budget, workers
        self.like = None  # a loaded clip: the feature shapes of all-padding rows

    def __call__(self, planned: list[list[tuple[int, int]]]) -> dict[str, np.ndarray]:
        items = [item for row in planned for item in row]
        if self.workers and len(items) > 1:
            with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
                clips = list(pool.map(self.load, items))
        else:
            clips = [self.load(item) for item in items]
        if self.like is None:
            self.like = clips[0] if clips else self.load((0, 0))
        out, at = [], 0
        for row in planned:
            out.append(_packed_row(clips[at : at + len(row)], self.like, **self.budget))
            at += len(row)
        return {key: np.stack([r[key] for r in out]) for key in out[0]}


def _packed_row(clips, like, *, video_budget: int, max_clips: int, text_len: int) -> dict:
    """One row of the contract from its clips (`clip_tokens` dicts), segment s + 1 = clips[s]:
    video tokens and texts one after another, zeros on padding (what Grain's packer writes)."""
    video = np.zeros((video_budget, *like["video"].shape[1:]), like["video"].dtype)
    positions = np.zeros((video_budget, 3), np.int32)
    video_ids = np.zeros(video_budget, np.int32)
    text = np.zeros((max_clips * text_len, *like["text"].shape[1:]), like["text"].dtype)
    text_ids = np.zeros(max_clips * text_len, np.int32)
    grids = np.zeros((max_clips, 3), np.int32)
    at = 0
    for s, clip in enumerate(clips):
        n = len(clip["video"])
        video[at : at + n], positions[at : at + n], video_ids[at : at + n] = (
            clip["video"],
            clip["coords"],
            s + 1,
        )
        at += n
        text[s * text_len : (s + 1) * text_len] = clip["text"]
        text_ids[s * text_len : (s + 1) * text_len] = s + 1
        grids[s] = clip["grid"]
    return {
        "video": video,
        "video_segment_ids": video_ids,
        "video_positions": positions,
        "text": text,
        "text_segment_ids": text_ids,
        "grids": grids,
    }


def _stages(source, finish, encode):
    """(load, main): per-clip work for the worker processes and for the main process (None: no
    work). Without `encode`, workers read and finish; with it, they read and the main process
    encodes (it calls JAX) and finishes."""
    if encode is None:
        return _then(functools.partial(_read, source), finish), None
    return functools.partial(_read, source), _then(_encoded(encode), finish)


def _then(f, g):
    return lambda x: g(f(x))


def _read(source, item) -> dict:
    position, index = item
    rec = dict(source[int(index)])
    rec.setdefault("path", f"record {index}")
    rec["position"] = int(position)
    return rec


def _encoded(encode):
    return lambda rec: {**rec, **encode(rec)}


def _example(rec: dict, *, seed: int, image: bool) -> dict:
    """A read (or encoded) record -> {"latents", "text"[, "image"], "path", "position"}."""
    out = {
        "latents": sample_latent(
            rec["latent_mean"], rec["latent_logvar"], seed=seed, position=rec["position"]
        ),
        "text": np.asarray(rec["text"], np.float32),
        "path": rec["path"],
        "position": rec["position"],
    }
    if image:
        out["image"] = np.asarray(rec["first_frame"], np.float32) / 127.5 - 1.0
    return out


def _tokens(ex: dict, **kw) -> dict:
    return packing_lib.clip_tokens(ex["latents"], ex["text"], path=ex["path"], **kw)


def _stack(examples: list[dict]) -> dict[str, np.ndarray]:
    keys = [k for k in ("latents", "text", "image") if k in examples[0]]
    return {k: np.stack([e[k] for e in examples]) for k in keys}


def _check_budget(source, latent_shapes, patch_size, patch_size_t, video_budget):
    """Fail before training on any clip over the video budget, naming the first one's path."""
    n = packing_lib.video_tokens(latent_shapes, patch_size, patch_size_t)
    over = np.flatnonzero(n > video_budget)
    if len(over):
        i = int(over[0])
        path = source[i].get("path", f"record {i}")
        raise ValueError(
            f"{path}: latent (T, h, w) = {tuple(latent_shapes[i])} is {n[i]} video tokens, more "
            f"than video_budget={video_budget} ({len(over)} such clips); clips are never "
            "truncated: raise video_budget or drop them"
        )


def _row_block(rows: np.ndarray, batch_size: int) -> tuple[int, int]:
    """(k, n): `rows` are block k of the n equal contiguous blocks of the global batch."""
    b = len(rows)
    k = int(rows[0]) // b if b else 0
    if not b or batch_size % b or not np.array_equal(rows, np.arange(k * b, (k + 1) * b)):
        raise ValueError(
            f"packing: this process's rows {rows.tolist()} must be one of the contiguous equal "
            f"blocks of the global batch of {batch_size} rows"
        )
    return k, batch_size // b


def _clip_stream(n, *, seed, shuffle, repeat) -> grain.MapDataset:
    """(position, record index) of the global clip stream."""
    ds = grain.MapDataset.range(n)
    ds = ds.shuffle(seed=seed) if shuffle else ds  # reshuffled each epoch when repeated
    ds = ds.repeat(None) if repeat else ds
    return ds.map_with_index(lambda pos, i: (pos, i))


def mixed_picks(weights) -> grain.MapDataset:
    """Position k of a stream mixed from len(weights) parts -> (part d, j): the k-th draw is
    the j-th from part d. Grain's deterministic weighted interleaving (MapDataset.mix): every
    prefix of the stream holds each part in its weight's share, to within one draw."""
    parts = [
        grain.MapDataset.range(1).repeat(None).map_with_index(functools.partial(_pick, d))
        for d in range(len(weights))
    ]
    return grain.MapDataset.mix(parts, [float(w) for w in weights])


def _pick(d, j, _):
    return d, j


def _mixed_clip_stream(mixture, *, seed, shuffle) -> grain.MapDataset:
    """(position, record index) of the global clip stream mixed from `mixture`'s datasets, each
    walked in its own epochs (reshuffled each, from seed + d)."""
    starts = np.cumsum([0] + [n for n, _ in mixture])
    orders = [
        _clip_stream(n, seed=seed + d, shuffle=shuffle, repeat=True)
        for d, (n, _) in enumerate(mixture)
    ]
    picks = mixed_picks([w for _, w in mixture])
    return picks.map_with_index(functools.partial(_mixed_item, orders, starts))


def _mixed_item(orders, starts, pos, pick):
    d, j = pick
    return pos, int(starts[d]) + int(orders[d][j][1])


class _MixedBucketItems:
    """Global batch k -> [(position, record index)] of `rows`: the batch is the j-th of dataset
    d (`mixed_picks`), taken from that dataset's own bucket plan (seeded seed + d)."""

    def __init__(self, shapes, mixture, batch_size, rows, *, seed, shuffle):
        self.starts = np.cumsum([0] + [n for n, _ in mixture])
        every = np.arange(batch_size)
        self.parts = [
            _BucketItems(shapes[a:b], batch_size, every, seed=seed + d, shuffle=shuffle)
            for d, (a, b) in enumerate(zip(self.starts[:-1], self.starts[1:], strict=True))
        ]
        self.picks = mixed_picks([w for _, w in mixture])
        self.batch_size, self.rows = batch_size, rows

    def __call__(self, k: int, _) -> list[tuple[int, int]]:
        d, j = self.picks[k]
        batch = self.parts[d](j, None)
        start = int(self.starts[d])
        return [(k * self.batch_size + int(r), start + batch[r][1]) for r in self.rows]


def _bucket_stream(shapes, batch_size, rows, *, seed, shuffle, repeat) -> grain.MapDataset:
    """Per global batch: [(position, record index)] of this process's rows."""
    items = _BucketItems(shapes, batch_size, rows, seed=seed, shuffle=shuffle)
    ds = grain.MapDataset.range(items.per_epoch)
    ds = ds.repeat(None) if repeat else ds
    return ds.map_with_index(items)


class _BucketItems:
    """Global batch k -> [(position, record index)] of `rows`; keeps the current epoch's plan
    (a class rather than a cached closure so that Grain can pickle it into worker processes)."""

    def __init__(self, shapes, batch_size, rows, *, seed, shuffle):
        self.shapes, self.batch_size, self.rows = shapes, batch_size, rows
        self.seed, self.shuffle = seed, shuffle
        self.per_epoch = len(bucket_plan(shapes, batch_size, seed=seed, epoch=0, shuffle=False))
        if not self.per_epoch:
            raise ValueError(f"bucketing: no shape has batch_size={batch_size} clips: {shapes}")
        self.epoch, self.plan = None, None

    def __call__(self, k: int, _) -> list[tuple[int, int]]:
        epoch, j = divmod(k, self.per_epoch)
        if epoch != self.epoch:
            kw = dict(seed=self.seed, epoch=epoch, shuffle=self.shuffle)
            self.epoch, self.plan = epoch, bucket_plan(self.shapes, self.batch_size, **kw)
        batch = self.plan[j]
        return [(k * self.batch_size + int(r), int(batch[r])) for r in self.rows]


def _prefetch(ds: grain.IterDataset, workers: int) -> grain.IterDataset:
    if not workers:
        return ds
    from absl import flags

    # mp_prefetch reads absl flags; outside absl.app.run (tests, notebooks) they are unparsed.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
