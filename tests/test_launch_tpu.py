"""launch.tpu against a fake `gcloud` that records its argv: exact commands, quoting, bad input.

The fake is the one stand-in (the real gcloud cannot run here). Remote `--command` strings are run
for real through `bash -c` on a fake worker home holding launch/worker.sh and a fake python.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from launch import tpu
from tests.fake_gcloud import Fake, as_bash_reads_it

REPO = Path(__file__).resolve().parents[1]
ZONE, PROJECT = "us-west4-a", "my-proj"
POD = ["--name=gemma-pod", f"--zone={ZONE}", f"--project={PROJECT}",
       "--accelerator_type=v5litepod-256", "--workdir=gs://my-bucket/runs/2b"]
PODS16 = ["--name=gemma-7b", f"--zone={ZONE}", f"--project={PROJECT}",
          "--accelerator_type=v5litepod-256", "--slices=16", "--provisioning=spot",
          "--workdir=gs://my-bucket/runs/7b"]
WHERE = [f"--zone={ZONE}", f"--project={PROJECT}"]
HOSTILE = ["--config.train.name=my run; rm -rf /", "it's \"quoted\"", "$(touch pwned)",
           "`touch pwned2`", "line1\nline2", "$HOME * ~", "--x=a|b&c>d", "", "-"]

@pytest.fixture
def fake(tmp_path, monkeypatch):
  return Fake(tmp_path, monkeypatch)


def run_main(args: list[str], capsys) -> tuple[int, str, str]:
  rc = tpu.main(args)
  out, err = capsys.readouterr()
  return rc, out, err


def ssh(node: str, worker: str, command: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", node, *WHERE, f"--worker={worker}",
          f"--command={command}"]


BUCKET = ["gcloud", "storage", "buckets", "describe", "gs://my-bucket", "--format=value(name)",
          f"--project={PROJECT}"]


# ---------------------------------------------------------------------------- create / delete

def test_create_one_pod_exact_commands(fake, capsys):
  fake.rules([{"match": ["describe", "gemma-pod"], "stdout": "READY\n"}])
  rc, _, err = run_main(["create", *POD], capsys)
  assert rc == 0, err
  assert fake.calls() == [
      BUCKET,
      ["gcloud", "compute", "tpus", "tpu-vm", "create", "gemma-pod", *WHERE,
       "--accelerator-type=v5litepod-256", "--version=v2-alpha-tpuv5-lite"],
      ["gcloud", "compute", "tpus", "tpu-vm", "describe", "gemma-pod", *WHERE,
       "--format=value(state)"],
  ]


def test_create_16_pods_is_one_queued_resource(fake, capsys):
  fake.rules([{"match": ["queued-resources", "describe"], "stdout": "ACTIVE\n"}])
  rc, _, err = run_main(["create", *PODS16], capsys)
  assert rc == 0, err
  assert fake.calls() == [
      ["gcloud", "storage", "buckets", "describe", "gs://my-bucket", "--format=value(name)",
       f"--project={PROJECT}"],
      ["gcloud", "compute", "tpus", "queued-resources", "create", "gemma-7b", *WHERE,
       "--accelerator-type=v5litepod-256", "--runtime-version=v2-alpha-tpuv5-lite",
       "--node-count=16", "--node-prefix=gemma-7b", "--spot"],
      ["gcloud", "compute", "tpus", "queued-resources", "describe", "gemma-7b", *WHERE,
       "--format=value(state.state)"],
  ]


@pytest.mark.parametrize("accel,runtime", [("v5p-128", "v2-alpha-tpuv5"),
                                           ("v4-32", "tpu-ubuntu2204-base"),
                                           ("v6e-256", "v2-alpha-tpuv6e"),
                                           ("v5e-16", "v2-alpha-tpuv5-lite")])
def test_runtime_version_follows_accelerator_type(accel, runtime):
  s = tpu.validate(tpu.Settings(name="t", zone=ZONE, accelerator_type=accel,
                                provisioning="reserved"))
  cmd = tpu.create_cmd(s)
  assert f"--version={runtime}" in cmd and cmd[-1] == "--reserved"
  assert cmd[cmd.index("create") + 1:][1:3] == [f"--zone={ZONE}",
                                                 f"--accelerator-type={s.accelerator_type}"]


def test_delete_exact_commands(fake, capsys):
  assert run_main(["delete", *POD], capsys)[0] == 0
  assert run_main(["delete", *PODS16], capsys)[0] == 0
  assert fake.calls() == [
      ["gcloud", "compute", "tpus", "tpu-vm", "delete", "gemma-pod", *WHERE, "--quiet"],
      ["gcloud", "compute", "tpus", "queued-resources", "delete", "gemma-7b", *WHERE, "--force",
       "--quiet"],
  ]


# ---------------------------------------------------------------------------- setup

def test_setup_one_pod_copies_source_and_installs_once(fake, capsys, tmp_path):
  fake.rules([{"match": ["describe"], "stdout": "READY\n"}])
  tarball = tmp_path / "src.tar.gz"
  rc, _, err = run_main(["setup", *POD, f"--tarball={tarball}"], capsys)
  assert rc == 0, err
  calls = fake.calls()
  assert calls[0] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "gemma-pod", *WHERE,
                      "--format=value(state)"]
  assert calls[1] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", str(tarball),
                      "gemma-pod:maxgemma-src.tar.gz", *WHERE, "--worker=all"]
  assert calls[2][:-1] == ssh("gemma-pod", "all", "")[:-1] and len(calls) == 3
  command = calls[2][-1].removeprefix("--command=")
  s = tpu.validate(tpu.Settings(name="gemma-pod", zone=ZONE, accelerator_type="v5litepod-256"))
  stamp = f".venv/.maxgemma-setup-{tpu.requirements_hash(s)}"
  assert command.startswith("set -e; mkdir -p maxgemma; tar -xzf maxgemma-src.tar.gz -C maxgemma; "
                            f"cd maxgemma; if [ -f {stamp} ]; then")
  assert f"touch {stamp}" in command and "--python 3.11 .venv" in command
  with tarfile.open(tarball) as tar:
    names = tar.getnames()
  assert {"launch/worker.sh", "launch/tpu.py", "maxgemma/distributed.py",
          "requirements.txt", "pyproject.toml"} <= set(names)
  assert not [n for n in names if "__pycache__" in n or n.startswith((".venv", "tests"))]


def test_setup_skips_install_when_stamp_exists(tmp_path):
  """The idempotence check, run for real: with the stamp present nothing is installed."""
  s = tpu.validate(tpu.Settings(name="p", zone=ZONE, accelerator_type="v5litepod-8"))
  home = tmp_path / "home"
  home.mkdir()
  tpu.source_tarball(str(home / tpu.REMOTE_TARBALL))
  stamp = home / "maxgemma" / ".venv" / f".maxgemma-setup-{tpu.requirements_hash(s)}"
  stamp.parent.mkdir(parents=True)
  stamp.touch()
  res = subprocess.run(["bash", "-c", tpu.setup_command(s, tpu.requirements_hash(s))], cwd=home,
                       capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}, timeout=60)
  assert res.returncode == 0, res.stderr
  assert "requirements already installed" in res.stdout
  assert (home / "maxgemma" / "launch" / "worker.sh").exists()


def test_setup_16_pods_covers_every_node(fake, capsys, tmp_path):
  fake.rules([{"match": ["describe"], "stdout": "ACTIVE\n"}])
  rc, _, err = run_main(["setup", *PODS16, f"--tarball={tmp_path / 's.tgz'}"], capsys)
  assert rc == 0, err
  calls = fake.calls()
  assert calls[0][4:6] == ["describe", "gemma-7b"]
  scps = [c for c in calls if c[4] == "scp"]
  sshs = [c for c in calls if c[4] == "ssh"]
  nodes = [f"gemma-7b-{i}" for i in range(16)]
  assert sorted(c[6] for c in scps) == sorted(f"{n}:maxgemma-src.tar.gz" for n in nodes)
  assert sorted(c[5] for c in sshs) == sorted(nodes)
  assert all(c[-2] == "--worker=all" for c in sshs) and len(calls) == 33
  for node in nodes:  # on each node the copy comes before the install
    order = [i for i, c in enumerate(calls) if node in (c[5], c[6].split(":")[0])]
    assert [calls[i][4] for i in order] == ["scp", "ssh"]


# ---------------------------------------------------------------------------- run

def fake_worker_home(tmp_path: Path, exit_code: int = 0, sleep: float = 0.0,
                     ignore_sigterm: bool = False) -> Path:
  """A worker's home: ~/maxgemma/launch/worker.sh and a fake .venv/bin/python echoing its argv."""
  home = tmp_path / "worker"
  (home / "maxgemma" / "launch").mkdir(parents=True)
  (home / "maxgemma" / ".venv" / "bin").mkdir(parents=True)
  shutil.copy(REPO / "launch" / "worker.sh", home / "maxgemma" / "launch" / "worker.sh")
  python = home / "maxgemma" / ".venv" / "bin" / "python"
  python.write_text(
      f"#!{sys.executable}\nimport json, os, signal, sys, time\n"
      + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if ignore_sigterm else "") +
      "print(json.dumps({'argv': sys.argv[1:], 'env': {k: v for k, v in os.environ.items() "
      "if k.startswith(('MAXGEMMA', 'NOTE'))}}), flush=True)\n"
      f"time.sleep({sleep})\nsys.exit({exit_code})\n")
  python.chmod(0o755)
  return home


