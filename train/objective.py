"""The CogVideoX training objective, on batches of one clip shape or on packed rows.

Objective (paper section 3; SAT `VideoDiffusionLoss`, diffusers' CogVideoX training scripts):
v-prediction MSE on VAE latents times `scaling_factor`, under the zero-terminal-SNR schedule with
`snr_shift_scale` (cogvideox_jax.diffusion, the same code the sampler uses). SAT writes it as an
x0-MSE weighted by 1/(1 - ab), which is the same number. Timesteps are uniform integers with
Explicit Uniform Sampling (bands of the 1000 steps per group of batch rows), text embeddings are
zeroed with p = 0.1, and I2V models see the noised, VAE-encoded first frame concatenated on
channels (dropped with p = 0.05).

Two objectives with one interface, chosen once per run (train/run.py):
  Bucketed  batches of equal-shape clips {latents (B, T, h, w, C), text (B, S, Dt)[, image]}.
  Packed    rows of several clips (data/packing.py, multi-resolution frame packing): per video
            token its patch features, clip id and position, per clip its text, token grid and
            here its own timestep, text dropout and noise. The loss is the mean over clips of
            each clip's mean squared velocity error: the bucketed objective's per-sample mean,
            averaged over the clips of the global batch.
`prepare(batch, key, vae, train=...)` turns a batch into the loss inputs (no model call),
`loss(model, inputs, ab)` is the scalar loss, `with_timestep(inputs, t)` fixes every clip's
timestep (held-out loss), `step_outputs(batch)` adds what the host counts from a step, and
`counts(outputs)` gives the step's (tokens, model FLOPs).

Shape letters: B batch rows, T latent frames, h/w latent height/width, C channels, S text tokens;
packed rows: V video tokens, Tt text tokens (G * S), G clips per row, P patch features.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from cogvideox_jax import compiler, diffusion, flops
from cogvideox_jax import vae as vae_lib
from cogvideox_jax.lora import LoraConfig
from cogvideox_jax.transformer import TransformerConfig

SEGMENT_KEYS = ("video_segment_ids", "video_positions", "text_segment_ids", "grids")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The constants both objectives share."""

    scaling_factor: float  # VAE latents are multiplied by it
    eus_groups: int  # Explicit Uniform Sampling bands (1: plain uniform)
    text_dropout: float  # probability of a zero text embedding, per clip
    ofs: float | None  # 1.5-I2V's constant ofs input
    num_timesteps: int = 1000


@dataclasses.dataclass(frozen=True)
class ImageCondition:
    """I2V: how the first frame becomes the condition (`image_condition`)."""

    scale: float  # on the image latent: scaling_factor, or 1 / it (1.5-I2V)
    dropout: float  # probability of an all-zero condition, one draw per batch
    noise_log_mean: float  # the frame's noise sigma = exp(N(mean, std))
    noise_log_std: float


# ---- Shared pieces ----


def eus_timesteps(key: jax.Array, batch_size: int, groups: int, num_timesteps: int = 1000):
    """Explicit Uniform Sampling (paper section 3.3): integer timesteps (B,), row r drawing
    uniformly from band g = r * groups // B of [0, num_timesteps). The batch is laid out over
    the data-parallel shards in order, so when `groups` divides their number each shard draws
    from one band, as in SAT's DiscreteSampling; groups=1 is plain uniform sampling."""
    g = np.arange(batch_size) * groups // batch_size
    lo, hi = g * num_timesteps // groups, (g + 1) * num_timesteps // groups
    return jax.random.randint(key, (batch_size,), jnp.asarray(lo), jnp.asarray(hi))


def pad_latent_frames(z: jax.Array, patch_size_t: int) -> jax.Array:
    """CogVideoX 1.5: repeat the first latent frame of z (B, T, h, w, C) at the front until
    T % patch_size_t == 0."""
    n = -z.shape[1] % patch_size_t
    return jnp.concatenate([jnp.repeat(z[:, :1], n, axis=1), z], axis=1) if n else z


