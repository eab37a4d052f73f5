"""The built-in demo's stages around the transformer loop (config.input.source == "demo").

1. A frozen text encoder: a tiny T5 encoder with fixed, seeded random weights over the demo's
   word ids.
2. The demo VAE: the tiny causal VAE trained briefly, first on single frames of the demo clips
   (coded alone, as the causal VAE codes a clip's first frame), then on whole clips with frames
   beside them (foreground-weighted L1 + L2 reconstruction plus a small KL term); cached in
   WORKDIR/demo_vae and reused on resume.
3. Latents (posterior means times a measured scaling factor) and text embeddings of every clip,
   computed once and served as a Grain MapDataset with data/synthetic.py's record structure.
4. Samples at eval steps through cogvideox_jax.pipeline.Pipeline, written as mp4s and scored
   with data.demo.prompt_adherence (colour, shape and direction read back from the frames; each
   part's accuracy is logged too).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

import cogvideox_jax as cj
from cogvideox_jax import diffusion, t5
from cogvideox_jax import vae as vae_lib
from data import demo as demo_data
from data import pipeline, video
from train import samples


def _note(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


# ---- Text encoder ----


def text_encoder(d: dict, seed: int) -> t5.T5Encoder:
    """The frozen encoder: fixed random weights from `seed`."""
    cfg = t5.T5Config(
        vocab_size=len(demo_data.VOCAB),
        d_model=d.text_dim,
        d_kv=d.text_dim // d.text_heads,
        d_ff=2 * d.text_dim,
        num_layers=d.text_layers,
        num_heads=d.text_heads,
    )
    return t5.T5Encoder(cfg, rngs=nnx.Rngs(seed))


@nnx.jit
def _encode_text(encoder, ids):
    return encoder(ids)


def embed(encoder, captions, length: int) -> np.ndarray:
    """(B, length, text_dim) float32 embeddings of `captions`."""
    return np.asarray(_encode_text(encoder, jnp.asarray(demo_data.tokenize(captions, length))))


# ---- VAE ----


def _vae_config(d: dict) -> vae_lib.VaeConfig:
    return vae_lib.vae_config(
        "tiny",
        block_out_channels=tuple(d.vae_widths),
        latent_channels=d.latent_channels,
        norm_num_groups=d.vae_groups,
    )


def _clips(indices, seed: int, frames: int, size: int) -> tuple[np.ndarray, list[str]]:
    out = [demo_data.make_clip(int(i), seed=seed, num_frames=frames, size=size) for i in indices]
    return np.stack([f for f, _ in out]), [c for _, c in out]


def _save_tree(path: str, tree) -> None:
    leaves = jax.tree.leaves(tree)
    ckpt = ocp.PyTreeCheckpointer()
    ckpt.save(path, {f"{i:05d}": np.asarray(x) for i, x in enumerate(leaves)}, force=True)


def _load_tree(path: str, like):
    restored = ocp.PyTreeCheckpointer().restore(path)
    leaves = [jnp.asarray(restored[f"{i:05d}"]) for i in range(len(jax.tree.leaves(like)))]
    return jax.tree.unflatten(jax.tree.structure(like), leaves)


def train_vae(c, workdir: str, *, restore_only: bool = False) -> tuple[cj.AutoencoderKL, bool]:
    """(the demo VAE, whether it was trained now): trained on the demo clips, or restored from
    WORKDIR/demo_vae when that holds one trained with the same settings (`restore_only`: never
    trained; an error if there is none); its cfg.scaling_factor is 1 / std of the training
    latents."""
    d = c.demo
    cfg = _vae_config(d)
    vae = cj.AutoencoderKL(cfg, rngs=nnx.Rngs(c.seed + 3))
    # The posterior starts narrow (logvar bias d.vae_init_logvar): with unit-variance samples
    # from the start, a brief training only gets the latents to carry the coarse content (warm
    # vs cool colours), not the hue.
    bias = vae.encoder.conv_out.conv.bias
    bias[...] = bias[...].at[cfg.latent_channels :].set(d.vae_init_logvar)
    graphdef, params = nnx.split(vae)
    folder = os.path.join(os.path.abspath(workdir), "demo_vae")
    meta_path = os.path.join(folder, "meta.json")
    settings = _vae_settings(c)
    meta, fresh = None, False
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("settings") != settings:  # trained with other settings: train anew
            _note(f"demo VAE in {folder} was trained with other settings; training it again")
            meta = None
    if meta is not None:
        params = _load_tree(os.path.join(folder, "params"), params)
        _note(f"demo VAE: restored from {folder}")
    elif restore_only:
        raise FileNotFoundError(f"{folder}: no demo VAE trained with this run's settings")
    else:
        params, meta = _fit_vae(c, graphdef, params)
        fresh = True
        meta["settings"] = settings
        os.makedirs(folder, exist_ok=True)
        _save_tree(os.path.join(folder, "params"), params)
        with open(meta_path + ".tmp", "w") as f:
            json.dump(meta, f)
        os.replace(meta_path + ".tmp", meta_path)
    vae = nnx.merge(graphdef, params)
    vae.cfg = dataclasses.replace(cfg, scaling_factor=meta["scaling_factor"])
    return vae, fresh


def _vae_settings(c) -> dict:
    """Everything the trained demo VAE depends on (a cached one is reused only if equal)."""
    keys = ("vae_widths", "vae_groups", "latent_channels", "vae_steps", "vae_batch", "vae_lr")
    keys += ("kl_weight", "foreground_weight", "vae_init_logvar", "vae_image_steps")
    keys += ("vae_image_batch", "vae_joint_images", "vae_video_lr")
    out = {k: c.demo[k] for k in keys}
    out.update(seed=c.seed, frames=c.input.num_frames, size=c.input.height)
    out.update(num_examples=c.input.num_examples)
    return json.loads(json.dumps(out))  # tuples as lists, as read back from meta.json


def _fit_vae(c, graphdef, params):
    d, inp = c.demo, c.input
    image_steps = d.vae_image_steps
    total = image_steps + d.vae_steps
    lr = optax.join_schedules(
        [
            optax.cosine_decay_schedule(d.vae_lr, max(image_steps, 1), alpha=0.05),
            optax.cosine_decay_schedule(d.vae_video_lr, d.vae_steps, alpha=0.05),
        ],
        [image_steps],
    )
    tx = optax.adam(lr)
    opt_state = tx.init(params)

    def loss_fn(p, xs, key):  # xs: clips and/or single frames (F = 1), each (B, F, H, W, 3)
        out = [one_loss(p, x, jax.random.fold_in(key, i)) for i, x in enumerate(xs)]
        return sum(o[0] for o in out), out[0][1]  # the L1 shown: the clips' (or the frames')

    def one_loss(p, x, key):
        vae = nnx.merge(graphdef, p)
        # Up to 9 frames (3 latents) are one frame-batching chunk, so the whole-clip path gives
        # the same numbers as the default frame-batched one without its scan's overhead.
        mean, logvar = vae.encode(x, frame_batching=False)
        z = vae_lib.sample_latents(key, mean, logvar)
        rec = vae.decode(z, frame_batching=False)
        # The shapes cover a quarter of the frame: their pixels weigh a little more, so that the
        # VAE does not settle on the background. A heavy weight makes it paint past the outline,
        # which rounds squares off (README).
        weight = 1.0 + d.foreground_weight * (jnp.max(x, axis=-1, keepdims=True) > -0.5)
        err = rec - x
        l1 = jnp.mean(weight * jnp.abs(err)) / jnp.mean(weight)
        l2 = jnp.mean(weight * jnp.square(err)) / jnp.mean(weight)
        kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
        return l1 + l2 + d.kl_weight * kl, l1

    @jax.jit
    def step(p, o, x, key):
        (loss, l1), g = jax.value_and_grad(loss_fn, has_aux=True)(p, x, key)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, l1

    rng = np.random.default_rng(c.seed + 7)
    key = jax.random.PRNGKey(c.seed + 7)
    t0 = time.perf_counter()
    for i in range(total):
        xs = []
        if i >= image_steps:
            idx = rng.integers(0, inp.num_examples, d.vae_batch)
            xs.append(jnp.asarray(_clips(idx, c.seed, inp.num_frames, inp.height)[0]))
        if i < image_steps or d.vae_joint_images:
            n = d.vae_image_batch if i < image_steps else d.vae_joint_images
            idx = rng.integers(0, inp.num_examples, n)
            x, _ = _clips(idx, c.seed, inp.num_frames, inp.height)
            # one frame of each clip, coded alone as the causal VAE codes a first frame
            xs.append(jnp.asarray(x[np.arange(n), rng.integers(0, inp.num_frames, n)][:, None]))
        params, opt_state, l1 = step(params, opt_state, xs, jax.random.fold_in(key, i))
        if i % 50 == 0 or i == total - 1:
            _note(f"demo VAE step {i + 1}/{total}: L1 {float(l1):.4f}")
    _note(f"demo VAE trained in {time.perf_counter() - t0:.0f}s")
    vae = nnx.merge(graphdef, params)
    means = _encode_means(vae, c, range(min(inp.num_examples, 64)))
    return params, {"scaling_factor": float(1.0 / (means.std() + 1e-6)), "final_l1": float(l1)}


@nnx.jit
def _encode(vae, x):
    return vae.encode(x)[0]


@nnx.jit
def _reconstruct(vae, x):
    return vae.decode(vae.encode(x)[0])


def _encode_means(vae, c, indices, batch: int = 16) -> np.ndarray:
    indices = list(indices)
    out = []
    for s in range(0, len(indices), batch):
        x, _ = _clips(indices[s : s + batch], c.seed, c.input.num_frames, c.input.height)
        out.append(np.asarray(_encode(vae, jnp.asarray(x))))
    return np.concatenate(out)


# ---- The stage object the trainer uses ----


# Raw clips' posteriors kept by Demo.encode (the demo VAE's latents are 1/48 of the pixels').
ENCODE_CACHE_BYTES = 2**30


class Demo:
    """Frozen text encoder, trained VAE, precomputed records and the eval-time sampler."""

    def __init__(self, c, workdir: str):
        self.c, self.workdir = c, workdir
        d, inp = c.demo, c.input
        if inp.text_len != demo_data.TEXT_LEN:
            raise ValueError(
                f"input.text_len ({inp.text_len}) must equal the caption tokenizer's length "
                f"({demo_data.TEXT_LEN})"
            )
        factor = _vae_config(d).spatial_compression
        if inp.spatial_compression != factor:
            raise ValueError(
                f"input.spatial_compression ({inp.spatial_compression}) must equal the demo "
                f"VAE's ({factor}: {len(d.vae_widths)} levels of demo.vae_widths)"
            )
        self.encoder = text_encoder(d, c.seed + 5)
        captions = [demo_data.caption(i) for i in range(inp.num_examples + inp.eval_examples)]
        self.table = embed(self.encoder, sorted(set(captions)), inp.text_len)
        self.caption_row = {cap: i for i, cap in enumerate(sorted(set(captions)))}
        self.captions = captions
        self._captions: dict[str, np.ndarray] = {}  # raw-clip captions' embeddings (encode)
        self._posteriors: dict[tuple, tuple] = {}  # raw clips' scaled (mean, logvar) (encode)
        self._cached_bytes = 0
        self.neg = np.zeros((1, inp.text_len, inp.text_dim), np.float32)  # dropped-text embedding

    def prepare(self) -> None:
        """Train or restore the demo VAE now (else on first use)."""
        self.vae  # noqa: B018

    @functools.cached_property
    def vae(self):
        """The demo VAE, trained (or restored from WORKDIR/demo_vae) on first use, so that the
        run's other checks come before its minutes of training."""
        vae, trained = train_vae(self.c, self.workdir)
        if trained or not os.path.isfile(self._reconstruction_path):  # else it shows this VAE
            self.write_reconstructions(vae)
        return vae

    @functools.cached_property
    def latents(self) -> np.ndarray:
        """Scaled posterior means (the demo's diffusion scale is 1) of every demo clip, computed
        on first use (a run on a prepared dataset needs none)."""
        t0 = time.perf_counter()
        total = self.c.input.num_examples + self.c.input.eval_examples
        means = _encode_means(self.vae, self.c, range(total)) * self.vae.cfg.scaling_factor
        _note(f"demo latents {means.shape} precomputed in {time.perf_counter() - t0:.1f}s")
        return means.astype(np.float32)

    @property
    def _reconstruction_path(self) -> str:
        return os.path.join(self.workdir, "samples", "vae_reconstruction.mp4")

    def record(self, i: int) -> dict[str, np.ndarray]:
        return {
            "latents": self.latents[i],
            "text": self.table[self.caption_row[self.captions[i]]],
        }

    def dataset(self, batch_size: int, *, train: bool, seed: int, rows=None):
        """Global batches of records with synthetic.dataset's structure (this process loads the
        `rows` of each): the first num_examples clips for training (shuffled, repeated), the
        next eval_examples held out."""
        n, e = self.c.input.num_examples, self.c.input.eval_examples
        ds = grain.MapDataset.range(n if train else e)
        if train:
            ds = ds.shuffle(seed=seed).repeat(None)
        offset = 0 if train else n
        return pipeline.batches(ds, batch_size, rows, lambda i: self.record(i + offset))

    def encode(self, record: dict) -> dict[str, np.ndarray]:
        """A raw clip record {frames (F, H, W, 3) uint8, caption} of a prepared dataset ->
        {latent_mean, latent_logvar (scaled: the demo's diffusion scale is 1), text}, by the
        demo's VAE and text encoder (input.data_dir with a dataset of raw clips). A clip's
        posterior is computed once (a small dataset comes round every few steps) and kept while
        the cache holds under ENCODE_CACHE_BYTES."""
        key = (record.get("path"), record["frames"].shape)
        if key not in self._posteriors:
            x = record["frames"].astype(np.float32)[None] / 127.5 - 1.0
            mean, logvar = self._posterior(x)
            sf = self.vae.cfg.scaling_factor
            post = (np.asarray(mean[0]) * sf, np.asarray(logvar[0]) + 2.0 * np.log(sf))
            size = post[0].nbytes + post[1].nbytes
            if key[0] is None or self._cached_bytes + size > ENCODE_CACHE_BYTES:
                return self._encoded(post, record["caption"])
            self._posteriors[key] = post
            self._cached_bytes += size
        return self._encoded(self._posteriors[key], record["caption"])

    def _encoded(self, posterior, caption: str) -> dict[str, np.ndarray]:
        mean, logvar = posterior  # logvar of the scaled latent
        return {"latent_mean": mean, "latent_logvar": logvar, "text": self._caption(caption)}

    @functools.cached_property
    def _posterior(self):
        """jax.jit of the VAE's encode on its split state: called once per clip, where
        nnx.jit's per-call graph traversal would double the cost."""
        graphdef, state = nnx.split(self.vae)
        encode = jax.jit(lambda state, x: nnx.merge(graphdef, state).encode(x))
        return functools.partial(encode, state)

    def _caption(self, caption: str) -> np.ndarray:
        """(text_len, text_dim) embedding of a caption, computed once per distinct caption."""
        if caption not in self._captions:
            self._captions[caption] = embed(self.encoder, [caption], self.c.input.text_len)[0]
        return self._captions[caption]

    def write_reconstructions(self, vae) -> None:
        """WORKDIR/samples/vae_reconstruction.mp4: clips (top) over their reconstructions."""
        if jax.process_index() != 0:
            return
        inp = self.c.input
        x, _ = _clips(range(4), self.c.seed, inp.num_frames, inp.height)
        rec = np.asarray(_reconstruct(vae, jnp.asarray(x)))
        top, bottom = np.concatenate(list(x), axis=2), np.concatenate(list(rec), axis=2)
        grid = np.concatenate([top, bottom], axis=1) / 2 + 0.5
        os.makedirs(os.path.dirname(self._reconstruction_path), exist_ok=True)
        video.write_mp4(self._reconstruction_path, grid, 8)

    def sample(self, transformer, step: int) -> dict:
        """Sample `demo.samples` videos for fixed captions, write mp4s, score them."""
        d, inp = self.c.demo, self.c.input
        n = d.samples
        caps = [demo_data.caption(i * 5) for i in range(n)]  # varied colour/shape/direction
        pos = np.stack([self.table[self.caption_row[cap]] for cap in caps])
        neg = np.repeat(self.neg, n, axis=0)
        pipe = cj.Pipeline(
            transformer,
            self.vae,
            diffusion.ScheduleConfig(snr_shift_scale=self.c.diffusion.snr_shift_scale),
        )
        frames = pipe(
            prompt_embeds=pos,
            negative_prompt_embeds=neg,
            height=inp.height,
            width=inp.width,
            num_frames=inp.num_frames,
            num_inference_steps=d.sample_steps,
            guidance_scale=d.guidance_scale,
            scheduler="ddim",
            seed=self.c.seed + step,
        )  # (B, F, H, W, 3) in [0, 1]
        read = [demo_data.read_clip(f, value_range=(0.0, 1.0)) for f in frames]
        hits = np.array(  # (samples, 3): colour, shape, direction as the caption says
            [[part in cap.split() for part in parts] for parts, cap in zip(read, caps, strict=True)]
        )
        scores = hits.all(axis=1).astype(float)  # = data.demo.prompt_adherence
        if jax.process_index() == 0:
            self._write_samples(step, frames, caps, scores)
        out = {"prompt_adherence": float(scores.mean())}
        for i, part in enumerate(("colour", "shape", "direction")):
            out[f"adherence_{part}"] = float(hits[:, i].mean())
        return out

    def _write_samples(self, step: int, frames, caps, scores) -> None:
        """samples/step_N_i.mp4, step_N.json (captions and scores), the contact sheet step_N.png."""
        extra = [{"prompt_adherence": float(x)} for x in scores]
        samples.write(self.workdir, step, frames, caps, 8, extra)


