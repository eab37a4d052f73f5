"""Schedule, v-prediction helpers and sampler steps against diffusers' CogVideoX schedulers."""

import dataclasses
import itertools

import diffusers
import numpy as np
import pytest
import reference as ref
import torch
from diffusers import (
    CogVideoXDDIMScheduler,
    CogVideoXDPMScheduler,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
)
from diffusers.schedulers import scheduling_dpm_cogvideox, scheduling_dpmsolver_multistep

from cogvideox_jax import diffusion

CONFIG = ref.SCHEDULER_CONFIG


def _scheduler(cls, shift):
    return cls(**CONFIG, snr_shift_scale=shift)


@pytest.mark.parametrize("shift", [3.0, 1.0])
def test_schedule_equals_diffusers(shift):
    ours = diffusion.alphas_cumprod(diffusion.ScheduleConfig(snr_shift_scale=shift))
    for cls in (CogVideoXDDIMScheduler, CogVideoXDPMScheduler):
        np.testing.assert_allclose(ours, _scheduler(cls, shift).alphas_cumprod.numpy(), rtol=1e-13)
    assert ours[-1] == 0.0
    # Values read off diffusers in float64 (cogvideox_numerics.md, section 4.1).
    want = {
        3.0: (0.997454327643, 0.730866866759, 0.0959695616907),
        1.0: (0.99915, 0.888085894794, 0.242359166556),
    }[shift]
    np.testing.assert_allclose(ours[[0, 99, 499]], want, rtol=1e-11)


@pytest.mark.parametrize("n", [50, 30, 1, 7])
def test_timesteps_equal_diffusers(n):
    s = _scheduler(CogVideoXDDIMScheduler, 1.0)
    s.set_timesteps(n)
    np.testing.assert_array_equal(diffusion.inference_timesteps(n), s.timesteps.numpy())


def test_add_noise_and_velocity_equal_diffusers():
    s = _scheduler(CogVideoXDDIMScheduler, 3.0)
    ab = diffusion.alphas_cumprod(diffusion.ScheduleConfig(snr_shift_scale=3.0))
    rng = np.random.default_rng(0)
    x0, noise = (rng.standard_normal((4, 3, 2, 2, 5)).astype(np.float32) for _ in range(2))
    t = np.array([0, 500, 998, 999])
    tx0, tn, tt = torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)
    np.testing.assert_allclose(
        diffusion.add_noise(x0, noise, t, ab),
        s.add_noise(tx0, tn, tt).numpy(),
        rtol=1e-6,
        atol=1e-7,
    )
    np.testing.assert_allclose(
        diffusion.velocity(x0, noise, t, ab),
        s.get_velocity(tx0, tn, tt).numpy(),
        rtol=1e-6,
        atol=1e-7,
    )


