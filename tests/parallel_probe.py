"""Run by tests/test_parallelism.py under launch.local: the data-8 layout across 2 processes.

Each process feeds its half of every synthetic batch; process 0 writes the losses to argv[1].
"""

import json
import sys

import jax

from maxgemma import distributed


def main() -> None:
  distributed.initialize()
  from tests.test_parallelism import make_config, run_losses
  assert jax.process_count() == 2 and jax.device_count() == 8, distributed.process_summary()
  losses, _ = run_losses(make_config(ici_data=8), jax.devices())
  if jax.process_index() == 0:
    with open(sys.argv[1], "w") as f:
      json.dump(losses.tolist(), f)


if __name__ == "__main__":
  main()
