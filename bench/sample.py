r"""Sampling, ours (cogvideox_jax.Pipeline) against diffusers' CogVideoXPipeline.

  python -m bench.sample [--variant 2b|5b|1.5-5b] [--layers 4 --heads 8 --head-dim 64]
                         [--latent 3,12,16 --steps 50 --repeats 3]
                         [--dtype float32|bfloat16] [--torch-device auto]
                         [--smallest] [--out result.json]

Both pipelines get the same transformer weights (a random diffusers model with the
architecture of bench.train_step: CogVideoX-5B's at 4 layers of 8 x 64 by default, or a
`--variant`'s, saved and loaded into ours), in `--dtype`, on one device each (torch on
`--torch-device`; auto: the GPU when jax runs on one), DDIM (CogVideoXDDIMScheduler,
snr_shift_scale 3), prompt and negative-prompt embeddings, initial noise and guidance scale 6;
both return latents
(`output_type="latent"`), so no VAE decode is timed (bench.vae times the VAE). Two figures:
a one-step sample (one denoising step with classifier-free guidance: a batch of 2, cond +
uncond) and a whole `--steps`-step sample. Our sampler is one compiled `lax.fori_loop` with both
CFG branches in one batched forward; diffusers loops in Python, also batching cond + uncond.
Model FLOPs: `cogvideox_jax.flops.transformer_flops` x CFG batch x steps.
One warm-up each (compilation for ours), then rounds that run each once, in an order
shuffled every round (`bench.train_step.alternate`); medians.
The default latent 3 x 12 x 16 (9 frames, 96 x 128 pixels) keeps a 50-step sample under a
minute or so per implementation on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

import cogvideox_jax as cj
from bench.train_step import (
    DTYPES,
    add_torch_device,
    alternate,
    diffusers_transformer,
    machine_facts,
    model_args,
    model_facts,
    parse,
    sig,
    torch_device,
    video_tokens,
    write_json,
)
from cogvideox_jax import flops

SMALLEST = dict(
    layers=1, heads=2, head_dim=16, latent="2,4,4", text_len=8, text_dim=16, time_dim=16, steps=2
)
SCHEDULER = dict(
    beta_schedule="scaled_linear",
    prediction_type="v_prediction",
    rescale_betas_zero_snr=True,
    set_alpha_to_one=True,
    timestep_spacing="trailing",
    clip_sample=False,
    snr_shift_scale=3.0,
)


def pipelines(args, folder: Path):
    """(ours, theirs): the two pipelines over the same transformer, a tiny VAE (never run: only
    its compression factors are read) and DDIM, via a diffusers model folder."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline

    from cogvideox_jax import vae

    transformer = diffusers_transformer(args).eval()
    torch.manual_seed(1)
    cfg = vae.vae_config("tiny", latent_channels=16)
    autoencoder = AutoencoderKLCogVideoX(**cfg.to_diffusers()).eval()
    scheduler = CogVideoXDDIMScheduler(**SCHEDULER)
    transformer.save_pretrained(folder / "transformer")
    autoencoder.save_pretrained(folder / "vae")
    scheduler.save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "CogVideoXPipeline"}))
    theirs = CogVideoXPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=autoencoder,
        transformer=transformer,
        scheduler=scheduler,
    )
    theirs.set_progress_bar_config(disable=True)
    theirs.to(torch.device(args.torch_device))
    if args.dtype != "float32":  # the transformer only; the VAE is never run
        transformer.to(DTYPES[args.dtype])
    return cj.Pipeline.from_pretrained(folder, dtype=np.dtype(args.dtype)), theirs


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.sample")
    model_args(parser, latent="3,12,16")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=6.0)
    parser.add_argument(
        "--dtype", default="float32", choices=DTYPES, help="the transformer's (both pipelines)"
    )
    add_torch_device(parser)
    args = parse(parser, argv, SMALLEST)
    args.torch_device = torch_device(args.torch_device)
    device, tdtype = torch.device(args.torch_device), DTYPES[args.dtype]
    t, h, w = args.latent
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((args.batch, t, h, w, 16), dtype=np.float32)
    text = rng.standard_normal((args.batch, args.text_len, args.text_dim), dtype=np.float32)
    neg = rng.standard_normal(text.shape, dtype=np.float32)
    size = dict(height=h * 8, width=w * 8, num_frames=(t - 1) * 4 + 1, guidance_scale=args.guidance)
    tnoise, ttext, tneg = (torch.from_numpy(a).to(device, tdtype) for a in (noise, text, neg))
    tnoise = tnoise.permute(0, 1, 4, 2, 3).contiguous()  # (B, T, C, h, w)

    with tempfile.TemporaryDirectory() as d:
        ours, theirs = pipelines(args, Path(d))
    out = {}

    def run_ours(steps):
        def run():
            out["ours", steps] = ours(
                prompt_embeds=text,
                negative_prompt_embeds=neg,
                latents=noise,
                num_inference_steps=steps,
                output_type="latent",
                **size,
            )

        return run

    def run_theirs(steps):
        def run():
            with torch.no_grad():
                z = theirs(
                    prompt_embeds=ttext,
                    negative_prompt_embeds=tneg,
                    latents=tnoise,
                    num_inference_steps=steps,
                    output_type="latent",
                    **size,
                ).frames
            out["diffusers", steps] = z.permute(0, 1, 3, 4, 2).float().cpu().numpy()

        return run

    cfg = ours.transformer.cfg
    forward = flops.transformer_flops(cfg, args.text_len, video_tokens(cfg, args.latent))
    rows = {}
    for name, steps in (("one_step", 1), ("sample", args.steps)):
        med = alternate({"ours": run_ours(steps), "diffusers": run_theirs(steps)}, args.repeats)
        a, b = out["ours", steps], out["diffusers", steps]
        rows[name] = {
            "steps": steps,
            "ours_s": sig(med["ours"]),
            "diffusers_s": sig(med["diffusers"]),
            "ratio": sig(med["ours"] / med["diffusers"], 3),
            "model_flops": 2 * args.batch * steps * forward,
            "ours_gflops_per_s": sig(2 * args.batch * steps * forward / med["ours"] / 1e9),
            "diffusers_gflops_per_s": sig(
                2 * args.batch * steps * forward / med["diffusers"] / 1e9
            ),
            "latents_rel_l2_vs_diffusers": float(np.linalg.norm(a - b) / np.linalg.norm(b)),
        }
    result = {
        "benchmark": "sample",
        "config": {
            "variant": args.variant or "5b (resized)",
            **model_facts(args),
            "latent_thw": [t, h, w],
            "pixels_fhw": [size["num_frames"], size["height"], size["width"]],
            "prompts": args.batch,
            "cfg_batch": 2 * args.batch,
            "guidance_scale": args.guidance,
            "scheduler": "ddim",
            "dtype": args.dtype,
            "torch_device": args.torch_device,
            "vae_decode": "not timed (output_type='latent')",
        },
        "repeats": args.repeats,
        "machine": machine_facts(),
        **rows,
    }
    print(f"{'':16}{'ours (s)':>10}{'diffusers (s)':>15}{'ratio':>8}{'rel L2':>10}")
    for name, r in rows.items():
        label = f"{name} ({r['steps']})"
        err = f"{r['latents_rel_l2_vs_diffusers']:.1e}"
        print(f"{label:16}{r['ours_s']:>10}{r['diffusers_s']:>15}{r['ratio']:>8}{err:>10}")
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
