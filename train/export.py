"""A training run as a model: the transformer of one of its checkpoints (a full run's parameters
or their EMA; a LoRA run's adapters merged into its base) and the whole model folder it samples
with (the demo: its own VAE and text encoder, `train.demo.DemoPipeline`). What `tools.convert
run-to-diffusers / run-to-orbax` and `tools.sample --model RUN` use.

Every checkpoint records what its run trained (`Program.checkpoint_meta`: the transformer's
config, full or LoRA, init.checkpoint, the model folder of its VAE and text encoder), so a
checkpoint exports without the config it was trained with.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import ml_collections
import numpy as np
from flax import nnx

import cogvideox_jax as cj
from cogvideox_jax import components, lora
from train import checkpoint


def is_run(path: str | os.PathLike) -> bool:
    """Whether `path` is a training run: a workdir (checkpoints/), its checkpoints/ folder or
    one step folder (state/)."""
    p = Path(path)
    if (p / "checkpoints").is_dir() or (p / "state").is_dir():
        return True
    return p.is_dir() and any(d.name.isdigit() and (d / "state").is_dir() for d in p.iterdir())


def transformer(run: str, *, step: int | None = None, ema: bool = False, dtype=None):
    """(the run's transformer, its checkpoint's meta, the step folder it came from). `dtype`:
    the weights' dtype (None: as trained)."""
    folder = checkpoint.step_folder(str(run), step)
    meta = checkpoint.read_meta(folder)
    cfg = cj.TransformerConfig.from_diffusers(meta["transformer"])
    tree = checkpoint.read_weights(folder, ema=ema)
    if "lora" in meta:
        if not meta.get("base"):
            raise ValueError(f"{folder}: a LoRA run without a base model (init.checkpoint)")
        model = components.load_transformer(meta["base"], dtype=dtype)
        if model.cfg != cfg:
            raise ValueError(f"{meta['base']}: not the transformer the run adapted ({cfg})")
        lora.fuse(model, lora.LoraConfig.from_json(meta["lora"]), tree)
        return model, meta, folder
    if dtype is None:
        dtype = next(iter(tree.values())).dtype
    dt = np.dtype(dtype)
    model = nnx.eval_shape(lambda: cj.Transformer(cfg, dtype=dt, param_dtype=dt, rngs=nnx.Rngs(0)))
    return components.fill(model, tree.items(), where=folder), meta, folder


def base_model(meta: dict, folder: str, base: str = "") -> str:
    """The whole model folder whose VAE, text encoder, tokenizer and scheduler go with the run's
    transformer: `base` if given, else the one the run recorded."""
    base = base or meta.get("model", "")
    if not base:
        raise ValueError(
            f"{folder}: the run records no model folder (VAE, text encoder, tokenizer, "
            "scheduler) to go with its transformer: pass --base MODEL"
        )
    if not (Path(base) / "model_index.json").is_file():
        raise FileNotFoundError(f"{base}: not a whole model folder (no model_index.json)")
    return base


def write(
    run: str,
    dst: str,
    fmt: str,
    *,
    step: int | None = None,
    ema: bool = False,
    base: str = "",
    overwrite: bool = False,
) -> list[str]:
    """Write a run's transformer as a `fmt` component folder, or with `base` a whole model
    folder (`components.write_model`); returns the report."""
    model, meta, folder = transformer(run, step=step, ema=ema)
    what = "EMA weights" if ema else "weights"
    kind = "LoRA merged into its base" if "lora" in meta else "full run"
    report = [f"read the {what} of {folder} ({kind})"]
    if meta.get("demo"):  # a whole model folder: the run's own VAE and text encoder
        if base:
            raise ValueError(f"{folder}: a demo run exports with its own VAE and text encoder")
        return report + _write_demo(model, meta, folder, dst, fmt, overwrite)
    if base:
        base = base_model(meta, folder, base)
    return report + components.write_model(model, dst, fmt, base=base, overwrite=overwrite)


def _write_demo(model, meta, folder, dst, fmt, overwrite) -> list[str]:
    from train import demo

    config = ml_collections.ConfigDict(json.loads(meta["config"]))
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(dst))) as tmp:
        base = os.path.join(tmp, "base")
        demo.write_base(config, _workdir(folder), base)
        report = components.write_model(model, dst, fmt, base=base, overwrite=overwrite)
    return [line.replace(f" from {base}", " (the demo run's own)") for line in report]


def _workdir(step_folder: str) -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(step_folder)))


def pipeline(run: str, *, step=None, ema=False, base: str = "", dtype=None):
    """(a `Pipeline` with the run's transformer and the rest of its model folder, the step
    folder)."""
    from cogvideox_jax.pipeline import Pipeline

    model, meta, folder = transformer(run, step=step, ema=ema, dtype=dtype)
    if meta.get("demo"):
        from train import demo

        if base:
            raise ValueError(f"{folder}: a demo run samples with its own VAE and text encoder")
        config = ml_collections.ConfigDict(json.loads(meta["config"]))
        return demo.DemoPipeline(model, config, _workdir(folder)), folder
    parts = Pipeline.from_pretrained(base_model(meta, folder, base), dtype=dtype, transformer=model)
    return parts, folder