def on_worker(home: Path, command: str) -> subprocess.CompletedProcess:
  """Runs a recorded `--command=` string the way the worker's shell would."""
  return subprocess.run(["bash", "-c", command.removeprefix("--command=")], cwd=home,
                        capture_output=True, text=True, timeout=60)


def test_run_one_pod_hostile_arguments_arrive_intact(fake, capsys, tmp_path):
  fake.rules([{"match": ["worker.sh stream"], "rc": 0}])
  rc, _, err = run_main(["run", *POD, "--config=configs/my config.py",
                         "--env=NOTE=x; $(touch pwned3)", "--", *HOSTILE], capsys)
  assert rc == 0, err
  calls = fake.calls()
  prefix = "cd maxgemma && "
  assert calls[:2] == [BUCKET, calls[1]] and len(calls) == 3
  assert calls[1][:-1] == ssh("gemma-pod", "all", "")[:-1]
  assert calls[2] == ssh("gemma-pod", "0", prefix + "bash launch/worker.sh stream train")
  start = calls[1][-1].removeprefix("--command=")
  assert start.startswith(prefix + "bash launch/worker.sh start train env "
                          "MAXGEMMA_COORDINATOR=auto 'NOTE=x; $(touch pwned3)' "
                          ".venv/bin/python -m maxgemma.train '--config=configs/my config.py' "
                          "--workdir=gs://my-bucket/runs/2b '--config.train.name=my run; rm -rf /'")

  # Run it as the worker's shell would: the trainer must see each argument as one argv element.
  home = fake_worker_home(tmp_path, exit_code=0)
  res = on_worker(home, start)
  assert res.returncode == 0, res.stderr
  streamed = on_worker(home, calls[2][-1])
  assert streamed.returncode == 0, streamed.stderr
  seen = json.loads(streamed.stdout.strip().splitlines()[-1])
  assert seen["argv"] == ["-m", "maxgemma.train", "--config=configs/my config.py",
                          "--workdir=gs://my-bucket/runs/2b", *HOSTILE]
  assert seen["env"] == {"MAXGEMMA_COORDINATOR": "auto", "NOTE": "x; $(touch pwned3)"}
  leftovers = {p.name for p in home.rglob("*")}
  assert not {"pwned", "pwned2", "pwned3"} & leftovers


