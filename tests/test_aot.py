"""tools.aot compiles a config's real train step for a TPU slice on CPU (libtpu, no TPU) and
reports memory and FLOPs; the splash kernel lowers for TPU inside it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools import aot

ROOT = Path(__file__).resolve().parents[1]


def _run(*args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # no fake CPU devices
    return subprocess.run(
        [sys.executable, "-m", "tools.aot", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_compiles_runlocal_step_for_v5e_8():
    p = _run(
        "--config=configs/cogvideox1_5_5b.py:sft,runlocal",
        "--topology=v5e-8",
        "--config.mesh.num_devices=0",
        "--config.batch_size=8",
        "--config.evals.batch_size=8",
        "--config.model.attention_impl=splash",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["fits"] is True
    assert r["mesh"] == {"data": 1, "fsdp": 8, "context": 1, "tensor": 1}
    assert 0 < r["peak_bytes_per_chip"] < r["hbm_bytes_per_chip"] == 16 * 2**30
    # XLA also counts elementwise work (large next to a tiny model's matmuls) and the splash
    # kernel's FLOPs only as its custom call's estimate: the same order of magnitude.
    assert 0.3 < r["flops_per_step"] / r["model_flops_per_step"] < 3
    assert r["comm"]["all-gather"]["count"] > 0  # FSDP gathers the weights
    assert r["pallas_kernel_calls"] > 0  # splash lowered to Mosaic kernels for the TPU


@pytest.mark.slow
def test_a_step_that_cannot_fit_is_reported_with_its_arguments():
    # 5B SFT on 4 v5e chips (16 GiB each): XLA refuses to compile in seconds. Its figure counts
    # the arguments: without EMA weights it drops by their size, the temporaries stay.
    runs = []
    for extra in ([], ["--config.optim.ema_decay=0"]):
        p = _run("--config=configs/cogvideox_5b.py:sft", "--topology=v5e-4", *extra)
        assert p.returncode == 0, p.stderr[-3000:]
        assert "DOES NOT FIT: XLA refused to compile" in p.stdout
        runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
    with_ema, without = runs
    for r in runs:
        assert r["refused"] and r["fits"] is False
        assert r["peak_bytes_per_chip"] == r["xla_refused_bytes_per_chip"]
        assert r["peak_bytes_per_chip"] == r["argument_bytes_per_chip"] + r["temp_bytes_per_chip"]
        assert r["temp_bytes_per_chip"] > 0
    ema_per_chip = 5_570_283_072 * 4 / 4  # the 5B transformer's parameters, fp32, fsdp 4
    arg_diff = with_ema["argument_bytes_per_chip"] - without["argument_bytes_per_chip"]
    assert abs(arg_diff - ema_per_chip) < 0.001 * ema_per_chip
    peak_diff = with_ema["peak_bytes_per_chip"] - without["peak_bytes_per_chip"]
    assert abs(peak_diff - arg_diff) < 0.01 * arg_diff  # XLA's figure moved by the arguments


def test_topology_names():
    assert aot.parse_topology("v5p-8") == ("v5p", "2x2x1", 4)
    assert aot.parse_topology("v5p-64") == ("v5p", "2x4x4", 32)
    assert aot.parse_topology("v5p-128") == ("v5p", "4x4x4", 64)
    assert aot.parse_topology("v5e-256") == ("v5e", "16x16", 256)
    assert aot.parse_topology("v6e-64") == ("v6e", "8x8", 64)
    for bad in ("v4-8", "v5p-12", "v6e-3", "v5p"):
        with pytest.raises(ValueError, match="topology"):
            aot.parse_topology(bad)


def test_bad_config_fails_before_compiling():
    p = _run(
        "--config=configs/cogvideox_5b.py:sft,runlocal",
        "--topology=v5e-8",
        "--config.mesh.num_devices=0",
        "--config.batch_size=3",
    )
    assert p.returncode != 0
    assert "batch_size (3) must be divisible" in p.stderr


@pytest.mark.slow
def test_sampling_plan_for_a_slice():
    """--sample compiles the pipeline's programs (T5 and the whole denoising loop; the VAE
    decodes too unless --sample_decode leaves them out, as here) for the slice, on the
    config's mesh with the sampling rules, and reports each one's memory per chip."""
    p = _run(
        "--config=configs/cogvideox_5b.py:sft,runlocal",
        "--topology=v5e-8",
        "--config.mesh.num_devices=0",
        "--config.mesh.context=2",
        "--config.batch_size=4",
        "--config.evals.batch_size=4",
        "--sample",
        "--sample_steps=3",
        "--sample_decode=",  # the VAE decodes take 30 to 40 s each to compile here
    )
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["mesh"] == {"data": 1, "fsdp": 4, "context": 2, "tensor": 1}
    assert r["clip"] == [9, 32, 32] and r["steps"] == 3
    names = ("text_encoder", "denoise")
    assert tuple(r["programs"]) == names
    for name in names:
        prog = r["programs"][name]
        assert prog["fits"] is True and 0 < prog["peak_bytes_per_chip"] < 16 * 2**30, name
    assert r["programs"]["denoise"]["comm"]["all-gather"]["count"] > 0  # FSDP and context
    assert r["programs"]["denoise"]["pallas_kernel_calls"] > 0  # splash inside the loop
    # The loop-aware report of the denoising loop: its 3 steps counted, an estimate per run.
    denoise = r["programs"]["denoise"]
    assert 3 in denoise["loops"].values() and not denoise["unknown_trip_counts"]
    assert denoise["matmul_flops_per_step"] > 3 * denoise["xla_flops_per_chip"]
    assert denoise["estimate"]["step_s"] > 0 and 0 < denoise["estimate"]["mfu"] < 1
    assert "ESTIMATE (roofline, not a measurement)" in p.stdout
    assert "denoise: peak" in p.stdout and "(fits)" in p.stdout
