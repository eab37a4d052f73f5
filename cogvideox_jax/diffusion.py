"""CogVideoX noise schedule, v-prediction helpers and the two samplers, shared by training and
sampling.

Must match diffusers 0.42.1 `schedulers/scheduling_ddim_cogvideox.py` (CogVideoXDDIMScheduler)
and `scheduling_dpm_cogvideox.py` (CogVideoXDPMScheduler, SDE-DPM-Solver++(2M)).

Schedule: scaled-linear betas, SNR divided by `snr_shift_scale`, then rescaled to zero terminal
SNR (so alpha_bar[999] = 0 exactly), all in float64. Sampling schedules are static, so every
per-step scalar (including DPM's, which pass through +-inf at both ends) is computed on the host
in float64 and rounded once to float32, as diffusers' float64 scalars are when they multiply
float32 tensors. The denoising loop then only indexes these tables.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

# scheduler_config.json keys CogVideoX's schedulers set, at the only values supported here.
FIXED_SCHEDULER_KEYS = {
    "beta_schedule": "scaled_linear",
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "set_alpha_to_one": True,
    "timestep_spacing": "trailing",
    "steps_offset": 0,
}


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """The noise schedule's parameters, named as in diffusers' scheduler_config.json."""

    snr_shift_scale: float = 1.0
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012

    @classmethod
    def from_diffusers(cls, config: Mapping) -> ScheduleConfig:
        """From a CogVideoX scheduler_config.json (DDIM or DPM: they share the keys)."""
        for key, want in FIXED_SCHEDULER_KEYS.items():
            if key in config and config[key] != want:
                raise ValueError(
                    f"scheduler_config.json: {key}={config[key]!r} is not supported (only {want!r})"
                )
        return cls(
            snr_shift_scale=float(config.get("snr_shift_scale", 3.0)),
            num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
            beta_start=float(config.get("beta_start", 0.00085)),
            beta_end=float(config.get("beta_end", 0.012)),
        )

    def to_diffusers(self) -> dict:
        """A CogVideoXDDIMScheduler scheduler_config.json of this schedule (the keys
        `from_diffusers` fixes at the only values it supports)."""
        return {
            "_class_name": "CogVideoXDDIMScheduler",
            **FIXED_SCHEDULER_KEYS,
            "clip_sample": False,
            **dataclasses.asdict(self),
        }


def alphas_cumprod(cfg: ScheduleConfig) -> np.ndarray:
    """alpha_bar[t], t = 0..T-1, float64."""
    n = cfg.num_train_timesteps
    betas = np.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=np.float64) ** 2
    ab = np.cumprod(1.0 - betas)
    ab = ab / (cfg.snr_shift_scale + (1 - cfg.snr_shift_scale) * ab)  # SNR / snr_shift_scale
    # Zero terminal SNR (Lin et al. 2023, Algorithm 1): shift and scale sqrt(alpha_bar).
    a = np.sqrt(ab)
    a0, a_last = a[0], a[-1]
    a = (a - a_last) * a0 / (a0 - a_last)
    return a**2


def inference_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> np.ndarray:
    """ "trailing" spacing: 999, 979, ..., 19 for 50 steps (int64)."""
    if not 0 < num_steps <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps must be in 1..{num_train_timesteps}, got {num_steps}"
        )
    ratio = num_train_timesteps / num_steps
    return np.round(np.arange(num_train_timesteps, 0, -ratio)).astype(np.int64) - 1


def _prev_alpha(ab: np.ndarray, t: np.ndarray, num_steps: int) -> np.ndarray:
    # Both diffusers samplers step to t - T // N, whatever the spacing (and 1.0 below zero).
    prev = t - len(ab) // num_steps
    return np.where(prev >= 0, ab[np.maximum(prev, 0)], 1.0)


# Training-time helpers (dynamic timesteps). Like diffusers, alpha_bar is cast to the input
# dtype before the square roots.


def _coefs(ab: jax.Array, t: jax.Array, like: jax.Array):
    a = jnp.asarray(ab)[t].astype(like.dtype)  # t's shape: (B,), or (B, V) per token
    a = a.reshape(a.shape + (1,) * (like.ndim - a.ndim))  # broadcast over like's other axes
    return jnp.sqrt(a), jnp.sqrt(1 - a)


def add_noise(x0: jax.Array, noise: jax.Array, t: jax.Array, ab) -> jax.Array:
    """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise.

    Args:
      x0, noise: clean latents and noise of one shape, e.g. (B, T, H, W, C), or packed rows'
        tokens (B, V, P).
      t: integer timesteps whose shape leads x0's: per sample (B,), or per token (B, V).
      ab: alpha_bar (num_train_timesteps,), `alphas_cumprod`.
    """
    sa, sb = _coefs(ab, t, x0)
    return sa * x0 + sb * noise


def velocity(x0: jax.Array, noise: jax.Array, t: jax.Array, ab) -> jax.Array:
    """The v-prediction target sqrt(ab_t) noise - sqrt(1 - ab_t) x0 (arguments as
    `add_noise`)."""
    sa, sb = _coefs(ab, t, x0)
    return sa * noise - sb * x0


# Samplers. Each step function takes one row of its coefficient table.


def ddim_table(ab: np.ndarray, num_steps: int) -> dict[str, np.ndarray]:
    """Per-step DDIM (eta 0) scalars for the trailing schedule, float32 (N,) each."""
    t = inference_timesteps(num_steps, len(ab))
    a_t, a_prev = ab[t], _prev_alpha(ab, t, num_steps)
    c = np.sqrt((1 - a_prev) / (1 - a_t))
    table = dict(
        sa=np.sqrt(a_t), sb=np.sqrt(1 - a_t), c_x=c, c_x0=np.sqrt(a_prev) - np.sqrt(a_t) * c
    )
    return {k: v.astype(np.float32) for k, v in table.items()} | {"t": t}


def ddim_step(row, v: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x_prev, x0) from the latents `x` and the v-prediction `v` (one shape) at the step whose
    `ddim_table` row is `row`."""
    x0 = row["sa"] * x - row["sb"] * v
    return row["c_x"] * x + row["c_x0"] * x0, x0