# ---- Sampling a finished demo run (tools.sample --model RUN) ----


def write_base(c, workdir: str, folder) -> None:
    """A demo run's model folder without its transformer, in Orbax components: the run's VAE
    (WORKDIR/demo_vae), its frozen text encoder, a transformers tokenizer of the captions' words
    (`data.demo.transformers_tokenizer`), the schedule and model_index.json; the `base` that
    `components.write_model` adds the run's transformer to."""
    from cogvideox_jax import components

    vae, _ = train_vae(c, workdir, restore_only=True)
    encoder = text_encoder(c.demo, c.seed + 5)
    parts = [
        ("vae", vae, {"_class_name": "AutoencoderKLCogVideoX", **vae.cfg.to_diffusers()}),
        ("text_encoder", encoder, encoder.cfg.to_transformers()),
    ]
    for name, module, config in parts:
        os.makedirs(os.path.join(folder, name))
        components.write_orbax_module(module, os.path.join(folder, name), name, config)
    demo_data.transformers_tokenizer().save_pretrained(os.path.join(folder, "tokenizer"))
    schedule = diffusion.ScheduleConfig(snr_shift_scale=c.diffusion.snr_shift_scale)
    os.makedirs(os.path.join(folder, "scheduler"))
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(schedule.to_diffusers(), f, indent=2)
    index = {
        "_class_name": "CogVideoXPipeline",
        "scheduler": ["diffusers", "CogVideoXDDIMScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLCogVideoX"],
    }
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)


