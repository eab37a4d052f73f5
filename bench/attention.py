r"""Attention alone, forward + backward: our kernels against torch's scaled_dot_product_attention.

  python -m bench.attention [--tokens 4516 --heads 8 --head-dim 64 --batch 1 --repeats 3]
                            [--impls blocked,xla] [--dtype float32|bfloat16]
                            [--torch-device auto] [--smallest] [--out result.json]

The attention of one layer of the train-step benchmark (bench.train_step: 226 text + 4290 video
tokens, 8 heads x 64), fp32 on the CPU: the gradient of <attention(q, k, v), w> with respect to
q, k and v, for fixed random inputs and w. Ours goes through
`cogvideox_jax.attention.dot_product_attention(impl=...)`, compiled with
`cogvideox_jax.compiler.options()`; torch's is `scaled_dot_product_attention` (its CPU flash
kernel). One warm-up each, then rounds that run each once in a shuffled order; medians.
FLOPs: 4 B N L^2 K forward and twice that backward (the matmuls of unfused attention; a flash
backward recomputes the logits, which is not counted).

On a GPU (torch too, by `--torch-device auto`), 5B's attention at 49 x 480 x 720:
  python -m bench.attention --tokens 17776 --heads 48 --impls cudnn,xla --dtype bfloat16
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
import torch

from bench.train_step import (
    DTYPES,
    add_torch_device,
    alternate,
    machine_facts,
    parse_sized,
    sig,
    torch_device,
    write_json,
)
from cogvideox_jax import attention, compiler

SMALLEST = dict(tokens=300, heads=2, head_dim=16)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.attention")
    parser.add_argument("--tokens", type=int, default=4516)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--impls", default="blocked,xla", help="ours, comma-separated")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    add_torch_device(parser)
    parser.add_argument("--smallest", action="store_true", help="tiny sizes: seconds (CI)")
    parser.add_argument("--out", default=None)
    args = parse_sized(parser, argv, SMALLEST)
    args.torch_device = torch_device(args.torch_device)
    device, tdtype = torch.device(args.torch_device), DTYPES[args.dtype]
    impls = args.impls.split(",")
    for impl in impls:
        if impl not in attention.IMPLEMENTATIONS:
            parser.error(f"--impls: {impl!r} is not one of {attention.IMPLEMENTATIONS}")
    shape = (args.batch, args.tokens, args.heads, args.head_dim)
    rng = np.random.default_rng(0)
    q, k, v, w = (rng.standard_normal(shape, dtype=np.float32) for _ in range(4))
    jq, jk, jv, jw = (jax.numpy.asarray(x, args.dtype) for x in (q, k, v, w))
    tq, tk, tv, tw = (torch.tensor(x).transpose(1, 2).to(device, tdtype) for x in (q, k, v, w))

    def ours(impl):
        def loss(q, k, v):
            out = attention.dot_product_attention(q, k, v, impl=impl)
            return (out * jw).sum(dtype=jax.numpy.float32)

        grad = compiler.jit(jax.grad(loss, argnums=(0, 1, 2)))
        return lambda: jax.block_until_ready(grad(jq, jk, jv))

    def theirs():
        qt, kt, vt = (x.detach().requires_grad_() for x in (tq, tk, tv))
        out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)
        (out * tw).float().sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return qt.grad, kt.grad, vt.grad

    runs = {f"ours_{impl}": ours(impl) for impl in impls}
    runs["torch_sdpa"] = theirs
    times = alternate(runs, args.repeats)  # medians; the warm-up compiles ours

    # Same gradients: each of ours against torch's.
    want = [g.transpose(1, 2).float().cpu().numpy() for g in theirs()]
    flops = 3 * 4 * args.batch * args.heads * args.tokens**2 * args.head_dim
    rows = {}
    for name, fn in runs.items():
        med = times[name]
        rows[name] = {"s": sig(med), "gflops_per_s": sig(flops / med / 1e9)}
        if name != "torch_sdpa":
            got = [np.asarray(g, np.float32) for g in fn()]
            rows[name]["grad_rel_l2_vs_torch"] = max(
                float(np.linalg.norm(a - b) / np.linalg.norm(b))
                for a, b in zip(got, want, strict=True)
            )
            rows[name]["ratio_over_torch"] = sig(med / times["torch_sdpa"], 3)
    result = {
        "benchmark": "attention",
        "config": {
            "batch": args.batch,
            "tokens": args.tokens,
            "heads": args.heads,
            "head_dim": args.head_dim,
            "dtype": args.dtype,
            "torch_device": args.torch_device,
        },
        "flops_fwd_bwd": flops,
        "repeats": args.repeats,
        "machine": machine_facts(),
        **rows,
    }
    print(f"{'':16}{'s':>10}{'GFLOP/s':>10}{'/ torch':>10}")
    for name, r in rows.items():
        print(f"{name:16}{r['s']:>10}{r['gflops_per_s']:>10}{r.get('ratio_over_torch', ''):>10}")
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
