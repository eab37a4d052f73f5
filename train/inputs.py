"""The trainer's input: training and held-out datasets of a resolved run (train/run.py).

  synthetic   random latents and text (data/synthetic.py), one shape: smoke tests, compiling.
  demo        the built-in demo's procedural clips, encoded by its own VAE and text encoder.
  data_dir    a dataset written by `python -m tools.prepare_data` (data/prepared.py): latent
              distributions and text embeddings, or raw clips that the run encodes as it reads
              them (the demo's encoders, or input.encoder_model's). Clips of many sizes are
              bucketed into batches of one shape or, with input.packing, packed into rows of
              several clips (data/loader.py, data/packing.py). Held-out loss uses the dataset's
              "eval" split when it has one.
  sources     several prepared datasets (input.sources: (folder, weight) pairs, e.g. images
              beside clips) mixed by weight in one stream (data/loader.py, mixture); their
              "eval" splits together make the held-out batches.

Every dataset is a Grain dataset whose iterator is checkpointed with the train state, and each
process loads only its rows of every global batch (data/pipeline.py).
"""

from __future__ import annotations

import os
import re

import numpy as np

from cogvideox_jax import vae as vae_lib
from configs import validate
from data import loader, packing, prepared, synthetic
from train import objective


def datasets(run, rows, eval_rows, demo=None):
    """(train dataset, held-out dataset or None) of a resolved run (train/run.py) for this
    process's `rows` and `eval_rows` of each global batch (data/pipeline.py)."""
    c = run.config
    if run.data == "prepared":
        return _prepared(run, rows, eval_rows, demo)
    if run.data == "demo":
        train = demo.dataset(c.batch_size, train=True, seed=c.seed, rows=rows)
        return train, demo.dataset(c.evals.batch_size, train=False, seed=c.seed, rows=eval_rows)
    shapes = run.example_shapes
    train = synthetic.dataset(c.input.num_examples, c.batch_size, seed=c.seed, rows=rows, **shapes)
    held_out = synthetic.dataset(
        c.input.eval_examples,
        c.evals.batch_size,
        seed=c.seed + 10_000,
        rows=eval_rows,
        shuffle=False,
        repeat=False,
        **shapes,
    )
    return train, held_out


def open_sources(c, demo: bool = False):
    """(the run's prepared dataset, its mixture or None, where: a name for messages):
    input.data_dir, or input.sources' datasets one after another as one dataset, each checked
    against the config, with their train record counts and weights."""
    if c.input.data_dir:
        ds = prepared.open_prepared(c.input.data_dir)
        check_prepared(ds, c, demo)
        return ds, None, f"input.data_dir {c.input.data_dir}", {}
    opened = []
    for folder, weight in validate.sources(c):
        ds = prepared.open_prepared(folder)
        check_prepared(ds, c, demo, where=f"input.sources {folder}")
        opened.append((folder, ds, weight))
    first_dir, first, _ = opened[0]
    for folder, ds, _ in opened[1:]:
        if (ds.kind, set(ds.splits)) != (first.kind, set(first.splits)):
            raise ValueError(
                f"input.sources: {folder} holds {ds.kind} with splits {sorted(ds.splits)}, "
                f"{first_dir} {first.kind} with {sorted(first.splits)}; mixed datasets must "
                "agree (prepare them alike: both raw or both with --model, with or without "
                "--eval_examples)"
            )
    mixture = [(len(ds.shapes("train")), w) for _, ds, w in opened]
    names = source_names([folder for folder, _, _ in opened])
    each = dict(zip(names, (ds for _, ds, _ in opened), strict=True))
    combined = prepared.concatenate([ds for _, ds, _ in opened])
    return combined, mixture, "input.sources", each


def source_names(folders) -> list[str]:
    """A short name per input.sources folder for its metrics (eval_loss_NAME): the folder's
    name, or its path when two share a name; characters other than letters, digits, - and _
    become _."""
    base = [os.path.basename(os.path.normpath(f)) for f in folders]
    names = base if len(set(base)) == len(base) else [os.path.normpath(f) for f in folders]
    return [re.sub(r"[^A-Za-z0-9_-]", "_", n).strip("_") or "source" for n in names]


def _prepared(run, rows, eval_rows, demo):
    c, tcfg = run.config, run.model
    ds, mixture, where, each = open_sources(c, demo is not None)
    encode = None
    if ds.kind == "clips":  # encoded as they are read
        encode = demo.encode if demo is not None else model_encoder(c)
    f = c.input.spatial_compression

    def latent_shape(frames, height, width):
        return vae_lib.num_latent_frames(int(frames)), int(height) // f, int(width) // f

    packed = isinstance(run.objective, objective.Packed)
    kw = dict(
        packing=packed,
        patch_size=tcfg.patch_size,
        patch_size_t=tcfg.patch_size_t,
        text_len=c.input.text_len,
        workers=c.input.workers,
        encode=encode,
        latent_shape=latent_shape if ds.kind == "clips" else None,
        image=run.i2v,
    )
    if packed:
        kw["video_budget"], kw["max_clips"] = packing_budget(c, tcfg, ds, latent_shape)
    train = loader.train_dataset(
        ds.source("train"),
        ds.shapes("train"),
        batch_size=c.batch_size,
        rows=rows,
        seed=c.seed,
        mixture=mixture,
        **kw,
    )
    if "eval" not in ds.splits:
        print(f"{where}: no 'eval' split, so no held-out loss", flush=True)
        return train, None
    # Held-out batches are bucketed even when training packs: every process then walks the
    # same plan of equal-shape batches (a multi-host eval ends on every process at once), and
    # the per-clip loss is the same either way.
    kw.update(packing=False, video_budget=None, max_clips=None)
    if not each:
        return train, _held_out(ds, c, eval_rows, kw, where)
    # A mixture: each dataset's eval split on its own, for its own held-out loss.
    return train, {n: _held_out(d, c, eval_rows, kw, f"input.sources {n}") for n, d in each.items()}


