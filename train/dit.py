"""Training loop for the CogVideoX transformer: `train_and_evaluate(config, workdir)` and the
pure `train_step`.

Objective (paper section 3; SAT `VideoDiffusionLoss`, diffusers' CogVideoX training scripts):
v-prediction MSE on VAE latents times `scaling_factor`, under the zero-terminal-SNR schedule with
`snr_shift_scale` (cogvideox_jax.diffusion). SAT writes it as an x0-MSE weighted by 1/(1 - ab),
which is the same number. Timesteps are uniform integers with Explicit Uniform Sampling (bands of
the 1000 steps per group of batch rows), text embeddings are zeroed with p = 0.1, and I2V models
see the noised, VAE-encoded first frame concatenated on channels (dropped with p = 0.05).

Shape letters: B batch, T latent frames, H/W latent height/width, C channels, S text tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import cogvideox_jax as cj
from cogvideox_jax import (
    attention,
    compiler,
    diffusion,
    flops,
    lora,
    sharding,
    transformer,
    weights,
)
from cogvideox_jax import vae as vae_lib
from data import pipeline
from train import checkpoint, evaluate, inputs, metrics, optim, packed

BATCH_AXES = ("data", "fsdp")  # the batch is split over these mesh axes (sharding rule "batch")


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """The per-step constants of the objective, derived once from the config."""

    scaling_factor: float
    image_scale: float  # the I2V image latent's factor: scaling_factor, or 1/it (1.5-I2V)
    eus_groups: int
    text_dropout: float
    image_dropout: float
    image_noise_log_mean: float
    image_noise_log_std: float
    ofs: float | None
    i2v: bool
    patch_size_t: int
    grad_accum_steps: int
    ema_decay: float
    skip_nonfinite: bool
    num_timesteps: int = 1000


# ---- Objective ----


def eus_timesteps(key: jax.Array, batch_size: int, groups: int, num_timesteps: int = 1000):
    """Explicit Uniform Sampling (paper section 3.3): integer timesteps (B,), row r drawing
    uniformly from band g = r * groups // B of [0, num_timesteps). The batch is laid out over
    the data-parallel shards in order, so when `groups` divides their number each shard draws
    from one band, as in SAT's DiscreteSampling; groups=1 is plain uniform sampling."""
    g = np.arange(batch_size) * groups // batch_size
    lo, hi = g * num_timesteps // groups, (g + 1) * num_timesteps // groups
    return jax.random.randint(key, (batch_size,), jnp.asarray(lo), jnp.asarray(hi))


def pad_latent_frames(z: jax.Array, patch_size_t: int) -> jax.Array:
    """CogVideoX 1.5: repeat the first latent frame at the front until T % patch_size_t == 0."""
    n = -z.shape[1] % patch_size_t
    return jnp.concatenate([jnp.repeat(z[:, :1], n, axis=1), z], axis=1) if n else z


def image_condition(vae, image, key, num_frames: int, sc: StepConfig, dropout: float):
    """I2V conditioning (SAT `add_noise_to_first_frame`, diffusers' I2V script): the first
    pixel frame (B, H, W, 3) noised with sigma = exp(N(mean, std)) per sample, encoded alone,
    scaled, zero-padded to `num_frames` latent frames -> (B, T, h, w, C); all of it is zeroed
    with probability `dropout` (one draw for the batch, as SAT does)."""
    k_sigma, k_noise, k_post, k_drop = jax.random.split(key, 4)
    b = image.shape[0]
    sigma = jnp.exp(
        sc.image_noise_log_mean + sc.image_noise_log_std * jax.random.normal(k_sigma, (b,))
    )
    image = image + sigma[:, None, None, None] * jax.random.normal(k_noise, image.shape)
    # One frame is one encoder chunk: no frame-batching scan needed.
    mean, logvar = vae.encode(image[:, None].astype(jnp.float32), frame_batching=False)
    # Times scaling_factor, or divided by it where the VAE config says `invert_scale_latents`
    # (CogVideoX1.5-I2V): the same factor the sampling pipeline applies, so that a model trained
    # here sees at sampling time the condition it was trained on.
    z = vae_lib.sample_latents(k_post, mean, logvar) * sc.image_scale
    z = z * (jax.random.uniform(k_drop) >= dropout)
    pad = jnp.zeros((b, num_frames - 1, *z.shape[2:]), z.dtype)
    return jax.lax.stop_gradient(jnp.concatenate([z, pad], axis=1))  # (B, T, h, w, C)


def diffusion_loss(model, z0, text, t, noise, ab, image_latents=None, ofs=None) -> jax.Array:
    """mean((v_pred - v)^2) over every element: per-sample means averaged over the batch, equal
    to SAT's and diffusers' mean of (1 / (1 - ab)) * (x0_pred - x0)^2. Averaged one axis at a
    time (`compiler.mean`), which keeps it accurate on the CPU."""
    x_t = diffusion.add_noise(z0, noise, t, ab)
    x_in = x_t if image_latents is None else jnp.concatenate([x_t, image_latents], axis=-1)
    v_pred = model(x_in, text, t, ofs=ofs).astype(jnp.float32)
    v = diffusion.velocity(z0, noise, t, ab).astype(jnp.float32)
    return compiler.mean(jnp.square(v_pred - v))


