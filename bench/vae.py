r"""VAE encode and decode, ours against diffusers' AutoencoderKLCogVideoX, same weights and clip.

  python -m bench.vae [--frames 9 --height 96 --width 160 --repeats 3] [--smallest]
                      [--out result.json]

Both run the full-size CogVideoX VAE architecture (random weights, 216M parameters; with
--smallest the library's "tiny" VAE on a 5 x 16 x 16 clip, seconds, for CI) in fp32 on the CPU,
with diffusers' default frame batching (the mode that reproduces its outputs). Ours is compiled
with `cogvideox_jax.compiler.options()`, as the library compiles its own VAE calls.
One warm-up each, then rounds that run each once in a shuffled order
(`bench.train_step.alternate`); medians are reported.
"""

from __future__ import annotations

import argparse
import json
import tempfile

import numpy as np
import torch

import cogvideox_jax as cj
from bench.train_step import alternate, machine_facts
from cogvideox_jax import compiler, vae


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.vae")
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--height", type=int, default=96)
    parser.add_argument("--width", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smallest", action="store_true", help="tiny VAE and clip: seconds (CI)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    from diffusers import AutoencoderKLCogVideoX

    config = {}
    if args.smallest:
        args.frames, args.height, args.width = 5, 16, 16
        config = vae.vae_config("tiny").to_diffusers()
    torch.manual_seed(0)
    theirs = AutoencoderKLCogVideoX(**config).eval()
    with tempfile.TemporaryDirectory() as d:
        theirs.save_pretrained(d)
        ours = cj.load_vae(d)
    rng = np.random.default_rng(0)
    video = rng.uniform(-1, 1, (1, args.frames, args.height, args.width, 3)).astype(np.float32)
    tvideo = torch.from_numpy(video).permute(0, 4, 1, 2, 3).contiguous()
    encode = compiler.jit(lambda v: ours.encode(v)[0])
    decode = compiler.jit(lambda z: ours.decode(z))
    z = np.array(encode(video))  # writable, for torch.from_numpy
    tz = torch.from_numpy(z).permute(0, 4, 1, 2, 3).contiguous()

    def run_theirs_encode():
        with torch.no_grad():
            return theirs.encode(tvideo).latent_dist.mean

    def run_theirs_decode():
        with torch.no_grad():
            return theirs.decode(tz).sample

    results = {}
    for name, fn_ours, fn_theirs in [
        ("encode", lambda: encode(video).block_until_ready(), run_theirs_encode),
        ("decode", lambda: decode(z).block_until_ready(), run_theirs_decode),
    ]:
        med = alternate({"ours": fn_ours, "diffusers": fn_theirs}, args.repeats)
        mo, mt = med["ours"], med["diffusers"]
        results[name] = {
            "ours_s": round(mo, 3),
            "diffusers_s": round(mt, 3),
            "ratio": round(mo / mt, 3),
        }
    want = run_theirs_encode().permute(0, 2, 3, 4, 1).numpy()
    err = float(np.linalg.norm(np.asarray(encode(video)) - want) / np.linalg.norm(want))
    result = {
        "benchmark": "vae",
        "clip": [args.frames, args.height, args.width],
        "parameters": sum(p.numel() for p in theirs.parameters()),
        "repeats": args.repeats,
        "machine": machine_facts(),
        "encode_rel_l2_vs_diffusers": err,
        **results,
    }
    print(f"{'':8}{'ours (s)':>10}{'diffusers (s)':>15}{'ratio':>8}")
    for name in ("encode", "decode"):
        r = results[name]
        print(f"{name:8}{r['ours_s']:>10}{r['diffusers_s']:>15}{r['ratio']:>8}")
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
