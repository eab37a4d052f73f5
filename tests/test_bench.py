"""The bench/ scripts at their smallest sizes, one timed round each: they run, their JSON has
the documented fields with positive times, and ours agrees with diffusers on the way."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import attention, convert_memory, gemm, sample, train_step, vae

ROOT = Path(__file__).resolve().parents[1]
MACHINE = {"date", "platform", "cpu", "cpu_count", "torch_threads", "versions"}


def _read(path):
    result = json.loads(Path(path).read_text())
    assert MACHINE <= set(result["machine"]), result["machine"]
    assert {"jax", "torch", "diffusers"} <= set(result["machine"]["versions"])
    return result


def test_train_step(tmp_path):
    out = tmp_path / "train_step.json"
    train_step.main(["--smallest", "--repeats", "1", "--out", str(out)])
    r = _read(out)
    for name in ("ours", "diffusers"):
        assert r[name]["s_per_step"] > 0 and r[name]["tokens_per_s"] > 0, r[name]
        assert r[name]["gflops_per_s"] > 0, r[name]
    assert r["ratio_ours_over_diffusers"] > 0
    assert r["tokens_per_step"] == 8 + 2 * 2 * 2  # text + (T, h/2, w/2) video tokens
    assert r["model_flops_per_step"] > 0
    # Same weights and inputs: the first step's losses agree.
    assert r["first_loss_rel_diff"] < 1e-4, r["first_loss"]


@pytest.mark.slow
def test_train_step_gpu_recipe(tmp_path):
    # The GPU rows' code path, on the CPU: a released variant's architecture (1.5-5B: temporal
    # patches), bf16 compute on fp32 parameters (torch: autocast), remat (torch: gradient
    # checkpointing), each implementation alone in a fresh process.
    out = tmp_path / "train_step.json"
    argv = ["--smallest", "--repeats", "1", "--variant", "1.5-5b", "--dtype", "bfloat16"]
    train_step.main(argv + ["--remat", "full", "--separate", "--out", str(out)])
    r = _read(out)
    want = dict(variant="1.5-5b", dtype="bfloat16", param_dtype="float32", remat="full")
    assert want.items() <= r["config"].items(), r["config"]
    assert r["config"]["processes"] == "one per implementation"
    assert r["tokens_per_step"] == 8 + 1 * 2 * 2  # text + (T/2, h/2, w/2) video tokens
    for name in ("ours", "diffusers"):
        assert r[name]["s_per_step"] > 0 and "mfu" not in r[name], r[name]  # no peak on a CPU
    assert r["peak_flops_per_device"] is None
    # Same weights and inputs, both in bf16: the first losses agree to bf16's precision.
    assert r["first_loss_rel_diff"] < 2e-3, r["first_loss"]


def test_train_step_rejects_a_latent_the_variant_cannot_patch(capsys):
    with pytest.raises(SystemExit):
        train_step.main(["--variant", "1.5-5b", "--latent", "21,96,170"])
    assert "temporal patch size 2" in capsys.readouterr().err


def test_sample(tmp_path):
    out = tmp_path / "sample.json"
    sample.main(["--smallest", "--repeats", "1", "--out", str(out)])
    r = _read(out)
    assert r["one_step"]["steps"] == 1 and r["sample"]["steps"] == 2
    assert r["config"]["cfg_batch"] == 2
    for name in ("one_step", "sample"):
        assert r[name]["ours_s"] > 0 and r[name]["diffusers_s"] > 0, r[name]
        assert r[name]["latents_rel_l2_vs_diffusers"] < 1e-4, r[name]


@pytest.mark.slow
def test_sample_bf16_variant(tmp_path):
    out = tmp_path / "sample.json"
    argv = ["--smallest", "--repeats", "1", "--variant", "1.5-5b", "--dtype", "bfloat16"]
    sample.main(argv + ["--out", str(out)])
    r = _read(out)
    assert r["config"]["variant"] == "1.5-5b" and r["config"]["dtype"] == "bfloat16"
    for name in ("one_step", "sample"):
        # bf16 transformers (diffusers also keeps its latents in bf16): percent-level agreement
        assert r[name]["latents_rel_l2_vs_diffusers"] < 0.1, r[name]


@pytest.mark.slow
def test_data(tmp_path):
    # Grain worker processes import the script's modules: run it in a fresh interpreter.
    out = tmp_path / "data.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.data", "--smallest", "--repeats", "1", "--out", str(out)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = _read(out)
    assert r["decode"]["clip_fhw"] == [9, 32, 48]
    assert r["packing"]["video_budget"] % 128 == 0
    for stage in ("decode", "packing"):
        for workers in ("workers_0", "workers_1"):
            row = r[stage][workers]
            assert row["clips_per_s"] > 0 and row["startup_s"] > 0, (stage, workers, row)


@pytest.mark.slow
def test_vae(tmp_path):
    out = tmp_path / "vae.json"
    vae.main(["--smallest", "--repeats", "1", "--out", str(out)])
    r = _read(out)
    assert r["clip"] == [5, 16, 16]
    for name in ("encode", "decode"):
        assert r[name]["ours_s"] > 0 and r[name]["diffusers_s"] > 0, r[name]
    assert r["encode_rel_l2_vs_diffusers"] < 1e-5


@pytest.mark.slow
def test_convert_memory(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # its child processes import tools.convert from here
    out = tmp_path / "convert_memory.json"
    convert_memory.main(["--smallest", "--out", str(out)])
    r = _read(out)
    assert r["config"]["layers"] == 1
    # Each conversion process holds at least what importing the converter takes.
    for key in ("orbax_to_diffusers_peak_mib", "diffusers_to_orbax_peak_mib"):
        assert r[key] >= r["baseline_process_mib"] > 0, r


@pytest.mark.parametrize(
    "dtype, tol", [("float32", 1e-5), pytest.param("bfloat16", 2e-2, marks=pytest.mark.slow)]
)
def test_attention(tmp_path, dtype, tol):
    out = tmp_path / "attention.json"
    attention.main(["--smallest", "--repeats", "1", "--dtype", dtype, "--out", str(out)])
    r = _read(out)
    assert r["config"]["tokens"] == 300 and r["config"]["dtype"] == dtype
    assert r["torch_sdpa"]["s"] > 0
    for name in ("ours_blocked", "ours_xla"):
        assert r[name]["s"] > 0 and r[name]["ratio_over_torch"] > 0, r[name]
        assert r[name]["grad_rel_l2_vs_torch"] < tol, r[name]


def test_gemm(tmp_path):
    out = tmp_path / "gemm.json"
    gemm.main(["--smallest", "--repeats", "1", "--calls", "2", "--out", str(out)])
    r = _read(out)
    assert r["calls"] == 2
    assert len(r["products"]) == 5  # four layer products at one token count, one square
    for name, row in r["products"].items():
        assert row["xla_gflops_per_s"] > 0 and row["torch_gflops_per_s"] > 0, (name, row)
        assert row["rel_l2_xla_vs_torch"] < 1e-5, (name, row)
    assert r["best_gflops_per_s"]["xla"] == max(
        row["xla_gflops_per_s"] for row in r["products"].values()
    )
