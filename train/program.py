"""What the trainer compiles and runs, built from a resolved run without allocating anything:
the model's split, optimiser, the train state's shardings and construction (random, from a
pretrained transformer, from LoRA adapters), its restore target, the frozen inputs, and the
jitted steps with their abstract arguments. tools.aot and bench/ build the trainer's step from
here (`make_program(run).jit_train_step()` lowered with `abstract_train_args()`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import cogvideox_jax as cj
from cogvideox_jax import compiler, lora, sharding, weights
from cogvideox_jax import vae as vae_lib
from train import checkpoint, optim, steps
from train.run import Lora, Run


@dataclasses.dataclass(frozen=True, eq=False)
class Program:
    run: Run
    build: Callable[[int], cj.Transformer]  # seed -> a transformer (with fresh adapters: LoRA)
    model: steps.Model
    update: steps.Update
    schedule: optax.Schedule  # step -> learning rate
    state_sh: dict  # the train state's NamedShardings
    base_sh: dict | None  # LoRA: the frozen base's NamedShardings

    # ---- The train state ----

    def fresh_state(self, params: dict, buffers: dict) -> dict:
        """The train state at step 0 around given parameters and buffers (pure dicts)."""
        return dict(
            params=params,
            opt_state=self.update.tx.init(params),
            ema=jax.tree.map(jnp.copy, params) if self.update.ema_decay > 0 else {},
            buffers=buffers,
            step=jnp.zeros((), jnp.int32),
            rng=jax.random.PRNGKey(self.run.config.seed),
        )

    def init_state(self) -> dict:
        """A randomly initialised train state (pure; jit it with out_shardings=state_sh). In a
        LoRA run it holds the fresh adapters only (the base: `init_base`)."""
        params, rest = self.run.training.split(self.build(self.run.config.seed))
        return self.fresh_state(params, {} if isinstance(self.run.training, Lora) else rest)

    def init_base(self) -> dict:
        """A LoRA run's randomly initialised frozen base (jit with out_shardings=base_sh)."""
        return self.run.training.split(self.build(self.run.config.seed))[1]

    def random_state(self) -> dict:
        return jax.jit(self.init_state, out_shardings=self.state_sh)()

    def abstract_state(self) -> dict:
        """The train state as sharded ShapeDtypeStructs: the restore target."""
        return checkpoint.abstract(jax.eval_shape(self.init_state), self.state_sh)

    def load_init(self, path: str) -> dict:
        """The state at step 0 from `run.training.init`: a transformer folder's weights, or in
        a LoRA run its adapters."""
        if isinstance(self.run.training, Lora):
            return self.adapter_state(path)
        return self.pretrained_state(path)

    def pretrained_state(self, path: str) -> dict:
        """A full run's state at step 0 with the weights of a transformer folder."""
        params, rest = self.run.training.split(self.load_transformer(path))
        params, rest = jax.device_put(
            (params, rest), (self.state_sh["params"], self.state_sh["buffers"])
        )
        return jax.jit(self.fresh_state, out_shardings=self.state_sh)(params, rest)

    def adapter_state(self, path: str) -> dict:
        """A LoRA run's state at step 0 with the adapters of a LoRA folder or diffusers LoRA
        file (its alpha converted to the run's)."""
        want = self.run.lora
        got, tree = lora.load(path, self.run.model)
        if (got.rank, set(got.targets)) != (want.rank, set(want.targets)):
            raise ValueError(
                f"lora.init {path}: rank {got.rank} on {list(got.targets)}, but the config "
                f"asks for rank {want.rank} on {list(want.targets)}"
            )
        if got.alpha != want.alpha:  # keep the adapter's function: rescale B
            tree.update(
                {k: v * (got.alpha / want.alpha) for k, v in tree.items() if k.endswith("/b")}
            )
        dt = np.dtype(self.run.config.model.param_dtype)
        params = weights.nest({k: v.astype(dt) for k, v in tree.items()})
        params = jax.device_put(params, self.state_sh["params"])
        return jax.jit(self.fresh_state, out_shardings=self.state_sh)(params, {})

    def load_transformer(self, path: str) -> cj.Transformer:
        """init.checkpoint's transformer, refused unless it is the run's architecture."""
        model = cj.load_transformer(path, dtype=np.dtype(self.run.config.model.param_dtype))
        if model.cfg != self.run.model:
            raise ValueError(
                f"init.checkpoint {path}: its architecture {model.cfg} != {self.run.model}"
            )
        return model

    # ---- Frozen inputs ----

    def frozen(self) -> steps.Frozen:
        """The frozen VAE (I2V) and a LoRA run's base (init.checkpoint's weights), placed."""
        run = self.run
        vae = frozen_vae(run) if run.i2v else None
        base = None
        if isinstance(run.training, Lora):
            rest = run.training.split(self.load_transformer(run.training.base))[1]
            base = jax.device_put(rest, self.base_sh)
        return steps.Frozen(vae=vae, base=base)

    def checkpoint_meta(self) -> dict:
        """Saved with every checkpoint: what the run trained, so that a checkpoint exports and
        samples on its own (`tools.convert run-to-diffusers`, `tools.sample --model RUN`)."""
        run, c = self.run, self.run.config
        meta = {
            "transformer": run.model.to_diffusers(),
            "training": "lora" if isinstance(run.training, Lora) else "full",
            "init": _abspath(run.training.init),
            "model": model_folder(c),
            "demo": run.demo,
            "i2v": run.i2v,
            "config": c.to_json_best_effort(),  # the demo samples with its own settings
            "slice": self.slice(),
        }
        if isinstance(run.training, Lora):
            meta |= {"lora": run.training.cfg.to_json(), "base": _abspath(run.training.base)}
        return meta

    def slice(self) -> dict:
        """Where the run trains: devices, processes, mesh (axes over 1), micro-batches."""
        run = self.run
        return {
            "devices": int(run.mesh.size),
            "processes": jax.process_count(),
            "mesh": {a: int(n) for a, n in run.mesh.shape.items() if n > 1},
            "grad_accum_steps": run.grad_accum_steps,
        }

    def slice_change(self, saved: dict | None) -> str | None:
        """One line for a run resumed on a slice other than the one that saved `saved` (the
        checkpoint's `slice`; None: not recorded, or the same slice)."""
        now = self.slice()
        if not saved or saved == now:
            return None
        b = self.run.config.batch_size

        def where(s):
            mesh = " x ".join(f"{a} {n}" for a, n in s["mesh"].items()) or "no axis over 1"
            return f"{s['devices']} device(s) ({mesh}) in {s['processes']} process(es)"

        def accum(a):
            return f"{a} micro-batch(es) of {b // a} rows"

        a, was = now["grad_accum_steps"], saved["grad_accum_steps"]
        how = accum(a) + ("" if a == was else f" (was {accum(was)})")
        return (
            f"resumed on another slice: {where(now)}, saved on {where(saved)}; gradient "
            f"accumulation {how}; the global batch stays {b}"
        )

    # ---- Jitted steps ----

    def jit_train_step(self):
        """`steps.train_step` as the trainer runs it: state donated, its shardings kept. Call (or
        lower) it under `jax.set_mesh(run.mesh)` and `sharding.use_rules(run.rules)`."""
        run = self.run
        step = functools.partial(
            steps.train_step,
            model=self.model,
            training=run.training,
            objective=run.objective,
            update=self.update,
            ab=jnp.asarray(run.ab),
        )
        return jax.jit(
            step,
            donate_argnums=(0,),
            out_shardings=(self.state_sh, run.replicated),
            compiler_options=compiler.mesh_options(run.mesh),
        )

    def jit_eval_step(self):
        """`steps.eval_step(params, fixed, batch, index, frozen)`, its losses replicated (read
        back on every process)."""
        run = self.run
        step = functools.partial(
            steps.eval_step,
            model=self.model,
            objective=run.eval_objective,
            ab=jnp.asarray(run.ab),
            timesteps=tuple(run.config.evals.timesteps),
            seed=run.config.seed + 20_000,
        )
        return jax.jit(
            step, out_shardings=run.replicated, compiler_options=compiler.mesh_options(run.mesh)
        )

    def abstract_train_args(self) -> tuple[dict, dict, steps.Frozen]:
        """(state, batch, frozen) as sharded ShapeDtypeStructs, batches of the config's clip size:
        `jit_train_step().lower(*args)` compiles the trainer's step without allocating anything."""
        run, c = self.run, self.run.config
        shapes = run.example_shapes
        names = dict(latents="latent_shape", text="text_shape", image="image_shape")
        batch = {
            key: jax.ShapeDtypeStruct(
                (c.batch_size, *shapes[name]), jnp.float32, sharding=run.batch_sharding
            )
            for key, name in names.items()
            if shapes[name] is not None
        }
        vae = None
        if run.i2v:  # the frozen VAE's shapes do not depend on its weights
            gd, st = nnx.split(nnx.eval_shape(lambda: _vae(run)))
            vae = (gd, jax.tree.map(lambda x: _with(x, run.replicated), st))
        base = None
        if isinstance(run.training, Lora):
            base = checkpoint.abstract(jax.eval_shape(self.init_base), self.base_sh)
        return self.abstract_state(), batch, steps.Frozen(vae=vae, base=base)


