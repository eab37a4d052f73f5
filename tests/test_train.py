"""The transformer trainer: every config runs, the loss is CogVideoX's (checked against diffusers'
training-script formula), Explicit Uniform Sampling, bit-identical resume after SIGKILL,
restoring onto another mesh, config errors and non-finite losses."""

import importlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
import torch
from absl import flags
from conftest import compile_env
from flax import nnx
from ml_collections import config_flags

import cogvideox_jax as cj
from cogvideox_jax import diffusion
from configs import validate
from train import dit, metrics, objective
from train.run import resolve

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [
    "cogvideox_2b",
    "cogvideox_5b",
    "cogvideox_5b_i2v",
    "cogvideox1_5_5b",
    "cogvideox1_5_5b_i2v",
]


# The runlocal configs sample at each eval (train/samples.py); runs that do not look at the samples
# leave them out, which spares each a sampling loop and VAE decode to compile.
NO_SAMPLES = "--config.evals.sample_prompts=()"


def _config(name, arg="sft,runlocal", samples=False, **overrides):
    cfg = importlib.import_module(f"configs.{name}").get_config(arg)
    if not samples:
        cfg.evals.sample_prompts = ()
    cfg.update_from_flattened_dict(overrides)
    cfg.lock()
    return cfg


# Logged figures of the machine rather than of the run: rates, memory, where the time went.
TIME_KEYS = tuple(f"time_{part}_s" for part in metrics.PARTS) + ("time_interval_s", "goodput")
MACHINE_KEYS = ("steps_per_sec", "tokens_per_sec", "peak_host_gb", *TIME_KEYS)


def _rows(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def _check_run(workdir, steps: int) -> None:
    """A finished run's log, last checkpoint and TensorBoard files."""
    rows = _rows(workdir)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for key in ("loss", "lr", "grad_norm", *MACHINE_KEYS):
        assert np.isfinite(rows[-1][key]), key
    assert sorted(os.listdir(workdir / "checkpoints")) == [str(steps)]
    assert list((workdir / "tb").glob("events.out.tfevents.*"))


# Run elsewhere: cogvideox_5b in the init/mesh test below, cogvideox1_5_5b_i2v in the gradient
# accumulation test, cogvideox1_5_5b (sft,runlocal) in test_context_parallel's trainer run.
ELSEWHERE = ("cogvideox_5b", "cogvideox1_5_5b_i2v", "cogvideox1_5_5b")


@pytest.mark.slow
@pytest.mark.parametrize("name", [c for c in CONFIGS if c not in ELSEWHERE])
def test_every_config_runs_two_steps(name, tmp_path):
    mode = "pretrain" if name.endswith("i2v") else "sft"
    extra = {"batch_size": 4, "grad_accum_steps": 2} if name == "cogvideox_2b" else {}
    cfg = _config(name, f"{mode},runlocal", total_steps=2, **{"evals.every_steps": 100}, **extra)
    dit.train_and_evaluate(cfg, str(tmp_path))
    _check_run(tmp_path, 2)


@pytest.mark.slow
def test_init_checkpoint_then_restore_onto_other_meshes_and_eval_mode(tmp_path, capsys):
    cfg = _config("cogvideox_5b")
    model = cj.Transformer(
        cj.transformer_config(cfg.model.variant, **cfg.model.overrides), rngs=nnx.Rngs(7)
    )
    cj.save_transformer(model, tmp_path / "init")
    every = {"evals.every_steps": 3, "init.checkpoint": str(tmp_path / "init")}
    dit.train_and_evaluate(_config("cogvideox_5b", total_steps=2, **every), str(tmp_path))
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2]
    assert f"initialised from {tmp_path / 'init'}" in capsys.readouterr().out
    # Saved on (fsdp 2), restored on (data 2, tensor 4): resumes from step 2.
    mesh = {"mesh.data": 2, "mesh.fsdp": 1, "mesh.tensor": 4, "mesh.num_devices": 0}
    dit.train_and_evaluate(_config("cogvideox_5b", total_steps=3, **mesh, **every), str(tmp_path))
    assert "resumed from step 2" in capsys.readouterr().out
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3] and np.isfinite(rows[-1]["loss"])
    assert "eval_loss" in rows[-1] and "eval_loss" not in rows[1]
    # Evaluating the final checkpoint on demand gives the eval of the run's last step, also on
    # another slice: 4 devices as (fsdp 2, context 2).
    other = {"mesh.data": 1, "mesh.fsdp": 2, "mesh.context": 2, "mesh.tensor": 1}
    other["mesh.num_devices"] = 4
    cfg = _config("cogvideox_5b", total_steps=3, mode="eval", **other, **every)
    got = dit.train_and_evaluate(cfg, str(tmp_path))
    assert got["step"] == 3
    np.testing.assert_allclose(got["eval_loss"], rows[-1]["eval_loss"], rtol=1e-5)
    # Training there: test_train_data.py's test_resume_on_another_layout.


