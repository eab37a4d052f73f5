r"""Convert CogVideoX checkpoints between diffusers (safetensors) and Orbax, both ways, losslessly.

  python -m tools.convert diffusers-to-orbax SRC DST
  python -m tools.convert orbax-to-diffusers SRC DST

SRC is one component folder (config.json + *.safetensors [+ index]) or a whole diffusers model
folder (model_index.json + component folders: supported components are converted, the rest
copied). No torch needed; tensors are streamed, so memory stays far below the model size.
"""

from __future__ import annotations

import argparse
import sys

from cogvideox_jax import convert


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("direction", choices=["diffusers-to-orbax", "orbax-to-diffusers"])
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    args = parser.parse_args(argv)
    try:
        report = convert.convert(args.direction, args.src, args.dst, overwrite=args.overwrite)
    except (convert.ConversionError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for line in report:
        print(line)
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
