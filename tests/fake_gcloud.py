"""A fake `gcloud` executable that records its argv and answers from canned rules or a small cloud.

Used by tests/test_launch_tpu*.py (in-process `launch.tpu.main`) and tests/test_docs.py (the
documented `python -m launch.tpu ...` commands run as real processes).

Rules (`Fake.rules`) match parts of the joined argv and give canned output; the first match wins.
With `Fake.cloud()` the calls no rule matches are played by `Cloud`, a model of the few gcloud
commands launch.tpu uses: queued resources that wait in the queue (`queue`) and then become ACTIVE,
TPU VM nodes whose workers are scratch directories ("disks"), the startup script given at create
run on every worker at every boot, `tpu-vm ssh --command` run by bash on each worker, and a bucket
folder for `gcloud storage`. `Fake.preempt(node)` rebuilds a node the way Cloud TPU does: its
trainer processes die, its disk comes back empty, its startup script runs again.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
  import pytest

BASH = shutil.which("bash") or "/bin/bash"
REPO = Path(__file__).resolve().parents[1]

FAKE_GCLOUD = r'''#!{python}
import fcntl, json, os, sys
argv = sys.argv[1:]
log = os.environ["FAKE_GCLOUD_LOG"]
if argv[2:4] in (["tpu-vm", "ssh"], ["tpu-vm", "scp"]) and not os.path.exists(
    os.path.expanduser("~/.ssh/google_compute_engine")):
  import time  # the real gcloud would run ssh-keygen and wait for a passphrase: hang
  time.sleep(3600)
rules_path = os.environ.get("FAKE_GCLOUD_RULES", "")
rules = json.load(open(rules_path)) if rules_path else []
with open(log + ".lock", "a") as lock:
  fcntl.flock(lock, fcntl.LOCK_EX)
  with open(log, "a") as f:
    f.write(json.dumps(argv) + "\n")
  counts_path = log + ".counts"
  counts = json.load(open(counts_path)) if os.path.exists(counts_path) else {{}}
  joined = " ".join(argv)
  chosen = None
  for i, rule in enumerate(rules):
    if all(part in joined for part in rule["match"]):
      if "times" in rule and counts.get(str(i), 0) >= rule["times"]:
        continue
      counts[str(i)] = counts.get(str(i), 0) + 1
      chosen = rule
      break
  json.dump(counts, open(counts_path, "w"))
if chosen:
  sys.stdout.write(chosen.get("stdout", ""))
  sys.stderr.write(chosen.get("stderr", ""))
  sys.exit(chosen.get("rc", 0))
if os.environ.get("FAKE_CLOUD"):
  sys.path.insert(0, {repo!r})
  from tests.fake_gcloud import Cloud
  sys.exit(Cloud(os.environ["FAKE_CLOUD"]).gcloud(argv))
'''

# A worker's `sudo`: runs the command as given (the tests' user stands in for root).
FAKE_HOSTNAME = '#!/bin/sh\necho "${FAKE_HOSTNAME:-fake-host}"\n'
FAKE_SUDO = '#!/bin/sh\n[ "$1" = -n ] && shift\nexec "$@"\n'
# The guest agent's runner: `startup` runs the node's startup script again.
FAKE_SCRIPT_RUNNER = '#!/bin/sh\nexec bash "$FAKE_STARTUP_SCRIPT"\n'
# The workers' uv: `venv` makes .venv/bin/python the fake trainer, `pip` installs nothing.
FAKE_UV = r'''#!/bin/sh
echo "uv $*" >> "$MAXGEMMA_HOME/uv.calls"
if [ "$1" = venv ]; then
  mkdir -p .venv/bin && cp "$FAKE_TRAINER" .venv/bin/python && chmod +x .venv/bin/python
fi
'''
# The fake trainer: prints its argv and environment as JSON, writes a checkpoint step and a
# metrics line to the bucket when the workdir is gs://, sleeps FAKE_TRAINER_SLEEP s, then exits
# with FAKE_TRAINER_EXIT.
FAKE_TRAINER = r'''#!{python}
import json, os, sys, time
print(json.dumps({{"argv": sys.argv[1:], "env": {{k: v for k, v in os.environ.items()
                                              if k.startswith(("MAXGEMMA_", "NOTE"))
                                              and k != "MAXGEMMA_HOME"}}}}),
      flush=True)
workdir = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--workdir=")), "")
gcs = os.environ.get("FAKE_GCS", "")
if gcs and workdir.startswith("gs://"):
  root = os.path.join(gcs, workdir[len("gs://"):])
  os.makedirs(os.path.join(root, "checkpoints", "100"), exist_ok=True)
  with open(os.path.join(root, "metrics.jsonl"), "a") as f:
    f.write(json.dumps({{"step": 120, "loss": 2.5}}) + "\n")
time.sleep(float(os.environ.get("FAKE_TRAINER_SLEEP", "0")))
sys.exit(int(os.environ.get("FAKE_TRAINER_EXIT", "0")))
'''

# Rules under which every launch.tpu command succeeds: the first describe finds no queued
# resource (so `create` creates it), later ones find it ACTIVE; every worker of a 64-host slice
# reports the run finished OK; every other call (bucket check, upload, create, ssh) exits 0.
ALL_GOOD = [
    {"match": ["queued-resources", "describe"], "rc": 1, "times": 1,
     "stderr": "ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: not found\n"},
    {"match": ["queued-resources", "describe"], "stdout": "ACTIVE\n"},
    {"match": ["tpu-vm", "describe"], "stdout": "READY\n"},
    {"match": ["worker.sh status"],
     "stdout": "".join(f"t1v-w-{i}: train finished with exit code 0\n" for i in range(64))},
]


def _kill_groups(disk: Path) -> None:
  """Ends the process groups the worker's run pid files name (setsid: group id = pid)."""
  for pid_file in disk.glob("logs/*.pid"):
    try:
      os.killpg(int(pid_file.read_text().strip()), signal.SIGKILL)
    except (ValueError, ProcessLookupError, PermissionError):
      pass