def test_run_16_pods_starts_every_node_and_streams_node0(fake, capsys, tmp_path):
  fake.rules([{"match": ["worker.sh stream"], "rc": 0}])
  rc, _, err = run_main(["run", *PODS16, "--", *HOSTILE], capsys)
  assert rc == 0, err
  calls = fake.calls()
  starts = [c for c in calls if "worker.sh start" in c[-1]]
  assert sorted(c[5] for c in starts) == sorted(f"gemma-7b-{i}" for i in range(16))
  assert all(c[-2] == "--worker=all" for c in starts)
  assert len({c[-1] for c in starts}) == 1  # the same command on every slice
  assert calls[-1][5:8] == ["gemma-7b-0", *WHERE] and calls[-1][-2] == "--worker=0"
  assert calls[-1][-1].endswith("bash launch/worker.sh stream train")
  home = fake_worker_home(tmp_path, exit_code=5)
  assert on_worker(home, starts[0][-1]).returncode == 0
  streamed = on_worker(home, calls[-1][-1])
  assert streamed.returncode == 5  # the trainer's exit code comes back through the stream
  assert json.loads(streamed.stdout.strip())["argv"][2:] == ["--workdir=gs://my-bucket/runs/7b",
                                                             *HOSTILE]


def test_worker_stop_ends_the_run_and_refuses_double_start(tmp_path):
  s = tpu.validate(tpu.Settings(name="p", zone=ZONE, accelerator_type="v5litepod-16"))
  home = fake_worker_home(tmp_path, sleep=60)
  assert on_worker(home, tpu.start_command(s, [])).returncode == 0
  again = on_worker(home, tpu.start_command(s, []))
  assert again.returncode == 3 and "still active" in again.stderr
  assert "train running" in on_worker(home, tpu.status_command(s)).stdout
  assert "stopped train" in on_worker(home, tpu.stop_command(s)).stdout
  streamed = on_worker(home, tpu.stream_command(s))  # returns once the run is gone
  assert streamed.returncode == 255
  assert "stopped or killed" in on_worker(home, tpu.status_command(s)).stdout
  empty = tmp_path / "not-set-up"
  empty.mkdir()
  assert on_worker(empty, tpu.start_command(s, [])).returncode != 0  # no ~/maxgemma: fails


