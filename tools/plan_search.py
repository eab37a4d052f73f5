"""`python -m tools.aot --config ... --topology ... --search`: compile the layouts a config allows
on a TPU slice and rank them by estimated step time (tools.step_time).

The search runs in two stages, each candidate one `python -m tools.aot` process (in parallel
where memory and cores allow; every compiled plan goes to the plan cache, so a repeated search
compiles nothing):
1. layouts: every data x fsdp x context x tensor product of the slice's chips from the space
   (context-parallel mode allgather or ulysses where context > 1), with the config's remat policy
   and one sample per data shard per micro-batch;
2. tuning: for the best layout that fits, the other remat policies and more samples per data
   shard per micro-batch (fewer accumulation steps) of the space.
Candidates the config's rules refuse (a batch that does not divide, heads that do not split) are
listed with the rule and not compiled. The ranking: plans that fit first, then estimated step
time; the last line gives the best plan's flags.
"""

from __future__ import annotations

import concurrent.futures
import copy
import json
import os
import subprocess
import sys
import time

from configs import validate

DEFAULT_SPACE = dict(
    data=["auto"],  # 1, or the fewest data replicas whose fsdp x context divides the width
    context=[1, 2, 4],
    tensor=[1, 2],
    cp=["allgather", "ulysses"],
    remat=["full", "save_attention"],
    accum=[1, 2],  # samples per data shard per micro-batch
)