# ---- Pure steps ----


def _merge(graphdef, templates, params, buffers):
    """The model from pure parameter and buffer dicts (templates give the Variable structure)."""
    p, b = jax.tree.map(lambda x: x, templates)
    nnx.replace_by_pure_dict(p, params)
    nnx.replace_by_pure_dict(b, buffers)
    return nnx.merge(graphdef, p, b)


def prepare_batch(batch, key, frozen, sc: StepConfig, *, train: bool):
    """Raw batch -> the loss inputs {z0, text, t, noise[, image_latents]} (no model call)."""
    k_t, k_noise, k_drop, k_img = jax.random.split(key, 4)
    z0 = batch["latents"] * sc.scaling_factor  # (B, T, h, w, C)
    b, t_frames = z0.shape[:2]
    text = batch["text"]
    out = {}
    if sc.i2v:
        vae = nnx.merge(*frozen["vae"])
        dropout = sc.image_dropout if train else 0.0
        img = image_condition(vae, batch["image"], k_img, t_frames, sc, dropout)
        out["image_latents"] = pad_latent_frames(img, sc.patch_size_t)
    z0 = pad_latent_frames(z0, sc.patch_size_t)
    if train:
        keep = jax.random.uniform(k_drop, (b,)) >= sc.text_dropout
        text = jnp.where(keep[:, None, None], text, 0.0)  # dropped prompts are zero embeddings
        out["t"] = eus_timesteps(k_t, b, sc.eus_groups, sc.num_timesteps)
    out.update(z0=z0, text=text, noise=jax.random.normal(k_noise, z0.shape, z0.dtype))
    return out


def _prepare(batch, key, frozen, sc: StepConfig, *, train: bool):
    if packed.is_packed(batch):  # (held-out batches are bucketed also when training packs)
        return packed.prepare(batch, key, sc, train=train)
    return prepare_batch(batch, key, frozen, sc, train=train)


def _loss(params, buffers, inputs, *, graphdef, templates, ab, sc: StepConfig):
    model = _merge(graphdef, templates, params, buffers)
    if "segments" in inputs:
        i = inputs
        return packed.loss(model, i["z0"], i["text"], i["t"], i["noise"], i["segments"], ab, sc.ofs)
    return diffusion_loss(
        model,
        inputs["z0"],
        inputs["text"],
        inputs["t"],
        inputs["noise"],
        ab,
        inputs.get("image_latents"),
        sc.ofs,
    )


def fixed_part(state, frozen):
    """The model's untrained part: the buffers, or in a LoRA run the frozen base model (kept out
    of the train state, so checkpoints and the optimiser hold adapters only)."""
    return frozen["base"] if "base" in frozen else state["buffers"]


def train_step(state, batch, frozen, *, graphdef, templates, tx, ab, sc: StepConfig):
    """One optimiser update -> (new state, metrics). `state` holds params (the trained ones),
    opt_state, ema, buffers, step and rng; the step's randomness is fold_in(rng, step)."""
    key = jax.random.fold_in(state["rng"], state["step"])
    inputs = _prepare(batch, key, frozen, sc, train=True)
    grad_fn = jax.value_and_grad(
        functools.partial(_loss, graphdef=graphdef, templates=templates, ab=ab, sc=sc)
    )
    fixed = fixed_part(state, frozen)
    a = sc.grad_accum_steps
    if a == 1:
        loss, grads = grad_fn(state["params"], fixed, inputs)
    else:  # micro-batches of B / a rows; gradients averaged

        def micro(acc, mb):
            loss, grads = grad_fn(state["params"], fixed, mb)
            return jax.tree.map(jnp.add, acc, (loss, grads)), None

        split = jax.tree.map(lambda x: x.reshape(a, x.shape[0] // a, *x.shape[1:]), inputs)
        zero = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, state["params"]))
        (loss, grads), _ = jax.lax.scan(micro, zero, split)
        loss, grads = jax.tree.map(lambda x: x / a, (loss, grads))
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = dict(state, params=params, opt_state=opt_state, step=state["step"] + 1)
    if sc.ema_decay > 0:
        new["ema"] = optim.ema_update(state["ema"], params, state["step"], sc.ema_decay)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if sc.skip_nonfinite:  # keep the old weights and optimiser state; the step still counts
        kept = {k: new[k] for k in ("params", "opt_state", "ema")}
        old = {k: state[k] for k in kept}
        new.update(jax.tree.map(lambda n, o: jnp.where(finite, n, o), kept, old))
    out = {"loss": loss, "grad_norm": grad_norm, "finite": finite}
    if packed.is_packed(batch):  # the host counts tokens and FLOPs from the clips' token grids
        out["packing_efficiency"] = packed.efficiency(batch)
        out["clip_tokens"] = packed.clip_tokens(batch)
    return new, out