def make_program(run: Run) -> Program:
    c = run.config
    param_dtype = np.dtype(c.model.param_dtype)

    def build(seed: int) -> cj.Transformer:
        model = cj.Transformer(
            run.model,
            dtype=np.dtype(c.model.dtype),
            param_dtype=param_dtype,
            remat=c.model.remat,
            attention_impl=c.model.attention_impl,
            context_parallel=c.model.context_parallel,
            rngs=nnx.Rngs(seed),
        )
        if run.lora is not None:  # drawn from a stream apart from the model's
            key = jax.random.fold_in(jax.random.key(seed), 0x10A)
            lora.attach(model, run.lora, rngs=nnx.Rngs(params=key), param_dtype=param_dtype)
        return model

    trainable = run.training.trainable
    graphdef, abs_params, abs_rest = nnx.split(nnx.eval_shape(lambda: build(0)), trainable, ...)
    tx, schedule = optim.make_optimizer(c.optim, c.total_steps)
    param_sh = sharding.state_shardings(abs_params, run.mesh, run.rules)
    abs_opt = jax.eval_shape(tx.init, nnx.to_pure_dict(abs_params))
    opt_sh = optax.tree_map_params(
        tx, lambda _, s: s, abs_opt, param_sh, transform_non_params=lambda _: run.replicated
    )
    rest_sh = sharding.state_shardings(abs_rest, run.mesh, run.rules)
    lora_run = isinstance(run.training, Lora)
    state_sh = dict(
        params=param_sh,
        opt_state=opt_sh,
        ema=param_sh if c.optim.ema_decay > 0 else {},
        buffers={} if lora_run else rest_sh,  # a LoRA run's rest is the frozen base
        step=run.replicated,
        rng=run.replicated,
    )
    update = steps.Update(
        tx=tx,
        grad_accum_steps=run.grad_accum_steps,
        ema_decay=c.optim.ema_decay,
        skip_nonfinite=c.on_nonfinite == "skip",
    )
    return Program(
        run=run,
        build=build,
        model=steps.Model(graphdef, (abs_params, abs_rest)),
        update=update,
        schedule=schedule,
        state_sh=state_sh,
        base_sh=rest_sh if lora_run else None,
    )


