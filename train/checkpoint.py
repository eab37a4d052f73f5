"""Training checkpoints: one Orbax CheckpointManager step holds the whole train state
(parameters, optimiser state, EMA, step, RNG) and the Grain iterator's position.

Saves are asynchronous and atomic (Orbax writes to a temporary folder and renames it on commit),
so a process killed at any moment, even mid-save, leaves the previous checkpoints intact; the
temporary folder of the interrupted save is removed on the next start. Restoring takes the
target's shardings from the abstract state, so a checkpoint can be restored onto another mesh.
"""

from __future__ import annotations

import grain
import jax
import orbax.checkpoint as ocp


def manager(directory: str, *, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
    )
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "data"))


def save(mngr: ocp.CheckpointManager, step: int, state, data_iter) -> None:
    """Start saving `state` and the iterator position at `step` (returns before it is done)."""
    mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter)
        ),
    )


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
