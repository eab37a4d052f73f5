r"""Compile a config's train step for a TPU slice on this (CPU) machine; print its memory, its
loop-aware work and communication, and an estimated step time; or search the layouts.

python -m tools.aot --config configs/cogvideox_5b.py:sft --topology v5p-8
python -m tools.aot --config configs/cogvideox1_5_5b.py:pretrain,frames=161,res=768x1360 \
    --topology v5p-64 --collectives
python -m tools.aot --config configs/cogvideox1_5_5b.py:pretrain,frames=161,res=768x1360 \
    --topology v5p-128 --search

The step is the trainer's own (train/program.py: `jit_train_step`, same function, shardings and
donation), lowered with its `abstract_train_args` (ShapeDtypeStructs) for the abstract devices of
`jax.experimental.topologies.get_topology_desc` (libtpu compiles; nothing is allocated).
Printed: per-chip memory from `compiled.memory_analysis()` against the chip's HBM; from the
compiled HLO (tools/hlo_cost.py), matmul FLOPs with every loop body counted its trip count and
the splash kernels from their shapes, against the analytic model FLOPs (cogvideox_jax.flops),
HBM bytes, and each collective kind's count, bytes and group sizes (`--collectives`: by the
source line that caused them); an estimated step time, tokens/s and MFU (tools/step_time.py).
`--search` ranks the layouts the config allows (tools/plan_search.py); compiled plans are
cached (tools/plan_cache.py). The last line is one JSON object.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and any(a in ("-h", "--help", "--helpfull") for a in sys.argv[1:]):
    # Answered before jax and libtpu load (seconds): the usage, the topologies, the flags.
    print(__doc__)
    print("--config FILE[:ARGS]  the experiment config (python -m train --help lists them)")
    print("--topology NAME       v5p-N (TensorCores), v5e-N or v6e-N (chips); e.g. v5p-64")
    print("--config.KEY=VALUE    any config key, as for python -m train")
    print("--sample              plan sampling (T5, the denoising loop, the VAE decode) instead")
    print("--sample_steps N      denoising steps of the sampling plan (default 50)")
    print("--sample_decode LIST  VAE decodes to plan: frame_batched,tiled,context_parallel")
    print("--collectives         print the step's collectives by the source line that caused them")
    print("--search              compile the layouts the config allows (mesh, remat, accumulation,")
    print("                      context-parallel mode) and rank them by estimated step time")
    print("--search_space SPEC   e.g. 'context=1,2;tensor=1,2;data=1;remat=full,save_attention;")
    print("                      accum=1,2;cp=allgather,ulysses' (accum: samples per data shard")
    print("                      per micro-batch)")
    print("--search_budget N     at most N compiles; --jobs N compiles at once")
    print("--cache_dir DIR       compiled plans are cached (default ~/.cache/cogvideox_jax/plans)")
    sys.exit(0)

# Compile for TPU from a CPU process: the CPU backend stays the default (jax must not try to run
# on a TPU here) and several processes may load libtpu at once (otherwise libtpu takes
# /tmp/libtpu_lockfile and a second process fails to create the topology).
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no GCE metadata server to ask
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # silences a libtpu start-up error
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from configs import validate  # noqa: E402
from tools import hlo_cost, plan_cache, plan_search, step_time  # noqa: E402
from train.program import make_program  # noqa: E402
from train.run import resolve  # noqa: E402

GIB = 1024**3

# HBM per chip. Sources: cloud.google.com/tpu/docs/v5p ("HBM2e capacity 95 GiB"),
# cloud.google.com/tpu/docs/v5e ("HBM2 capacity 16 GiB"), cloud.google.com/tpu/docs/v6e
# ("HBM capacity 32 GB" per chip, listed as 32 GiB in the system-architecture table).
HBM_BYTES = {"v5p": 95 * GIB, "v5e": 16 * GIB, "v6e": 32 * GIB}
# Chips per accelerator-type unit: v5p-N counts TensorCores (2 per chip), v5e-N/v6e-N chips.
CORES_PER_CHIP = {"v5p": 2, "v5e": 1, "v6e": 1}
# Slice shapes (cloud.google.com/tpu/docs/v5p, /v5e, /v6e "configurations" tables).
SLICES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16"}
SLICES_2D[256] = "16x16"


def parse_topology(name: str) -> tuple[str, str, int]:
    """'v5p-64' -> ('v5p', '2x4x4', 32 chips); 'v6e-64' -> ('v6e', '8x8', 64)."""
    m = re.fullmatch(r"(v5p|v5e|v6e)-(\d+)", name or "")
    if not m:
        raise ValueError(
            f"--topology {name!r}: expected v5p-N, v5e-N or v6e-N (e.g. v5p-64, v5e-256, v6e-64)"
        )
    gen, n = m.group(1), int(m.group(2))
    chips, rem = divmod(n, CORES_PER_CHIP[gen])
    if gen == "v5p":
        dims = [2, 2, 1]  # v5p-8 = 4 chips; each doubling grows the smallest dimension
        while rem == 0 and chips >= 4 and dims[0] * dims[1] * dims[2] < chips:
            dims[dims.index(min(dims))] *= 2
        if rem or chips < 4 or dims[0] * dims[1] * dims[2] != chips:
            raise ValueError(f"--topology {name}: v5p slices are v5p-8, -16, -32, ... (2^k x 8)")
        # Written as Google lists them: 2x2x1, then non-decreasing (v5p-64 = 2x4x4).
        dims = dims if chips == 4 else sorted(dims)
        return gen, "x".join(str(d) for d in dims), chips
    if chips not in SLICES_2D:
        raise ValueError(f"--topology {name}: {gen} slices have {sorted(SLICES_2D)} chips")
    return gen, SLICES_2D[chips], chips


def analyse(config, topology: str, cache_dir: str | None = None, keep_hlo: bool = False) -> dict:
    """Compile `config`'s train step for `topology` (or take it from `cache_dir`) and report its
    memory, loop-aware FLOPs and bytes, collectives and estimated step time. `keep_hlo`: the
    compiled HLO text is returned under "hlo" (not printed in the JSON)."""
    c = config
    gen, shape, chips = parse_topology(topology)
    validate.validate(c, num_devices=chips)  # config errors before libtpu is even loaded
    if c.model.attention_impl == "auto":  # resolved on the compiling (CPU) backend otherwise
        with c.unlocked():
            c.model.attention_impl = "splash"
    devices = topologies.get_topology_desc(f"{gen}:{shape}", "tpu").devices
    assert len(devices) == chips, (topology, len(devices))
    run = resolve(c, devices)
    mesh = run.mesh
    used = mesh.devices.size
    print(
        f"{topology} ({gen}:{shape}, {chips} chips, {devices[0].device_kind}); mesh "
        f"{dict(mesh.shape)} over {used} chips",
        flush=True,
    )
    r = dict(
        config=None,
        topology=topology,
        chips=chips,
        mesh_chips=used,
        device_kind=devices[0].device_kind,
        mesh={k: int(v) for k, v in mesh.shape.items()},
        remat=c.model.remat,
        attention_impl=c.model.attention_impl,
        context_parallel=c.model.context_parallel,
        batch_size=c.batch_size,
        grad_accum_steps=run.grad_accum_steps,
        tokens_per_sample=run.tokens_per_example,
        hbm_bytes_per_chip=HBM_BYTES[gen],
        model_flops_per_step=run.flops_per_step,
    )
    key = plan_cache.key(c, topology) if cache_dir else None
    hit = plan_cache.load(cache_dir, key) if key else None
    if hit is not None:
        figures, hlo = hit
        figures = figures | dict(cached=True)
    else:
        figures, hlo = _compile_step(run, gen)
        if key:
            plan_cache.store(cache_dir, key, figures, hlo)
    r = r | figures
    if hlo is not None:
        r = r | _loop_aware(hlo, gen, mesh, run.flops_per_step,
                            c.batch_size * run.tokens_per_example, c.batch_size)  # fmt: skip
        if keep_hlo:
            r["hlo"] = hlo
    return r


def _refused_bytes(e: Exception) -> int:
    """The per-chip bytes of XLA:TPU's refusal to compile what cannot fit (any other error is
    raised again). Its message calls the figure "HLO temporaries", but the figure includes the
    arguments: the same step with and without EMA weights differs by exactly their size
    (BENCHMARKS.md)."""
    m = re.search(r"HLO temporaries \(([\d.]+)G\)", str(e))
    if "RESOURCE_EXHAUSTED" not in str(e) or not m:
        raise e
    return int(float(m.group(1)) * GIB)


def _compile_step(run, gen: str) -> tuple[dict, str | None]:
    """The train step compiled: its memory figures (or XLA's refusal) and its HLO text."""
    prog = make_program(run)
    args = prog.abstract_train_args()
    step = prog.jit_train_step()
    t0 = time.perf_counter()
    with run.on_mesh():  # as the trainer's loop runs it
        lowered = step.lower(*args)
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as e:
            compiled, refused_bytes = None, _refused_bytes(e)
    compile_s = round(time.perf_counter() - t0, 1)
    if compiled is None:  # out of memory: only XLA's temporaries figure is known
        arg_bytes = argument_bytes_per_chip(args)
        return dict(
            compile_s=compile_s,
            refused=True,
            xla_refused_bytes_per_chip=refused_bytes,
            argument_bytes_per_chip=arg_bytes,
            temp_bytes_per_chip=refused_bytes - arg_bytes,
            peak_bytes_per_chip=refused_bytes,
            flops_per_step=None,
            fits=False,
        ), None
    figures = _compiled_figures(compiled, run.mesh.devices.size, HBM_BYTES[gen])
    return figures | dict(compile_s=compile_s), compiled.as_text()


def _loop_aware(hlo: str, gen: str, mesh, model_flops: float, tokens: float, samples: int):
    """tools.hlo_cost's loop-aware figures and tools.step_time's estimate for one program. An
    HLO the walk cannot read leaves the memory figures standing: the error is reported under
    "loop_aware_error" instead of ending a plan that took minutes to compile."""
    try:
        return _loop_aware_figures(hlo, gen, mesh, model_flops, tokens, samples)
    except Exception as e:  # noqa: BLE001 (any parse failure: report it, keep the plan)
        return dict(loop_aware_error=f"{type(e).__name__}: {e}", estimate=None)


def _loop_aware_figures(hlo: str, gen: str, mesh, model_flops, tokens, samples) -> dict:
    cost = hlo_cost.analyse_hlo(hlo)
    chips = int(mesh.devices.size)
    est = step_time.estimate(cost, step_time.CHIPS[gen], mesh, model_flops, tokens, samples)
    comm = {
        k: dict(count=v["count"], gb_per_chip=v["moved_bytes"] / 1e9, groups=v["groups"])
        for k, v in cost.collective_totals().items()
    }
    return dict(
        matmul_flops_per_step=cost.matmul_flops * chips,
        kernel_flops_per_step=cost.kernel_flops * chips,
        other_flops_per_step=cost.other_flops * chips,  # elementwise and reductions (VPU)
        compiled_over_model=cost.matmul_flops * chips / model_flops if model_flops else None,
        hbm_gb_per_chip=cost.hbm_bytes / 1e9,
        pallas_kernel_calls=cost.kernels,  # splash kernels run per step
        comm=comm,
        comm_gb_per_chip=sum(v["gb_per_chip"] for v in comm.values()),
        loops=cost.loops,
        unknown_trip_counts=cost.unknown_trip_counts,
        collectives_by_source=cost.by_source(),
        estimate=est,
    )


def analyse_sampling(
    config, topology: str, steps: int = 50, batch: int = 1, decodes=("frame_batched", "tiled")
) -> dict:
    """Compile the sampling pipeline's programs for `topology`, at the config's clip size and on
    its mesh with the sampling rules (`pipeline.SAMPLING_RULES` over the config's own: the rows,
    both guidance halves, over `data`): the T5-XXL prompt encoding, the whole `steps`-step
    denoising loop (`pipeline._denoise`, the one program `Pipeline` runs) and the VAE decode,
    frame-batched and replicated as `Pipeline` decodes, and context-parallel
    (`vae.decode_context_parallel`) where the mesh has a context axis. Per program: per-chip
    memory and whether it fits. `decodes`: which VAE decodes to compile (pipeline.VAE_DECODES;
    "context_parallel" only where the mesh has a context axis)."""
    from flax import nnx

    import cogvideox_jax as cj
    from cogvideox_jax import diffusion, flops, pipeline, sharding, t5
    from cogvideox_jax import vae as vae_lib

    c = config
    gen, shape, chips = parse_topology(topology)
    validate.validate(c, num_devices=chips)
    impl = "splash" if c.model.attention_impl == "auto" else c.model.attention_impl
    devices = topologies.get_topology_desc(f"{gen}:{shape}", "tpu").devices
    run = resolve(c, devices)
    mesh, cfg = run.mesh, run.model
    rules = pipeline.sampling_rules(run.rules)
    dtype = jnp.dtype(c.model.dtype)
    print(
        f"{topology} ({gen}:{shape}, {chips} chips); sampling mesh {dict(mesh.shape)}; "
        f"{c.input.num_frames}x{c.input.height}x{c.input.width}, {steps} steps, batch {batch} "
        "with guidance",
        flush=True,
    )
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def sds(tree, shardings=rep):
        if not isinstance(shardings, jax.sharding.Sharding):
            return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                tree, shardings)  # fmt: skip
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings), tree
        )

    def split(build, module_rules):
        graphdef, state = nnx.split(nnx.eval_shape(build))
        pure = nnx.to_pure_dict(state)
        target = (
            rep if module_rules is None else sharding.state_shardings(state, mesh, module_rules)
        )
        nnx.replace_by_pure_dict(state, sds(pure, target))
        return graphdef, state

    vae_cfg = vae_lib.vae_config("cogvideox" if c.vae.variant != "tiny" else "tiny")
    r_lat = vae_cfg.temporal_compression_ratio
    frames = (c.input.num_frames - 1) // r_lat + 1
    extra = (-frames) % (cfg.patch_size_t or 1)
    h, w = c.input.height // 8, c.input.width // 8
    rows = 2 * batch
    c_lat = vae_cfg.latent_channels
    latents = jax.ShapeDtypeStruct((batch, frames + extra, h, w, c_lat), dtype, sharding=rep)
    out = {}

    def compile_(name, lower, model_flops=0.0):
        t0 = time.perf_counter()
        with jax.set_mesh(mesh), sharding.use_rules(rules):
            try:
                compiled = lower().compile()
            except jax.errors.JaxRuntimeError as e:
                out[name] = dict(refused=True, peak_bytes_per_chip=_refused_bytes(e), fits=False)
                return
        figures = _compiled_figures(compiled, mesh.devices.size, HBM_BYTES[gen])
        figures |= _loop_aware(compiled.as_text(), gen, mesh, model_flops, 0, batch)
        figures.pop("collectives_by_source", None)
        out[name] = figures | dict(compile_s=round(time.perf_counter() - t0, 1))

    # 1. The prompts (and negative prompts): T5-XXL over 226 tokens (a one-layer T5 of the
    # text width for configs with another text width: runlocal).
    small = dict(d_model=cfg.text_embed_dim, num_layers=1, num_heads=2, d_kv=8, d_ff=32)
    small = {} if cfg.text_embed_dim == 4096 else small
    t5_cfg = t5.t5_config("t5-v1_1-xxl", **small)
    gd, st = split(
        lambda: t5.T5Encoder(t5_cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)), rules
    )
    ids = jax.ShapeDtypeStruct((rows, cfg.max_text_len), jnp.int32, sharding=rep)
    compile_("text_encoder", lambda: pipeline._encode_text.lower_split(gd, st, ids))

    # 2. The denoising loop.
    def build():
        kw = dict(attention_impl=impl, context_parallel=c.model.context_parallel)
        return cj.Transformer(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0), **kw)

    gd, st = split(build, rules)
    ab = diffusion.alphas_cumprod(diffusion.ScheduleConfig(c.diffusion.snr_shift_scale))
    table = sds({k: jnp.asarray(v) for k, v in diffusion.ddim_table(ab, steps).items()})
    embeds = jax.ShapeDtypeStruct((rows, cfg.max_text_len, cfg.text_embed_dim), dtype, sharding=rep)
    cond = None
    if cfg.in_channels == 32:
        cond = latents
    scales = jax.ShapeDtypeStruct((steps,), jnp.float32, sharding=rep)
    key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=rep)
    ofs = 2.0 if cfg.ofs_embed_dim else None
    video = (
        (frames + extra) // (cfg.patch_size_t or 1) * (h // cfg.patch_size) * (w // cfg.patch_size)
    )
    loop_flops = steps * rows * flops.transformer_flops(cfg, cfg.max_text_len, video)
    compile_("denoise", lambda: pipeline._denoise.lower_split(
        gd, st, latents, embeds, cond, table, scales, key,
        ofs=ofs, sampler="ddim", do_cfg=True, progress=False,
    ), model_flops=loop_flops)  # fmt: skip

    # 3. The decode, float32: frame-batched and replicated (Pipeline), and context-parallel.
    gd, st = split(lambda: cj.AutoencoderKL(vae_cfg, rngs=nnx.Rngs(0)), None)
    z = jax.ShapeDtypeStruct((batch, frames, h, w, c_lat), jnp.float32, sharding=rep)
    if "frame_batched" in decodes:
        compile_("vae_decode", lambda: pipeline._decode.lower_split(gd, st, z))
    if "tiled" in decodes:
        compile_("vae_decode_tiled", lambda: pipeline._decode_tiled.lower_split(gd, st, z))
    if "context_parallel" in decodes and mesh.shape["context"] > 1:
        cp = pipeline._decode_context_parallel
        compile_("vae_decode_context_parallel", lambda: cp.lower_split(gd, st, z, mesh=mesh))
    return dict(
        topology=topology,
        chips=chips,
        mesh={k: int(v) for k, v in mesh.shape.items()},
        clip=[c.input.num_frames, c.input.height, c.input.width],
        steps=steps,
        batch=batch,
        tokens_per_row=run.tokens_per_example,
        hbm_bytes_per_chip=HBM_BYTES[gen],
        programs=out,
    )


