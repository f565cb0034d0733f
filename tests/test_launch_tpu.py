"""launch.tpu against a fake `gcloud`: exact commands, quoting, bad input, and real operation.

The fake (tests/fake_gcloud.py) is the one stand-in (the real gcloud cannot run here). Canned
rules check the exact argv; its cloud model runs what the launcher sends: the startup script on
every boot of every worker (a scratch directory), `ssh --command` through bash there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import gcloud_argv, gcloud_run, startup, tpu, tpu_types
from tests.fake_gcloud import Fake, as_bash_reads_it

REPO = Path(__file__).resolve().parents[1]
ZONE, PROJECT = "us-west4-a", "my-proj"
POD = ["--name=gemma-pod", f"--zone={ZONE}", f"--project={PROJECT}",
       "--accelerator_type=v5litepod-256", "--workdir=gs://my-bucket/runs/2b"]
PODS16 = ["--name=gemma-7b", f"--zone={ZONE}", f"--project={PROJECT}",
          "--accelerator_type=v5litepod-256", "--slices=16", "--provisioning=spot",
          "--workdir=gs://my-bucket/runs/7b"]
# Small shapes for the cloud model: one worker per node.
ONE = ["--name=one", f"--zone={ZONE}", "--accelerator_type=v5litepod-8",
       "--workdir=gs://my-bucket/runs/one", "--poll_s=0.2"]
TWO = ["--name=two", f"--zone={ZONE}", "--accelerator_type=v5litepod-8", "--slices=2",
       "--workdir=gs://my-bucket/runs/two", "--poll_s=0.2"]
WHERE = [f"--zone={ZONE}", f"--project={PROJECT}"]
HOSTILE = ["--config.train.name=my run; rm -rf /", "it's \"quoted\"", "$(touch pwned)",
           "`touch pwned2`", "line1\nline2", "$HOME * ~", "--x=a|b&c>d", "", "-"]
SSH_TAIL = ["--strict-host-key-checking=no", "--ssh-flag=-oBatchMode=yes", "--quiet"]
CD = 'cd "${MAXGEMMA_HOME:-/opt/maxgemma}" && sudo -n '


@pytest.fixture
def fake(tmp_path, monkeypatch):
  f = Fake(tmp_path, monkeypatch)
  yield f
  if f.model is not None:
    f.model.kill_all()


def run_main(args: list[str], capsys) -> tuple[int, str, str]:
  rc = tpu.main(args)
  out, err = capsys.readouterr()
  return rc, out, err


def ssh(node: str, worker: str, command: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", node, *WHERE, f"--worker={worker}",
          f"--command={command}", *SSH_TAIL]


def settings(*args: str) -> gcloud_argv.Settings:
  opts = tpu.build_parser().parse_args(["status", *args])
  return tpu.settings_from(opts)


BUCKET = ["gcloud", "storage", "buckets", "describe", "gs://my-bucket", "--format=value(name)",
          f"--project={PROJECT}"]
NOT_FOUND = {"rc": 1, "times": 1, "stderr": "ERROR: NOT_FOUND: no such queued resource\n"}


# ---------------------------------------------------------------------------- create / delete

def test_create_one_pod_is_a_queued_resource_with_the_startup_script(fake, capsys, tmp_path):
  fake.rules([{"match": ["queued-resources describe"], **NOT_FOUND},
              {"match": ["queued-resources describe"], "stdout": "ACTIVE\n"}])
  tarball = tmp_path / "src.tgz"
  rc, _, err = run_main(["create", *POD, "--provisioning=spot", f"--tarball={tarball}", "--",
                         "--config.train.steps=7"], capsys)
  assert rc == 0, err
  calls = fake.calls()
  describe = ["gcloud", "compute", "tpus", "queued-resources", "describe", "gemma-pod", *WHERE,
              "--format=value(state.state)"]
  sha = hashlib.sha256(tarball.read_bytes()).hexdigest()
  uri = f"gs://my-bucket/runs/2b/launch/maxgemma-src-{sha[:16]}.tar.gz"
  script = calls[3][-1].removeprefix("--metadata-from-file=startup-script=")
  assert calls == [
      BUCKET, describe, ["gcloud", "storage", "cp", str(tarball), uri],
      ["gcloud", "compute", "tpus", "queued-resources", "create", "gemma-pod", *WHERE,
       "--accelerator-type=v5litepod-256", "--runtime-version=v2-alpha-tpuv5-lite",
       "--node-id=gemma-pod", "--spot", f"--metadata-from-file=startup-script={script}"],
      describe]
  text = Path(script).read_text()
  assert f"source_uri={uri}\n" in text and f"source_sha256={sha}\n" in text
  assert ("bash launch/worker.sh start train env MAXGEMMA_COORDINATOR=auto .venv/bin/python -m "
          "maxgemma.train --workdir=gs://my-bucket/runs/2b --config.train.steps=7 9>&-") in text


def test_create_16_pods_and_internal_ip(fake, capsys):
  rc, out, err = run_main(["create", *PODS16, "--provisioning=reserved", "--internal_ip",
                           "--dry_run"], capsys)
  assert rc == 0, err
  create = as_bash_reads_it(out.splitlines()[2])
  assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "gemma-7b"]
  assert create[8:14] == ["--accelerator-type=v5litepod-256",
                          "--runtime-version=v2-alpha-tpuv5-lite", "--node-count=16",
                          "--node-prefix=gemma-7b", "--reserved", "--internal-ips"]
  rc, out, _ = run_main(["status", *PODS16, "--internal_ip", "--dry_run"], capsys)
  sshs = [as_bash_reads_it(line) for line in out.splitlines() if " ssh " in line]
  assert len(sshs) == 16 and all("--internal-ip" in c for c in sshs)
  assert fake.calls() == []


def test_delete_exact_command(fake, capsys):
  assert run_main(["delete", *PODS16], capsys)[0] == 0
  assert fake.calls() == [["gcloud", "compute", "tpus", "queued-resources", "delete", "gemma-7b",
                           *WHERE, "--force", "--quiet"]]


# ---------------------------------------------------------------------------- the queue

def test_queue_is_waited_for_with_a_progress_line(fake, capsys):
  fake.cloud(queue=("ACCEPTED", "WAITING_FOR_RESOURCES", "WAITING_FOR_RESOURCES",
                    "PROVISIONING"))
  rc, _, err = run_main(["create", *ONE, "--poll_s=0.01"], capsys)
  assert rc == 0, err
  waits = [line for line in err.splitlines() if "waiting for ACTIVE" in line]
  assert [w.split(" is ")[1].split(" ")[0] for w in waits] == [
      "ACCEPTED", "WAITING_FOR_RESOURCES", "WAITING_FOR_RESOURCES", "PROVISIONING"]
  assert all("(waited " in w for w in waits)
  assert "one is ACTIVE: its startup script installs maxgemma" in err


def test_queue_timeout_says_how_to_delete(fake, capsys):
  fake.cloud(queue=("WAITING_FOR_RESOURCES",) * 50)
  rc, _, err = run_main(["create", *ONE, "--poll_s=0.05", "--wait_timeout_s=0.1"], capsys)
  assert rc == 2
  line = err.strip().splitlines()[-1]
  assert "queued resource one still WAITING_FOR_RESOURCES after" in line
  assert "delete it with: gcloud compute tpus queued-resources delete one" in line


@pytest.mark.parametrize("ended", ["FAILED", "SUSPENDED"])
def test_queue_that_ends_is_one_line_with_the_delete_command(fake, capsys, ended):
  fake.cloud(queue=("WAITING_FOR_RESOURCES", ended))
  rc, _, err = run_main(["create", *ONE, "--poll_s=0"], capsys)
  assert rc == 2
  errors = [line for line in err.splitlines() if "error:" in line]
  assert len(errors) == 1 and f"queued resource one is {ended}, not ACTIVE" in errors[0]
  assert ("the request stays until deleted: delete it with: gcloud compute tpus queued-resources "
          f"delete one --zone={ZONE} --force --quiet") in errors[0]


# ---------------------------------------------------------------------------- the startup script

def _script_env(cloud, home: Path) -> dict[str, str]:
  env = cloud.worker_env(home)
  env["FAKE_TRAINER_SLEEP"] = "30"
  return env


def test_startup_script_installs_and_starts_the_exact_arguments_once(fake, tmp_path):
  cloud = fake.cloud()
  tarball = tmp_path / "src.tar.gz"
  tarball.write_bytes(gcloud_argv.source_tarball())
  sha = hashlib.sha256(tarball.read_bytes()).hexdigest()
  s = settings(*TWO[:-1], "--config=configs/my config.py", "--env=NOTE=x; $(touch pwned3)")
  text = startup.startup_script(s, HOSTILE, str(tarball), sha)
  path = tmp_path / "startup.sh"
  path.write_text(text)
  assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
  home = tmp_path / "worker"
  home.mkdir()
  env = _script_env(cloud, home)
  boot = subprocess.run(["bash", str(path)], cwd=tmp_path, env=env, timeout=60,
                        capture_output=True, text=True)
  assert boot.returncode == 0, (home / "logs" / "boot.log").read_text()
  for _ in range(100):  # the trainer's first line
    if (home / "logs" / "train.log").exists() and (home / "logs" / "train.log").read_text():
      break
    time.sleep(0.05)
  seen = json.loads((home / "logs" / "train.log").read_text().splitlines()[0])
  assert seen["argv"] == ["-m", "maxgemma.train", "--config=configs/my config.py",
                          "--workdir=gs://my-bucket/runs/two", *HOSTILE]
  assert seen["env"] == {"MAXGEMMA_COORDINATOR": "auto", "NOTE": "x; $(touch pwned3)"}
  assert (home / "launch" / "worker.sh").exists() and (home / "maxgemma" / "train.py").exists()
  pid = (home / "logs" / "train.pid").read_text()
  # A second boot: nothing reinstalled, no second trainer.
  again = subprocess.run(["bash", str(path)], cwd=tmp_path, env=env, timeout=60)
  assert again.returncode == 0
  assert (home / "logs" / "train.pid").read_text() == pid
  assert "already active here: no second trainer" in (home / "logs" / "boot.log").read_text()
  assert (home / "uv.calls").read_text().count("uv venv") == 1
  trainers = []
  for proc in Path("/proc").glob("[0-9]*"):
    try:
      args = (proc / "cmdline").read_bytes().split(b"\0")
      if (os.readlink(proc / "cwd") == str(home) and b"maxgemma.train" in args
          and not args[0].endswith(b"bash")):  # the trainer, not worker.sh's wrapper shell
        trainers.append(proc.name)
    except OSError:
      continue
  os.killpg(int(pid), 9)
  assert len(trainers) == 1, trainers
  assert not {"pwned", "pwned2", "pwned3"} & {p.name for p in tmp_path.rglob("*")}


def test_startup_script_refuses_a_source_with_another_hash(fake, tmp_path):
  cloud = fake.cloud()
  tarball = tmp_path / "src.tar.gz"
  tarball.write_bytes(gcloud_argv.source_tarball())
  path = tmp_path / "startup.sh"
  path.write_text(startup.startup_script(settings(*ONE[:-1]), [], str(tarball), "0" * 64))
  home = tmp_path / "worker"
  home.mkdir()
  res = subprocess.run(["bash", str(path)], cwd=tmp_path, env=_script_env(cloud, home), timeout=60)
  assert res.returncode == 1
  assert "does not have sha256 0000" in (home / "logs" / "boot.log").read_text()
  assert not (home / "maxgemma").exists() and not (home / "logs" / "train.pid").exists()


# ---------------------------------------------------------------------------- real operation

def _trainer_started(cloud, node: str, timeout: float = 10.0) -> dict:
  log = cloud.disk(node, 0) / "logs" / "train.log"
  end = time.monotonic() + timeout
  while time.monotonic() < end:
    if log.exists() and log.read_text().strip():
      return json.loads(log.read_text().splitlines()[0])
    time.sleep(0.05)
  raise AssertionError(f"no trainer on {node}")


def test_preempted_node_rebuilds_and_rejoins_without_ssh(fake, capsys, monkeypatch):
  monkeypatch.setenv("FAKE_TRAINER_SLEEP", "60")
  cloud = fake.cloud()
  rc, _, err = run_main(["create", *TWO, "--", "--a=1"], capsys)
  assert rc == 0, err
  for node in ("two-0", "two-1"):
    assert _trainer_started(cloud, node)["argv"][-1] == "--a=1"
  assert not [c for c in fake.calls() if "ssh" in c]  # started by the boots, not over ssh
  old_pid = (cloud.disk("two-1", 0) / "logs" / "train.pid").read_text()
  before = len(fake.calls())
  cloud.preempt("two-1")  # empty disk, startup script runs again
  assert len(fake.calls()) > before  # the boot fetched the source: `gcloud storage cp` on it
  assert not [c for c in fake.calls()[before:] if "ssh" in c]
  assert _trainer_started(cloud, "two-1")["argv"][-1] == "--a=1"
  assert (cloud.disk("two-1", 0) / "logs" / "train.pid").read_text() != old_pid
  rc, out, err = run_main(["status", *TWO], capsys)
  assert rc == 0, err
  assert "two: ACTIVE (2 x v5litepod-8" in out
  assert "trainer running on 2/2 workers; newest checkpoint step 100, metrics at step 120" in out


def test_run_watches_health_until_the_job_finishes(fake, capsys, monkeypatch):
  monkeypatch.setenv("FAKE_TRAINER_SLEEP", "1")
  fake.cloud(queue=("WAITING_FOR_RESOURCES",))
  rc, _, err = run_main(["run", *TWO, "--", "--b=2"], capsys)
  assert rc == 0, err
  assert "two ACTIVE: trainer running on 2/2 workers; newest checkpoint step 100" in err
  assert "train finished OK on two" in err


def test_run_reports_a_failed_trainer_with_its_code(fake, capsys, monkeypatch):
  monkeypatch.setenv("FAKE_TRAINER_EXIT", "3")
  fake.cloud()
  rc, _, err = run_main(["run", *ONE], capsys)
  assert rc == 3
  assert "error: the trainer exited with code 3 on one-w0; logs: python -m launch.tpu logs" in err


def test_restart_on_preemption_recreates_a_suspended_queued_resource(fake, capsys, monkeypatch):
  monkeypatch.setenv("FAKE_TRAINER_SLEEP", "1.5")
  cloud = fake.cloud()
  opts = tpu.build_parser().parse_args(["run", *ONE, "--provisioning=spot",
                                        "--restart_on_preemption"])
  s = tpu.settings_from(opts)
  sleeps = []

  def sleep(seconds):  # the first wait: Cloud TPU preempts the spot slice
    if not sleeps:
      cloud.set_state("one", "SUSPENDED")
      cloud.kill_all()
    sleeps.append(seconds)
    time.sleep(seconds)

  rc = gcloud_run.do_run(gcloud_run.Gcloud(False, sleep=sleep), s, opts, ["--c=3"])
  _, err = capsys.readouterr()
  assert rc == 0, err
  assert ("one was preempted (SUSPENDED): recreating it; the trainer resumes from "
          "gs://my-bucket/runs/one") in err
  verbs = [c[4] for c in fake.calls() if c[3] == "queued-resources"]
  assert verbs.count("create") == 2 and verbs.count("delete") == 1
  assert verbs.index("delete") < len(verbs) - 1 - verbs[::-1].index("create")


def test_preempted_without_restart_flag_says_what_to_do(fake, capsys):
  fake.rules([{"match": ["queued-resources describe"], "stdout": "SUSPENDED\n"}])
  rc, _, err = run_main(["run", *PODS16], capsys)
  assert rc == 2
  assert ("queued resource gemma-7b is SUSPENDED: re-run with --restart_on_preemption, or delete "
          "it with: gcloud compute tpus queued-resources delete gemma-7b") in err


# ---------------------------------------------------------------------------- nothing prompts

def test_no_terminal_and_no_ssh_key_finishes_within_seconds(fake, tmp_path):
  """The fake gcloud hangs (as ssh-keygen waiting for a passphrase would) without the key."""
  home = tmp_path / "fresh-home"
  home.mkdir()
  fake.rules([{"match": ["queued-resources describe"], "stdout": "ACTIVE\n"}])
  env = {**os.environ, **fake.env(), "HOME": str(home)}
  cmd = [sys.executable, "-m", "launch.tpu", "status", *POD]
  res = subprocess.run(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=20, start_new_session=True)
  assert res.returncode == 0, res.stderr
  key = home / ".ssh" / "google_compute_engine"
  assert "made gcloud's ssh key ~/.ssh/google_compute_engine (no passphrase)" in res.stderr
  assert subprocess.run(["ssh-keygen", "-y", "-P", "", "-f", str(key)],
                        capture_output=True).returncode == 0  # no passphrase
  shutil.rmtree(home / ".ssh")
  (home / ".ssh").write_text("not a directory")
  res = subprocess.run(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=20, start_new_session=True)
  assert res.returncode == 2
  errors = [line for line in res.stderr.splitlines() if not line.startswith("+ ")]
  assert len(errors) == 1 and "cannot create" in errors[0] and "for gcloud's ssh key" in errors[0]


@pytest.mark.parametrize("stderr,message", [
    ("@@@ WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! @@@\nHost key verification failed.\n",
     "the ssh host key of gemma-pod changed (a recreated TPU VM keeps its name): remove the old "
     "one with `ssh-keygen -R`"),
    ("user@1.2.3.4: Permission denied (publickey).\n",
     "ssh to gemma-pod was refused (publickey)"),
])
def test_ssh_key_problems_are_one_line(fake, capsys, stderr, message):
  fake.rules([{"match": ["queued-resources describe"], "stdout": "ACTIVE\n"},
              {"match": [" ssh "], "rc": 255, "stderr": stderr}])
  rc, _, err = run_main(["status", *POD], capsys)
  errors = [line for line in err.splitlines() if "error:" in line]
  assert rc == 2 and len(errors) == 1 and message in errors[0], err


def test_ssh_and_keygen_argv_cannot_prompt():
  s = settings(*POD)
  cmd = gcloud_argv.ssh_cmd(s, "gemma-pod", "all", "true")
  assert cmd[-3:] == SSH_TAIL  # new host keys accepted, ssh BatchMode, gcloud --quiet
  keygen = gcloud_argv.keygen_cmd("/k")
  assert keygen[keygen.index("-N") + 1] == "" and "-q" in keygen


# ---------------------------------------------------------------------------- status/logs/stop

def test_status_logs_stop_setup_commands(fake, capsys):
  fake.rules([{"match": ["describe"], "stdout": "ACTIVE\n"}])
  assert run_main(["status", *POD], capsys)[0] == 0
  assert run_main(["logs", *POD, "--worker=3", "--lines=20", "--follow"], capsys)[0] == 0
  assert run_main(["setup", *POD], capsys)[0] == 0
  assert run_main(["stop", *PODS16], capsys)[0] == 0
  calls = [c for c in fake.calls() if " ssh " in " ".join(c)]
  assert calls[0] == ssh("gemma-pod", "all", CD + "bash launch/worker.sh status train")
  assert calls[1] == ssh("gemma-pod", "3", CD + "bash launch/worker.sh logs train 20 follow")
  assert calls[2] == ssh("gemma-pod", "all", "sudo -n google_metadata_script_runner startup")
  stops = calls[3:]
  assert sorted(c[5] for c in stops) == sorted(f"gemma-7b-{i}" for i in range(16))
  assert {c[-4] for c in stops} == {f"--command={CD}bash launch/worker.sh stop train 30"}


def test_worker_stop_ends_the_run_and_refuses_double_start(fake, tmp_path, monkeypatch):
  monkeypatch.setenv("FAKE_TRAINER_SLEEP", "60")
  cloud = fake.cloud()
  rc = tpu.main(["create", *ONE])
  assert rc == 0
  _trainer_started(cloud, "one")

  def on_worker(command: str) -> subprocess.CompletedProcess:
    disk = cloud.disk("one", 0)
    return subprocess.run(["bash", "-c", command], cwd=disk, env=cloud.worker_env(disk),
                          capture_output=True, text=True, timeout=60)

  s = settings(*ONE[:-1])
  again = on_worker(CD + "bash " + " ".join(gcloud_argv.start_argv(s, [])[1:]))
  assert again.returncode == 3 and "still active" in again.stderr
  assert "train running" in on_worker(gcloud_argv.status_command(s)).stdout
  assert "stopped train" in on_worker(gcloud_argv.stop_command(s, grace_s=2)).stdout
  assert "stopped or killed" in on_worker(gcloud_argv.status_command(s)).stdout


# ---------------------------------------------------------------------------- dry run, settings

def test_printed_lines_paste_back_as_the_same_argv():
  argv = ["gcloud", "x", "a\nb", "it's \\ \"q\" \u00e9\t\x7f", "", "$(id)", "plain"]
  line = gcloud_argv.command_line(argv)
  assert "\n" not in line and as_bash_reads_it(line) == argv


def test_dry_run_needs_no_gcloud(monkeypatch, capsys):
  monkeypatch.setenv("PATH", "/nonexistent")
  rc, out, err = run_main(["run", *PODS16, "--dry_run", "--", *HOSTILE], capsys)
  assert rc == 0, err
  printed = [as_bash_reads_it(line) for line in out.splitlines()]
  assert [c[1:5] for c in printed[:4]] == [
      ["storage", "buckets", "describe", "gs://my-bucket"], ["storage", "cp", printed[1][3],
                                                            printed[1][4]],
      ["compute", "tpus", "queued-resources", "create"],
      ["compute", "tpus", "queued-resources", "describe"]]


def test_settings_file_toml_and_flags_override(fake, capsys, tmp_path):
  path = tmp_path / "pod.toml"
  path.write_text('name = "from-file"\nzone = "europe-west4-b"\naccelerator_type = "v5e-256"\n'
                  'slices = 2\nprovisioning = "spot"\ninternal_ip = true\n'
                  'workdir = "gs://b/w"\n[env]\nLIBTPU_INIT_ARGS = "--xla_a=1"\n')
  rc, out, err = run_main(["create", f"--settings={path}", "--name=from-flag", "--dry_run"], capsys)
  assert rc == 0, err
  create = as_bash_reads_it(out.splitlines()[2])
  assert create[5:7] == ["from-flag", "--zone=europe-west4-b"]
  assert "--node-count=2" in create and "--spot" in create and "--internal-ips" in create
  path.write_text('nmae = "x"\n')
  rc, _, err = run_main(["create", f"--settings={path}"], capsys)
  assert rc == 2 and "unknown setting 'nmae'" in err and "did you mean 'name'" in err
  path.write_text('internal_ip = "yes"\n')
  rc, _, err = run_main(["create", f"--settings={path}", *POD], capsys)
  assert rc == 2 and "setting internal_ip must be true or false, not 'yes'" in err


# ---------------------------------------------------------------------------- accelerator table

# The supported-configuration tables of the Cloud TPU pages (v2, v3, v4, v5e, v5p, v6e), typed
# here from the pages, not from launch/tpu_types.py.
DOCUMENTED = (
    "v2-8 v2-32 v2-128 v2-256 v2-512 "
    "v3-8 v3-32 v3-64 v3-128 v3-256 v3-512 v3-1024 v3-2048 "
    "v4-8 v4-16 v4-32 v4-64 v4-128 v4-256 v4-512 v4-1024 v4-1536 v4-2048 v4-4096 v4-8192 "
    "v5litepod-1 v5litepod-4 v5litepod-8 v5litepod-16 v5litepod-32 v5litepod-64 v5litepod-128 "
    "v5litepod-256 "
    "v5p-8 v5p-16 v5p-64 v5p-128 v5p-256 v5p-512 v5p-1024 v5p-2048 v5p-4096 v5p-8192 v5p-12288 "
    "v6e-1 v6e-4 v6e-8 v6e-16 v6e-32 v6e-64 v6e-128 v6e-256").split()


@pytest.mark.parametrize("accel", DOCUMENTED)
def test_every_documented_type_is_accepted(accel):
  family, size, name = tpu_types.parse_accelerator(accel)
  assert name == accel and f"-{size}" in accel


def test_v4_sizes_are_the_documented_topologies():
  """v4 (TPU v4 page): AxBxC chips, A<=B<=C, all sides <= 4 (the one-cube shapes 2x2x1 .. 2x4x4)
  or all multiples of 4, within the 4096-chip pod; 2 TensorCores per chip."""
  small = {(2, 2, 1), (2, 2, 2), (2, 2, 4), (2, 4, 4)}
  sides = range(4, 4097, 4)
  big = {(a, b, c) for a in sides for b in sides if a <= b and a * b <= 4096
         for c in sides if b <= c and a * b * c <= 4096}
  assert sorted({2 * a * b * c for a, b, c in small | big}) == list(tpu_types.FAMILIES["v4"].sizes)
  family, size, _ = tpu_types.parse_accelerator("v4-8192")  # Gemma 2 9B: 8x16x32
  assert family.hosts(size) == 8 * 16 * 32 // 4


@pytest.mark.parametrize("accel,nearest", [
    ("v5p-17920", "the nearest are v5p-12288;"), ("v5p-24", "the nearest are v5p-16 or v5p-64"),
    ("v2-64", "the nearest are v2-32 or v2-128"), ("v4-200", "v4-128 or v4-256"),
    ("v5litepod-2", "v5litepod-1 or v5litepod-4"), ("v6e-512", "the nearest are v6e-256;")])
def test_undocumented_sizes_name_the_nearest(fake, capsys, accel, nearest):
  rc, _, err = run_main(["create", *POD, f"--accelerator_type={accel}", "--skip_zone_check"],
                        capsys)
  assert rc == 2 and f"{accel!r} is not a supported" in err and nearest in err, err
  assert len(err.strip().splitlines()) == 1 and fake.calls() == []


# ---------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("extra,message", [
    (["--accelerator_type=tpu9-8"], "unknown accelerator type 'tpu9-8': known types are "
                                    "v5litepod-{1,4,8,16,32,64,128,256} (v5e, chips); v6e-"),
    (["--slices=0"], "--slices=0: need at least 1 slice"),
    (["--accelerator_type=v3-32", "--slices=2", "--zone=europe-west4-a"],
     "v3-32 (v3) does not support multislice"),
    (["--name=Bad_Name"], "TPU name 'Bad_Name' is invalid"),
    (["--workdir=gs://"], "has no bucket"),
    (["--accelerator_type=v4-32"], "zone us-west4-a offers no v4 TPUs in the Cloud TPU zone "
                                   "table: use one of us-central2-b (or --skip_zone_check"),
    (["--workdir=/tmp/run"], "--workdir=/tmp/run is not gs://, but 1 x v5litepod-256 runs on 64 "
                             "hosts, which must share one workdir"),
    (["--source_uri=/tmp/src"], "--source_uri='/tmp/src': use gs://BUCKET/PATH"),
])
def test_bad_input_is_refused_before_any_gcloud_call(fake, capsys, extra, message):
  rc, _, err = run_main(["create", *POD, *extra], capsys)
  assert rc == 2 and message in err, err
  assert len(err.strip().splitlines()) == 1
  assert fake.calls() == []


def test_zone_check_can_be_skipped(fake, capsys):
  rc, _, err = run_main(["create", *POD, "--zone=us-west9-z", "--skip_zone_check", "--dry_run"],
                        capsys)
  assert rc == 0, err


def test_single_host_local_workdir_needs_a_source_uri(fake, capsys):
  rc, _, err = run_main(["create", *ONE[:3], "--workdir=/tmp/w"], capsys)
  assert rc == 2 and "from a gs:// copy of this source: use a gs:// --workdir, or " in err
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


def test_create_failing_names_the_delete_command(fake, capsys):
  fake.rules([{"match": ["queued-resources describe"], **NOT_FOUND},
              {"match": ["queued-resources create"], "rc": 1}])
  rc, _, err = run_main(["create", *POD], capsys)
  assert rc == 2 and ("creating gemma-pod failed (exit code 1); if part of it was created, delete "
                      "it with: gcloud compute tpus queued-resources delete gemma-pod") in err


def test_restart_needs_a_bucket_workdir(fake, capsys):
  rc, _, err = run_main(["run", *ONE[:3], "--workdir=/tmp/run", "--restart_on_preemption"],
                        capsys)
  assert rc == 2 and "--restart_on_preemption needs a gs:// --workdir" in err
  assert fake.calls() == []


def test_trainer_args_only_for_create_and_run(fake, capsys):
  rc, _, err = run_main(["status", *POD, "--", "--x=1"], capsys)
  assert rc == 2 and "only `create` and `run` take them" in err


def test_no_jax_import_under_launch():
  """A laptop without jax must run launch.tpu: importing it must not pull jax in."""
  code = ("import sys; import launch.tpu, launch.local; "
          "sys.exit(1 if any(m == 'jax' or m.startswith('jax.') for m in sys.modules) else 0)")
  res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
  assert res.returncode == 0, res.stderr
  for path in (REPO / "launch").rglob("*.py"):
    assert "import jax" not in path.read_text(), path
