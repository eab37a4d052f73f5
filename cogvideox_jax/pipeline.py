"""Text- and image-to-video sampling, as diffusers' CogVideoXPipeline and
CogVideoXImageToVideoPipeline (0.42.1, `pipelines/cogvideo/`) do it.

One call: encode prompts (T5, 226 tokens, no mask; the negative prompt "" is encoded too), draw
the initial noise, run the whole denoising loop as one compiled `lax.fori_loop` (both CFG
branches in one batched forward), then decode with the VAE. CogVideoX 1.5 pads the latent frames
to a multiple of patch_size_t at the front and drops the padding before decoding; 1.5-I2V passes
ofs = 2.0. Latents are channels-last (B, T, H, W, C) throughout.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cogvideox_jax import compiler, components, diffusion, sharding, t5, vae_tiling
from cogvideox_jax import vae as vae_lib
from cogvideox_jax.vae import sample_latents

SCHEDULERS = ("ddim", "dpm")
# How the VAE decodes: as diffusers does by default (frame batching: chunks of 2 latents),
# tiled (diffusers' `vae.enable_tiling()`: less memory at large sizes), or the whole clip with
# its latent frames split over the mesh's `context` axis (`vae.decode_context_parallel`).
VAE_DECODES = ("frame_batched", "tiled", "context_parallel")


class Pipeline:
    """transformer + vae (+ text encoder and tokenizer) + the noise schedule.

    Args:
      transformer: a `transformer.Transformer` (`load_transformer`).
      vae: a `vae.AutoencoderKL` (`load_vae`).
      schedule: the training noise schedule the samplers step through.
      text_encoder, tokenizer: a `t5.T5Encoder` and its tokenizer (`t5.load_tokenizer`), for
        prompts given as text; without them pass `prompt_embeds`.
      mesh: sample on a device mesh (`sharding.make_mesh`, the trainer's axes): the transformer's
        and text encoder's weights are placed by `rules` (default SAMPLING_RULES: FSDP over
        `fsdp` and `context`, the token axis over `context`, the batch, both classifier-free
        guidance halves included, over `data`); the VAE is replicated. None: one device.
      vae_decode: one of VAE_DECODES (attribute; may be changed later). "context_parallel"
        needs a mesh with a `context` axis above 1 and gives the whole-clip decode
        (`frame_batching=False`), which differs slightly from diffusers' frame-batched one.
    """

    def __init__(
        self,
        transformer,
        vae,
        schedule: diffusion.ScheduleConfig,
        *,
        text_encoder=None,
        tokenizer=None,
        mesh: jax.sharding.Mesh | None = None,
        rules: sharding.Rules | None = None,
        vae_decode: str = "frame_batched",
    ):
        self.transformer, self.vae, self.schedule = transformer, vae, schedule
        self.vae_decode = vae_decode
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.alphas_cumprod = diffusion.alphas_cumprod(schedule)
        self.mesh, self.rules = None, tuple(rules or SAMPLING_RULES)
        if mesh is not None:
            self.place(mesh, rules)

    def place(self, mesh: jax.sharding.Mesh, rules: sharding.Rules | None = None) -> None:
        """Sample on `mesh` from now on, the weights placed by `rules` (see the class)."""
        self.mesh, self.rules = mesh, tuple(rules or SAMPLING_RULES)
        for module in (self.transformer, self.text_encoder):
            if module is not None:
                _place(module, mesh, self.rules)
        _place(self.vae, mesh, None)

    def decode(self, z: jax.Array) -> jax.Array:
        """Unscaled latents (B, T, h, w, C) -> frames (B, F, H, W, 3) in [-1, 1], by
        `vae_decode`."""
        self._check_decode()
        if self.vae_decode == "tiled":
            return _decode_tiled(self.vae, z)
        if self.vae_decode == "frame_batched":
            return _decode(self.vae, z)
        return _decode_context_parallel(self.vae, z, mesh=self.mesh)

    def _check_decode(self) -> None:
        if self.vae_decode not in VAE_DECODES:
            raise ValueError(f"vae_decode must be one of {VAE_DECODES}, got {self.vae_decode!r}")
        cp = self.mesh is not None and self.mesh.shape.get("context", 1) > 1
        if self.vae_decode == "context_parallel" and not cp:
            raise ValueError("vae_decode='context_parallel' needs a mesh with a context axis > 1")

    def on_mesh(self):
        """The context every traced call of the pipeline runs in: its mesh and rules."""
        if self.mesh is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(sharding.use_rules(self.rules))
        return stack

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        dtype=None,
        transformer=None,
        mesh=None,
        rules=None,
        context_parallel: str = "allgather",
        vae_decode: str = "frame_batched",
    ) -> Pipeline:
        """A diffusers-layout model folder (model_index.json with transformer/, vae/,
        text_encoder/, tokenizer/, scheduler/) or its Orbax conversion. `dtype` applies to the
        transformer and text encoder (None: as stored); the VAE runs in float32. `transformer`:
        one to use instead of the folder's (a training run's, `train.export`). `mesh`, `rules`:
        see the class; `context_parallel` ("allgather" or "ulysses"): how attention runs where
        the mesh splits the tokens; `vae_decode`: see the class."""
        path = Path(path)
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"{path}: no model_index.json (not a model folder)")
        sched = path / "scheduler" / "scheduler_config.json"
        if not sched.is_file():
            raise FileNotFoundError(f"{sched}: missing")
        schedule = diffusion.ScheduleConfig.from_diffusers(json.loads(sched.read_text()))
        text_encoder = tokenizer = None
        if (path / "text_encoder").is_dir():
            text_encoder = components.load_text_encoder(path, dtype=dtype)
        if (path / "tokenizer").is_dir():
            tokenizer = t5.load_tokenizer(path / "tokenizer")
        return cls(
            transformer
            or components.load_transformer(path, dtype=dtype, context_parallel=context_parallel),
            components.load_vae(path),
            schedule,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            mesh=mesh,
            rules=rules,
            vae_decode=vae_decode,
        )

    @property
    def default_sampler(self) -> str:
        """The sampler a call without `scheduler` uses: the schedule's class's, as diffusers
        samples with the folder's scheduler ("dpm" for CogVideoXDPMScheduler and
        DPMSolverMultistepScheduler, else "ddim")."""
        dpm = ("CogVideoXDPMScheduler", diffusion.MULTISTEP)
        return "dpm" if self.schedule.class_name in dpm else "ddim"

    @property
    def fps(self) -> int:
        """Native frame rate: 8 for CogVideoX 1.0, 16 for 1.5."""
        return 16 if self.transformer.cfg.patch_size_t else 8

    def encode_prompt(self, prompts: str | Sequence[str]) -> jax.Array:
        """(B, 226, text_embed_dim) T5 states, in the transformer's dtype."""
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError("this pipeline has no text encoder/tokenizer: pass prompt_embeds")
        ids = t5.tokenize(self.tokenizer, prompts, self.transformer.cfg.max_text_len)
        with self.on_mesh():
            return _encode_text(self.text_encoder, ids).astype(self.transformer.dtype)

    def __call__(self, *args, **kwargs) -> np.ndarray:
        """Sample videos (the arguments: `_sample`), on the pipeline's mesh if it has one."""
        with self.on_mesh():
            return self._sample(*args, **kwargs)

    def _embeds(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, do_cfg, *,
                reference=False):  # fmt: skip
        """(the text states of every row the loop runs, (2B, S, D) uncond first with guidance,
        else (B, S, D); the batch B), the rows checked against the mesh."""
        if prompt_embeds is None:
            if prompt is None:
                raise ValueError("pass prompt or prompt_embeds")
            prompt_embeds = self.encode_prompt(prompt)
        prompt_embeds = jnp.asarray(prompt_embeds, self.transformer.dtype)
        batch = prompt_embeds.shape[0]
        if self.mesh is not None:
            rows = batch * (2 if do_cfg else 1) * (2 if reference else 1)
            shards = sharding.axis_size("batch", dict(self.mesh.shape), self.rules)
            if rows % shards:
                raise ValueError(
                    f"sampling on a mesh: {rows} rows (batch {batch}"
                    f"{' x 2 for guidance' if do_cfg else ''}"
                    f"{' x 2 for the reference' if reference else ''}) do not divide over "
                    f"the {shards} shards of the `batch` rule's mesh axes"
                )
        if not do_cfg:
            return prompt_embeds, batch
        if negative_prompt_embeds is None:
            neg = negative_prompt or ""
            neg = [neg] * batch if isinstance(neg, str) else list(neg)
            negative_prompt_embeds = self.encode_prompt(neg)
        negative_prompt_embeds = jnp.asarray(negative_prompt_embeds, self.transformer.dtype)
        if negative_prompt_embeds.shape != prompt_embeds.shape:
            raise ValueError(
                f"negative_prompt_embeds {negative_prompt_embeds.shape} must match "
                f"prompt_embeds {prompt_embeds.shape}"
            )
        return jnp.concatenate([negative_prompt_embeds, prompt_embeds]), batch  # (2B, S, D)

    def _video_latents(self, pixels, batch: int, key) -> jax.Array:
        """Scaled posterior samples (B, T, h, w, C) of one video, or of one per row."""
        if len(pixels) not in (1, batch):
            raise ValueError(f"{len(pixels)} videos for a batch of {batch}")
        mean, logvar = _encode_pixels(self.vae, jnp.repeat(pixels, batch // len(pixels), 0))
        return sample_latents(key, mean, logvar) * self.vae.cfg.scaling_factor

    def invert(
        self,
        video=None,
        prompt: str | Sequence[str] | None = "",
        negative_prompt: str | Sequence[str] | None = None,
        *,
        latents=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        seed: int = 0,
        progress: bool = False,
    ) -> np.ndarray:
        """DDIM inversion (text-to-video models): a video's latents run up the schedule to
        noise by inverse DDIM steps (`diffusion.inverse_ddim_table`, the model's own schedule and
        prediction type), as diffusers' community CogVideoX inversion script does.

        `video` as video-to-video takes it (uint8 frames or PIL images, resized to
        height x width), encoded to a posterior sample (from `seed`) times the scaling factor;
        or `latents` (B, T, h, w, C), already encoded and scaled. The prompt defaults to "" (the
        script's); with `guidance_scale` > 1 the steps use classifier-free guidance against
        `negative_prompt` (default ""). Returns the trajectory (N, B, T, h, w, C) float32:
        entry i holds the latents after the inverse step to the i-th timestep (ascending), the
        last the inverted noise. `__call__(reference_latents=...)` reconstructs or edits from it.
        """
        with self.on_mesh():
            cfg, vae_cfg = self.transformer.cfg, self.vae.cfg
            height = height or cfg.sample_height * vae_cfg.spatial_compression
            width = width or cfg.sample_width * vae_cfg.spatial_compression
            _check_args(cfg, vae_cfg, height, width, 1, "ddim", "np", None, None)
            if cfg.in_channels == 2 * vae_cfg.latent_channels:
                raise ValueError(
                    "DDIM inversion needs a text-to-video model; this is image-to-video"
                )
            if (video is None) == (latents is None):
                raise ValueError("DDIM inversion: pass video or latents, not both")
            pixels = None if video is None else preprocess_video(video, height, width)
            if pixels is not None:
                t = (pixels.shape[1] - 1) // vae_cfg.temporal_compression_ratio + 1
            else:
                t = np.shape(latents)[1]
            if t % (cfg.patch_size_t or 1):
                raise ValueError(
                    f"DDIM inversion: the video gives {t} latent frames, which must be a multiple "
                    f"of patch_size_t={cfg.patch_size_t}"
                )
            do_cfg = guidance_scale > 1.0
            embeds, batch = self._embeds(
                prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, do_cfg
            )
            if pixels is not None:
                key = jax.random.split(jax.random.key(seed), 3)[1]  # the image key of `_sample`
                latents = self._video_latents(pixels, batch, key)
            latents = jnp.asarray(latents, self.transformer.dtype)
            h, w = height // vae_cfg.spatial_compression, width // vae_cfg.spatial_compression
            if latents.shape[0] != batch or latents.shape[2:] != (h, w, vae_cfg.latent_channels):
                raise ValueError(
                    f"latents must be ({batch}, T, {h}, {w}, {vae_cfg.latent_channels}), got "
                    f"{latents.shape}"
                )
            table = diffusion.inverse_ddim_table(
                self.alphas_cumprod, num_inference_steps, self.schedule
            )
            bar = _ProgressBar(num_inference_steps) if progress else contextlib.nullcontext()
            with bar:
                path = _denoise(
                    self.transformer,
                    latents,
                    embeds,
                    None,
                    table,
                    jnp.full(num_inference_steps, guidance_scale, jnp.float32),
                    jax.random.key(0),  # unused by DDIM
                    ofs=None,
                    sampler="ddim",
                    do_cfg=do_cfg,
                    progress=progress and self.mesh is None,
                    trajectory=True,
                )
                path.block_until_ready()
                if progress and self.mesh is not None:
                    bar.bar.update(num_inference_steps)
            return np.asarray(path, np.float32)

    def _sample(
        self,
        prompt: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        image=None,
        *,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 6.0,
        use_dynamic_cfg: bool = False,
        scheduler: str | None = None,
        seed: int = 0,
        latents=None,
        image_latents=None,
        output_type: str = "np",
        progress: bool = False,
        video=None,
        strength: float | None = None,
        reference_latents=None,
    ) -> np.ndarray:
        """Sample videos; the arguments are diffusers' (see its CogVideoX pipelines).

        `prompt_embeds` / `negative_prompt_embeds` (B, S, text_embed_dim) replace encoding the
        prompts. `image` (I2V models): PIL image(s) or uint8 (B, H, W, 3) array, resized to the
        output size. `image_latents` (B, 1, h, w, C) replaces encoding the image and sampling its
        posterior (unscaled, like the VAE's output). `latents` is the initial noise
        (B, T, h, w, C); otherwise drawn from `seed`. Returns frames (B, F, H, W, 3) in [0, 1]
        (`output_type="np"`), or the final latents before the padding frames are dropped
        (`"latent"`). `num_frames` is any count >= 1, as in diffusers: (num_frames - 1) // 4 + 1
        latent frames, decoded to 4T' - 3 frames for an odd latent count T' and 4T' for an even
        one (8 -> 8, 48 -> 48, 10 -> 9).

        `scheduler`: "ddim" or "dpm"; None: `default_sampler`, the model folder's scheduler class.

        Video-to-video (text-to-video models), as diffusers' CogVideoXVideoToVideoPipeline:
        `video` (F, H, W, 3) / (B, F, H, W, 3) uint8 frames or a list of PIL images, resized to
        the output size, sets num_frames; its VAE posterior sample (scaled) is noised to the
        first of the last int(num_inference_steps * strength) timesteps (`strength`, default
        0.8), which alone are run. With `strength` and no `video`, `latents` are the
        already-noised latents to start from, as there.

        DDIM-inversion reconstruction or editing (text-to-video models, DDIM): with
        `reference_latents`, the trajectory `invert` returned for this batch and
        num_inference_steps, step i runs the reference latents at its noise level
        (trajectory[N - 1 - i]) beside the sampled ones with reference attention, as diffusers'
        community CogVideoX DDIM-inversion script does; the sampled rows start from `latents`
        (or noise from `seed`) and follow `prompt`.
        """
        cfg, vae_cfg = self.transformer.cfg, self.vae.cfg
        height = height or cfg.sample_height * vae_cfg.spatial_compression
        width = width or cfg.sample_width * vae_cfg.spatial_compression
        self._check_decode()
        v2v = video is not None or strength is not None
        pixels = None
        if v2v:
            strength = 0.8 if strength is None else strength
            pixels = _check_video_args(cfg, vae_cfg, video, latents, strength, height, width)
            if pixels is not None:
                num_frames = pixels.shape[1]
            else:  # the latents' frames decode to 4T' - 3 (odd T') or 4T' frames
                num_frames = 4 * latents.shape[1] - (3 if latents.shape[1] % 2 else 0)
        num_frames = num_frames or cfg.sample_frames
        scheduler = scheduler or self.default_sampler
        _check_args(
            cfg, vae_cfg, height, width, num_frames, scheduler, output_type, image, image_latents
        )
        i2v = cfg.in_channels == 2 * vae_cfg.latent_channels
        do_cfg = guidance_scale > 1.0
        if reference_latents is not None:
            _check_reference_args(i2v, v2v, scheduler)
        ab = self.alphas_cumprod  # the table first: a schedule the sampler refuses stops here
        table = (diffusion.ddim_table if scheduler == "ddim" else diffusion.dpm_table)(
            ab, num_inference_steps, self.schedule
        )
        embeds, batch = self._embeds(
            prompt,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            do_cfg,
            reference=reference_latents is not None,
        )

        # 1.5 pads the latent frames to a multiple of patch_size_t (at the front).
        ratio = vae_cfg.temporal_compression_ratio
        frames = (num_frames - 1) // ratio + 1
        extra = (-frames) % (cfg.patch_size_t or 1)
        frames += extra
        h, w = height // vae_cfg.spatial_compression, width // vae_cfg.spatial_compression
        shape = (batch, frames, h, w, vae_cfg.latent_channels)
        key = jax.random.key(seed)
        k_noise, k_image, k_loop = jax.random.split(key, 3)
        if v2v:  # the last int(steps * strength) steps only (diffusers' get_timesteps)
            run = min(int(num_inference_steps * strength), num_inference_steps)
            start = num_inference_steps - run
            table = {k: np.asarray(c)[start:] for k, c in table.items()}
            if "second" in table:  # DPM: the first step run has no previous x0
                table["second"] = table["second"].copy()
                table["second"][:1] = False
            num_inference_steps -= start
            if num_inference_steps < 1:
                raise ValueError(
                    f"strength={strength} with num_inference_steps leaves no step to run"
                )
        if latents is None and pixels is not None:
            z0 = self._video_latents(pixels, batch, k_image)
            noise = jax.random.normal(k_noise, z0.shape, jnp.float32)
            t0 = jnp.full((batch,), int(table["t"][0]))
            latents = diffusion.add_noise(z0, noise, t0, jnp.asarray(ab))
        if latents is None:
            latents = jax.random.normal(k_noise, shape, jnp.float32)
        latents = jnp.asarray(latents, self.transformer.dtype)
        if latents.shape != shape:
            raise ValueError(f"latents must have shape {shape}, got {latents.shape}")
        if reference_latents is not None:
            want = (num_inference_steps, *shape)
            if np.shape(reference_latents) != want:
                raise ValueError(
                    f"reference_latents must be the trajectory `invert` returns for this batch "
                    f"and num_inference_steps, {want}, got {np.shape(reference_latents)}"
                )
            reference_latents = jnp.asarray(reference_latents)[::-1]  # noisiest first

        cond = None
        if i2v:
            if image_latents is None:
                if image is None:
                    raise ValueError("this is an image-to-video model: pass image")
                pixels = preprocess_image(image, height, width, batch)  # (B, 1, H, W, 3)
                mean, logvar = _encode_pixels(self.vae, pixels)
                image_latents = sample_latents(k_image, mean, logvar)
            z = jnp.asarray(image_latents, jnp.float32)
            if z.shape != (batch, 1, h, w, vae_cfg.latent_channels):
                raise ValueError(
                    f"image_latents must be {(batch, 1, h, w, vae_cfg.latent_channels)}"
                )
            z = z * vae_cfg.image_latent_scale
            pad = jnp.zeros((batch, frames - 1, h, w, z.shape[-1]), z.dtype)
            cond = jnp.concatenate([z, pad], axis=1).astype(self.transformer.dtype)  # image first

        scales = (
            diffusion.dynamic_cfg_scales(guidance_scale, num_inference_steps, table["t"])
            if use_dynamic_cfg
            else np.full(num_inference_steps, guidance_scale)
        )
        ofs = 2.0 if cfg.ofs_embed_dim else None
        bar = _ProgressBar(num_inference_steps) if progress else contextlib.nullcontext()
        with bar:
            out = _denoise(
                self.transformer,
                latents,
                embeds,
                cond,
                table,
                jnp.asarray(scales, jnp.float32),
                k_loop,
                reference_latents,
                ofs=ofs,
                sampler=scheduler,
                do_cfg=do_cfg,
                # Per-step ticks are an ordered host callback, one device only: on a mesh the
                # bar moves once, when the loop is done.
                progress=progress and self.mesh is None,
            )
            out.block_until_ready()
            if progress and self.mesh is not None:
                bar.bar.update(num_inference_steps)
        if output_type == "latent":
            return np.asarray(out)
        video = self.decode(out[:, extra:].astype(jnp.float32) / vae_cfg.scaling_factor)
        return np.asarray(jnp.clip(video / 2 + 0.5, 0.0, 1.0))


def sampling_rules(rules: sharding.Rules) -> sharding.Rules:
    """Sharding rules for sampling: `rules` with the batch (2B rows with guidance) over `data`
    only, so that `fsdp` and `context` keep every row's tokens together for context
    parallelism."""
    return tuple((k, "data") if k == "batch" else (k, v) for k, v in rules)


SAMPLING_RULES = sampling_rules(sharding.rules_with(()))


def _place(module, mesh, rules) -> None:
    """Put `module`'s weights on `mesh`: by `rules` (None: replicated)."""
    graphdef, state = nnx.split(module)
    pure = nnx.to_pure_dict(state)
    if rules is None:
        targets = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    else:
        targets = sharding.state_shardings(state, mesh, rules)
    nnx.replace_by_pure_dict(state, jax.device_put(pure, targets))
    nnx.update(module, state)


def _check_video_args(cfg, vae_cfg, video, latents, strength, height, width):
    """Video-to-video's arguments checked; the video's pixels (B, F, H, W, 3) in [-1, 1] (None
    when `latents` are given instead)."""
    if cfg.in_channels == 2 * vae_cfg.latent_channels:
        raise ValueError("video-to-video needs a text-to-video model; this is image-to-video")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    if (video is None) == (latents is None):
        raise ValueError("video-to-video: pass video, or already-noised latents, not both")
    pixels = None if video is None else preprocess_video(video, height, width)
    if pixels is not None:
        latent_frames = (pixels.shape[1] - 1) // vae_cfg.temporal_compression_ratio + 1
    else:
        latent_frames = latents.shape[1]
    pt = cfg.patch_size_t or 1
    if latent_frames % pt:
        raise ValueError(
            f"video-to-video: the video gives {latent_frames} latent frames, which must be a "
            f"multiple of patch_size_t={pt} (as diffusers asks)"
        )
    return pixels


def _check_reference_args(i2v, v2v, scheduler):
    if i2v:
        raise ValueError("reference_latents (DDIM inversion) need a text-to-video model")
    if v2v:
        raise ValueError("reference_latents and video-to-video (video, strength) do not combine")
    if scheduler != "ddim":
        raise ValueError(f"reference_latents sample with scheduler='ddim', got {scheduler!r}")


def preprocess_video(video, height: int, width: int) -> jax.Array:
    """uint8 frames (F, H, W, 3) / (B, F, H, W, 3), or a list of PIL images (one video) ->
    (B, F, H, W, 3) in [-1, 1], each frame resized as `preprocess_image` resizes."""
    if isinstance(video, (list, tuple)):
        clips = [list(video)]
    else:
        video = np.asarray(video)
        clips = [list(video)] if video.ndim == 4 else [list(v) for v in video]
    return jnp.stack([preprocess_image(c, height, width, len(c))[:, 0] for c in clips])


def _check_args(cfg, vae_cfg, height, width, num_frames, scheduler, output_type, image, img_lat):
    step = vae_cfg.spatial_compression * cfg.patch_size
    if height % step or width % step:
        raise ValueError(f"height and width must be multiples of {step}, got {height}x{width}")
    if num_frames < 1:  # any count, as diffusers: (num_frames - 1) // 4 + 1 latent frames
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
    if output_type not in ("np", "latent"):
        raise ValueError(f"output_type must be 'np' or 'latent', got {output_type!r}")
    i2v = cfg.in_channels == 2 * vae_cfg.latent_channels
    if not i2v and (image is not None or img_lat is not None):
        raise ValueError("image given, but this is a text-to-video model")


def preprocess_image(image, height: int, width: int, batch: int) -> jax.Array:
    """PIL image(s) or uint8 (H, W, 3) / (B, H, W, 3) arrays -> (B, 1, H, W, 3) in [-1, 1].

    Resized to exactly (height, width) with Lanczos and no crop, as diffusers' VideoProcessor."""
    from PIL import Image  # only image-to-video needs Pillow

    images = image if isinstance(image, (list, tuple)) else [image]
    if isinstance(image, np.ndarray):
        images = list(image) if image.ndim == 4 else [image]
    pil = [
        im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im, np.uint8))
        for im in images
    ]
    arrays = [
        np.asarray(im.convert("RGB").resize((width, height), Image.LANCZOS), np.float32)
        for im in pil
    ]
    x = np.stack(arrays) / 255.0 * 2.0 - 1.0  # (B, H, W, 3)
    if len(x) == 1 and batch > 1:
        x = np.repeat(x, batch, axis=0)
    if len(x) != batch:
        raise ValueError(f"{len(x)} images for a batch of {batch}")
    return jnp.asarray(x[:, None], jnp.float32)