@pytest.mark.slow
def test_resume_on_another_layout(tmp_path, capsys):
    """Saved on fsdp 8 (8 devices), resumed on fsdp 2 x context 2 (4 devices) with automatic
    gradient accumulation: one line says so, the data position is the one of the run that
    stayed, and so are its losses, up to the other layout's reduction order. (Packed data:
    test_data_pipeline.py moves a packed position between process counts; test_packing.py runs
    packed rows context-parallel.)"""
    old = {"batch_size": 8, "evals.batch_size": 8, "input.eval_examples": 8}  # synthetic clips
    old |= {"grad_accum_steps": 0, "mesh.num_devices": 8, "mesh.fsdp": 8}
    new = old | {"mesh.num_devices": 4, "mesh.fsdp": 2, "mesh.context": 2}
    every = {"evals.every_steps": 2, "ckpt.every_steps": 2}
    stay, moved = tmp_path / "stay", tmp_path / "moved"
    dit.train_and_evaluate(_config("cogvideox_5b", total_steps=4, **old, **every), str(stay))
    # The copy keeps step 2 only and resumes there (its rows after step 2 are dropped).
    shutil.copytree(stay, moved, ignore=shutil.ignore_patterns(".lock"))
    shutil.rmtree(moved / "checkpoints" / "4")
    capsys.readouterr()
    dit.train_and_evaluate(_config("cogvideox_5b", total_steps=4, **new, **every), str(moved))
    want = (
        "resumed on another slice: 4 device(s) (fsdp 2 x context 2) in 1 process(es), saved on "
        "8 device(s) (fsdp 8) in 1 process(es); gradient accumulation 4 micro-batch(es) of 2 "
        "rows (was 1 micro-batch(es) of 8 rows); the global batch stays 8"
    )
    out = capsys.readouterr().out
    assert want in out.splitlines(), out[-2000:]
    a, b = _rows(stay), _rows(moved)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    assert a[:2] == b[:2]
    for key in ("loss", "grad_norm", "eval_loss"):
        got = [r[key] for r in b[2:] if key in r]
        np.testing.assert_allclose(got, [r[key] for r in a[2:] if key in r], rtol=2e-5)
    positions = [
        (w / "checkpoints" / "4" / "data" / "process_0-of-1.json").read_text()
        for w in (stay, moved)
    ]
    assert positions[0] == positions[1]


# ---- The objective against diffusers' training scripts ----


def _diffusers_loss(model, scheduler, z0, noise, t, text, image_latents=None):
    """diffusers' CogVideoX training loss (examples/cogvideo/train_cogvideox_*.py), torch."""
    to_t = lambda x: torch.from_numpy(np.asarray(x, np.float32)).permute(0, 1, 4, 2, 3)  # noqa: E731
    z0_t, noise_t, tt = to_t(z0), to_t(noise), torch.from_numpy(np.asarray(t))
    noisy = scheduler.add_noise(z0_t, noise_t, tt)
    x_in = noisy if image_latents is None else torch.cat([noisy, to_t(image_latents)], dim=2)
    b, f, _, h, w = z0_t.shape
    with torch.no_grad():
        pred = model(
            hidden_states=x_in,
            encoder_hidden_states=torch.from_numpy(text),
            timestep=tt,
            image_rotary_emb=ref.rotary_tables(model, f, h, w),
            return_dict=False,
        )[0]
    x0_pred = scheduler.get_velocity(pred, noisy, tt)
    weights = 1 / (1 - scheduler.alphas_cumprod[tt])
    weights = weights.reshape(-1, 1, 1, 1, 1)
    return float(torch.mean((weights * (x0_pred - z0_t) ** 2).reshape(b, -1), dim=1).mean())


@pytest.mark.parametrize("variant, shift", [("2b", 3.0), ("5b-i2v", 1.0)])
def test_loss_equals_diffusers_training_formula(variant, shift, tmp_path):
    from diffusers import CogVideoXDPMScheduler

    theirs = ref.diffusers_transformer(variant, seed=3)
    theirs.save_pretrained(tmp_path)
    ours = cj.load_transformer(tmp_path)
    scheduler = CogVideoXDPMScheduler(
        snr_shift_scale=shift,
        beta_schedule="scaled_linear",
        rescale_betas_zero_snr=True,
        prediction_type="v_prediction",
        timestep_spacing="trailing",
    )
    rng = np.random.default_rng(0)
    c = 4  # the tiny models' latent channels
    z0 = rng.standard_normal((3, 3, 6, 8, c)).astype(np.float32)
    noise = rng.standard_normal(z0.shape).astype(np.float32)
    text = rng.standard_normal((3, 7, 16)).astype(np.float32)
    t = np.array([3, 480, 997])
    img = None
    if ours.cfg.in_channels == 2 * c:
        img = np.zeros_like(z0)
        img[:, :1] = rng.standard_normal(img[:, :1].shape)  # first-frame latent, zero-padded
    want = _diffusers_loss(theirs, scheduler, z0, noise, t, text, img)
    ab = jnp.asarray(diffusion.alphas_cumprod(diffusion.ScheduleConfig(snr_shift_scale=shift)))
    got = objective.diffusion_loss(ours, z0, text, t, noise, ab, img)
    np.testing.assert_allclose(float(got), want, rtol=2e-5)


