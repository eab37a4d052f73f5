"""Samples during training (`evals.sample_prompts`): at each eval the model being trained samples
one video per prompt through `cogvideox_jax.Pipeline` on the training mesh, written as
WORKDIR/samples/step_{N}_{i}.mp4 with their prompts in step_{N}.json and a contact sheet
step_{N}.png (a row of frames per sample, its prompt under it).

The VAE, text encoder, tokenizer and scheduler are the run's model folder's
(`program.model_folder`: input.encoder_model, or the folder init.checkpoint or vae.checkpoint
belongs to), loaded once at the first eval. A run with no model folder (the runlocal configs on
synthetic data) samples with what its data stand in for: a random tiny VAE and a seeded noise
embedding per prompt, which exercises the path, not a model. Image-to-video runs take
`evals.sample_images` (one image, or one per prompt) as first frames.
"""

from __future__ import annotations

import json
import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cogvideox_jax import diffusion, pipeline
from data import video
from train.program import frozen_vae, model_folder
from train.run import Run


class EvalSampler:
    """Call with (the transformer being trained, step) at each eval; returns the metrics row's
    additions (none: samples are for a person to look at)."""

    def __init__(self, run: Run, workdir: str):
        self.run, self.workdir = run, workdir
        e = run.config.evals
        self.prompts = list(e.sample_prompts)
        self.images = [_image(p) for p in e.sample_images]
        self.pipe = None

    def _pipeline(self, transformer) -> pipeline.Pipeline:
        run, c = self.run, self.run.config
        folder = model_folder(c)
        if folder:
            pipe = pipeline.Pipeline.from_pretrained(folder, transformer=transformer)
        else:
            gd, st = frozen_vae(run)
            schedule = diffusion.ScheduleConfig(snr_shift_scale=c.diffusion.snr_shift_scale)
            pipe = _StandInText(transformer, nnx.merge(gd, st), schedule)
            pipe.text_shape = (c.input.text_len, c.input.text_dim)
        rules = pipeline.sampling_rules(run.rules)
        pipe.place(run.mesh, rules)
        return pipe

    def __call__(self, transformer, step: int) -> dict:
        if self.prompts:
            frames = self.sample(transformer, step)
            if jax.process_index() == 0:
                write(self.workdir, step, frames, self.prompts, self.pipe.fps)
        return {}

    def sample(self, transformer, step: int) -> np.ndarray:
        """(prompts, F, H, W, 3) frames in [0, 1] that `transformer` samples at `step`."""
        if self.pipe is None:
            self.pipe = self._pipeline(transformer)
        self.pipe.transformer = transformer
        c = self.run.config
        e, inp = c.evals, c.input
        image = None
        if self.images:
            image = self.images * len(self.prompts) if len(self.images) == 1 else self.images
        return self.pipe(
            self.prompts,
            image=image,
            height=inp.height,
            width=inp.width,
            num_frames=inp.num_frames,
            num_inference_steps=e.sample_steps,
            guidance_scale=e.sample_guidance,
            seed=c.seed + step,
        )


class _StandInText(pipeline.Pipeline):
    """A pipeline whose prompts are seeded noise (text_shape), for runs with no text encoder."""

    text_shape = (0, 0)

    def encode_prompt(self, prompts):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        rows = [
            np.random.default_rng(zlib.crc32(p.encode())).standard_normal(self.text_shape)
            for p in prompts
        ]
        return jnp.asarray(np.stack(rows), self.transformer.dtype)


def _image(path: str):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def write(workdir: str, step: int, frames, prompts, fps: int, extra=None) -> None:
    """samples/step_N_i.mp4, step_N.json (file, prompt and `extra[i]` per sample) and the contact
    sheet step_N.png, each written whole (temporary name, then renamed)."""
    out = os.path.join(workdir, "samples")
    os.makedirs(out, exist_ok=True)
    listing = []
    for i, (f, prompt) in enumerate(zip(frames, prompts, strict=True)):
        name = f"step_{step}_{i}.mp4"
        video.write_mp4(os.path.join(out, name), f, fps)
        listing.append({"file": name, "caption": prompt} | (extra[i] if extra else {}))
    path = os.path.join(out, f"step_{step}.json")
    with open(path + ".tmp", "w") as fh:
        json.dump(listing, fh, indent=1)
    os.replace(path + ".tmp", path)
    score = lambda x: f" ({x['prompt_adherence']:.2f})" if "prompt_adherence" in x else ""  # noqa: E731
    labels = [x["caption"] + score(x) for x in listing]
    video.write_contact_sheet(os.path.join(out, f"step_{step}.png"), frames, labels)
