r"""Transformer training step, ours against diffusers' CogVideoXTransformer3DModel in torch.

  python -m bench.train_step [--variant 2b|5b|1.5-5b] [--layers 4 --heads 8 --head-dim 64
                              --text-len 226 --text-dim 4096 --time-dim 512]
                             [--latent 13,30,44 --batch 1 --repeats 3]
                             [--dtype float32|bfloat16 --param-dtype float32|bfloat16]
                             [--remat none|full] [--attention auto] [--torch-device auto]
                             [--separate] [--no-attention] [--smallest] [--out result.json]

One step = forward + backward + global-norm clipping + AdamW update. Same config, weights (the
diffusers model is built with random weights, saved, and loaded into ours by
`load_transformer`), inputs (latents, text, timesteps, noise) and objective
(`train.objective.diffusion_loss`: mean squared v-prediction error; noise schedule with
snr_shift_scale 3). Optimiser on both sides: clipping at 1.0, then AdamW (lr 1e-4, b1 0.9,
b2 0.95, eps 1e-8, weight decay 1e-4 on matrices only), ours from `train.optim`.

The model: by default CogVideoX-5B's architecture (RoPE) at 4 layers of 8 heads x 64;
`--variant` takes a released model's architecture and size, and size flags given with it
override its fields (`--variant 5b --layers 2`). Precision: parameters in `--param-dtype`,
computed in `--dtype` (ours: the model's `dtype`/`param_dtype`, as the trainer's
`model.dtype`/`model.param_dtype`; torch: autocast when the two differ, as mixed-precision
fine-tuning scripts do). `--remat full` recomputes each block in the backward on both sides.

Where: ours on jax's default device (one device); torch on `--torch-device` (auto: the GPU
when jax runs on one). By default both live in one process: one warm-up each (compilation
for ours), then rounds that run each once, in an order shuffled every round (`alternate`);
medians. `--separate` runs each alone in a fresh process,
ours first (warm-up, then the repeats), for models that fit a device only once (5B with
AdamW state is about 90 GB in fp32).

Figures: seconds per step, tokens/s (text + video tokens), model FLOP/s from
`cogvideox_jax.flops.train_flops` (3 x forward: matmuls + full attention, no recompute), MFU
against the device's dense bf16 peak (`train.metrics.PEAK_FLOPS`; none on a CPU) and peak
device memory where the framework reports it (GPU).

The issue's GPU rows (bf16 on one GPU, remat):
  python -m bench.train_step --variant 5b --latent 13,60,90 --dtype bfloat16 --remat full \
      --separate      # 49 x 480 x 720; likewise --variant 2b
  python -m bench.train_step --variant 1.5-5b --latent 22,96,170 --dtype bfloat16 \
      --remat full --separate  # 81 x 768 x 1360 (21 latent frames, padded to 22)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import nnx

import cogvideox_jax as cj
from cogvideox_jax import attention, compiler, diffusion, flops
from train import metrics, objective, optim, steps

ROOT = Path(__file__).resolve().parents[1]  # the repository (children of --separate run here)
# The smallest configuration: a run of a few seconds (CI).
SMALLEST = dict(
    layers=1, heads=2, head_dim=16, latent="2,4,4", text_len=8, text_dim=16, time_dim=16
)
OPTIM = types.SimpleNamespace(
    lr=1e-4,
    warmup_steps=0,
    schedule="constant",
    end_lr_factor=1.0,
    grad_clip=1.0,
    b1=0.9,
    b2=0.95,
    eps=1e-8,
    weight_decay=1e-4,
)


# ---- helpers shared by the bench scripts ----


def machine_facts() -> dict:
    """Where and when a benchmark ran: platform, CPU, thread counts, library versions, date."""
    import diffusers

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu
            )
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "jax_backend": jax.default_backend(),
        "jax_device": str(jax.devices()[0]),
        "versions": {
            "jax": jax.__version__,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "python": platform.python_version(),
        },
    }


def seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def alternate(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each callable: one warm-up each (in the given order), then `repeats`
    rounds that run each once, so that load drifting on a shared machine hits all of them alike.
    Each round takes its own order (shuffled, seeded by the round): a fixed order has one
    implementation always run right after the other, and on the CPU what ran just before moves a
    step's time (BENCHMARKS.md: ours after torch's train step, torch after our sampling call)."""
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for r in range(repeats):
        order = list(fns)
        random.Random(r).shuffle(order)
        for name in order:
            times[name].append(seconds(fns[name]))
    return {name: statistics.median(t) for name, t in times.items()}


