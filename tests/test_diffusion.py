"""Schedule, v-prediction helpers and sampler steps against diffusers' CogVideoX schedulers."""

import numpy as np
import pytest
import reference as ref
import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler
from diffusers.schedulers import scheduling_dpm_cogvideox

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


def test_from_diffusers_config_rejects_other_settings():
    assert (
        diffusion.ScheduleConfig.from_diffusers(dict(CONFIG, snr_shift_scale=3.0)).snr_shift_scale
        == 3
    )
    with pytest.raises(ValueError, match="prediction_type"):
        diffusion.ScheduleConfig.from_diffusers(dict(CONFIG, prediction_type="epsilon"))


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
