"""launch.local runs the real trainer as 2 processes x 4 devices, and a second launch resumes it."""

import os
import subprocess
import sys

import pytest

from maxgemma import checkpoint
from tests.train_utils import PEAK, ROOT, losses_by_step, run_train


def launch(workdir, log_dir, steps):
  return subprocess.run(
      [sys.executable, "-m", "launch.local", "--processes=2", "--devices_per_process=4",
       f"--log_dir={log_dir}", "--timeout=400", "--",
       f"--config={ROOT}/configs/tiny.py", f"--workdir={workdir}",
       f"--config.train.steps={steps}", "--config.checkpoint.every=2",
       "--config.optim.decay_steps=6", "--config.optim.warmup_steps=1",
       f"--config.metrics.peak_flops_per_device={PEAK}"],
      cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True,
      timeout=500)


@pytest.mark.slow
def test_two_processes_train_checkpoint_and_resume(tmp_path):
  workdir = str(tmp_path / "run")
  first = launch(workdir, tmp_path / "logs1", steps=4)
  assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
  assert checkpoint.Checkpointer(workdir).latest_step() == 4
  # Every loader shard's position is in the checkpoint (one per row of the batch of 8).
  data_files = sorted(f for f in os.listdir(os.path.join(workdir, "checkpoints", "4", "data"))
                      if f.startswith("shard_"))
  assert data_files == [f"shard_{j:05d}-of-00008.json" for j in range(8)]
  second = launch(workdir, tmp_path / "logs2", steps=6)
  assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
  assert "resumed from" in (tmp_path / "logs2" / "process_0.log").read_text()
  losses = losses_by_step(workdir)
  assert sorted(losses) == [1, 2, 3, 4, 5, 6]  # 1-4 from the first launch, 5-6 after resume
  assert checkpoint.Checkpointer(workdir).latest_step() == 6
  # One process now: parameters and optimizer state reshard, the data stream continues
  # (tests/test_multihost.py checks it equals a straight run).
  third = run_train(workdir, "--config.train.steps=8", "--config.checkpoint.every=2",
                    "--config.optim.decay_steps=6")
  assert third.returncode == 0, third.stderr[-3000:]
  assert "resumed from" in third.stderr
  assert sorted(losses_by_step(workdir)) == list(range(1, 9))
