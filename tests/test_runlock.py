"""One trainer per workdir (maxgemma/runlock.py), on local disk and on gs:// (the local GCS server).

Holders are real processes: a trainer, or a small process taking the lock the way the trainer does
(`HOLD`), killed with SIGKILL to leave the lock behind as a crashed run would.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from maxgemma import runlock
from tests import gcs_utils
from tests.train_utils import ROOT, env, logged, train_command

HOLD = ("import sys, time; from maxgemma import runlock; "
        "runlock.acquire(sys.argv[1], stale_s=float(sys.argv[2])); print('held', flush=True); "
        "time.sleep(600)")
REFUSED = re.compile(r"^maxgemma\.train: error: --workdir=(\S+) is in use by another run \(host "
                     r"(\S+), pid (\d+), started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC[^)]*\); stop "
                     r"that run or let it finish, or use another --workdir", re.M)


@pytest.fixture(scope="module")
def gcs():
  with gcs_utils.emulator() as e:
    yield e


def start_holder(workdir: str, stale_s: float = 60.0) -> subprocess.Popen:
  proc = subprocess.Popen([sys.executable, "-c", HOLD, workdir, str(stale_s)], cwd=ROOT,
                          env=env(), stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "held"
  return proc


def kill9(proc: subprocess.Popen) -> None:
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=30)


def refused_by(stderr: str) -> tuple[str, int]:
  """(workdir, pid) of the one refusal line in a trainer's stderr; no traceback."""
  lines = [line for line in stderr.splitlines() if line.startswith("maxgemma.train: error:")]
  assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
  m = REFUSED.match(lines[0])
  assert m, lines[0]
  return m.group(1), int(m.group(3))


def workdirs(tmp_path, name):
  return [str(tmp_path / name), f"gs://{gcs_utils.BUCKET}/{tmp_path.name}/{name}"]


@pytest.mark.parametrize("where", ["local", "gs"])
def test_second_lock_refused_until_released(where, tmp_path, request):
  if where == "gs":
    request.getfixturevalue("gcs")
  workdir = workdirs(tmp_path, "w")[where == "gs"]
  first = runlock.acquire(workdir, stale_s=60)
  with pytest.raises(runlock.RunLockError, match=rf"in use by another run \(host \S+, pid "
                                                 rf"{os.getpid()}, started "):
    runlock.acquire(workdir, stale_s=60)
  first.release()
  runlock.acquire(workdir, stale_s=60).release()  # free again after a clean release


def test_local_lock_of_a_killed_holder_is_free_at_once(tmp_path):
  workdir = str(tmp_path / "w")
  holder = start_holder(workdir)
  with pytest.raises(runlock.RunLockError, match=f"pid {holder.pid},"):
    runlock.acquire(workdir, stale_s=60)
  kill9(holder)
  runlock.acquire(workdir, stale_s=60).release()  # the kernel dropped the flock


def test_gcs_lock_of_a_killed_holder_is_taken_after_the_stale_timeout(gcs, tmp_path):
  workdir = workdirs(tmp_path, "w")[1]
  stale_s = 2.0
  holder = start_holder(workdir, stale_s)
  time.sleep(stale_s * 1.5)  # heartbeats keep a live holder's lock fresh past the timeout
  with pytest.raises(runlock.RunLockError, match=rf"pid {holder.pid},.*last heartbeat \d+s ago"):
    runlock.acquire(workdir, stale_s=stale_s)
  kill9(holder)
  deadline = time.monotonic() + stale_s + 10
  while True:
    try:
      lock = runlock.acquire(workdir, stale_s=stale_s)
      break
    except runlock.RunLockError:
      assert time.monotonic() < deadline, "the dead holder's lock was never taken over"
      time.sleep(0.5)
  lock.release()


def test_a_second_trainer_is_refused_with_one_line(tmp_path):
  """A live trainer holds the workdir; a second one stops at start; after a kill -9 of the
  first, a new trainer resumes from its checkpoint."""
  workdir = str(tmp_path / "run")
  args = ("--config.train.steps=1000", "--config.checkpoint.every=2")
  first = subprocess.Popen(train_command(workdir, *args), env=env(4), cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.monotonic() + 240
    while len(logged(workdir)) < 2 and first.poll() is None and time.monotonic() < deadline:
      time.sleep(0.1)
    assert first.poll() is None and len(logged(workdir)) >= 2, "the first trainer did not train"
    second = subprocess.run(train_command(workdir, *args), env=env(4), cwd=ROOT,
                            capture_output=True, text=True, timeout=240)
    assert second.returncode == 1
    assert refused_by(second.stderr) == (workdir, first.pid)
    assert first.poll() is None  # the running trainer is untouched
  finally:
    kill9(first)
  third = subprocess.run(train_command(workdir, "--config.train.steps=4",
                                       "--config.checkpoint.every=2"),
                         env=env(4), cwd=ROOT, capture_output=True, text=True, timeout=240)
  assert third.returncode == 0, third.stderr[-3000:]


def test_trainers_on_a_gcs_workdir_in_use_are_refused_in_every_process(gcs, tmp_path):
  """One process, and a 2-process launch.local job (all processes exit with the same line)."""
  workdir = workdirs(tmp_path, "run")[1]
  holder = start_holder(workdir)
  try:
    single = subprocess.run(train_command(workdir), env=env(2), cwd=ROOT, capture_output=True,
                            text=True, timeout=240)
    assert single.returncode == 1 and refused_by(single.stderr) == (workdir, holder.pid)

    logs = tmp_path / "logs"
    job = subprocess.run([sys.executable, "-m", "launch.local", "--processes=2",
                          "--devices_per_process=2", f"--log_dir={logs}", "--grace_s=30", "--",
                          *train_command(workdir)[3:]],
                         env={k: v for k, v in env().items() if not k.startswith("MAXGEMMA_")},
                         cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert job.returncode == 1, job.stdout[-2000:] + job.stderr[-2000:]
    for i in range(2):
      assert refused_by((logs / f"process_{i}.log").read_text()) == (workdir, holder.pid)
    assert not storage_files(workdir), "a refused run wrote into the workdir"
  finally:
    kill9(holder)


def storage_files(workdir: str) -> list[str]:
  """Names in the workdir other than the lock."""
  from maxgemma import storage

  return [p.name for p in storage.path(workdir).iterdir() if p.name != runlock.LOCK_NAME]