def test_image_condition_scale_follows_the_vae_config(tmp_path):
    # 1.5-I2V's VAE config divides the image latent by scaling_factor (invert_scale_latents), the
    # others multiply: training must use the factor the sampling pipeline uses.
    from diffusers import AutoencoderKLCogVideoX

    from cogvideox_jax import vae as vae_lib

    for name, invert in [("cogvideox_5b_i2v", False), ("cogvideox1_5_5b_i2v", True)]:
        cfg = _config(name)
        sf = cfg.diffusion.scaling_factor
        vae_cfg = vae_lib.vae_config("tiny", scaling_factor=sf, invert_scale_latents=invert)
        assert cfg.vae.invert_scale_latents is invert
        scale = resolve(cfg).objective.image.scale
        assert scale == pytest.approx(1 / sf if invert else sf)
        assert vae_cfg.image_latent_scale == pytest.approx(1 / sf if invert else sf)
    # A frozen VAE whose config disagrees with the run's is refused before anything compiles.
    folder = tmp_path / "vae"
    tiny = vae_lib.vae_config("tiny", invert_scale_latents=False)
    AutoencoderKLCogVideoX(**tiny.to_diffusers()).save_pretrained(folder)
    cfg = _config("cogvideox1_5_5b_i2v", **{"vae.checkpoint": str(folder)})
    with pytest.raises(ValueError, match="invert_scale_latents"):
        dit.train_and_evaluate(cfg, str(tmp_path / "run"))


def test_auto_gradient_accumulation_is_one_example_per_data_shard():
    cfg = _config("cogvideox1_5_5b", "pretrain,frames=161,res=768x1360")
    assert cfg.grad_accum_steps == 0 and cfg.batch_size == 1024 and cfg.mesh.context == 2
    assert validate.grad_accum_steps(cfg, 32) == 32 and validate.grad_accum_steps(cfg, 64) == 16
    assert validate.grad_accum_steps(_config("cogvideox_5b", "sft"), 8) == 1  # SFT: one pass
    with pytest.raises(ValueError, match="grad_accum_steps must be >= 0"):
        resolve(_config("cogvideox_5b", grad_accum_steps=-1))


def test_explicit_uniform_sampling_bands():
    keys = jax.random.split(jax.random.PRNGKey(0), 400)
    t = np.stack([np.asarray(objective.eus_timesteps(k, 8, 4)) for k in keys])  # (400, 8)
    for row in range(8):
        band = row // 2  # 8 rows over 4 groups
        lo, hi = band * 250, (band + 1) * 250
        assert t[:, row].min() >= lo and t[:, row].max() < hi
        assert t[:, row].min() < lo + 10 and t[:, row].max() > hi - 10  # the band is covered
    # Any number of groups, and groups = 1 is plain uniform sampling.
    t3 = np.stack([np.asarray(objective.eus_timesteps(k, 6, 3)) for k in keys[:50]])
    assert (t3[:, :2] < 333).all() and ((t3[:, 2:4] >= 333) & (t3[:, 2:4] < 666)).all()
    assert (t3[:, 4:] >= 666).all() and (t3 < 1000).all()
    t1 = np.asarray(objective.eus_timesteps(keys[0], 4096, 1))
    assert t1.min() < 5 and t1.max() > 994


def test_latent_padding_for_temporal_patches():
    z = jnp.arange(3.0).reshape(1, 3, 1, 1, 1)
    np.testing.assert_array_equal(np.ravel(objective.pad_latent_frames(z, 2)), [0, 0, 1, 2])
    assert objective.pad_latent_frames(z, 1) is z


# ---- Resume ----


def _run(workdir, *overrides, wait=True, log=None):
    cmd = [sys.executable, "-m", "train", "--config", "configs/cogvideox_2b.py:sft,runlocal"]
    cmd += [NO_SAMPLES]
    cmd += ["--workdir", str(workdir), *overrides]
    env = compile_env() | {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    log = Path(log or f"{workdir}.log")
    with open(log, "ab") as err:  # a file (both streams): nobody drains a pipe while it runs
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=err, stderr=err)
    proc.log = log
    return _wait(proc) if wait else proc


def _wait(proc):
    proc.wait(timeout=300)
    assert proc.returncode == 0, proc.log.read_text()[-3000:]
    return proc


# What a run stopped by SIGTERM or SIGINT prints on stderr (train/preemption.py).
STOPPED = re.compile(r"stopped by (SIGTERM|SIGINT) at step (\d+): checkpoint of step \2 saved in ")


