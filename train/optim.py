"""AdamW with warm-up and decay, clipping, gradient accumulation and an optional EMA.

The CogVideoX recipe (paper App. A; SAT sft.yaml): AdamW b1 0.9, b2 0.95, eps 1e-8, weight decay
1e-4 except on biases and norm scales, global-norm clipping, cosine (pretraining) or linear (SAT
SFT) decay after a linear warm-up. SAT's FusedEmaAdam keeps an EMA with decay
min(decay, (1 + n) / (10 + n)); `ema_update` is that rule.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def lr_schedule(cfg, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to cfg.lr, then cosine or linear decay to lr * end_lr_factor."""
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    end = cfg.lr * cfg.end_lr_factor
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.end_lr_factor)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, end, decay_steps)
    elif cfg.schedule == "constant":
        decay = optax.constant_schedule(cfg.lr)
    else:
        raise ValueError(f"optim.schedule must be cosine, linear or constant, got {cfg.schedule!r}")
    warmup = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def decay_mask(params):
    """True for weights that take weight decay: matrices and kernels, not biases or norm scales
    (SAT's get_params_for_weight_decay_optimization). Stacked blocks add one leading axis."""

    def mask(path, x):
        name = str(getattr(path[-1], "key", path[-1]))
        stacked = any(str(getattr(p, "key", p)) == "transformer_blocks" for p in path)
        return x.ndim - int(stacked) >= 2 and "bias" not in name and name != "scale"

    return jax.tree_util.tree_map_with_path(mask, params)


def make_optimizer(cfg, total_steps: int):
    """(optax transform, lr schedule). Gradient accumulation happens inside the train step (a
    scan over micro-batches), so one optimiser update is one step."""
    schedule = lr_schedule(cfg, total_steps)
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity(),
        optax.adamw(
            schedule,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        ),
    )
    return tx, schedule


def ema_update(ema, params, step: jax.Array, decay: float):
    """One EMA step with SAT's warm-up: d = min(decay, (1 + n) / (10 + n)), n the update count."""
    n = step.astype(jnp.float32)
    d = jnp.minimum(decay, (1.0 + n) / (10.0 + n))
    return jax.tree.map(
        lambda e, p: (d * e + (1 - d) * p.astype(e.dtype)).astype(e.dtype), ema, params
    )
