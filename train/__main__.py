"""python -m train --config configs/<name>.py[:args] --workdir DIR [--config.key=value ...]"""

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from train import distributed

config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints and logs go here.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO
    setup = distributed.initialize()  # before anything touches a device
    if jax.process_index() == 0:
        print(f"{setup}: {jax.device_count()} devices", flush=True)
    if config.trainer == "dit":
        from train import dit as loop
    else:
        raise ValueError(f"config.trainer must be 'dit', got {config.trainer!r}")
    loop.train_and_evaluate(config, workdir)


if __name__ == "__main__":
    app.run(main)
