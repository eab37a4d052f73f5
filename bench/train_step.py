r"""Transformer training step, ours against diffusers' CogVideoXTransformer3DModel in torch.

  python -m bench.train_step [--layers 4 --heads 8 --head-dim 64 --latent 13,30,44
                              --text-len 226 --text-dim 4096 --batch 1 --repeats 3]
                             [--attention auto] [--no-attention] [--smallest]
                             [--out result.json]

One step = forward + backward + AdamW update, fp32, on the CPU (ours: one jitted step on one
device). Same config, weights (the diffusers model is built with random weights, saved and
loaded into ours by `load_transformer`), inputs (latents, text, timesteps, noise) and objective
(`train.dit.diffusion_loss`: mean squared v-prediction error; noise schedule with
snr_shift_scale 3). Optimiser on both sides: global-norm clipping at 1.0, then AdamW (lr 1e-4,
b1 0.9, b2 0.95, eps 1e-8, weight decay 1e-4 on matrices only), ours from `train.optim`.
Runs alternate between the two after one warm-up each (compilation for ours); medians.
Model FLOPs: `cogvideox_jax.flops.train_flops` (3 x forward: matmuls + full attention).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import nnx

import cogvideox_jax as cj
from cogvideox_jax import attention, compiler, diffusion, flops
from train import dit, optim

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
    """Median seconds of each callable: one warm-up each, then `repeats` rounds that run them in
    turn (so that load drifting on a shared machine hits all of them alike)."""
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(seconds(fn))
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


def rope_tables(model, frames: int, h: int, w: int):
    """RoPE (cos, sin) as diffusers' CogVideoXPipeline builds them (None without RoPE)."""
    from diffusers import CogVideoXPipeline

    if not model.config.use_rotary_positional_embeddings:
        return None
    fake = types.SimpleNamespace(vae_scale_factor_spatial=8, transformer=model)
    return CogVideoXPipeline._prepare_rotary_positional_embeddings(
        fake, h * 8, w * 8, frames, torch.device("cpu")
    )


def diffusers_transformer(args, seed: int = 0):
    """A random CogVideoX-5B-style (RoPE) CogVideoXTransformer3DModel of the benchmark's size."""
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    return CogVideoXTransformer3DModel(
        num_attention_heads=args.heads,
        attention_head_dim=args.head_dim,
        num_layers=args.layers,
        text_embed_dim=args.text_dim,
        time_embed_dim=args.time_dim,
        max_text_seq_length=args.text_len,
        use_rotary_positional_embeddings=True,
    )


def load_ours(theirs, attention_impl: str = "auto"):
    """Our Transformer with the weights of a diffusers model (save_pretrained + load)."""
    with tempfile.TemporaryDirectory() as d:
        theirs.save_pretrained(d)
        return cj.load_transformer(d, attention_impl=attention_impl)


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


def model_args(parser: argparse.ArgumentParser, *, latent: str) -> None:
    """The flags of the transformer's size, shared with bench.sample."""
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--text-len", type=int, default=226)
    parser.add_argument("--text-dim", type=int, default=4096)
    parser.add_argument("--time-dim", type=int, default=512)
    parser.add_argument("--latent", default=latent, help="latent T,h,w (16 channels)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--attention",
        default="auto",
        choices=attention.IMPLEMENTATIONS,
        help="our attention kernel (auto: blocked on CPU for long sequences)",
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
    args.latent = parse_latent(args.latent) if isinstance(args.latent, str) else args.latent
    return args


# ---- the train steps ----


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


def ours_step(model, ab: np.ndarray):
    """(step, state): step(state, batch) -> (state, loss), one jitted AdamW update on the
    weights of `model`, state donated."""
    graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
    templates = (params, buffers)
    tx, _ = optim.make_optimizer(OPTIM, total_steps=1)
    ab = jnp.asarray(ab, jnp.float32)

    def loss_fn(p, b, batch):
        m = dit._merge(graphdef, templates, p, b)
        return dit.diffusion_loss(m, batch["z0"], batch["text"], batch["t"], batch["noise"], ab)

    def step(state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], state["buffers"], batch)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return dict(state, params=params, opt_state=opt_state), loss

    p, b = nnx.to_pure_dict(params), nnx.to_pure_dict(buffers)
    state = {"params": p, "buffers": b, "opt_state": tx.init(p)}
    return compiler.jit(step, donate_argnums=(0,)), state


