"""Multi-resolution frame packing (NaViT-style): clips of different (T, h, w) latent shapes as
patch tokens, packed into rows with fixed budgets of V video tokens and G clips.

A packed row is the joint sequence [text region (G * S tokens); video region (V tokens)];
attention is block-diagonal by segment id (1..n for the n clips of the row, 0 = padding). The
keys of a packed batch (B rows) are the packed-batch contract:

  video             (B, V, P) float32  patchified UNSCALED latent sample of each clip; 0 on padding
  video_segment_ids (B, V) int32       clip 1..n of each video token; 0 on padding
  video_positions   (B, V, 3) int32    (t, h, w) of the token in its clip's token grid
  text              (B, G * S, Dt)     each clip's S text rows, clip after clip; 0 on padding
  text_segment_ids  (B, G * S) int32
  grids             (B, G, 3) int32    token grid (t, h, w) of segment k + 1; 0 when unused

Token and feature order are those of `cogvideox_jax.transformer.patchify` (tokens in (t, h, w)
order, features (pt, p, p, C)); `patchify` here is the same function on numpy arrays, because
data/ does not import the model (tests/test_imports.py); the tests check the two agree.

The packer is Grain's BestFitPackIterDataset: it keeps `num_bins` rows open, puts each clip in
the open row it fills most tightly, and emits the non-empty rows when a clip fits none of them.
Its iterator is checkpointable (the parent's state at the last emitted group + the row index).
data/loader.py runs it on stand-ins of the clips' sizes (the plan, the same on every process)
and then fills the planned rows with the clips' tokens.
"""

from __future__ import annotations

import dataclasses
import math

import grain
import numpy as np

# Video budgets are rounded up to this many tokens (attention kernels tile sequences by 128).
VIDEO_ALIGN = 128


