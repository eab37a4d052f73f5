"""Tests for train/export.py and the commands on top of it: a training run becomes a model
(`tools.convert run-to-diffusers / run-to-orbax`) and samples (`tools.sample --model RUN`); and
the one-line errors (exit code 2) of the conversion and sampling commands."""

import importlib
import json

import ml_collections
import numpy as np
import pytest
import reference as ref
import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel
from flax import nnx

import cogvideox_jax as cj
from cogvideox_jax import weights
from cogvideox_jax.layers import Buffer
from cogvideox_jax.pipeline import Pipeline
from tools import convert as convert_tool
from tools import sample
from train import checkpoint, dit, export

TEXT_LEN = 8  # the runlocal configs' text length and width (16)


def _base_model(folder):
    """A whole diffusers model folder that the runlocal configs' transformer goes with: the tiny
    VAE, a width-16 T5 and its tokenizer, CogVideoX's scheduler; its transformer/ holds only a
    config (the run's transformer replaces it)."""
    ref.tiny_model_folder(folder, text_len=TEXT_LEN, scaling_factor=0.7)
    CogVideoXDDIMScheduler(**ref.SCHEDULER_CONFIG).save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "CogVideoXPipeline",
        "scheduler": ["diffusers", "CogVideoXDDIMScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"],
        "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLCogVideoX"],
    }
    (folder / "model_index.json").write_text(json.dumps(index))


