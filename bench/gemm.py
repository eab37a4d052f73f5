r"""The matmul ceiling of this machine: fp32 GEMM throughput through XLA and through torch.

  python -m bench.gemm [--tokens 4516,740 --width 512 --ff 2048 --calls 10 --repeats 5]
                       [--smallest] [--out result.json]

For each token count M (default: the train-step benchmark's 4516 tokens and the sampling
benchmark's 2 x 370), the products of the transformer's dense layers at the benchmarks' width:
the forward products X W of the attention projections (M x D x D) and of the feed-forward
(M x D x F, M x F x D), and the weight gradients X^T dY (D x M x F, contracting over tokens);
plus one square 2048^3 product. Each is timed on its own: ours as one jitted `x @ w` compiled
with `cogvideox_jax.compiler.options()` (as the library compiles), torch's as `x @ w` with the
same thread count. Each timed run makes `--calls` products back to back (the next one queued
while the last runs, as inside a model), so that neither library is timed waking its threads for
a single product of a few milliseconds: at 740 tokens single calls ran at about half the rate.
One warm-up each, then rounds in a shuffled order (`bench.train_step.alternate`); medians, and
the best (maximum) rate of each library over every shape.

What it is for: a model's step cannot run faster than its matmul work at this ceiling, so the
ceiling says what a target time demands (BENCHMARKS.md: "How close the CPU targets are to this
machine's ceiling").
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
import torch

from bench.train_step import alternate, machine_facts, parse_sized, sig, write_json
from cogvideox_jax import compiler

SMALLEST = dict(tokens="64", width=32, ff=64, square=64)


def shapes(tokens: list[int], width: int, ff: int, square: int) -> dict[str, tuple]:
    """name -> (M, K, N, transposed_lhs): the product is (M x K) @ (K x N), the left operand
    stored (K, M) and transposed when transposed_lhs (a weight gradient X^T dY)."""
    out = {}
    for m in tokens:
        out[f"{m}x{width}x{width} (q/k/v/out)"] = (m, width, width, False)
        out[f"{m}x{width}x{ff} (ff up)"] = (m, width, ff, False)
        out[f"{m}x{ff}x{width} (ff down)"] = (m, ff, width, False)
        out[f"{width}x{m}x{ff} (ff up weight grad)"] = (width, m, ff, True)
    out[f"{square}^3 (square)"] = (square, square, square, False)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.gemm")
    parser.add_argument("--tokens", default="4516,740", help="token counts M, comma-separated")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--ff", type=int, default=2048)
    parser.add_argument("--square", type=int, default=2048)
    parser.add_argument("--calls", type=int, default=10, help="products per timed run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smallest", action="store_true", help="tiny sizes: seconds (CI)")
    parser.add_argument("--out", default=None)
    args = parse_sized(parser, argv, SMALLEST)
    try:
        tokens = [int(t) for t in str(args.tokens).split(",")]
    except ValueError:
        parser.error(f"--tokens: comma-separated integers, got {args.tokens!r}")
    if min(tokens + [args.width, args.ff, args.square, args.calls]) < 1:
        parser.error("--tokens, --width, --ff, --square and --calls must be positive")

    rng = np.random.default_rng(0)
    rows = {}
    for name, (m, k, n, transposed) in shapes(tokens, args.width, args.ff, args.square).items():
        a = rng.standard_normal((k, m) if transposed else (m, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        xa, xb = jax.device_put(a), jax.device_put(b)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        ours = compiler.jit((lambda x, y: x.T @ y) if transposed else (lambda x, y: x @ y))

        def product_torch(ta=ta, tb=tb, transposed=transposed):
            return (ta.T @ tb) if transposed else (ta @ tb)

        def run_ours(ours=ours, xa=xa, xb=xb):
            jax.block_until_ready([ours(xa, xb) for _ in range(args.calls)])

        def run_torch(product=product_torch):
            for _ in range(args.calls):
                product()

        med = alternate({"xla": run_ours, "torch": run_torch}, args.repeats)
        got, want = np.asarray(ours(xa, xb)), product_torch().numpy()
        flop = 2 * m * k * n * args.calls
        rows[name] = {
            "mkn": [m, k, n],
            "xla_gflops_per_s": sig(flop / med["xla"] / 1e9),
            "torch_gflops_per_s": sig(flop / med["torch"] / 1e9),
            "rel_l2_xla_vs_torch": float(np.linalg.norm(got - want) / np.linalg.norm(want)),
        }
    best = {lib: max(r[f"{lib}_gflops_per_s"] for r in rows.values()) for lib in ("xla", "torch")}
    result = {
        "benchmark": "gemm",
        "config": {
            "tokens": tokens,
            "width": args.width,
            "ff": args.ff,
            "square": args.square,
            "dtype": "float32",
        },
        "calls": args.calls,
        "repeats": args.repeats,
        "machine": machine_facts(),
        "products": rows,
        "best_gflops_per_s": best,
    }
    print(f"{'GFLOP/s':36}{'xla':>10}{'torch':>10}")
    for name, r in rows.items():
        print(f"{name:36}{r['xla_gflops_per_s']:>10}{r['torch_gflops_per_s']:>10}")
    print(f"{'best':36}{best['xla']:>10}{best['torch']:>10}")
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