def test_worker_stop_kills_a_trainer_that_ignores_sigterm(tmp_path):
  """jax catches SIGTERM (a preemption notice): stop must still end the run."""
  s = tpu.validate(tpu.Settings(name="p", zone=ZONE, accelerator_type="v5litepod-16"))
  home = fake_worker_home(tmp_path, sleep=60, ignore_sigterm=True)
  assert on_worker(home, tpu.start_command(s, [])).returncode == 0
  time.sleep(0.5)  # let the fake trainer install its handler
  stopped = on_worker(home, tpu.stop_command(s, grace_s=1))
  assert "ignored SIGTERM for 1s: sent SIGKILL" in stopped.stdout, stopped
  status = on_worker(home, tpu.status_command(s)).stdout
  assert "running" not in status, status


def test_start_failure_points_at_setup(fake, capsys):
  fake.rules([{"match": ["worker.sh start"], "rc": 1}])
  rc, _, err = run_main(["run", *POD], capsys)
  assert rc == 2 and "starting the trainer failed on gemma-pod" in err and "setup" in err
  assert not [c for c in fake.calls() if "worker.sh stream" in c[-1]]


def test_run_trainer_failure_is_reported_with_its_code(fake, capsys):
  fake.rules([{"match": ["worker.sh stream"], "rc": 3},
              {"match": ["describe"], "stdout": "READY\n"}])
  rc, _, err = run_main(["run", *POD], capsys)
  assert rc == 3
  assert "trainer exited with code 3 on worker 0; TPU gemma-pod is READY, not preempted" in err


def test_run_restarts_after_preemption(fake, capsys, tmp_path):
  fake.rules([{"match": ["worker.sh stream"], "rc": 255, "times": 1},
              {"match": ["tpu-vm describe"], "stdout": "PREEMPTED\n", "times": 1},
              {"match": ["tpu-vm describe"], "stdout": "READY\n"}])
  rc, _, err = run_main(["run", *POD, "--provisioning=spot", "--restart_on_preemption",
                         "--poll_s=0", f"--tarball={tmp_path / 's.tgz'}", "--", "--a=1"], capsys)
  assert rc == 0, err
  kinds = [c[4] if c[1] != "storage" else "bucket" for c in fake.calls()]
  assert kinds == ["bucket", "ssh", "ssh", "describe",  # run, stream lost, state: PREEMPTED
                   "delete", "bucket", "create", "describe",  # recreate
                   "describe", "scp", "ssh",  # setup
                   "ssh", "ssh"]  # run again, stream OK
  assert "--spot" in fake.calls()[6]
  assert "was preempted (PREEMPTED): recreating it and resuming from gs://my-bucket/runs/2b" in err