def image_condition(vae, image, key, num_frames: int, cond: ImageCondition, dropout: float):
    """I2V conditioning (SAT `add_noise_to_first_frame`, diffusers' I2V script): the first
    pixel frame (B, H, W, 3) noised with sigma = exp(N(mean, std)) per sample, encoded alone,
    scaled, zero-padded to `num_frames` latent frames -> (B, T, h, w, C); all of it is zeroed
    with probability `dropout` (one draw for the batch, as SAT does)."""
    k_sigma, k_noise, k_post, k_drop = jax.random.split(key, 4)
    b = image.shape[0]
    sigma = jnp.exp(cond.noise_log_mean + cond.noise_log_std * jax.random.normal(k_sigma, (b,)))
    image = image + sigma[:, None, None, None] * jax.random.normal(k_noise, image.shape)
    # One frame is one encoder chunk: no frame-batching scan needed.
    mean, logvar = vae.encode(image[:, None].astype(jnp.float32), frame_batching=False)
    # Times scaling_factor, or divided by it where the VAE config says `invert_scale_latents`
    # (CogVideoX1.5-I2V): the same factor the sampling pipeline applies, so that a model trained
    # here sees at sampling time the condition it was trained on.
    z = vae_lib.sample_latents(k_post, mean, logvar) * cond.scale
    z = z * (jax.random.uniform(k_drop) >= dropout)
    pad = jnp.zeros((b, num_frames - 1, *z.shape[2:]), z.dtype)
    return jax.lax.stop_gradient(jnp.concatenate([z, pad], axis=1))  # (B, T, h, w, C)


def diffusion_loss(model, z0, text, t, noise, ab, image_latents=None, ofs=None) -> jax.Array:
    """mean((v_pred - v)^2) over every element of z0 (B, T, h, w, C): per-sample means averaged
    over the batch, equal to SAT's and diffusers' mean of (1 / (1 - ab)) * (x0_pred - x0)^2.
    Averaged one axis at a time (`compiler.mean`), which keeps it accurate on the CPU."""
    x_t = diffusion.add_noise(z0, noise, t, ab)
    x_in = x_t if image_latents is None else jnp.concatenate([x_t, image_latents], axis=-1)
    v_pred = model(x_in, text, t, ofs=ofs).astype(jnp.float32)
    v = diffusion.velocity(z0, noise, t, ab).astype(jnp.float32)
    return compiler.mean(jnp.square(v_pred - v))


# ---- Batches of one clip shape ----