def sig(x: float, digits: int = 4) -> float:
    """x rounded to `digits` significant digits (for tables and JSON)."""
    return float(f"{x:.{digits}g}")


def write_json(result: dict, path: str | None) -> None:
    print(json.dumps(result))
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


def model_facts(args) -> dict:
    """The transformer's size from `model_args` flags, for the JSON results."""
    keys = ("layers", "heads", "head_dim", "text_len", "text_dim")
    return {**{k: getattr(args, k) for k in keys}, "time_embed_dim": args.time_dim}


def rope_tables(model, frames: int, h: int, w: int, device=None):
    """RoPE (cos, sin) as diffusers' CogVideoXPipeline builds them (None without RoPE)."""
    from diffusers import CogVideoXPipeline

    if not model.config.use_rotary_positional_embeddings:
        return None
    fake = types.SimpleNamespace(vae_scale_factor_spatial=8, transformer=model)
    return CogVideoXPipeline._prepare_rotary_positional_embeddings(
        fake, h * 8, w * 8, frames, device or torch.device("cpu")
    )


def diffusers_transformer(args, seed: int = 0):
    """A random CogVideoXTransformer3DModel of the benchmark's architecture (`bench_config`)."""
    from diffusers import CogVideoXTransformer3DModel

    config = bench_config(args).to_diffusers()
    del config["_class_name"]
    torch.manual_seed(seed)
    return CogVideoXTransformer3DModel(**config)


def parse_latent(text: str) -> tuple[int, int, int]:
    try:
        t, h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--latent must be T,h,w (e.g. 13,30,44), got {text!r}"
        ) from None
    if min(t, h, w) < 1 or h % 2 or w % 2:
        raise argparse.ArgumentTypeError(f"--latent {text}: need T >= 1 and even h, w (patch 2)")
    return t, h, w


# The default benchmark transformer: CogVideoX-5B's architecture (RoPE), 4 layers of 8 x 64.
SIZES = dict(layers=4, heads=8, head_dim=64, text_len=226, text_dim=4096, time_dim=512)
# The fields of `cogvideox_jax.TransformerConfig` each size flag sets.
SIZE_FIELDS = dict(
    layers="num_layers",
    heads="num_heads",
    head_dim="head_dim",
    text_len="max_text_len",
    text_dim="text_embed_dim",
    time_dim="time_embed_dim",
)
T2V_VARIANTS = ("2b", "5b", "1.5-5b")  # the variants this loss trains (no image latents)


def model_args(parser: argparse.ArgumentParser, *, latent: str) -> None:
    """The flags of the transformer's size, shared with bench.sample. The size flags default to
    `SIZES` (4 layers) or, with `--variant`, to that released model's sizes."""
    parser.add_argument(
        "--variant",
        default=None,
        choices=T2V_VARIANTS,
        help="a released transformer's architecture and size (default: 5b's, 4 layers of 8 "
        "heads); size flags given with it override its fields",
    )
    for flag in SIZES:
        parser.add_argument("--" + flag.replace("_", "-"), type=int, default=None)
    parser.add_argument(
        "--latent", default=latent, help="latent T,h,w (16 channels); 13,60,90 is 49 x 480 x 720"
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--attention",
        default="auto",
        choices=attention.IMPLEMENTATIONS,
        help="our attention kernel (auto: blocked on CPU for long sequences, cuDNN on a GPU "
        "in bfloat16)",
    )
    parser.add_argument("--smallest", action="store_true", help="tiny sizes: seconds (CI)")
    parser.add_argument("--out", default=None, help="write the result as JSON here")


def parse_sized(parser: argparse.ArgumentParser, argv, smallest: dict) -> argparse.Namespace:
    """`parser.parse_args(argv)`, with the `smallest` sizes in place of the given ones under
    `--smallest`."""
    args = parser.parse_args(argv)
    if args.smallest:
        for key, value in smallest.items():
            setattr(args, key, value)
    return args


def parse(parser: argparse.ArgumentParser, argv, smallest: dict) -> argparse.Namespace:
    args = parse_sized(parser, argv, smallest)
    variant = getattr(args, "variant", None)
    full = cj.transformer_config(variant) if variant else None
    for flag, field in SIZE_FIELDS.items():
        if getattr(args, flag) is None:
            setattr(args, flag, getattr(full, field) if full else SIZES[flag])
    args.latent = parse_latent(args.latent) if isinstance(args.latent, str) else args.latent
    pt = bench_config(args).patch_size_t or 1
    if args.latent[0] % pt:
        parser.error(
            f"--latent {','.join(map(str, args.latent))}: T must be a multiple of the "
            f"variant's temporal patch size {pt} (81 frames are 21 latent frames, padded to 22)"
        )
    return args


