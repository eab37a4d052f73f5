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


# A user's own clips: six sizes (frames, height, width), 17-49 frames, 64x96 to 128x224 pixels.
OWN_SIZES = [
    (17, 64, 96),
    (25, 96, 128),
    (33, 80, 144),
    (49, 128, 224),
    (41, 112, 160),
    (21, 64, 112),
]


@pytest.fixture(scope="module")
def own_clips(tmp_path_factory):
    """Twelve demo-style mp4 clips, each size twice; the first two are held out."""
    root = tmp_path_factory.mktemp("own")
    rows = []
    for i, (frames, height, width) in enumerate(OWN_SIZES * 2):
        colour, shape, direction = demo_data.caption_parts(i)
        side = max(height, width)
        clip = demo_data.render(colour, shape, direction, num_frames=frames, size=side)
        top, left = (side - height) // 2, (side - width) // 2
        clip = clip[:, top : top + height, left : left + width]
        video.write_mp4(root / f"clip{i}.mp4", clip / 2 + 0.5, fps=8)
        rows.append((f"clip{i}.mp4", demo_data.caption(i)))
    (root / "videos.txt").write_text("".join(f"{p}\n" for p, _ in rows))
    (root / "prompts.txt").write_text("".join(f"{c}\n" for _, c in rows))
    return root


def _demo(workdir, demo_vae, data, *overrides):
    """`python -m train` on the demo's runlocal config over a prepared folder (the demo VAE
    copied in): (exit code, stdout, stderr)."""
    if not (workdir / "demo_vae").exists():
        shutil.copytree(demo_vae, workdir / "demo_vae")
    cmd = [sys.executable, "-m", "train", "--config", "configs/demo.py:runlocal"]
    cmd += ["--workdir", str(workdir), f"--config.input.data_dir={data}", "--config.total_steps=2"]
    cmd += ["--config.evals.every_steps=2", *overrides]
    env = compile_env(devices=1)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def own_native(own_clips, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "native"
    _prepare(own_clips, out, "--eval_examples", 2)  # raw clips: their own sizes by default
    return out


# Two packed rows a step; held-out batches are of one shape, and the two held-out clips differ.
PACKED = ("--config.input.packing=True", "--config.batch_size=2", "--config.evals.batch_size=1")


@pytest.mark.slow
def test_demo_packs_its_own_sized_clips(own_native, demo_vae, tmp_path):
    ds = prepared.open_prepared(own_native)
    assert {tuple(s) for s in ds.shapes("train")} == set(OWN_SIZES)  # each clip its own size
    code, out, err = _demo(tmp_path, demo_vae, own_native, *PACKED)
    assert code == 0, err[-3000:]
    # The budget comes from the demo VAE's token counts (49x128x224: 13 x 8 x 14 = 1456 video
    # tokens, rounded up to 1536): 2 x 1536, not a CogVideoX-sized row.
    assert "packing: rows of 3072 video tokens and up to 10 clips" in out
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert all(r["packing_efficiency"] >= 0.85 for r in rows), [
        r["packing_efficiency"] for r in rows
    ]
    assert all(r["peak_host_gb"] < 4.0 for r in rows), [r["peak_host_gb"] for r in rows]
    assert np.isfinite(rows[-1]["eval_loss"]) and "prompt_adherence" in rows[-1]
    assert "peak host memory:" in out  # the end-of-run summary
    # (A packed run's data position is restored bit for bit: test_data_pipeline's resume tests.)


@pytest.mark.slow
def test_demo_buckets_its_own_clips(own_clips, demo_vae, tmp_path):
    # Nearest aspect ratio: 1.5 (64x96) takes 96x128, 112x160 and 64x96; 2.0 (64x128) the rest.
    out = tmp_path / "buckets"
    _prepare(own_clips, out, "--buckets", "17x64x96,17x64x128", "--eval_examples", 2)
    code, stdout, err = _demo(tmp_path / "run", demo_vae, out, "--config.evals.batch_size=2")
    assert code == 0, err[-3000:]
    rows = _rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in rows) and np.isfinite(rows[-1]["eval_loss"])
    assert all(r["peak_host_gb"] < 4.0 for r in rows)


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


# ---- Images beside clips (input.sources) ----