def report_sampling(r: dict) -> None:
    g = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
    for name, p in r["programs"].items():
        if p.get("refused"):
            print(f"{name}: DOES NOT FIT: XLA refused to compile; it needs "
                  f"{g(p['peak_bytes_per_chip'])} per chip")  # fmt: skip
            continue
        verdict = "fits" if p["fits"] else "DOES NOT FIT"
        print(
            f"{name}: peak {g(p['peak_bytes_per_chip'])} per chip of {g(r['hbm_bytes_per_chip'])} "
            f"({verdict}): arguments {g(p['argument_bytes_per_chip'])}, temporaries "
            f"{g(p['temp_bytes_per_chip'])}; compile {p['compile_s']} s"
        )
        e = p["estimate"]
        if e is None:
            print(f"  loop-aware figures unavailable: {p['loop_aware_error']}")
            continue
        mfu = f", MFU {100 * e['mfu']:.1f}%" if e["mfu"] is not None else ""
        print(
            f"  ESTIMATE (roofline, not a measurement): {e['step_s']:.3f} s per run of the "
            f"program (compute {e['compute_s']:.3f} s, exposed communication "
            f"{e['exposed_comm_s']:.3f} s){mfu}; HBM {p['hbm_gb_per_chip']:.1f} GB, "
            f"collectives {p['comm_gb_per_chip']:.2f} GB per chip"
        )