@compiler.module_jit
def _encode_text(encoder, ids):
    return encoder(ids)


@compiler.module_jit
def _encode_pixels(vae, pixels):
    return vae.encode(pixels)


@compiler.module_jit
def _decode(vae, z):
    return vae.decode(z)


@compiler.module_jit
def _decode_tiled(vae, z):
    return vae_tiling.decode_tiled(vae, z)


@compiler.module_jit(static_argnames=("mesh",))
def _decode_context_parallel(vae, z, *, mesh):
    return vae_lib.decode_context_parallel(vae, z, mesh)


class _ProgressBar:
    """A console bar the compiled loop advances through a host callback (`_tick`)."""

    active = None

    def __init__(self, total):
        from tqdm.auto import tqdm  # only progress=True needs tqdm

        self.bar = tqdm(total=total, desc="denoising", unit="step")

    def __enter__(self):
        _ProgressBar.active = self.bar
        return self

    def __exit__(self, *exc):
        _ProgressBar.active = None
        self.bar.close()


def _tick():
    if _ProgressBar.active is not None:
        _ProgressBar.active.update(1)


@compiler.module_jit(static_argnames=("ofs", "sampler", "do_cfg", "progress", "trajectory"))
def _denoise(
    model,
    x,
    embeds,
    cond,
    table,
    scales,
    key,
    reference=None,
    *,
    ofs,
    sampler,
    do_cfg,
    progress,
    trajectory=False,
):
    """The whole sampling loop, compiled once: x (B, T, h, w, C) noise -> final latents, or
    with `trajectory` every step's latents (N, B, T, h, w, C). `reference` (N, B, T, h, w, C):
    step i's reference latents, which every step runs beside x with reference attention
    (`Transformer.__call__`). `sampler` "ddim" also runs inverse-DDIM tables."""
    dtype = x.dtype
    table = {k: jnp.asarray(v) for k, v in table.items()}
    # The weights ride in the loop carry: NNX transforms inside the model (the block scan) only
    # accept variables created at the current trace level.
    graphdef, state = nnx.split(model)
    twice = (lambda a: jnp.concatenate([a, a])) if do_cfg else (lambda a: a)
    if reference is not None:
        embeds = jnp.concatenate([embeds, embeds])  # the reference rows take the same prompts

    def body(i, carry):
        x, old_x0, path, state = carry
        inp = twice(x)  # (2B, ...) uncond first
        if cond is not None:
            inp = jnp.concatenate([inp, twice(cond)], axis=-1)  # noisy latents, then image
        if reference is not None:
            inp = jnp.concatenate([inp, twice(reference[i].astype(dtype))])  # [sampled; ref]
        t = jnp.broadcast_to(table["t"][i], (inp.shape[0],))
        model = nnx.merge(graphdef, state)
        v = model(inp, embeds, t, ofs=ofs, reference=reference is not None)
        v = v.astype(jnp.float32)
        if reference is not None:
            v = v[: v.shape[0] // 2]
        if do_cfg:
            uncond, text = jnp.split(v, 2)
            v = uncond + scales[i] * (text - uncond)
        row = {k: c[i] for k, c in table.items()}
        xf = x.astype(jnp.float32)
        if sampler == "ddim":
            x, x0 = diffusion.ddim_step(row, v, xf)
        else:
            noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32)
            x, x0 = diffusion.dpm_step(row, v, xf, old_x0, noise)
        x = x.astype(dtype)
        if trajectory:
            path = path.at[i].set(x)
        if progress:
            jax.debug.callback(_tick, ordered=True)
        return x, x0, path, state

    old = jnp.zeros(x.shape, jnp.float32)
    path = jnp.zeros((len(scales) if trajectory else 0, *x.shape), dtype)
    x, _, path, _ = jax.lax.fori_loop(0, len(scales), body, (x, old, path, state))
    return path if trajectory else x