@pytest.fixture(scope="module")
def image_latents(model, tmp_path_factory):
    """18 captioned PNG images in two sizes, prepared with the model folder's encoders (one
    latent frame each) into 1x32x32 and 1x32x48 buckets, 6 held out: (prepared, images)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    rows = ["path,caption"]
    for i in range(24):
        w = (32, 48)[i % 2]
        Image.fromarray(rng.integers(0, 256, (32, w, 3), np.uint8)).save(root / f"im{i}.png")
        rows.append(f"im{i}.png,a picture number {i}")
    (root / "images.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path_factory.mktemp("prepared") / "images"
    _prepare(root / "images.csv", out, "--buckets", "1x32x32,1x32x48", "--eval_examples", 6,
             "--model", model)  # fmt: skip
    return out, root


@pytest.mark.slow
def test_images_and_clips_in_one_run(latents, image_latents, raw, model, tmp_path):
    """A model config's runlocal run on prepared clips and prepared images mixed 0.7 / 0.3:
    bucketed, it trains; packed (images and clips sharing rows), it trains, and a copy stopped
    after step 2's checkpoint (what a SIGKILL then leaves) resumes to the same losses, held-out
    loss and data position at step 4."""
    # The prepared images: one latent frame each, our VAE's posterior of the resized image.
    import jax.numpy as jnp
    from flax import nnx

    from cogvideox_jax import components

    image_latents, image_folder = image_latents
    images = prepared.open_prepared(image_latents)
    assert images.kind == "latents" and images.meta["modalities"]["image"] == 24
    assert images.shapes("train")[:, 0].max() == 1
    rec = images.source("train")[0]
    pixels = video.load_image(image_folder / rec["path"], buckets=[(1, 32, 32), (1, 32, 48)])
    vae = components.load_vae(model)
    mean, logvar = nnx.jit(lambda m, x: m.encode(x))(
        vae, jnp.asarray(video.to_unit_range(pixels))[None]
    )
    np.testing.assert_allclose(rec["latent_mean"], mean[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rec["latent_logvar"], logvar[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(rec["first_frame"], pixels[0])
    sources = ((str(latents), 0.7), (str(image_latents), 0.3))
    base = {"input.sources": sources, "evals.every_steps": 2, "ckpt.every_steps": 2}
    cfg = _config("cogvideox_5b", "sft,runlocal", total_steps=2, **base)
    assert np.isfinite(dit.train_and_evaluate(cfg, str(tmp_path / "bucketed"))["loss"])

    packed = base | {"input.packing": True}
    stay, moved = tmp_path / "stay", tmp_path / "moved"
    dit.train_and_evaluate(_config("cogvideox_5b", "sft,runlocal", total_steps=4, **packed),
                           str(stay))  # fmt: skip
    shutil.copytree(stay, moved, ignore=shutil.ignore_patterns(".lock"))
    shutil.rmtree(moved / "checkpoints" / "4")
    dit.train_and_evaluate(_config("cogvideox_5b", "sft,runlocal", total_steps=4, **packed),
                           str(moved))  # fmt: skip
    a, b = _rows(stay), _rows(moved)
    assert [r["step"] for r in b] == [1, 2, 3, 4] and all("packing_efficiency" in r for r in a)
    # Each row reports the images' share of the step's clips and of its video tokens.
    shares = np.array([(r["image_share"], r["image_token_share"]) for r in a])
    assert ((0 <= shares) & (shares <= 1)).all() and 0 < shares[:, 0].mean() < 1, shares
    bucketed = [r["image_share"] for r in _rows(tmp_path / "bucketed")]
    assert set(bucketed) <= {0.0, 1.0}  # a bucketed batch is all images or all clips
    # The loss on images and on clips: a packed step's loss is their clip-weighted mean (one
    # step per logged row here), so it lies between them.
    for r in a:
        each = [r[k] for k in ("loss_images", "loss_clips") if k in r]
        assert each and min(each) - 1e-6 <= r["loss"] <= max(each) + 1e-6, r
    # Held-out loss per dataset (named by its folder), and over all their batches.
    for r in (r for r in a if "eval_loss" in r):
        each = (r["eval_loss_latents"], r["eval_loss_images"])
        assert min(each) <= r["eval_loss"] <= max(each), r
    for key in ("loss", "grad_norm", "eval_loss"):
        got = [r[key] for r in b[2:] if key in r]
        assert got == [r[key] for r in a[2:] if key in r], key
    positions = [(w / "checkpoints" / "4" / "data" / "process_0-of-1.json").read_text()
                 for w in (stay, moved)]  # fmt: skip
    assert positions[0] == positions[1]
    # Mixed datasets must agree: clips prepared raw and images as latents are refused.
    with pytest.raises(ValueError, match="mixed datasets must agree"):
        bad = {"input.sources": ((str(image_latents), 1.0), (str(raw[0]), 1.0))}
        bad["input.encoder_model"] = str(model)
        dit.train_and_evaluate(_config("cogvideox_5b", "sft,runlocal", **bad), str(tmp_path / "x"))