@dataclasses.dataclass(frozen=True)
class Bucketed:
    """Batches of equal-shape clips: latents (B, T, h, w, C), text (B, S, Dt) and, for I2V,
    image (B, H, W, 3), the clip's first pixel frame."""

    recipe: Recipe
    patch_size_t: int  # 1.5: latent frames are padded to a multiple of it
    image: ImageCondition | None = None  # I2V only
    tokens_per_step: float = 0.0  # text + video tokens of a step's clips (the config's size)
    flops_per_step: float = 0.0  # their model FLOPs (cogvideox_jax.flops)

    def prepare(self, batch, key, vae, *, train: bool) -> dict:
        """Raw batch -> the loss inputs {z0, text, t, noise[, image_latents]} (no model call;
        t only when `train`: held-out evaluation sets fixed timesteps). `vae`: the frozen VAE
        (I2V), None otherwise."""
        r = self.recipe
        k_t, k_noise, k_drop, k_img = jax.random.split(key, 4)
        z0 = batch["latents"] * r.scaling_factor  # (B, T, h, w, C)
        b, t_frames = z0.shape[:2]
        text = batch["text"]
        out = {}
        if self.image is not None:
            dropout = self.image.dropout if train else 0.0
            img = image_condition(vae, batch["image"], k_img, t_frames, self.image, dropout)
            out["image_latents"] = pad_latent_frames(img, self.patch_size_t)
        z0 = pad_latent_frames(z0, self.patch_size_t)
        if train:
            keep = jax.random.uniform(k_drop, (b,)) >= r.text_dropout
            text = jnp.where(keep[:, None, None], text, 0.0)  # dropped prompts: zero embeddings
            out["t"] = eus_timesteps(k_t, b, r.eus_groups, r.num_timesteps)
        out.update(z0=z0, text=text, noise=jax.random.normal(k_noise, z0.shape, z0.dtype))
        out["is_image"] = jnp.full((b,), t_frames == 1)  # one latent frame: an image
        return out

    def loss(self, model, inputs: dict, ab) -> jax.Array:
        return self.loss_parts(model, inputs, ab)[0]

    def loss_parts(self, model, inputs: dict, ab) -> tuple[jax.Array, dict]:
        """(the loss, its sums and counts over images and over clips: `modality_parts`)."""
        i = inputs
        loss = diffusion_loss(
            model,
            i["z0"],
            i["text"],
            i["t"],
            i["noise"],
            ab,
            i.get("image_latents"),
            self.recipe.ofs,
        )
        images = i["is_image"].astype(jnp.float32)  # the batch is all images or all clips
        return loss, modality_parts(jnp.broadcast_to(loss, images.shape), images, 1.0)

    def with_timestep(self, inputs: dict, t: int) -> dict:
        return dict(inputs, t=jnp.full(inputs["z0"].shape[:1], t, jnp.int32))  # (B,)

    def step_outputs(self, batch) -> dict:
        """Whether the batch holds images (one latent frame; clips have two or more)."""
        return {"image_slots": jnp.full(batch["latents"].shape[:1], batch["latents"].shape[1] == 1)}

    def counts(self, outputs) -> tuple[float, float]:
        return self.tokens_per_step, self.flops_per_step


# ---- Packed rows of several clips ----