SAMPLE_PROMPTS = ("a red ball", "a blue cube")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(workdir, base model folder) of a 4-step cogvideox_5b sft,runlocal run with EMA that
    checkpoints every 2 steps and records the base (input.encoder_model)."""
    base = tmp_path_factory.mktemp("base") / "model"
    _base_model(base)
    cfg = importlib.import_module("configs.cogvideox_5b").get_config("sft,runlocal")
    cfg.total_steps = 4
    cfg.ckpt.update(every_steps=2, keep=2)
    cfg.optim.ema_decay = 0.5
    cfg.input.encoder_model = str(base)
    cfg.evals.update(every_steps=2, sample_prompts=SAMPLE_PROMPTS, sample_steps=2)
    cfg.lock()
    workdir = tmp_path_factory.mktemp("run")
    dit.train_and_evaluate(cfg, str(workdir))
    return workdir, base


def _flat(model) -> dict:
    state = nnx.state(model, (nnx.Param, Buffer))
    return {k: np.asarray(v) for k, v in weights.flatten(nnx.to_pure_dict(state)).items()}


def _inputs(cfg, seed=0):
    rng = np.random.default_rng(seed)
    lat = rng.standard_normal((2, 3, 4, 6, cfg.in_channels)).astype(np.float32)
    txt = rng.standard_normal((2, TEXT_LEN, cfg.text_embed_dim)).astype(np.float32)
    return lat, txt, np.array([900, 20])


@pytest.mark.slow
def test_run_to_diffusers_loads_in_diffusers_with_the_runs_output(run, tmp_path):
    workdir, base = run
    out = tmp_path / "model"
    argv = ["run-to-diffusers", str(workdir), str(out), "--ema", "--base", str(base)]
    assert convert_tool.main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in base.iterdir())

    ours, meta, folder = export.transformer(str(workdir), ema=True)
    assert folder.endswith("4") and meta["training"] == "full" and meta["model"] == str(base)
    theirs = CogVideoXTransformer3DModel.from_pretrained(out / "transformer").eval()
    lat, txt, t = _inputs(ours.cfg)
    want = ref.transformer_forward(theirs, lat, txt, t)
    got = np.asarray(ours(lat, txt, t))
    assert ref.rel_l2(got, want) <= 1e-5, ref.rel_l2(got, want)

    # Byte-level: what the diffusers folder loads back is the checkpoint's EMA, bit for bit.
    stored = checkpoint.read_weights(folder, ema=True)
    back = _flat(cj.load_transformer(out))
    assert sorted(back) == sorted(stored)
    for k, v in stored.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    params = checkpoint.read_weights(folder)
    assert any(not np.array_equal(params[k], stored[k]) for k in stored)  # EMA is not params

    # The whole folder samples in diffusers as it does here from the run.
    pipe, _ = export.pipeline(str(workdir), ema=True)
    h, w, f = 32, 48, 5
    noise = np.random.default_rng(3).standard_normal((1, 2, h // 8, w // 8, 16)).astype("float32")
    kw = dict(height=h, width=w, num_frames=f, num_inference_steps=2, guidance_scale=4.0)
    got = pipe("a red ball", latents=noise, output_type="latent", **kw)
    diffusers_pipe = CogVideoXPipeline.from_pretrained(out)
    latents = torch.from_numpy(noise).permute(0, 1, 4, 2, 3)
    want = diffusers_pipe(
        prompt="a red ball",
        latents=latents,
        output_type="latent",
        max_sequence_length=TEXT_LEN,
        **kw,
    ).frames
    want = want.permute(0, 1, 3, 4, 2).numpy()
    assert ref.rel_l2(got, want) <= 1e-4, ref.rel_l2(got, want)
    again = Pipeline.from_pretrained(out)("a red ball", latents=noise, output_type="latent", **kw)
    np.testing.assert_array_equal(again, got)


@pytest.mark.slow
def test_run_to_orbax_of_a_chosen_step_and_sampling_from_the_run(run, tmp_path, capsys):
    workdir, base = run
    out = tmp_path / "orbax"
    assert convert_tool.main(["run-to-orbax", str(workdir), str(out), "--step", "2"]) == 0
    assert (out / "config.json").is_file()  # a transformer component folder
    stored = checkpoint.read_weights(checkpoint.step_folder(str(workdir), 2))
    back = _flat(cj.load_transformer(out))
    for k, v in stored.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    latest = checkpoint.read_weights(checkpoint.step_folder(str(workdir)))
    assert any(not np.array_equal(latest[k], stored[k]) for k in stored)

    video = tmp_path / "v.mp4"
    argv = ["--model", str(workdir), "--prompt", "a red ball", "--out", str(video)]
    size = ["--height", "32", "--width", "48", "--num-frames", "5", "--steps", "2"]
    assert sample.main([*argv, *size]) == 0
    printed = capsys.readouterr().out
    assert "loaded the run's weights of" in printed
    from data.video import read_mp4

    frames, _ = read_mp4(str(video))
    assert frames.shape[1:] == (32, 48, 3) and f"wrote {video}: {len(frames)} frames" in printed
    # --step that does not exist: one line, exit 2.
    assert sample.main([*argv, *size, "--step", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {workdir}: no checkpoint of step 3 (it has [2, 4])", err


def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys):
    folder = tmp_path / "component"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLCogVideoX"}))
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    cases = [
        (
            convert_tool.main,
            ["diffusers-to-orbax", str(folder), str(tmp_path / "out")],
            f"{folder / 'model.safetensors'}: not a readable safetensors file",
        ),
        (
            convert_tool.main,
            ["run-to-diffusers", str(tmp_path / "nowhere"), str(tmp_path / "out")],
            f"{tmp_path / 'nowhere'}: no training checkpoint",
        ),
        (
            sample.main,
            ["--model", str(tmp_path / "nowhere"), "--prompt", "a", "--out", "v.mp4"],
            f"--model {tmp_path / 'nowhere'}: no such folder",
        ),
        (
            sample.main,
            ["--model", str(tmp_path), "--prompt", "a", "--out", "v.mp4", "--strength", "0.5"],
            "--strength is for video-to-video: pass --video IN.mp4 too",
        ),
        (
            sample.main,
            ["--model", str(tmp_path), "--prompt", "a", "--out", "v.mp4", "--video", "no.mp4"],
            "--video no.mp4: no such file",
        ),
        (
            sample.main,
            ["--model", str(tmp_path), "--prompt", "a", "--out", "v.mp4", "--invert", "no.mp4"],
            "--invert no.mp4: no such file",
        ),
        (
            sample.main,
            ["--model", str(tmp_path), "--prompt", "a", "--out", "v.mp4", "--invert", "i.mp4"]
            + ["--scheduler", "dpm"],
            "--invert samples with --scheduler ddim",
        ),
        (
            sample.main,
            ["--model", str(tmp_path), "--prompt", "a", "--out", "v.mp4", "--mesh", "data=3"],
            "--mesh data=3: 3 devices, but this machine has 8",
        ),
        (
            sample.main,
            ["--model", str(tmp_path), "--prompt", "a", "--out", "v.mp4", "--mesh", "pods=8"],
            "--mesh pods=8: 'pods=8' is not AXIS=SIZE with AXIS one of",
        ),
    ]
    for main, argv, start in cases:
        assert main(argv) == 2, argv
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {start}"), captured.err
    (tmp_path / "out").mkdir()
    assert convert_tool.main(["diffusers-to-orbax", str(folder), str(tmp_path / "out")]) == 2
    assert "(pass --overwrite" in capsys.readouterr().err


@pytest.mark.slow  # the fast subset samples during training through tests/test_cli.py
def test_samples_during_training_equal_sampling_from_the_run(run, tmp_path):
    """evals.sample_prompts: at each eval (steps 2 and 4) the run wrote one mp4 per prompt, their
    prompts in step_N.json and a contact sheet with a row per sample. What the eval sampler
    draws on the training mesh (fsdp 2) from the step-2 weights is what sampling from the
    step-2 checkpoint afterwards gives on one device, and the mp4 holds those frames."""
    from PIL import Image

    from data.video import read_mp4, write_mp4
    from train import run as run_lib
    from train import samples

    workdir, _ = run
    out = workdir / "samples"
    for step in (2, 4):
        listing = json.loads((out / f"step_{step}.json").read_text())
        assert [x["caption"] for x in listing] == list(SAMPLE_PROMPTS)
        assert [x["file"] for x in listing] == [f"step_{step}_{i}.mp4" for i in range(2)]
        sheet = np.asarray(Image.open(out / f"step_{step}.png"))
        assert sheet.shape[0] > 2 * 32  # two rows of 32-pixel frames, captions under them
    pipe, folder = export.pipeline(str(workdir), step=2)
    cfg = ml_collections.ConfigDict(json.loads(checkpoint.read_meta(folder)["config"]))
    want = pipe(
        list(SAMPLE_PROMPTS), height=32, width=32, num_frames=9, num_inference_steps=2,
        guidance_scale=cfg.evals.sample_guidance, seed=cfg.seed + 2,
    )  # fmt: skip
    trained = run_lib.resolve(cfg)
    with trained.on_mesh():
        got = samples.EvalSampler(trained, str(tmp_path)).sample(pipe.transformer, 2)
    assert ref.rel_l2(got, want) <= 1e-5
    # Each file holds its prompt's frames: nearer them through the same encoder than the other
    # prompt's (H.264 moves these noise-like frames by ~8 levels on average, and a last-bit
    # change in its input by a few in places, so no exact comparison).
    again = []
    for i in range(2):
        write_mp4(str(tmp_path / f"want{i}.mp4"), want[i], 8)
        again.append(read_mp4(str(tmp_path / f"want{i}.mp4"))[0].astype(float))
    for i in range(2):
        frames, fps = read_mp4(str(out / f"step_2_{i}.mp4"))
        assert frames.shape == (9, 32, 32, 3) and fps == 8
        own, other = (np.abs(frames - again[j]).mean() for j in (i, 1 - i))
        assert own < 3.0 and own < other / 3, (own, other)
