"""Held-out evaluation: the diffusion loss at fixed timesteps with fixed noise.

Every eval batch uses the same noise (seeded by the batch index) and the same timesteps, so the
numbers are deterministic and comparable across runs and checkpoints (the paper's Table 9 reports
validation loss at t = 100..900 this way).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from data import pipeline
from train import checkpoint


class HeldOut:
    """`held_out(state)`: {'eval_loss': mean over batches and timesteps, 'eval_loss_t{t}': per
    timestep} of a train state on the held-out set ({} without one), by the program's jitted
    eval step (train/program.py) on the run's mesh. A dict of named held-out sets (a mixture's
    datasets) adds 'eval_loss_{name}' per set; 'eval_loss' is then over all their batches."""

    def __init__(self, prog, dataset, frozen):
        self.prog, self.dataset, self.frozen = prog, dataset, frozen
        self.step = prog.jit_eval_step()

    def __call__(self, state) -> dict[str, float]:
        if self.dataset is None:
            return {}
        sets = self.dataset if isinstance(self.dataset, dict) else {"": self.dataset}
        timesteps = tuple(self.prog.run.config.evals.timesteps)
        total, count, out, index = np.zeros(len(timesteps)), 0, {}, 0
        for name, dataset in sets.items():
            own, n = np.zeros(len(timesteps)), 0
            for local in dataset:  # read outside the mesh, as in training
                own += self._losses(state, local, index)
                index, n = index + 1, n + 1
            if name and n:
                out[f"eval_loss_{name}"] = float(own.mean() / n)
            total, count = total + own, count + n
        if not count:
            raise ValueError(
                "the eval set is empty: input.eval_examples must be >= evals.batch_size"
            )
        per_t = total / count
        out = {"eval_loss": float(per_t.mean())} | out
        out.update({f"eval_loss_t{t}": float(v) for t, v in zip(timesteps, per_t, strict=True)})
        return out

    def _losses(self, state, local, index) -> np.ndarray:
        run = self.prog.run
        with run.on_mesh():
            batch = pipeline.global_batch(local, run.batch_sharding, run.config.evals.batch_size)
            fixed = run.training.fixed(state, self.frozen)
            losses = self.step(state["params"], fixed, batch, index, self.frozen)
        return np.asarray(jax.device_get(losses))


def evaluate_checkpoint(
    mngr, abstract_state, held_out: HeldOut, workdir: str, *, step: int = 0
) -> dict:
    """On-demand evaluation (config.mode='eval') of the newest intact checkpoint in the workdir,
    or of step `step` (ckpt.step) when it is pinned, chosen as a training run chooses where to
    resume (checkpoint.restore_newest); appends the result to DIR/eval.jsonl and returns it."""
    if mngr.latest_step() is None:
        raise FileNotFoundError(f"config.mode='eval': no checkpoint in {mngr.directory}")
    restore = lambda s: checkpoint.restore_state(mngr, s, abstract_state)  # noqa: E731
    step, state = checkpoint.restore_newest(mngr, restore, pinned=step)
    row = {"step": step, **held_out(state)}
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "eval.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row))
    mngr.close()
    return row
