"""Compile small train steps for a TPU slice (libtpu on this CPU) and print, per case, what
tests/test_plan.py checks: the loop-aware figures of tools.aot and the hand-countable sizes of
the model (analytic FLOPs by part, sharded parameter bytes). One process for every case: libtpu
and jax start once. Run as `python tests/aot_cases.py CASE...` (names from CASES)."""

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json  # noqa: E402
import math  # noqa: E402

import jax  # noqa: E402
from jax.experimental import topologies  # noqa: E402

from cogvideox_jax import flops  # noqa: E402
from configs import cogvideox_2b  # noqa: E402
from tools import aot  # noqa: E402
from train.program import make_program  # noqa: E402
from train.run import resolve  # noqa: E402

# A 4-layer, 128-wide 2B-shaped model over 64 text + 192 video tokens (256: one splash block,
# no padding), batch 1 per chip of a v5e slice, FSDP over every chip.
SMALL = {
    "mesh.num_devices": 0,
    "model.overrides.num_layers": 4,
    "model.overrides.head_dim": 64,
    "model.overrides.max_text_len": 64,
    "model.overrides.sample_height": 16,
    "model.overrides.sample_width": 16,
    "model.dtype": "bfloat16",
    "input.height": 128,
    "input.width": 128,
    "input.text_len": 64,
    "optim.ema_decay": 0.0,
}
CASES = {
    "xla_none": ("v5e-8", dict(batch_size=8, attention_impl="xla", remat="none")),
    "xla_full_accum2": ("v5e-8", dict(batch_size=16, attention_impl="xla", remat="full", accum=2)),
    "splash_full": ("v5e-8", dict(batch_size=8, attention_impl="splash", remat="full")),
    "blocked_none": ("v5e-8", dict(batch_size=8, attention_impl="blocked", remat="none")),
    "xla_none_4": ("v5e-4", dict(batch_size=4, attention_impl="xla", remat="none")),
}


def config(case):
    topology, o = CASES[case]
    c = cogvideox_2b.get_config("sft,runlocal")
    with c.unlocked():
        c.update_from_flattened_dict(SMALL)
        c.batch_size = c.evals.batch_size = o["batch_size"]
        c.grad_accum_steps = o.get("accum", 1)
        c.model.attention_impl = o["attention_impl"]
        c.model.remat = o["remat"]
    return topology, c


def main(cases):
    for case in cases:
        topology, c = config(case)
        r = aot.analyse(c, topology)
        gen, shape, _ = aot.parse_topology(topology)
        run = resolve(c, topologies.get_topology_desc(f"{gen}:{shape}", "tpu").devices)
        m, text = run.model, c.input.text_len
        video = run.tokens_per_example - text
        n, d = run.tokens_per_example, m.width
        forward = flops.transformer_flops(m, text, video)
        params = make_program(run).abstract_state()["params"]
        sharded = {}
        for path, x in jax.tree_util.tree_leaves_with_path(params):
            if x.sharding.shard_shape(x.shape) != x.shape:
                sharded[jax.tree_util.keystr(path)] = math.prod(x.shape)
        r.pop("collectives_by_source")
        r.update(
            case=case,
            forward_flops=forward,
            attention_forward_flops=m.num_layers * 4 * n * n * d,
            block_linear_forward_flops=m.num_layers * n * 24 * d * d,
            sharded_param_elements=sharded,
        )
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or list(CASES))
