"""Preemption of a multi-process run: SIGTERM to a `launch.local` job (2 processes x 1 device).

Nothing is mocked: jax.distributed's preemption service catches SIGTERM in each process, and its
sync protocol (`multihost_utils.reached_preemption_sync_point`, asked after every step: see
maxgemma/trainer/preemption.py) picks the step at which every process saves and exits 0. The job
is stopped by SIGTERM to the launcher (forwarded to every process, as a pod's hosts all get the
notice) while it trains, resumed, and stopped again by SIGTERM to process 1 alone (the service
tells process 0) as soon as it has restored, before its first step.
The learning-rate horizon is fixed (`optim.decay_steps`), so an uninterrupted job of as many steps
is the reference: every step's loss and the parameters saved at the end must equal it, bit for bit.
One device per process: a cross-process sum of two operands is exact in any order, so the
comparison tests the checkpoint and resume, not the order in which gloo adds partial sums.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from maxgemma import checkpoint
from tests.train_utils import ROOT, env, logged, losses_by_step, train_command

STEPS = 40  # a horizon the interrupted job never reaches
ARGS = (f"--config.optim.decay_steps={STEPS}", "--config.checkpoint.every=1000",
        "--config.model.dtype=float32")


def launcher(workdir: str, log_dir: Path, steps: int = STEPS) -> list[str]:
  return [sys.executable, "-m", "launch.local", "--processes=2", "--devices_per_process=1",
          f"--log_dir={log_dir}", "--grace_s=30", "--",
          *train_command(workdir, *ARGS, f"--config.train.steps={steps}")[3:]]


def job_env() -> dict[str, str]:
  return {k: v for k, v in env().items() if not k.startswith("MAXGEMMA_")}


def child_pid(launch_pid: int, process_id: int) -> int:
  """The pid of process `process_id` among the launcher's children (from their environment)."""
  children = Path(f"/proc/{launch_pid}/task/{launch_pid}/children").read_text().split()
  for pid in map(int, children):
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    if f"MAXGEMMA_PROCESS_ID={process_id}".encode() in environ:
      return pid
  raise AssertionError(f"no child with MAXGEMMA_PROCESS_ID={process_id}")


def interrupt(workdir: str, log_dir: Path, *, target: str, when: str) -> int:
  """Runs the job, sends SIGTERM (to the launcher or to process 1) once it has logged two more
  steps (`when="steps"`) or once process 1 has restored the checkpoint, before its first step
  (`when="restored"`), and returns the step every process saved."""
  before = len(logged(workdir))
  job = subprocess.Popen(launcher(workdir, log_dir), env=job_env(), cwd=ROOT, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  log1 = log_dir / "process_1.log"
  ready = (lambda: len(logged(workdir)) >= before + 2) if when == "steps" else \
      (lambda: log1.exists() and "resumed from" in log1.read_text())
  deadline = time.monotonic() + 300
  while not ready() and job.poll() is None and time.monotonic() < deadline:
    time.sleep(0.05)
  assert job.poll() is None and ready(), f"the job did not get {when}"
  if when == "restored":
    assert len(logged(workdir)) == before, "it trained a step before the signal: too late"
  os.kill(job.pid if target == "launcher" else child_pid(job.pid, 1), signal.SIGTERM)
  out, err = job.communicate(timeout=300)
  assert job.returncode == 0, out[-3000:] + err[-3000:]
  if target == "launcher":
    assert "after SIGTERM: process 0 exited with code 0, process 1 exited with code 0" in err, err
  else:
    assert "all 2 processes finished OK" in out, out[-3000:]
  saved = set()
  for i in range(2):
    log = (log_dir / f"process_{i}.log").read_text()
    steps = re.findall(r"preempted: checkpoint at step (\d+), exiting", log)
    synced = re.findall(r"preemption: every process reached the sync point at step (\d+)", log)
    assert len(steps) == 1 and synced and set(synced) == set(steps), (i, steps, synced)
    saved.add(int(steps[0]))
  assert len(saved) == 1, f"the processes saved different steps: {saved}"
  step = saved.pop()
  assert step < STEPS, "the preemption came after the last step: nothing was tested"
  assert checkpoint.Checkpointer(workdir).latest_step() == step
  assert max(r["step"] for r in logged(workdir)) == step  # nothing trained past the save
  return step


@pytest.mark.slow
def test_sigterm_saves_one_step_everywhere_and_resumes_bit_identically(tmp_path):
  run, ref = str(tmp_path / "run"), str(tmp_path / "ref")
  first = interrupt(run, tmp_path / "logs1", target="launcher", when="steps")
  # Resumed from `first`, and told before its first step (the sync point is this run's step 1).
  last = interrupt(run, tmp_path / "logs2", target="process 1", when="restored")
  assert first < last <= first + 2
  done = subprocess.run(launcher(ref, tmp_path / "ref_logs", steps=last), env=job_env(),
                        cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]

  ref_losses, run_losses = losses_by_step(ref), losses_by_step(run)
  assert sorted(run_losses) == sorted(ref_losses) == list(range(1, last + 1))
  for step, values in run_losses.items():
    assert values == ref_losses[step], (step, values, ref_losses[step])  # each step once, exact
  ref_params, _, ref_step = checkpoint.load_params(ref)
  params, _, step = checkpoint.load_params(run)
  assert step == ref_step == last
  for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(params), strict=True):
    np.testing.assert_array_equal(a, b)