def argument_bytes_per_chip(args) -> int:
    """Bytes of one chip's shards of the step's abstract arguments."""
    total = 0
    for x in jax.tree.leaves(args):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) else x.shape
        total += math.prod(shape) * x.dtype.itemsize
    return total


def _compiled_figures(compiled, chips: int, hbm: int) -> dict:
    mem = compiled.memory_analysis()
    # What the step needs resident at once: its arguments, outputs not aliased to donated
    # arguments, and XLA's one temporary buffer (MaxText's "total memory" of a compiled step).
    peak = int(
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
    )
    xla_flops = float(compiled.cost_analysis()["flops"])  # of the partitioned program: per chip
    return dict(
        argument_bytes_per_chip=int(mem.argument_size_in_bytes),
        output_bytes_per_chip=int(mem.output_size_in_bytes),
        alias_bytes_per_chip=int(mem.alias_size_in_bytes),
        temp_bytes_per_chip=int(mem.temp_size_in_bytes),
        generated_code_bytes_per_chip=int(mem.generated_code_size_in_bytes),
        peak_bytes_per_chip=peak,
        xla_peak_memory_bytes=int(mem.peak_memory_in_bytes),  # XLA's own heap-simulator figure
        fits=peak <= hbm,
        xla_flops_per_chip=xla_flops,
        flops_per_step=xla_flops * chips,
    )


