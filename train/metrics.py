"""Process-0 logging: DIR/metrics.jsonl, TensorBoard scalars (tensorboardX, which needs neither
TensorFlow nor tensorboard) and a console progress bar.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import numpy as np
import tqdm


def _tensorboardx():
    """tensorboardX, imported without torch: its writer imports torch whenever it is installed
    (only to accept torch tensors, which the trainer never logs), about 1.5 s of every start.
    torch stays importable afterwards."""
    if "torch" in sys.modules:
        import tensorboardX

        return tensorboardX
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX handles
    try:
        import tensorboardX
    finally:
        del sys.modules["torch"]
    return tensorboardX


# Peak dense bf16 FLOP/s per device, by jax's device_kind (the CUDA device name on GPUs).
# Sources: cloud.google.com/tpu/docs/v5p (459 TFLOPs), /v5e (197), /v6e (918); NVIDIA's H100
# and H200 datasheets (SXM 989 dense, i.e. half the 1979 "with sparsity"; H100 PCIe 756, H100
# NVL 835). An H200 NVL (835) also reports "NVIDIA H200": its MFU reads low by 989/835.
PEAK_FLOPS = {
    "TPU v5": 459e12,
    "TPU v5p": 459e12,
    "TPU v5 lite": 197e12,
    "TPU v6 lite": 918e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,
}


def peak_flops(device) -> float:
    """The device's peak bf16 FLOP/s, 0.0 when unknown (CPU, other accelerators)."""
    return PEAK_FLOPS.get(device.device_kind, 0.0)


# Where a logging interval's wall time goes (the loop times each): the train step (dispatch and
# the wait for its result), waiting for the next batch (and sending it to the devices), compiling
# a new batch shape's step (with its memory check), the blocking part of starting a checkpoint
# (the copy to host; the write goes on in the background), the held-out eval and samples, and
# writing the logs.
PARTS = ("step", "data", "compile", "checkpoint", "eval", "log")


class Goodput:
    """The run's goodput: seconds in the train step over wall seconds since the trainer was
    constructed (from its start-up: restore, compile, the demo's VAE stage included)."""

    def __init__(self, started: float):
        self.started = started  # time.perf_counter() when the trainer started
        self.step_seconds = 0.0

    def row(self, meter) -> dict:
        """The interval's `time_{part}_s` and `time_interval_s`, and the run's `goodput`."""
        now = time.perf_counter()
        self.step_seconds += meter.seconds["step"]
        out = {f"time_{part}_s": meter.seconds[part] for part in PARTS}
        out["time_interval_s"] = now - meter.start
        out["goodput"] = self.step_seconds / max(now - self.started, 1e-9)
        return out


class Logger:
    """Writes on process 0 only; other processes get no-ops."""

    def __init__(self, workdir: str, total_steps: int, start_step: int, *, progress: bool):
        self.active = jax.process_index() == 0
        if not self.active:
            return
        path = os.path.join(workdir, "metrics.jsonl")
        _truncate_after(path, start_step)
        self._jsonl = open(path, "a")
        # A resumed run purges TensorBoard events logged after its checkpoint (TensorBoard hides
        # events at steps >= purge_step from the earlier files), as metrics.jsonl is truncated.
        purge = start_step + 1 if start_step > 0 else None
        self._tb = _tensorboardx().SummaryWriter(os.path.join(workdir, "tb"), purge_step=purge)
        self._bar = tqdm.tqdm(
            total=total_steps, initial=start_step, disable=not progress, dynamic_ncols=True
        )

    def write(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        row = {"step": int(step)} | {k: _plain(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        for k, v in row.items():
            if isinstance(v, float):
                self._tb.add_scalar(k, v, step)
        self._tb.flush()
        if "loss" in row:
            shown = {"loss": f"{row['loss']:.4f}"}
            if "goodput" in row:
                shown["goodput"] = f"{row['goodput']:.0%}"
            self._bar.set_postfix(shown, refresh=False)

    def advance(self, step: int) -> None:
        if self.active:
            self._bar.update(step - self._bar.n)

    def close(self) -> None:
        if self.active:
            self._bar.close()
            self._jsonl.close()
            self._tb.close()


def _truncate_after(path: str, step: int) -> None:
    """Drop rows past `step` (written after the checkpoint a run resumes from) and a torn last
    line, so a resumed run's log reads as if it had never stopped."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("step", 0) <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


def _plain(v):
    v = np.asarray(v)
    return float(v) if v.dtype.kind == "f" else int(v) if v.dtype.kind in "iu" else v.tolist()


def summary(
    workdir: str, *, checkpoints: list[int], demo: bool, model: str, guidance: float | None = None
) -> str:
    """The end-of-run report from WORKDIR/metrics.jsonl: final and best held-out loss, the demo's
    prompt adherence, throughput, where the outputs are and the commands that use them (`model`:
    the model folder the run recorded, "" if none; `guidance`: the scale the run sampled with,
    passed on in the sample command)."""
    path = os.path.join(workdir, "metrics.jsonl")
    rows = [json.loads(line) for line in open(path)] if os.path.isfile(path) else []
    if not rows:
        return f"run in {workdir}: nothing logged"
    lines = [f"run finished at step {rows[-1]['step']} ({workdir})"]

    def track(key: str, best=min) -> None:
        scored = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), float)]
        if scored:
            top = best(scored, key=lambda s: s[1])
            lines.append(
                f"  {key}: final {scored[-1][1]:.4g} (step {scored[-1][0]}), "
                f"best {top[1]:.4g} (step {top[0]})"
            )

    track("eval_loss")
    track("prompt_adherence", best=max)
    speeds = [r["tokens_per_sec"] for r in rows if isinstance(r.get("tokens_per_sec"), float)]
    if speeds:
        lines.append(f"  throughput: {np.median(speeds):,.0f} tokens/s (median of the logs)")
    peaks = [r["peak_host_gb"] for r in rows if isinstance(r.get("peak_host_gb"), float)]
    if peaks:
        lines.append(f"  peak host memory: {max(peaks):.2f} GB (resident, this process)")
    lines.append(f"  checkpoints: {os.path.join(workdir, 'checkpoints')} (steps {checkpoints})")
    samples = os.path.join(workdir, "samples")
    if os.path.isdir(samples):
        lines.append(
            f"  samples: {samples} (step_N_i.mp4; captions{' and scores' if demo else ''} "
            "in step_N.json; "
            "a contact sheet per eval, step_N.png)"
        )
    lines.append(f"  metrics: {path}")
    lines.append(f"  TensorBoard: pip install tensorboard; tensorboard --logdir {workdir}/tb")
    base = "" if model or demo else " --base MODEL"
    prompt = "a red circle moving left" if demo else "..."
    scale = "" if guidance is None else f" --guidance-scale {guidance:g}"
    lines.append(
        f'  sample from it: python -m tools.sample --model {workdir}{base} --prompt "{prompt}"'
        f"{scale} --out video.mp4"
    )
    lines.append(
        f"  export it: python -m tools.convert run-to-diffusers {workdir} OUT [--ema]{base}"
    )
    return "\n".join(lines)