class DemoPipeline(cj.Pipeline):
    """A demo run as a pipeline: its transformer with its own VAE (WORKDIR/demo_vae) and frozen
    word-level text encoder. Prompts use the demo captions' words; an empty prompt is the
    dropped-text (zero) embedding the run trained with; sizes default to the run's clips."""

    def __init__(self, transformer, c, workdir: str):
        vae, _ = train_vae(c, workdir, restore_only=True)
        schedule = diffusion.ScheduleConfig(snr_shift_scale=c.diffusion.snr_shift_scale)
        super().__init__(transformer, vae, schedule)
        self.c, self.encoder = c, text_encoder(c.demo, c.seed + 5)

    def encode_prompt(self, prompts):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        known = set(demo_data.VOCAB[2:])  # ids 0 and 1 pad and stand for unknown words
        for p in prompts:
            unknown = [w for w in p.lower().split() if w not in known]
            if unknown:
                raise ValueError(
                    f"prompt {p!r}: the demo's text encoder knows only its captions' words, not "
                    f"{unknown} (it knows: {' '.join(sorted(known))})"
                )
        length, dim = self.c.input.text_len, self.c.input.text_dim
        rows = [
            embed(self.encoder, [p], length)[0] if p.strip() else np.zeros((length, dim))
            for p in prompts
        ]
        return jnp.asarray(np.stack(rows), self.transformer.dtype)

    def __call__(self, *args, height=None, width=None, num_frames=None, **kwargs):
        inp = self.c.input
        return super().__call__(
            *args,
            height=height or inp.height,
            width=width or inp.width,
            num_frames=num_frames or inp.num_frames,
            **kwargs,
        )
