"""The transformer trainer's loop: `train_and_evaluate(config, workdir)`.

Read top to bottom, a run:
1. resolves its config once (train/run.py: checks, the kind of run, its mesh and constants) and
   builds its program (train/program.py: the model's split, optimiser, shardings, jitted steps);
2. opens its data (train/inputs.py), each process loading only its rows of each global batch;
3. resumes from the latest checkpoint of the workdir, or starts from init.checkpoint (LoRA:
   lora.init) or a random initialisation (train/checkpoint.py says the precedence);
4. loops: one jitted update per step (train/steps.py; the objective is train/objective.py),
   a logged row every log.every_steps (metrics.jsonl, TensorBoard), the held-out loss (and the
   demo's samples) every evals.every_steps, an asynchronous checkpoint every ckpt.every_steps
   and at the end.
With config.mode == "eval" it evaluates the latest checkpoint instead of training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time

import jax
import numpy as np

from data import pipeline
from train import (
    checkpoint,
    evaluate,
    inputs,
    memory,
    metrics,
    preemption,
    samples,
    watchdog,
    workdir_lock,
)
from train.objective import Packed
from train.program import Program, make_program, model_folder
from train.run import Lora, Run, resolve


def train_and_evaluate(config, workdir: str) -> dict:
    """Train (or, with config.mode == 'eval', evaluate the latest checkpoint); returns the last
    logged metrics."""
    started = time.perf_counter()  # goodput counts from here
    run = resolve(config)
    if isinstance(run.training, Lora) and not run.training.base:  # (tools.aot needs none)
        raise ValueError(
            "a LoRA run (lora.rank > 0) adapts a trained model: set init.checkpoint to its "
            "diffusers/Orbax transformer folder (a random base has a zero output projection, "
            "so its adapters would get no gradient)"
        )
    os.makedirs(workdir, exist_ok=True)
    workdir_lock.take(workdir)  # one run per workdir (held until this process ends)
    prog = make_program(run)
    rows = pipeline.process_rows(run.batch_sharding, config.batch_size)
    eval_rows = pipeline.process_rows(run.batch_sharding, config.evals.batch_size)
    tokens = run.tokens_per_example * config.batch_size
    _note(
        f"{jax.process_count()} process(es), per-process batch {len(rows)} of {config.batch_size}"
        + ("" if isinstance(run.objective, Packed) else f", {tokens} tokens per step")
    )
    demo = None
    if run.demo:  # the built-in demo's stages (train/demo.py)
        from train import demo as demo_lib

        demo = demo_lib.Demo(config, workdir)
    train_ds, eval_ds = inputs.datasets(run, rows, eval_rows, demo)
    if demo is not None:
        demo.prepare()  # the VAE trains (or is restored) once the data have passed their checks
    mngr = checkpoint.manager(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        keep=config.ckpt.keep,
        async_save=config.ckpt.async_save,
        step=config.ckpt.step,
    )
    frozen = prog.frozen()
    held_out = evaluate.HeldOut(prog, eval_ds, frozen)
    if config.mode == "eval":
        return evaluate.evaluate_checkpoint(
            mngr, prog.abstract_state(), held_out, workdir, step=config.ckpt.step
        )
    data_iter = iter(train_ds)
    state, origin = checkpoint.restore_or_init(
        mngr,
        prog.abstract_state(),
        data_iter,
        init_checkpoint=run.training.init,
        load_pretrained=prog.load_init,
        random_init=prog.random_state,
        step=config.ckpt.step,
    )
    _note(f"train state: {origin}")
    folder = os.path.join(str(mngr.directory), str(int(state["step"])))
    if origin.startswith("resumed") and os.path.isdir(os.path.join(folder, "meta")):
        change = prog.slice_change(checkpoint.read_meta(folder).get("slice"))
        if change:
            _note(change)
    try:
        sampler = demo.sample if demo is not None else None
        if config.evals.sample_prompts:
            sampler = samples.EvalSampler(run, workdir)
        last = _loop(prog, state, data_iter, frozen, mngr, held_out, sampler, workdir, started)
    finally:
        mngr.wait_until_finished()
        mngr.close()
    if jax.process_index() == 0:
        steps = sorted(mngr.all_steps())
        model = model_folder(config)
        guidance = config.demo.guidance_scale if run.demo else None
        text = metrics.summary(
            workdir, checkpoints=steps, demo=run.demo, model=model, guidance=guidance
        )
        print(text, flush=True)
    return last


def _loop(
    prog: Program, state, data_iter, frozen, mngr, held_out, sampler, workdir, started: float
) -> dict:
    """Steps from the state's step to config.total_steps; returns the last logged row. A SIGTERM
    or SIGINT stops it after the step in flight, with a checkpoint of that step (Preempted)."""
    run, c = prog.run, prog.run.config
    p_train = prog.jit_train_step()
    step = int(state["step"])
    log = metrics.Logger(workdir, c.total_steps, step, progress=c.log.progress)
    meter, clock = Meter(run), metrics.Goodput(started)
    guard = step_guard(run)
    last_saved = step if mngr.latest_step() is not None else None
    row = {}
    try:
        with preemption.Watcher() as watcher, watchdog.Watchdog(c.watchdog_factor) as dog:
            while step < c.total_steps:
                dog.begin(step + 1)
                with meter.timed("data"):
                    local = next(data_iter)  # outside the mesh: raw clips may be encoded here
                    with run.on_mesh():
                        batch = pipeline.global_batch(local, run.batch_sharding, c.batch_size)
                dog.pause()
                with meter.timed("compile"), run.on_mesh():
                    guard.check(p_train, state, batch, frozen, shape_of=batch)  # new shapes
                dog.resume()
                with meter.timed("step"):
                    with run.on_mesh():
                        state, out = p_train(state, batch, frozen)
                    loss = meter.add(out)  # waits for the step
                dog.end()
                step += 1
                _nonfinite(c, loss, step, mngr, last_saved)
                is_eval = step % c.evals.every_steps == 0
                if is_eval or step % c.log.every_steps == 0 or step == c.total_steps:
                    with meter.timed("log"):
                        row = meter.row(out, lr=float(prog.schedule(step - 1)))
                    if is_eval:
                        with meter.timed("eval"):
                            row.update(_evaluate(prog, state, frozen, held_out, sampler, step))
                    row.update(clock.row(meter))
                    meter = Meter(run)
                    with meter.timed("log"):
                        log.write(step, row)
                stop = watcher.reached(step)
                if step % c.ckpt.every_steps == 0 or step == c.total_steps or stop:
                    with meter.timed("checkpoint"):
                        checkpoint.save(mngr, step, state, data_iter, prog.checkpoint_meta())
                    last_saved = step
                if stop:
                    mngr.wait_until_finished()
                    raise preemption.Preempted(step, watcher.signum, str(mngr.directory))
                with meter.timed("log"):
                    log.advance(step)
    finally:
        log.close()
    return {"step": step, **row}


def _nonfinite(c, loss, step: int, mngr, last_saved) -> None:
    """A non-finite loss or gradient (None: none): stop (on_nonfinite='stop') or say it was
    skipped."""
    if loss is None:
        return
    if c.on_nonfinite == "stop":
        mngr.wait_until_finished()
        raise FloatingPointError(
            f"non-finite loss or gradient at step {step} (loss {loss}); stopping "
            "(config.on_nonfinite='stop'). "
            f"The last good checkpoint (step {last_saved}) is kept in {mngr.directory}"
        )
    _note(f"step {step}: non-finite loss or gradient ({loss}); update skipped")


def step_guard(run: Run) -> memory.StepGuard:
    """The check of each new batch shape's planned memory, naming the settings that shrink it."""
    c = run.config
    shrink = f"lower batch_size ({c.batch_size})"
    if isinstance(run.objective, Packed):
        shrink += " or input.video_budget / input.max_clips (the packed rows)"
    elif run.data == "prepared":
        shrink += " or the clips' size (tools.prepare_data --size / --buckets)"
    if c.model.remat != "full":
        shrink += f", or set model.remat=full (now {c.model.remat})"
    local = sum(d.process_index == jax.process_index() for d in run.mesh.devices.flat)
    limit = int(c.get("memory_limit_gb", 0.0) * memory.GB)
    return memory.StepGuard("the training step", shrink, devices=local, limit_bytes=limit)