class Cloud:
  """The queued resources, nodes, disks and bucket of the fake, kept in a directory."""

  def __init__(self, root: str | Path):
    self.root = Path(root)
    self.state_path = self.root / "state.json"
    self.gcs = self.root / "gcs"
    self.bin = self.root / "worker-bin"

  # --------------------------------------------------------------------------- state
  def load(self) -> dict:
    return json.loads(self.state_path.read_text()) if self.state_path.exists() else {"qrs": {}}

  def save(self, state: dict) -> None:
    tmp = self.state_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(self.state_path)

  def disk(self, node: str, worker: int) -> Path:
    return self.root / "disks" / node / f"w{worker}"

  def _node(self, state: dict, node: str) -> tuple[str, dict] | None:
    for name, qr in state["qrs"].items():
      if node in qr["nodes"]:
        return name, qr
    return None

  def worker_env(self, disk: Path, script: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"MAXGEMMA_HOME": str(disk), "HOME": str(disk / "root"), "FAKE_GCS": str(self.gcs),
                "PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}",
                "FAKE_TRAINER": str(self.bin / "fake-trainer")})
    if script is not None:
      env["FAKE_STARTUP_SCRIPT"] = str(script)
    return env

  def boot(self, node: str, qr: dict) -> None:
    """Every worker of the node runs the startup script (a boot)."""
    script = Path(qr["script"])
    for w in range(qr["workers"]):
      disk = self.disk(node, w)
      (disk / "root").mkdir(parents=True, exist_ok=True)
      env = self.worker_env(disk, script)
      env["FAKE_HOSTNAME"] = f"{node}-w{w}"
      subprocess.run([BASH, str(script)], cwd=disk / "root", env=env,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, timeout=60, check=False)

  def preempt(self, node: str) -> None:
    """Cloud TPU rebuilds the node: processes gone, empty disk, the startup script runs."""
    found = self._node(self.load(), node)
    assert found, f"no node {node}"
    for w in range(found[1]["workers"]):
      _kill_groups(self.disk(node, w))
      shutil.rmtree(self.disk(node, w), ignore_errors=True)
    self.boot(node, found[1])

  def kill_all(self) -> None:
    for disk in (self.root / "disks").glob("*/w*"):
      _kill_groups(disk)

  # --------------------------------------------------------------------------- gcloud
  def gcloud(self, argv: list[str]) -> int:
    flags = {a.split("=", 1)[0]: (a.split("=", 1)[1] if "=" in a else "") for a in argv
             if a.startswith("--")}
    words = [a for a in argv if not a.startswith("--")]
    if words[:3] == ["compute", "tpus", "queued-resources"]:
      return self.queued_resources(words[3], words[4], flags)
    if words[:3] == ["compute", "tpus", "tpu-vm"]:
      return self.tpu_vm(words[3], words[4], flags)
    if words[:1] == ["storage"]:
      return self.storage(words[1:], flags)
    print(f"fake gcloud: no model for {' '.join(argv)}", file=sys.stderr)
    return 2

  def queued_resources(self, verb: str, name: str, flags: dict) -> int:
    state = self.load()
    qr = state["qrs"].get(name)
    if verb != "create" and qr is None:
      print(f"ERROR: (gcloud.compute.tpus.queued-resources.{verb}) NOT_FOUND: {name}",
            file=sys.stderr)
      return 1
    if verb == "create":
      if qr is not None:
        print(f"ERROR: ALREADY_EXISTS: {name}", file=sys.stderr)
        return 1
      nodes = ([flags["--node-id"]] if "--node-id" in flags else
               [f"{flags['--node-prefix']}-{i}" for i in range(int(flags["--node-count"]))])
      script_src = flags["--metadata-from-file"].split("startup-script=", 1)[1]
      script = self.root / f"startup-{name}.sh"
      shutil.copy(script_src, script)
      queue = json.loads((self.root / "queue.json").read_text()) if (
          self.root / "queue.json").exists() else []
      state["qrs"][name] = {"nodes": nodes, "script": str(script), "queue": queue,
                            "state": "ACCEPTED", "booted": False, "flags": flags,
                            "workers": int(os.environ.get("FAKE_CLOUD_WORKERS", "1")),
                            "node_state": {}}
      self.save(state)
      print(f"Create request issued for: [{name}]", file=sys.stderr)
      return 0
    if verb == "describe":
      if qr["queue"]:
        qr["state"] = qr["queue"].pop(0)
      elif qr["state"] not in ("FAILED", "SUSPENDING", "SUSPENDED"):
        qr["state"] = "ACTIVE"
      self.save(state)
      if qr["state"] == "ACTIVE" and not qr["booted"]:
        qr["booted"] = True
        self.save(state)
        for node in qr["nodes"]:
          self.boot(node, qr)
      print(qr["state"])
      return 0
    if verb == "delete":
      for node in qr["nodes"]:
        for w in range(qr["workers"]):
          _kill_groups(self.disk(node, w))
        shutil.rmtree(self.root / "disks" / node, ignore_errors=True)
      del state["qrs"][name]
      self.save(state)
      return 0
    return 2

  def set_state(self, name: str, qr_state: str | None = None, node: str = "",
                node_state: str = "") -> None:
    state = self.load()
    if qr_state:
      state["qrs"][name]["state"] = qr_state
    if node:
      state["qrs"][name]["node_state"][node] = node_state
    self.save(state)

  def tpu_vm(self, verb: str, node: str, flags: dict) -> int:
    found = self._node(self.load(), node)
    if found is None or not found[1]["booted"]:
      print(f"ERROR: (gcloud.compute.tpus.tpu-vm.{verb}) NOT_FOUND: {node}", file=sys.stderr)
      return 1
    name, qr = found
    if verb == "describe":
      print(qr["node_state"].get(node, "READY"))
      return 0
    if verb == "ssh":
      which = flags.get("--worker", "0")
      workers = range(qr["workers"]) if which == "all" else [int(which)]
      rc = 0
      for w in workers:
        disk = self.disk(node, w)
        env = self.worker_env(disk, Path(qr["script"]))
        env["FAKE_HOSTNAME"] = f"{node}-w{w}"
        res = subprocess.run([BASH, "-c", flags["--command"]], cwd=disk / "root", env=env,
                             capture_output=True,
                             text=True, stdin=subprocess.DEVNULL, timeout=60, check=False)
        sys.stdout.write(res.stdout)
        sys.stderr.write(res.stderr)
        rc = max(rc, res.returncode)
      return rc
    return 2

  def storage(self, words: list[str], flags: dict) -> int:
    def local(uri: str) -> Path:
      return self.gcs / uri[len("gs://"):]

    if words[:2] == ["buckets", "describe"]:
      bucket = local(words[2])
      if not bucket.is_dir():
        print(f"ERROR: {words[2]} not found: 404.", file=sys.stderr)
        return 1
      print(words[2][len("gs://"):])
      return 0
    if words[0] == "cp":
      src, dst = words[1], words[2]
      src_path = local(src) if src.startswith("gs://") else Path(src)
      dst_path = local(dst) if dst.startswith("gs://") else Path(dst)
      if not src_path.is_file():
        print(f"ERROR: {src} not found", file=sys.stderr)
        return 1
      dst_path.parent.mkdir(parents=True, exist_ok=True)
      shutil.copy(src_path, dst_path)
      return 0
    if words[0] == "ls":
      folder = local(words[1])
      if not folder.is_dir():
        print(f"ERROR: One or more URLs matched no objects: {words[1]}", file=sys.stderr)
        return 1
      for child in sorted(folder.iterdir()):
        print(words[1].rstrip("/") + "/" + child.name + ("/" if child.is_dir() else ""))
      return 0
    if words[0] == "cat":
      path = local(words[1])
      if not path.is_file():
        print(f"ERROR: No URLs matched: {words[1]}", file=sys.stderr)
        return 1
      data = path.read_bytes()
      n = int(flags.get("--range", "-0")[1:] or 0)
      sys.stdout.write((data[-n:] if n else data).decode())
      return 0
    return 2


