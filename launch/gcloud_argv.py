"""Settings and the pure builders of launch.tpu: gcloud argv lists and the workers' shell commands.

Nothing here runs a process or touches the network (launch/gcloud_run.py does). Every variable part
of a remote `--command` string is shlex-quoted once; launch/worker.sh uses its arguments as given.
Stdlib only.
"""

from __future__ import annotations

import dataclasses
import difflib
import gzip
import hashlib
import io
import json
import re
import shlex
import tarfile
import tomllib
from collections.abc import Sequence
from pathlib import Path

from launch.tpu_types import (
  FAMILIES,
  Family,
  LaunchError,
  check_zone,
  known_types,
  parse_accelerator,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
# maxgemma's directory on every worker (the startup script runs as root and installs it there);
# remote commands read it from $MAXGEMMA_HOME first, so a test can point it at a scratch disk.
REMOTE_HOME = "/opt/maxgemma"
REMOTE_CD = 'cd "${MAXGEMMA_HOME:-' + REMOTE_HOME + '}"'
SOURCE_PATHS = (
    "pyproject.toml", "requirements.txt", "README.md", "maxgemma", "launch", "configs")
GCLOUD = "gcloud"
SSH_KEY = "~/.ssh/google_compute_engine"  # gcloud's key for TPU VM ssh/scp

# Queued-resource states (the Cloud TPU queued-resources guide).
ACTIVE = "ACTIVE"
QUEUED = {"CREATING", "ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING"}
ENDED = {"FAILED", "SUSPENDING", "SUSPENDED"}  # the resources are gone or never came
NODE_PREEMPTED = {"PREEMPTED", "TERMINATED"}  # tpu-vm node states after a preemption


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
  internal_ip: bool = False  # no external IPs: create with --internal-ips, ssh with --internal-ip
  source_uri: str = ""  # gs:// folder for the source tarball ("" = WORKDIR/launch)
  skip_zone_check: bool = False

  @property
  def family(self) -> Family:
    return parse_accelerator(self.accelerator_type)[0]

  @property
  def hosts_per_slice(self) -> int:
    family, size, _ = parse_accelerator(self.accelerator_type)
    return family.hosts(size)

  @property
  def hosts(self) -> int:
    return self.hosts_per_slice * self.slices

  @property
  def multislice(self) -> bool:
    return self.slices > 1

  @property
  def nodes(self) -> list[str]:
    """TPU VM node names: NAME, or NAME-0 .. NAME-(S-1) for several slices."""
    return [self.name] if self.slices == 1 else [f"{self.name}-{i}" for i in range(self.slices)]

  @property
  def bucket(self) -> str:
    return self.workdir[len("gs://"):].split("/")[0] if self.workdir.startswith("gs://") else ""

  @property
  def source_dir(self) -> str:
    """Where create uploads the source tarball for the workers' startup script."""
    if self.source_uri:
      return self.source_uri.rstrip("/")
    return f"{self.workdir.rstrip('/')}/launch" if self.workdir.startswith("gs://") else ""


FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


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
    if key not in FIELDS:
      close = difflib.get_close_matches(key, list(FIELDS), n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      raise LaunchError(f"unknown setting {key!r} in {path}{hint}; valid: {', '.join(FIELDS)}")
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
  if not s.skip_zone_check:
    check_zone(family, s.zone)
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
  if s.hosts > 1 and s.workdir and not s.workdir.startswith("gs://"):
    raise LaunchError(f"--workdir={s.workdir} is not gs://, but {s.slices} x {canonical} runs on "
                      f"{s.hosts} hosts, which must share one workdir (and a rebuilt host resumes "
                      "from it): use --workdir=gs://BUCKET/PATH")
  if s.source_uri and not re.fullmatch(r"gs://[^/]+(/.*)?", s.source_uri):
    raise LaunchError(f"--source_uri={s.source_uri!r}: use gs://BUCKET/PATH (a folder the TPU "
                      "VMs can read)")
  if not s.runtime_version:
    s.runtime_version = family.runtime
  return s


# ----------------------------------------------------------------------------------------------
# gcloud commands (argv lists)

def where(s: Settings) -> list[str]:
  return [f"--zone={s.zone}"] + ([f"--project={s.project}"] if s.project else [])


def qr_cmd(s: Settings, verb: str) -> list[str]:
  return [GCLOUD, "compute", "tpus", "queued-resources", verb, s.name, *where(s)]


def create_cmd(s: Settings, startup_script_path: str) -> list[str]:
  """Every size is a queued resource (it waits for capacity); one node, or one per slice."""
  nodes = ([f"--node-id={s.name}"] if s.slices == 1
           else [f"--node-count={s.slices}", f"--node-prefix={s.name}"])
  provisioning = {"spot": ["--spot"], "reserved": ["--reserved"], "on-demand": []}
  return [*qr_cmd(s, "create"), f"--accelerator-type={s.accelerator_type}",
          f"--runtime-version={s.runtime_version}", *nodes, *provisioning[s.provisioning],
          *(["--internal-ips"] if s.internal_ip else []),
          f"--metadata-from-file=startup-script={startup_script_path}"]


def delete_cmd(s: Settings) -> list[str]:
  """--force also deletes the TPU VMs the queued resource made."""
  return [*qr_cmd(s, "delete"), "--force", "--quiet"]


def state_cmd(s: Settings) -> list[str]:
  return [*qr_cmd(s, "describe"), "--format=value(state.state)"]


def node_state_cmd(s: Settings, node: str) -> list[str]:
  return [GCLOUD, "compute", "tpus", "tpu-vm", "describe", node, *where(s),
          "--format=value(state)"]


def bucket_cmd(s: Settings) -> list[str]:
  args = [GCLOUD, "storage", "buckets", "describe", f"gs://{s.bucket}", "--format=value(name)"]
  return args + ([f"--project={s.project}"] if s.project else [])


def upload_cmd(local: str, uri: str) -> list[str]:
  return [GCLOUD, "storage", "cp", local, uri]


def checkpoints_cmd(s: Settings) -> list[str]:
  return [GCLOUD, "storage", "ls", f"{s.workdir.rstrip('/')}/checkpoints/"]


def metrics_tail_cmd(s: Settings, nbytes: int = 4096) -> list[str]:
  return [GCLOUD, "storage", "cat", f"--range=-{nbytes}", f"{s.workdir.rstrip('/')}/metrics.jsonl"]


def ssh_cmd(s: Settings, node: str, worker: str, command: str) -> list[str]:
  """Non-interactive: a recreated node's new host key is accepted, nothing asks for input."""
  return [GCLOUD, "compute", "tpus", "tpu-vm", "ssh", node, *where(s), f"--worker={worker}",
          f"--command={command}", *(["--internal-ip"] if s.internal_ip else []),
          "--strict-host-key-checking=no", "--ssh-flag=-oBatchMode=yes", "--quiet"]


def keygen_cmd(path: str) -> list[str]:
  """gcloud's ssh key, made without a passphrase prompt."""
  return ["ssh-keygen", "-q", "-t", "rsa", "-b", "3072", "-N", "", "-f", path, "-C", "maxgemma"]


# ----------------------------------------------------------------------------------------------
# The trainer and the workers' shell commands

def trainer_argv(s: Settings, trainer_args: Sequence[str]) -> list[str]:
  """The trainer's argv on a worker (relative to the maxgemma directory)."""
  argv = [".venv/bin/python", "-m", s.module]
  if s.config:
    argv.append(f"--config={s.config}")
  if s.workdir:
    argv.append(f"--workdir={s.workdir}")
  return argv + list(trainer_args)


def trainer_env(s: Settings) -> dict[str, str]:
  """Environment for the trainer: multi-host runs join the job with jax's TPU auto-detection."""
  env = {"MAXGEMMA_COORDINATOR": "auto"} if s.hosts > 1 else {}
  env.update(s.env)
  return env


def start_argv(s: Settings, trainer_args: Sequence[str]) -> list[str]:
  """`worker.sh start` of the trainer (run from the maxgemma directory)."""
  env = trainer_env(s)
  prefix = ["env", *(f"{k}={v}" for k, v in env.items())] if env else []
  return ["bash", "launch/worker.sh", "start", s.run_name, *prefix, *trainer_argv(s, trainer_args)]


def worker_command(s: Settings, what: str, *args: str) -> str:
  """launch/worker.sh WHAT on a worker, as root (the startup script's trainer runs as root)."""
  return f"{REMOTE_CD} && sudo -n " + shlex.join(["bash", "launch/worker.sh", what, s.run_name,
                                                   *args])


def status_command(s: Settings) -> str:
  return worker_command(s, "status")


def stop_command(s: Settings, grace_s: int = 30) -> str:
  return worker_command(s, "stop", str(int(grace_s)))


def logs_command(s: Settings, lines: int, follow: bool) -> str:
  return worker_command(s, "logs", str(int(lines)), *(["follow"] if follow else []))


RERUN_STARTUP = "sudo -n google_metadata_script_runner startup"  # the guest agent's runner


# ----------------------------------------------------------------------------------------------
# The source tarball

def requirements_hash(s: Settings, root: Path = REPO_ROOT) -> str:
  """Changes when the requirements (or the Python version) change: workers reinstall then."""
  h = hashlib.sha256(s.python.encode())
  for name in ("requirements.txt", "pyproject.toml"):
    path = root / name
    h.update(path.read_bytes() if path.exists() else b"")
  return h.hexdigest()[:12]


def source_tarball(root: Path = REPO_ROOT) -> bytes:
  """The repo's source (no caches, no venv) as a .tar.gz; the same tree gives the same bytes."""
  def clean(ti: tarfile.TarInfo) -> tarfile.TarInfo | None:
    if "__pycache__" in ti.name or ti.name.endswith(".pyc"):
      return None
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti

  raw = io.BytesIO()
  with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
    for rel in SOURCE_PATHS:
      if (root / rel).exists():
        tar.add(root / rel, arcname=rel, filter=clean)
  out = io.BytesIO()
  with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as gz:
    gz.write(raw.getvalue())
  return out.getvalue()


# ----------------------------------------------------------------------------------------------
# Printing commands

def quote(arg: str) -> str:
  """shlex.quote, except that control characters (newlines...) use bash's $'...' form, so every
  printed command stays on one line and pastes back into bash as exactly the same argv."""
  if not any(ord(c) < 32 or ord(c) == 127 for c in arg):
    return shlex.quote(arg)

  def one(c: str) -> str:
    if c in "\\'":
      return "\\" + c
    return f"\\x{ord(c):02x}" if ord(c) < 32 or ord(c) == 127 else c

  return "$'" + "".join(one(c) for c in arg) + "'"


def command_line(argv: Sequence[str]) -> str:
  """One command as one line of bash."""
  return " ".join(quote(a) for a in argv)
