"""python -m train --config configs/<name>.py[:args] --workdir DIR [--config.key=value ...]

`python -m train --help` lists the configs and their arguments. A mistake in the command line or
the config (an unknown key, a bad value, a missing file, a workdir that cannot be written, a
setting the run cannot take) is one line on stderr and exit code 2, before any work starts.
SIGTERM or SIGINT stops a run after the step in flight with a checkpoint of that step, one line
on stderr saying where, and exit code 128 + the signal (143, 130): train/preemption.py.
"""

import difflib
import os
import re
import sys
import traceback
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints and logs go here.")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
NOT_CONFIGS = {"__init__.py", "common.py", "validate.py"}


def usage() -> str:
    """The usage line, and each config file with the first line of its docstring."""
    import ast

    lines = [__doc__.splitlines()[0], "", "configs (arguments after the colon, comma-separated):"]
    for path in sorted(CONFIGS.glob("*.py")):
        if path.name in NOT_CONFIGS:
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        lines.append(f"  configs/{path.name}: {doc.splitlines()[0] if doc else ''}")
    lines += [
        "",
        "model configs take a mode (pretrain, sft, lora) and runlocal (a CPU-sized run),",
        "frames=N and res=HxW; each config file's docstring shows its commands.",
        "--config.mode=eval evaluates the latest checkpoint; any config key can be set with",
        "--config.KEY=VALUE (the keys: configs/common.py).",
    ]
    return "\n".join(lines)


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse(argv: list[str]) -> list[str]:
    """absl's flag parsing with its errors (an unknown key, a bad value, a config file that is
    missing or fails) as one line."""
    try:
        rest = flags.FLAGS(argv)
    except flags.UnrecognizedFlagError as e:  # a flag that is not --config.*
        close = difflib.get_close_matches(e.flagname, list(flags.FLAGS), n=1)
        hint = f" (did you mean --{close[0]}?)" if close else ""
        fail(f"--{e.flagname}: no such flag{hint}")
    except (AttributeError, KeyError) as e:  # ml_collections: a key the config lacks
        text = str(e).encode().decode("unicode_escape")
        names = re.findall(r"'(\w+)'", text)
        wrong = names[0] if names else ""
        where = (re.match(rf"--config\.((?:\w+\.)*?){wrong}(?=[.=]|$)", a) for a in argv)
        prefix = next((m.group(1) for m in where if m), "")
        flag = f"--config.{prefix}{wrong}"
        close = re.search(r'Did you mean "(\w+)"', text)
        hint = f" (did you mean --config.{prefix}{close.group(1)}?)" if close else ""
        fail(f"{flag}: no such key in the config{hint}")
    except (flags.Error, OSError) as e:
        fail(f"--config: {_last_line(e)}")
    for name in ("config", "workdir"):
        if flags.FLAGS[name].value is None:
            fail(f"--{name} is required (python -m train --help)")
    try:
        flags.FLAGS.config.get("trainer")  # a config file that failed to load raises here
    except OSError as e:
        fail(f"--config: {_last_line(e)}")
    return rest


def _last_line(e: BaseException) -> str:
    """The config file's own error: the last line of the message absl builds around it."""
    return [line.strip() for line in str(e).splitlines() if line.strip()][-1]


def check_workdir(workdir: str) -> None:
    """The workdir is a folder, or can be made, and takes files (checked without writing; a
    URL such as gs://... is left to the storage library)."""
    if "://" in workdir:
        return
    path = Path(workdir).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        fail(f"--workdir {workdir}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        fail(f"--workdir {workdir}: cannot write there (no write permission on {existing})")


def main(argv):
    del argv
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO
    if config.get("trainer", "dit") != "dit":
        fail(f"config.trainer must be 'dit', got {config.trainer!r}")
    check_workdir(workdir)
    from cogvideox_jax import runtime

    runtime.cpu_only_without_accelerators()  # no libtpu probe on a machine without TPUs
    from train import distributed

    setup = distributed.initialize()  # before anything touches a device
    import jax

    from train import dit as loop
    from train import preemption, workdir_lock
    from train.run import resolve

    try:
        resolve(config)  # every config rule, before anything is built
    except (ValueError, FileNotFoundError) as e:
        fail(" ".join(str(e).split()))
    if jax.process_index() == 0:
        print(f"{setup}: {jax.device_count()} devices", flush=True)
    try:
        loop.train_and_evaluate(config, workdir)
    except preemption.Preempted as e:  # SIGTERM / SIGINT: stopped with a checkpoint
        if jax.process_index() == 0:
            print(str(e), file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except workdir_lock.Busy as e:  # another run's workdir: no error.txt written into it
        fail(str(e))
    except ValueError as e:  # the run's data or a step refused, e.g. one that cannot fit
        name = "error.txt" if jax.process_count() == 1 else f"error_{jax.process_index()}.txt"
        path = os.path.join(workdir, name)  # the whole story, for a bug report
        with open(path, "w") as f:
            traceback.print_exc(file=f)
        fail(f"{' '.join(str(e).split())} (traceback: {path})")


if __name__ == "__main__":
    if any(a in ("-h", "--help", "--helpfull", "--list") for a in sys.argv[1:]):
        print(usage())
        sys.exit(0)
    sys.path.insert(0, str(CONFIGS.parent))  # `configs` importable from any directory
    app.run(main, flags_parser=parse)