def eval_step(
    params, buffers, batch, index, frozen, *, graphdef, templates, ab, sc, timesteps, seed
):
    """Held-out loss (len(timesteps),) of one batch at each fixed timestep, with noise fixed by
    (seed, batch index): deterministic, so comparable across runs and checkpoints."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), index)
    inputs = _prepare(batch, key, frozen, sc, train=False)
    # One timestep per sample (B,), or per clip of each packed row (B, G).
    shape = batch["grids"].shape[:2] if packed.is_packed(batch) else inputs["z0"].shape[:1]
    losses = []
    for t in timesteps:
        inputs["t"] = jnp.full(shape, t, jnp.int32)
        losses.append(
            _loss(params, buffers, inputs, graphdef=graphdef, templates=templates, ab=ab, sc=sc)
        )
    return jnp.stack(losses)


# ---- Set-up helpers ----


def validate(config, num_devices: int | None = None) -> None:
    """Config rules checked before anything is built or compiled (`num_devices`: the devices
    the mesh is built from, jax.device_count() by default)."""
    c = config
    if c.mode not in ("train", "eval"):
        raise ValueError(f"config.mode must be 'train' or 'eval', got {c.mode!r}")
    if c.on_nonfinite not in ("stop", "skip"):
        raise ValueError(f"config.on_nonfinite must be 'stop' or 'skip', got {c.on_nonfinite!r}")
    tcfg = cj.transformer_config(c.model.variant, **c.model.overrides)
    n = c.input.num_frames
    k = 4 * (tcfg.patch_size_t or 1)
    if n < 1 or (n - 1) % k:
        extra = " (CogVideoX 1.5 needs an even latent count before padding)" if k == 8 else ""
        raise ValueError(f"input.num_frames={n}: the frame count must be {k}k+1{extra}")
    f = c.input.spatial_compression
    if c.input.height % (f * tcfg.patch_size) or c.input.width % (f * tcfg.patch_size):
        raise ValueError(
            f"input height/width {c.input.height}x{c.input.width} must be multiples of "
            f"{f * tcfg.patch_size} (input.spatial_compression {f} times patch size "
            f"{tcfg.patch_size})"
        )
    want = c.input.latent_channels * (2 if c.input.i2v else 1)
    if tcfg.in_channels != want:
        raise ValueError(
            f"model in_channels {tcfg.in_channels} != {want} for input.i2v={c.input.i2v}"
        )
    _validate_model(c.model, tcfg, c.mesh, num_devices)
    shards = _data_shards(c.mesh, num_devices)
    if c.grad_accum_steps < 0:
        raise ValueError(f"grad_accum_steps must be >= 0 (0: auto), got {c.grad_accum_steps}")
    accum = grad_accum_steps(c, shards)
    if c.batch_size % (shards * accum):
        raise ValueError(
            f"batch_size ({c.batch_size}) must be divisible by the data shards (mesh.data x "
            f"mesh.fsdp = {shards}) times grad_accum_steps ({accum})"
        )
    if c.evals.batch_size % shards:
        raise ValueError(
            f"evals.batch_size ({c.evals.batch_size}) must be divisible by the data shards "
            f"(mesh.data x mesh.fsdp = {shards})"
        )
    used = int(np.prod(_mesh_shape(c.mesh, num_devices)))
    if jax.process_count() > 1 and used < jax.device_count():
        raise ValueError(
            f"the mesh uses {used} of the {jax.device_count()} devices (mesh.num_devices="
            f"{c.mesh.num_devices}): a multi-process run must use every process's devices"
        )
    try:
        lcfg = lora_config(c)
    except ValueError as e:
        raise ValueError(f"config.lora: {e}") from None
    if lcfg is not None and c.lora.base_dtype not in ("", "float32", "bfloat16", "float16"):
        raise ValueError(
            f"lora.base_dtype must be float32, bfloat16 or float16, got {c.lora.base_dtype!r}"
        )
    if c.lora.init and not lcfg:
        raise ValueError("lora.init is set but lora.rank is 0 (no LoRA in this run)")
    if c.lora.init and not os.path.exists(c.lora.init):
        raise FileNotFoundError(
            f"lora.init {c.lora.init!r} does not exist (a LoRA folder or a diffusers LoRA file)"
        )
    if c.init.checkpoint and not os.path.isdir(c.init.checkpoint):
        raise FileNotFoundError(
            f"init.checkpoint {c.init.checkpoint!r} does not exist (it must be a converted "
            "diffusers/Orbax transformer folder)"
        )
    if c.input.i2v and not c.vae.checkpoint and c.vae.variant != "tiny":
        raise ValueError("input.i2v needs vae.checkpoint: the frozen VAE encodes the first frame")
    if c.input.source not in ("synthetic", "demo"):
        raise ValueError(f"input.source must be 'synthetic' or 'demo', got {c.input.source!r}")
    if c.input.data_dir and not os.path.isdir(c.input.data_dir):
        raise FileNotFoundError(
            f"input.data_dir {c.input.data_dir!r} does not exist (write one with "
            "`python -m tools.prepare_data SRC OUT`)"
        )
    if c.input.packing and not c.input.data_dir:
        raise ValueError("input.packing=True needs input.data_dir (a prepared dataset)")
    if c.input.packing and c.input.i2v:
        raise ValueError(
            "input.packing=True is not supported for image-to-video models (input.i2v): the "
            "first-frame condition is VAE-encoded per clip shape; use bucketing (packing=False)"
        )
    for key in ("video_budget", "max_clips", "workers"):
        if c.input[key] < 0:
            raise ValueError(f"input.{key} must be >= 0, got {c.input[key]}")


def _validate_model(m, tcfg, mesh, num_devices=None) -> None:
    """Attention and remat choices; Ulysses' head count rule for the default rules."""
    if m.attention_impl not in attention.IMPLEMENTATIONS:
        raise ValueError(
            f"model.attention_impl must be one of {attention.IMPLEMENTATIONS}, "
            f"got {m.attention_impl!r}"
        )
    if m.context_parallel not in attention.CONTEXT_PARALLEL:
        raise ValueError(
            f"model.context_parallel must be one of {attention.CONTEXT_PARALLEL}, "
            f"got {m.context_parallel!r}"
        )
    if m.remat not in transformer.REMAT_POLICIES:
        raise ValueError(
            f"model.remat must be one of {sorted(transformer.REMAT_POLICIES)}, got {m.remat!r}"
        )
    _, _, context, tensor = _mesh_shape(mesh, num_devices)
    n = tcfg.num_heads
    heads = n // tensor if n % tensor == 0 else n  # heads not dividing stay unsplit
    if m.context_parallel == "ulysses" and heads % context:
        raise ValueError(
            f"model.context_parallel='ulysses' needs the heads of a tensor shard ({heads} of "
            f"{n} heads, mesh.tensor={tensor}) to divide by mesh.context={context}; use "
            "'allgather' or another mesh"
        )