def report(r: dict) -> None:
    g = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
    hbm = g(r["hbm_bytes_per_chip"])
    if r.get("refused"):
        print(
            f"DOES NOT FIT: XLA refused to compile; it needs {g(r['peak_bytes_per_chip'])} per "
            f"chip ({hbm} HBM): arguments {g(r['argument_bytes_per_chip'])} and temporaries "
            f"{g(r['temp_bytes_per_chip'])}"
        )
        return
    print(
        f"per chip: arguments {g(r['argument_bytes_per_chip'])} (donated, aliased to outputs "
        f"{g(r['alias_bytes_per_chip'])}), outputs {g(r['output_bytes_per_chip'])}, "
        f"temporaries {g(r['temp_bytes_per_chip'])}, code {g(r['generated_code_bytes_per_chip'])}"
    )
    verdict = "fits" if r["fits"] else "DOES NOT FIT"
    print(f"peak {g(r['peak_bytes_per_chip'])} of {hbm} HBM: {verdict}")
    if r.get("loop_aware_error"):
        print(f"loop-aware figures and estimate unavailable: {r['loop_aware_error']}")
        print(f"compile {r['compile_s']} s")
        return
    print(
        f"FLOPs per step, loop-aware (every loop body times its trip count, splash kernels from "
        f"their shapes): {r['matmul_flops_per_step']:.3e} matmul FLOPs, "
        f"{r['compiled_over_model']:.3f} x the model's {r['model_flops_per_step']:.3e} "
        "(cogvideox_jax.flops: 3 x forward, no "
        "recompute; the excess is remat recompute and flash attention's backward recompute). "
        f"XLA's cost_analysis, which sees each loop body once: {r['flops_per_step']:.3e}"
    )
    print(
        f"HBM traffic {r['hbm_gb_per_chip']:.1f} GB per chip per step; collectives per chip per "
        "step: "
        + "; ".join(
            f"{k} {v['count']} x, {v['gb_per_chip']:.2f} GB (groups "
            f"{','.join(map(str, v['groups']))})"
            for k, v in r["comm"].items()
        )
    )
    e = r["estimate"]
    print(
        f"ESTIMATE (roofline, not a measurement; tools/step_time.py): step {e['step_s']:.3f} s = "
        f"compute {e['compute_s']:.3f} s (MXU {e['mxu_s']:.3f}, HBM {e['hbm_s']:.3f}) + exposed "
        f"communication {e['exposed_comm_s']:.3f} s of {e['comm_s']:.3f} s; "
        f"{e['tokens_per_s']:.4g} tokens/s, {e['samples_per_s']:.4g} samples/s, MFU "
        f"{100 * e['mfu']:.1f}%"
    )
    if r.get("unknown_trip_counts"):
        print(f"loops counted once (trip count unknown): {r['unknown_trip_counts']}")
    cached = " (from the plan cache)" if r.get("cached") else ""
    print(f"compile {r['compile_s']} s{cached}")