def patchify(x, p: int, pt: int = 1):
    """(..., T, H, W, C) -> (..., (T/pt)*(H/p)*(W/p), pt*p*p*C); numpy or jax arrays."""
    *lead, t, h, w, c = x.shape
    x = x.reshape(*lead, t // pt, pt, h // p, p, w // p, p, c)
    n = len(lead)
    perm = (*range(n), n, n + 2, n + 4, n + 1, n + 3, n + 5, n + 6)
    x = x.transpose(perm)  # (..., T/pt, H/p, W/p, pt, p, p, C)
    return x.reshape(*lead, (t // pt) * (h // p) * (w // p), pt * p * p * c)


def pad_front_frames(z: np.ndarray, pt: int) -> np.ndarray:
    """(T, h, w, C) -> (T + n, h, w, C): the first frame repeated n times in front so that
    (T + n) % pt == 0 (CogVideoX 1.5, as train/objective.py pad_latent_frames)."""
    n = -z.shape[0] % pt
    return np.concatenate([np.repeat(z[:1], n, axis=0), z], axis=0) if n else z


def token_grid(shape, patch_size: int, patch_size_t: int | None) -> tuple[int, int, int]:
    """Token grid (t, h, w) of a latent of shape (T, h, w[, C]) (T front-padded to pt)."""
    pt = patch_size_t or 1
    t, h, w = shape[:3]
    return -(-t // pt), h // patch_size, w // patch_size


def video_tokens(shapes: np.ndarray, patch_size: int, patch_size_t: int | None) -> np.ndarray:
    """(N, 3) latent shapes (T, h, w) -> (N,) video tokens per clip."""
    shapes = np.asarray(shapes).reshape(-1, 3)
    pt = patch_size_t or 1
    return (-(-shapes[:, 0] // pt)) * (shapes[:, 1] // patch_size) * (shapes[:, 2] // patch_size)


def clip_tokens(
    latents: np.ndarray,
    text: np.ndarray,
    *,
    patch_size: int,
    patch_size_t: int | None,
    video_budget: int,
    text_len: int,
    path: str,
) -> dict[str, np.ndarray]:
    """One clip's packer input from its latent sample (T, h, w, C) and text (S, Dt):
    {"video" (L, P) float32, "coords" (L, 3) int32, "text" (S, Dt) float32, "grid" (3,) int32}.
    A clip over the budget, with h, w not divisible by the patch or with other than `text_len`
    text rows is an error naming `path`."""
    p, pt = patch_size, patch_size_t or 1
    if np.shape(text)[0] != text_len:
        raise ValueError(f"{path}: text {np.shape(text)}: every clip needs {text_len} text rows")
    if latents.shape[1] % p or latents.shape[2] % p:
        raise ValueError(
            f"{path}: latent (T, h, w, C) = {latents.shape}: h and w must be divisible by "
            f"patch_size {p}"
        )
    z = pad_front_frames(np.asarray(latents, np.float32), pt)
    grid = token_grid(z.shape, p, pt)
    n = math.prod(grid)
    if n > video_budget:
        raise ValueError(
            f"{path}: latent {latents.shape} is {n} video tokens, more than the packing budget "
            f"video_budget={video_budget}; clips are never truncated: raise the budget or drop it"
        )
    t, h, w = np.meshgrid(*(np.arange(g) for g in grid), indexing="ij")
    return {
        "video": patchify(z, p, pt),  # (L, P)
        "coords": np.stack([t, h, w], -1).reshape(n, 3).astype(np.int32),  # (L, 3)
        "text": np.asarray(text, np.float32),  # (S, Dt)
        "grid": np.asarray(grid, np.int32),
    }


def packing_efficiency(batch: dict) -> float:
    """(real text tokens + real video tokens) / (B * (Tt + V)) of a packed batch."""
    vid, txt = np.asarray(batch["video_segment_ids"]), np.asarray(batch["text_segment_ids"])
    return float(((vid > 0).sum() + (txt > 0).sum()) / (vid.size + txt.size))


@dataclasses.dataclass(frozen=True)
class Budget:
    video: int  # V: video tokens per row
    clips: int  # G: clips per row (text tokens per row: G * S)
    efficiency: float  # simulated packing efficiency on the dataset's shapes


def default_budget(
    tokens: np.ndarray,
    *,
    text_len: int,
    num_bins: int = 16,
    target: float = 0.9,
    max_multiple: int = 4,
    sample: int = 1000,
    seed: int = 0,
) -> Budget:
    """Budgets (V, G) for clips of `tokens` video tokens each ((N,) ints, `video_tokens`).

    V is the largest clip rounded up to VIDEO_ALIGN, times the smallest multiple m <= max_multiple
    whose best G reaches packing efficiency `target`; G is the count that maximises efficiency
    for that V. Efficiencies come from running the same packer on a random stream of `sample`
    clip sizes drawn from `tokens` (so they fit the dataset's own mix of shapes). Where no
    multiple reaches `target`, the most efficient (V, G) found.
    """
    tokens = np.asarray(tokens, np.int64).reshape(-1)
    if not len(tokens) or tokens.min() <= 0:
        raise ValueError(f"default_budget: need clips of >= 1 video token, got {tokens[:8]}...")
    draws = np.random.default_rng(seed).choice(tokens, size=sample)
    largest = -(-int(tokens.max()) // VIDEO_ALIGN) * VIDEO_ALIGN
    best = None
    for m in range(1, max_multiple + 1):
        v = m * largest
        per_row = v / tokens.mean()  # clips a row of V tokens holds on average
        counts = {max(1, round(per_row * f)) for f in (0.8, 1.0, 1.2, 1.4, 1.7, 2.0)}
        for g in sorted(counts):
            eff = _simulate(draws, v, g, text_len, num_bins)
            if best is None or eff > best.efficiency:
                best = Budget(video=v, clips=g, efficiency=eff)
        if best.efficiency >= target:
            break
    return best


def _simulate(sizes: np.ndarray, video_budget: int, max_clips: int, text_len: int, bins: int):
    """Packing efficiency of the packer on a stream of clips of `sizes` video tokens."""
    no_prefetch = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)  # a quick loop
    ds = grain.MapDataset.source(sizes).map(lambda n: stand_in(int(n), text_len, clip=(0, 0)))
    real = total = 0
    rows = best_fit(
        ds.to_iter_dataset(no_prefetch),
        video_budget=video_budget,
        max_clips=max_clips,
        text_len=text_len,
        num_bins=bins,
    )
    for row in rows:
        real += (row["video_segment_ids"] > 0).sum() + (row["text_segment_ids"] > 0).sum()
        total += row["video_segment_ids"].size + row["text_segment_ids"].size
    return float(real / total)


def stand_in(video_tokens: int, text_len: int, *, clip) -> dict:
    """What the packer needs of a clip: its sizes, and `clip` ((position, record index))."""
    return {
        "video": np.zeros(video_tokens, np.int8),
        "text": np.zeros(text_len, np.int8),
        "clip": np.asarray(clip, np.int64),
    }


def best_fit(
    stand_ins: grain.IterDataset, *, video_budget: int, max_clips: int, text_len: int, num_bins: int
) -> grain.IterDataset:
    """Rows of at most `video_budget` video tokens and `max_clips` clips from a stream of
    `stand_in`s (Grain's best-fit packer, `num_bins` rows open); a row's "clip" is the list of its
    clips, in the order they came."""
    return grain.experimental.BestFitPackIterDataset(
        stand_ins,
        length_struct={"video": video_budget, "text": max_clips * text_len},
        num_packing_bins=num_bins,
        shuffle_bins=False,
        meta_features=("clip",),
        max_sequences_per_bin=max_clips,
    )
