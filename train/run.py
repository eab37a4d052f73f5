"""A training run resolved once from its config: the one object every later part reads.

`resolve(config, devices)` checks the config (configs/validate.py) and decides, here only, what
kind of run it is:
  training   `Full` (every parameter trains) or `Lora` (adapters on a frozen base)
  objective  `objective.Bucketed` or, with input.packing, `objective.Packed`; held-out batches
             are always bucketed (`eval_objective`)
  data       "synthetic", "demo" (the built-in demo's clips) or "prepared" (input.data_dir or
             input.sources)
  demo       whether the built-in demo's stages run (its encoders, its eval-time samples)
  i2v        whether a frozen VAE encodes each clip's first frame as the condition
and derives its constants: the transformer's and LoRA's configs, the mesh and sharding rules,
the batch's sharding, gradient accumulation, alpha_bar, and the tokens and FLOPs of a step. No
later part looks at the config to decide these again; the sections used as they are (optim,
ckpt, log, evals, the input paths, the demo's) are read from `run.config`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cogvideox_jax import diffusion, flops, lora, sharding
from cogvideox_jax import vae as vae_lib
from cogvideox_jax.transformer import TransformerConfig
from configs import validate
from train import objective

DATA_KINDS = ("synthetic", "demo", "prepared")


@dataclasses.dataclass(frozen=True)
class Full:
    """Every parameter trains; the buffers travel in the train state."""

    init: str = ""  # a transformer folder the train state starts from (init.checkpoint)
    trainable: ClassVar[type] = nnx.Param  # the Variable filter of the trained parameters

    def split(self, model) -> tuple[dict, dict]:
        """A transformer -> (trained parameters, buffers) as pure dicts."""
        _, params, rest = nnx.split(model, nnx.Param, ...)
        return nnx.to_pure_dict(params), nnx.to_pure_dict(rest)

    def fixed(self, state: dict, frozen) -> dict:
        """The model's untrained part, as the loss needs it: the state's buffers."""
        return state["buffers"]


@dataclasses.dataclass(frozen=True)
class Lora:
    """Low-rank adapters train; the base model (init.checkpoint) is frozen, kept in `base_dtype`
    outside the train state (`Frozen.base`), so checkpoints and the optimiser hold adapters only."""

    cfg: lora.LoraConfig
    base_dtype: np.dtype
    base: str = ""  # the frozen base's transformer folder (init.checkpoint)
    init: str = ""  # adapters the train state starts from (lora.init)
    trainable: ClassVar[type] = lora.LoraParam

    def split(self, model) -> tuple[dict, dict]:
        """A transformer with adapters -> (adapters, frozen base in `base_dtype`), pure dicts."""
        _, params, rest = nnx.split(model, lora.LoraParam, ...)
        dt = self.base_dtype
        cast = lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
        return nnx.to_pure_dict(params), jax.tree.map(cast, nnx.to_pure_dict(rest))

    def fixed(self, state: dict, frozen) -> dict:
        """The model's untrained part, as the loss needs it: the frozen base."""
        return frozen.base


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
    """Everything decided and derived from a config before anything is built (see the module)."""

    config: Any  # the locked ml_collections.ConfigDict
    model: TransformerConfig
    training: Full | Lora
    objective: objective.Bucketed | objective.Packed
    eval_objective: objective.Bucketed
    data: str  # one of DATA_KINDS
    demo: bool
    i2v: bool
    mesh: jax.sharding.Mesh
    rules: sharding.Rules  # parameters' and activations' logical names -> mesh axes
    grad_accum_steps: int
    ab: np.ndarray  # alpha_bar (num_timesteps,) float32
    example_shapes: dict  # one example of the config's clip size: latent_shape, text_shape,
    # image_shape (None for T2V), as data/synthetic.py takes them
    tokens_per_example: int  # text + video tokens of one clip of the config's size
    flops_per_step: float  # model FLOPs of a step of such clips (cogvideox_jax.flops)

    @property
    def batch_sharding(self) -> jax.sharding.NamedSharding:
        """The sharding of every batch: the `batch` rule on the batch axis."""
        return sharding.batch_sharding(self.mesh, self.rules)

    @property
    def replicated(self) -> jax.sharding.NamedSharding:
        return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

    @contextlib.contextmanager
    def on_mesh(self):
        """The mesh and rules every traced function of the run (steps, sampling) must see."""
        with jax.set_mesh(self.mesh), sharding.use_rules(self.rules):
            yield

    @property
    def lora(self) -> lora.LoraConfig | None:
        return self.training.cfg if isinstance(self.training, Lora) else None