def test_preempted_without_restart_flag_says_what_to_do(fake, capsys):
  fake.rules([{"match": ["worker.sh stream"], "rc": 255},
              {"match": ["queued-resources describe"], "stdout": "SUSPENDED\n"}])
  rc, _, err = run_main(["run", *PODS16], capsys)
  assert rc == 2
  assert ("TPU gemma-7b was preempted (SUSPENDED): re-run with --restart_on_preemption; to "
          "recreate by hand: gcloud compute tpus queued-resources delete gemma-7b") in err


# ---------------------------------------------------------------------------- status/logs/stop

def test_status_logs_stop_commands(fake, capsys):
  fake.rules([{"match": ["describe"], "stdout": "READY\n"}])
  assert run_main(["status", *POD], capsys)[0] == 0
  assert run_main(["logs", *POD, "--worker=3", "--lines=20", "--follow"], capsys)[0] == 0
  assert run_main(["stop", *PODS16], capsys)[0] == 0
  calls = fake.calls()
  prefix = "cd maxgemma && "
  assert calls[1] == ssh("gemma-pod", "all", prefix + "bash launch/worker.sh status train")
  assert calls[2] == ssh("gemma-pod", "3", prefix + "bash launch/worker.sh logs train 20 follow")
  stops = calls[3:]
  assert sorted(c[5] for c in stops) == sorted(f"gemma-7b-{i}" for i in range(16))
  assert {c[-1] for c in stops} == {f"--command={prefix}bash launch/worker.sh stop train 30"}


# ---------------------------------------------------------------------------- dry run, settings

def test_dry_run_prints_the_commands_and_runs_nothing(fake, capsys, monkeypatch, tmp_path):
  fake.rules([{"match": ["worker.sh stream"], "rc": 0}])
  assert run_main(["run", *PODS16, "--", *HOSTILE], capsys)[0] == 0
  real = fake.calls()
  fake.log.unlink()
  monkeypatch.setenv("PATH", "/nonexistent")  # no gcloud at all: a dry run does not need it
  rc, out, _ = run_main(["run", *PODS16, "--dry_run", "--", *HOSTILE], capsys)
  assert rc == 0 and fake.calls() == []
  printed = [as_bash_reads_it(line) for line in out.splitlines()]
  # Same commands (the real run starts nodes in parallel; the dry run adds the final state check).
  assert sorted(map(tuple, printed[:-1])) == sorted(map(tuple, real))
  assert printed[-1][4] == "describe"


def test_printed_lines_paste_back_as_the_same_argv():
  argv = ["gcloud", "x", "a\nb", "it's \\ \"q\" \u00e9\t\x7f", "", "$(id)", "plain"]
  line = tpu.command_line(argv)
  assert "\n" not in line and as_bash_reads_it(line) == argv


def test_settings_file_toml_and_flags_override(fake, capsys, tmp_path):
  path = tmp_path / "pod.toml"
  path.write_text('name = "from-file"\nzone = "europe-west4-b"\naccelerator_type = "v5e-256"\n'
                  'slices = 2\nprovisioning = "spot"\n[env]\nLIBTPU_INIT_ARGS = "--xla_a=1"\n')
  rc, out, err = run_main(["create", f"--settings={path}", "--name=from-flag", "--dry_run"], capsys)
  assert rc == 0, err
  assert out.splitlines() == [
      "gcloud compute tpus queued-resources create from-flag --zone=europe-west4-b "
      "--accelerator-type=v5litepod-256 --runtime-version=v2-alpha-tpuv5-lite --node-count=2 "
      "--node-prefix=from-flag --spot",
      "gcloud compute tpus queued-resources describe from-flag --zone=europe-west4-b "
      "'--format=value(state.state)'"]
  path.write_text('nmae = "x"\n')
  rc, _, err = run_main(["create", f"--settings={path}"], capsys)
  assert rc == 2 and "unknown setting 'nmae'" in err and "did you mean 'name'" in err


