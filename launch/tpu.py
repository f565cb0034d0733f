"""Create Cloud TPU VMs, install maxgemma on every worker, run the trainer, watch it, clean up.

  python -m launch.tpu SUBCOMMAND [--settings=FILE] [flags] [--dry_run] [-- trainer arguments]

Subcommands: create, setup, run, status, logs, stop, delete (see docs/tpu.md). One slice is a TPU VM
(`gcloud compute tpus tpu-vm create NAME`); several slices (multislice) are one queued resource NAME
whose nodes are NAME-0 .. NAME-(S-1). Settings come from `--settings` (JSON, or TOML by the .toml
suffix) and flags (flags win). `--dry_run` prints every gcloud command, one per line, shell-quoted,
and runs nothing. Commands are argv lists (never a local shell); the remote `--command` strings are
built with shlex.quote per argument, so trainer arguments reach the worker intact.

Stdlib only: a laptop without jax must run this.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
REMOTE_DIR = "maxgemma"  # relative to the worker's home directory (where ssh commands start)
REMOTE_TARBALL = "maxgemma-src.tar.gz"
SOURCE_PATHS = (
    "pyproject.toml", "requirements.txt", "README.md", "maxgemma", "launch", "configs")


class LaunchError(Exception):
  """Bad input (exit code 2) or a failed step (its own code): printed as one `error:` line."""

  def __init__(self, message: str, code: int = 2):
    super().__init__(message)
    self.code = code


# ----------------------------------------------------------------------------------------------
# Accelerator types

@dataclasses.dataclass(frozen=True)
class Family:
  """One TPU generation as gcloud names it: `<prefix>-<size>`."""
  prefix: str
  generation: str
  runtime: str  # the default runtime (software) version for JAX
  unit: str  # what <size> counts: "chips" or "TensorCores" (2 per chip)
  sizes: tuple[int, ...]  # allowed sizes
  multislice: bool

  def hosts(self, size: int) -> int:
    """TPU VM hosts (workers, one process each) in one slice of this size."""
    if self.unit == "chips":  # v5e / v6e: up to 8 chips on one host, then 4 chips per host
      return 1 if size <= 8 else size // 4
    return max(1, size // 8)  # 4 chips = 8 TensorCores per host

  def describe(self) -> str:
    if len(self.sizes) <= 10:
      listed = ",".join(str(n) for n in self.sizes)
    else:
      listed = f"{self.sizes[0]},{self.sizes[1]},...,{self.sizes[-1]} (multiples of 8)"
    return f"{self.prefix}-{{{listed}}} ({self.generation}, {self.unit})"


_EVERY_8 = lambda top: tuple(range(8, top + 1, 8))
FAMILIES = {f.prefix: f for f in (
    Family("v5litepod", "v5e", "v2-alpha-tpuv5-lite", "chips", (1, 4, 8, 16, 32, 64, 128, 256),
           True),
    Family("v6e", "v6e", "v2-alpha-tpuv6e", "chips", (1, 4, 8, 16, 32, 64, 128, 256), True),
    Family("v5p", "v5p", "v2-alpha-tpuv5", "TensorCores", _EVERY_8(17920), True),
    Family("v4", "v4", "tpu-ubuntu2204-base", "TensorCores", _EVERY_8(8192), True),
    Family("v3", "v3", "tpu-ubuntu2204-base", "TensorCores", (8, 32, 64, 128, 256, 512, 1024,
                                                              2048), False),
    Family("v2", "v2", "tpu-ubuntu2204-base", "TensorCores", (8, 32, 64, 128, 256, 512), False),
)}
_ALIASES = {"v5e": "v5litepod"}


def known_types() -> str:
  """The accepted accelerator types, for error messages."""
  return "; ".join(f.describe() for f in FAMILIES.values())


def parse_accelerator(accelerator_type: str) -> tuple[Family, int, str]:
  """(family, size, gcloud's name) for e.g. `v5litepod-256` (alias `v5e-256`)."""
  m = re.fullmatch(r"([a-z0-9]+)-(\d+)", accelerator_type.strip().lower())
  prefix = _ALIASES.get(m.group(1), m.group(1)) if m else ""
  if not m or prefix not in FAMILIES:
    raise LaunchError(f"unknown accelerator type {accelerator_type!r}: known types are "
                      f"{known_types()}")
  family, size = FAMILIES[prefix], int(m.group(2))
  if size not in family.sizes:
    raise LaunchError(f"accelerator type {accelerator_type!r} has no slice of {size} "
                      f"{family.unit}: use {family.describe()}")
  return family, size, f"{prefix}-{size}"


# ----------------------------------------------------------------------------------------------
# Settings

@dataclasses.dataclass
class Settings:
  """Everything the subcommands need; from --settings FILE and flags (flags win)."""
  name: str = ""
  zone: str = ""
  accelerator_type: str = ""
  project: str = ""
  slices: int = 1
  provisioning: str = "on-demand"  # on-demand | spot | reserved
  runtime_version: str = ""  # "" = the default for the accelerator type
  workdir: str = ""  # the trainer's --workdir; gs://BUCKET/PATH survives preemption
  config: str = ""  # the trainer's --config (a configs/*.py path inside the repo)
  module: str = "maxgemma.train"
  run_name: str = "train"  # names the log / pid / exit files on each worker
  python: str = "3.11"  # Python version of the workers' virtualenv
  env: dict[str, str] = dataclasses.field(default_factory=dict)  # extra trainer environment

  @property
  def family(self) -> Family:
    return parse_accelerator(self.accelerator_type)[0]

  @property
  def hosts_per_slice(self) -> int:
    family, size, _ = parse_accelerator(self.accelerator_type)
    return family.hosts(size)

  @property
  def multislice(self) -> bool:
    return self.slices > 1

  @property
  def nodes(self) -> list[str]:
    """TPU VM node names: NAME, or NAME-0 .. NAME-(S-1) for a multislice queued resource."""
    return [self.name] if self.slices == 1 else [f"{self.name}-{i}" for i in range(self.slices)]

  @property
  def bucket(self) -> str:
    return self.workdir[len("gs://"):].split("/")[0] if self.workdir.startswith("gs://") else ""


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def load_settings_file(path: str) -> dict:
  """The key/value pairs of a JSON or TOML settings file."""
  try:
    raw = Path(path).read_bytes()
  except OSError as e:
    raise LaunchError(f"cannot read --settings={path}: {e.strerror}") from None
  try:
    data = tomllib.loads(raw.decode()) if path.endswith(".toml") else json.loads(raw)
  except (ValueError, UnicodeDecodeError) as e:
    kind = "TOML" if path.endswith(".toml") else "JSON"
    raise LaunchError(f"--settings={path} is not valid {kind}: {e}") from None
  if not isinstance(data, dict):
    raise LaunchError(f"--settings={path} must hold a table/object of settings")
  for key in data:
    if key not in _FIELDS:
      close = difflib.get_close_matches(key, list(_FIELDS), n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      raise LaunchError(f"unknown setting {key!r} in {path}{hint}; valid: {', '.join(_FIELDS)}")
  return data


def validate(s: Settings) -> Settings:
  """Checks the settings; raises LaunchError naming the problem and the fix."""
  if not s.name:
    raise LaunchError("no TPU name: pass --name=NAME or set name in --settings")
  if not re.fullmatch(r"[a-z]([-a-z0-9]{0,46}[a-z0-9])?", s.name):
    raise LaunchError(f"TPU name {s.name!r} is invalid: use lowercase letters, digits and hyphens, "
                      "starting with a letter (at most 48 characters)")
  if not s.zone:
    raise LaunchError("no zone: pass --zone=ZONE (e.g. us-west4-a) or set zone in --settings")
  if not s.accelerator_type:
    raise LaunchError(f"no accelerator type: pass --accelerator_type (known: {known_types()})")
  family, _, canonical = parse_accelerator(s.accelerator_type)
  s.accelerator_type = canonical
  if not isinstance(s.slices, int) or s.slices < 1:
    raise LaunchError(f"--slices={s.slices}: need at least 1 slice")
  if s.slices > 1 and not family.multislice:
    multi = ", ".join(f.prefix for f in FAMILIES.values() if f.multislice)
    raise LaunchError(f"{canonical} ({family.generation}) does not support multislice, so "
                      f"--slices={s.slices} cannot be used: use --slices=1 or one of {multi}")
  if s.provisioning not in ("on-demand", "spot", "reserved"):
    raise LaunchError(f"--provisioning={s.provisioning!r}: use on-demand, spot or reserved")
  if not re.fullmatch(r"[A-Za-z0-9_.-]+", s.run_name):
    raise LaunchError(f"--run_name={s.run_name!r}: use letters, digits, '_', '.', '-'")
  if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", s.module):
    raise LaunchError(f"--module={s.module!r} is not a Python module name")
  if not re.fullmatch(r"3\.\d+", s.python):
    raise LaunchError(f"--python={s.python!r}: give a version such as 3.11")
  for key in s.env:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
      raise LaunchError(f"environment variable name {key!r} is invalid (--env KEY=VALUE)")
  if s.workdir.startswith("gs://") and not s.bucket:
    raise LaunchError(f"--workdir={s.workdir!r} has no bucket: use gs://BUCKET/PATH")
  if not s.runtime_version:
    s.runtime_version = family.runtime
  return s


# ----------------------------------------------------------------------------------------------
# gcloud commands (argv lists)

GCLOUD = "gcloud"


def _where(s: Settings) -> list[str]:
  return [f"--zone={s.zone}"] + ([f"--project={s.project}"] if s.project else [])


def _provisioning(s: Settings) -> list[str]:
  return {"spot": ["--spot"], "reserved": ["--reserved"], "on-demand": []}[s.provisioning]


def create_cmd(s: Settings) -> list[str]:
  """One slice: a TPU VM. Several: a queued resource with one node per slice."""
  if s.multislice:
    return [GCLOUD, "compute", "tpus", "queued-resources", "create", s.name, *_where(s),
            f"--accelerator-type={s.accelerator_type}", f"--runtime-version={s.runtime_version}",
            f"--node-count={s.slices}", f"--node-prefix={s.name}", *_provisioning(s)]
  return [GCLOUD, "compute", "tpus", "tpu-vm", "create", s.name, *_where(s),
          f"--accelerator-type={s.accelerator_type}", f"--version={s.runtime_version}",
          *_provisioning(s)]


def delete_cmd(s: Settings) -> list[str]:
  if s.multislice:  # --force also deletes the nodes the queued resource created
    return [GCLOUD, "compute", "tpus", "queued-resources", "delete", s.name, *_where(s),
            "--force", "--quiet"]
  return [GCLOUD, "compute", "tpus", "tpu-vm", "delete", s.name, *_where(s), "--quiet"]


def state_cmd(s: Settings) -> list[str]:
  if s.multislice:
    return [GCLOUD, "compute", "tpus", "queued-resources", "describe", s.name, *_where(s),
            "--format=value(state.state)"]
  return [GCLOUD, "compute", "tpus", "tpu-vm", "describe", s.name, *_where(s),
          "--format=value(state)"]


def bucket_cmd(s: Settings) -> list[str]:
  args = [GCLOUD, "storage", "buckets", "describe", f"gs://{s.bucket}", "--format=value(name)"]
  return args + ([f"--project={s.project}"] if s.project else [])


def ssh_cmd(s: Settings, node: str, worker: str, command: str) -> list[str]:
  return [GCLOUD, "compute", "tpus", "tpu-vm", "ssh", node, *_where(s), f"--worker={worker}",
          f"--command={command}"]


def scp_cmd(s: Settings, node: str, local: str) -> list[str]:
  return [GCLOUD, "compute", "tpus", "tpu-vm", "scp", local, f"{node}:{REMOTE_TARBALL}",
          *_where(s), "--worker=all"]


READY = {False: "READY", True: "ACTIVE"}  # tpu-vm state / queued-resource state
PREEMPTED = {False: {"PREEMPTED", "TERMINATED"}, True: {"SUSPENDING", "SUSPENDED"}}
FAILED = {False: set(), True: {"FAILED"}}


# ----------------------------------------------------------------------------------------------
# Remote shell commands (run by a shell on every worker: every variable part is shlex-quoted once,
# and launch/worker.sh uses its arguments as given)

def trainer_argv(s: Settings, trainer_args: Sequence[str]) -> list[str]:
  """The trainer's argv on a worker (relative to ~/maxgemma)."""
  argv = [".venv/bin/python", "-m", s.module]
  if s.config:
    argv.append(f"--config={s.config}")
  if s.workdir:
    argv.append(f"--workdir={s.workdir}")
  return argv + list(trainer_args)


def trainer_env(s: Settings) -> dict[str, str]:
  """Environment for the trainer: multi-host slices join the job with jax's TPU auto-detection."""
  env = {}
  if s.hosts_per_slice * s.slices > 1:
    env["MAXGEMMA_COORDINATOR"] = "auto"
  env.update(s.env)
  return env


def _worker(s: Settings, what: str, *args: str) -> str:
  """A call of launch/worker.sh (shipped by setup) in ~/maxgemma on a worker."""
  return f"cd {REMOTE_DIR} && " + shlex.join(["bash", "launch/worker.sh", what, s.run_name, *args])


def start_command(s: Settings, trainer_args: Sequence[str]) -> str:
  """Starts the trainer in the background; its log is ~/maxgemma/logs/RUN.log on each worker."""
  env = trainer_env(s)
  prefix = ["env", *(f"{k}={v}" for k, v in env.items())] if env else []
  return _worker(s, "start", *prefix, *trainer_argv(s, trainer_args))


def stream_command(s: Settings) -> str:
  """Follows the log until the trainer ends, then exits with its exit code (255: unknown)."""
  return _worker(s, "stream")


def status_command(s: Settings) -> str:
  return _worker(s, "status")


def stop_command(s: Settings, grace_s: int = 30) -> str:
  return _worker(s, "stop", str(int(grace_s)))


def logs_command(s: Settings, lines: int, follow: bool) -> str:
  return _worker(s, "logs", str(int(lines)), *(["follow"] if follow else []))


def requirements_hash(s: Settings, root: Path = REPO_ROOT) -> str:
  """Changes when the requirements (or the Python version) change: setup reinstalls then."""
  h = hashlib.sha256(s.python.encode())
  for name in ("requirements.txt", "pyproject.toml"):
    path = root / name
    h.update(path.read_bytes() if path.exists() else b"")
  return h.hexdigest()[:12]


def setup_command(s: Settings, req_hash: str) -> str:
  """Unpacks the source into ~/maxgemma; installs requirements once per requirements hash."""
  stamp = f".venv/.maxgemma-setup-{req_hash}"
  uv = "$HOME/.local/bin/uv"
  return "; ".join([
      "set -e",
      f"mkdir -p {REMOTE_DIR}",
      f"tar -xzf {REMOTE_TARBALL} -C {REMOTE_DIR}",
      f"cd {REMOTE_DIR}",
      f"if [ -f {stamp} ]; then echo \"$(hostname): requirements already installed\"; exit 0; fi",
      f"[ -x {uv} ] || curl -LsSf https://astral.sh/uv/install.sh | sh",
      f"{uv} venv --allow-existing --python {shlex.quote(s.python)} .venv",
      f"{uv} pip install --python .venv/bin/python -r requirements.txt 'jax[tpu]'",
      f"{uv} pip install --python .venv/bin/python --no-deps -e .",
      f"touch {stamp}",
      "echo \"$(hostname): maxgemma installed\"",
  ])


def source_tarball(dest: str, root: Path = REPO_ROOT) -> str:
  """Packs the repo's source (no caches, no venv) into `dest`; returns dest."""
  skip = lambda ti: None if ("__pycache__" in ti.name or ti.name.endswith(".pyc")) else ti
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w:gz") as tar:
    for rel in SOURCE_PATHS:
      if (root / rel).exists():
        tar.add(root / rel, arcname=rel, filter=skip)
  Path(dest).write_bytes(buf.getvalue())
  return dest


def default_tarball(s: Settings) -> str:
  return os.path.join(tempfile.gettempdir(), f"maxgemma-src-{s.name}.tar.gz")


# ----------------------------------------------------------------------------------------------
# Running gcloud

def quote(arg: str) -> str:
  """shlex.quote, except that control characters (newlines...) use bash's $'...' form, so every
  printed command stays on one line and pastes back into bash as exactly the same argv."""
  if not any(ord(c) < 32 or ord(c) == 127 for c in arg):
    return shlex.quote(arg)

  def one(c: str) -> str:
    if c in "\\'":
      return "\\" + c
    return f"\\x{ord(c):02x}" if ord(c) < 32 or ord(c) == 127 else c

  body = "".join(one(c) for c in arg)
  return f"$'{body}'"


def command_line(argv: Sequence[str]) -> str:
  """One command as one line of bash."""
  return " ".join(quote(a) for a in argv)


class Gcloud:
  """Runs argv lists (echoing them to stderr), or with dry_run prints them to stdout only."""

  def __init__(self, dry_run: bool, out=None):
    self.dry_run = dry_run
    self.out = out or sys.stdout
    if not dry_run and shutil.which(GCLOUD) is None:
      raise LaunchError("gcloud is not on PATH: install the Google Cloud CLI "
                        "(https://cloud.google.com/sdk/docs/install), or use --dry_run to only "
                        "print the commands")

  def _show(self, argv: Sequence[str]) -> None:
    if self.dry_run:
      print(command_line(argv), file=self.out, flush=True)
    else:
      print(f"+ {command_line(argv)}", file=sys.stderr, flush=True)

  def run(self, argv: Sequence[str], capture: bool = False) -> subprocess.CompletedProcess:
    """Runs one command; with capture its stdout/stderr come back as text."""
    self._show(argv)
    if self.dry_run:
      return subprocess.CompletedProcess(argv, 0, "", "")
    return subprocess.run(list(argv), capture_output=capture, text=True,
                          stdin=subprocess.DEVNULL)

  def run_all(self, argvs: Sequence[Sequence[str]]) -> list[int]:
    """Runs commands side by side (one per node); returns their exit codes in order."""
    for argv in argvs:
      self._show(argv)
    if self.dry_run:
      return [0] * len(argvs)
    procs = [subprocess.Popen(list(a), stdin=subprocess.DEVNULL) for a in argvs]
    return [p.wait() for p in procs]

  def sequences(self, seqs: Sequence[Sequence[Sequence[str]]]) -> list[int]:
    """Runs several command sequences side by side; each stops at its first failure."""
    if self.dry_run:
      for seq in seqs:
        for argv in seq:
          self._show(argv)
      return [0] * len(seqs)

    def one(seq):
      for argv in seq:
        rc = self.run(argv).returncode
        if rc:
          return rc
      return 0

    with ThreadPoolExecutor(max_workers=max(1, min(len(seqs), 16))) as pool:
      return list(pool.map(one, seqs))


# ----------------------------------------------------------------------------------------------
# Subcommand steps

def check_bucket(g: Gcloud, s: Settings) -> None:
  """A gs:// workdir must name a bucket that exists (checked before anything is created)."""
  if not s.bucket:
    return
  res = g.run(bucket_cmd(s), capture=True)
  if res.returncode:
    why = (res.stderr or res.stdout or "").strip().splitlines()
    raise LaunchError(f"bucket gs://{s.bucket} of --workdir={s.workdir} does not exist or is not "
                      f"accessible ({why[-1] if why else 'describe failed'}): create it with "
                      f"`gcloud storage buckets create gs://{s.bucket} --location=REGION` or fix "
                      "--workdir")


def tpu_state(g: Gcloud, s: Settings) -> str:
  res = g.run(state_cmd(s), capture=True)
  if res.returncode:
    why = (res.stderr or "").strip().splitlines()
    raise LaunchError(f"cannot describe TPU {s.name} in {s.zone} ({why[-1] if why else 'failed'}):"
                      " does it exist? `python -m launch.tpu create` makes it")
  return res.stdout.strip().splitlines()[-1].strip() if res.stdout.strip() else ""


def wait_ready(g: Gcloud, s: Settings, poll_s: float, timeout_s: float) -> None:
  """Waits until the TPU VM is READY / the queued resource ACTIVE (dry run: asks once)."""
  start = time.monotonic()
  ready = READY[s.multislice]
  while True:
    state = tpu_state(g, s)
    if g.dry_run or state == ready:
      return
    if state in FAILED[s.multislice] | PREEMPTED[s.multislice]:
      raise LaunchError(f"TPU {s.name} is {state}, not {ready}")
    if timeout_s and time.monotonic() - start > timeout_s:
      raise LaunchError(f"TPU {s.name} still {state or 'unknown'} after {timeout_s:g}s")
    print(f"launch.tpu: {s.name} is {state or 'not ready'}; waiting for {ready}", file=sys.stderr,
          flush=True)
    time.sleep(poll_s)


def _cleanup_hint(s: Settings) -> str:
  return f"delete what was created with: {shlex.join(delete_cmd(s))}"


def do_create(g: Gcloud, s: Settings, opts: argparse.Namespace) -> None:
  """Checks, creates the TPU (VM or queued resource), waits until it is ready."""
  check_bucket(g, s)
  res = g.run(create_cmd(s))
  if res.returncode:
    raise LaunchError(f"creating {s.name} failed (exit code {res.returncode}); if part of it was "
                      f"created, {_cleanup_hint(s)}")
  try:
    wait_ready(g, s, opts.poll_s, opts.wait_timeout_s)
  except LaunchError as e:
    raise LaunchError(f"{e}; {_cleanup_hint(s)}") from None


def do_setup(g: Gcloud, s: Settings, opts: argparse.Namespace) -> None:
  """Copies the source to every worker of every node and installs requirements (idempotent)."""
  wait_ready(g, s, opts.poll_s, opts.wait_timeout_s)
  tarball = opts.tarball or default_tarball(s)
  if not g.dry_run:
    source_tarball(tarball)
  command = setup_command(s, requirements_hash(s))
  codes = g.sequences([[scp_cmd(s, node, tarball), ssh_cmd(s, node, "all", command)]
                       for node in s.nodes])
  bad = [node for node, rc in zip(s.nodes, codes, strict=True) if rc]
  if bad:
    raise LaunchError(f"setup failed on {', '.join(bad)} (see the output above); it is safe to "
                      "re-run `python -m launch.tpu setup`")


def start(g: Gcloud, s: Settings, trainer_args: Sequence[str]) -> None:
  codes = g.run_all([ssh_cmd(s, node, "all", start_command(s, trainer_args)) for node in s.nodes])
  bad = [node for node, rc in zip(s.nodes, codes, strict=True) if rc]
  if bad:
    raise LaunchError(f"starting the trainer failed on {', '.join(bad)} (see above; no "
                      "~/maxgemma there means `python -m launch.tpu setup` has not run); stop any "
                      "half-started run with `python -m launch.tpu stop`")


def do_run(g: Gcloud, s: Settings, opts: argparse.Namespace, trainer_args: list[str]) -> int:
  """Starts the trainer everywhere, streams worker 0, recreates and resumes after preemption."""
  if opts.restart_on_preemption and not s.workdir.startswith("gs://"):
    raise LaunchError("--restart_on_preemption needs a gs:// --workdir: a recreated TPU VM has a "
                      "new disk, so checkpoints must live in a bucket to resume")
  check_bucket(g, s)
  restarts = 0
  while True:
    start(g, s, trainer_args)
    rc = g.run(ssh_cmd(s, s.nodes[0], "0", stream_command(s))).returncode
    if g.dry_run:
      tpu_state(g, s)
      return 0
    if rc == 0:
      print(f"launch.tpu: {s.run_name} finished OK on {s.name}", file=sys.stderr)
      return 0
    state = tpu_state(g, s)
    if state not in PREEMPTED[s.multislice]:
      how = ("the log stream was lost (ssh exit 255)" if rc == 255
             else f"the trainer exited with code {rc} on worker 0")
      raise LaunchError(f"{how}; TPU {s.name} is {state or 'in an unknown state'}, not preempted. "
                        f"Worker logs: python -m launch.tpu logs --worker=all (status: "
                        "python -m launch.tpu status)", code=rc if 0 < rc < 126 else 1)
    if not opts.restart_on_preemption or restarts >= opts.max_restarts:
      what = ("re-run with --restart_on_preemption" if not opts.restart_on_preemption
              else f"gave up after {restarts} restarts")
      raise LaunchError(f"TPU {s.name} was preempted ({state}): {what}; to recreate by hand: "
                        f"{shlex.join(delete_cmd(s))} && python -m launch.tpu create/setup/run")
    restarts += 1
    print(f"launch.tpu: {s.name} was preempted ({state}): recreating it and resuming from "
          f"{s.workdir} (restart {restarts} of at most {opts.max_restarts})", file=sys.stderr,
          flush=True)
    res = g.run(delete_cmd(s))
    if res.returncode:
      raise LaunchError(f"deleting the preempted {s.name} failed (exit code {res.returncode}); "
                        f"retry: {shlex.join(delete_cmd(s))}")
    do_create(g, s, opts)
    do_setup(g, s, opts)


def do_status(g: Gcloud, s: Settings, opts: argparse.Namespace) -> int:
  state = tpu_state(g, s)
  print(f"{s.name}: {state or 'unknown'} ({s.slices} x {s.accelerator_type}, {s.zone})",
        file=g.out if not g.dry_run else sys.stderr, flush=True)
  if g.dry_run or state == READY[s.multislice]:
    g.run_all([ssh_cmd(s, node, "all", status_command(s)) for node in s.nodes])
  return 0


def do_logs(g: Gcloud, s: Settings, opts: argparse.Namespace) -> int:
  if not 0 <= opts.slice < s.slices:
    raise LaunchError(f"--slice={opts.slice} is out of range: this TPU has slices "
                      f"0..{s.slices - 1}")
  if opts.worker != "all" and not (opts.worker.isdigit()
                                   and int(opts.worker) < s.hosts_per_slice):
    raise LaunchError(f"--worker={opts.worker!r}: use all or 0..{s.hosts_per_slice - 1}")
  node = s.nodes[opts.slice]
  return g.run(ssh_cmd(s, node, opts.worker, logs_command(s, opts.lines, opts.follow))).returncode


def do_stop(g: Gcloud, s: Settings, opts: argparse.Namespace) -> int:
  codes = g.run_all([ssh_cmd(s, node, "all", stop_command(s, opts.grace_s))
                     for node in s.nodes])
  return 1 if any(codes) else 0


def do_delete(g: Gcloud, s: Settings, opts: argparse.Namespace) -> int:
  rc = g.run(delete_cmd(s)).returncode
  if rc:
    raise LaunchError(f"deleting {s.name} failed (exit code {rc}); check with "
                      f"{shlex.join(state_cmd(s))}")
  return 0


# ----------------------------------------------------------------------------------------------
# Command line

def _env_pair(text: str) -> tuple[str, str]:
  key, sep, value = text.partition("=")
  if not sep:
    raise argparse.ArgumentTypeError(f"--env {text!r}: use KEY=VALUE")
  return key, value


def build_parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False)
  g = common.add_argument_group("settings (flags override --settings)")
  g.add_argument("--settings", default="", help="JSON or TOML file with the settings below")
  g.add_argument("--name", help="TPU VM / queued resource name")
  g.add_argument("--zone", help="e.g. us-west4-a")
  g.add_argument("--project", help="GCP project (default: gcloud's)")
  g.add_argument("--accelerator_type", help=f"one of: {known_types()}")
  g.add_argument("--slices", type=int, help="number of slices (>1: multislice queued resource)")
  g.add_argument("--provisioning", choices=("on-demand", "spot", "reserved"))
  g.add_argument("--runtime_version", help="TPU software version (default: by accelerator type)")
  g.add_argument("--workdir", help="trainer --workdir (gs://BUCKET/PATH to survive preemption)")
  g.add_argument("--config", help="trainer --config file, e.g. configs/gemma_2b.py")
  g.add_argument("--module", help="trainer module (default maxgemma.train)")
  g.add_argument("--run_name", help="names the log/pid files on the workers (default train)")
  g.add_argument("--python", help="workers' Python version (default 3.11)")
  g.add_argument("--env", action="append", type=_env_pair, default=None, metavar="KEY=VALUE",
                 help="extra trainer environment variable (repeatable)")
  common.add_argument("--dry_run", action="store_true", help="print the gcloud commands only")
  common.add_argument("--poll_s", type=float, default=30.0, help="seconds between state checks")
  common.add_argument("--wait_timeout_s", type=float, default=0.0,
                      help="give up waiting for the TPU after this long (0: wait)")
  common.add_argument("--tarball", default="", help="where setup packs the source locally")

  parser = argparse.ArgumentParser(prog="python -m launch.tpu",
                                   description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
  sub.add_parser("create", parents=[common], help="create the TPU VM / multislice queued resource")
  sub.add_parser("setup", parents=[common], help="install maxgemma on every worker (idempotent)")
  run = sub.add_parser("run", parents=[common], help="run the trainer everywhere: ... run -- ARGS")
  run.add_argument("--restart_on_preemption", action="store_true",
                   help="recreate the TPU and resume from the workdir after a preemption")
  run.add_argument("--max_restarts", type=int, default=100)
  sub.add_parser("status", parents=[common], help="TPU state and the trainer on each worker")
  logs = sub.add_parser("logs", parents=[common], help="a worker's trainer log")
  logs.add_argument("--worker", default="0", help="worker index, or all")
  logs.add_argument("--slice", type=int, default=0, help="which slice's node (multislice)")
  logs.add_argument("--lines", type=int, default=100)
  logs.add_argument("--follow", action="store_true")
  stop = sub.add_parser("stop", parents=[common], help="stop the trainer on every worker")
  stop.add_argument("--grace_s", type=int, default=30,
                    help="SIGTERM, then SIGKILL after this many seconds")
  sub.add_parser("delete", parents=[common], help="delete the TPU VM / queued resource")
  return parser


def settings_from(opts: argparse.Namespace) -> Settings:
  values = load_settings_file(opts.settings) if opts.settings else {}
  for name in _FIELDS:
    flag = getattr(opts, name, None)
    if flag is not None:
      values[name] = dict(flag) if name == "env" else flag
  if "env" in values and not isinstance(values["env"], dict):
    raise LaunchError("setting env must be a table of NAME = VALUE strings")
  values["env"] = {str(k): str(v) for k, v in values.get("env", {}).items()}
  for key, field in _FIELDS.items():
    if key in values and field.type in ("int", int) and not isinstance(values[key], int):
      raise LaunchError(f"setting {key} must be an integer, not {values[key]!r}")
  return validate(Settings(**values))


_STEPS: dict[str, Callable] = {"status": do_status, "logs": do_logs, "stop": do_stop,
                               "delete": do_delete}


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  trainer_args: list[str] = []
  if "--" in argv:
    cut = argv.index("--")
    argv, trainer_args = argv[:cut], argv[cut + 1:]
  opts = build_parser().parse_args(argv)
  try:
    if trainer_args and opts.command != "run":
      raise LaunchError(f"arguments after -- are for the trainer: only `run` takes them, not "
                        f"{opts.command!r}")
    s = settings_from(opts)
    g = Gcloud(opts.dry_run)
    if opts.command == "create":
      do_create(g, s, opts)
      return 0
    if opts.command == "setup":
      do_setup(g, s, opts)
      return 0
    if opts.command == "run":
      return do_run(g, s, opts, trainer_args)
    return _STEPS[opts.command](g, s, opts)
  except LaunchError as e:
    print(f"launch.tpu: error: {e}", file=sys.stderr)
    return e.code
  except KeyboardInterrupt:
    print("launch.tpu: interrupted (the trainer keeps running on the TPU: "
          "`python -m launch.tpu stop` stops it)", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