def bench_config(args) -> cj.TransformerConfig:
    """The benchmark transformer's architecture: `--variant` (default 5b) with the size flags."""
    sizes = {field: getattr(args, flag) for flag, field in SIZE_FIELDS.items()}
    return cj.transformer_config(getattr(args, "variant", None) or "5b", **sizes)


def video_tokens(cfg: cj.TransformerConfig, latent) -> int:
    t, h, w = latent
    return (t // (cfg.patch_size_t or 1)) * (h // cfg.patch_size) * (w // cfg.patch_size)


# ---- the train steps ----

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _inputs(args, ab: np.ndarray) -> dict[str, np.ndarray]:
    """Channels-last latents, text, timesteps and noise, fixed by seed 0."""
    rng = np.random.default_rng(0)
    shape = (args.batch, *args.latent, 16)
    return {
        "z0": rng.standard_normal(shape, dtype=np.float32),
        "text": rng.standard_normal((args.batch, args.text_len, args.text_dim), dtype=np.float32),
        "t": rng.integers(0, len(ab), args.batch),
        "noise": rng.standard_normal(shape, dtype=np.float32),
    }


def ours_step(folder, args, ab: np.ndarray):
    """(step, state): step(state, batch) -> (state, loss), one jitted AdamW update of our
    Transformer with the weights of the diffusers folder `folder` (parameters in
    `--param-dtype`, computed in `--dtype`, `--remat` policy), state donated."""
    loaded = cj.load_transformer(folder, dtype=np.dtype(args.param_dtype))
    cfg = loaded.cfg
    abstract = nnx.eval_shape(
        lambda: cj.Transformer(
            cfg,
            dtype=np.dtype(args.dtype),
            param_dtype=np.dtype(args.param_dtype),
            remat=args.remat,
            attention_impl=args.attention,
            rngs=nnx.Rngs(0),
        )
    )
    graphdef, *templates = nnx.split(abstract, nnx.Param, ...)
    _, params, buffers = nnx.split(loaded, nnx.Param, ...)
    tx, _ = optim.make_optimizer(OPTIM, total_steps=1)
    ab = jnp.asarray(ab, jnp.float32)

    model = steps.Model(graphdef, tuple(templates))

    def loss_fn(p, b, batch):
        m = model.merge(p, b)
        return objective.diffusion_loss(
            m, batch["z0"], batch["text"], batch["t"], batch["noise"], ab
        )

    def step(state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], state["buffers"], batch)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return dict(state, params=params, opt_state=opt_state), loss

    p, b = nnx.to_pure_dict(params), nnx.to_pure_dict(buffers)
    del loaded, params, buffers  # the state below holds (and donates) the arrays
    state = {"params": p, "buffers": b, "opt_state": tx.init(p)}
    return compiler.jit(step, donate_argnums=(0,)), state


def theirs_step(model, ab: np.ndarray, inputs: dict, args):
    """step() -> loss: one torch training step (loss.backward(), clipping, AdamW.step()) of
    `model`, moved to `--torch-device`: parameters in `--param-dtype`; computed in `--dtype`
    (autocast when it differs from the parameters'); gradient checkpointing per block when
    `--remat full`."""
    device = torch.device(args.torch_device)
    model.to(device)
    if next(model.parameters()).dtype != DTYPES[args.param_dtype]:
        model.to(DTYPES[args.param_dtype])
    if args.remat != "none":
        model.enable_gradient_checkpointing()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "bias" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "bias" not in n)]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": OPTIM.weight_decay},
            {"params": rest, "weight_decay": 0},
        ],
        lr=OPTIM.lr,
        betas=(OPTIM.b1, OPTIM.b2),
        eps=OPTIM.eps,
    )

    def tensor(x, perm=None):
        x = torch.from_numpy(x)
        return (x.permute(*perm).contiguous() if perm else x).to(device)

    z0 = tensor(inputs["z0"], (0, 1, 4, 2, 3))  # (B, T, C, h, w)
    noise = tensor(inputs["noise"], (0, 1, 4, 2, 3))
    text, t = tensor(inputs["text"]), tensor(inputs["t"])
    a = tensor(np.asarray(ab, np.float32))[t].reshape(-1, 1, 1, 1, 1)
    rope = rope_tables(model, *inputs["z0"].shape[1:4], device=device)
    text = text.to(DTYPES[args.param_dtype])
    autocast = torch.autocast(
        device.type, dtype=DTYPES[args.dtype], enabled=args.dtype != args.param_dtype
    )
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        x_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
        v = a.sqrt() * noise - (1 - a).sqrt() * z0
        x_t = x_t.to(DTYPES[args.param_dtype])
        with autocast:
            pred = model(
                hidden_states=x_t,
                encoder_hidden_states=text,
                timestep=t,
                image_rotary_emb=rope,
                return_dict=False,
            )[0]
        loss = torch.mean((pred.float() - v) ** 2)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM.grad_clip)
        opt.step()
        return float(loss.detach())  # waits for the device

    return step