def _evaluate(prog: Program, state, frozen, held_out, sampler, step: int) -> dict:
    """The held-out loss and the eval's samples (the demo's, scored; or evals.sample_prompts')."""
    row = held_out(state)
    if sampler is not None:
        run = prog.run
        with run.on_mesh():
            model = prog.model.merge(state["params"], run.training.fixed(state, frozen))
            row.update(sampler(model, step))
    return row


# A mixture's per-interval sums: clips, images and their video tokens, and objective.modality_parts.
LOSS_PARTS = ("image_loss_sum", "image_count", "clip_loss_sum", "clip_count")
MODALITY = ("clips", "images", "tokens", "image_tokens", *LOSS_PARTS)


@dataclasses.dataclass
class Meter:
    """What the steps since the last logged row did: how many, in how long, their tokens and
    model FLOPs (the objective counts them), packing efficiency and skipped updates."""

    run: Run
    start: float = dataclasses.field(default_factory=time.perf_counter)
    steps: int = 0
    tokens: float = 0.0
    flops: float = 0.0
    efficiency: float = 0.0
    skipped: int = 0
    modality: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(MODALITY, 0.0))
    seconds: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(metrics.PARTS, 0.0))

    @contextlib.contextmanager
    def timed(self, part: str):
        """Adds the block's wall time to `part` (one of metrics.PARTS)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[part] += time.perf_counter() - t0

    def add(self, out) -> float | None:
        """Count one step's outputs; returns its loss if it was not finite, else None."""
        tokens, flops = self.run.objective.counts(out)
        self.steps += 1
        self.tokens += tokens
        self.flops += flops
        self.efficiency += float(out.get("packing_efficiency", 0.0))
        if self.run.config.input.sources:  # a mixture: images among the clips, their tokens
            images = np.asarray(out["image_slots"], bool)
            sizes = np.asarray(out.get("clip_tokens", np.ones(images.shape)), np.float64)
            used = sizes > 0
            self.modality["clips"] += used.sum()
            self.modality["images"] += (images & used).sum()
            self.modality["tokens"] += sizes.sum()
            self.modality["image_tokens"] += sizes[images].sum()
            for key in LOSS_PARTS:
                self.modality[key] += float(out[key])
        if bool(out["finite"]):
            return None
        self.skipped += 1
        return float(out["loss"])

    def row(self, out, *, lr: float) -> dict:
        """The logged row: the last step's outputs and the rates since the meter started (the
        time of a held-out eval that follows is left out of the rates)."""
        dt = time.perf_counter() - self.start
        row = dict(
            loss=float(out["loss"]),
            lr=lr,
            grad_norm=float(out["grad_norm"]),
            steps_per_sec=self.steps / dt,
            tokens_per_sec=self.tokens / dt,
        )
        if "packing_efficiency" in out:  # mean real tokens / token budget of the steps
            row["packing_efficiency"] = self.efficiency / self.steps
        peak = metrics.peak_flops(self.run.mesh.devices.flat[0]) * self.run.mesh.devices.size
        if peak:  # model FLOPs utilisation against the devices' bf16 peak (0: unknown, CPU)
            row["mfu"] = self.flops / dt / peak
        row["peak_host_gb"] = memory.peak_host_bytes() / memory.GB  # this process, so far
        m = self.modality
        if self.run.config.input.sources and m["clips"]:  # a mixture: how much was images
            row["image_share"] = m["images"] / m["clips"]
            if "clip_tokens" in out:  # packed: their share of the video tokens
                row["image_token_share"] = m["image_tokens"] / max(m["tokens"], 1.0)
            for kind in ("image", "clip"):  # the loss on each, over the logged steps
                if m[f"{kind}_count"]:
                    row[f"loss_{kind}s"] = m[f"{kind}_loss_sum"] / m[f"{kind}_count"]
        if self.skipped:  # steps skipped since the last logged row
            row["skipped_nonfinite"] = self.skipped
        return row


def _note(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)
