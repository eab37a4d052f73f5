"""CogVideoX noise schedule, v-prediction helpers and the two samplers, shared by training and
sampling.

Must match diffusers 0.42.1 `schedulers/scheduling_ddim_cogvideox.py` (CogVideoXDDIMScheduler),
`scheduling_dpm_cogvideox.py` (CogVideoXDPMScheduler, SDE-DPM-Solver++(2M)), for the DDIM
sampler `scheduling_ddim.py` (DDIMScheduler), and for the DPM sampler
`scheduling_dpmsolver_multistep.py` (DPMSolverMultistepScheduler: DPM-Solver++ and
SDE-DPM-Solver++, first or second order, on the training schedule's own sigmas).

CogVideoX's schedule: scaled-linear betas, SNR divided by `snr_shift_scale`, then rescaled to
zero terminal SNR (so alpha_bar[999] = 0 exactly), all in float64. Other scheduler configs
(`ScheduleConfig.from_diffusers`) are computed in the dtype diffusers uses for them: float32,
except the CogVideoX classes' scaled-linear betas. (DPMSolverMultistepScheduler rescaled to zero
terminal SNR puts 2**-24 in alpha_bar[-1], as diffusers does, so that its sigmas stay finite.)
Sampling schedules are static, so every per-step scalar (including DPM's, which pass through
+-inf at the ends) is computed on the host in that dtype and rounded once to float32, as
diffusers' scalars are when they multiply float32 tensors. The denoising loop then only indexes
these tables.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

# The scheduler classes whose config `ScheduleConfig.from_diffusers` reads, and the defaults
# diffusers gives the keys a config leaves out (their __init__ signatures). The two CogVideoX
# classes share theirs and their schedule; DDIMScheduler has no snr_shift_scale (1.0 here).
_COGVIDEOX_DEFAULTS = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    timestep_spacing="leading",
    steps_offset=0,
    rescale_betas_zero_snr=False,
    set_alpha_to_one=True,
    clip_sample=True,
    clip_sample_range=1.0,
    snr_shift_scale=3.0,
)
MULTISTEP = "DPMSolverMultistepScheduler"
# Its solver switches (ScheduleConfig's last fields; other classes keep these values).
_SOLVER_DEFAULTS = dict(
    algorithm_type="dpmsolver++",
    solver_order=2,
    solver_type="midpoint",
    lower_order_final=True,
    euler_at_final=False,
    final_sigmas_type="zero",
)
CLASS_DEFAULTS = {
    "CogVideoXDDIMScheduler": _COGVIDEOX_DEFAULTS,
    "CogVideoXDPMScheduler": _COGVIDEOX_DEFAULTS,
    "DDIMScheduler": dict(
        _COGVIDEOX_DEFAULTS,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        snr_shift_scale=1.0,
    ),
    MULTISTEP: dict(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="epsilon",
        timestep_spacing="linspace",
        steps_offset=0,
        rescale_betas_zero_snr=False,
        **_SOLVER_DEFAULTS,
    ),
}
# DPMSolverMultistepScheduler's other arguments: only these values (its defaults) are
# implemented. Arguments not listed only act through these (dynamic_thresholding_ratio,
# sample_max_value, flow_shift, time_shift_type) and are ignored.
_MULTISTEP_FIXED = dict(
    thresholding=False,
    use_karras_sigmas=False,
    use_exponential_sigmas=False,
    use_beta_sigmas=False,
    use_lu_lambdas=False,
    use_flow_sigmas=False,
    use_dynamic_shifting=False,
    variance_type=None,
    lambda_min_clipped=-math.inf,
)
_CHOICES = dict(
    class_name=tuple(CLASS_DEFAULTS),
    beta_schedule=("linear", "scaled_linear", "squaredcos_cap_v2"),
    prediction_type=("epsilon", "v_prediction", "sample"),
    timestep_spacing=("leading", "trailing", "linspace"),
)
_SOLVER_CHOICES = dict(
    algorithm_type=("dpmsolver++", "sde-dpmsolver++"),
    solver_order=(1, 2),
    solver_type=("midpoint", "heun"),
    lower_order_final=(True, False),
    euler_at_final=(False, True),
    final_sigmas_type=("zero", "sigma_min"),
)
# The DDIM samplers' switches, which DPMSolverMultistepScheduler does not have.
_DDIM_ONLY = dict(
    snr_shift_scale=1.0, set_alpha_to_one=True, clip_sample=False, clip_sample_range=1.0
)


def _refuse(field: str, value, supported) -> ValueError:
    return ValueError(
        f"scheduler config: {field}={value!r} is not supported (supported: {supported})"
    )


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """The noise schedule's parameters, named as in diffusers' scheduler_config.json. The
    defaults are CogVideoX's released schedule (with snr_shift_scale 1.0, the 2B model's), not
    diffusers' constructor defaults; `from_diffusers` applies those.

    `class_name` decides the arithmetic: the CogVideoX classes compute the scaled-linear schedule
    in float64, shift the SNR, and step DDIM as a blend of x_t and x0 with no clipping (they
    accept `clip_sample` and ignore it, so it is kept False for them); DDIMScheduler works in
    float32, rescales the betas, and steps through x0 (clipped if `clip_sample`) and eps.
    DPMSolverMultistepScheduler has DDIMScheduler's float32 schedule (alpha_bar[-1] = 2**-24
    when rescaled) and only the DPM sampler, configured by the last six fields (which the other
    classes keep at their defaults, as it keeps the DDIM switches snr_shift_scale,
    set_alpha_to_one, clip_sample and clip_sample_range at theirs).
    """

    snr_shift_scale: float = 1.0
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "v_prediction"
    timestep_spacing: str = "trailing"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = True
    set_alpha_to_one: bool = True
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    class_name: str = "CogVideoXDDIMScheduler"
    algorithm_type: str = "dpmsolver++"
    solver_order: int = 2
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    final_sigmas_type: str = "zero"

    def __post_init__(self):
        for field, supported in _CHOICES.items():
            if getattr(self, field) not in supported:
                raise _refuse(field, getattr(self, field), supported)
        if self.num_train_timesteps < 1:
            raise _refuse("num_train_timesteps", self.num_train_timesteps, "an integer >= 1")
        if self.steps_offset < 0:
            raise _refuse("steps_offset", self.steps_offset, "an integer >= 0")
        if self.cogvideox and self.clip_sample:
            raise _refuse("clip_sample", True, f"False ({self.class_name} does not clip)")
        if not self.cogvideox and self.snr_shift_scale != 1.0:
            raise _refuse("snr_shift_scale", self.snr_shift_scale, f"1.0 for {self.class_name}")
        if self.multistep:
            for field, supported in _SOLVER_CHOICES.items():
                if getattr(self, field) not in supported:
                    raise _refuse(field, getattr(self, field), f"{supported} for {MULTISTEP}")
            for field, value in _DDIM_ONLY.items():
                if getattr(self, field) != value:
                    raise _refuse(field, getattr(self, field), f"{value!r} for {MULTISTEP}")
        else:
            for field, value in _SOLVER_DEFAULTS.items():
                if getattr(self, field) != value:
                    raise _refuse(field, getattr(self, field), f"{value!r} for {self.class_name}")

    @property
    def cogvideox(self) -> bool:
        """Whether the schedule and DDIM step follow the CogVideoX classes."""
        return self.class_name in ("CogVideoXDDIMScheduler", "CogVideoXDPMScheduler")

    @property
    def multistep(self) -> bool:
        """Whether this is a DPMSolverMultistepScheduler schedule (the DPM sampler only)."""
        return self.class_name == MULTISTEP

    @classmethod
    def from_diffusers(cls, config: Mapping) -> ScheduleConfig:
        """From a scheduler_config.json of CogVideoXDDIMScheduler, CogVideoXDPMScheduler,
        DDIMScheduler or DPMSolverMultistepScheduler (`_class_name`; CogVideoXDDIMScheduler when
        absent). Missing keys take that class's defaults; keys diffusers ignores for the class
        are ignored. Raises one ValueError naming the field (or class) for anything else."""
        name = config.get("_class_name", "CogVideoXDDIMScheduler")
        if name not in CLASS_DEFAULTS:
            raise _refuse("_class_name", name, tuple(CLASS_DEFAULTS))
        if config.get("trained_betas") is not None:
            raise _refuse("trained_betas", "<array>", "None")
        if name == "DDIMScheduler" and config.get("thresholding", False):
            raise _refuse("thresholding", config["thresholding"], "False")
        if name == MULTISTEP:
            for key, value in _MULTISTEP_FIXED.items():
                got = config.get(key, value)
                if value is None or isinstance(value, bool):
                    same = got is value
                else:  # lambda_min_clipped
                    same = isinstance(got, (int, float)) and float(got) == value
                if not same:
                    raise _refuse(key, got, f"{value!r} for {MULTISTEP}")
        kw = {k: config.get(k, v) for k, v in CLASS_DEFAULTS[name].items()}
        if name == "DDIMScheduler":
            kw["snr_shift_scale"] = 1.0  # not a DDIMScheduler argument
        elif name != MULTISTEP:
            kw["clip_sample"], kw["clip_sample_range"] = False, 1.0  # unused by its step
        for key in ("num_train_timesteps", "steps_offset", "solver_order"):
            if key in kw and (isinstance(kw[key], bool) or kw[key] != int(kw[key])):
                raise _refuse(key, kw[key], "an integer")
        for key in ("lower_order_final", "euler_at_final"):
            if key in kw and not isinstance(kw[key], bool):
                raise _refuse(key, kw[key], "true or false")
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in kw.items() if k in fields}, class_name=name)._typed()

    def _typed(self) -> ScheduleConfig:
        # JSON numbers as the dataclass's types (1 -> 1.0, 2.0 -> 2), so that equal configs
        # compare equal.
        return dataclasses.replace(
            self,
            snr_shift_scale=float(self.snr_shift_scale),
            num_train_timesteps=int(self.num_train_timesteps),
            beta_start=float(self.beta_start),
            beta_end=float(self.beta_end),
            steps_offset=int(self.steps_offset),
            rescale_betas_zero_snr=bool(self.rescale_betas_zero_snr),
            set_alpha_to_one=bool(self.set_alpha_to_one),
            clip_sample=bool(self.clip_sample),
            clip_sample_range=float(self.clip_sample_range),
            solver_order=int(self.solver_order),
        )

    def to_diffusers(self) -> dict:
        """The scheduler_config.json of this schedule for its class (`from_diffusers` reads it
        back to an equal config)."""
        out = {"_class_name": self.class_name, "thresholding": False}
        out |= {k: v for k, v in dataclasses.asdict(self).items() if k != "class_name"}
        if not self.cogvideox:
            del out["snr_shift_scale"]
        drop = _DDIM_ONLY if self.multistep else _SOLVER_DEFAULTS
        return {k: v for k, v in out.items() if k not in drop}


def _linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    # torch.linspace(dtype=float32) to the bit: a float32 step, and each value one fused
    # multiply-add from the nearer end.
    s, e = np.float32(start), np.float32(end)
    step = np.float64((e - s) / np.float32(max(n - 1, 1)))
    i = np.arange(n)
    return np.where(
        i < n // 2, np.float64(s) + step * i, np.float64(e) - step * (n - 1 - i)
    ).astype(np.float32)


def _betas(cfg: ScheduleConfig) -> np.ndarray:
    n = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        return _linspace_f32(cfg.beta_start, cfg.beta_end, n)
    if cfg.beta_schedule == "scaled_linear":
        if cfg.cogvideox:  # float64 in the CogVideoX classes only
            return np.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=np.float64) ** 2
        return _linspace_f32(cfg.beta_start**0.5, cfg.beta_end**0.5, n) ** 2
    # squaredcos_cap_v2 (Nichol & Dhariwal 2021): betas from the cosine alpha_bar, capped at
    # 0.999, in Python floats, then float32.
    abar = [math.cos((i / n + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(n + 1)]
    return np.array([min(1 - abar[i + 1] / abar[i], 0.999) for i in range(n)], np.float32)


def _cumprod(alphas: np.ndarray) -> np.ndarray:
    # torch.cumprod accumulates float32 in float64 on the CPU, rounding each output.
    return np.cumprod(alphas.astype(np.float64)).astype(alphas.dtype)


def _schedule_dtype(cfg: ScheduleConfig) -> type:
    cog64 = cfg.cogvideox and cfg.beta_schedule == "scaled_linear"
    return np.float64 if cog64 else np.float32


def alphas_cumprod(cfg: ScheduleConfig) -> np.ndarray:
    """alpha_bar[t], t = 0..T-1, float64 (holding float32 values where diffusers computes in
    float32)."""
    betas = _betas(cfg)
    if cfg.cogvideox:
        ab = _cumprod(1.0 - betas)
        ab = ab / (cfg.snr_shift_scale + (1 - cfg.snr_shift_scale) * ab)  # SNR / snr_shift_scale
        if cfg.rescale_betas_zero_snr:
            # Zero terminal SNR (Lin et al. 2023, Algorithm 1): shift and scale sqrt(alpha_bar).
            a = np.sqrt(ab)
            a0, a_last = a[0], a[-1]
            if a.dtype == np.float64:  # the order this file always used (within 1e-13 of diffusers)
                a = (a - a_last) * a0 / (a0 - a_last)
            else:  # float32: diffusers' order to the bit, as 1 - alpha_bar near t = 0 needs
                a = (a - a_last) * (a0 / (a0 - a_last))
            ab = a**2
        return ab.astype(np.float64)
    if cfg.rescale_betas_zero_snr:  # DDIMScheduler rescales the betas, in float32
        a = np.sqrt(_cumprod(1.0 - betas))
        a0, a_last = a[0], a[-1]
        a = (a - a_last) * (a0 / (a0 - a_last))
        ab = a**2
        betas = 1 - np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    ab = _cumprod(1.0 - betas)
    if cfg.multistep and cfg.rescale_betas_zero_snr:
        ab[-1] = 2.0**-24  # DPMSolverMultistepScheduler: a finite last sigma (4096)
    return ab.astype(np.float64)


def inference_timesteps(
    num_steps: int,
    num_train_timesteps: int = 1000,
    *,
    spacing: str = "trailing",
    steps_offset: int = 0,
) -> np.ndarray:
    """The sampler's timesteps, descending, int64, as diffusers' set_timesteps: "trailing"
    gives 999, 979, ..., 19 for 50 steps, "leading" 980 + offset, ..., 0 + offset, "linspace"
    999, ..., 0. `steps_offset` applies to "leading" only (as in diffusers)."""
    T = num_train_timesteps
    if not 0 < num_steps <= T:
        raise ValueError(f"num_inference_steps must be in 1..{T}, got {num_steps}")
    if spacing == "trailing":
        t = np.round(np.arange(T, 0, -T / num_steps)).astype(np.int64) - 1
    elif spacing == "leading":
        t = (np.arange(num_steps) * (T // num_steps))[::-1].astype(np.int64) + steps_offset
    elif spacing == "linspace":
        t = np.linspace(0, T - 1, num_steps).round()[::-1].astype(np.int64)
    else:
        raise _refuse("timestep_spacing", spacing, _CHOICES["timestep_spacing"])
    if t.max() >= T:
        raise ValueError(f"steps_offset={steps_offset} puts timestep {t.max()} past {T - 1}")
    return t


def _multistep_timesteps(cfg: ScheduleConfig, num_steps: int) -> np.ndarray:
    # DPMSolverMultistepScheduler.set_timesteps (lambda_min_clipped -inf: no clipping). Its
    # "linspace" and "leading" place N + 1 points and drop the last (t = 0); "trailing" is
    # DDIM's.
    T = cfg.num_train_timesteps
    if not 0 < num_steps <= T:
        raise ValueError(f"num_inference_steps must be in 1..{T}, got {num_steps}")
    if cfg.timestep_spacing == "linspace":
        t = np.linspace(0, T - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
    elif cfg.timestep_spacing == "leading":
        ratio = T // (num_steps + 1)
        t = (np.arange(num_steps + 1) * ratio)[::-1][:-1].astype(np.int64) + cfg.steps_offset
    else:
        t = inference_timesteps(num_steps, T, spacing="trailing")
    if t.max() >= T:
        raise ValueError(f"steps_offset={cfg.steps_offset} puts timestep {t.max()} past {T - 1}")
    if (np.diff(t) >= 0).any():  # diffusers would step by h = 0 and divide by it
        raise ValueError(
            f"num_inference_steps={num_steps} repeats timesteps with timestep_spacing="
            f"{cfg.timestep_spacing!r} and {T} training timesteps; take fewer steps"
        )
    return t


def schedule_timesteps(cfg: ScheduleConfig, num_steps: int) -> np.ndarray:
    """The sampler's timesteps for `cfg`: `inference_timesteps` for its spacing and offset, or
    DPMSolverMultistepScheduler's own placement for that class."""
    if cfg.multistep:
        return _multistep_timesteps(cfg, num_steps)
    return inference_timesteps(
        num_steps,
        cfg.num_train_timesteps,
        spacing=cfg.timestep_spacing,
        steps_offset=cfg.steps_offset,
    )