# ---------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("extra,message", [
    (["--accelerator_type=v5litepod-300"], "has no slice of 300 chips: use v5litepod-{1,4,8,"),
    (["--accelerator_type=tpu9-8"], "unknown accelerator type 'tpu9-8': known types are "
                                    "v5litepod-{1,4,8,16,32,64,128,256} (v5e, chips); v6e-"),
    (["--slices=0"], "--slices=0: need at least 1 slice"),
    (["--accelerator_type=v3-32", "--slices=2"], "v3-32 (v3) does not support multislice"),
    (["--name=Bad_Name"], "TPU name 'Bad_Name' is invalid"),
    (["--workdir=gs://"], "has no bucket"),
])
def test_bad_input_is_refused_before_any_gcloud_call(fake, capsys, extra, message):
  rc, _, err = run_main(["create", *POD, *extra], capsys)
  assert rc == 2 and message in err, err
  assert len(err.strip().splitlines()) == 1
  assert fake.calls() == []


def test_missing_gcloud(monkeypatch, capsys, tmp_path):
  monkeypatch.setenv("PATH", str(tmp_path))
  rc, _, err = run_main(["create", *POD], capsys)
  assert rc == 2 and "gcloud is not on PATH: install the Google Cloud CLI" in err


def test_missing_bucket_stops_before_create(fake, capsys):
  fake.rules([{"match": ["buckets describe"], "rc": 1, "stderr":
               "ERROR: (gcloud.storage.buckets.describe) gs://my-bucket not found: 404.\n"}])
  rc, _, err = run_main(["create", *PODS16], capsys)
  assert rc == 2
  assert ("bucket gs://my-bucket of --workdir=gs://my-bucket/runs/7b does not exist or is not "
          "accessible (ERROR: (gcloud.storage.buckets.describe) gs://my-bucket not found: 404.): "
          "create it with `gcloud storage buckets create gs://my-bucket") in err
  assert [c[1] for c in fake.calls()] == ["storage"]  # nothing was created


def test_create_failing_midway_names_the_delete_command(fake, capsys):
  fake.rules([{"match": ["queued-resources describe"], "stdout": "FAILED\n"}])
  rc, _, err = run_main(["create", *PODS16, "--poll_s=0"], capsys)
  assert rc == 2
  assert ("TPU gemma-7b is FAILED, not ACTIVE; delete what was created with: gcloud compute tpus "
          "queued-resources delete gemma-7b --zone=us-west4-a --project=my-proj --force --quiet"
          ) in err
  fake.rules([{"match": ["tpu-vm create"], "rc": 1}])
  rc, _, err = run_main(["create", *POD], capsys)
  assert rc == 2 and ("creating gemma-pod failed (exit code 1); if part of it was created, delete "
                      "what was created with: gcloud compute tpus tpu-vm delete gemma-pod") in err


def test_restart_needs_a_bucket_workdir(fake, capsys):
  rc, _, err = run_main(["run", *POD[:-1], "--workdir=/tmp/run", "--restart_on_preemption"], capsys)
  assert rc == 2 and "--restart_on_preemption needs a gs:// --workdir" in err
  assert fake.calls() == []


def test_trainer_args_only_for_run(fake, capsys):
  rc, _, err = run_main(["create", *POD, "--", "--x=1"], capsys)
  assert rc == 2 and "only `run` takes them" in err


def test_no_jax_import_under_launch():
  """A laptop without jax must run launch.tpu: importing it must not pull jax in."""
  code = ("import sys; import launch.tpu, launch.local; "
          "sys.exit(1 if any(m == 'jax' or m.startswith('jax.') for m in sys.modules) else 0)")
  res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
  assert res.returncode == 0, res.stderr
  for path in (REPO / "launch").rglob("*.py"):
    assert "import jax" not in path.read_text(), path
