r"""Peak host memory of `tools.convert` against the size of the model it converts.

  python -m bench.convert_memory [--layers 24 --heads 16 --dtype bfloat16] [--smallest]
                                 [--out result.json]

Builds a random transformer here, writes it as an Orbax folder, then runs each
conversion direction in a fresh process and reads that process's peak resident memory.
A process that only imports the converter gives the baseline.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

import cogvideox_jax as cj
from bench.train_step import machine_facts


def _peak_mb(cmd: list[str]) -> float:
    """Peak RSS (MiB) of a child process running cmd."""
    # VmHWM, not getrusage: Linux carries ru_maxrss across fork+exec from this (large) parent.
    code = (
        "import sys; sys.argv = {argv!r}; "
        "exec({body!r}); "
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]; "
        "print('PEAK', int(hwm.split()[1]) / 1024)"
    )
    if cmd[0] == "convert":
        body = "from tools import convert; convert.main(sys.argv[1:])"
    else:
        body = "import cogvideox_jax.components"
    out = subprocess.run(
        [sys.executable, "-c", code.format(argv=cmd, body=body)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return float(out.rsplit("PEAK", 1)[1])


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.convert_memory")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--smallest", action="store_true", help="1 layer, 2 heads: seconds (CI)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.smallest:
        args.layers, args.heads = 1, 2
    dtype = jnp.dtype(args.dtype)
    cfg = cj.transformer_config(
        "5b", num_layers=args.layers, num_heads=args.heads, text_embed_dim=512
    )
    model = nnx.eval_shape(lambda: cj.Transformer(cfg, param_dtype=dtype, rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda s: jnp.full(s.shape, 0.01, s.dtype), state))
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    model_mb = sum(x.nbytes for x in leaves) / 2**20
    largest_mb = max(x.nbytes for x in leaves) / 2**20
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        cj.save_transformer(model, d / "orbax")
        del model, state, leaves
        base = _peak_mb(["import"])
        to_diffusers = _peak_mb(["convert", "orbax-to-diffusers", str(d / "orbax"), str(d / "hf")])
        to_orbax = _peak_mb(["convert", "diffusers-to-orbax", str(d / "hf"), str(d / "orbax2")])
    result = {
        "config": {"layers": args.layers, "width": cfg.width, "dtype": args.dtype},
        "model_mib": round(model_mb),
        "largest_stacked_leaf_mib": round(largest_mb),
        "baseline_process_mib": round(base),
        "orbax_to_diffusers_peak_mib": round(to_diffusers),
        "diffusers_to_orbax_peak_mib": round(to_orbax),
        "machine": machine_facts(),
    }
    print(f"{'':32}{'MiB':>8}")
    for k, v in result.items():
        if k not in ("config", "machine"):
            print(f"{k:32}{v:>8}")
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
