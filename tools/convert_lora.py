r"""LoRA adapters to and from diffusers (the LoRA commands of `python -m tools.convert`).

  python -m tools.convert lora-to-diffusers CKPT OUT [--ema] [--merge [--base MODEL]]
  python -m tools.convert diffusers-lora-to-orbax LORA OUT --base MODEL

lora-to-diffusers: CKPT is a LoRA run (its workdir, checkpoints/ folder or one step folder; the
latest step by default) or a LoRA folder. OUT gets `pytorch_lora_weights.safetensors`, which
`CogVideoXPipeline.load_lora_weights(OUT)` loads with nothing else to set: the alpha / rank
scale is folded into lora_B. With --merge, OUT is instead the base model with the adapters
merged into its weights, as a diffusers folder (a whole model folder when the base is one); the
base is the run's init.checkpoint unless --base names it.

diffusers-lora-to-orbax: LORA is a diffusers/PEFT LoRA file (or its folder); OUT becomes a LoRA
folder for `--config.lora.init` (further training) or `tools.sample --lora`. MODEL is the
transformer it adapts (a diffusers or Orbax model or transformer folder; only its config is read).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cogvideox_jax import components, lora
from cogvideox_jax.transformer import TransformerConfig

COMMANDS = ("lora-to-diffusers", "diffusers-lora-to-orbax")


def _transformer_config(model: str) -> TransformerConfig:
    folder = components.component_folder(model, "transformer")
    return TransformerConfig.from_diffusers(json.loads((folder / "config.json").read_text()))


def read_adapters(src: str, *, ema: bool = False):
    """(LoraConfig, adapter tree, transformer config, base folder or "") of a LoRA run's
    checkpoint or a LoRA folder."""
    if lora.is_folder(src):
        if ema:
            raise ValueError(f"{src}: --ema is for training checkpoints; a LoRA folder has one set")
        meta = json.loads((Path(src) / lora.CONFIG_FILE).read_text())
        cfg, tree = lora.load(src)
        return cfg, tree, TransformerConfig.from_diffusers(meta["transformer"]), ""
    from train import checkpoint

    meta, tree = checkpoint.read_lora(src, ema=ema)
    cfg = lora.LoraConfig.from_json(meta["lora"])
    return cfg, tree, TransformerConfig.from_diffusers(meta["transformer"]), meta.get("base", "")


def read_any(path: str, tcfg: TransformerConfig):
    """(LoraConfig, adapter tree) from a LoRA run's checkpoint, a LoRA folder or a diffusers
    LoRA (file or folder) for the transformer `tcfg`."""
    p = Path(path)
    diffusers_file = p.is_file() or (p / lora.DIFFUSERS_FILE).is_file()
    if lora.is_folder(p) or diffusers_file:
        return lora.load(p, tcfg)
    cfg, tree, trained_on, _ = read_adapters(path)
    if trained_on != tcfg:
        raise ValueError(f"{path}: adapters for {trained_on}, not for this model ({tcfg})")
    return cfg, tree


def main(argv) -> list[str]:
    """Run one LoRA command; returns the report lines (errors raise)."""
    parser = argparse.ArgumentParser(
        prog="python -m tools.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--base", default="", help="the base model (see above)")
    parser.add_argument("--merge", action="store_true", help="write the merged full model")
    parser.add_argument("--ema", action="store_true", help="export the adapters' EMA")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    args = parser.parse_args(argv)
    out = Path(args.dst)
    if args.command == "diffusers-lora-to-orbax":
        if not args.base:
            parser.error("diffusers-lora-to-orbax needs --base MODEL (the transformer it adapts)")
        if args.merge or args.ema:
            parser.error("--merge and --ema are options of lora-to-diffusers")
        tcfg = _transformer_config(args.base)
        cfg, tree = lora.read_diffusers(args.src, tcfg)
        lora.save(out, cfg, tcfg, tree, overwrite=args.overwrite)
        return [f"imported a rank-{cfg.rank} LoRA (alpha {cfg.alpha}) on {list(cfg.targets)}"]

    cfg, tree, tcfg, base = read_adapters(args.src, ema=args.ema)
    if args.merge:
        base = args.base or base
        if not base:
            parser.error("--merge needs --base MODEL: this LoRA does not name its base model")
        if _transformer_config(base) != tcfg:
            raise ValueError(f"{base}: not the transformer this LoRA was trained on ({tcfg})")
        return lora.write_merged(base, cfg, tree, out, overwrite=args.overwrite)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists (pass --overwrite to replace it)")
    written = lora.write_diffusers(out, cfg, tree)
    return [
        f"wrote a rank-{cfg.rank} LoRA on {list(cfg.targets)} (scale {cfg.scale:g} folded into B)"
        f" to {written.name}"
    ]