def _held_out(ds, c, eval_rows, kw, where):
    try:
        return loader.train_dataset(
            ds.source("eval"),
            ds.shapes("eval"),
            batch_size=c.evals.batch_size,
            rows=eval_rows,
            seed=c.seed + 10_000,
            shuffle=False,
            repeat=False,
            **kw,
        )
    except ValueError:
        shapes = np.asarray(ds.shapes("eval")).reshape(-1, 3)
        most = int(np.unique(shapes, axis=0, return_counts=True)[1].max())
        raise ValueError(
            f"{where}: the 'eval' split has no evals.batch_size="
            f"{c.evals.batch_size} clips of one shape (held-out batches are of one shape; at "
            f"most {most} of its clips share one): set evals.batch_size to at most {most}, "
            "or prepare more held-out clips of one size (--eval_examples, --buckets)"
        ) from None


def packing_budget(c, tcfg, ds, latent_shape) -> tuple[int, int]:
    """(video tokens V, clips G) per packed row: input.video_budget / input.max_clips, or where
    0 the budget data/packing.py finds for this dataset's mix of clip sizes."""
    shapes = ds.shapes("train")
    if ds.kind == "clips":
        shapes = np.array([latent_shape(*s) for s in shapes])
    tokens = packing.video_tokens(shapes, tcfg.patch_size, tcfg.patch_size_t)
    v, g = c.input.video_budget, c.input.max_clips
    if not (v and g):
        found = packing.default_budget(tokens, text_len=c.input.text_len)
        v, g = v or found.video, g or found.clips
    if tokens.max() > v:
        raise ValueError(
            f"input.video_budget={v} is smaller than the dataset's largest clip "
            f"({int(tokens.max())} video tokens)"
        )
    print(f"packing: rows of {v} video tokens and up to {g} clips", flush=True)
    return int(v), int(g)


def check_prepared(ds, c, demo: bool, where: str = "") -> None:
    """The prepared dataset agrees with the config (channels, text shape, latent scale)."""
    where = where or f"input.data_dir {c.input.data_dir}"
    meta = ds.meta
    if ds.kind == "latents":
        if meta.get("latent_channels") != c.input.latent_channels:
            raise ValueError(
                f"{where}: latents have {meta.get('latent_channels')} channels, the config "
                f"input.latent_channels is {c.input.latent_channels}"
            )
        if meta.get("text_len") != c.input.text_len or meta.get("text_dim") != c.input.text_dim:
            raise ValueError(
                f"{where}: text embeddings are {meta.get('text_len')}x{meta.get('text_dim')}, "
                f"the config wants input.text_len x input.text_dim = "
                f"{c.input.text_len}x{c.input.text_dim}"
            )
        sf = meta.get("scaling_factor")
        if sf is not None and not np.isclose(sf, c.diffusion.scaling_factor):
            raise ValueError(
                f"{where}: its VAE's scaling_factor is {sf} but config.diffusion.scaling_factor "
                f"is {c.diffusion.scaling_factor}; the latents were made by another VAE"
            )
    elif not demo and not c.input.encoder_model:
        raise ValueError(
            f"{where} holds raw clips: set input.encoder_model (a diffusers-layout model folder "
            "whose VAE and T5 encode them as they are read), or encode the dataset once with "
            "`python -m tools.prepare_data SRC OUT --model DIR`"
        )


def model_encoder(c):
    """record {frames (F, H, W, 3) uint8, caption} -> {latent_mean, latent_logvar, text,
    first_frame} by the VAE and T5 of input.encoder_model: tools.prepare_data's encoder, run
    on each clip as it is read."""
    from pathlib import Path

    from cogvideox_jax.encoders import Encoder

    enc = Encoder(Path(c.input.encoder_model), c.input.text_len, batch=1)
    meta = enc.meta()
    where = f"input.encoder_model {c.input.encoder_model}"
    if not np.isclose(meta["scaling_factor"], c.diffusion.scaling_factor):
        raise ValueError(
            f"{where}: its VAE's scaling_factor {meta['scaling_factor']} != "
            f"config.diffusion.scaling_factor {c.diffusion.scaling_factor}"
        )
    if (meta["latent_channels"], meta["text_dim"]) != (c.input.latent_channels, c.input.text_dim):
        raise ValueError(
            f"{where}: {meta['latent_channels']} latent channels and text width "
            f"{meta['text_dim']}, the config wants {c.input.latent_channels} and "
            f"{c.input.text_dim}"
        )

    def encode(record):
        ((mean, logvar),) = enc.latents([record["frames"]])
        (text,) = enc.texts([record["caption"]])
        return dict(
            latent_mean=mean, latent_logvar=logvar, text=text, first_frame=record["frames"][0]
        )

    return encode