def _without_attention():
    """Ablation: attention(q, k, v) = v on both sides, so a step times everything else."""
    import torch.nn.functional as F

    attention.dot_product_attention = lambda q, k, v, **kw: v
    F.scaled_dot_product_attention = lambda q, k, v, **kw: v


def make_run(who: str, args, folder, ab: np.ndarray, inputs: dict, model=None):
    """run() -> loss: one timed train step of `who` ("ours" or "diffusers"), weights from the
    diffusers folder `folder` (or, for diffusers, the already built `model`)."""
    if who == "ours":
        step, state = ours_step(folder, args, ab)
        batch = {k: jnp.asarray(v) for k, v in inputs.items()}

        def run():
            nonlocal state
            state, loss = jax.block_until_ready(step(state, batch))
            return float(loss)

        return run
    if model is None:
        from diffusers import CogVideoXTransformer3DModel

        model = CogVideoXTransformer3DModel.from_pretrained(folder)
    return theirs_step(model, ab, inputs, args)


def peak_bytes(who: str, args) -> int | None:
    """The device's peak allocation so far; None where the framework does not track it (jax
    on the CPU, torch off CUDA)."""
    if who == "ours":
        stats = jax.devices()[0].memory_stats()
        return stats.get("peak_bytes_in_use") if stats else None
    return torch.cuda.max_memory_allocated() if args.torch_device == "cuda" else None


def run_one(args, who: str, folder) -> dict:
    """Time one implementation alone (`--only`): warm-up, then `--repeats` steps; median."""
    ab = diffusion.alphas_cumprod(diffusion.ScheduleConfig(snr_shift_scale=3.0))
    run = make_run(who, args, folder, ab, _inputs(args, ab))
    first = run()
    times = [seconds(run) for _ in range(args.repeats)]
    return {"s": statistics.median(times), "first_loss": first, "peak_bytes": peak_bytes(who, args)}


def run_separately(args, argv: list[str], folder) -> dict:
    """Each implementation in its own fresh process (`--only`), ours first: for models whose
    two copies do not fit one device. Returns {name: run_one's dict}."""
    child_argv = [a for a in argv if a != "--separate"]
    if "--out" in child_argv:
        i = child_argv.index("--out")
        del child_argv[i : i + 2]
    out = {}
    with tempfile.TemporaryDirectory() as d:
        for who in ("ours", "diffusers"):
            path = os.path.join(d, who + ".json")
            cmd = [sys.executable, "-m", "bench.train_step", *child_argv, "--only", who]
            cmd += ["--weights", str(folder), "--torch-device", args.torch_device, "--out", path]
            env = dict(os.environ)
            if who == "diffusers":  # jax stays off the accelerator torch is timed on
                env["JAX_PLATFORMS"] = "cpu"
            else:  # alone on the device: jax may take more than its default 75% of a GPU
                env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
            rc = subprocess.run(cmd, env=env, cwd=ROOT).returncode
            if rc:
                raise SystemExit(f"--separate: the {who} process failed (exit {rc}), see above")
            with open(path) as f:
                out[who] = json.load(f)
    return out


def add_torch_device(parser: argparse.ArgumentParser) -> None:
    """The `--torch-device` flag of the bench scripts (resolved by `torch_device`)."""
    parser.add_argument(
        "--torch-device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="auto: cuda when jax runs on a GPU, else cpu",
    )