def _mesh_shape(m, num_devices: int | None = None) -> tuple[int, ...]:
    """Mesh sizes over `num_devices` (default jax.device_count()); -1 takes the remaining
    devices. `m.num_devices` > 0 caps the devices used (the first ones: a runlocal batch of 2
    on 8 simulated CPU devices)."""
    sizes = [m.data, m.fsdp, m.context, m.tensor]
    total = jax.device_count() if num_devices is None else num_devices
    n = min(total, m.num_devices) if m.num_devices > 0 else total
    fixed = int(np.prod([s for s in sizes if s != -1]))
    if sizes.count(-1) > 1 or any(s < 1 and s != -1 for s in sizes) or n % fixed:
        raise ValueError(
            f"mesh (data, fsdp, context, tensor) = {sizes}: sizes must be >= 1 or -1 (at most "
            f"one) and their product must divide the {n} devices used"
        )
    return tuple(n // fixed if s == -1 else s for s in sizes)


def _data_shards(m, num_devices: int | None = None) -> int:
    data, fsdp, _, _ = _mesh_shape(m, num_devices)
    return data * fsdp


def make_mesh(m, devices=None) -> jax.sharding.Mesh:
    """The (data, fsdp, context, tensor) mesh over `devices` (default jax.devices())."""
    devices = jax.devices() if devices is None else list(devices)
    auto = (jax.sharding.AxisType.Auto,) * 4
    shape = _mesh_shape(m, len(devices))
    devices = devices[: int(np.prod(shape))]
    # Like jax.make_mesh, but a mesh axis may split a physical one (jax.make_mesh allows that on
    # v5e only): context=2 over a v5p 4x4x4 torus needs it.
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return jax.sharding.Mesh(grid, sharding.MESH_AXES, axis_types=auto)


def _fit(spec: P, shape, mesh) -> P:
    """Drop mesh axes from dimensions they do not divide (tiny models on many devices)."""
    out = []
    padded = tuple(spec) + (None,) * (len(shape) - len(spec))
    for dim, entry in zip(shape, padded, strict=True):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        out.append(entry if dim % size == 0 else None)
    return P(*out)


def _shardings(abstract_vars, mesh, rules):
    """NamedShardings (pure dict) for an nnx.State of abstract Variables."""
    specs = nnx.to_pure_dict(sharding.state_specs(abstract_vars, rules or None))
    shapes = nnx.to_pure_dict(abstract_vars)
    return jax.tree.map(
        lambda s, x: NamedSharding(mesh, _fit(s, x.shape, mesh)),
        specs,
        shapes,
        is_leaf=lambda s: isinstance(s, P),
    )


def grad_accum_steps(c, data_shards: int) -> int:
    """config.grad_accum_steps; 0 (auto) gives one example per data shard per micro-batch, the
    least activation memory for a global batch far larger than the data shards (pretraining)."""
    return c.grad_accum_steps or max(c.batch_size // data_shards, 1)


def step_config(c, tcfg, data_shards: int = 1) -> StepConfig:
    """The objective's constants from a config (`tcfg`: the transformer's config; `data_shards`:
    mesh.data x mesh.fsdp of the run's mesh)."""
    sf = c.diffusion.scaling_factor
    return StepConfig(
        scaling_factor=sf,
        # The sampling pipeline's factor (VaeConfig.image_latent_scale).
        image_scale=vae_lib.image_latent_scale(sf, c.vae.invert_scale_latents),
        eus_groups=c.diffusion.eus_groups,
        text_dropout=c.diffusion.text_dropout,
        image_dropout=c.diffusion.image_dropout,
        image_noise_log_mean=c.diffusion.image_noise_log_mean,
        image_noise_log_std=c.diffusion.image_noise_log_std,
        ofs=c.diffusion.ofs if c.diffusion.ofs >= 0 else None,
        i2v=c.input.i2v,
        patch_size_t=tcfg.patch_size_t or 1,
        grad_accum_steps=grad_accum_steps(c, data_shards),
        ema_decay=c.optim.ema_decay,
        skip_nonfinite=c.on_nonfinite == "skip",
    )


def _dtype(name: str):
    return jnp.dtype(name)


def video_tokens(c, tcfg) -> int:
    """Video tokens of one example (latent frames padded to patch_size_t, then patched)."""
    pt = tcfg.patch_size_t or 1
    t = -(-vae_lib.num_latent_frames(c.input.num_frames) // pt)
    f = c.input.spatial_compression * tcfg.patch_size
    return t * (c.input.height // f) * (c.input.width // f)


def model_flops_per_step(c, tcfg) -> int:
    """Analytic training FLOPs of one step (cogvideox_jax.flops: 3 x forward, no remat; a LoRA
    run's frozen weights 2 x)."""
    n = video_tokens(c, tcfg)
    return c.batch_size * flops.train_flops(tcfg, c.input.text_len, n, lora_config(c))


def _tokens_per_example(c, tcfg) -> int:
    return video_tokens(c, tcfg) + c.input.text_len


def _frozen_vae(c, mesh):
    """(graphdef, state) of the frozen VAE for I2V, replicated; None for T2V."""
    if not c.input.i2v:
        return None
    replicated = NamedSharding(mesh, P())
    if c.vae.checkpoint:
        vae = cj.load_vae(c.vae.checkpoint)
        if vae.cfg.invert_scale_latents != c.vae.invert_scale_latents:
            raise ValueError(
                f"{c.vae.checkpoint}: the VAE config has invert_scale_latents="
                f"{vae.cfg.invert_scale_latents} but config.vae.invert_scale_latents is "
                f"{c.vae.invert_scale_latents}; they must agree so that the image condition is "
                "scaled as the sampling pipeline scales it"
            )
        gd, st = nnx.split(vae)
        return gd, jax.device_put(st, replicated)

    # runlocal: a random tiny VAE (the conditioning path is what is exercised), filled on the
    # host: initialising it with jax would compile one program per convolution.
    gd, abs_st = nnx.split(
        nnx.eval_shape(
            lambda: cj.AutoencoderKL(vae_lib.vae_config(c.vae.variant), rngs=nnx.Rngs(0))
        )
    )
    rng = np.random.default_rng(c.seed + 1)

    def fill(path, x):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "scale":
            return np.ones(x.shape, x.dtype)
        if x.ndim == 1:
            return np.zeros(x.shape, x.dtype)
        std = 1 / np.sqrt(np.prod(x.shape[:-1]))
        return (std * rng.standard_normal(x.shape)).astype(x.dtype)

    pure = jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(abs_st))
    nnx.replace_by_pure_dict(abs_st, jax.device_put(pure, replicated))
    return gd, abs_st


# ---- The step and its abstract arguments (shared with tools.aot) ----


@dataclasses.dataclass(frozen=True)
class Program:
    """What the train step is made of, built from a config and a mesh without allocating:
    the model's split (graphdef, abstract Variable templates), optimiser and schedule, the
    state's shardings and the objective's constants."""

    build: Any  # seed -> Transformer
    graphdef: Any
    templates: tuple[nnx.State, nnx.State]  # (params, buffers) abstract Variables
    tx: optax.GradientTransformation
    schedule: Any
    state_sh: dict
    sc: StepConfig
    ab: np.ndarray  # alphas_cumprod (num_timesteps,) float32
    rules: sharding.Rules  # the run's sharding rules (the activations' too: sharding.use_rules)
    # LoRA runs: the adapters' config, the frozen base's shardings (frozen["base"]) and dtype.
    lora: lora.LoraConfig | None = None
    base_sh: Any = None
    base_dtype: Any = None

    @property
    def trainable(self):
        """The Variable filter of the trained parameters."""
        return nnx.Param if self.lora is None else lora.LoraParam


def lora_config(c) -> lora.LoraConfig | None:
    """The run's LoRA adapters (config.lora; rank 0: none, full training)."""
    if not c.lora.rank:
        return None
    return lora.LoraConfig(
        c.lora.rank, c.lora.alpha or float(c.lora.rank), lora.parse_targets(c.lora.targets)
    )


def make_program(c, mesh) -> Program:
    tcfg = cj.transformer_config(c.model.variant, **c.model.overrides)
    sc = step_config(c, tcfg, mesh.shape["data"] * mesh.shape["fsdp"])
    ab = diffusion.alphas_cumprod(
        diffusion.ScheduleConfig(snr_shift_scale=c.diffusion.snr_shift_scale)
    )

    lcfg = lora_config(c)

    def build(seed):
        model = cj.Transformer(
            tcfg,
            dtype=_dtype(c.model.dtype),
            param_dtype=_dtype(c.model.param_dtype),
            remat=c.model.remat,
            attention_impl=c.model.attention_impl,
            context_parallel=c.model.context_parallel,
            rngs=nnx.Rngs(seed),
        )
        if lcfg is not None:
            add_adapters(model, lcfg, seed, _dtype(c.model.param_dtype))
        return model

    trainable = nnx.Param if lcfg is None else lora.LoraParam
    graphdef, abs_params, abs_buffers = nnx.split(nnx.eval_shape(lambda: build(0)), trainable, ...)
    tx, schedule = optim.make_optimizer(c.optim, c.total_steps)
    rules = sharding.rules_with(c.sharding_rules)
    replicated = NamedSharding(mesh, P())
    param_sh = _shardings(abs_params, mesh, rules)
    abs_opt = jax.eval_shape(tx.init, nnx.to_pure_dict(abs_params))
    opt_sh = optax.tree_map_params(
        tx, lambda _, s: s, abs_opt, param_sh, transform_non_params=lambda _: replicated
    )
    # In a LoRA run the untrained part (base weights and buffers) lives in frozen["base"].
    fixed_sh = _shardings(abs_buffers, mesh, rules)
    state_sh = dict(
        params=param_sh,
        opt_state=opt_sh,
        ema=param_sh if sc.ema_decay > 0 else {},
        buffers=fixed_sh if lcfg is None else {},
        step=replicated,
        rng=replicated,
    )
    templates = (abs_params, abs_buffers)
    ab = np.asarray(ab, np.float32)
    extra = {}
    if lcfg is not None:
        base_dtype = _dtype(c.lora.base_dtype or c.model.param_dtype)
        extra = dict(lora=lcfg, base_sh=fixed_sh, base_dtype=base_dtype)
    return Program(build, graphdef, templates, tx, schedule, state_sh, sc, ab, rules, **extra)


def add_adapters(model, lcfg: lora.LoraConfig, seed: int, param_dtype) -> None:
    """Fresh LoRA adapters on `model`, drawn from `seed` (a stream apart from the model's)."""
    key = jax.random.fold_in(jax.random.key(seed), 0x10A)
    lora.attach(model, lcfg, rngs=nnx.Rngs(params=key), param_dtype=param_dtype)


def split_base(prog: Program, model) -> tuple[dict, dict]:
    """A LoRA model -> (adapters, frozen base in the base dtype) as pure dicts."""
    _, p, rest = nnx.split(model, lora.LoraParam, ...)
    cast = lambda x: x.astype(prog.base_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
    return nnx.to_pure_dict(p), jax.tree.map(cast, nnx.to_pure_dict(rest))


def fresh_state(prog: Program, seed: int, params, buffers) -> dict:
    """The train state at step 0 around given parameters and buffers (pure dicts)."""
    return dict(
        params=params,
        opt_state=prog.tx.init(params),
        ema=jax.tree.map(jnp.copy, params) if prog.sc.ema_decay > 0 else {},
        buffers=buffers,
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.PRNGKey(seed),
    )


def init_state(prog: Program, seed: int) -> dict:
    """A randomly initialised train state (pure; jit it with out_shardings=prog.state_sh).
    In a LoRA run it holds the fresh adapters only (the base: `init_base`)."""
    _, p, b = nnx.split(prog.build(seed), prog.trainable, ...)
    b = nnx.to_pure_dict(b) if prog.lora is None else {}
    return fresh_state(prog, seed, nnx.to_pure_dict(p), b)


def init_base(prog: Program, seed: int) -> dict:
    """A LoRA run's randomly initialised frozen base (jit with out_shardings=prog.base_sh)."""
    return split_base(prog, prog.build(seed))[1]


def jit_train_step(prog: Program, mesh):
    """`train_step` jitted as the trainer runs it: state donated, state shardings kept. Call
    (or lower) it under `jax.set_mesh(mesh)` and `sharding.use_rules(prog.rules)`."""
    step = functools.partial(
        train_step,
        graphdef=prog.graphdef,
        templates=prog.templates,
        tx=prog.tx,
        ab=jnp.asarray(prog.ab),
        sc=prog.sc,
    )
    replicated = NamedSharding(mesh, P())
    return jax.jit(
        step,
        donate_argnums=(0,),
        out_shardings=(prog.state_sh, replicated),
        compiler_options=compiler.mesh_options(mesh),
    )


def abstract_train_args(c, prog: Program, mesh) -> tuple[dict, dict, dict]:
    """(state, batch, frozen) as sharded ShapeDtypeStructs: `jit_train_step(...).lower(*args)`
    compiles the trainer's step without allocating anything (tools.aot)."""
    state = checkpoint.abstract(
        jax.eval_shape(functools.partial(init_state, prog, c.seed)), prog.state_sh
    )
    shapes = inputs.example_shapes(c)
    batch_sh = NamedSharding(mesh, P(BATCH_AXES))
    batch = {
        "latents": jax.ShapeDtypeStruct((c.batch_size, *shapes["latent_shape"]), jnp.float32),
        "text": jax.ShapeDtypeStruct((c.batch_size, *shapes["text_shape"]), jnp.float32),
    }
    if c.input.i2v:
        batch["image"] = jax.ShapeDtypeStruct((c.batch_size, *shapes["image_shape"]), jnp.float32)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sh), batch)
    frozen = {}
    if c.input.i2v:  # the frozen VAE's shapes do not depend on its weights
        gd, st = nnx.split(
            nnx.eval_shape(
                lambda: cj.AutoencoderKL(vae_lib.vae_config(c.vae.variant), rngs=nnx.Rngs(0))
            )
        )
        replicated = NamedSharding(mesh, P())
        st = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), st)
        frozen["vae"] = (gd, st)
    if prog.lora is not None:
        base = jax.eval_shape(functools.partial(init_base, prog, c.seed))
        frozen["base"] = checkpoint.abstract(base, prog.base_sh)
    return state, batch, frozen


