"""Train a Gemma model: `python -m maxgemma.train --config=configs/X.py --workdir=DIR`.

Any config key can be overridden on the command line (`--config.train.steps=100`). The run resumes
from the newest complete checkpoint in `--workdir`; SIGTERM saves a checkpoint and exits 0.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and TensorBoard logs go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from maxgemma.checkpoint import CheckpointWriteError, CorruptCheckpointError
  from maxgemma.trainer.loop import NonFiniteError, train  # after flag parsing: jax starts here

  try:
    last = train(flags.FLAGS.config, flags.FLAGS.workdir)
  except (ValueError, FileNotFoundError, NonFiniteError, CorruptCheckpointError,
          CheckpointWriteError) as e:
    if os.environ.get("MAXGEMMA_TRACEBACK"):
      raise
    sys.exit(f"maxgemma.train: error: {e}  (MAXGEMMA_TRACEBACK=1 shows the traceback)")
  logging.info("finished: %s", last)


if __name__ == "__main__":
  app.run(main)