def torch_device(requested: str) -> str:
    """`--torch-device auto`: torch on the GPU when jax runs on one (the same GPU), else CPU."""
    on_gpu = jax.default_backend() == "gpu"
    device = requested if requested != "auto" else ("cuda" if on_gpu else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "--torch-device cuda: this torch build has no CUDA (jax runs on "
            f"{jax.default_backend()}); install a CUDA build of torch to compare on the GPU"
        )
    return device


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m bench.train_step")
    model_args(parser, latent="13,30,44")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="compute dtype")
    parser.add_argument("--param-dtype", default="float32", choices=DTYPES)
    parser.add_argument(
        "--remat",
        default="none",
        choices=("none", "full"),
        help="full: recompute each block in the backward (ours: the `full` policy; diffusers: "
        "gradient checkpointing)",
    )
    add_torch_device(parser)
    parser.add_argument(
        "--separate",
        action="store_true",
        help="run each implementation alone in a fresh process (models that fit a device once)",
    )
    parser.add_argument(
        "--no-attention",
        action="store_true",
        help="ablation: attention returns v in both implementations (this process only)",
    )
    parser.add_argument("--only", choices=("ours", "diffusers"), help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)  # --only: the diffusers folder
    args = parse(parser, argv, SMALLEST)
    if args.no_attention:
        _without_attention()
    if args.only and not args.weights:
        parser.error("--only needs --weights (a diffusers transformer folder)")
    if args.only:  # a child of --separate
        result = run_one(args, args.only, args.weights)
        write_json(result, args.out)
        return result
    args.torch_device = torch_device(args.torch_device)
    cfg = bench_config(args)
    tokens_v = video_tokens(cfg, args.latent)
    ab = diffusion.alphas_cumprod(diffusion.ScheduleConfig(snr_shift_scale=3.0))
    with tempfile.TemporaryDirectory() as folder:
        theirs = diffusers_transformer(args)  # fp32 on the host; its weights go to both
        parameters = sum(p.numel() for p in theirs.parameters())
        theirs.save_pretrained(folder)
        if args.separate:
            del theirs
            runs = run_separately(args, argv, folder)
            med = {name: r["s"] for name, r in runs.items()}
        else:
            inputs = _inputs(args, ab)
            runs = {"ours": {}, "diffusers": {}}

            def recorded(who, run):  # the first call (warm-up) gives the initial weights' loss
                return lambda: runs[who].setdefault("first_loss", run())

            fns = {
                "ours": recorded("ours", make_run("ours", args, folder, ab, inputs)),
                "diffusers": recorded(
                    "diffusers", make_run("diffusers", args, folder, ab, inputs, theirs)
                ),
            }
            med = alternate(fns, args.repeats)
            for who in runs:
                runs[who]["peak_bytes"] = peak_bytes(who, args)
    tokens = args.batch * (args.text_len + tokens_v)
    flop = args.batch * flops.train_flops(cfg, args.text_len, tokens_v)
    peak = metrics.peak_flops(jax.devices()[0])  # dense bf16 peak of the device; 0 if unknown
    rows = {}
    for name, s in med.items():
        rows[name] = {
            "s_per_step": sig(s),
            "tokens_per_s": sig(tokens / s),
            "gflops_per_s": sig(flop / s / 1e9),
        }
        if peak and (name == "ours" or args.torch_device == "cuda"):
            rows[name]["mfu"] = sig(flop / s / peak, 3)
        if runs[name].get("peak_bytes"):
            rows[name]["peak_memory_gib"] = sig(runs[name]["peak_bytes"] / 2**30, 3)
    losses = {name: r["first_loss"] for name, r in runs.items()}
    seq = args.text_len + tokens_v
    result = {
        "benchmark": "train_step",
        "config": {
            "variant": args.variant or "5b (resized)",
            **model_facts(args),
            "latent_thw": list(args.latent),
            "batch": args.batch,
            "rope": cfg.rope,
            "dtype": args.dtype,
            "param_dtype": args.param_dtype,
            "remat": args.remat,
            "attention": "none (ablation: returns v)"
            if args.no_attention
            else attention.resolve(args.attention, np.dtype(args.dtype), seq),
            "torch_device": args.torch_device,
            "processes": "one per implementation" if args.separate else "one, shuffled rounds",
        },
        "parameters": parameters,
        "tokens_per_step": tokens,
        "model_flops_per_step": flop,
        "peak_flops_per_device": peak or None,
        "repeats": args.repeats,
        "machine": machine_facts(),
        "first_loss": losses,
        "first_loss_rel_diff": abs(losses["ours"] - losses["diffusers"]) / abs(losses["diffusers"]),
        **rows,
        "ratio_ours_over_diffusers": sig(med["ours"] / med["diffusers"], 3),
    }
    print(f"{'':10}{'s/step':>10}{'tokens/s':>12}{'GFLOP/s':>10}{'MFU':>8}{'peak GiB':>10}")
    for name, r in rows.items():
        mfu, mem = r.get("mfu", "-"), r.get("peak_memory_gib", "-")
        print(
            f"{name:10}{r['s_per_step']:>10}{r['tokens_per_s']:>12}{r['gflops_per_s']:>10}"
            f"{mfu:>8}{mem:>10}"
        )
    print(f"ours / diffusers: {result['ratio_ours_over_diffusers']}")
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