@pytest.mark.slow
def test_sigkill_or_sigterm_then_resume_is_bit_identical(tmp_path):
    steps = 90
    args = [
        f"--config.total_steps={steps}",
        "--config.ckpt.every_steps=10",
        "--config.evals.every_steps=30",
        "--config.log.progress=False",
    ]
    # The uninterrupted run goes on beside the one that is killed and the one that is stopped
    # (other workdirs), which start once the first has stepped: their programs then come from
    # the compilation cache.
    straight = _run(tmp_path / "straight", *args, wait=False)
    procs = [straight]
    try:
        _wait_for_rows(straight, tmp_path / "straight" / "metrics.jsonl", 1)
        # A second run on a live run's workdir (the live one paused meanwhile, so that it
        # cannot finish first; it holds its lock all the same) is refused at once.
        straight.send_signal(signal.SIGSTOP)
        second = _run(tmp_path / "straight", *args, wait=False, log=tmp_path / "second.log")
        procs.append(second)
        assert second.wait(timeout=120) == 2
        straight.send_signal(signal.SIGCONT)
        _refused(second, tmp_path / "straight", holder=straight)
        killed = _run(tmp_path / "killed", *args, wait=False)
        stopped = _run(tmp_path / "stopped", *args, wait=False)
        procs += [killed, stopped]
        _wait_for_rows(stopped, tmp_path / "stopped" / "metrics.jsonl", 25)
        assert stopped.poll() is None, "the run finished before the signal"
        stopped.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        stopped.send_signal(signal.SIGTERM)  # a second signal while it saves changes nothing
        metrics_file = tmp_path / "killed" / "metrics.jsonl"
        _wait_for_rows(killed, metrics_file, 40)  # at least 3 checkpoints started
        assert killed.poll() is None, "the run finished before it could be killed"
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        assert len(metrics_file.read_text().splitlines()) < steps
        assert stopped.wait(timeout=120) == 128 + signal.SIGTERM
        _wait(straight)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait()
    # SIGTERM: a checkpoint of the step in flight, one line saying where and how to resume.
    err = stopped.log.read_text()
    m = STOPPED.search(err)
    assert m and m.group(1) == "SIGTERM" and "run the same command to resume" in err, err[-3000:]
    step = int(m.group(2))
    assert 25 <= step < steps and (tmp_path / "stopped" / "checkpoints" / str(step)).is_dir()
    assert [r["step"] for r in _rows(tmp_path / "stopped")] == list(range(1, step + 1))
    for name in ("killed", "stopped"):
        _run(tmp_path / name, *args)  # the same command resumes
    assert f"resumed from step {step} " in stopped.log.read_text()
    log = killed.log.read_text()
    assert "resumed from step " in log and "resumed on another slice" not in log  # same slice
    # The killed run's lock died with it (the kernel's); its record is taken over, said once.
    took_over = f"ended without releasing it (host {socket.gethostname()}, PID {killed.pid}, "
    assert log.count(took_over) == 1, log[-3000:]
    for name in ("straight", "killed", "stopped"):  # a normal exit empties the record
        assert (tmp_path / name / ".lock").read_text() == ""

    keys = lambda r: {k: v for k, v in r.items() if k not in MACHINE_KEYS}  # noqa: E731
    straight = [keys(r) for r in _rows(tmp_path / "straight")]
    for name in ("killed", "stopped"):
        resumed = [keys(r) for r in _rows(tmp_path / name)]
        assert [r["step"] for r in resumed] == list(range(1, steps + 1))
        assert resumed == straight, name
    # TensorBoard, as it reads the event files (events past a restart's purge step hidden),
    # shows each step's loss once, with metrics.jsonl's values.
    tb = _tensorboard_scalars(tmp_path / "killed" / "tb", "loss")
    assert tb == {r["step"]: pytest.approx(r["loss"], rel=1e-6) for r in straight}


def _refused(proc, workdir: Path, *, holder) -> None:
    """`proc` was refused a workdir that `holder` runs in: one line, no traceback, no work."""
    text = proc.log.read_text()
    lines = [line for line in text.splitlines() if line.startswith("error")]
    assert len(lines) == 1, text[-3000:]
    want = (
        rf"error: {re.escape(str(workdir))} is in use by another run \(host "
        rf"{re.escape(socket.gethostname())}, PID {holder.pid}, since [^;]+; lock file "
        rf"{re.escape(str(workdir / '.lock'))}\): one run per workdir, so stop that run or "
        "use another --workdir"
    )
    assert re.fullmatch(want, lines[0]), lines[0]
    assert "Traceback" not in text and not (workdir / "error.txt").exists()
    assert "per-process batch" not in text  # stopped before the program was built