@dataclasses.dataclass(frozen=True)
class Packed:
    """Packed rows: video (B, V, P) patch features, text (B, Tt, Dt), video_segment_ids (B, V)
    and text_segment_ids (B, Tt) (1..G, 0 = padding), video_positions (B, V, 3) and grids
    (B, G, 3) (data/packing.py)."""

    recipe: Recipe
    model: TransformerConfig  # for the clips' model FLOPs
    text_len: int  # S, text tokens per clip
    lora: LoraConfig | None = None  # a LoRA run's frozen products count 2x, not 3x

    def prepare(self, batch, key, vae, *, train: bool) -> dict:
        """Packed batch -> loss inputs {z0, text, t (B, G), noise, segments}; t only when
        `train`. EUS bands run over the B * G clip slots. `vae` is unused (I2V is bucketed)."""
        del vae
        r = self.recipe
        k_t, k_noise, k_drop = jax.random.split(key, 3)
        z0 = batch["video"] * r.scaling_factor  # (B, V, P)
        text = batch["text"]
        b, g = batch["grids"].shape[:2]
        out = {}
        if train:
            keep = jax.random.uniform(k_drop, (b, g)) >= r.text_dropout  # per clip
            text = jnp.where(_per_token(keep, batch["text_segment_ids"])[..., None], text, 0.0)
            out["t"] = eus_timesteps(k_t, b * g, r.eus_groups, r.num_timesteps).reshape(b, g)
        out.update(
            z0=z0,
            text=text,
            noise=jax.random.normal(k_noise, z0.shape, z0.dtype),
            segments={k: batch[k] for k in SEGMENT_KEYS},
        )
        return out

    def loss(self, model, inputs: dict, ab) -> jax.Array:
        """Mean over the batch's clips of each clip's mean((v_pred - v)^2) over its tokens and
        features, equal to the bucketed loss of the same clips (`diffusion_loss`)."""
        return self.loss_parts(model, inputs, ab)[0]

    def loss_parts(self, model, inputs: dict, ab) -> tuple[jax.Array, dict]:
        """(`loss`, its sums and counts over the images and over the clips of the rows: clip
        slots whose token grid is one frame long are images, as in `step_outputs`)."""
        z0, noise, t, segments = inputs["z0"], inputs["noise"], inputs["t"], inputs["segments"]
        seg = segments["video_segment_ids"]  # (B, V)
        t_tok = _per_token(t, seg)  # (B, V): each token's clip's timestep
        x_t = diffusion.add_noise(z0, noise, t_tok, ab)
        v = diffusion.velocity(z0, noise, t_tok, ab).astype(jnp.float32)
        v_pred = model.packed(x_t, inputs["text"], t, segments, ofs=self.recipe.ofs)
        per_token = compiler.mean(jnp.square(v_pred.astype(jnp.float32) - v), axis=-1)  # (B, V)
        g = t.shape[1]
        onehot = (seg[..., None] == jnp.arange(1, g + 1)).astype(jnp.float32)  # (B, V, G)
        sums = jnp.einsum("bv,bvg->bg", per_token, onehot)
        counts = onehot.sum(1)  # (B, G) video tokens per clip
        used = counts > 0
        per_clip = jnp.where(used, sums / jnp.maximum(counts, 1.0), 0.0)
        images = (segments["grids"][..., 0] == 1).astype(jnp.float32)
        loss = per_clip.sum() / jnp.maximum(used.sum(), 1)
        return loss, modality_parts(per_clip, images, used.astype(jnp.float32))

    def with_timestep(self, inputs: dict, t: int) -> dict:
        shape = inputs["segments"]["grids"].shape[:2]  # (B, G): one per clip slot
        return dict(inputs, t=jnp.full(shape, t, jnp.int32))

    def step_outputs(self, batch) -> dict:
        """What the host counts tokens and FLOPs from: the clips' token grids; and which clip
        slots hold images (a token grid one frame long: clips have at least two latent frames,
        and on 1.5 at least three, padded to four, as their 4k+1 and 8k+1 frame counts give)."""
        return {
            "packing_efficiency": efficiency(batch),
            "clip_tokens": clip_tokens(batch),
            "image_slots": (batch["grids"][..., 0] == 1) & (clip_tokens(batch) > 0),
        }

    def counts(self, outputs) -> tuple[float, float]:
        """(tokens, model FLOPs) of a step's clips from their video token counts (B, G) (on the
        host): each clip counts its own text and video tokens, and cogvideox_jax.flops of its
        own length, since attention is per clip (a pack costs the sum of its clips)."""
        lengths = np.asarray(outputs["clip_tokens"], np.float64)
        lengths = lengths[lengths > 0]
        tokens = lengths.sum() + lengths.size * self.text_len
        work = flops.train_flops(self.model, self.text_len, lengths, self.lora).sum()
        return float(tokens), float(work)


def modality_parts(per_sample, images, used) -> dict:
    """Sums of per-sample losses and sample counts over images and over clips (0/1 masks
    `images` and `used`, broadcastable to per_sample): what the host turns into `loss_images`
    and `loss_clips` (train/dit.py) whatever the micro-batching."""
    clips = used * (1.0 - images)
    images = used * images
    return {
        "image_loss_sum": (per_sample * images).sum(),
        "image_count": images.sum() + jnp.zeros(()),
        "clip_loss_sum": (per_sample * clips).sum(),
        "clip_count": clips.sum() + jnp.zeros(()),
    }


def _per_token(x: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """Per-clip values x (B, G) -> per-token values (B, N) (padding takes clip 1's)."""
    index = jnp.clip(segment_ids - 1, 0, x.shape[1] - 1)
    return jnp.take_along_axis(x, index, axis=1)


def clip_tokens(batch) -> jax.Array:
    """(B, G) video tokens of each clip slot of packed rows (0 where the slot holds no clip)."""
    grids = batch["grids"]
    return jnp.where(jnp.any(grids > 0, axis=-1), grids.prod(-1), 0)


def efficiency(batch) -> jax.Array:
    """Real tokens / token budget of packed rows: (text + video tokens of clips) / (B (Tt + V))."""
    real = (batch["video_segment_ids"] > 0).sum() + (batch["text_segment_ids"] > 0).sum()
    budget = batch["video_segment_ids"].size + batch["text_segment_ids"].size
    return real / budget
