"""Scale planning: tools.hlo_cost's loop-aware FLOPs, bytes and collectives of a compiled
program, tools.step_time's estimate, and `tools.aot --search`.

The FLOP expectations are worked out by hand from cogvideox_jax.flops' parts (F: forward;
A: attention's two products, 4 n^2 D per layer; B: the blocks' linear layers, 24 n D^2 per
layer) and what each variant recomputes:
- plain attention, no remat: 3F;
- full remat: every block's forward runs again in the backward pass: 3F + A + B;
- splash: its forward kernel does Q K^T and P V (4), its dq kernel recomputes the scores and
  does dP and dQ (6), its dkv kernel recomputes the scores, dP, dV and dK (8): 18 against the
  model count's 12 (4 forward, 8 backward): + 1.5 A;
- blocked: its backward recomputes the scores once more than plain attention's: + 0.5 A.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools import hlo_cost, step_time

ROOT = Path(__file__).resolve().parents[1]


def _env():
    return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # no fake CPU devices


@pytest.fixture(scope="module")
def cases():
    p = subprocess.run(
        [sys.executable, "tests/aot_cases.py"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    out = {}
    for line in p.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            out[r["case"]] = r
    return out


EXPECTED = {  # compiled matmul FLOPs per sample, from F, A, B (module docstring)
    "xla_none": lambda f, a, b: 3 * f,
    "xla_full_accum2": lambda f, a, b: 3 * f + a + b,
    "splash_full": lambda f, a, b: 3 * f + 1.5 * a + a + b,
    "blocked_none": lambda f, a, b: 3 * f + 0.5 * a,
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_loop_aware_flops_match_the_hand_count(cases, case):
    r = cases[case]
    f, a, b = r["forward_flops"], r["attention_forward_flops"], r["block_linear_forward_flops"]
    expected = EXPECTED[case](f, a, b) * r["batch_size"]
    assert r["matmul_flops_per_step"] == pytest.approx(expected, rel=0.02)
    # The body of the 4-layer scan counted 4 times (XLA's cost analysis sees it once).
    assert 4 in r["loops"].values() and not r["unknown_trip_counts"]
    assert r["flops_per_step"] < 0.6 * r["matmul_flops_per_step"]
    if case == "xla_full_accum2":
        assert r["grad_accum_steps"] == 2 and 2 in r["loops"].values()
    if case == "splash_full":  # the kernels' share: 4 + 4 (recomputed forward) + 6 + 8
        assert r["kernel_flops_per_step"] == pytest.approx(5.5 * a * r["batch_size"], rel=0.01)


@pytest.mark.slow
def test_fsdp_collective_bytes_match_the_parameter_volume(cases):
    """FSDP over 8 chips, no remat (ZeRO-3): each sharded weight is gathered in the compute
    dtype (bf16) for the forward pass and again for the backward pass, and its gradient is
    reduce-scattered (bf16: XLA reduces before the cast to the fp32 parameters). The stacked
    adaLN kernels (norm1/norm2) are neither: their products are taken shard-wise over their
    output width (transformer._modulations)."""
    r = cases["xla_none"]
    g = r["mesh"]["fsdp"]
    gathered = sum(n for k, n in r["sharded_param_elements"].items()
                   if "norm1" not in k and "norm2" not in k)  # fmt: skip
    volume = gathered * 2 * (g - 1) / g  # bf16 bytes each chip receives (or sends) once
    moved = r["comm"]["all-gather"]["gb_per_chip"] + r["comm"]["reduce-scatter"]["gb_per_chip"]
    assert moved * 1e9 == pytest.approx(3 * volume, rel=0.05)
    assert r["comm"]["all-gather"]["gb_per_chip"] * 1e9 == pytest.approx(2 * volume, rel=0.05)
    assert r["comm"]["reduce-scatter"]["groups"] == [8]


@pytest.mark.slow
def test_estimate_is_monotone_in_chips(cases):
    """The same FSDP layout and per-chip batch on 4 and on 8 chips: twice the chips never
    estimate slower per sample."""
    four, eight = cases["xla_none_4"], cases["xla_none"]
    assert four["mesh"]["fsdp"] == 4 and eight["mesh"]["fsdp"] == 8
    per_sample = lambda r: r["estimate"]["step_s"] / r["batch_size"]  # noqa: E731
    assert per_sample(eight) <= per_sample(four)
    for r in (four, eight):
        e = r["estimate"]
        assert e["estimate"] is True and 0 < e["mfu"] < 1
        assert e["step_s"] >= max(e["mxu_s"], e["hbm_s"]) - 1e-12
        assert e["step_s"] == pytest.approx(e["compute_s"] + e["exposed_comm_s"], rel=1e-6)


@pytest.mark.slow
def test_search_ranks_layouts_and_caches_them(tmp_path):
    args = [
        sys.executable, "-m", "tools.aot",
        "--config=configs/cogvideox_2b.py:sft,runlocal",
        "--topology=v5e-8",
        "--config.mesh.num_devices=0",
        "--config.batch_size=8",
        "--config.evals.batch_size=8",
        "--search",
        "--search_space=context=1,2;tensor=1,16;cp=allgather;remat=none;accum=1",
        f"--cache_dir={tmp_path}",
    ]  # fmt: skip

    def search():
        p = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True,
                           timeout=600)  # fmt: skip
        assert p.returncode == 0, p.stderr[-3000:]
        return p.stdout, json.loads(p.stdout.strip().splitlines()[-1])

    out, r = search()
    ranked = r["ranked"]
    assert [row["candidate"]["context"] for row in ranked] != []
    assert {(row["candidate"]["fsdp"], row["candidate"]["context"]) for row in ranked} == {
        (8, 1), (4, 2)}  # fmt: skip
    steps = [row["result"]["estimate"]["step_s"] for row in ranked]
    assert steps == sorted(steps) and all(row["result"]["fits"] for row in ranked)
    # tensor=16 cannot split 8 chips; no candidate is compiled for it.
    assert all(row["candidate"]["tensor"] == 1 for row in ranked)
    best = r["best"]["overrides"]
    flags = f"--config.mesh.data=1 --config.mesh.fsdp={best['mesh.fsdp']}"
    assert f"best: --config.mesh.num_devices=0 {flags}" in out
    assert len(list(tmp_path.iterdir())) == 2  # two plans cached
    out2, r2 = search()
    assert all(row["result"].get("cached") for row in r2["ranked"])
    assert [row["candidate"] for row in r2["ranked"]] == [row["candidate"] for row in ranked]


# Hand-written HLO: the walk's rules on programs small enough to count by hand.

LOOP = """HloModule m, is_scheduled=true

