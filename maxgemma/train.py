"""Train a Gemma model: `python -m maxgemma.train --config=configs/X.py --workdir=DIR`.

Any config key can be overridden on the command line (`--config.train.steps=100`). The run resumes
from the newest complete checkpoint in `--workdir`; SIGTERM saves a checkpoint and exits 0.
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and TensorBoard logs go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from maxgemma.trainer.loop import train  # after flag parsing: jax starts here

  last = train(flags.FLAGS.config, flags.FLAGS.workdir)
  logging.info("finished: %s", last)


if __name__ == "__main__":
  app.run(main)
