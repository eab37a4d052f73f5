"""The supported diffusers components as folders: which model a config.json describes, its
conversion spec with the model's shapes, loading a component as an NNX module, saving one, and
converting whole component or model folders both ways.

A component folder is diffusers' (config.json + safetensors files) or its Orbax conversion
(config.json, `convert.MARKER`, `params/`). A model folder holds model_index.json and one folder
per component; the supported ones are `transformer/` (`CogVideoXTransformer3DModel`), `vae/`
(`AutoencoderKLCogVideoX`) and `text_encoder/` (transformers' `T5EncoderModel`). The parameter
mapping itself lives in `convert.py`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from cogvideox_jax import weights
from cogvideox_jax.convert import (
    MARKER,
    PARAMS_DIR,
    STREAM_GROUP_BYTES,
    ComponentSpec,
    commit,
    component_kind,
    component_to_diffusers,
    component_to_orbax,
    is_orbax_component,
    read_config,
    read_leaves,
    staging,
    t5_rules,
    transformer_rules,
    vae_rules,
)
from cogvideox_jax.layers import Buffer
from cogvideox_jax.t5 import T5Config, T5Encoder
from cogvideox_jax.transformer import Transformer, TransformerConfig
from cogvideox_jax.vae import AutoencoderKL, VaeConfig

DIRECTIONS = ("diffusers-to-orbax", "orbax-to-diffusers")


def component_spec(config: Mapping) -> ComponentSpec:
    """Rules and model shapes for a component config.json, or ValueError if unsupported."""
    kind = component_kind(config)
    if kind == "transformer":
        cfg = TransformerConfig.from_diffusers(dict(config))
        shapes = _abstract_shapes(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
        return ComponentSpec(
            kind, transformer_rules(cfg), shapes, cfg.num_layers, "diffusion_pytorch_model"
        )
    if kind == "vae":
        cfg = VaeConfig.from_diffusers(dict(config))
        shapes = _abstract_shapes(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
        return ComponentSpec(kind, vae_rules(shapes), shapes, 0, "diffusion_pytorch_model")
    if kind == "text_encoder":
        cfg = T5Config.from_transformers(dict(config))
        shapes = _abstract_shapes(lambda: T5Encoder(cfg, rngs=nnx.Rngs(0)))
        return ComponentSpec(
            kind,
            t5_rules(cfg),
            shapes,
            cfg.num_layers,
            "model",
            aliases={"encoder.embed_tokens.weight": "shared.weight"},
        )
    raise ValueError(
        f"unsupported component (_class_name={config.get('_class_name')!r}, "
        f"model_type={config.get('model_type')!r})"
    )


def _abstract_shapes(build) -> dict[str, tuple[int, ...]]:
    """Shape of every parameter and buffer ("/"-path) of the module `build()` makes, without
    allocating it."""
    model = nnx.eval_shape(build)
    state = nnx.to_pure_dict(nnx.state(model, (nnx.Param, Buffer)))
    return {k: tuple(v.shape) for k, v in weights.flatten(state).items()}


def read_component(folder: str | os.PathLike, sharding=None):
    """(config.json dict, stored dtype, iterator of (path, array) in our layout) from a diffusers
    or Orbax component folder. Leaves are read lazily, one (group) at a time; `sharding` places
    Orbax leaves (`convert.read_leaves`)."""
    folder = Path(folder)
    config = read_config(folder)
    dtype, leaves = read_leaves(folder, component_spec(config), sharding)
    return config, dtype, leaves


def component_folder(path: str | os.PathLike, name: str) -> Path:
    """A component folder itself, or the `name` subfolder of a whole model folder."""
    path = Path(path)
    if (path / "model_index.json").is_file():
        path = path / name
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a folder")
    return path


# Loading and saving modules.


def load_transformer(
    path: str | os.PathLike,
    *,
    dtype=None,
    attention_impl: str = "auto",
    context_parallel: str = "allgather",
):
    """The transformer of a diffusers folder or of its Orbax conversion, as an NNX module.

    Args:
      path: the component folder, or a whole model folder (its `transformer/` is used).
      dtype: parameter and compute dtype; None keeps the dtype the weights are stored in.
      attention_impl: the attention kernel (`cogvideox_jax.attention.IMPLEMENTATIONS`).
      context_parallel: "allgather" or "ulysses", used where a mesh splits the tokens.

    Returns:
      A `transformer.Transformer`, its parameters on the default device.
    """

    def build(config, stored):
        cfg = TransformerConfig.from_diffusers(config)
        dt = np.dtype(dtype or stored)
        return Transformer(
            cfg,
            dtype=dt,
            param_dtype=dt,
            attention_impl=attention_impl,
            context_parallel=context_parallel,
            rngs=nnx.Rngs(0),
        )

    return _load_module(component_folder(path, "transformer"), build)


def load_vae(path: str | os.PathLike, *, dtype=np.float32):
    """The VAE of a diffusers `vae` folder (or a model folder's) or of its Orbax conversion, as
    a `vae.AutoencoderKL`.

    Parameters and compute default to float32, whatever the stored dtype (diffusers likewise
    upcasts the CogVideoX VAE: `force_upcast`); `dtype=None` keeps the stored dtype.
    """

    def build(config, stored):
        dt = np.dtype(dtype or stored)
        return AutoencoderKL(
            VaeConfig.from_diffusers(config), dtype=dt, param_dtype=dt, rngs=nnx.Rngs(0)
        )

    return _load_module(component_folder(path, "vae"), build)


def load_text_encoder(path: str | os.PathLike, *, dtype=None):
    """The T5 encoder of a transformers `T5EncoderModel` folder (a model folder's
    `text_encoder/`) or of its Orbax conversion, as a `t5.T5Encoder`. `dtype` as in
    `load_transformer`."""

    def build(config, stored):
        dt = np.dtype(dtype or stored)
        return T5Encoder(
            T5Config.from_transformers(config), dtype=dt, param_dtype=dt, rngs=nnx.Rngs(0)
        )

    return _load_module(component_folder(path, "text_encoder"), build)


def save_transformer(model, folder: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Write a `transformer.Transformer` as an Orbax component folder (exportable with
    `orbax-to-diffusers`); the folder appears only once complete."""
    folder = Path(folder)
    tmp = staging(folder, overwrite)
    try:
        _write_orbax_transformer(model, tmp)
        commit(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_orbax_transformer(model, folder: Path) -> None:
    write_orbax_module(model, folder, "transformer", model.cfg.to_diffusers())


def write_orbax_module(model, folder: str | os.PathLike, component: str, config: dict) -> None:
    """Write a module's parameters and buffers as an Orbax component folder of `component`
    ("transformer", "vae", "text_encoder") into the existing `folder`, with `config` as its
    config.json (diffusers' or transformers', which names the component)."""
    folder = Path(folder)
    state = weights.flatten(nnx.to_pure_dict(nnx.state(model, (nnx.Param, Buffer))))
    weights.save_params(
        folder / PARAMS_DIR,
        ((k, np.asarray(v)) for k, v in state.items()),
        group_bytes=STREAM_GROUP_BYTES,
    )
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / MARKER).write_text(json.dumps({"format": 1, "component": component}) + "\n")


FORMATS = ("diffusers", "orbax")


def write_model(
    model, dst: str | os.PathLike, fmt: str, *, base: str | os.PathLike = "", overwrite=False
) -> list[str]:
    """Write a `transformer.Transformer` in `fmt` ("diffusers": safetensors that diffusers'
    `from_pretrained` loads; "orbax"): as a transformer component folder, or with `base` (a whole
    model folder, diffusers or Orbax) as a whole model folder holding base's other components in
    `fmt` (converted where needed, the rest copied) and this transformer. Returns a report; dst
    appears only once complete."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} (one of {FORMATS})")
    dst = Path(dst)
    if base and not (Path(base) / "model_index.json").is_file():
        raise FileNotFoundError(f"--base {base}: not a whole model folder (no model_index.json)")
    tmp = staging(dst, overwrite)
    try:
        report, target = [], tmp
        if base:
            report = _copy_components(Path(base), tmp, fmt, skip="transformer")
            target = tmp / "transformer"
            target.mkdir()
        if fmt == "orbax":
            _write_orbax_transformer(model, target)
        else:
            orbax = Path(str(tmp) + ".orbax")
            orbax.mkdir()
            try:
                _write_orbax_transformer(model, orbax)
                component_to_diffusers(orbax, target, component_spec(read_config(orbax)))
            finally:
                shutil.rmtree(orbax, ignore_errors=True)
        report.append(f"wrote the transformer ({fmt})")
        commit(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _copy_components(base: Path, out: Path, fmt: str, *, skip: str) -> list[str]:
    """base's entries but `skip` into `out`, supported components in `fmt`."""
    report = []
    for entry in sorted(base.iterdir()):
        target = out / entry.name
        if entry.name == skip:
            continue
        if not entry.is_dir():
            shutil.copy2(entry, target)
            continue
        convertible = _convertible("diffusers-to-orbax", entry) or is_orbax_component(entry)
        if convertible and is_orbax_component(entry) != (fmt == "orbax"):
            target.mkdir()
            direction = "diffusers-to-orbax" if fmt == "orbax" else "orbax-to-diffusers"
            convert_component(direction, entry, target)
            report.append(f"converted {entry.name}/ from {base}")
        else:
            shutil.copytree(entry, target)
            report.append(f"copied {entry.name}/ from {base}")
    return report


def _load_module(folder: Path, build):
    """Build a module abstractly and fill it leaf by leaf from a component folder."""
    config, stored, leaves = read_component(folder)
    return fill(nnx.eval_shape(lambda: build(config, stored)), leaves, where=str(folder))


def fill(model, leaves: Iterable[tuple[str, Any]], *, where: str = "weights"):
    """Set every parameter and buffer of `model` (built abstractly, `nnx.eval_shape`) from
    ('/'-path, array) pairs in our layout, cast to the model's dtypes, one leaf at a time to
    device arrays (host memory never holds a second copy of the model). A missing, unexpected
    or misshapen leaf is an error naming it and `where`."""
    state = nnx.state(model, (nnx.Param, Buffer))
    want = weights.flatten(nnx.to_pure_dict(state))
    params = {}
    for k, v in leaves:
        if k not in want:
            raise ValueError(f"{where}: unexpected tensor {k!r} for this model")
        if tuple(v.shape) != tuple(want[k].shape):
            raise ValueError(
                f"{where}: tensor {k!r} has shape {tuple(v.shape)}, model expects "
                f"{tuple(want[k].shape)}"
            )
        params[k] = jax.numpy.asarray(v, want[k].dtype)
    missing = sorted(set(want) - set(params))
    if missing:
        raise ValueError(f"{where}: missing tensor {missing[0]!r} ({len(missing)} missing)")
    nnx.replace_by_pure_dict(state, _int_keys(weights.nest(params)))
    nnx.update(model, state)
    return model


def _int_keys(tree):
    """Orbax and our flat paths spell list indices as strings; NNX lists want ints."""
    if not isinstance(tree, dict):
        return tree
    return {
        int(k) if isinstance(k, str) and k.isdigit() else k: _int_keys(v) for k, v in tree.items()
    }


# Converting folders.


def convert(
    direction: str, src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False
) -> list[str]:
    """Convert a component folder or a whole diffusers model folder; returns a report.

    direction: "diffusers-to-orbax" or "orbax-to-diffusers". A model folder (with
    model_index.json) has each supported component converted and everything else copied.
    The result appears at dst only once complete.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}")
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: not a folder")
    tmp = staging(dst, overwrite)
    try:
        report = _convert_tree(direction, src, tmp)
        commit(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def convert_component(direction: str, src: Path, out: Path) -> None:
    """Convert one component folder `src` into the existing folder `out` (see `convert`)."""
    spec = component_spec(read_config(src))
    if direction == "diffusers-to-orbax":
        component_to_orbax(src, out, spec)
    else:
        component_to_diffusers(src, out, spec)


def _convert_tree(direction: str, src: Path, out: Path) -> list[str]:
    if not (src / "model_index.json").is_file():
        convert_component(direction, src, out)
        return [f"converted {src.name}"]
    report = []
    for entry in sorted(src.iterdir()):
        target = out / entry.name
        if entry.is_dir() and _convertible(direction, entry):
            target.mkdir()
            convert_component(direction, entry, target)
            report.append(f"converted {entry.name}/")
        elif entry.is_dir():
            shutil.copytree(entry, target)
            report.append(f"copied {entry.name}/")
        else:
            shutil.copy2(entry, target)
            report.append(f"copied {entry.name}")
    return report


def _convertible(direction: str, folder: Path) -> bool:
    if direction == "orbax-to-diffusers":
        return is_orbax_component(folder)
    if not (folder / "config.json").is_file():
        return False
    return component_kind(read_config(folder)) is not None