%body (p: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %p = (s32[], f32[8,16]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8,16]{1,0} get-tuple-element(%p), index=1
  %w = f32[16,16]{1,0} constant({...})
  %d = f32[8,16]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %one = s32[] constant(1)
  %n = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[8,16]) tuple(%n, %d)
}

%cond (q: (s32[], f32[8,16])) -> pred[] {
  %q = (s32[], f32[8,16]) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %lim = s32[] constant(7)
  ROOT %lt = pred[] compare(%j, %lim), direction=LT
}

ENTRY %main (a: f32[8,16]) -> f32[8,16] {
  %a = f32[8,16]{1,0} parameter(0)
  %start = s32[] constant(2)
  %init = (s32[], f32[8,16]) tuple(%start, %a)
  %loop = (s32[], f32[8,16]) while(%init), condition=%cond, body=%body
  ROOT %out = f32[8,16]{1,0} get-tuple-element(%loop), index=1
}
"""


def test_loop_body_counted_its_trip_count():
    cost = hlo_cost.analyse_hlo(LOOP)
    assert cost.loops == {"body": 5}  # i = 2, 3, 4, 5, 6
    assert cost.matmul_flops == 5 * 2 * 8 * 16 * 16
    # A counter that steps by 2, as XLA's bidirectional collective-matmul loops count.
    by_two = LOOP.replace("%one = s32[] constant(1)", "%one = s32[] constant(2)")
    cost = hlo_cost.analyse_hlo(by_two)
    assert cost.loops == {"body": 3}  # i = 2, 4, 6
    assert cost.matmul_flops == 3 * 2 * 8 * 16 * 16


HEADS_AS_CONV = """HloModule m