def _prev_alpha(ab: np.ndarray, t: np.ndarray, num_steps: int, final: float = 1.0) -> np.ndarray:
    # Both diffusers samplers step to t - T // N, whatever the spacing (and to the final alpha,
    # 1.0 or alpha_bar[0] per set_alpha_to_one, below zero).
    prev = t - len(ab) // num_steps
    return np.where(prev >= 0, ab[np.maximum(prev, 0)], final)


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


def _check_ddim(cfg: ScheduleConfig | None, sampler: str) -> ScheduleConfig:
    cfg = cfg or ScheduleConfig()
    if cfg.multistep:  # its timesteps and alpha_bar[-1] are not DDIM's: no DDIM to match
        supported = tuple(c for c in CLASS_DEFAULTS if c != MULTISTEP)
        raise _refuse(
            "class_name",
            cfg.class_name,
            f"{supported} for {sampler}; sample {MULTISTEP} "
            "configs with the DPM sampler (scheduler='dpm')",
        )
    return cfg


def ddim_table(
    ab: np.ndarray, num_steps: int, cfg: ScheduleConfig | None = None
) -> dict[str, np.ndarray]:
    """Per-step DDIM (eta 0) scalars, float32 (N,) each, for `cfg`'s timesteps, prediction
    type and step arithmetic (default: CogVideoX's, `ScheduleConfig()`); `ab` is
    `alphas_cumprod(cfg)`.

    With the model output m, ddim_step computes x0 = x0_x x + x0_out m (divided by x0_div and
    clipped to +-clip when the table has those), then x_prev = c_x x + c_x0 x0 (+ c_out m when
    the table has it). The optional terms keep CogVideoX's own v-prediction step the expression
    it always was. eps-prediction divides by sqrt(alpha_bar_t) as diffusers does, so at zero
    terminal SNR its x0 is +-inf, which only DDIMScheduler's clipping makes usable; without
    clipping the table is refused there.
    """
    cfg = _check_ddim(cfg, "DDIM")
    t = schedule_timesteps(cfg, num_steps)
    # In the dtype diffusers' alphas_cumprod has: 1 - alpha_bar near t = 0 rounds differently.
    ab = np.asarray(ab, _schedule_dtype(cfg))
    final = 1.0 if cfg.set_alpha_to_one else ab[0]
    a_t, a_prev = ab[t], _prev_alpha(ab, t, num_steps, final).astype(ab.dtype)
    sa, sb = np.sqrt(a_t), np.sqrt(1 - a_t)
    clip = cfg.clip_sample and not cfg.cogvideox
    if cfg.prediction_type == "epsilon" and (a_t == 0).any() and not clip:
        raise ValueError(
            f"prediction_type='epsilon' cannot step from timestep {t[a_t == 0][0]}, where "
            "alpha_bar is 0 (zero terminal SNR) and x0 is infinite; diffusers returns inf or NaN"
        )
    one, zero = np.ones_like(sa), np.zeros_like(sa)
    x0_x, x0_out = {  # x0 from x and the model output
        "v_prediction": (sa, -sb),
        "epsilon": (one, -sb),  # then / sqrt(alpha_bar_t)
        "sample": (zero, one),
    }[cfg.prediction_type]
    table = dict(x0_x=x0_x, x0_out=x0_out)
    if cfg.prediction_type == "epsilon":
        table["x0_div"] = sa
    if cfg.cogvideox:  # x_prev = a x + b x0 (CogVideoXDDIMScheduler.step)
        c = np.sqrt((1 - a_prev) / (1 - a_t))
        table |= dict(c_x=c, c_x0=np.sqrt(a_prev) - sa * c)
    else:  # x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps (DDIMScheduler.step)
        eps_x, eps_out = {  # eps from x and the model output (before any clipping of x0)
            "v_prediction": (sb, sa),
            "epsilon": (zero, one),
            "sample": (1 / sb, -sa / sb),
        }[cfg.prediction_type]
        d = np.sqrt(1 - a_prev)
        table |= dict(c_x=d * eps_x, c_x0=np.sqrt(a_prev), c_out=d * eps_out)
        if clip:
            table["clip"] = np.full(num_steps, cfg.clip_sample_range)
    return {k: v.astype(np.float32) for k, v in table.items()} | {"t": t}