def _wait_for_rows(proc, metrics_file, n, timeout=240):
    """Until `metrics_file` has `n` rows (the run compiled and stepped), or `proc` ended."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)


def _tensorboard_scalars(folder, tag):
    """{step: value} of `tag` over the event files of `folder` in order, dropping earlier events
    at steps >= the step of a SessionLog START (TensorBoard's purge of orphaned data)."""
    import struct

    from tensorboardX.proto import event_pb2

    out = {}
    for path in sorted(Path(folder).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n])
            pos += 12 + n + 4
            if event.HasField("session_log") and event.session_log.status == 1:  # START
                out = {k: v for k, v in out.items() if k < event.step}
            for value in event.summary.value:
                if value.tag == tag:
                    out[event.step] = value.simple_value
    return out


# ---- Bad input ----


def _parse(*argv):
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True)
    fv(["train", *argv])
    return fv.config


def test_config_errors_name_the_rule(tmp_path):
    with pytest.raises(Exception, match="lrr"):
        _parse("--config=configs/cogvideox_5b.py:sft,runlocal", "--config.optim.lrr=1e-3")
    with pytest.raises(ValueError, match="unknown"):
        _config("cogvideox_5b", "sft,runlocl")
    cases = [
        ("cogvideox_5b", {"batch_size": 3}, "divisible by the data shards"),
        ("cogvideox_5b", {"input.num_frames": 11}, "4k\\+1"),
        ("cogvideox1_5_5b", {"input.num_frames": 13}, "8k\\+1"),
        ("cogvideox_5b", {"init.checkpoint": str(tmp_path / "nope")}, "init.checkpoint"),
        ("cogvideox_5b", {"mode": "evaluate"}, "config.mode"),
        ("cogvideox_5b", {"evals.sample_prompts": ("a",), "evals.sample_images": ("a.png",)},
         "for image-to-video runs"),
        ("cogvideox_5b_i2v", {"evals.sample_prompts": ("a", "b")}, "one first frame, or one per"),
        ("cogvideox_5b", {"evals.sample_prompts": ("a",), "evals.sample_guidance": 1.0,
                          "mesh.data": 2, "mesh.fsdp": 1}, "1 sampling rows"),
    ]  # fmt: skip
    for name, overrides, rule in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=rule):
            dit.train_and_evaluate(_config(name, **overrides), str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()  # failed before anything was written
    cfg = _parse("--config=configs/cogvideox1_5_5b.py:pretrain,frames=161,res=768x1360")
    assert (cfg.input.num_frames, cfg.input.height, cfg.input.width) == (161, 768, 1360)


@pytest.mark.parametrize(
    "name", ["cogvideox_5b", pytest.param("cogvideox_5b_i2v", marks=pytest.mark.slow)]
)
def test_runlocal_eval_samples(name, tmp_path):
    """The text-to-video runlocal configs sample their two prompts at each eval (image-to-video
    ones given first frames in evals.sample_images): without a model folder, with the stand-in
    text embeddings and the random tiny VAE. One mp4 per prompt (the run's clip size), the
    prompts in step_N.json, a contact sheet; different prompts, different videos; the same step,
    the same videos."""
    from PIL import Image

    from data.video import read_mp4, write_mp4
    from train import program, samples
    from train.run import resolve

    extra = {}
    if name.endswith("i2v"):
        assert not _config(name).evals.sample_prompts  # no first frames to give by default
        Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(tmp_path / "first.png")
        extra = {"evals.sample_prompts": ("a red ball rolls left", "a blue cube")}
        extra["evals.sample_images"] = (str(tmp_path / "first.png"),)
    cfg = _config(name, samples=True, **extra)
    assert len(cfg.evals.sample_prompts) == 2
    run = resolve(cfg)
    prog = program.make_program(run)
    with run.on_mesh():
        model = prog.model.merge(*_params(prog))
        sampler = samples.EvalSampler(run, str(tmp_path))
        assert sampler(model, 3) == {}
        again = sampler.sample(model, 3)
        np.testing.assert_array_equal(again, sampler.sample(model, 3))  # seeded by the step
    listing = json.loads((tmp_path / "samples" / "step_3.json").read_text())
    assert [x["caption"] for x in listing] == list(cfg.evals.sample_prompts)
    frames = [read_mp4(str(tmp_path / "samples" / x["file"]))[0] for x in listing]
    assert frames[0].shape == (9, 32, 32, 3)
    assert np.abs(frames[0].astype(float) - frames[1]).mean() > 1.0
    # Each file holds its prompt's frames: nearer them through the same encoder than the other's.
    for i in range(2):
        write_mp4(str(tmp_path / f"again{i}.mp4"), again[i], 8)
    coded = [read_mp4(str(tmp_path / f"again{i}.mp4"))[0].astype(float) for i in range(2)]
    for i in range(2):
        own, other = (np.abs(frames[i] - coded[j]).mean() for j in (i, 1 - i))
        assert own < other / 3, (own, other)
    assert np.asarray(Image.open(tmp_path / "samples" / "step_3.png")).shape[0] > 2 * 32


def _params(prog):
    """(trained part, fixed part) of a random train state of `prog`, every parameter moved by
    noise (the zero-initialised output projection included, so that the prompts matter)."""
    state = prog.random_state()
    leaves, tree = jax.tree.flatten(state["params"])
    rng = np.random.default_rng(0)
    moved = [x + 0.05 * rng.standard_normal(x.shape).astype(x.dtype) for x in leaves]
    return jax.tree.unflatten(tree, moved), prog.run.training.fixed(state, prog.frozen())


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    # An absurd learning rate makes the weights overflow within a few steps.
    cfg = _config("cogvideox_5b", total_steps=20, **{"optim.lr": 1e30, "ckpt.every_steps": 1})
    with pytest.raises(FloatingPointError, match="non-finite") as err:
        dit.train_and_evaluate(cfg, str(tmp_path))
    bad = int(str(err.value).split("at step ")[1].split()[0])
    assert bad < 20
    assert max(int(s) for s in os.listdir(tmp_path / "checkpoints")) == bad - 1


@pytest.mark.slow
def test_nonfinite_loss_skip_mode_keeps_weights_and_continues(tmp_path):
    import orbax.checkpoint as ocp

    cfg = _config(
        "cogvideox_5b",
        total_steps=6,
        on_nonfinite="skip",
        **{"optim.lr": 1e30, "ckpt.every_steps": 100, "evals.every_steps": 100},
    )
    dit.train_and_evaluate(cfg, str(tmp_path))
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 7))  # the run went on to the end
    skipped = [r["step"] for r in rows if r.get("skipped_nonfinite")]
    assert skipped and skipped[-1] == 6, rows
    assert all(not np.isfinite(r["loss"]) for r in rows if r["step"] in skipped)
    # Skipped updates leave the last finite weights and optimiser state in place.
    state = ocp.PyTreeCheckpointer().restore(tmp_path / "checkpoints" / "6" / "state")
    leaves = jax.tree.leaves({k: state[k] for k in ("params", "opt_state")})
    assert leaves and all(np.isfinite(np.asarray(x)).all() for x in leaves)
    assert int(state["step"]) == 6


