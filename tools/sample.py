r"""Sample a video from a CogVideoX model folder (diffusers layout, or its Orbax conversion).

  python -m tools.sample --model DIR --prompt "a red ball rolls left" --out video.mp4
  python -m tools.sample --model DIR --prompt "..." --image first.png --out video.mp4   # I2V
  python -m tools.sample --model DIR --prompt "..." --video in.mp4 --strength 0.8 --out v.mp4  # V2V
  python -m tools.sample --model DIR --prompt "..." --invert in.mp4 --out v.mp4  # DDIM inversion
  python -m tools.sample --model DIR --prompt "..." --mesh data=2,fsdp=2,context=2 --out v.mp4
  python -m tools.sample --model DIR --lora RUN_OR_LORA --lora-scale 1.0 --prompt "..." --out v.mp4
  python -m tools.sample --model RUN [--step N] [--ema] [--base DIR] --prompt "..." --out v.mp4

--model also takes a training run (its workdir, checkpoints/ folder or a step folder; full or
LoRA): its transformer (latest checkpoint unless --step; the EMA weights with --ema) with the VAE,
text encoder, tokenizer and scheduler of the model folder the run recorded (input.encoder_model,
or the one init.checkpoint belongs to), or of --base DIR.

--invert IN.mp4 inverts the video with DDIM (empty prompt, no guidance, --steps steps), then
samples from --seed's noise with --prompt, each step attending to the inverted trajectory
(reference attention, as diffusers' community CogVideoX DDIM-inversion script): a
reconstruction of the video, or an edit of it with another prompt.

--lora takes a LoRA run (workdir or step folder; its latest adapters), a LoRA folder or a
diffusers LoRA (`pytorch_lora_weights.safetensors` or its folder); the adapters are merged into
the transformer's weights, scaled by --lora-scale, before sampling.

Writes an H.264 mp4 at the model's native frame rate (8 fps for CogVideoX 1.0, 16 for 1.5).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import jax.numpy as jnp

import tools
from cogvideox_jax import runtime
from data.video import read_mp4, write_mp4


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.sample",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="model folder or training run")
    parser.add_argument(
        "--step", type=int, default=None, help="a run's checkpoint (default: latest)"
    )
    parser.add_argument("--ema", action="store_true", help="a run's EMA weights")
    parser.add_argument("--base", default="", help="model folder for a run's other components")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--image", default=None, help="first frame, for image-to-video models")
    parser.add_argument(
        "--video", default=None, help="video-to-video: the input video file (sets the frames)"
    )
    parser.add_argument(
        "--strength", type=float, default=None, help="video-to-video: 0-1 (default 0.8)"
    )
    parser.add_argument(
        "--invert", default=None, help="DDIM inversion: the video to reconstruct or edit"
    )
    parser.add_argument("--out", required=True, help="output .mp4")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--num-frames", type=int, default=None)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance-scale", type=float, default=6.0)
    parser.add_argument("--dynamic-cfg", action="store_true")
    parser.add_argument(
        "--scheduler",
        choices=["ddim", "dpm"],
        default=None,
        help="sampler (default: the model folder's scheduler class, as diffusers)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="transformer and text encoder dtype (default: as stored)",
    )
    parser.add_argument(
        "--mesh",
        default="",
        help="sample on a device mesh, e.g. data=2,fsdp=2,context=2 (axes data, fsdp, context, "
        "tensor; their product = the devices)",
    )
    parser.add_argument(
        "--context-parallel",
        choices=["allgather", "ulysses"],
        default="allgather",
        help="attention over a split token axis (model folders; runs use allgather)",
    )
    parser.add_argument(
        "--vae-decode",
        choices=["frame_batched", "tiled", "context_parallel"],
        default="frame_batched",
        help="how the VAE decodes: as diffusers (default), tiled (less memory at large sizes), "
        "or split over the --mesh context axis",
    )
    parser.add_argument("--lora", default=None, help="LoRA adapters to merge (see above)")
    parser.add_argument("--lora-scale", type=float, default=1.0)
    args = parser.parse_args(argv)
    runtime.cpu_only_without_accelerators()
    try:
        source = _source_video(args)
        mesh = _mesh(args.mesh)
        pipe, image = _load(args, mesh)
        video = _sample(pipe, image, source, args)  # the pipeline checks them before compiling
    except (FileNotFoundError, ValueError, OSError) as e:
        return tools.error(e)
    write_mp4(args.out, video[0], pipe.fps)
    print(
        f"wrote {args.out}: {video.shape[1]} frames {video.shape[2]}x{video.shape[3]} "
        f"at {pipe.fps} fps"
    )
    return 0


def _source_video(args):
    """The --video or --invert frames (F, H, W, 3) uint8, or None; --strength alone is an
    error."""
    if args.invert is not None:
        if args.video is not None or args.strength is not None or args.image is not None:
            raise ValueError("--invert takes no --video, --strength or --image")
        if args.scheduler not in (None, "ddim"):
            raise ValueError("--invert samples with --scheduler ddim")
    elif args.video is None:
        if args.strength is not None:
            raise ValueError("--strength is for video-to-video: pass --video IN.mp4 too")
        return None
    flag, path = ("--invert", args.invert) if args.invert is not None else ("--video", args.video)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag} {path}: no such file")
    if args.num_frames is not None:
        raise ValueError(f"--num-frames: {flag} takes the frames of the video")
    try:
        return read_mp4(path)[0]
    except Exception as e:  # PyAV's errors for a file it cannot decode
        raise ValueError(f"{flag} {path}: cannot be read as a video ({e})") from None


def _sample(pipe, image, source, args):
    if args.invert is not None:
        kw = dict(height=args.height, width=args.width, num_inference_steps=args.steps)
        path = pipe.invert(source, "", seed=args.seed, progress=True, **kw)
        print(f"inverted {args.invert}: {len(path)} steps")
        v2v = dict(reference_latents=path, num_frames=source.shape[0], scheduler="ddim")
    else:
        v2v = {} if source is None else dict(video=source, strength=args.strength or 0.8)
    return pipe(
        args.prompt,
        args.negative_prompt,
        image,
        height=args.height,
        width=args.width,
        **({"num_frames": args.num_frames, "scheduler": args.scheduler} | v2v),
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        use_dynamic_cfg=args.dynamic_cfg,
        seed=args.seed,
        progress=True,
    )


def _mesh(text: str):
    """The --mesh devices (axis=size, ...), or None; every axis not named has size 1."""
    if not text:
        return None
    import jax

    from cogvideox_jax import sharding

    sizes = dict.fromkeys(sharding.MESH_AXES, 1)
    for part in text.split(","):
        name, _, size = part.partition("=")
        if name.strip() not in sizes or not size.strip().isdigit() or int(size) < 1:
            raise ValueError(
                f"--mesh {text}: {part!r} is not AXIS=SIZE with AXIS one of {sharding.MESH_AXES}"
            )
        sizes[name.strip()] = int(size)
    devices = jax.devices()
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(
            f"--mesh {text}: {math.prod(sizes.values())} devices, but this machine has "
            f"{len(devices)}"
        )
    return sharding.make_mesh(sizes, devices)


def _load(args, mesh=None):
    """(the pipeline, the first-frame image or None) of the arguments; input errors raise."""
    from pathlib import Path

    from PIL import Image

    from cogvideox_jax.pipeline import Pipeline
    from train import export

    dtype = args.dtype and jnp.dtype(args.dtype)
    if not Path(args.model).is_dir():
        raise FileNotFoundError(f"--model {args.model}: no such folder")
    run = export.is_run(args.model)
    if not run and (args.step is not None or args.ema or args.base):
        raise ValueError(f"--step, --ema and --base are for training runs; {args.model} is not one")
    image = Image.open(args.image) if args.image else None
    t0 = time.time()
    if run:
        pipe, folder = export.pipeline(
            args.model, step=args.step, ema=args.ema, base=args.base, dtype=dtype
        )
        print(f"loaded the run's {'EMA ' if args.ema else ''}weights of {folder}")
        if mesh is not None:
            pipe.place(mesh)
    else:
        pipe = Pipeline.from_pretrained(
            args.model, dtype=dtype, mesh=mesh, context_parallel=args.context_parallel
        )
    pipe.vae_decode = args.vae_decode
    print(f"loaded {args.model} in {time.time() - t0:.1f}s")
    if args.lora:
        from cogvideox_jax import lora
        from tools import convert_lora

        cfg, tree = convert_lora.read_any(args.lora, pipe.transformer.cfg)
        lora.fuse(pipe.transformer, cfg, tree, scale=args.lora_scale)
        print(f"merged the rank-{cfg.rank} LoRA {args.lora} at scale {args.lora_scale:g}")
    return pipe, image


if __name__ == "__main__":
    sys.exit(main())
