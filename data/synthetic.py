"""Deterministic synthetic training data: random latents and text embeddings (and, for
image-to-video, a first pixel frame), for smoke tests and for runs without a dataset.

Example i is generated from (seed, i) alone, so the stream is reproducible and a Grain iterator
over it can be checkpointed and resumed exactly.
"""

from __future__ import annotations

import grain
import numpy as np

from data import pipeline


def make_example(
    index: int,
    *,
    seed: int,
    latent_shape: tuple[int, int, int, int],
    text_shape: tuple[int, int],
    image_shape: tuple[int, int, int] | None,
) -> dict[str, np.ndarray]:
    """{'latents' (T, h, w, C), 'text' (S, D) float32[, 'image' (H, W, 3) in [-1, 1]]}."""
    rng = np.random.default_rng((seed, index))
    out = {
        "latents": rng.standard_normal(latent_shape, dtype=np.float32),
        "text": rng.standard_normal(text_shape, dtype=np.float32),
    }
    if image_shape is not None:
        out["image"] = rng.uniform(-1, 1, image_shape).astype(np.float32)
    return out


def dataset(
    num_examples: int,
    batch_size: int,
    *,
    seed: int,
    rows: np.ndarray | None = None,
    shuffle: bool = True,
    repeat: bool = True,
    **shapes,
) -> grain.MapDataset:
    """Global batches of `batch_size` examples, shuffled per epoch, of which this process loads
    the `rows` (data.pipeline.process_rows; None: all of them)."""
    ds = grain.MapDataset.range(num_examples)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if repeat:
        ds = ds.repeat(None)
    return pipeline.batches(ds, batch_size, rows, lambda i: make_example(i, seed=seed, **shapes))
