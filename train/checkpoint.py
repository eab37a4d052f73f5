"""Training checkpoints: one Orbax CheckpointManager step holds the whole train state
(parameters, optimiser state, EMA, step, RNG) and the Grain iterator's position; a LoRA run's
steps also hold `meta` (JSON: the adapters' config and the transformer's), so that a checkpoint
exports on its own (`tools.convert lora-to-diffusers`).

Saves are asynchronous and atomic (Orbax writes to a temporary folder and renames it on commit),
so a process killed at any moment, even mid-save, leaves the previous checkpoints intact; the
temporary folder of the interrupted save is removed on the next start. Restoring takes the
target's shardings from the abstract state, so a checkpoint can be restored onto another mesh.

A checkpoint damaged after its commit (a truncated or lost file, a disk or copy fault) is found
in two ways. Before the manager opens, every step folder gets a cheap structural check (`damage`:
Orbax's and Grain's metadata files present and parseable, every item folder there); one that
fails is moved to `checkpoints/damaged/STEP` (a name Orbax does not take for a step) with a line
saying why, so that Orbax only sees, keeps and counts (`ckpt.keep`) intact steps and its retention
never deletes the last intact one in favour of damaged newer ones. Then the restore itself
(`restore_newest`) goes from the newest step down: a step whose restore fails (a truncated tensor
file passes the structural check) is moved aside the same way once an older step has restored.
If no step restores, nothing is moved and the run stops with every step's error: a fault common
to all of them (storage, memory, a config that does not fit the checkpoints) is likelier than
every step being damaged. `ckpt.step=N` (0: the newest intact step) pins the step: N itself is
never moved, and a damaged or absent N stops the run with what is wrong.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from cogvideox_jax import weights

DAMAGED = "damaged"  # checkpoints/damaged/STEP: steps that cannot be resumed from, moved aside
DATA_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")  # Grain's iterator position, per process


def manager(
    directory: str, *, keep: int, async_save: bool = True, step: int = 0
) -> ocp.CheckpointManager:
    """The Orbax manager of the checkpoints in `directory`, opened once its damaged steps are
    moved aside (`set_aside_damaged`; `step`: the pinned ckpt.step, 0: none)."""
    set_aside_damaged(directory, pinned=step)
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
    step: int = 0,
):
    """The train state to start from, and where it came from. First match wins:

    1. The newest intact checkpoint in the workdir (`restore_newest`), or step `step` (ckpt.step)
       when it is pinned: everything (parameters, optimiser state, EMA, step, RNG and the data
       iterator, which is restored in place). Resuming always wins, so a restarted job continues
       instead of starting over.
    2. `init.checkpoint` (a diffusers or Orbax transformer folder): its weights, a fresh
       optimiser, step 0.
    3. A random initialisation from `seed`.

    `abstract_state` carries the target shardings (the restore may be onto another mesh). A
    pinned step must be the newest: the run's next saves would collide with newer steps (Orbax
    skips saves at or below its latest step).
    """
    newer = [s for s in mngr.all_steps() if step and s > step]
    if newer:
        raise ValueError(
            f"ckpt.step={step}: {mngr.directory} holds newer checkpoints (steps {sorted(newer)}), "
            f"which a run resumed from step {step} could not save over: move them out of that "
            f"folder, or set ckpt.step=0 to resume from step {max(newer)}"
        )
    if mngr.latest_step() is not None:
        restore = functools.partial(_restore_train, mngr, abstract_state, data_iter)
        step, state = restore_newest(mngr, restore, pinned=step)
        return state, f"resumed from step {step} of {mngr.directory}"
    if init_checkpoint:
        return load_pretrained(init_checkpoint), f"initialised from {init_checkpoint}"
    return random_init(), "random initialisation"


def _restore_train(mngr: ocp.CheckpointManager, abstract_state, data_iter, step: int):
    """Step `step`'s train state, and its iterator position into `data_iter`. The state comes
    first and alone: a failed restore then leaves `data_iter` as it was (Grain's handler reads and
    parses the position before it sets it)."""
    folder = os.path.join(str(mngr.directory), str(step), "data")
    saved = {int(m.group(2)) for m in map(DATA_FILE.fullmatch, os.listdir(folder)) if m}
    moved = jax.process_count() not in saved  # resumed with another process count
    position = _shared_position(folder, saved) if moved else None
    state = restore_state(mngr, step, abstract_state)
    if not moved:
        data = grain.checkpoint.CheckpointRestore(data_iter)
        mngr.restore(step, args=ocp.args.Composite(data=data))
        return state
    data_iter.set_state(position)
    if hasattr(data_iter, "start_prefetch"):  # as Grain's own restore does
        data_iter.start_prefetch()
    if jax.process_index() == 0:
        print(
            f"data position of step {step}: saved by {max(saved)} process(es), one position "
            f"for all; restored on {jax.process_count()}",
            flush=True,
        )
    return state


def _shared_position(folder: str, saved: set[int]) -> dict:
    """The iterator position that every process of the run that saved `folder` held, for a run
    with another process count. Bucketed and packed batches alike give every process the same
    position (each walks the same plan of global batches and loads its rows of each)."""
    count = max(saved)
    states = []
    for i in range(count):
        path = os.path.join(folder, f"process_{i}-of-{count}.json")
        with open(path) as f:
            states.append(json.load(f))
    if any(s != states[0] for s in states[1:]):
        raise ValueError(
            f"its data position was saved by {count} process(es) at different positions, this "
            f"run has {jax.process_count()}: resume it with {count} processes"
        )
    return states[0]


def restore_state(mngr: ocp.CheckpointManager, step: int, abstract_state):
    """Only the train state of checkpoint `step` (for evaluation)."""
    restored = mngr.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
    )
    return restored["state"]


def restore_newest(mngr: ocp.CheckpointManager, restore, *, pinned: int = 0):
    """(step, restore(step)) of the newest step that restores, or of step `pinned` (ckpt.step)
    alone. Steps newer than the one that restored, whose restore failed, are moved to damaged/
    (a line each, with the error); if none restores, or the pinned one does not, a ValueError
    says why and nothing is moved. In a multi-process run a step restores only if it restores on
    every process (a file only one process reads may be the damaged one): all processes agree
    on each step, so they resume from the same one."""
    directory = str(mngr.directory)
    if pinned:
        restored, why = _attempt(restore, pinned)
        if why is not None:
            folder = os.path.join(directory, str(pinned))
            raise ValueError(f"ckpt.step={pinned}: {folder} cannot be restored: {why}")
        return pinned, restored
    failed = []
    for step in sorted(mngr.all_steps(), reverse=True):
        restored, why = _attempt(restore, step)
        if why is not None:  # a damaged step, or a fault of them all: decided below
            failed.append((step, why))
            continue
        if failed:
            if jax.process_index() == 0:
                for bad, why in failed:
                    _move_aside(directory, bad, f"its restore failed: {why}")
            _sync("checkpoint.restore_newest")
            mngr.reload()
        return step, restored
    errors = "; ".join(f"step {s}: {why}" for s, why in failed)
    raise ValueError(
        f"no checkpoint in {directory} could be restored ({errors}); if they are damaged, move "
        "them out of that folder to start over"
    )


def _attempt(restore, step: int):
    """(restore(step), None), or (None, why it failed here or on another process)."""
    try:
        restored, why = restore(step), None
    except Exception as e:
        _quiet_aborted_reads()
        restored, why = None, _why(e)
        if jax.process_index() > 0:  # process 0 reports for all; this one says what it met
            print(
                f"process {jax.process_index()}: checkpoint step {step} cannot be restored "
                f"here: {why}",
                file=sys.stderr,
                flush=True,
            )
    failed_on = _failed_processes(why is not None)
    if why is None and failed_on:
        why = f"process(es) {failed_on} could not read it (their logs say why)"
    return (None, why) if failed_on else (restored, None)


def _failed_processes(failed: bool) -> list[int]:
    """The processes (of all) where `failed` is true: one all-gather in a multi-process run."""
    if jax.process_count() == 1:
        return [0] if failed else []
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.int32(failed))
    return [int(i) for i in np.flatnonzero(np.asarray(flags).reshape(-1))]


# ---- Damaged steps ----


def set_aside_damaged(directory: str, *, pinned: int = 0) -> None:
    """Move every step folder of `directory` that fails the structural check (`damage`) to
    `directory/damaged/`, a line each (process 0 moves, the other processes wait for it). The
    pinned step (ckpt.step; 0: none) is never moved: absent or damaged, it is a ValueError."""
    steps = _steps(directory)
    if pinned:
        folder = os.path.join(directory, str(pinned))
        if pinned not in steps:
            aside = os.path.join(directory, DAMAGED, str(pinned))
            moved = f"; it was found damaged and moved to {aside}" if os.path.isdir(aside) else ""
            raise ValueError(
                f"ckpt.step={pinned}: there is no {folder} (the checkpoints there: steps "
                f"{sorted(steps)}{moved})"
            )
        why = damage(folder)
        if why:
            raise ValueError(f"ckpt.step={pinned}: {folder} is damaged: {why}")
    if jax.process_index() == 0:
        for step in steps:
            why = damage(os.path.join(directory, str(step)))
            if why:
                _move_aside(directory, step, why)
    _sync("checkpoint.set_aside_damaged")


def damage(folder: str) -> str | None:
    """What is wrong with the step folder `folder` (None: it looks intact), read from its small
    files only: Orbax's step metadata names the items and each item's folder is there; the state's
    tree metadata parses and its OCDBT manifests are there; Grain's iterator positions parse, one
    per process of the run that saved them; the `meta` JSON parses. Tensor data is not read (the
    restore finds a truncated tensor file)."""
    try:
        items = _json(folder, "_CHECKPOINT_METADATA").get("item_handlers") or {}
        for item in ("state", "data"):
            if item not in items:
                return f"_CHECKPOINT_METADATA names no {item!r} item"
        for item in items:
            if not os.path.isdir(os.path.join(folder, item)):
                return f"its {item}/ folder is missing"
        if not isinstance(_json(folder, "state/_METADATA").get("tree_metadata"), dict):
            return "state/_METADATA holds no tree_metadata"
        state = os.path.join(folder, "state")
        shards = sorted(d for d in os.listdir(state) if d.startswith("ocdbt.process_"))
        if shards or os.path.exists(os.path.join(state, "manifest.ocdbt")):  # OCDBT's index
            for manifest in ["manifest.ocdbt", *(f"{d}/manifest.ocdbt" for d in shards)]:
                path = os.path.join(state, manifest)
                if not os.path.isfile(path) or not os.path.getsize(path):
                    return f"state/{manifest} is missing or empty"
        why = _data_damage(folder)
        if why is None and "meta" in items:
            _json(folder, "meta/metadata")
        return why
    except _Unreadable as e:
        return str(e)


def _data_damage(folder: str) -> str | None:
    """What is wrong with the Grain iterator positions of a step folder (None: nothing)."""
    names = os.listdir(os.path.join(folder, "data"))
    found = {n: (int(m.group(1)), int(m.group(2))) for n in names if (m := DATA_FILE.fullmatch(n))}
    counts = {count for _, count in found.values()}
    if len(counts) != 1:
        return (
            f"data/ holds the iterator positions of runs of {sorted(counts)} processes"
            if counts
            else "data/ holds no iterator position (process_I-of-N.json)"
        )
    (count,) = counts
    missing = sorted(set(range(count)) - {index for index, _ in found.values()})
    if missing:
        return f"data/ lacks the iterator position of process(es) {missing} of {count}"
    for name in found:
        _json(folder, f"data/{name}")
    return None


class _Unreadable(Exception):
    """A small file of a step folder that is missing or does not parse (its message says which)."""


def _json(folder: str, name: str) -> dict:
    """The JSON object in `folder/name`, or _Unreadable saying what is wrong with it."""
    path = os.path.join(folder, name)
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        raise _Unreadable(f"{name} is missing") from None
    except OSError as e:
        raise _Unreadable(f"{name} cannot be read ({e.strerror})") from None
    try:
        value = json.loads(text)
    except ValueError:
        size = "empty" if not text.strip() else f"{len(text)} bytes, not valid JSON"
        raise _Unreadable(f"{name} does not parse ({size})") from None
    if not isinstance(value, dict):
        raise _Unreadable(f"{name} holds no JSON object")
    return value


def _steps(directory: str) -> list[int]:
    """The step folders of `directory` (digits only: no temporary folder of a save)."""
    if not os.path.isdir(directory):
        return []
    names = os.listdir(directory)
    return [int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(directory, n))]


def _move_aside(directory: str, step: int, why: str) -> None:
    """Move step folder `step` to directory/damaged/STEP (STEP-2, ... if taken), with a line on
    the console and the reason in its DAMAGED.txt; process 0 only."""
    root = os.path.join(directory, DAMAGED)
    os.makedirs(root, exist_ok=True)
    dest, n = os.path.join(root, str(step)), 1
    while os.path.exists(dest):
        n += 1
        dest = os.path.join(root, f"{step}-{n}")
    os.rename(os.path.join(directory, str(step)), dest)
    with open(os.path.join(dest, "DAMAGED.txt"), "w") as f:
        f.write(why + "\n")
    print(f"checkpoint step {step} is damaged ({why}): moved it to {dest}", flush=True)


def _why(e: BaseException) -> str:
    """One line on why a restore failed: its innermost cause (TensorStore's error, not Orbax's
    wrapper around it that spells out the whole TensorStore spec)."""
    while e.__cause__ is not None:
        e = e.__cause__
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _quiet_aborted_reads() -> None:
    """After a failed restore, the TensorStore reads still in flight finish on Orbax's closed
    event loop, and Orbax turns the closing of its abandoned readers into exceptions; Python would
    print each as an unraisable exception, a screenful of tracebacks at any moment up to the
    process's exit (as unraisable exceptions, or printed by TensorStore's threads through
    sys.excepthook). From the first failed restore on, those two kinds (only) are dropped."""
    previous = sys.unraisablehook
    if getattr(previous, "quiet_aborted_reads", False):
        return

    def aborted(e) -> bool:
        text = str(e)
        return text == "Event loop is closed" or text.startswith(_ORBAX_READ_ERROR)

    def hook(unraisable):
        if not aborted(unraisable.exc_value):
            previous(unraisable)

    hook.quiet_aborted_reads = True
    sys.unraisablehook = hook
    # TensorStore's callback threads print theirs through sys.excepthook (PyErr_Print).
    printed = sys.excepthook

    def excepthook(kind, value, tb):
        if not aborted(value):
            printed(kind, value, tb)

    sys.excepthook = excepthook


_ORBAX_READ_ERROR = "Encountered error while reading array index"


def _sync(name: str) -> None:
    """Wait for every process of a multi-process run (after process 0 moved folders)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def abstract(tree, shardings):
    """ShapeDtypeStructs of `tree` carrying `shardings` (the restore target)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def step_folder(path: str, step: int | None = None) -> str:
    """A step folder of a run: `path` itself (holding `state/`), or step `step` (default: the
    newest that passes the structural check, `damage`) of a checkpoints folder or of a workdir
    (holding `checkpoints/`); a named step that fails it is a ValueError with the reason."""
    if os.path.isdir(os.path.join(path, "state")):
        if step is not None and os.path.basename(os.path.normpath(path)) != str(step):
            raise ValueError(f"{path} is the step folder {os.path.basename(path)}, not step {step}")
        return path
    folder = (
        os.path.join(path, "checkpoints")
        if os.path.isdir(os.path.join(path, "checkpoints"))
        else path
    )
    steps = _steps(folder)
    if not steps:
        raise FileNotFoundError(
            f"{path}: no training checkpoint (a workdir, its checkpoints/ or a step folder)"
        )
    if step is not None and step not in steps:
        raise FileNotFoundError(f"{path}: no checkpoint of step {step} (it has {sorted(steps)})")
    if step is not None:
        why = damage(os.path.join(folder, str(step)))
        if why:
            raise ValueError(f"{os.path.join(folder, str(step))} is damaged: {why}")
        return os.path.join(folder, str(step))
    for newest in sorted(steps, reverse=True):  # the newest intact one; nothing is moved here
        why = damage(os.path.join(folder, str(newest)))
        if not why:
            return os.path.join(folder, str(newest))
        print(f"checkpoint step {newest} of {folder} is damaged ({why}): skipped", flush=True)
    raise FileNotFoundError(f"{path}: every checkpoint is damaged (steps {sorted(steps)})")


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