def resolve(config, devices=None) -> Run:
    """The run of `config` on a mesh over `devices` (default jax.devices(); tools.aot passes a
    TPU slice's abstract devices). Config errors are raised here, before anything is built."""
    devices = jax.devices() if devices is None else list(devices)
    c = config
    checked = validate.validate(c, num_devices=len(devices), num_processes=jax.process_count())
    model, adapters = checked.model, checked.lora
    if adapters is None:
        training = Full(init=c.init.checkpoint)
    else:
        dtype = np.dtype(c.lora.base_dtype or c.model.param_dtype)
        training = Lora(adapters, dtype, base=c.init.checkpoint, init=c.lora.init)
    video = video_tokens(c, model)
    flops_per_step = c.batch_size * flops.train_flops(model, c.input.text_len, video, adapters)
    eval_objective, train_objective = _objectives(c, model, adapters, video, flops_per_step)
    schedule = diffusion.ScheduleConfig(snr_shift_scale=c.diffusion.snr_shift_scale)
    return Run(
        config=c,
        model=model,
        training=training,
        objective=train_objective,
        eval_objective=eval_objective,
        data="prepared" if c.input.data_dir or c.input.sources else c.input.source,
        demo=c.input.source == "demo",
        i2v=bool(c.input.i2v),
        mesh=sharding.make_mesh(checked.mesh_shape, devices),
        rules=checked.rules,
        grad_accum_steps=checked.grad_accum_steps,
        ab=np.asarray(diffusion.alphas_cumprod(schedule), np.float32),
        example_shapes=example_shapes(c),
        tokens_per_example=video + c.input.text_len,
        flops_per_step=float(flops_per_step),
    )


def _objectives(c, model, adapters, video: int, flops_per_step: float):
    """(held-out objective, training objective) of a config."""
    d = c.diffusion
    recipe = objective.Recipe(
        scaling_factor=d.scaling_factor,
        eus_groups=d.eus_groups,
        text_dropout=d.text_dropout,
        ofs=d.ofs if d.ofs >= 0 else None,
    )
    image = None
    if c.input.i2v:
        image = objective.ImageCondition(
            # The sampling pipeline's factor (VaeConfig.image_latent_scale).
            scale=vae_lib.image_latent_scale(d.scaling_factor, c.vae.invert_scale_latents),
            dropout=d.image_dropout,
            noise_log_mean=d.image_noise_log_mean,
            noise_log_std=d.image_noise_log_std,
        )
    bucketed = objective.Bucketed(
        recipe,
        patch_size_t=model.patch_size_t or 1,
        image=image,
        tokens_per_step=float((video + c.input.text_len) * c.batch_size),
        flops_per_step=flops_per_step,
    )
    if not c.input.packing:
        return bucketed, bucketed
    return bucketed, objective.Packed(recipe, model, c.input.text_len, adapters)


def video_tokens(c, model: TransformerConfig) -> int:
    """Video tokens of one clip of the config's size (latent frames padded to patch_size_t,
    then patched)."""
    pt = model.patch_size_t or 1
    t = -(-vae_lib.num_latent_frames(c.input.num_frames) // pt)
    f = c.input.spatial_compression * model.patch_size
    return t * (c.input.height // f) * (c.input.width // f)


def example_shapes(c) -> dict:
    """The shapes of one example of the config's clip size (unscaled latents, text, I2V frame)."""
    t = vae_lib.num_latent_frames(c.input.num_frames)
    f = c.input.spatial_compression
    h, w = c.input.height // f, c.input.width // f
    return dict(
        latent_shape=(t, h, w, c.input.latent_channels),
        text_shape=(c.input.text_len, c.input.text_dim),
        image_shape=(c.input.height, c.input.width, 3) if c.input.i2v else None,
    )