def ddim_step(row, out: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x_prev, x0) from the latents `x` and the model output `out` (v, eps or x0 per the
    schedule's prediction_type; one shape) at the step whose `ddim_table` row is `row`."""
    x0 = row["x0_x"] * x + row["x0_out"] * out
    if "x0_div" in row:
        x0 = x0 / row["x0_div"]
    if "clip" in row:
        x0 = jnp.clip(x0, -row["clip"], row["clip"])
    x_prev = row["c_x"] * x + row["c_x0"] * x0
    if "c_out" in row:
        x_prev = x_prev + row["c_out"] * out
    return x_prev, x0


def inverse_ddim_table(
    ab: np.ndarray, num_steps: int, cfg: ScheduleConfig | None = None
) -> dict[str, np.ndarray]:
    """Per-step scalars of inverse DDIM (latents -> noise), as diffusers' DDIMInverseScheduler
    steps, for `ddim_step` (the same keys as a DDIMScheduler `ddim_table`); "t" ascends.

    The step at timestep t evaluates the model at t on latents at the noise level of
    t - T // N (alpha_bar 1.0 below zero, or alpha_bar[0] without set_alpha_to_one) and moves
    them to t's: x0 and eps from the prediction type, then sqrt(alpha_bar_t) x0 +
    sqrt(1 - alpha_bar_t) eps. `ab` is the pipeline's `alphas_cumprod(cfg)`: the schedule the
    model samples with, SNR shift included. (diffusers' community CogVideoX inversion builds the
    inverse scheduler from the scheduler's config, which drops snr_shift_scale: the same numbers
    for a shift of 1.0, the 5B and 1.5 models'.) Spacings "leading" and "trailing", as there.
    """
    cfg = _check_ddim(cfg, "inverse DDIM")
    if cfg.timestep_spacing == "linspace":
        raise _refuse("timestep_spacing", "linspace", "'leading' or 'trailing' for inversion")
    t = schedule_timesteps(cfg, num_steps)[::-1].copy()
    ab = np.asarray(ab, _schedule_dtype(cfg))
    first = 1.0 if cfg.set_alpha_to_one else ab[0]
    cur = np.minimum(t - len(ab) // num_steps, len(ab) - 1)
    a_cur = np.where(cur >= 0, ab[np.maximum(cur, 0)], first).astype(ab.dtype)
    a_next = ab[t]
    sa, sb = np.sqrt(a_cur), np.sqrt(1 - a_cur)
    if cfg.prediction_type == "sample" and (sb == 0).any():
        raise ValueError(
            "prediction_type='sample' cannot be inverted from alpha_bar = 1 (set_alpha_to_one): "
            "its noise estimate divides by sqrt(1 - alpha_bar); diffusers returns NaN"
        )
    one, zero = np.ones_like(sa), np.zeros_like(sa)
    with np.errstate(divide="ignore"):
        x0_x, x0_out, eps_x, eps_out = {
            "v_prediction": (sa, -sb, sb, sa),
            "epsilon": (one, -sb, zero, one),  # x0 then / sqrt(alpha_bar)
            "sample": (zero, one, 1 / sb, -sa / sb),
        }[cfg.prediction_type]
    d = np.sqrt(1 - a_next)
    table = dict(x0_x=x0_x, x0_out=x0_out, c_x=d * eps_x, c_x0=np.sqrt(a_next), c_out=d * eps_out)
    if cfg.prediction_type == "epsilon":
        table["x0_div"] = sa
    if cfg.clip_sample and not cfg.cogvideox:
        table["clip"] = np.full(num_steps, cfg.clip_sample_range)
    return {k: v.astype(np.float32) for k, v in table.items()} | {"t": t}


def _check_dpm(cfg: ScheduleConfig | None) -> ScheduleConfig:
    cfg = cfg or ScheduleConfig()
    # What this SDE-DPM-Solver++(2M) implements: CogVideoX's schedule and v-prediction.
    need = dict(
        class_name=("CogVideoXDDIMScheduler", "CogVideoXDPMScheduler", MULTISTEP),
        prediction_type=("v_prediction",),
        timestep_spacing=("trailing",),
        set_alpha_to_one=(True,),
    )
    for field, supported in need.items():
        if getattr(cfg, field) not in supported:
            raise _refuse(field, getattr(cfg, field), f"{supported} for the DPM sampler")
    return cfg


def dpm_table(
    ab: np.ndarray, num_steps: int, cfg: ScheduleConfig | None = None
) -> dict[str, np.ndarray]:
    """Per-step SDE-DPM-Solver++(2M) scalars, computed in float64 with its infinities. `cfg`
    (default `ScheduleConfig()`) must be a CogVideoX v-prediction, trailing schedule, or a
    DPMSolverMultistepScheduler one (then `multistep_table`'s rows)."""
    if cfg is not None and cfg.multistep:
        return multistep_table(ab, num_steps, cfg)
    _check_dpm(cfg)
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


def multistep_table(ab: np.ndarray, num_steps: int, cfg: ScheduleConfig) -> dict[str, np.ndarray]:
    """Per-step scalars of DPMSolverMultistepScheduler (`cfg.multistep`) for `dpm_step`: the
    data-prediction solvers "dpmsolver++" (an ODE) and "sde-dpmsolver++", first or second
    order (multistep: the second order reuses the previous step's x0), float32 as diffusers
    computes them.

    Step i runs from sigma_i to sigma_{i+1}, where sigma = sqrt((1 - alpha_bar) / alpha_bar) at
    the step's timestep and the last one is 0 ("zero") or the sigma of t = 0 ("sigma_min");
    alpha = 1 / sqrt(1 + sigma^2), s = sigma alpha and lambda = log(alpha / s) (as log(alpha) -
    log(s)). With x0 = (x0_x x + x0_out out) [/ x0_div] from the model output, a step is
    x_prev = c_x x + c_x0 x0 + c_d (x0 - old_x0) [+ c_noise noise], the difference term only on
    rows marked `second`. First order: c_x = s'/s (times e^-h for the SDE), c_x0 = alpha'
    (1 - e^-h) (SDE: 1 - e^-2h) with h = lambda' - lambda (primes: the next sigma's), and the SDE
    adds s' sqrt(1 - e^-2h) noise. Second order keeps those and adds the divided difference
    (x0 - old_x0) / r with r = (lambda - lambda_back) / h, weighted by half c_x0 ("midpoint") or
    by alpha' ((1 - e^-h) / -h + 1) ("heun"; SDE: e^-2h and -2h in place of e^-h and -h).
    The first step is first order (no old x0), and so is the last when `euler_at_final`, when
    `lower_order_final` with fewer than 15 steps, or when the final sigma is 0.
    """
    t = schedule_timesteps(cfg, num_steps)
    f32, one = np.float32, np.float32(1)
    ab = np.asarray(ab, f32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        sigmas = np.sqrt((one - ab) / ab)
        last = sigmas[0] if cfg.final_sigmas_type == "sigma_min" else f32(0)
        sig = np.concatenate([sigmas[t], [last]]).astype(f32)
        if not np.isfinite(sig).all():
            raise ValueError(
                f"alpha_bar underflows to 0 at timestep {t[~np.isfinite(sig[:-1])][0]}"
            )
        alpha = one / np.sqrt(sig * sig + one)
        s = sig * alpha
        lam = np.log(alpha) - np.log(s)  # +inf at a final sigma of 0
        a_now, s_now, s_next, a_next = alpha[:-1], s[:-1], s[1:], alpha[1:]
        h = lam[1:] - lam[:-1]
        r = (lam[:-1] - np.concatenate([[np.nan], lam[:-2]]).astype(f32)) / h
        sde = cfg.algorithm_type == "sde-dpmsolver++"
        x0_x, x0_out = {
            "epsilon": (np.ones_like(s_now), -s_now),  # then / alpha
            "v_prediction": (a_now, -s_now),
            "sample": (np.zeros_like(s_now), np.ones_like(s_now)),
        }[cfg.prediction_type]
        table = dict(x0_x=x0_x, x0_out=x0_out)
        if cfg.prediction_type == "epsilon":
            table["x0_div"] = a_now
        if sde:
            e2 = np.exp(f32(-2) * h)
            table |= dict(
                c_x=s_next / s_now * np.exp(-h),
                c_x0=a_next * (one - e2),
                c_noise=s_next * np.sqrt(one - e2),
            )
            d = {
                "midpoint": f32(0.5) * (a_next * (one - e2)),
                "heun": a_next * ((one - e2) / (f32(-2) * h) + one),
            }
        else:
            em1 = np.exp(-h) - one
            table |= dict(c_x=s_next / s_now, c_x0=-(a_next * em1))
            d = {"midpoint": -(f32(0.5) * (a_next * em1)), "heun": a_next * (em1 / h + one)}
        table["c_d"] = d[cfg.solver_type] * (one / r)
    i = np.arange(num_steps)
    final = (i == num_steps - 1) & (
        cfg.euler_at_final
        or (cfg.lower_order_final and num_steps < 15)
        or cfg.final_sigmas_type == "zero"
    )
    second = (cfg.solver_order == 2) & (i > 0) & ~final
    table["c_d"] = np.where(second, table["c_d"], f32(0))
    return {k: v.astype(np.float32) for k, v in table.items()} | {"second": second, "t": t}


def dpm_step(row, v, x, old_x0, noise) -> tuple[jax.Array, jax.Array]:
    """(x_prev, x0) as `ddim_step`, for a `dpm_table` row; `old_x0` is the previous step's x0
    (unused on first-order steps), `noise` the draw diffusers uses for the returned sample
    (CogVideoXDPMScheduler: its second draw on second-order steps, the first on first-order
    ones; DPMSolverMultistepScheduler: its one draw a step, "sde-dpmsolver++" only; the ODE's
    rows have no c_noise and leave `noise` unused, so a compiled loop drops its draw)."""
    if "c_d" in row:  # multistep_table
        x0 = row["x0_x"] * x + row["x0_out"] * v
        if "x0_div" in row:
            x0 = x0 / row["x0_div"]
        x_prev = row["c_x"] * x + row["c_x0"] * x0
        x_prev = x_prev + jnp.where(row["second"], row["c_d"], 0.0) * (x0 - old_x0)
        if "c_noise" in row:
            x_prev = x_prev + row["c_noise"] * noise
        return x_prev, x0
    x0 = row["sa"] * x - row["sb"] * v
    d = jnp.where(row["second"], row["m3"] * x0 - row["m4"] * old_x0, x0)
    return row["m1"] * x - row["m2"] * d + row["m_noise"] * noise, x0


def dynamic_cfg_scales(
    guidance_scale: float, num_steps: int, timesteps: np.ndarray | None = None
) -> np.ndarray:
    """diffusers' use_dynamic_cfg weights, (num_steps,) float64; like diffusers (and SAT as
    called) it uses the timestep value, not the step index, in the power, so the weights
    oscillate. `timesteps`: the sampler's (a table's "t"); default the trailing ones."""
    t = inference_timesteps(num_steps) if timesteps is None else np.asarray(timesteps)
    t = t.astype(np.float64)
    return 1 + guidance_scale * ((1 - np.cos(np.pi * ((num_steps - t) / num_steps) ** 5.0)) / 2)