@pytest.mark.slow
def test_gradient_accumulation_equals_the_whole_batch(tmp_path):
    # The same global batch in one pass or in micro-batches: same losses, gradients and updates
    # (1.5-I2V: the image condition and the temporal padding are split with the batch too).
    rows = {}
    for accum in (1, 2):
        cfg = _config(
            "cogvideox1_5_5b_i2v",
            total_steps=3,
            batch_size=4,
            grad_accum_steps=accum,
            **{"mesh.num_devices": 1, "evals.every_steps": 3, "ckpt.every_steps": 100},
        )
        dit.train_and_evaluate(cfg, str(tmp_path / str(accum)))
        _check_run(tmp_path / str(accum), 3)
        rows[accum] = _rows(tmp_path / str(accum))
    for one, two in zip(rows[1], rows[2], strict=True):
        for key in ("loss", "grad_norm", "eval_loss"):
            if key in one:
                np.testing.assert_allclose(two[key], one[key], rtol=2e-5, err_msg=key)


# ---- The built-in demo (configs/demo.py) ----


def test_demo_prompt_adherence_scorer(tmp_path):
    from data import demo, video

    for i in range(demo.NUM_CAPTIONS):
        frames, caption = demo.make_clip(i, seed=0)
        assert frames.shape == (9, 32, 32, 3) and -1 <= frames.min() <= frames.max() <= 1
        assert demo.prompt_adherence(frames, caption) == 1.0, caption
        colour, shape, direction = demo.caption_parts(i)
        other_colour = next(c for c in demo.COLOURS if c != colour)
        other_dir = next(d for d in demo.DIRECTIONS if d != direction)
        other_shape = next(s for s in demo.SHAPES if s != shape)
        assert demo.read_clip(frames) == (colour, shape, direction)
        assert demo.prompt_adherence(frames, f"a {other_colour} {shape} moving {direction}") == 0
        assert demo.prompt_adherence(frames, f"a {colour} {other_shape} moving {direction}") == 0
        assert demo.prompt_adherence(frames, f"a {colour} {shape} moving {other_dir}") == 0
        as_01 = frames / 2 + 0.5
        assert demo.prompt_adherence(as_01, caption, value_range=(0.0, 1.0)) == 1.0
    # Read back from the mp4 files the demo writes (colour subsampled, compressed) as well.
    for i in range(0, demo.NUM_CAPTIONS, 3):
        frames, caption = demo.make_clip(i, seed=1)
        video.write_mp4(tmp_path / "clip.mp4", frames / 2 + 0.5, 8)
        decoded, _ = video.read_mp4(tmp_path / "clip.mp4")
        assert demo.read_clip(decoded, value_range=(0, 255)) == demo.caption_parts(i), caption
    # The shape is read from the corners of its bounding box, so a square drawn soft (blurred)
    # or with bowed edges, as a sampled square often is, still reads as a square, and a disc
    # drawn soft as a disc.
    yy, xx = np.mgrid[0:32, 0:32] + 0.5

    def bow(t):  # each edge bowed in by 1 px at its middle (the square fills 0.84 of its box)
        return np.cos(np.clip(np.abs(t - 16), 0, 8) / 8 * np.pi / 2)

    shapes = {
        "square": (np.abs(xx - 16) <= 8 - bow(yy)) & (np.abs(yy - 16) <= 8 - bow(xx)),
        "circle": (xx - 16) ** 2 + (yy - 16) ** 2 <= 81,
    }
    for shape, inside in shapes.items():
        for blur in (0, 1):
            alpha = inside.astype(np.float32)
            for _ in range(blur):  # a 3x3 box blur
                alpha = (
                    sum(np.roll(alpha, (dy, dx), (0, 1)) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
                    / 9
                )
            frame = alpha[..., None] * np.asarray(demo.COLOURS["blue"]) * 2 - 1
            assert demo.read_clip(np.repeat(frame[None], 3, 0))[:2] == ("blue", shape), (
                shape,
                blur,
            )
    ids = demo.tokenize(["a red circle moving left", ""])
    assert ids.shape == (2, demo.TEXT_LEN) and ids[0, 4] > 1 and not ids[1].any()


def test_demo_run_resolves_and_its_text_encoder_tells_captions_apart():
    from data import demo as demo_data
    from train import demo

    c = importlib.import_module("configs.demo").get_config("runlocal")
    r = resolve(c)
    assert r.demo and r.data == "demo" and not r.i2v
    # 9 frames -> 3 latents; 32x32 pixels -> 4x4 latents -> 2x2 tokens of 2x2 patches.
    assert r.tokens_per_example == 3 * 2 * 2 + c.input.text_len
    captions = [demo_data.caption(i) for i in range(3)]
    encoder = demo.text_encoder(c.demo, c.seed + 5)
    table = demo.embed(encoder, captions + captions[:1], c.input.text_len)
    assert table.shape == (4, c.input.text_len, c.input.text_dim) and np.isfinite(table).all()
    np.testing.assert_array_equal(table[3], table[0])  # the same caption, the same conditioning
    for i in range(3):
        for j in range(i):
            assert np.abs(table[i] - table[j]).max() > 1e-3, (captions[i], captions[j])


def test_end_of_run_summary(tmp_path):
    from train import metrics

    rows = [
        {"step": 1, "loss": 1.0, "tokens_per_sec": 100.0},
        {"step": 2, "loss": 0.9, "tokens_per_sec": 300.0, "eval_loss": 0.5},
        {"step": 3, "loss": 0.8, "tokens_per_sec": 200.0},
        {"step": 4, "loss": 0.7, "tokens_per_sec": 200.0, "eval_loss": 0.6},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = metrics.summary(str(tmp_path), checkpoints=[2, 4], demo=False, model="")
    lines = text.splitlines()
    assert lines[0] == f"run finished at step 4 ({tmp_path})"
    assert "  eval_loss: final 0.6 (step 4), best 0.5 (step 2)" in lines
    assert "  throughput: 200 tokens/s (median of the logs)" in lines
    assert f"  checkpoints: {tmp_path / 'checkpoints'} (steps [2, 4])" in lines
    assert f"python -m tools.sample --model {tmp_path} --base MODEL" in text
    assert f"python -m tools.convert run-to-diffusers {tmp_path} OUT" in text
    demo = metrics.summary(str(tmp_path), checkpoints=[4], demo=True, model="", guidance=2.0)
    want = (
        f'tools.sample --model {tmp_path} --prompt "a red circle moving left" --guidance-scale 2 '
    )
    assert want in demo  # the scale the demo samples with, not the tool's default
    assert f"run-to-diffusers {tmp_path} OUT [--ema]" in demo  # its own VAE and text encoder
    assert "--base" not in demo and "prompt_adherence" not in demo


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, demo_vae):
    """One runlocal demo run, from the session's trained demo VAE (conftest.demo_vae)."""
    import shutil

    workdir = tmp_path_factory.mktemp("demo")
    shutil.copytree(demo_vae, workdir / "demo_vae")
    cfg = importlib.import_module("configs.demo").get_config("runlocal")
    cfg.lock()
    dit.train_and_evaluate(cfg, str(workdir))
    return workdir


@pytest.mark.slow
def test_demo_runlocal_end_to_end(demo_run):
    rows = _rows(demo_run)
    assert [r["step"] for r in rows] == list(range(1, 7))
    scored = [r for r in rows if "prompt_adherence" in r]
    assert [r["step"] for r in scored] == [3, 6]
    assert all(0.0 <= r["prompt_adherence"] <= 1.0 for r in scored)
    for r in scored:  # all three parts right is at most as often as each part is
        parts = [r[f"adherence_{p}"] for p in ("colour", "shape", "direction")]
        assert all(0.0 <= x <= 1.0 for x in parts) and r["prompt_adherence"] <= min(parts)
    samples = demo_run / "samples"
    from PIL import Image

    for step, row in zip((3, 6), scored, strict=True):
        for i in range(2):
            assert (samples / f"step_{step}_{i}.mp4").stat().st_size > 0
        # Each sample's caption and score beside it, and one contact sheet per eval: a row of
        # the 9 frames (32x32, drawn 4x) per sample, 14 pixels of caption under each, 2 apart.
        listing = json.loads((samples / f"step_{step}.json").read_text())
        assert [e["file"] for e in listing] == [f"step_{step}_{i}.mp4" for i in range(2)]
        assert all(e["caption"].startswith("a ") for e in listing)
        mean = np.mean([e["prompt_adherence"] for e in listing])
        assert mean == pytest.approx(row["prompt_adherence"])
        sheet = Image.open(samples / f"step_{step}.png")
        assert sheet.size == (9 * (128 + 2) + 2, 2 * (128 + 14 + 2) + 2)
    assert (samples / "vae_reconstruction.mp4").is_file()
    assert (demo_run / "demo_vae" / "meta.json").is_file()


@pytest.mark.slow
def test_demo_run_samples_from_the_command_line(demo_run, tmp_path, capsys):
    from data.video import read_mp4
    from tools import sample

    out = tmp_path / "v.mp4"
    argv = ["--model", str(demo_run), "--steps", "3", "--guidance-scale", "4", "--out", str(out)]
    assert sample.main([*argv, "--prompt", "a red circle moving left"]) == 0
    assert "demo VAE: restored from" in capsys.readouterr().out
    frames, fps = read_mp4(out)
    assert frames.shape == (9, 32, 32, 3) and fps == 8  # the run's clip size by default
    # Words outside the demo's captions: one line, exit 2.
    assert sample.main([*argv, "--prompt", "a purple circle moving left"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "knows only its captions' words, not ['purple']" in err[0], err


@pytest.mark.slow
def test_demo_run_exports_as_a_diffusers_model(demo_run, tmp_path):
    from diffusers import CogVideoXPipeline

    from cogvideox_jax.pipeline import Pipeline
    from tools import convert as convert_tool
    from train import export

    out = tmp_path / "model"
    assert convert_tool.main(["run-to-diffusers", str(demo_run), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "model_index.json",
        "scheduler",
        "text_encoder",
        "tokenizer",
        "transformer",
        "vae",
    ]
    prompt = "A red circle moving left"  # the tokenizer lower-cases, as the demo's does
    noise = np.random.default_rng(5).standard_normal((1, 3, 4, 4, 16)).astype(np.float32)
    kw = dict(height=32, width=32, num_frames=9, num_inference_steps=3, guidance_scale=4.0)
    demo, _ = export.pipeline(str(demo_run))  # the run itself: DemoPipeline
    got = demo(prompt, latents=noise, output_type="latent", **kw)
    # The demo trained its dropped captions as zero embeddings: the negative prompt of its CFG.
    neg = np.zeros((1, 8, 32), np.float32)
    ours = Pipeline.from_pretrained(out)(
        prompt, latents=noise, negative_prompt_embeds=neg, output_type="latent", **kw
    )
    assert ref.rel_l2(ours, got) <= 1e-5, ref.rel_l2(ours, got)
    pipe = CogVideoXPipeline.from_pretrained(out)
    embeds, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=8)
    want = pipe(
        prompt_embeds=embeds,
        negative_prompt_embeds=torch.from_numpy(neg),
        latents=torch.from_numpy(noise).permute(0, 1, 4, 2, 3),
        output_type="latent",
        **kw,
    ).frames
    want = want.permute(0, 1, 3, 4, 2).numpy()
    assert ref.rel_l2(got, want) <= 1e-4, ref.rel_l2(got, want)


@pytest.mark.slow
def test_demo_loss_goes_down(demo_vae, tmp_path, capsys):
    import shutil

    shutil.copytree(demo_vae, tmp_path / "demo_vae")  # skip the VAE stage
    cfg = importlib.import_module("configs.demo").get_config("runlocal")
    cfg.total_steps = 200
    cfg.evals.every_steps = 10_000
    cfg.ckpt.every_steps = 10_000
    cfg.log.progress = False
    cfg.lock()
    dit.train_and_evaluate(cfg, str(tmp_path))
    assert "demo VAE: restored from" in capsys.readouterr().out  # same settings: cache reused
    losses = [r["loss"] for r in _rows(tmp_path)]
    assert len(losses) == 200
    first, last = np.mean(losses[:20]), np.mean(losses[-20:])
    assert last < 0.7 * first, (first, last)