ENTRY %main (q: f32[2,256,64], k: f32[2,256,64]) -> f32[2,256,256] {
  %q = f32[2,256,64]{2,1,0} parameter(0)
  %k = f32[2,256,64]{2,1,0} parameter(1)
  ROOT %s = f32[2,256,256]{2,1,0} convolution(%q, %k), window={size=2 lhs_dilate=2}, dim_labels=0bf_0oi->0bf
}
"""  # noqa: E501


def test_batched_matmul_written_as_a_convolution_counts_each_head_once():
    # Two heads' Q K^T (256 x 256 x 64 each) as XLA:TPU writes them: a convolution whose window
    # runs over the heads with dilation holes, one tap per output.
    cost = hlo_cost.analyse_hlo(HEADS_AS_CONV)
    assert cost.matmul_flops == 2 * (2 * 256 * 256 * 64)


ASYNC = """HloModule m

%start_c (a: bf16[4,128]) -> bf16[32,128] {
  %a = bf16[4,128]{1,0} parameter(0)
  ROOT %ag = bf16[32,128]{1,0} all-gather(%a), channel_id=5, replica_groups=[1,8]<=[8], dimensions={0}
}

%done_c (b: bf16[4,128]) -> bf16[32,128] {
  %b = bf16[4,128]{1,0} parameter(0)
  ROOT %ag2 = bf16[32,128]{1,0} all-gather(%b), channel_id=5, replica_groups=[1,8]<=[8], dimensions={0}
}

%rs_c (g: f32[32,128]) -> f32[4,128] {
  %g = f32[32,128]{1,0} parameter(0)
  %ar = f32[32,128]{1,0} all-reduce(%g), channel_id=6, replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add
  ROOT %sl = f32[4,128]{1,0} slice(%ar), slice={[0:4], [0:128]}
}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(%x, %y)
}

ENTRY %main (p: bf16[4,128], g: f32[32,128]) -> f32[4,128] {
  %p = bf16[4,128]{1,0} parameter(0)
  %g = f32[32,128]{1,0} parameter(1)
  %s = bf16[32,128]{1,0} fusion(%p), kind=kLoop, calls=%start_c
  %d = bf16[32,128]{1,0} fusion(%p), kind=kLoop, calls=%done_c
  ROOT %r = f32[4,128]{1,0} fusion(%g), kind=kLoop, calls=%all-reduce-scatter.1
}

%all-reduce-scatter.1 (g2: f32[32,128]) -> f32[4,128] {
  %g2 = f32[32,128]{1,0} parameter(0)
  %ar2 = f32[32,128]{1,0} all-reduce(%g2), channel_id=7, replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add
  ROOT %sl2 = f32[4,128]{1,0} slice(%ar2), slice={[0:4], [0:128]}
}
"""  # noqa: E501


def test_collectives_counted_once_with_ring_volumes():
    cost = hlo_cost.analyse_hlo(ASYNC)
    t = cost.collective_totals()
    # The all-gather split over two fusions (one channel) is one collective: 7 of 8 shards in.
    assert t["all-gather"]["count"] == 1
    assert t["all-gather"]["moved_bytes"] == 4 * 128 * 2 * 7
    # XLA:TPU's reduce-scatter (an all-reduce fused with its slice) moves 7/8 of its input.
    assert t["reduce-scatter"]["count"] == 1
    assert t["reduce-scatter"]["moved_bytes"] == 32 * 128 * 4 * 7 / 8
    assert t["reduce-scatter"]["groups"] == [8]
    assert "all-reduce" not in t  # %rs_c is never called


def test_estimate_roofline_by_hand():
    cost = hlo_cost.Cost(ops=[
        hlo_cost.Op("mm", "fusion", flops=459e12, bytes=1e9, times=2, loop="scan"),
        hlo_cost.Op("ew", "fusion", flops=0.0, bytes=2765e9, times=1, loop=None),
    ])  # fmt: skip
    cost.collectives = [
        hlo_cost.Collective(
            "all-gather", 4, 0, moved_bytes=400e9, times=2, loop="scan", source="", op=""
        ),  # fmt: skip
        hlo_cost.Collective(
            "all-reduce", 4, 0, moved_bytes=200e9, times=1, loop=None, source="", op=""
        ),  # fmt: skip
    ]

    class Mesh:  # 4 chips in a line (one torus dimension), no coordinates
        axis_names = ("fsdp",)
        shape = {"fsdp": 4}
        devices = __import__("numpy").array([object()] * 4)

    chip = step_time.CHIPS["v5p"]
    e = step_time.estimate(cost, chip, Mesh, model_flops=4 * 459e12, tokens=100, samples=1)
    # the scan: 2 x 1 s of compute, 2 x 2 s of gathers (400 GB over one 200 GB/s link pair):
    # max = 4 s; outside: 1 s of HBM + 1 s of all-reduce. Step 6 s.
    assert e["step_s"] == pytest.approx(6.0)
    assert e["exposed_comm_s"] == pytest.approx(2.0 + 1.0)
    assert e["mfu"] == pytest.approx(4 / (4 * 6.0))


def test_search_layouts_keep_the_weights_sharded():
    """2B's width (1920) does not divide over 256 chips: the search's automatic data axis takes
    the fewest replicas that make fsdp x context divide it, and a candidate that would
    replicate every weight is refused with the rule."""
    from configs import cogvideox_2b
    from tools import plan_search

    c = cogvideox_2b.get_config("sft")
    space = plan_search.parse_space("context=1,2;tensor=1;cp=allgather")
    got = {(x["data"], x["fsdp"], x["context"]) for x in plan_search.layouts(c, 256, space)}
    assert got == {(2, 128, 1), (2, 64, 2)}
    with c.unlocked():
        c.batch_size = c.evals.batch_size = 256
    o = plan_search._overrides(dict(data=1, fsdp=256, context=1, tensor=1, cp="allgather",
                                    remat="full", accum=1), 256)  # fmt: skip
    assert "width 1920 does not divide over fsdp x context = 256" in plan_search._check(c, 256, o)
    o = plan_search._overrides(dict(data=2, fsdp=128, context=1, tensor=1, cp="allgather",
                                    remat="full", accum=1), 256)  # fmt: skip
    assert plan_search._check(c, 256, o) is None


KERNEL = """HloModule m

