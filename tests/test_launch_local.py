"""launch.local with real processes and real jax.distributed (gloo over 127.0.0.1).

The probe module (tests/multiproc_probe.py) stands in for the trainer: it joins the job through
maxgemma.distributed.initialize and checks a sum over all P x D devices.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import local

REPO = Path(__file__).resolve().parents[1]


def launch(tmp_path: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if not k.startswith("MAXGEMMA_")}
  return subprocess.run([sys.executable, "-m", "launch.local", f"--log_dir={tmp_path}", *args],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_two_processes_four_devices_sum_across_processes(tmp_path):
  res = launch(tmp_path, "--processes=2", "--devices_per_process=4",
               "--module=tests.multiproc_probe", "--", "--echo=a b; $(touch pwned)")
  assert res.returncode == 0, res.stdout + res.stderr
  out = res.stdout
  assert "[p0] PROBE echo 'a b; $(touch pwned)'" in out  # arguments reach the module intact
  assert "[p0] PROBE process 0 of 2: 4 local / 8 global cpu devices, explicit" in out
  assert "[p0] PROBE ok process=0 processes=2 devices=8 sum=36 psum=36 expected=36" in out
  assert "all 2 processes finished OK" in out
  log1 = (tmp_path / "process_1.log").read_text()
  assert "PROBE process 1 of 2: 4 local / 8 global cpu devices" in log1
  assert "PROBE ok process=1 processes=2 devices=8 sum=36 psum=36" in log1
  assert "[p0]" not in log1 and "PROBE ok process=0" in (tmp_path / "process_0.log").read_text()


def test_a_dying_process_stops_the_others(tmp_path):
  """Process 1 exits with 7 right after joining; process 0 would wait forever in the collective."""
  start = time.monotonic()
  res = launch(tmp_path, "--processes=2", "--devices_per_process=2",
               "--grace_s=1", "--module=tests.multiproc_probe", "--", "--fail_process=1",
               "--fail_code=7", timeout=90)
  assert res.returncode == 7, res.stdout + res.stderr
  log1 = tmp_path / "process_1.log"
  assert (f"launch.local: error: process 1 exited with code 7 (log: {log1}); stopped the other 1 "
          "running process(es)") in res.stderr
  assert "PROBE process 1 exiting with code 7" in res.stderr  # the tail of its log is shown
  assert "PROBE ok" not in res.stdout
  assert time.monotonic() - start < 45


def start_sleepers(tmp_path: Path, *extra: str, launcher: tuple[str, ...] = ()
                   ) -> tuple[subprocess.Popen, dict[int, int]]:
  """launch.local with 2 sleeping probe processes; returns it and {process index: pid}."""
  proc = subprocess.Popen([sys.executable, "-m", "launch.local", "--processes=2",
                           f"--log_dir={tmp_path}", "--grace_s=2", *launcher,
                           "--module=tests.multiproc_probe", "--", "--sleep=120", *extra],
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  pids: dict[int, int] = {}
  deadline = time.monotonic() + 30
  while len(pids) < 2 and time.monotonic() < deadline:
    time.sleep(0.1)
    for i in range(2):
      log = tmp_path / f"process_{i}.log"
      text = log.read_text() if log.exists() else ""
      if "pid=" in text:
        pids[i] = int(text.split("pid=")[1].split()[0])
  assert len(pids) == 2, "the children did not start"
  return proc, pids


def assert_gone(pid: int) -> None:
  with pytest.raises(ProcessLookupError):
    os.kill(pid, 0)


def test_sigterm_stops_every_child(tmp_path):
  proc, pids = start_sleepers(tmp_path)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=30)
  assert proc.returncode == 128 + signal.SIGTERM
  assert "got SIGTERM: forwarded SIGTERM to 2 running process(es)" in err
  assert ("after SIGTERM: process 0 was killed by SIGTERM, process 1 was killed by SIGTERM"
          in err), err
  for pid in pids.values():
    assert_gone(pid)


@pytest.mark.parametrize("codes,rc", [("0,0", 0), ("0,3", 3)])
def test_sigterm_is_forwarded_and_exit_codes_reported(tmp_path, codes, rc):
  """Children that handle SIGTERM (as the trainer saves and exits) decide the launcher's code."""
  proc, pids = start_sleepers(tmp_path, f"--sigterm_codes={codes}")
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=30)
  c0, c1 = codes.split(",")
  assert proc.returncode == rc, err
  assert (f"after SIGTERM: process 0 exited with code {c0}, process 1 exited with code {c1}"
          in err), err
  for pid in pids.values():
    assert_gone(pid)


def test_a_child_ignoring_sigterm_is_killed_after_signal_grace(tmp_path):
  proc, pids = start_sleepers(tmp_path, "--sigterm_codes=0,ignore",
                              launcher=("--signal_grace_s=1",))
  start = time.monotonic()
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=30)
  assert proc.returncode == 128 + signal.SIGTERM
  assert "process 0 exited with code 0, process 1 was killed by SIGKILL" in err, err
  assert time.monotonic() - start < 20
  assert_gone(pids[1])


def test_a_second_signal_kills_at_once(tmp_path):
  proc, pids = start_sleepers(tmp_path, "--sigterm_codes=ignore,ignore")
  proc.send_signal(signal.SIGINT)
  time.sleep(0.5)
  start = time.monotonic()
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=30)
  assert time.monotonic() - start < 10  # not the default 120 s of --signal_grace_s
  assert proc.returncode == 128 + signal.SIGINT
  assert ("got SIGINT: forwarded SIGTERM" in err and
          "process 0 was killed by SIGKILL, process 1 was killed by SIGKILL" in err), err
  for pid in pids.values():
    assert_gone(pid)


def test_a_killed_process_stops_the_others(tmp_path):
  proc, pids = start_sleepers(tmp_path)
  os.kill(pids[1], signal.SIGKILL)
  _, err = proc.communicate(timeout=30)
  assert proc.returncode == 1
  assert (f"process 1 was killed by SIGKILL (log: {tmp_path / 'process_1.log'}); stopped the "
          "other 1 running process(es)") in err
  assert_gone(pids[0])


def test_timeout_never_hangs(tmp_path):
  res = launch(tmp_path, "--processes=1", "--timeout=1", "--module=tests.multiproc_probe", "--",
               "--sleep=60", timeout=30)
  assert res.returncode == 124 and "timed out after 1s: stopped 1 running process(es)" in res.stderr


def test_child_environment():
  env = local.child_env({"XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=8",
                         "KEEP": "x"}, port=1234, processes=3, process_id=2, devices=4)
  assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=4"
  assert (env["MAXGEMMA_COORDINATOR"], env["MAXGEMMA_NUM_PROCESSES"],
          env["MAXGEMMA_PROCESS_ID"]) == ("127.0.0.1:1234", "3", "2")
  assert env["JAX_PLATFORMS"] == "cpu" and env["KEEP"] == "x"


@pytest.mark.parametrize("args,message", [
    (["--processes=0"], "--processes=0: need at least 1 process"),
    (["--processes=2", "--devices_per_process=0"], "need at least 1 device"),
    (["--processes=2", "--port=70000"], "--port=70000 is not a TCP port"),
    (["--processes=2", "--signal_grace_s=-1"], "--signal_grace_s=-1 is negative"),
])
def test_bad_launcher_flags(args, message, capsys):
  assert local.main(args) == 2
  assert message in capsys.readouterr().err
