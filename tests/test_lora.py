"""LoRA: adapters on the transformer, a LoRA run of the trainer, and the exchange with diffusers
(PEFT files loaded by `CogVideoXPipeline.load_lora_weights`, merged full models)."""

from __future__ import annotations

import importlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel
from flax import nnx
from peft import LoraConfig as PeftConfig
from peft import get_peft_model_state_dict
from reference import perturb_, perturbed_model, rel_l2, transformer_forward
from safetensors.numpy import load_file, save_file

import cogvideox_jax as cj
from cogvideox_jax import lora
from tools import convert as convert_tool
from tools import convert_lora
from train import checkpoint, dit
from train.program import make_program
from train.run import resolve

ALL = tuple(lora.TARGETS)


def _inputs(cfg, seed=0, frames=3, size=4):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, frames, size, size, cfg.in_channels)).astype(np.float32)
    text = rng.standard_normal((2, cfg.max_text_len, cfg.text_embed_dim)).astype(np.float32)
    return x, text, np.array([100, 700])


def _randomise_adapters(model, seed):
    state = nnx.state(model, lora.LoraParam)
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(state))))
    nnx.update(model, jax.tree.map(lambda p: 0.2 * jax.random.normal(next(keys), p.shape), state))


def test_new_adapters_change_nothing_and_merge_equals_unmerged():
    model = perturbed_model("5b")
    x, text, t = _inputs(model.cfg)
    base = np.asarray(model(x, text, t))
    lora.attach(model, lora.LoraConfig(4, 6.0, ALL), rngs=nnx.Rngs(0))
    # B starts at zero, so each adapter adds exact zeros. The forward is a different program
    # (the adapters' products are extra ops), which XLA may fuse and round differently; on
    # some CPUs the outputs then differ in the last bits (2e-5 at most, elementwise).
    leaves, _ = jax.tree_util.tree_flatten_with_path(
        nnx.to_pure_dict(nnx.state(model, lora.LoraParam))
    )
    for path, value in leaves:
        zero = str(path[-1].key) == "b"
        assert bool(np.all(np.asarray(value) == 0)) == zero, jax.tree_util.keystr(path)
    assert rel_l2(np.asarray(model(x, text, t)), base) < 1e-6
    _randomise_adapters(model, 1)
    adapted = np.asarray(model(x, text, t))
    assert rel_l2(adapted, base) > 1e-2  # the adapters matter
    lora.merge(model)
    assert not nnx.state(model, lora.LoraParam)  # merged away
    assert rel_l2(np.asarray(model(x, text, t)), adapted) < 1e-5


def test_5b_lora_train_state_holds_only_the_adapters():
    """At full size (abstractly): the trained parameters, Adam moments and checkpoint of a 5B
    rank-128 LoRA run are the adapters alone, 42 layers x 4 projections x (A + B)."""
    cfg = importlib.import_module("configs.cogvideox_5b").get_config("lora")
    prog = make_program(resolve(cfg))
    state = jax.eval_shape(prog.init_state)
    adapters = 42 * 4 * (3072 * 128 + 128 * 3072)
    assert sum(x.size for x in jax.tree.leaves(state["params"])) == adapters == 132_120_576
    assert state["buffers"] == {} and state["ema"] == {}
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    assert total < 3 * 4 * adapters + 1024  # params + 2 Adam moments, float32: 1.6 GB
    base = jax.eval_shape(prog.init_base)  # frozen, outside the state
    assert sum(x.size for x in jax.tree.leaves(base)) > 5e9
    assert {x.dtype for x in jax.tree.leaves(base)} == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.parametrize(
    "name",
    [
        "cogvideox_2b",  # the only config no other fast test runs
        *(
            pytest.param(n, marks=pytest.mark.slow)
            for n in ("cogvideox_5b", "cogvideox_5b_i2v", "cogvideox1_5_5b", "cogvideox1_5_5b_i2v")
        ),
    ],
)
def test_every_config_has_a_lora_mode_whose_step_lowers(name):
    """The `lora` mode of each config: its train step (image conditioning included) traces and
    lowers with the adapters as the only trained state and the base passed frozen."""
    cfg = importlib.import_module(f"configs.{name}").get_config("lora,runlocal")
    cfg.evals.sample_prompts = ()  # not looked at here
    assert cfg.lora.rank > 0 and cfg.optim.ema_decay == 0
    run = resolve(cfg)
    prog = make_program(run)
    state, batch, frozen = prog.abstract_train_args()
    lcfg = run.lora
    paths = {
        "/".join(str(getattr(k, "key", k)) for k in path)
        for path, _ in jax.tree_util.tree_flatten_with_path(state["params"])[0]
    }
    assert paths == set(lora.adapter_paths(lcfg))
    assert frozen.base is not None and (frozen.vae is not None) == cfg.input.i2v
    with run.on_mesh():
        lowered = prog.jit_train_step().lower(state, batch, frozen)
    out_state, _ = lowered.out_info  # the step returns adapters only, nothing of the base
    assert jax.tree.structure(out_state) == jax.tree.structure(state)


