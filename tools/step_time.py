"""An estimate of a compiled step's time on a TPU slice, from its loop-aware cost (tools.hlo_cost):
a roofline per op and per collective, with a stated overlap assumption. An estimate, not a
measurement: it has not been checked against a TPU (none was available), and real steps are
slower (kernel efficiency below peak, collective latency, the parts XLA does not overlap).

The model:
- each op (a top-level instruction of the compiled program: a fusion, a kernel, a copy) takes
  max(matmul FLOPs / peak bf16 FLOP/s, HBM bytes / HBM bandwidth); elementwise work is taken to
  ride on the bytes it moves (the VPU's FLOPs are not counted against the MXU's peak);
- each collective takes its bytes moved per chip (tools.hlo_cost's ring volumes) over the ICI
  bandwidth of the mesh axes it spans: per physical torus dimension the group runs along, one
  bidirectional link (a ring sends both ways); a collective-permute sends its buffer one way
  over one link;
- overlap: inside a loop that runs more than once (the layer scan, gradient accumulation, the
  blocked-attention loops), the collectives hide behind the loop body's compute up to the
  compute time (XLA schedules the next layer's weight gathers under this layer's work):
  max(compute, communication) per loop; outside loops nothing overlaps: compute + communication.
- MFU = model FLOPs (cogvideox_jax.flops: 3 x forward, no recompute) / (chips x peak x time).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import defaultdict

import numpy as np


@dataclasses.dataclass(frozen=True)
class Chip:
    peak_flops: float  # bf16 FLOP/s per chip
    hbm_bandwidth: float  # bytes/s per chip
    ici_link_bandwidth: float  # bytes/s per link, both directions together
    source: str


# Per chip. ICI per link = the chip's bidirectional ICI bandwidth / its ICI ports.
CHIPS = {
    # cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, HBM 2765 GB/s, bidirectional ICI
    # 1200 GB/s per chip over 6 ports (3D torus).
    "v5p": Chip(459e12, 2765e9, 1200e9 / 6, "cloud.google.com/tpu/docs/v5p"),
    # cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, HBM 819 GB/s, ICI 1600 Gbps (200 GB/s)
    # per chip over 4 ports (2D torus).
    "v5e": Chip(197e12, 819e9, 200e9 / 4, "cloud.google.com/tpu/docs/v5e"),
    # cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16, HBM 1640 GB/s, bidirectional ICI
    # 800 GB/s per chip over 4 ports (2D torus).
    "v6e": Chip(918e12, 1640e9, 800e9 / 4, "cloud.google.com/tpu/docs/v6e"),
}


def axis_dims(mesh) -> dict[str, frozenset[int]]:
    """For each mesh axis, the physical torus dimensions its devices run along (from the
    devices' coordinates; one dimension where devices have none, e.g. CPU)."""
    devs = mesh.devices
    out = {}
    for a, name in enumerate(mesh.axis_names):
        if devs.shape[a] == 1:
            out[name] = frozenset()
            continue
        index = [0] * devs.ndim
        index[a] = slice(None)
        coords = [getattr(d, "coords", None) for d in devs[tuple(index)]]
        if any(c is None for c in coords):
            out[name] = frozenset({0})
            continue
        c = np.array(coords)
        out[name] = frozenset(k for k in range(c.shape[1]) if len(set(c[:, k])) > 1)
    return out


def group_dims(mesh, group: int) -> int:
    """Physical dimensions spanned by a replica group of `group` chips: those of the mesh axes
    whose sizes multiply to it (fewest axes first), else of the smallest set of axes whose size
    it divides; all the slice's dimensions if none."""
    dims = axis_dims(mesh)
    axes = [a for a in mesh.axis_names if mesh.shape[a] > 1]
    combos = [c for n in range(1, len(axes) + 1) for c in itertools.combinations(axes, n)]
    size = {c: int(np.prod([mesh.shape[a] for a in c])) for c in combos}
    for test in (lambda n: n == group, lambda n: n % group == 0):
        match = [c for c in combos if test(size[c])]
        if match:
            best = min(match, key=lambda c: (size[c], len(c)))
            return max(1, len(frozenset().union(*(dims[a] for a in best))))
    return max(1, len(frozenset().union(*dims.values())))


def collective_seconds(c, chip: Chip, dims: int) -> float:
    """One execution of a tools.hlo_cost.Collective whose group spans `dims` torus dimensions."""
    if c.kind == "collective-permute":
        return c.moved_bytes / (chip.ici_link_bandwidth / 2)
    return c.moved_bytes / (chip.ici_link_bandwidth * dims)


def estimate(cost, chip: Chip, mesh, model_flops: float, tokens: float, samples: int) -> dict:
    """Step time, tokens/s and MFU of a step with `cost` (per chip) on `mesh`'s chips (MFU None
    where `model_flops` is not known, e.g. a VAE decode)."""
    chips = int(mesh.devices.size)
    compute, comm = defaultdict(float), defaultdict(float)
    mxu = hbm = 0.0
    for op in cost.ops:
        t_flops, t_bytes = op.flops / chip.peak_flops, op.bytes / chip.hbm_bandwidth
        compute[op.loop] += max(t_flops, t_bytes) * op.times
        mxu += t_flops * op.times
        hbm += t_bytes * op.times
    by_kind = defaultdict(float)
    dims = {g: group_dims(mesh, g) for g in {c.group for c in cost.collectives}}
    for c in cost.collectives:
        t = collective_seconds(c, chip, dims[c.group]) * c.times
        comm[c.loop] += t
        by_kind[c.kind] += t
    step = exposed = 0.0
    for loop in set(compute) | set(comm):
        if loop is None:
            step += compute[loop] + comm[loop]
            exposed += comm[loop]
        else:
            step += max(compute[loop], comm[loop])
            exposed += max(0.0, comm[loop] - compute[loop])
    step = max(step, 1e-12)
    return dict(
        estimate=True,
        step_s=step,
        compute_s=sum(compute.values()),
        mxu_s=mxu,
        hbm_s=hbm,
        comm_s=sum(comm.values()),
        exposed_comm_s=exposed,
        comm_s_by_kind=dict(by_kind),
        tokens_per_s=tokens / step if tokens else None,
        samples_per_s=samples / step,
        mfu=model_flops / (chips * chip.peak_flops * step) if model_flops else None,
        chip=dataclasses.asdict(chip),
    )