def _global_batch(local, mesh, batch_size):
    """The global batch from this process's rows of it (data.pipeline.process_rows)."""
    return pipeline.global_batch(local, NamedSharding(mesh, P(BATCH_AXES)), batch_size)


def _note(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def train_and_evaluate(config, workdir: str) -> dict:
    """Train (or, with config.mode == 'eval', evaluate the latest checkpoint); returns the last
    logged metrics."""
    c = config
    validate(c)
    if c.lora.rank and not c.init.checkpoint:  # (tools.aot compiles LoRA steps without one)
        raise ValueError(
            "a LoRA run (lora.rank > 0) adapts a trained model: set init.checkpoint to its "
            "diffusers/Orbax transformer folder (a random base has a zero output projection, "
            "so its adapters would get no gradient)"
        )
    os.makedirs(workdir, exist_ok=True)
    tcfg = cj.transformer_config(c.model.variant, **c.model.overrides)
    tokens = _tokens_per_example(c, tcfg) * c.batch_size
    step_flops = model_flops_per_step(c, tcfg)

    # ---- Mesh ----
    mesh = make_mesh(c.mesh)
    rules = sharding.rules_with(c.sharding_rules)
    replicated = NamedSharding(mesh, P())
    peak_flops = metrics.peak_flops(mesh.devices.flat[0]) * mesh.devices.size  # 0: unknown (CPU)

    @contextlib.contextmanager
    def on_mesh():  # the mesh and rules every traced function (steps, sampling) sees
        with jax.set_mesh(mesh), sharding.use_rules(rules):
            yield

    # ---- Data ----
    # Each process loads only its rows of every global batch (data/pipeline.py).
    rows = pipeline.process_rows(NamedSharding(mesh, P(BATCH_AXES)), c.batch_size)
    eval_rows = pipeline.process_rows(NamedSharding(mesh, P(BATCH_AXES)), c.evals.batch_size)
    _note(
        f"{jax.process_count()} process(es), per-process batch {len(rows)} of {c.batch_size}"
        + ("" if c.input.packing else f", {tokens} tokens per step")
    )
    demo = None
    if c.input.source == "demo":  # the built-in demo's stages (train/demo.py)
        from train import demo as demo_lib

        demo = demo_lib.Demo(c, workdir)
    train_ds, eval_ds = inputs.datasets(c, tcfg, rows, eval_rows, demo)
    data_iter = iter(train_ds)

    # ---- Model, abstract state, shardings ----
    prog = make_program(c, mesh)
    graphdef, templates, schedule, sc = prog.graphdef, prog.templates, prog.schedule, prog.sc
    ab = jnp.asarray(prog.ab)
    state_sh = prog.state_sh
    param_sh, buffer_sh = state_sh["params"], state_sh["buffers"]

    def random_init():
        return jax.jit(functools.partial(init_state, prog, c.seed), out_shardings=state_sh)()

    def load_model(path):
        model = cj.load_transformer(path, dtype=_dtype(c.model.param_dtype))
        if model.cfg != tcfg:
            raise ValueError(f"init.checkpoint {path}: its architecture {model.cfg} != {tcfg}")
        return model

    def load_pretrained(path):
        _, p, b = nnx.split(load_model(path), nnx.Param, ...)
        p, b = jax.device_put((nnx.to_pure_dict(p), nnx.to_pure_dict(b)), (param_sh, buffer_sh))
        return jax.jit(functools.partial(fresh_state, prog, c.seed), out_shardings=state_sh)(p, b)

    def load_adapters(path):  # a LoRA run continuing from a LoRA folder or diffusers LoRA
        lcfg, tree = lora.load(path, tcfg)
        if (lcfg.rank, set(lcfg.targets)) != (prog.lora.rank, set(prog.lora.targets)):
            raise ValueError(
                f"lora.init {path}: rank {lcfg.rank} on {list(lcfg.targets)}, but the config "
                f"asks for rank {prog.lora.rank} on {list(prog.lora.targets)}"
            )
        if lcfg.alpha != prog.lora.alpha:  # keep the adapter's function: rescale B
            key = [k for k in tree if k.endswith("/b")]
            tree.update({k: tree[k] * (lcfg.alpha / prog.lora.alpha) for k in key})
        dt = _dtype(c.model.param_dtype)
        p = jax.device_put(weights.nest({k: v.astype(dt) for k, v in tree.items()}), param_sh)
        return jax.jit(functools.partial(fresh_state, prog, c.seed), out_shardings=state_sh)(p, {})

    abstract_state = checkpoint.abstract(jax.eval_shape(random_init), state_sh)
    mngr = checkpoint.manager(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        keep=c.ckpt.keep,
        async_save=c.ckpt.async_save,
    )
    frozen = {"vae": _frozen_vae(c, mesh)} if c.input.i2v else {}
    meta = None
    if prog.lora is not None:  # the frozen base: init.checkpoint's weights (validate checks)
        base = split_base(prog, load_model(c.init.checkpoint))[1]
        frozen["base"] = jax.device_put(base, prog.base_sh)
        # Saved with every checkpoint: what `tools.convert lora-to-diffusers` needs.
        meta = {
            "lora": prog.lora.to_json(),
            "transformer": tcfg.to_diffusers(),
            "base": os.path.abspath(c.init.checkpoint),
        }

    # ---- Compiled steps ----
    p_eval = jax.jit(
        functools.partial(
            eval_step,
            graphdef=graphdef,
            templates=templates,
            ab=ab,
            sc=sc,
            timesteps=tuple(c.evals.timesteps),
            seed=c.seed + 20_000,
        ),
        out_shardings=replicated,  # read back on every process
        compiler_options=compiler.mesh_options(mesh),
    )

    def run_eval(state):
        if eval_ds is None:
            return {}

        def eval_fn(batch, index, frozen):  # the batch is read outside the mesh, as in training
            with on_mesh():
                batch = _global_batch(batch, mesh, c.evals.batch_size)
                fixed = fixed_part(state, frozen)
                return p_eval(state["params"], fixed, batch, index, frozen)

        return evaluate.held_out_loss(eval_fn, eval_ds, frozen, tuple(c.evals.timesteps))

    if c.mode == "eval":
        return evaluate.evaluate_checkpoint(mngr, abstract_state, run_eval, workdir)

    state, origin = checkpoint.restore_or_init(
        mngr,
        abstract_state,
        data_iter,
        init_checkpoint=c.init.checkpoint if prog.lora is None else c.lora.init,
        load_pretrained=load_pretrained if prog.lora is None else load_adapters,
        random_init=random_init,
    )
    _note(f"train state: {origin}")
    p_train = jit_train_step(prog, mesh)

    # ---- Loop ----
    step = int(state["step"])
    log = metrics.Logger(workdir, c.total_steps, step, progress=c.log.progress)
    last_saved, row = step if mngr.latest_step() is not None else None, {}
    t0, steps_timed, skipped = time.perf_counter(), 0, 0
    done = dict(tokens=0.0, flops=0.0, efficiency=0.0)  # since the last logged row
    try:
        while step < c.total_steps:
            local = next(data_iter)  # outside the mesh: raw clips may be encoded here
            with on_mesh():
                state, m = p_train(state, _global_batch(local, mesh, c.batch_size), frozen)
            step += 1
            steps_timed += 1
            counts = (tokens, step_flops)
            if c.input.packing:  # each clip counts its own tokens (attention is per clip)
                counts = packed.step_counts(
                    m["clip_tokens"], tcfg, c.input.text_len, lora_config(c)
                )
                done["efficiency"] += float(m["packing_efficiency"])
            done["tokens"] += counts[0]
            done["flops"] += counts[1]
            loss, finite = float(m["loss"]), bool(m["finite"])
            if not finite and c.on_nonfinite == "stop":
                mngr.wait_until_finished()
                raise FloatingPointError(
                    f"non-finite loss or gradient at step {step} (loss {loss}); stopping "
                    "(config.on_nonfinite='stop'). "
                    f"The last good checkpoint (step {last_saved}) is kept in {mngr.directory}"
                )
            if not finite:
                skipped += 1
                _note(f"step {step}: non-finite loss or gradient ({loss}); update skipped")
            is_log = step % c.log.every_steps == 0 or step == c.total_steps
            is_eval = step % c.evals.every_steps == 0
            if is_log or is_eval:
                dt = time.perf_counter() - t0
                row = dict(
                    loss=loss,
                    lr=float(schedule(step - 1)),
                    grad_norm=float(m["grad_norm"]),
                    steps_per_sec=steps_timed / dt,
                    tokens_per_sec=done["tokens"] / dt,
                )
                if (
                    c.input.packing
                ):  # mean real tokens / token budget of the steps since the last row
                    row["packing_efficiency"] = done["efficiency"] / steps_timed
                if peak_flops:  # model FLOPs utilisation against the devices' bf16 peak
                    row["mfu"] = done["flops"] / dt / peak_flops
                if skipped:  # steps skipped since the last logged row
                    row["skipped_nonfinite"] = skipped
                if is_eval:
                    row.update(run_eval(state))
                    if demo is not None:
                        with on_mesh():
                            fixed = fixed_part(state, frozen)
                            model = _merge(graphdef, templates, state["params"], fixed)
                            row.update(demo.sample(model, step))
                log.write(step, row)
                t0, steps_timed, skipped = time.perf_counter(), 0, 0
                done = dict.fromkeys(done, 0.0)
            if step % c.ckpt.every_steps == 0 or step == c.total_steps:
                checkpoint.save(mngr, step, state, data_iter, meta)
                last_saved = step
            log.advance(step)
    finally:
        mngr.wait_until_finished()
        mngr.close()
        log.close()
    return {"step": step, **row}