def dpm_table(ab: np.ndarray, num_steps: int) -> dict[str, np.ndarray]:
    """Per-step SDE-DPM-Solver++(2M) scalars, computed in float64 with its infinities."""
    t = inference_timesteps(num_steps, len(ab))
    a_t, a_prev = ab[t], _prev_alpha(ab, t, num_steps)
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = np.log(np.sqrt(a_t / (1 - a_t)))  # -inf at alpha_bar = 0
        lam_next = np.log(np.sqrt(a_prev / (1 - a_prev)))  # +inf at alpha_bar = 1
        h = lam_next - lam
        # The previous (larger) timestep of the schedule; none at the first step.
        lam_back = np.concatenate([[np.nan], lam[:-1]])
        r = (lam - lam_back) / h
        table = dict(
            sa=np.sqrt(a_t),
            sb=np.sqrt(1 - a_t),
            m1=np.sqrt((1 - a_prev) / (1 - a_t)) * np.exp(-h),
            m2=np.expm1(-2 * h) * np.sqrt(a_prev),
            m3=1 + 1 / (2 * r),
            m4=1 / (2 * r),
            m_noise=np.sqrt(1 - a_prev) * np.sqrt(1 - np.exp(-2 * h)),
        )
    prev = t - len(ab) // num_steps
    # First order at the first step (no previous x0) and when stepping past t = 0.
    second = (np.arange(num_steps) > 0) & (prev >= 0)
    table = {k: np.where(second | (k not in ("m3", "m4")), v, 0.0) for k, v in table.items()}
    return {k: v.astype(np.float32) for k, v in table.items()} | {"second": second, "t": t}


def dpm_step(row, v, x, old_x0, noise) -> tuple[jax.Array, jax.Array]:
    """(x_prev, x0) as `ddim_step`, for a `dpm_table` row; `old_x0` is the previous step's x0
    (unused on first-order steps), `noise` the draw diffusers uses for the returned sample (its
    second draw on second-order steps, the first on first-order ones)."""
    x0 = row["sa"] * x - row["sb"] * v
    d = jnp.where(row["second"], row["m3"] * x0 - row["m4"] * old_x0, x0)
    return row["m1"] * x - row["m2"] * d + row["m_noise"] * noise, x0


def dynamic_cfg_scales(guidance_scale: float, num_steps: int) -> np.ndarray:
    """diffusers' use_dynamic_cfg weights, (num_steps,) float64; like diffusers (and SAT as
    called) it uses the timestep value, not the step index, in the power, so the weights
    oscillate."""
    t = inference_timesteps(num_steps).astype(np.float64)
    return 1 + guidance_scale * ((1 - np.cos(np.pi * ((num_steps - t) / num_steps) ** 5.0)) / 2)