def test_bad_lora_configs_name_the_rule():
    with pytest.raises(ValueError, match="to_qq"):
        lora.LoraConfig(4, 4.0, ("to_qq",))
    with pytest.raises(ValueError, match="rank must be >= 1"):
        lora.LoraConfig(0, 4.0)
    cfg = importlib.import_module("configs.cogvideox_5b").get_config("lora,runlocal")
    cfg.evals.sample_prompts = ()  # not looked at here
    cfg.lora.targets = "to_q,proj_out"
    with pytest.raises(ValueError, match="config.lora: .*proj_out"):
        resolve(cfg)


# ---- The trainer's LoRA run, exported to diffusers ----


def _tiny_base(tmp_path, tcfg):
    """A perturbed tiny diffusers transformer with our config `tcfg`, saved as a folder."""
    torch.manual_seed(0)
    config = {k: v for k, v in tcfg.to_diffusers().items() if not k.startswith("_")}
    model = CogVideoXTransformer3DModel(**config).eval()
    perturb_(model, 3, scale=0.2)
    model.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def _diffusers_pipe(transformer):
    return CogVideoXPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        transformer=transformer,
        scheduler=CogVideoXDDIMScheduler(),
    )


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """configs/cogvideox_5b.py:lora,runlocal from a tiny base: 4 steps, then resumed to 6."""
    tmp = tmp_path_factory.mktemp("lora_run")
    cfg = importlib.import_module("configs.cogvideox_5b").get_config("lora,runlocal")
    cfg.evals.sample_prompts = ()  # not looked at here
    base = _tiny_base(tmp, cj.transformer_config(cfg.model.variant, **cfg.model.overrides))
    cfg.init.checkpoint = str(base)
    cfg.optim.lr = 3e-2  # large enough that the adapters move measurably in a few steps
    cfg.evals.every_steps = 6  # held-out loss once, on the LoRA model
    cfg.optim.ema_decay = 0.5
    workdir = tmp / "run"
    cfg.total_steps = 4
    dit.train_and_evaluate(cfg, str(workdir))
    cfg.total_steps = 6
    dit.train_and_evaluate(cfg, str(workdir))
    return cfg, base, workdir