@pytest.mark.parametrize("n,shift", [(50, 3.0), (30, 1.0), (4, 1.0)])
def test_ddim_steps_equal_diffusers(n, shift):
    s = _scheduler(CogVideoXDDIMScheduler, shift)
    s.set_timesteps(n)
    table = diffusion.ddim_table(diffusion.alphas_cumprod(diffusion.ScheduleConfig(shift)), n)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 4, 4, 2)).astype(np.float32)
    tx = torch.from_numpy(x)
    for i, t in enumerate(s.timesteps):
        v = rng.standard_normal(x.shape).astype(np.float32)
        tx, tx0 = s.step(torch.from_numpy(v), t, tx, return_dict=False)
        x, x0 = diffusion.ddim_step({k: c[i] for k, c in table.items()}, v, x)
        np.testing.assert_allclose(x0, tx0.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(x, tx.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n,shift", [(50, 1.0), (30, 3.0), (3, 1.0)])
def test_dpm_steps_equal_diffusers_with_injected_noise(n, shift, monkeypatch):
    s = _scheduler(CogVideoXDPMScheduler, shift)
    s.set_timesteps(n)
    table = diffusion.dpm_table(diffusion.alphas_cumprod(diffusion.ScheduleConfig(shift)), n)
    rng = np.random.default_rng(2)
    shape = (2, 2, 4, 4, 3)
    draws = []

    def fake_randn(shape, generator=None, device=None, dtype=None):
        draws.append(rng.standard_normal(shape).astype(np.float32))
        return torch.from_numpy(draws[-1])

    monkeypatch.setattr(scheduling_dpm_cogvideox, "randn_tensor", fake_randn)
    x = rng.standard_normal(shape).astype(np.float32)
    tx, old_tx0, old_x0 = torch.from_numpy(x), None, np.zeros(shape, np.float32)
    for i, t in enumerate(s.timesteps):
        v = rng.standard_normal(shape).astype(np.float32)
        t_back = s.timesteps[i - 1] if i > 0 else None
        tx, old_tx0 = s.step(torch.from_numpy(v), old_tx0, t, t_back, tx, return_dict=False)
        x, old_x0 = diffusion.dpm_step({k: c[i] for k, c in table.items()}, v, x, old_x0, draws[-1])
        np.testing.assert_allclose(old_x0, old_tx0.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(x, tx.numpy(), rtol=1e-5, atol=1e-5)
    assert np.isfinite(x).all()


def test_dynamic_cfg_equals_the_pipeline_formula():
    import math

    got = diffusion.dynamic_cfg_scales(6.0, 50)
    ts = diffusion.inference_timesteps(50)
    want = [1 + 6.0 * ((1 - math.cos(math.pi * ((50 - t) / 50) ** 5.0)) / 2) for t in ts]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert got.min() >= 1 and got.max() <= 7


# Other scheduler configs than CogVideoX's (the DDIM path): every beta schedule x prediction type
# x spacing, for both step arithmetics (DDIMScheduler's and the CogVideoX classes'), with the
# remaining switches cycled so that each value appears.
GRID = [
    dict(
        _class_name=name,
        beta_schedule=beta,
        prediction_type=pred,
        timestep_spacing=spacing,
        steps_offset=i % 2,
        rescale_betas_zero_snr=bool(i // 2 % 2),
        set_alpha_to_one=bool(i // 4 % 2),
        clip_sample=bool(i // 3 % 2),
        clip_sample_range=(1.0, 2.5)[i // 5 % 2],
        **({"snr_shift_scale": (1.0, 3.0)[i % 3 > 0]} if name != "DDIMScheduler" else {}),
        **(
            {"num_train_timesteps": 500, "beta_start": 0.0005, "beta_end": 0.015}
            if i % 7 == 3
            else {}
        ),
    )
    for i, (name, beta, pred, spacing) in enumerate(
        itertools.product(
            ("DDIMScheduler", "CogVideoXDDIMScheduler"),
            ("linear", "scaled_linear", "squaredcos_cap_v2"),
            ("epsilon", "v_prediction", "sample"),
            ("leading", "trailing", "linspace"),
        )
    )
]


def _theirs(config):
    return getattr(diffusers, config["_class_name"]).from_config(config)


def _fake_model(x, t, w):
    """A deterministic stand-in for the transformer: linear in the sample and the timestep."""
    return 0.7 * x + (t / 1000.0 + 0.1) * w


def _run(step, timesteps, x, w):
    """N steps of `step(i, model_output, x) -> (x_prev, x0)` on the fake model; the last (x, x0)."""
    for i, t in enumerate(timesteps):
        x, x0 = step(i, _fake_model(np.asarray(x), int(t), w), np.asarray(x))
    return np.asarray(x), np.asarray(x0)


def _id(c):
    return "-".join(str(v) for v in c.values())


@pytest.mark.parametrize("config", GRID, ids=_id)
def test_ddim_configs_equal_diffusers(config):
    cfg = diffusion.ScheduleConfig.from_diffusers(config)
    s = _theirs(config)
    ab = diffusion.alphas_cumprod(cfg)
    np.testing.assert_allclose(ab, s.alphas_cumprod.numpy(), rtol=0, atol=1e-6)
    n = (7, 10, 13)[len(config["beta_schedule"]) % 3]
    s.set_timesteps(n)
    np.testing.assert_array_equal(diffusion.schedule_timesteps(cfg, n), s.timesteps.numpy())
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 4, 2)).astype(np.float32)
    w = rng.standard_normal(x.shape).astype(np.float32)
    zero_snr = (ab[s.timesteps.numpy()] == 0).any()
    if (
        cfg.prediction_type == "epsilon"
        and zero_snr
        and not (cfg.clip_sample and not cfg.cogvideox)
    ):
        # Zero terminal SNR leaves no x0 to recover from eps (only DDIMScheduler's clipping
        # brings it back): diffusers returns inf or NaN, we refuse the table.
        t = s.timesteps[0]
        tx = s.step(torch.from_numpy(_fake_model(x, int(t), w)), t, torch.from_numpy(x)).prev_sample
        assert not np.isfinite(tx.numpy()).all()
        with pytest.raises(ValueError, match="epsilon"):
            diffusion.ddim_table(ab, n, cfg)
        return
    table = diffusion.ddim_table(ab, n, cfg)
    row = [{k: c[i] for k, c in table.items()} for i in range(n)]
    with np.errstate(divide="ignore"):  # eps at zero SNR, clipped: x0 = +-inf, as diffusers
        ours = _run(lambda i, out, x: diffusion.ddim_step(row[i], out, x), table["t"], x, w)
    assert np.isfinite(ours[0]).all()

    def theirs(s):
        step = lambda i, out, x: s.step(torch.from_numpy(out), s.timesteps[i], torch.from_numpy(x))
        return _run(lambda i, out, x: [v.numpy() for v in step(i, out, x)[:2]], s.timesteps, x, w)

    # 1. diffusers as it is.
    # torch's CPU float32 sqrt is not correctly rounded (up to 0.75 ulp here, depending on the
    # build), so float32 schedules that rescale differ from ours by an ulp in places; where
    # CogVideoXDDIMScheduler's sqrt((1 - a_prev) / (1 - a_t)) then divides by 1 - a_t ~ 1e-4
    # (t near 0), diffusers' own result carries that error, amplified ~1e3.
    used = np.concatenate([table["t"], table["t"] - cfg.num_train_timesteps // n, [0]])
    used = used[used >= 0]
    theirs_ab = s.alphas_cumprod.numpy()[used]
    off = (ab[used].astype(theirs_ab.dtype) != theirs_ab) & (1 - theirs_ab < 1e-3)
    ill = bool(cfg.cogvideox and off.any())
    for got, want in zip(ours, theirs(s), strict=True):
        np.testing.assert_allclose(
            got, want, rtol=(1e-5, 5e-3)[ill], atol=(1e-5, 5e-3)[ill] * np.abs(want).max()
        )
    # 2. diffusers' step with our alpha_bar (the schedule itself is checked above): the step
    # arithmetic alone, which must agree to 1e-5 everywhere.
    s.alphas_cumprod = torch.from_numpy(ab).to(s.alphas_cumprod.dtype)
    if not cfg.set_alpha_to_one:
        s.final_alpha_cumprod = s.alphas_cumprod[0]
    for got, want in zip(ours, theirs(s), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


# DPMSolverMultistepScheduler configs: every algorithm x prediction type x spacing, with the
# beta schedule, solver switches, zero-SNR rescaling, offset and step count cycled so that each
# value appears (and the last step is second order in some: sigma_min with 15 or more steps, or
# without lower_order_final).
MULTISTEP_GRID = [
    dict(
        _class_name="DPMSolverMultistepScheduler",
        algorithm_type=algorithm,
        prediction_type=pred,
        timestep_spacing=spacing,
        beta_schedule=("linear", "scaled_linear", "squaredcos_cap_v2")[i % 3],
        solver_order=(2, 1)[i % 6 == 5],
        solver_type=("midpoint", "heun")[i // 2 % 2],
        lower_order_final=i % 4 != 3,
        euler_at_final=i % 7 == 2,
        final_sigmas_type=("zero", "sigma_min")[i // 3 % 2],
        rescale_betas_zero_snr=bool(i // 4 % 2),
        steps_offset=i % 2,
        **(
            {"num_train_timesteps": 500, "beta_start": 0.0005, "beta_end": 0.015}
            if i % 7 == 3
            else {}
        ),
    )
    for i, (algorithm, pred, spacing) in enumerate(
        itertools.product(
            ("dpmsolver++", "sde-dpmsolver++"),
            ("epsilon", "v_prediction", "sample"),
            ("linspace", "leading", "trailing"),
        )
    )
]
MULTISTEP_STEPS = (1, 6, 16, 9, 21, 12)


def test_multistep_grid_covers_every_supported_value():
    for field, values in dict(
        beta_schedule=("linear", "scaled_linear", "squaredcos_cap_v2"),
        solver_order=(1, 2),
        solver_type=("midpoint", "heun"),
        lower_order_final=(True, False),
        euler_at_final=(True, False),
        final_sigmas_type=("zero", "sigma_min"),
        rescale_betas_zero_snr=(True, False),
        steps_offset=(0, 1),
    ).items():
        assert {c[field] for c in MULTISTEP_GRID} == set(values), field
    # Second-order last steps both ways (sigma_min, order 2, no euler_at_final): with 15 or more
    # steps, and with fewer but without lower_order_final.
    last2 = [
        (c["lower_order_final"], MULTISTEP_STEPS[i % len(MULTISTEP_STEPS)] >= 15)
        for i, c in enumerate(MULTISTEP_GRID)
        if c["final_sigmas_type"] == "sigma_min"
        and c["solver_order"] == 2
        and not c["euler_at_final"]
    ]
    assert (True, True) in last2 and (False, False) in last2


@pytest.mark.parametrize(
    "case", range(len(MULTISTEP_GRID)), ids=lambda case: _id(MULTISTEP_GRID[case])
)
def test_multistep_configs_equal_diffusers(case, monkeypatch):
    """dpm_table + dpm_step against DPMSolverMultistepScheduler.step on the fake model, with the
    SDE's noise injected: every step's sample, and its x0 (diffusers' model_outputs[-1])."""
    config, n = MULTISTEP_GRID[case], MULTISTEP_STEPS[case % len(MULTISTEP_STEPS)]
    cfg = diffusion.ScheduleConfig.from_diffusers(config)
    s = _theirs(config)
    ab = diffusion.alphas_cumprod(cfg)
    np.testing.assert_allclose(ab, s.alphas_cumprod.numpy(), rtol=0, atol=1e-6)
    if cfg.rescale_betas_zero_snr:
        assert ab[-1] == s.alphas_cumprod[-1] == 2.0**-24
    s.set_timesteps(n)
    table = diffusion.dpm_table(ab, n, cfg)
    np.testing.assert_array_equal(table["t"], s.timesteps.numpy())
    np.testing.assert_array_equal(diffusion.schedule_timesteps(cfg, n), s.timesteps.numpy())

    rng = np.random.default_rng(4)
    draws = []

    def fake_randn(shape, generator=None, device=None, dtype=None):
        draws.append(rng.standard_normal(shape).astype(np.float32))
        return torch.from_numpy(draws[-1])

    monkeypatch.setattr(scheduling_dpmsolver_multistep, "randn_tensor", fake_randn)
    x = rng.standard_normal((2, 3, 4, 2)).astype(np.float32)
    w = rng.standard_normal(x.shape).astype(np.float32)
    tx, old_x0 = torch.from_numpy(x), np.zeros(x.shape, np.float32)
    sde = cfg.algorithm_type == "sde-dpmsolver++"
    for i, t in enumerate(s.timesteps):
        tx = s.step(torch.from_numpy(_fake_model(tx.numpy(), int(t), w)), t, tx).prev_sample
        row = {k: c[i] for k, c in table.items()}
        noise = draws[-1] if sde else None  # the ODE's rows leave it unused
        x, old_x0 = diffusion.dpm_step(row, _fake_model(x, int(t), w), x, old_x0, noise)
        x, old_x0 = np.asarray(x), np.asarray(old_x0)
        assert len(draws) == (i + 1) * sde
        # Relative to the largest value: eps-prediction at zero terminal SNR starts from
        # sigma = 4096, where x0 = (x - s eps) / alpha is ~4096 x; the arithmetic is float32 on
        # both sides, an ulp apart in places (torch's and numpy's sqrt, log and exp).
        for got, want in ((old_x0, s.model_outputs[-1].numpy()), (x, tx.numpy())):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert np.isfinite(x).all()


def test_multistep_schedules_refuse_ddim_and_repeated_timesteps():
    cfg = diffusion.ScheduleConfig.from_diffusers({"_class_name": "DPMSolverMultistepScheduler"})
    ab = diffusion.alphas_cumprod(cfg)
    for table in (diffusion.ddim_table, diffusion.inverse_ddim_table):
        with pytest.raises(ValueError, match="class_name=.*scheduler='dpm'"):
            table(ab, 10, cfg)
    with pytest.raises(ValueError, match="repeats timesteps"):
        diffusion.dpm_table(ab, 1000, cfg)  # 1001 points over 0..999 round two together
    assert len(diffusion.dpm_table(ab, 300, cfg)["t"]) == 300


@pytest.mark.parametrize(
    "change",
    [
        dict(algorithm_type="dpmsolver"),
        dict(algorithm_type="sde-dpmsolver"),
        dict(algorithm_type="deis"),
        dict(solver_order=3),
        dict(solver_type="bh2"),
        dict(final_sigmas_type="sigma_max"),
        dict(use_karras_sigmas=True),
        dict(use_exponential_sigmas=True),
        dict(use_beta_sigmas=True),
        dict(use_lu_lambdas=True),
        dict(use_flow_sigmas=True),
        dict(use_dynamic_shifting=True),
        dict(thresholding=True),
        dict(variance_type="learned_range"),
        dict(lambda_min_clipped=-5.1),
        dict(prediction_type="flow_prediction"),
        dict(trained_betas=[0.01] * 1000),
        dict(lower_order_final="yes"),
        dict(solver_order=2.5),
    ],
    ids=str,
)
def test_multistep_refuses_what_it_does_not_implement(change):
    config = dict(_class_name="DPMSolverMultistepScheduler", **change)
    ((field, value),) = change.items()
    with pytest.raises(ValueError, match=f"{field}=.*supported") as e:
        diffusion.ScheduleConfig.from_diffusers(config)
    assert isinstance(value, list) or repr(value) in str(e.value)


def test_multistep_keeps_the_ddim_switches_at_their_defaults():
    """DPMSolverMultistepScheduler has no snr_shift_scale, set_alpha_to_one or clip_sample (a
    config's are ignored), and the other classes have no solver switches."""
    config = dict(_class_name="DPMSolverMultistepScheduler", set_alpha_to_one=False)
    assert diffusion.ScheduleConfig.from_diffusers(config).set_alpha_to_one
    config = dict(_class_name="DDIMScheduler", solver_order=1)
    assert diffusion.ScheduleConfig.from_diffusers(config).solver_order == 2
    with pytest.raises(ValueError, match="snr_shift_scale=3.0"):
        diffusion.ScheduleConfig(class_name="DPMSolverMultistepScheduler", snr_shift_scale=3.0)
    with pytest.raises(ValueError, match="solver_order=1"):
        diffusion.ScheduleConfig(solver_order=1)


@pytest.mark.parametrize("n", [1, 7, 50, 999])
@pytest.mark.parametrize(
    "spacing,offset", [("leading", 0), ("leading", 1), ("trailing", 1), ("linspace", 1)]
)
def test_timestep_spacings_equal_diffusers(n, spacing, offset):
    s = DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
    s.set_timesteps(n)
    got = diffusion.inference_timesteps(n, spacing=spacing, steps_offset=offset)
    np.testing.assert_array_equal(got, s.timesteps.numpy())


@pytest.mark.parametrize(
    "cls",
    [DDIMScheduler, CogVideoXDDIMScheduler, CogVideoXDPMScheduler, DPMSolverMultistepScheduler],
)
def test_from_diffusers_missing_keys_take_the_class_defaults(cls):
    """A config naming only its class reads as that class's constructor defaults."""
    bare = diffusion.ScheduleConfig.from_diffusers({"_class_name": cls.__name__})
    full = dict(cls().config, _class_name=cls.__name__)
    assert bare == diffusion.ScheduleConfig.from_diffusers(full)
    np.testing.assert_allclose(
        diffusion.alphas_cumprod(bare), cls().alphas_cumprod.numpy(), rtol=0, atol=1e-6
    )


@pytest.mark.parametrize(
    "config",
    [{}, *GRID[::5], dict(CONFIG, snr_shift_scale=3.0), *MULTISTEP_GRID[::3]],
    ids=str,
)
def test_to_diffusers_round_trips(config):
    cfg = diffusion.ScheduleConfig.from_diffusers(config)
    written = cfg.to_diffusers()
    assert diffusion.ScheduleConfig.from_diffusers(written) == cfg
    np.testing.assert_allclose(
        diffusion.alphas_cumprod(cfg), _theirs(written).alphas_cumprod.numpy(), rtol=0, atol=1e-6
    )
    assert diffusion.ScheduleConfig().to_diffusers()["_class_name"] == "CogVideoXDDIMScheduler"
    assert diffusion.ScheduleConfig.from_diffusers(diffusion.ScheduleConfig().to_diffusers()) == (
        diffusion.ScheduleConfig()
    )


@pytest.mark.parametrize(
    "config,field",
    [
        (dict(CONFIG, beta_schedule="cosine"), "beta_schedule"),
        (dict(CONFIG, prediction_type="flow"), "prediction_type"),
        (dict(CONFIG, timestep_spacing="karras"), "timestep_spacing"),
        (dict(CONFIG, _class_name="EulerDiscreteScheduler"), "_class_name"),
        (
            dict(_class_name="DPMSolverMultistepScheduler", use_karras_sigmas=True),
            "use_karras_sigmas",
        ),
        (dict(_class_name="DDIMScheduler", thresholding=True), "thresholding"),
        (dict(CONFIG, trained_betas=[0.1] * 1000), "trained_betas"),
        (dict(CONFIG, steps_offset=-1), "steps_offset"),
        (dict(CONFIG, steps_offset=0.5), "steps_offset"),
    ],
)
def test_from_diffusers_refuses_unsupported_values(config, field):
    with pytest.raises(ValueError, match=f"{field}=.*supported") as e:
        diffusion.ScheduleConfig.from_diffusers(config)
    value = config.get(field, config.get("_class_name"))
    assert isinstance(value, list) or repr(value) in str(e.value)


def test_dpm_sampler_refuses_schedules_its_math_does_not_cover():
    assert diffusion.ScheduleConfig.from_diffusers(
        dict(CONFIG, _class_name="CogVideoXDPMScheduler")
    )
    for bad, field in [
        (dict(CONFIG, prediction_type="epsilon"), "prediction_type"),
        (dict(CONFIG, timestep_spacing="leading"), "timestep_spacing"),
        (dict(_class_name="DDIMScheduler", prediction_type="v_prediction"), "class_name"),
    ]:
        cfg = diffusion.ScheduleConfig.from_diffusers(bad)
        with pytest.raises(ValueError, match=field):
            diffusion.dpm_table(diffusion.alphas_cumprod(cfg), 10, cfg)


def test_dynamic_cfg_follows_the_schedule_timesteps():
    t = diffusion.inference_timesteps(10, spacing="leading", steps_offset=1)
    want = [1 + 6.0 * ((1 - np.cos(np.pi * ((10 - v) / 10) ** 5.0)) / 2) for v in t]
    np.testing.assert_allclose(diffusion.dynamic_cfg_scales(6.0, 10, t), want, rtol=1e-12)


@pytest.mark.parametrize("name", ["CogVideoXDDIMScheduler", "CogVideoXDPMScheduler"])
def test_released_cogvideox_configs_read_as_before(name):
    """The CogVideoX checkpoints' scheduler configs give the schedule this module always had."""
    for shift in (1.0, 3.0):
        config = dict(CONFIG, _class_name=name, snr_shift_scale=shift, steps_offset=0)
        cfg = diffusion.ScheduleConfig.from_diffusers(config)
        assert cfg == dataclasses.replace(diffusion.ScheduleConfig(shift), class_name=name)
        table = diffusion.ddim_table(diffusion.alphas_cumprod(cfg), 50, cfg)
        assert set(table) == {"x0_x", "x0_out", "c_x", "c_x0", "t"}  # v-prediction, no clipping


INVERSE_GRID = [c for c in GRID if c["timestep_spacing"] != "linspace"][::3]


@pytest.mark.parametrize("config", INVERSE_GRID, ids=_id)
def test_inverse_ddim_equals_diffusers(config):
    """inverse_ddim_table + ddim_step against DDIMInverseScheduler built from the same config
    (the community inversion script's `DDIMInverseScheduler(**scheduler.config)`), given the
    schedule's alpha_bar (SNR shift included: the model's own)."""
    cfg = diffusion.ScheduleConfig.from_diffusers(config)
    ab = diffusion.alphas_cumprod(cfg)
    n = (4, 7, 10)[len(config["beta_schedule"]) % 3]
    s = diffusers.DDIMInverseScheduler.from_config(cfg.to_diffusers())
    s.alphas_cumprod = torch.from_numpy(ab).to(torch.float32)
    if not cfg.set_alpha_to_one:
        s.initial_alpha_cumprod = s.alphas_cumprod[0]
    s.set_timesteps(n)
    if cfg.prediction_type == "sample" and cfg.set_alpha_to_one:
        with pytest.raises(ValueError, match="sample"):
            diffusion.inverse_ddim_table(ab, n, cfg)
        return
    table = diffusion.inverse_ddim_table(ab, n, cfg)
    np.testing.assert_array_equal(table["t"], s.timesteps.numpy())
    assert (np.diff(table["t"]) > 0).all()
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 4, 2)).astype(np.float32)
    w = rng.standard_normal(x.shape).astype(np.float32)
    row = [{k: c[i] for k, c in table.items()} for i in range(n)]
    ours = _run(lambda i, out, x: diffusion.ddim_step(row[i], out, x), table["t"], x, w)
    step = lambda i, out, x: s.step(torch.from_numpy(out), s.timesteps[i], torch.from_numpy(x))
    theirs = _run(lambda i, out, x: [v.numpy() for v in step(i, out, x)[:2]], s.timesteps, x, w)
    for got, want in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_inverse_ddim_as_is_for_the_released_5b_schedule():
    """With CogVideoX-5B's schedule (SNR shift 1.0) the model's schedule is the one diffusers'
    DDIMInverseScheduler computes from the scheduler config, so no alpha_bar is handed over."""
    config = dict(CONFIG, _class_name="CogVideoXDDIMScheduler", snr_shift_scale=1.0)
    cfg = diffusion.ScheduleConfig.from_diffusers(config)
    s = diffusers.DDIMInverseScheduler(**CogVideoXDDIMScheduler(**config).config)
    s.set_timesteps(50)
    table = diffusion.inverse_ddim_table(diffusion.alphas_cumprod(cfg), 50, cfg)
    row = [{k: c[i] for k, c in table.items()} for i in range(50)]
    x = np.random.default_rng(6).standard_normal((2, 3, 4, 2)).astype(np.float32)
    w = np.random.default_rng(7).standard_normal(x.shape).astype(np.float32)
    ours = _run(lambda i, out, x: diffusion.ddim_step(row[i], out, x), table["t"], x, w)
    step = lambda i, out, x: s.step(torch.from_numpy(out), s.timesteps[i], torch.from_numpy(x))
    theirs = _run(lambda i, out, x: [v.numpy() for v in step(i, out, x)[:2]], s.timesteps, x, w)
    for got, want in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    with pytest.raises(ValueError, match="linspace"):
        diffusion.inverse_ddim_table(
            diffusion.alphas_cumprod(cfg), 5, dataclasses.replace(cfg, timestep_spacing="linspace")
        )