def print_collectives(r: dict, top: int = 40) -> None:
    """The plan's collectives by the source line that caused them (--collectives)."""
    rows = r.get("collectives_by_source") or []
    print(f"collectives by source ({len(rows)} sources; per chip per step, largest first):")
    print(f"{'kind':<19} {'per step':>9} {'static':>6} {'GB':>8} {'group':>6}  source  (op)")
    for row in rows[:top]:
        groups = ",".join(map(str, row["groups"]))
        print(
            f"{row['kind']:<19} {row['count']:>9} {row['static']:>6} "
            f"{row['moved_bytes'] / 1e9:>8.3f} {groups:>6}  {row['source']}  ({row['op']})"
        )


def main(argv):
    del argv
    config, topology = flags.FLAGS.config, flags.FLAGS.topology
    if config is None or not topology:
        raise app.UsageError("--config and --topology are required")
    parse_topology(topology)  # a bad name fails before the config is even built
    if flags.FLAGS.sample:
        decodes = [d for d in flags.FLAGS.sample_decode.split(",") if d]
        r = analyse_sampling(config, topology, flags.FLAGS.sample_steps, decodes=decodes)
        r["config"] = config_flags.get_config_filename(flags.FLAGS["config"])
        report_sampling(r)
    elif flags.FLAGS.search:
        r = plan_search.search(
            config,
            topology,
            config_file=config_flags.get_config_filename(flags.FLAGS["config"]),
            cache_dir=flags.FLAGS.cache_dir or None,
            jobs=flags.FLAGS.jobs,
            space=flags.FLAGS.search_space,
            budget=flags.FLAGS.search_budget,
        )
        plan_search.report(r)
    else:
        r = analyse(config, topology, cache_dir=flags.FLAGS.cache_dir or None)
        r["config"] = config_flags.get_config_filename(flags.FLAGS["config"])
        report(r)
        if flags.FLAGS.collectives:
            print_collectives(r)
    if not flags.FLAGS.collectives:
        r.pop("collectives_by_source", None)
    print(json.dumps(r), flush=True)


if __name__ == "__main__":  # flags defined here only: the module stays importable
    config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=True)
    flags.DEFINE_string("topology", None, "TPU slice, e.g. v5p-64, v5e-256, v6e-64.")
    flags.DEFINE_bool("sample", False, "Plan the sampling pipeline instead of the train step.")
    flags.DEFINE_integer("sample_steps", 50, "Denoising steps of the sampling plan.")
    flags.DEFINE_string(
        "sample_decode",
        "frame_batched,tiled,context_parallel",
        "VAE decodes the sampling plan compiles (context_parallel: where mesh.context > 1).",
    )
    flags.DEFINE_bool("collectives", False, "Print the collectives by the source that caused them.")
    flags.DEFINE_string(
        "cache_dir", plan_cache.DEFAULT_DIR, "Compiled plans are cached here ('' for none)."
    )
    flags.DEFINE_bool("search", False, "Search the layouts the config allows; rank them.")
    flags.DEFINE_integer("jobs", 0, "Search: compiles at once (0: as memory and cores allow).")
    flags.DEFINE_string("search_space", "", "Search: e.g. context=1,2;tensor=1;remat=full")
    flags.DEFINE_integer("search_budget", 0, "Search: at most this many compiles (0: all).")
    app.run(main)