def theirs_step(model, ab: np.ndarray, inputs: dict):
    """step() -> loss: one torch training step (loss.backward(), clipping, AdamW.step())."""
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
    z0 = torch.from_numpy(inputs["z0"]).permute(0, 1, 4, 2, 3).contiguous()  # (B, T, C, h, w)
    noise = torch.from_numpy(inputs["noise"]).permute(0, 1, 4, 2, 3).contiguous()
    text, t = torch.from_numpy(inputs["text"]), torch.from_numpy(inputs["t"])
    a = torch.from_numpy(np.asarray(ab, np.float32))[t].reshape(-1, 1, 1, 1, 1)
    rope = rope_tables(model, *inputs["z0"].shape[1:4])
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        x_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
        v = a.sqrt() * noise - (1 - a).sqrt() * z0
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
        return float(loss.detach())

    return step


def _without_attention():
    """Ablation: attention(q, k, v) = v on both sides, so a step times everything else."""
    import torch.nn.functional as F

    attention.dot_product_attention = lambda q, k, v, **kw: v
    F.scaled_dot_product_attention = lambda q, k, v, **kw: v


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.train_step")
    model_args(parser, latent="13,30,44")
    parser.add_argument(
        "--no-attention",
        action="store_true",
        help="ablation: attention returns v in both implementations (this process only)",
    )
    args = parse(parser, argv, SMALLEST)
    if args.no_attention:
        _without_attention()
    ab = diffusion.alphas_cumprod(diffusion.ScheduleConfig(snr_shift_scale=3.0))
    theirs = diffusers_transformer(args)
    ours = load_ours(theirs, args.attention)
    inputs = _inputs(args, ab)
    step, state = ours_step(ours, ab)
    del ours  # its arrays now live in (and are donated with) the state
    batch = {k: jnp.asarray(v) for k, v in inputs.items()}
    run_theirs = theirs_step(theirs, ab, inputs)
    losses = {}

    def run_ours():
        nonlocal state
        state, loss = jax.block_until_ready(step(state, batch))
        losses.setdefault("ours", float(loss))  # the first call: the initial weights' loss

    def run_diffusers():
        losses.setdefault("diffusers", run_theirs())

    med = alternate({"ours": run_ours, "diffusers": run_diffusers}, args.repeats)
    cfg = cj.TransformerConfig.from_diffusers(dict(theirs.config))
    t, h, w = args.latent
    video_tokens = t * (h // cfg.patch_size) * (w // cfg.patch_size)
    tokens = args.batch * (args.text_len + video_tokens)
    flop = args.batch * flops.train_flops(cfg, args.text_len, video_tokens)
    rows = {}
    for name, s in med.items():
        rows[name] = {
            "s_per_step": sig(s),
            "tokens_per_s": sig(tokens / s),
            "gflops_per_s": sig(flop / s / 1e9),
        }
    result = {
        "benchmark": "train_step",
        "config": {
            **model_facts(args),
            "latent_thw": list(args.latent),
            "batch": args.batch,
            "rope": True,
            "dtype": "float32",
            "attention": "none (ablation: returns v)"
            if args.no_attention
            else attention.resolve(args.attention, jnp.float32, args.text_len + video_tokens),
        },
        "parameters": sum(p.numel() for p in theirs.parameters()),
        "tokens_per_step": tokens,
        "model_flops_per_step": flop,
        "repeats": args.repeats,
        "machine": machine_facts(),
        "first_loss": losses,
        "first_loss_rel_diff": abs(losses["ours"] - losses["diffusers"]) / abs(losses["diffusers"]),
        **rows,
        "ratio_ours_over_diffusers": sig(med["ours"] / med["diffusers"], 3),
    }
    print(f"{'':10}{'s/step':>10}{'tokens/s':>12}{'GFLOP/s':>10}")
    for name, r in rows.items():
        print(f"{name:10}{r['s_per_step']:>10}{r['tokens_per_s']:>12}{r['gflops_per_s']:>10}")
    print(f"ours / diffusers: {result['ratio_ours_over_diffusers']}")
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
