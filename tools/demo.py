r"""A short end-to-end demo on one CPU: build, export to diffusers, convert back, run.

  python -m tools.demo [--workdir runs/demo]

Builds a tiny CogVideoX-5B-shaped transformer with random weights, writes it as an Orbax
folder, exports it to a diffusers folder (config.json + safetensors), converts that diffusers
checkpoint back to Orbax, loads both with `load_transformer` and checks they predict the same
velocity, bit for bit. (The training demo replaces this once the trainer lands.)
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

import cogvideox_jax as cj
from cogvideox_jax import convert


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.demo")
    parser.add_argument("--workdir", default="runs/demo")
    args = parser.parse_args(argv)
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    cfg = cj.transformer_config(
        "5b",
        num_layers=2,
        num_heads=4,
        head_dim=32,
        text_embed_dim=64,
        max_text_len=16,
        sample_height=12,
        sample_width=16,
    )
    model = cj.Transformer(cfg, rngs=nnx.Rngs(0))
    # Fresh models start as identity maps (zero-initialised modulation and output layers), so
    # give every parameter some random signal before comparing outputs.
    state = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(state))))
    nnx.update(
        model, jax.tree.map(lambda p: p + 0.05 * jax.random.normal(next(keys), p.shape), state)
    )
    n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"built a {cfg.num_layers}-layer transformer, width {cfg.width}, {n:,} parameters")

    t0 = time.time()
    cj.save_transformer(model, work / "orbax")
    for line in convert.convert("orbax-to-diffusers", work / "orbax", work / "diffusers"):
        print(line, "->", work / "diffusers")
    for line in convert.convert("diffusers-to-orbax", work / "diffusers", work / "orbax2"):
        print(line, "->", work / "orbax2")
    print(
        f"converted both ways in {time.time() - t0:.1f}s; files:",
        sorted(p.name for p in (work / "diffusers").iterdir()),
    )

    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 3, 12, 16, cfg.in_channels)).astype(np.float32)
    text = rng.standard_normal((2, cfg.max_text_len, cfg.text_embed_dim)).astype(np.float32)
    timesteps = np.array([999, 250])
    forward = jax.jit(lambda m, *a: m(*a))  # one compiled program for every copy
    ref = np.asarray(forward(model, latents, text, timesteps))
    outs = {}
    for name in ("orbax", "diffusers", "orbax2"):
        outs[name] = np.asarray(forward(cj.load_transformer(work / name), latents, text, timesteps))
    for name, out in outs.items():
        same = np.array_equal(out, ref)
        print(
            f"{name:>9}: prediction {out.shape}, |v| mean {np.abs(out).mean():.4f}, "
            f"identical to the original model: {same}"
        )
        if not same:
            raise SystemExit(f"{name}: outputs differ")
    print("ok")


if __name__ == "__main__":
    main()
