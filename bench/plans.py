r"""The plan table of BENCHMARKS.md: for each model and slice, `tools.aot --search` in a narrow
space, and the best layout's memory, loop-aware FLOPs, communication and estimated step time.

  python -m bench.plans [--cells sft,pretrain] [--slices v5p-64,v6e-64] [--jobs 2]
                        [--cache_dir DIR] [--out plans.json]

Rows:
- SFT of 2B and 5B at 49x480x720 and 1.5-5B at 81x768x1360 (the configs' `sft` mode), with the
  batch scaled to one sample per chip (`--config.batch_size=CHIPS`): the configs' batch of 16
  does not spread over 32 to 256 chips;
- 1.5-5B pretraining at 161x768x1360 (`pretrain,frames=161,res=768x1360`, batch 1024, one
  sample per data shard per micro-batch).
Search space per row (each compile takes minutes on a small CPU machine): SFT: FSDP over every
chip (1.5-5B on v6e also with context 2); pretraining: FSDP with context 1 or 2 (2 or 4 on
v6e, whose 32 GiB does not hold a 43k-token shard per chip of activations); allgather context
parallelism, full remat, one sample per data shard per micro-batch. The wide search (tensor,
Ulysses, remat, accumulation) is BENCHMARKS.md's v5p-128 ranking. Every figure is a compiled
plan and an estimate; nothing ran on a TPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from tools import aot

MODELS = {
    "2B SFT": ("configs/cogvideox_2b.py:sft", "sft"),
    "5B SFT": ("configs/cogvideox_5b.py:sft", "sft"),
    "1.5-5B SFT": ("configs/cogvideox1_5_5b.py:sft", "sft"),
    "1.5-5B pretrain 161x768x1360": (
        "configs/cogvideox1_5_5b.py:pretrain,frames=161,res=768x1360",
        "pretrain",
    ),
}
SLICES = ("v5p-64", "v5p-128", "v5p-256", "v6e-64", "v6e-256")


def space(name: str, kind: str, slice_: str) -> str:
    if kind == "sft":  # 1.5-5B's 45k tokens per chip do not fit v6e's 32 GiB without context
        contexts = "1,2" if name.startswith("1.5") and slice_.startswith("v6e") else "1"
    else:
        contexts = "2,4" if slice_.startswith("v6e") else "1,2"
    return f"context={contexts};tensor=1;cp=allgather;remat=full;accum=1"


def run_cell(name: str, slice_: str, jobs: int, cache_dir: str) -> dict:
    config, kind = MODELS[name]
    _, _, chips = aot.parse_topology(slice_)
    cmd = [sys.executable, "-m", "tools.aot", f"--config={config}", f"--topology={slice_}",
           "--search", f"--search_space={space(name, kind, slice_)}", f"--jobs={jobs}"]  # fmt: skip
    if cache_dir:
        cmd.append(f"--cache_dir={cache_dir}")
    if kind == "sft":
        cmd += [f"--config.batch_size={chips}", f"--config.evals.batch_size={chips}"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = p.stdout.strip().splitlines()
    try:
        r = json.loads(lines[-1])
    except (IndexError, ValueError):
        return dict(model=name, slice=slice_, error=(p.stderr or p.stdout)[-500:])
    return dict(model=name, slice=slice_, search=r, command=" ".join(cmd[1:]))


def row(cell: dict) -> str:
    name, slice_ = cell["model"], cell["slice"]
    if "error" in cell:
        return f"| {name} | {slice_} | failed: {cell['error'][-120:]!r} |" + " |" * 9
    best = cell["search"]["best"]
    if best is None:
        peaks = [
            r["result"].get("peak_bytes_per_chip", 0) / 2**30 for r in cell["search"]["ranked"]
        ]
        low = f"{min(peaks):.1f}" if peaks else "-"
        return f"| {name} | {slice_} | none fits (lowest peak {low} GiB) |" + " - |" * 9
    c, r = best["candidate"], best["result"]
    e = r["estimate"]
    comm = r.get("comm", {})
    kinds = ", ".join(
        f"{k.replace('collective-permute', 'CP').replace('all-gather', 'AG')} "
        f"{v['gb_per_chip']:.0f}"
        for k, v in sorted(comm.items(), key=lambda kv: -kv[1]["gb_per_chip"])
        if v["gb_per_chip"] >= 0.5
    )
    mesh = (f"data {c['data']} x " if c["data"] > 1 else "") + f"fsdp {c['fsdp']}"
    mesh += f" x context {c['context']}" if c["context"] > 1 else ""
    return (
        f"| {name} | {slice_} | {mesh} | {r['grad_accum_steps']} | "
        f"{r['peak_bytes_per_chip'] / 2**30:.1f} | {r['compiled_over_model']:.2f} | "
        f"{r['comm_gb_per_chip']:.0f} ({kinds}) | {e['step_s']:.2f} | "
        f"{100 * e['mfu']:.0f}% | {e['tokens_per_s']:.3g} | {len(cell['search']['ranked'])} |"
    )


HEADER = (
    "| model | slice | best layout | accum | peak GiB/chip | compiled/model FLOPs | "
    "comm GB/chip/step (by kind) | est. step s | est. MFU | est. tokens/s | plans |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", default="sft,pretrain")
    ap.add_argument("--slices", default=",".join(SLICES))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--cache_dir", default="")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    kinds = a.cells.split(",")
    cells = []
    for name, (_, kind) in MODELS.items():
        if kind not in kinds:
            continue
        for slice_ in a.slices.split(","):
            cell = run_cell(name, slice_, a.jobs, a.cache_dir)
            cells.append(cell)
            print(row(cell), flush=True)
            if a.out:
                with open(a.out, "w") as f:
                    json.dump(cells, f)
    print(HEADER)
    for cell in cells:
        print(row(cell))


if __name__ == "__main__":
    main()
