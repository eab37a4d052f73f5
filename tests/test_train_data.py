"""The trainer on prepared datasets (tools.prepare_data over real mp4 files): the demo config
on raw clips, bucketed and packed, and a model config on precomputed latents and on raw clips
encoded on the fly."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import reference as ref
from conftest import compile_env
from test_train import _config, _rows

from data import demo as demo_data
from data import prepared, video
from train import dit

ROOT = Path(__file__).resolve().parents[1]


def _prepare(src, out, *args, devices=2):
    env = compile_env(devices)
    cmd = [sys.executable, "-m", "tools.prepare_data", str(src), str(out), *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd}:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Demo-style captioned clips of three sizes and lengths as mp4 files, and three bad entries
    (a corrupt file, a clip too short, a missing caption)."""
    root = tmp_path_factory.mktemp("clips")
    rows = []
    sizes = [(9, 32, 32), (9, 32, 48), (5, 32, 32)]
    for i in range(24):
        colour, shape, direction = demo_data.caption_parts(i)
        frames, height, width = sizes[i % 3]
        clip = demo_data.render(colour, shape, direction, num_frames=frames, size=48)
        top, left = (48 - height) // 2, (48 - width) // 2
        clip = clip[:, top : top + height, left : left + width]
        video.write_mp4(root / f"clip{i}.mp4", clip / 2 + 0.5, fps=8)
        rows.append((f"clip{i}.mp4", demo_data.caption(i)))
    video.write_mp4(root / "short.mp4", np.zeros((2, 32, 32, 3)), fps=8)
    data = (root / "clip0.mp4").read_bytes()
    (root / "corrupt.mp4").write_bytes(data[: len(data) // 3])
    video.write_mp4(root / "nocaption.mp4", np.zeros((9, 32, 32, 3)), fps=8)
    rows += [("short.mp4", "too short"), ("corrupt.mp4", "cut"), ("nocaption.mp4", "")]
    (root / "videos.txt").write_text("".join(f"{p}\n" for p, _ in rows))
    (root / "prompts.txt").write_text("".join(f"{c}\n" for _, c in rows))
    return root


# 18 training clips (6 of each shape) and 6 held out (2 of each): bucketed batches of 2 and 4.
BUCKETS = ("--fps", 8, "--buckets", "9x32x32,9x32x48,5x32x32", "--eval_examples", 6)


@pytest.fixture(scope="module")
def raw(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "raw"
    proc = _prepare(folder, out, *BUCKETS)
    return out, proc.stdout


def test_prepared_folder_reports_the_bad_entries(raw):
    out, stdout = raw
    ds = prepared.open_prepared(out)
    assert ds.kind == "clips"
    assert (len(ds.source("train")), len(ds.source("eval"))) == (18, 6)
    skipped = {r["path"] for r in ds.skipped()}
    assert skipped == {"short.mp4", "corrupt.mp4", "nocaption.mp4"}
    for name in skipped:
        assert name in stdout


@pytest.mark.slow
def test_demo_trains_on_a_prepared_folder_with_packing(raw, demo_vae, tmp_path):
    out, _ = raw  # (bucketing: the model-config tests below)
    shutil.copytree(demo_vae, tmp_path / "demo_vae")  # the demo's own clips train it
    cfg = _config(
        "demo",
        "runlocal",
        total_steps=4,
        **{
            "input.data_dir": str(out),
            "input.packing": True,
            "evals.every_steps": 4,
            "evals.batch_size": 2,
            "ckpt.every_steps": 2,
        },
    )
    last = dit.train_and_evaluate(cfg, str(tmp_path))
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert np.isfinite(last["eval_loss"]) and "prompt_adherence" in last
    # Several demo clips share a row: the budget is mostly real tokens.
    assert all(0.5 < r["packing_efficiency"] <= 1.0 for r in rows)
    # Resume from step 2: the data position comes back with the checkpoint.
    shutil.rmtree(tmp_path / "checkpoints" / "4")
    dit.train_and_evaluate(cfg, str(tmp_path))
    again = _rows(tmp_path)
    for key in ("loss", "grad_norm", "packing_efficiency", "eval_loss"):
        assert [r.get(key) for r in again] == [r.get(key) for r in rows], key


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny model folder whose encoders match the runlocal configs (text 8 x 16)."""
    folder = tmp_path_factory.mktemp("model") / "model"
    ref.tiny_model_folder(folder, text_len=8, scaling_factor=0.7)
    return folder


@pytest.fixture(scope="module")
def latents(folder, model, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "latents"
    _prepare(folder, out, *BUCKETS, "--model", model)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("packing", [False, True])
def test_model_config_trains_on_precomputed_latents(latents, packing, tmp_path):
    out = latents
    ds = prepared.open_prepared(out)
    assert ds.kind == "latents" and ds.meta["scaling_factor"] == 0.7
    overrides = {"input.data_dir": str(out), "input.packing": packing, "evals.every_steps": 2}
    cfg = _config("cogvideox_5b", "sft,runlocal", total_steps=2, **overrides)
    proc = None
    if not packing:  # `python -m train` with 2 Grain worker processes reads the same batches
        cmd = [sys.executable, "-m", "train", "--config", "configs/cogvideox_5b.py:sft,runlocal"]
        cmd += ["--workdir", str(tmp_path / "workers"), "--config.total_steps=2"]
        cmd += [f"--config.input.data_dir={out}", "--config.input.workers=2"]
        cmd += ["--config.evals.every_steps=2"]
        # It runs beside this process's run (below), into its own workdir.
        log = tmp_path / "workers.log"
        with open(log, "w") as err:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=compile_env(), stdout=subprocess.DEVNULL, stderr=err
            )
    try:
        last = dit.train_and_evaluate(cfg, str(tmp_path / "run"))
        if proc is not None:
            proc.wait(timeout=600)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
    assert np.isfinite(last["loss"]) and np.isfinite(last["eval_loss"])
    assert ("packing_efficiency" in last) == packing
    if not packing:
        assert proc.returncode == 0, log.read_text()[-3000:]
        want = [(r["loss"], r.get("eval_loss", 0.0)) for r in _rows(tmp_path / "run")]
        got = [(r["loss"], r.get("eval_loss", 0.0)) for r in _rows(tmp_path / "workers")]
        np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.slow
def test_model_config_encodes_raw_clips_on_the_fly(raw, model, tmp_path):
    overrides = {"input.data_dir": str(raw[0]), "input.encoder_model": str(model)}
    cfg = _config("cogvideox_5b", "sft,runlocal", total_steps=2, **overrides)
    last = dit.train_and_evaluate(cfg, str(tmp_path))
    assert np.isfinite(last["loss"])
    # Without encoders a raw dataset is refused, naming the folder and the way out.
    cfg = _config("cogvideox_5b", "sft,runlocal", total_steps=2, **{"input.data_dir": str(raw[0])})
    with pytest.raises(ValueError, match="raw clips: set input.encoder_model"):
        dit.train_and_evaluate(cfg, str(tmp_path / "b"))


@pytest.mark.slow
def test_a_latent_dataset_from_another_vae_is_refused(latents, tmp_path):
    out = latents
    meta = json.loads((out / "meta.json").read_text())
    assert meta["scaling_factor"] == 0.7
    cfg = _config(
        "cogvideox_2b", "sft,runlocal", total_steps=1, **{"input.data_dir": str(out)}
    )  # 2B's VAE scaling factor is 1.15258426
    with pytest.raises(ValueError, match="scaling_factor"):
        dit.train_and_evaluate(cfg, str(tmp_path / "run"))
