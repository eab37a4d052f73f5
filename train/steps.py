"""The trainer's pure steps: one optimiser update (`train_step`) and the held-out loss of one
batch (`eval_step`).

Module-level pure functions of pure dicts, the Flax NNX examples' shape: the transformer is
rebuilt inside from its graph definition and parameter dicts (`Model.merge`), so `jax.jit` sees
arrays only. train/program.py binds their keyword arguments and jits them.

The train state is a dict: params (the trained parameters), opt_state, ema (empty without EMA),
buffers (the model's non-trained tensors in a full run; empty in a LoRA run, whose frozen base
is `Frozen.base`), step and rng. A step's randomness is fold_in(rng, step).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from cogvideox_jax import sharding
from train import optim


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Frozen:
    """The step's inputs that never train (pytree leaves: arrays)."""

    vae: Any = None  # I2V: the frozen VAE as nnx.split's (graphdef, state)
    base: Any = None  # LoRA: the frozen base model, a pure dict


@dataclasses.dataclass(frozen=True)
class Model:
    """How to rebuild the transformer from pure dicts: its graph definition and the abstract
    (trained, rest) nnx.States that give the Variable structure."""

    graphdef: Any
    templates: tuple[nnx.State, nnx.State]

    def merge(self, params: dict, fixed: dict):
        """The transformer with trained `params` and the rest (`fixed`: buffers, LoRA base)."""
        p, b = jax.tree.map(lambda x: x, self.templates)
        nnx.replace_by_pure_dict(p, params)
        nnx.replace_by_pure_dict(b, fixed)
        return nnx.merge(self.graphdef, p, b)


@dataclasses.dataclass(frozen=True)
class Update:
    """How gradients become an update."""

    tx: optax.GradientTransformation
    grad_accum_steps: int  # micro-batches of B / grad_accum_steps rows, gradients averaged
    ema_decay: float  # 0: no EMA
    skip_nonfinite: bool  # a non-finite loss or gradient keeps the old weights


def loss_fn(params, fixed, inputs, *, model: Model, objective, ab) -> tuple[jax.Array, dict]:
    """The objective's loss of prepared `inputs` for the transformer of (params, fixed), and its
    sums over images and clips (objective.modality_parts)."""
    return objective.loss_parts(model.merge(params, fixed), inputs, ab)


def train_step(state, batch, frozen: Frozen, *, model, training, objective, update, ab):
    """One optimiser update -> (new state, outputs): loss, grad_norm, finite and the objective's
    `step_outputs` (packed rows: what the host counts tokens from)."""
    key = jax.random.fold_in(state["rng"], state["step"])
    vae = None if frozen.vae is None else nnx.merge(*frozen.vae)
    inputs = objective.prepare(batch, key, vae, train=True)
    grad_fn = jax.value_and_grad(
        functools.partial(loss_fn, model=model, objective=objective, ab=ab), has_aux=True
    )
    loss, parts, grads = _gradients(
        grad_fn, state["params"], training.fixed(state, frozen), inputs, update
    )
    updates, opt_state = update.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = dict(state, params=params, opt_state=opt_state, step=state["step"] + 1)
    if update.ema_decay > 0:
        new["ema"] = optim.ema_update(state["ema"], params, state["step"], update.ema_decay)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if update.skip_nonfinite:  # keep the old weights and optimiser state; the step still counts
        kept = {k: new[k] for k in ("params", "opt_state", "ema")}
        old = {k: state[k] for k in kept}
        new.update(jax.tree.map(lambda n, o: jnp.where(finite, n, o), kept, old))
    out = {"loss": loss, "grad_norm": grad_norm, "finite": finite} | parts
    return new, out | objective.step_outputs(batch)


def _gradients(grad_fn, params, fixed, inputs, update: Update):
    """(loss, its modality sums, gradients) of the whole batch, in `update.grad_accum_steps`
    micro-batches: the loss and gradients averaged over them, the sums added up."""
    a = update.grad_accum_steps
    if a == 1:
        (loss, parts), grads = grad_fn(params, fixed, inputs)
        return loss, parts, grads

    def micro(acc, mb):
        (loss, parts), grads = grad_fn(params, fixed, mb)
        return jax.tree.map(jnp.add, acc, (loss, parts, grads)), None

    # Micro-batch i takes rows i, i + a, i + 2a, ...: each data shard's block of rows holds its
    # share of every micro-batch, so slicing one out is local (contiguous micro-batches made XLA
    # move the whole batch between shards with an all-to-all before the loop).
    split = jax.tree.map(
        lambda x: sharding.constrain(
            jnp.swapaxes(x.reshape(x.shape[0] // a, a, *x.shape[1:]), 0, 1),
            (None, "batch") + (None,) * (x.ndim - 1),
        ),
        inputs,
    )
    zero = jax.eval_shape(lambda: grad_fn(params, fixed, jax.tree.map(lambda x: x[0], split)))
    zero = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), (zero[0][0], zero[0][1], params))
    (loss, parts, grads), _ = jax.lax.scan(micro, zero, split)
    return loss / a, parts, jax.tree.map(lambda x: x / a, grads)


def eval_step(
    params, fixed, batch, index, frozen: Frozen, *, model, objective, ab, timesteps, seed
):
    """Held-out loss (len(timesteps),) of one batch at each fixed timestep, with noise fixed by
    (seed, batch index): deterministic, so comparable across runs and checkpoints."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), index)
    vae = None if frozen.vae is None else nnx.merge(*frozen.vae)
    inputs = objective.prepare(batch, key, vae, train=False)
    losses = [
        loss_fn(
            params,
            fixed,
            objective.with_timestep(inputs, t),
            model=model,
            objective=objective,
            ab=ab,
        )[0]
        for t in timesteps
    ]
    return jnp.stack(losses)