class Fake:
  """A fake gcloud in `tmp/bin`: `rules` pick canned output; `calls()` returns recorded argv.

  `env()` holds the variables that put it first on PATH (for subprocesses); `install` sets them
  in this process. `cloud()` turns on the model for calls no rule answers.
  """

  def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch | None = None):
    self.tmp = tmp
    self.bin = tmp / "bin"
    self.bin.mkdir(parents=True)
    gcloud = self.bin / "gcloud"
    gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable, repo=str(REPO)))
    gcloud.chmod(0o755)
    self.log, self.rules_path = tmp / "calls.jsonl", tmp / "rules.json"
    self.home = tmp / "home"  # HOME for the launcher: gcloud's ssh key is there already
    (self.home / ".ssh").mkdir(parents=True)
    for name in ("google_compute_engine", "google_compute_engine.pub"):
      (self.home / ".ssh" / name).write_text("fake key\n")
    self.model: Cloud | None = None
    self.monkeypatch = monkeypatch
    self.rules([])
    if monkeypatch is not None:
      self.install(monkeypatch)

  def env(self, path: str | None = None) -> dict[str, str]:
    """FAKE_GCLOUD_*, a scratch HOME, and a PATH (default: this process's) with the fake first."""
    path = os.environ["PATH"] if path is None else path
    env = {"PATH": f"{self.bin}{os.pathsep}{path}", "FAKE_GCLOUD_LOG": str(self.log),
           "HOME": str(self.home),
           "FAKE_GCLOUD_RULES": str(self.rules_path)}
    if self.model is not None:
      env["FAKE_CLOUD"] = str(self.model.root)
    return env

  def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in self.env().items():
      monkeypatch.setenv(key, value)

  def rules(self, rules: list[dict]) -> None:
    self.rules_path.write_text(json.dumps(rules))

  def cloud(self, buckets: tuple[str, ...] = ("my-bucket",), workers: int = 1,
            queue: tuple[str, ...] = ()) -> Cloud:
    """Turns on the cloud model: these buckets exist, each node has `workers` workers, a new
    queued resource answers `queue` (one state per describe) before it is ACTIVE."""
    self.model = Cloud(self.tmp / "cloud")
    self.model.bin.mkdir(parents=True)
    files = {"sudo": FAKE_SUDO, "hostname": FAKE_HOSTNAME, "uv": FAKE_UV,
             "google_metadata_script_runner": FAKE_SCRIPT_RUNNER,
             "fake-trainer": FAKE_TRAINER.format(python=sys.executable)}
    for name, text in files.items():
      (self.model.bin / name).write_text(text)
      (self.model.bin / name).chmod(0o755)
    os.symlink(self.bin / "gcloud", self.model.bin / "gcloud")
    for bucket in buckets:
      (self.model.gcs / bucket).mkdir(parents=True)
    (self.model.root / "queue.json").write_text(json.dumps(list(queue)))
    if self.monkeypatch is not None:
      self.monkeypatch.setenv("FAKE_CLOUD_WORKERS", str(workers))
      self.install(self.monkeypatch)
    return self.model

  def calls(self) -> list[list[str]]:
    if not self.log.exists():
      return []
    return [["gcloud", *json.loads(line)] for line in self.log.read_text().splitlines()]


def as_bash_reads_it(line: str) -> list[str]:
  """The argv bash passes to gcloud for one printed line (so copy-paste is exact)."""
  script = "gcloud() { printf '%s\\0' gcloud \"$@\"; }; " + line
  res = subprocess.run([BASH, "-c", script], capture_output=True, check=True)
  return res.stdout.decode().split("\0")[:-1]
