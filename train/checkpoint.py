"""Training checkpoints: one Orbax CheckpointManager step holds the whole train state
(parameters, optimiser state, EMA, step, RNG) and the Grain iterator's position; a LoRA run's
steps also hold `meta` (JSON: the adapters' config and the transformer's), so that a checkpoint
exports on its own (`tools.convert lora-to-diffusers`).

Saves are asynchronous and atomic (Orbax writes to a temporary folder and renames it on commit),
so a process killed at any moment, even mid-save, leaves the previous checkpoints intact; the
temporary folder of the interrupted save is removed on the next start. Restoring takes the
target's shardings from the abstract state, so a checkpoint can be restored onto another mesh.
"""

from __future__ import annotations

import json
import os

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from cogvideox_jax import weights


def manager(directory: str, *, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
    )
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "data", "meta"))


def save(mngr: ocp.CheckpointManager, step: int, state, data_iter, meta=None) -> None:
    """Start saving `state`, the iterator position and `meta` (a JSON dict, optional) at `step`
    (returns before it is done)."""
    items = dict(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter)
    )
    if meta is not None:
        items["meta"] = ocp.args.JsonSave(meta)
    mngr.save(step, args=ocp.args.Composite(**items))


def restore_or_init(
    mngr: ocp.CheckpointManager,
    abstract_state,
    data_iter,
    *,
    init_checkpoint: str,
    load_pretrained,
    random_init,
):
    """The train state to start from, and where it came from. First match wins:

    1. The latest checkpoint in the workdir: everything (parameters, optimiser state, EMA, step,
       RNG and the data iterator, which is restored in place). Resuming always wins, so a
       restarted job continues instead of starting over.
    2. `init.checkpoint` (a diffusers or Orbax transformer folder): its weights, a fresh
       optimiser, step 0.
    3. A random initialisation from `seed`.

    `abstract_state` carries the target shardings (the restore may be onto another mesh).
    """
    step = mngr.latest_step()
    if step is not None:
        restored = mngr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=grain.checkpoint.CheckpointRestore(data_iter),
            ),
        )
        return restored["state"], f"resumed from step {step} of {mngr.directory}"
    if init_checkpoint:
        return load_pretrained(init_checkpoint), f"initialised from {init_checkpoint}"
    return random_init(), "random initialisation"


def restore_state(mngr: ocp.CheckpointManager, step: int, abstract_state):
    """Only the train state of checkpoint `step` (for evaluation)."""
    restored = mngr.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
    )
    return restored["state"]


def abstract(tree, shardings):
    """ShapeDtypeStructs of `tree` carrying `shardings` (the restore target)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def step_folder(path: str, step: int | None = None) -> str:
    """A step folder of a run: `path` itself (holding `state/`), or step `step` (default: the
    latest) of a checkpoints folder or of a workdir (holding `checkpoints/`)."""
    if os.path.isdir(os.path.join(path, "state")):
        if step is not None and os.path.basename(os.path.normpath(path)) != str(step):
            raise ValueError(f"{path} is the step folder {os.path.basename(path)}, not step {step}")
        return path
    folder = (
        os.path.join(path, "checkpoints")
        if os.path.isdir(os.path.join(path, "checkpoints"))
        else path
    )
    steps = [int(d) for d in os.listdir(folder) if d.isdigit()] if os.path.isdir(folder) else []
    if not steps:
        raise FileNotFoundError(
            f"{path}: no training checkpoint (a workdir, its checkpoints/ or a step folder)"
        )
    if step is not None and step not in steps:
        raise FileNotFoundError(f"{path}: no checkpoint of step {step} (it has {sorted(steps)})")
    return os.path.join(folder, str(max(steps) if step is None else step))


def read_meta(step: str) -> dict:
    """The `meta` JSON of a step folder: what the run was (`Program.checkpoint_meta`)."""
    meta_file = os.path.join(step, "meta", "metadata")
    if not os.path.isfile(meta_file):
        raise ValueError(
            f"{step}: the checkpoint does not record its model (no meta/): it was written before "
            "checkpoints recorded it; a resumed run's next checkpoint will"
        )
    with open(meta_file) as f:
        return json.load(f)


def read_weights(step: str, *, ema: bool = False) -> dict:
    """{'/'-path: host array} of a step folder's trained weights: the parameters (or their EMA
    with `ema`) and, in a full run, the buffers; read to host memory without the mesh they were
    trained on, and without the optimiser state."""
    ckptr = ocp.PyTreeCheckpointer()
    path = os.path.join(step, "state")
    tree = ckptr.metadata(path).item_metadata.tree
    key = "ema" if ema else "params"
    if not tree.get(key):
        raise ValueError(f"{step}: the checkpoint holds no {key!r} (EMA is off in this run)")
    keys = [k for k in (key, "buffers") if tree.get(k)]
    item = {k: tree[k] for k in keys}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    state = ckptr.restore(
        path,
        args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
    )
    return {k: v for part in keys for k, v in weights.flatten(state[part]).items()}


def read_lora(path: str, *, ema: bool = False):
    """(meta, {'/'-path: host array}) of a LoRA run's checkpoint: the adapters (or their EMA),
    read to host memory without the mesh they were trained on."""
    folder = step_folder(path)
    meta = read_meta(folder)
    if "lora" not in meta:
        raise ValueError(f"{folder}: not a LoRA run's checkpoint (its meta names no adapters)")
    return meta, read_weights(folder, ema=ema)