ENTRY %main (q: bf16[2,4,256,64], k: bf16[2,4,512,64], v: bf16[2,4,512,64]) -> bf16[2,4,256,64] {
  %q = bf16[2,4,256,64]{3,2,1,0} parameter(0)
  %k = bf16[2,4,512,64]{3,2,1,0} parameter(1)
  %v = bf16[2,4,512,64]{3,2,1,0} parameter(2)
  ROOT %o = bf16[2,4,256,64]{3,2,1,0} custom-call(%q, %k, %v), custom_call_target="tpu_custom_call", metadata={op_name="jit(f)/splash_mha_fwd_segmented/pallas_call"}
}
"""  # noqa: E501


def test_splash_kernel_counted_from_its_shapes():
    # Two rows (the kernel vmapped), 4 heads, 256 queries over 512 keys, head_dim 64: Q K^T and
    # P V, 2 x 2 x 256 x 512 x 64 FLOPs per head and row.
    cost = hlo_cost.analyse_hlo(KERNEL)
    assert cost.kernels == 1
    assert cost.matmul_flops == cost.kernel_flops == 2 * 4 * 4 * 256 * 512 * 64


def test_replica_group_sizes_in_each_format():
    size = hlo_cost._group_size
    assert size("replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add") == 4
    assert size("replica_groups=[2,4]<=[8], dimensions={0}") == 4
    assert size("replica_groups=[4,2]<=[2,4]T(1,0), dimensions={0}") == 2
    assert size("replica_groups=mesh['axis_0'=8,'axis_1'=2] {'axis_0'}, dimensions={0}") == 8
    both = "replica_groups=mesh['axis_0'=8,'axis_1'=2] {'axis_0','axis_1'}, dimensions={0}"
    assert size(both) == 16
    ids = "replica_groups=mesh['axis_0'=128,'axis_3'=2], device_ids=([2,128]T(1,0)) {'axis_0'}, x"
    assert size(ids) == 128


def test_an_unreadable_program_keeps_the_plan():
    """tools.aot reports a plan's memory even if the walk cannot read its HLO (a libtpu that
    prints a new syntax): one line instead of a traceback after a long compile."""
    from tools import aot

    r = aot._loop_aware("HloModule m\n(not an HLO program)\n", "v5p", None, 1.0, 1, 1)
    assert r["estimate"] is None and r["loop_aware_error"].startswith("KeyError")
