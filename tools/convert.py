r"""Convert CogVideoX checkpoints between diffusers (safetensors) and Orbax, both ways, losslessly,
import the original SAT checkpoints, and move LoRA adapters to and from diffusers.

  python -m tools.convert diffusers-to-orbax SRC DST
  python -m tools.convert orbax-to-diffusers SRC DST
  python -m tools.convert sat-to-orbax SRC DST [--variant 5b | --config config.json]
  python -m tools.convert lora-to-diffusers CKPT OUT [--ema] [--merge [--base MODEL]]
  python -m tools.convert diffusers-lora-to-orbax LORA OUT --base MODEL
  python -m tools.convert run-to-diffusers RUN OUT [--step N] [--ema] [--base MODEL]
  python -m tools.convert run-to-orbax RUN OUT [--step N] [--ema] [--base MODEL]

SRC is one component folder (config.json + *.safetensors [+ index]) or a whole diffusers model
folder (model_index.json + component folders: supported components are converted, the rest
copied). No torch needed; tensors are streamed, so memory stays far below the model size.

sat-to-orbax: SRC is a SAT transformer (`mp_rank_00_model_states.pt`, its iteration folder, or the
folder with SAT's `latest` file) or VAE (`3d-vae.pt`); DST becomes the Orbax component folder that
diffusers-to-orbax writes for the diffusers conversion of it. The diffusers config.json is
--config's, else --variant's (required for a VAE: its scaling factor), else the released variant
the transformer's shapes match. RoPE caches, SAT's unused embedding tables, the VAE's training
loss and the frozen T5/VAE of whole-engine checkpoints are dropped and listed.

run-to-diffusers / run-to-orbax: RUN is a training run (its workdir, checkpoints/ folder or one
step folder), full or LoRA; its latest checkpoint unless --step N. OUT becomes the trained
transformer (the parameters, or their EMA with --ema; a LoRA run's adapters merged into its base)
as a component folder, or with --base MODEL a whole model folder: MODEL's VAE, text encoder,
tokenizer and scheduler (converted to OUT's format where needed) with the trained transformer.
Diffusers' `from_pretrained` loads the run-to-diffusers result.

The LoRA commands: `python -m tools.convert lora-to-diffusers --help` (tools/convert_lora.py).

Errors in the input (a missing or damaged file, a mismatched checkpoint, an existing OUT) are one
line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

import tools
from cogvideox_jax import components, runtime, sat
from cogvideox_jax.transformer import VARIANTS
from tools import convert_lora

# A mismatched checkpoint (convert.ConversionError) is a ValueError; missing, damaged or existing
# files are OSErrors (or ValueErrors naming the file).
ERRORS = (ValueError, OSError)
RUN_COMMANDS = {"run-to-diffusers": "diffusers", "run-to-orbax": "orbax"}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    runtime.cpu_only_without_accelerators()
    if argv and argv[0] in convert_lora.COMMANDS:
        try:
            report = convert_lora.main(argv)
        except ERRORS as e:
            return tools.error(e)
        print("\n".join([*report, f"wrote {argv[2]}"]))
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m tools.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "direction",
        choices=[
            "diffusers-to-orbax",
            "orbax-to-diffusers",
            "sat-to-orbax",
            *convert_lora.COMMANDS,
            *RUN_COMMANDS,
        ],
    )
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    sat_args = parser.add_argument_group("sat-to-orbax").add_mutually_exclusive_group()
    sat_args.add_argument("--variant", choices=list(VARIANTS), help="the released model")
    sat_args.add_argument("--config", help="the diffusers config.json of the component")
    run_args = parser.add_argument_group("run-to-diffusers, run-to-orbax")
    run_args.add_argument("--step", type=int, default=None, help="the checkpoint (default: latest)")
    run_args.add_argument("--ema", action="store_true", help="the EMA of the weights")
    run_args.add_argument("--base", default="", help="a whole model folder for the rest")
    args = parser.parse_args(argv)
    if args.direction != "sat-to-orbax" and (args.variant or args.config):
        parser.error("--variant and --config are for sat-to-orbax")
    if args.direction not in RUN_COMMANDS and (args.step is not None or args.ema or args.base):
        parser.error("--step, --ema and --base are for run-to-diffusers and run-to-orbax")
    try:
        if args.direction in RUN_COMMANDS:
            from train import export

            report = export.write(
                args.src,
                args.dst,
                RUN_COMMANDS[args.direction],
                step=args.step,
                ema=args.ema,
                base=args.base,
                overwrite=args.overwrite,
            )
        elif args.direction == "sat-to-orbax":
            report = sat.sat_to_orbax(
                args.src,
                args.dst,
                variant=args.variant,
                config=args.config,
                overwrite=args.overwrite,
            )
        else:
            report = components.convert(
                args.direction, args.src, args.dst, overwrite=args.overwrite
            )
    except ERRORS as e:
        return tools.error(e)
    for line in report:
        print(line)
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