@pytest.mark.slow
def test_lora_run_checkpoints_only_adapters_and_resumes(lora_run, capsys):
    cfg, _, workdir = lora_run
    rows = [json.loads(r) for r in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and "eval_loss" in rows[-1]
    assert all(np.isfinite(r["loss"]) for r in rows) and rows[-1]["grad_norm"] > 0
    meta, params = checkpoint.read_lora(str(workdir))
    assert meta["lora"] == {"rank": 4, "alpha": 8.0, "targets": list(lora.DEFAULT_TARGETS)}
    assert sorted(params) == sorted(lora.adapter_paths(lora.LoraConfig.from_json(meta["lora"])))
    assert all(np.abs(v).max() > 0 for k, v in params.items())  # B moved off zero
    # Nothing but adapters (with their EMA and Adam moments) in the saved state: no base.
    step = checkpoint.step_folder(str(workdir))
    saved = checkpoint.ocp.PyTreeCheckpointer().metadata(os.path.join(step, "state"))
    leaves = jax.tree.leaves(saved.item_metadata.tree)
    adapter_size = sum(v.size for v in params.values())
    assert sum(int(np.prod(m.shape)) for m in leaves) <= 4 * adapter_size + 16


@pytest.mark.slow
def test_lora_export_loads_into_diffusers_with_the_same_output(lora_run, tmp_path):
    cfg, base, workdir = lora_run
    assert convert_tool.main(["lora-to-diffusers", str(workdir), str(tmp_path / "out")]) == 0
    # Ours: the base with the run's adapters.
    meta, params = checkpoint.read_lora(str(workdir))
    model = cj.load_transformer(base)
    lora.load_adapters(model, lora.LoraConfig.from_json(meta["lora"]), params)
    x, text, t = _inputs(model.cfg)
    ours = np.asarray(model(x, text, t))
    # diffusers: the same base, the exported file through load_lora_weights.
    pipe = _diffusers_pipe(CogVideoXTransformer3DModel.from_pretrained(base).eval())
    plain = transformer_forward(pipe.transformer, x, text, t)
    pipe.load_lora_weights(str(tmp_path / "out"))
    theirs = transformer_forward(pipe.transformer, x, text, t)
    assert rel_l2(theirs, plain) > 1e-3  # the trained adapters change the output
    assert rel_l2(ours, theirs) < 1e-5

    # --merge: a plain diffusers model equal to base + adapters.
    argv = ["lora-to-diffusers", str(workdir), str(tmp_path / "merged"), "--merge"]
    assert convert_tool.main(argv) == 0  # the base comes from the run's init.checkpoint
    merged = CogVideoXTransformer3DModel.from_pretrained(tmp_path / "merged").eval()
    assert rel_l2(transformer_forward(merged, x, text, t), theirs) < 1e-5
    # run-to-diffusers on a LoRA run: the same merged transformer.
    assert convert_tool.main(["run-to-diffusers", str(workdir), str(tmp_path / "run")]) == 0
    exported = CogVideoXTransformer3DModel.from_pretrained(tmp_path / "run").eval()
    assert rel_l2(transformer_forward(exported, x, text, t), theirs) < 1e-5

    # --ema: the adapters' moving average instead.
    argv = ["lora-to-diffusers", str(workdir), str(tmp_path / "ema"), "--ema"]
    assert convert_tool.main(argv) == 0
    _, ema = checkpoint.read_lora(str(workdir), ema=True)
    assert any(not np.array_equal(ema[k], params[k]) for k in params)
    want = lora.to_diffusers(lora.LoraConfig.from_json(meta["lora"]), ema)
    got = load_file(tmp_path / "ema" / lora.DIFFUSERS_FILE)
    assert sorted(got) == sorted(want)
    assert all(np.array_equal(got[k], want[k]) for k in want)


@pytest.mark.slow
def test_lora_run_continues_from_an_exported_lora_on_a_bf16_base(lora_run, tmp_path):
    cfg, _, workdir = lora_run
    assert convert_tool.main(["lora-to-diffusers", str(workdir), str(tmp_path / "file")]) == 0
    _, trained = checkpoint.read_lora(str(workdir))
    cfg = cfg.copy_and_resolve_references()
    cfg.lora.init = str(tmp_path / "file" / lora.DIFFUSERS_FILE)
    cfg.lora.base_dtype = "bfloat16"
    cfg.optim.lr = 0.0  # no update: the checkpoint must hold the imported adapters
    cfg.total_steps = 1
    dit.train_and_evaluate(cfg, str(tmp_path / "run"))
    _, again = checkpoint.read_lora(str(tmp_path / "run"))
    for k, v in trained.items():  # the file holds B * alpha / rank; the run's alpha undoes it
        np.testing.assert_allclose(again[k], v, rtol=1e-6, atol=1e-8)
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite(rows[-1]["loss"])
    # The frozen base is kept in bfloat16, the adapters in float32.
    prog = make_program(resolve(cfg))
    adapters, base = prog.run.training.split(prog.build(0))
    assert {x.dtype for x in jax.tree.leaves(base)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(adapters)} == {jnp.dtype(jnp.float32)}


# ---- A diffusers LoRA imported here ----


@pytest.mark.parametrize("with_metadata", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_diffusers_lora_imports_with_diffusers_output(with_metadata, tmp_path):
    from reference import diffusers_transformer

    torch_model = diffusers_transformer("5b")
    torch_model.save_pretrained(tmp_path / "base")
    x, text, t = _inputs(cj.load_transformer(tmp_path / "base").cfg)
    alpha = 6 if with_metadata else 4  # without metadata diffusers assumes alpha = rank
    peft_cfg = PeftConfig(r=4, lora_alpha=alpha, target_modules=list(ALL), init_lora_weights=False)
    torch_model.add_adapter(peft_cfg)
    theirs = transformer_forward(torch_model, x, text, t)
    layers = get_peft_model_state_dict(torch_model)
    if with_metadata:
        CogVideoXPipeline.save_lora_weights(
            tmp_path / "lora",
            transformer_lora_layers=layers,
            transformer_lora_adapter_metadata=peft_cfg.to_dict(),
        )
    else:  # a bare PEFT file, keys without the "transformer." prefix
        (tmp_path / "lora").mkdir()
        save_file(
            {k: v.numpy() for k, v in layers.items()}, tmp_path / "lora" / lora.DIFFUSERS_FILE
        )

    argv = ["diffusers-lora-to-orbax", str(tmp_path / "lora"), str(tmp_path / "ours")]
    assert convert_tool.main([*argv, "--base", str(tmp_path / "base")]) == 0
    lcfg, tree = lora.load(tmp_path / "ours")
    assert (lcfg.rank, lcfg.alpha, set(lcfg.targets)) == (4, float(alpha), set(ALL))
    model = cj.load_transformer(tmp_path / "base")
    lora.load_adapters(model, lcfg, tree)
    assert rel_l2(np.asarray(model(x, text, t)), theirs) < 1e-5
    # Merged from the LoRA folder onto a named base: a plain diffusers transformer.
    argv = ["lora-to-diffusers", str(tmp_path / "ours"), str(tmp_path / "merged"), "--merge"]
    assert convert_tool.main([*argv, "--base", str(tmp_path / "base")]) == 0
    merged = CogVideoXTransformer3DModel.from_pretrained(tmp_path / "merged").eval()
    assert rel_l2(transformer_forward(merged, x, text, t), theirs) < 1e-5

    # At half strength, as diffusers' adapter weight 0.5 (tools.sample --lora-scale).
    model = cj.load_transformer(tmp_path / "base")
    lora.fuse(model, *convert_lora.read_any(str(tmp_path / "lora"), model.cfg), scale=0.5)
    torch_model.set_adapters(["default"], weights=[0.5])
    half = transformer_forward(torch_model, x, text, t)
    assert rel_l2(np.asarray(model(x, text, t)), half) < 1e-5

    # And back: exporting the imported LoRA gives diffusers' tensors (scale folded into B).
    assert (
        convert_tool.main(["lora-to-diffusers", str(tmp_path / "ours"), str(tmp_path / "back")])
        == 0
    )
    back = load_file(tmp_path / "back" / lora.DIFFUSERS_FILE)
    scale = alpha / 4
    for key, value in layers.items():
        name = key if key.startswith("transformer.") else f"transformer.{key}"
        want = value.numpy() * (scale if ".lora_B." in key else 1.0)
        np.testing.assert_allclose(back[name], want, rtol=1e-6, atol=1e-7)
    assert len(back) == len(layers)


def test_diffusers_lora_errors_name_the_tensor(tmp_path):
    tcfg = perturbed_model("5b").cfg
    good = {
        f"transformer.transformer_blocks.{i}.attn1.to_q.lora_{w}.weight": np.zeros(
            shape, np.float32
        )
        for i in range(tcfg.num_layers)
        for w, shape in (("A", (4, tcfg.width)), ("B", (tcfg.width, 4)))
    }
    lcfg, tree = lora.from_diffusers(good, None, tcfg)
    assert lcfg == lora.LoraConfig(4, 4.0, ("to_q",)) and len(tree) == 2
    with pytest.raises(ValueError, match="norm1.linear.lora_A"):
        lora.from_diffusers(
            {
                **good,
                "transformer.transformer_blocks.0.norm1.linear.lora_A.weight": np.zeros((4, 2)),
            },
            None,
            tcfg,
        )
    missing = dict(good)
    del missing["transformer.transformer_blocks.1.attn1.to_q.lora_B.weight"]
    with pytest.raises(ValueError, match=r"to_q.lora_B .*missing blocks \[1\]"):
        lora.from_diffusers(missing, None, tcfg)


@pytest.mark.slow
def test_sample_cli_merges_a_lora(tmp_path):
    from test_pipeline import _full_model

    from data.video import read_mp4
    from tools import sample

    theirs, ours = _full_model(tmp_path)
    peft_cfg = PeftConfig(r=2, lora_alpha=2, target_modules=list(ALL), init_lora_weights=False)
    theirs.transformer.add_adapter(peft_cfg)
    CogVideoXPipeline.save_lora_weights(
        tmp_path / "lora", transformer_lora_layers=get_peft_model_state_dict(theirs.transformer)
    )
    argv = ["--model", str(tmp_path / "model"), "--prompt", "a panda", "--height", "48"]
    argv += ["--width", "64", "--num-frames", "9", "--steps", "2"]
    assert sample.main([*argv, "--out", str(tmp_path / "plain.mp4")]) == 0
    lora_args = ["--lora", str(tmp_path / "lora"), "--out", str(tmp_path / "lora.mp4")]
    assert sample.main([*argv, *lora_args]) == 0
    plain, _ = read_mp4(tmp_path / "plain.mp4")
    adapted, fps = read_mp4(tmp_path / "lora.mp4")
    assert adapted.shape == plain.shape == (9, 48, 64, 3) and fps == 8
    assert np.abs(adapted.astype(int) - plain.astype(int)).mean() > 1  # the LoRA took effect
    # Imported, then merged into the whole model folder: the other components copied, the
    # transformer the one --lora sampled with.
    lora_dir, merged = str(tmp_path / "ours"), str(tmp_path / "merged")
    base = ["--base", str(tmp_path / "model")]
    assert (
        convert_tool.main(["diffusers-lora-to-orbax", str(tmp_path / "lora"), lora_dir, *base]) == 0
    )
    assert convert_tool.main(["lora-to-diffusers", lora_dir, merged, "--merge", *base]) == 0
    assert sorted(os.listdir(merged)) == sorted(os.listdir(tmp_path / "model"))
    fused = cj.load_transformer(tmp_path / "model")
    lora.fuse(fused, *convert_lora.read_any(str(tmp_path / "lora"), fused.cfg))
    x, text, t = _inputs(fused.cfg)
    got = cj.load_transformer(merged)(x, text, t)
    assert rel_l2(got, fused(x, text, t)) < 1e-6