def parse_space(spec: str) -> dict:
    """'context=1,2;tensor=1' over DEFAULT_SPACE."""
    space = copy.deepcopy(DEFAULT_SPACE)
    for part in filter(None, (p.strip() for p in (spec or "").split(";"))):
        key, _, values = part.partition("=")
        key = key.strip()
        if key not in space or not values:
            raise ValueError(
                f"--search_space {part!r}: expected KEY=V1,V2 with KEY one of {sorted(space)}"
            )
        vals = [v.strip() for v in values.split(",") if v.strip()]
        text = key in ("cp", "remat") or (key == "data" and vals == ["auto"])
        space[key] = vals if text else [int(v) for v in vals]
    return space


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _overrides(cand: dict, batch: int) -> dict:
    """Config keys of a candidate."""
    o = {
        "mesh.num_devices": 0,
        "mesh.data": cand["data"],
        "mesh.fsdp": cand["fsdp"],
        "mesh.context": cand["context"],
        "mesh.tensor": cand["tensor"],
        "model.remat": cand["remat"],
        "model.context_parallel": cand["cp"],
    }
    shards = cand["data"] * cand["fsdp"]
    micro = shards * cand["accum"]
    o["grad_accum_steps"] = max(batch // micro, 1) if batch % micro == 0 else -1
    return o


def _apply(config, overrides: dict):
    c = copy.deepcopy(config)
    with c.unlocked():
        c.update_from_flattened_dict(overrides)
    return c


def _check(config, chips: int, overrides: dict) -> str | None:
    """The config rule a candidate breaks, or None."""
    if overrides["grad_accum_steps"] < 0:
        return "the batch does not divide into micro-batches of this many samples per data shard"
    try:
        checked = validate.validate(_apply(config, overrides), num_devices=chips)
    except ValueError as e:
        return str(e).splitlines()[0]
    shards = overrides["mesh.fsdp"] * overrides["mesh.context"]
    if checked.model.width % shards:
        return (f"the model width {checked.model.width} does not divide over fsdp x context = "
                f"{shards}: every chip would hold every weight")  # fmt: skip
    return None


def layouts(config, chips: int, space: dict) -> list[dict]:
    """Stage 1's candidates: every mesh product and context-parallel mode in the space. With
    data "auto": no data replicas, unless the weights' width (sharded over fsdp x context) would
    not divide, when the fewest replicas that make it divide (the sharding rules replicate an
    axis that does not divide: every chip would hold every weight)."""
    width = validate._model(config).width
    out = []
    for context in space["context"]:
        for tensor in space["tensor"]:
            datas = space["data"]
            if datas == ["auto"]:
                fits = [d for d in _divisors(chips // (context * tensor) or 1)
                        if chips % (d * context * tensor) == 0
                        and width % (chips // (d * tensor)) == 0]  # fmt: skip
                datas = fits[:1] or [1]
            for data in datas:
                rest, rem = divmod(chips, data * context * tensor)
                if rem or rest < 1:
                    continue
                modes = space["cp"] if context > 1 else [config.model.context_parallel]
                for cp in modes:
                    out.append(dict(data=data, fsdp=rest, context=context, tensor=tensor, cp=cp,
                                    remat=config.model.remat, accum=1))  # fmt: skip
    return out


def tunings(best: dict, config, space: dict) -> list[dict]:
    """Stage 2's candidates around the best layout."""
    out = [best | dict(remat=r) for r in space["remat"] if r != best["remat"]]
    out += [best | dict(accum=a) for a in space["accum"] if a != best["accum"]]
    return out


def _config_args(argv) -> list[str]:
    """The --config flags of this command line (the file and its overrides), to pass on."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--config") and "=" in a:
            out.append(a)
        elif a.startswith("--config") and i + 1 < len(argv):
            out.append(f"{a}={argv[i + 1]}")
            i += 1
        i += 1
    return out


def _jobs(jobs: int) -> int:
    if jobs > 0:
        return jobs
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError):
        avail = 16
    return max(1, min(os.cpu_count() or 1, int(avail // 10)))  # ~10 GB per full-size compile


def _cached(config, topology: str, overrides: dict, cache_dir) -> dict | None:
    """The plan from the cache, analysed in this process (no compile, no new process), or None."""
    from tools import aot, plan_cache

    if not cache_dir:
        return None
    c = _apply(config, overrides)
    if c.model.attention_impl == "auto":  # as tools.aot.analyse keys it
        with c.unlocked():
            c.model.attention_impl = "splash"
    if not plan_cache.has(cache_dir, plan_cache.key(c, topology)):
        return None
    return aot.analyse(c, topology, cache_dir=cache_dir)


def _compile(args: list[str], topology: str, overrides: dict, cache_dir) -> dict:
    cmd = [sys.executable, "-m", "tools.aot", *args, f"--topology={topology}"]
    cmd += [f"--config.{k}={v}" for k, v in overrides.items()]
    cmd += [f"--cache_dir={cache_dir or ''}"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = p.stdout.strip().splitlines()
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]
        return dict(error=f"exit {p.returncode}: {tail[0][:300]}")
    try:
        return json.loads(lines[-1])
    except ValueError:
        return dict(error=f"no JSON result: {lines[-1][:300]}")


def search(config, topology: str, *, config_file=None, cache_dir=None, jobs=0, space="",
           budget=0, argv=None) -> dict:  # fmt: skip
    from tools import aot

    gen, _, chips = aot.parse_topology(topology)
    space = parse_space(space)
    args = _config_args(sys.argv[1:] if argv is None else argv)
    batch = config.batch_size
    rows, refused = [], []
    n_jobs, spent = _jobs(jobs), [0]
    t0 = time.perf_counter()

    def run_stage(cands):
        todo = []
        for cand in cands:
            o = _overrides(cand, batch)
            why = _check(config, chips, o)
            if why:
                refused.append(dict(candidate=cand, rule=why))
            elif budget and spent[0] >= budget:
                refused.append(dict(candidate=cand, rule="over --search_budget"))
            else:
                hit = _cached(config, topology, o, cache_dir)
                if hit is not None:
                    row = dict(candidate=cand, overrides=o, result=_slim(hit))
                    rows.append(row)
                    print("  " + _line(row) + " (cached)", flush=True)
                    continue
                spent[0] += 1
                todo.append((cand, o))
        print(f"compiling {len(todo)} plans, {n_jobs} at a time", flush=True)
        with concurrent.futures.ThreadPoolExecutor(n_jobs) as pool:
            futures = {pool.submit(_compile, args, topology, o, cache_dir): (cand, o)
                       for cand, o in todo}  # fmt: skip
            for f in concurrent.futures.as_completed(futures):
                cand, o = futures[f]
                r = f.result()
                row = dict(candidate=cand, overrides=o, result=_slim(r))
                rows.append(row)
                print("  " + _line(row), flush=True)

    run_stage(layouts(config, chips, space))
    best = _best(rows)
    if best is not None:
        run_stage(tunings(best["candidate"], config, space))
    ranked = sorted(rows, key=_rank)
    return dict(
        topology=topology,
        chips=chips,
        config=config_file,
        space=space,
        ranked=ranked,
        refused=refused,
        best=ranked[0] if ranked and ranked[0]["result"].get("fits") else None,
        search_s=round(time.perf_counter() - t0, 1),
    )


def _slim(r: dict) -> dict:
    keep = ("fits", "refused", "peak_bytes_per_chip", "compile_s", "cached", "error",
            "loop_aware_error",
            "compiled_over_model", "comm_gb_per_chip", "comm", "grad_accum_steps",
            "mesh")  # fmt: skip
    out = {k: r[k] for k in keep if k in r}
    e = r.get("estimate")
    if e:
        out["estimate"] = {k: e[k] for k in ("step_s", "mfu", "tokens_per_s", "exposed_comm_s",
                                             "compute_s", "comm_s")}  # fmt: skip
    return out


def _rank(row):
    r = row["result"]
    step = (r.get("estimate") or {}).get("step_s", float("inf"))
    return (not r.get("fits", False), step, r.get("peak_bytes_per_chip", float("inf")))


def _best(rows):
    fitting = [r for r in rows if r["result"].get("fits")]
    return min(fitting, key=_rank) if fitting else None


def _layout(c: dict) -> str:
    return (f"data {c['data']} x fsdp {c['fsdp']} x context {c['context']} x tensor "
            f"{c['tensor']}, {c['cp']}, remat {c['remat']}, {c['accum']}/shard")  # fmt: skip


def _line(row) -> str:
    r, c = row["result"], row["candidate"]
    if "error" in r:
        return f"{_layout(c)}: FAILED ({r['error']})"
    peak = r.get("peak_bytes_per_chip", 0) / 2**30
    if not r.get("fits"):
        return f"{_layout(c)}: does not fit ({peak:.1f} GiB per chip)"
    e = r.get("estimate")
    if not e:
        return f"{_layout(c)}: {peak:.1f} GiB, no estimate ({r.get('loop_aware_error')})"
    return (f"{_layout(c)}: {peak:.1f} GiB, est. step {e['step_s']:.3f} s, MFU "
            f"{100 * e['mfu']:.1f}%, comm {r['comm_gb_per_chip']:.1f} GB/chip")  # fmt: skip


def report(s: dict) -> None:
    print(f"\nmesh search on {s['topology']} ({s['chips']} chips), {s['search_s']} s; ranked "
          "(estimates, not measurements):")  # fmt: skip
    print(f"{'#':>3} {'fits':<4} {'peak GiB':>8} {'step s':>8} {'MFU %':>6} {'comm GB':>8}  layout")
    for i, row in enumerate(s["ranked"], 1):
        r = row["result"]
        e = r.get("estimate") or {}
        peak = r.get("peak_bytes_per_chip")
        print(
            f"{i:>3} {'yes' if r.get('fits') else 'no':<4} "
            f"{(peak or 0) / 2**30:>8.1f} {e.get('step_s', float('nan')):>8.3f} "
            f"{100 * e.get('mfu', float('nan')):>6.1f} "
            f"{r.get('comm_gb_per_chip', float('nan')):>8.1f}"
            f"  {_layout(row['candidate'])}" + (f"  [{r['error']}]" if "error" in r else "")
        )
    for x in s["refused"]:
        print(f"    not compiled: {_layout(x['candidate'])}: {x['rule']}")
    if s["best"]:
        flags = " ".join(f"--config.{k}={v}" for k, v in s["best"]["overrides"].items())
        print(f"best: {flags}")
    else:
        print("no layout in the search space fits this slice")
