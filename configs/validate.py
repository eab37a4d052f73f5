"""The rules a transformer run's config must follow, checked before anything is built, loaded or
compiled: `validate(config, num_devices=..., num_processes=...)`.

Each rule fails with one ValueError (FileNotFoundError for a missing path) naming the config key,
its value and the rule. The checks need a few facts of the model library (the variant table,
the attention kernels and remat policies, the LoRA target names, how the sharding rules cut the
batch), so this is the one file of configs/ that imports `cogvideox_jax`; what it derives along
the way is returned (`Checked`), and the trainer builds its run from that (train/run.py).
"""

from __future__ import annotations

import dataclasses
import os

import cogvideox_jax as cj
from cogvideox_jax import attention, lora, sharding
from cogvideox_jax.layers import REMAT_POLICIES

MODES = ("train", "eval")
ON_NONFINITE = ("stop", "skip")
SOURCES = ("synthetic", "demo")
BASE_DTYPES = ("", "float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class Checked:
    """What checking a config derived from it (the trainer's run is built from these)."""

    model: cj.TransformerConfig
    lora: lora.LoraConfig | None  # None: every parameter trains
    rules: sharding.Rules  # the run's sharding rules (config.sharding_rules applied)
    mesh_shape: dict[str, int]  # mesh axis -> size
    data_shards: int  # how many pieces the `batch` rule cuts a batch into
    grad_accum_steps: int


def validate(config, *, num_devices: int, num_processes: int = 1) -> Checked:
    """Check `config` for a mesh built from `num_devices` devices (the run's, or a TPU slice's
    for tools.aot) in a run of `num_processes` processes."""
    c = config
    _check_choices(c)
    model = _model(c)
    _check_clip(c, model)
    rules = sharding.rules_with(c.sharding_rules)
    sizes = {a: c.mesh[a] for a in sharding.MESH_AXES}
    shape = sharding.mesh_shape(sizes, num_devices, c.mesh.num_devices)
    _check_attention(c.model, model, shape, rules)
    shards = sharding.axis_size("batch", shape, rules)
    accum = grad_accum_steps(c, shards)
    _check_batches(c, shards, accum, rules)
    used = num_devices if c.mesh.num_devices <= 0 else min(num_devices, c.mesh.num_devices)
    if num_processes > 1 and used < num_devices:
        raise ValueError(
            f"the mesh uses {used} of the {num_devices} devices (mesh.num_devices="
            f"{c.mesh.num_devices}): a multi-process run must use every process's devices"
        )
    adapters = _lora(c)
    _check_paths(c)
    _check_input(c)
    _check_samples(c, shape)
    return Checked(model, adapters, rules, shape, shards, accum)


def grad_accum_steps(c, data_shards: int) -> int:
    """config.grad_accum_steps; 0 (auto) gives one example per data shard per micro-batch, the
    least activation memory for a global batch far larger than the data shards (pretraining)."""
    return c.grad_accum_steps or max(c.batch_size // data_shards, 1)


def _check_choices(c) -> None:
    if c.mode not in MODES:
        raise ValueError(f"config.mode must be 'train' or 'eval', got {c.mode!r}")
    if c.on_nonfinite not in ON_NONFINITE:
        raise ValueError(f"config.on_nonfinite must be 'stop' or 'skip', got {c.on_nonfinite!r}")
    if c.get("memory_limit_gb", 0.0) < 0:
        raise ValueError(f"memory_limit_gb must be >= 0 (0: what is free), got {c.memory_limit_gb}")
    if c.get("watchdog_factor", 0.0) < 0:
        raise ValueError(f"watchdog_factor must be >= 0 (0: off), got {c.watchdog_factor}")
    if c.ckpt.get("step", 0) < 0:
        raise ValueError(
            f"ckpt.step must be >= 0 (0: the newest intact checkpoint), got {c.ckpt.step}"
        )
    if c.grad_accum_steps < 0:
        raise ValueError(f"grad_accum_steps must be >= 0 (0: auto), got {c.grad_accum_steps}")
    if c.input.source not in SOURCES:
        raise ValueError(f"input.source must be 'synthetic' or 'demo', got {c.input.source!r}")
    for key in ("video_budget", "max_clips", "workers"):
        if c.input[key] < 0:
            raise ValueError(f"input.{key} must be >= 0, got {c.input[key]}")


def _model(c) -> cj.TransformerConfig:
    try:
        return cj.transformer_config(c.model.variant, **c.model.overrides)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.model: {e}") from None


def _check_clip(c, model: cj.TransformerConfig) -> None:
    """The config's clip size fits the VAE and the patch sizes; channels match the model."""
    n = c.input.num_frames
    k = 4 * (model.patch_size_t or 1)
    if n < 1 or (n - 1) % k:
        extra = " (CogVideoX 1.5 needs an even latent count before padding)" if k == 8 else ""
        raise ValueError(f"input.num_frames={n}: the frame count must be {k}k+1{extra}")
    f = c.input.spatial_compression
    if c.input.height % (f * model.patch_size) or c.input.width % (f * model.patch_size):
        raise ValueError(
            f"input height/width {c.input.height}x{c.input.width} must be multiples of "
            f"{f * model.patch_size} (input.spatial_compression {f} times patch size "
            f"{model.patch_size})"
        )
    want = c.input.latent_channels * (2 if c.input.i2v else 1)
    if model.in_channels != want:
        raise ValueError(
            f"model in_channels {model.in_channels} != {want} for input.i2v={c.input.i2v}"
        )


def _check_attention(m, model: cj.TransformerConfig, shape, rules) -> None:
    """Attention and remat choices; Ulysses' head count rule."""
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
    if m.remat not in REMAT_POLICIES:
        raise ValueError(f"model.remat must be one of {sorted(REMAT_POLICIES)}, got {m.remat!r}")
    n = model.num_heads
    tensor = sharding.axis_size("act_heads", shape, rules)
    context = sharding.axis_size("length", shape, rules)
    heads = n // tensor if n % tensor == 0 else n  # heads not dividing stay unsplit
    if m.context_parallel == "ulysses" and heads % context:
        raise ValueError(
            f"model.context_parallel='ulysses' needs the heads of a tensor shard ({heads} of "
            f"{n} heads, mesh.tensor={tensor}) to divide by mesh.context={context}; use "
            "'allgather' or another mesh"
        )


def _check_batches(c, shards: int, accum: int, rules) -> None:
    entry = sharding.spec(("batch",), rules)[0]
    axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
    named = " x ".join(f"mesh.{a}" for a in axes) or "none"
    where = f"the mesh axes of the `batch` sharding rule, {named} = {shards}"
    if c.batch_size % (shards * accum):
        raise ValueError(
            f"batch_size ({c.batch_size}) must be divisible by the data shards ({where}) times "
            f"grad_accum_steps ({accum}); grad_accum_steps=0 chooses one example per data shard "
            "per micro-batch, whatever the mesh"
        )
    if c.evals.batch_size % shards:
        raise ValueError(
            f"evals.batch_size ({c.evals.batch_size}) must be divisible by the data shards "
            f"({where})"
        )


def _lora(c) -> lora.LoraConfig | None:
    """The run's LoRA adapters (config.lora; rank 0: none, full training)."""
    if not c.lora.rank:
        if c.lora.init:
            raise ValueError("lora.init is set but lora.rank is 0 (no LoRA in this run)")
        return None
    try:
        out = lora.LoraConfig(
            c.lora.rank, c.lora.alpha or float(c.lora.rank), lora.parse_targets(c.lora.targets)
        )
    except ValueError as e:
        raise ValueError(f"config.lora: {e}") from None
    if c.lora.base_dtype not in BASE_DTYPES:
        raise ValueError(
            f"lora.base_dtype must be float32, bfloat16 or float16, got {c.lora.base_dtype!r}"
        )
    return out


def _check_paths(c) -> None:
    if c.lora.init and not os.path.exists(c.lora.init):
        raise FileNotFoundError(
            f"lora.init {c.lora.init!r} does not exist (a LoRA folder or a diffusers LoRA file)"
        )
    if c.init.checkpoint and not os.path.isdir(c.init.checkpoint):
        raise FileNotFoundError(
            f"init.checkpoint {c.init.checkpoint!r} does not exist (it must be a converted "
            "diffusers/Orbax transformer folder)"
        )
    if c.input.data_dir and not os.path.isdir(c.input.data_dir):
        raise FileNotFoundError(
            f"input.data_dir {c.input.data_dir!r} does not exist (write one with "
            "`python -m tools.prepare_data SRC OUT`)"
        )
    for folder, _ in sources(c):
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"input.sources: {folder!r} does not exist (write one with "
                "`python -m tools.prepare_data SRC OUT`)"
            )


def sources(c) -> list[tuple[str, float]]:
    """input.sources as [(prepared dataset folder, weight)], checked: pairs, positive weights,
    not together with input.data_dir."""
    out = []
    for item in c.input.sources:
        pair = tuple(item.values()) if hasattr(item, "values") else tuple(item)
        if len(pair) != 2 or not isinstance(pair[0], str) or not _positive(pair[1]):
            raise ValueError(
                f"input.sources: {item!r} is not a (prepared dataset folder, weight > 0) pair; "
                "e.g. --config.input.sources='((\"clips\", 0.8), (\"images\", 0.2))'"
            )
        out.append((pair[0], float(pair[1])))
    if out and c.input.data_dir:
        raise ValueError("set input.data_dir or input.sources, not both")
    return out


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0


def _check_samples(c, shape) -> None:
    """evals.sample_prompts and sample_images (train/samples.py)."""
    e = c.evals
    prompts, images = list(e.sample_prompts), list(e.sample_images)
    if not all(isinstance(p, str) for p in prompts + images):
        raise ValueError("evals.sample_prompts and evals.sample_images must be lists of strings")
    if not prompts:
        if images:
            raise ValueError("evals.sample_images is set but evals.sample_prompts is empty")
        return
    if c.input.source == "demo":
        raise ValueError(
            "evals.sample_prompts: the demo samples its own captions (demo.samples); leave it empty"
        )
    if e.sample_steps < 1:
        raise ValueError(f"evals.sample_steps must be at least 1, got {e.sample_steps}")
    if c.input.i2v and len(images) not in (1, len(prompts)):
        raise ValueError(
            f"evals.sample_images: an image-to-video run needs one first frame, or one per "
            f"prompt ({len(prompts)}), got {len(images)}"
        )
    if not c.input.i2v and images:
        raise ValueError("evals.sample_images is for image-to-video runs (input.i2v)")
    for path in images:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"evals.sample_images: {path!r} does not exist")
    rows = len(prompts) * (2 if e.sample_guidance > 1 else 1)
    if rows % shape["data"]:
        raise ValueError(
            f"evals.sample_prompts: {rows} sampling rows ({len(prompts)} prompts"
            f"{' x 2 for guidance' if e.sample_guidance > 1 else ''}) must divide over "
            f"mesh.data={shape['data']}"
        )


def _check_input(c) -> None:
    if c.input.i2v and not c.vae.checkpoint and c.vae.variant != "tiny":
        raise ValueError("input.i2v needs vae.checkpoint: the frozen VAE encodes the first frame")
    if c.input.packing and not (c.input.data_dir or c.input.sources):
        raise ValueError("input.packing=True needs input.data_dir (a prepared dataset)")
    if c.input.packing and c.input.i2v:
        raise ValueError(
            "input.packing=True is not supported for image-to-video models (input.i2v): the "
            "first-frame condition is VAE-encoded per clip shape; use bucketing (packing=False)"
        )