def _with(x, s):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)


def _vae(run: Run) -> cj.AutoencoderKL:
    return cj.AutoencoderKL(vae_lib.vae_config(run.config.vae.variant), rngs=nnx.Rngs(0))


def _abspath(path: str) -> str:
    return os.path.abspath(path) if path else ""


def model_folder(c) -> str:
    """The whole model folder (model_index.json: VAE, text encoder, tokenizer, scheduler) a run
    samples with, "" if none: input.encoder_model's, or the one init.checkpoint or vae.checkpoint
    is (or is a component of)."""
    for path in (c.input.encoder_model, c.init.checkpoint, c.vae.checkpoint):
        for folder in (path, os.path.dirname(os.path.normpath(path))) if path else ():
            if os.path.isfile(os.path.join(folder, "model_index.json")):
                return os.path.abspath(folder)
    return ""


def frozen_vae(run: Run):
    """(graphdef, state) of the frozen I2V VAE, replicated: vae.checkpoint's, or for runlocal
    configs (vae.variant "tiny", no checkpoint) a random tiny VAE (the conditioning path is what
    is exercised), filled on the host: initialising it with jax would compile one program per
    convolution."""
    c = run.config
    if c.vae.checkpoint:
        vae = cj.load_vae(c.vae.checkpoint)
        if vae.cfg.invert_scale_latents != c.vae.invert_scale_latents:
            raise ValueError(
                f"{c.vae.checkpoint}: the VAE config has invert_scale_latents="
                f"{vae.cfg.invert_scale_latents} but config.vae.invert_scale_latents is "
                f"{c.vae.invert_scale_latents}; they must agree so that the image condition is "
                "scaled as the sampling pipeline scales it"
            )
        gd, st = nnx.split(vae)
        return gd, jax.device_put(st, run.replicated)
    gd, abs_st = nnx.split(nnx.eval_shape(lambda: _vae(run)))
    rng = np.random.default_rng(c.seed + 1)

    def fill(path, x):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "scale":
            return np.ones(x.shape, x.dtype)
        if x.ndim == 1:
            return np.zeros(x.shape, x.dtype)
        std = 1 / np.sqrt(np.prod(x.shape[:-1]))
        return (std * rng.standard_normal(x.shape)).astype(x.dtype)

    pure = jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(abs_st))
    nnx.replace_by_pure_dict(abs_st, jax.device_put(pure, run.replicated))
    return gd, abs_st
