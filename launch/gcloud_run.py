"""The gcloud runner of launch.tpu and its subcommand steps (create, setup, run, status, ...).

`Gcloud` runs argv lists with no terminal (stdin is /dev/null) or, with dry_run, only prints them.
Before the first ssh it makes sure gcloud's ssh key exists, creating it without a prompt, so no
parallel step ever races to create it. Stdlib only.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from launch import gcloud_argv as ga
from launch.gcloud_argv import LaunchError, Settings
from launch.startup import startup_script


class Gcloud:
  """Runs argv lists (echoing them to stderr), or with dry_run prints them to stdout only."""

  def __init__(self, dry_run: bool, out=None, sleep=time.sleep, clock=time.monotonic):
    self.dry_run = dry_run
    self.out = out or sys.stdout
    self.sleep, self.clock = sleep, clock
    self._key_checked = False
    if not dry_run and shutil.which(ga.GCLOUD) is None:
      raise LaunchError("gcloud is not on PATH: install the Google Cloud CLI "
                        "(https://cloud.google.com/sdk/docs/install), or use --dry_run to only "
                        "print the commands")

  def show(self, argv: Sequence[str]) -> None:
    if self.dry_run:
      print(ga.command_line(argv), file=self.out, flush=True)
    else:
      print(f"+ {ga.command_line(argv)}", file=sys.stderr, flush=True)

  def say(self, text: str) -> None:
    print(f"launch.tpu: {text}", file=sys.stderr, flush=True)

  def run(self, argv: Sequence[str], capture: bool = False) -> subprocess.CompletedProcess:
    """Runs one command with no terminal; with capture its stdout/stderr come back as text."""
    self.show(argv)
    if self.dry_run:
      return subprocess.CompletedProcess(argv, 0, "", "")
    return subprocess.run(list(argv), capture_output=capture, text=True,
                          stdin=subprocess.DEVNULL, start_new_session=True)

  def run_all(self, argvs: Sequence[Sequence[str]],
              capture: bool = False) -> list[subprocess.CompletedProcess]:
    """Runs commands side by side (one per node, at most 16 at once), results in order."""
    if self.dry_run:
      return [self.run(a) for a in argvs]
    with ThreadPoolExecutor(max_workers=max(1, min(len(argvs), 16))) as pool:
      return list(pool.map(lambda a: self.run(a, capture), argvs))

  def ensure_ssh_key(self) -> None:
    """gcloud's ssh key: made here once, without a passphrase prompt, before any parallel ssh."""
    if self.dry_run or self._key_checked:
      return
    key = Path(os.path.expanduser(ga.SSH_KEY))
    if not key.exists():
      if shutil.which("ssh-keygen") is None:
        raise LaunchError(f"no ssh key {ga.SSH_KEY} and no ssh-keygen to make one: install OpenSSH"
                          " (ssh, ssh-keygen), then re-run")
      try:
        key.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
      except OSError as e:
        raise LaunchError(f"cannot create {key.parent} for gcloud's ssh key ({e.strerror}): fix "
                          "its permissions, then re-run") from None
      res = self.run(ga.keygen_cmd(str(key)), capture=True)
      if res.returncode or not key.exists():
        why = (res.stderr or res.stdout).strip().splitlines()
        raise LaunchError(f"ssh-keygen could not make {ga.SSH_KEY} "
                          f"({why[-1] if why else 'exit code ' + str(res.returncode)}): make it "
                          f"with `{shlex.join(ga.keygen_cmd(ga.SSH_KEY))}`, then re-run")
      self.say(f"made gcloud's ssh key {ga.SSH_KEY} (no passphrase)")
    self._key_checked = True

  def ssh_all(self, s: Settings, worker: str, command: str,
              capture: bool = False) -> list[subprocess.CompletedProcess]:
    self.ensure_ssh_key()
    return self.run_all([ga.ssh_cmd(s, node, worker, command) for node in s.nodes], capture)


def ssh_problem(node: str, res: subprocess.CompletedProcess) -> str:
  """One line on what to do when ssh itself (not the remote command) failed, else ''."""
  text = f"{res.stderr or ''}\n{res.stdout or ''}"
  if "REMOTE HOST IDENTIFICATION HAS CHANGED" in text or "Host key verification failed" in text:
    return (f"the ssh host key of {node} changed (a recreated TPU VM keeps its name): remove the "
            f"old one with `ssh-keygen -R` on ~/.ssh/google_compute_known_hosts (or delete that "
            "file), then re-run")
  if "Permission denied (publickey" in text:
    return (f"ssh to {node} was refused (publickey): gcloud's key {ga.SSH_KEY}.pub is not on the "
            "TPU VM yet (it can take a minute after creation) or OS Login refuses it; retry, or "
            f"add it with `gcloud compute os-login ssh-keys add --key-file={ga.SSH_KEY}.pub`")
  return ""


def _ago(seconds: float) -> str:
  s = int(seconds)
  return f"{s // 3600}h{s // 60 % 60:02d}m{s % 60:02d}s" if s >= 3600 else (
      f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


def _last_line(res: subprocess.CompletedProcess, default: str) -> str:
  lines = (res.stderr or res.stdout or "").strip().splitlines()
  return lines[-1] if lines else default


def delete_hint(s: Settings) -> str:
  return f"delete it with: {shlex.join(ga.delete_cmd(s))}"


# ----------------------------------------------------------------------------------------------
# State

def check_bucket(g: Gcloud, s: Settings) -> None:
  """A gs:// workdir must name a bucket that exists (checked before anything is created)."""
  if not s.bucket:
    return
  res = g.run(ga.bucket_cmd(s), capture=True)
  if res.returncode:
    raise LaunchError(f"bucket gs://{s.bucket} of --workdir={s.workdir} does not exist or is not "
                      f"accessible ({_last_line(res, 'describe failed')}): create it with "
                      f"`gcloud storage buckets create gs://{s.bucket} --location=REGION` or fix "
                      "--workdir")


def qr_state(g: Gcloud, s: Settings) -> str | None:
  """The queued resource's state; None when it does not exist ('' in a dry run)."""
  res = g.run(ga.state_cmd(s), capture=True)
  if g.dry_run:
    return ""
  if res.returncode:
    if re.search(r"NOT_FOUND|not found", res.stderr or ""):
      return None
    raise LaunchError(f"cannot describe queued resource {s.name} in {s.zone} "
                      f"({_last_line(res, 'describe failed')}): check --project/--zone and "
                      "`gcloud auth login`")
  lines = res.stdout.strip().splitlines()
  return lines[-1].strip() if lines else None


def wait_active(g: Gcloud, s: Settings, opts: argparse.Namespace) -> None:
  """Waits in the queue until ACTIVE, printing the state and the time waited."""
  start = g.clock()
  while True:
    state = qr_state(g, s)
    if g.dry_run or state == ga.ACTIVE:
      return
    waited = g.clock() - start
    if state is None:
      raise LaunchError(f"queued resource {s.name} disappeared while waiting (deleted?): "
                        "`python -m launch.tpu create` makes it again")
    if state in ga.ENDED:
      raise LaunchError(f"queued resource {s.name} is {state}, not ACTIVE (no capacity within its "
                        "time limits, quota, or a bad request: `gcloud compute tpus "
                        f"queued-resources describe {s.name}` says why); nothing runs, but the "
                        f"request stays until deleted: {delete_hint(s)}")
    if opts.wait_timeout_s and waited > opts.wait_timeout_s:
      raise LaunchError(f"queued resource {s.name} still {state or 'unknown'} after "
                        f"{_ago(waited)} (--wait_timeout_s={opts.wait_timeout_s:g}): it stays in "
                        "the queue; wait again with `python -m launch.tpu create`, or "
                        f"{delete_hint(s)}")
    g.say(f"{s.name} is {state or 'unknown'} (waited {_ago(waited)}); waiting for ACTIVE")
    g.sleep(opts.poll_s)


@dataclasses.dataclass
class Health:
  """What `worker.sh status` said on every worker."""
  expected: int
  running: list[str] = dataclasses.field(default_factory=list)
  ok: list[str] = dataclasses.field(default_factory=list)
  failed: dict[str, int] = dataclasses.field(default_factory=dict)
  stopped: list[str] = dataclasses.field(default_factory=list)
  never: list[str] = dataclasses.field(default_factory=list)
  silent_nodes: list[str] = dataclasses.field(default_factory=list)  # no answer at all
  lines: list[str] = dataclasses.field(default_factory=list)

  def summary(self) -> str:
    parts = [f"trainer running on {len(self.running)}/{self.expected} workers"]
    if self.ok:
      parts.append(f"finished OK on {len(self.ok)}")
    if self.failed:
      parts.append(f"failed on {len(self.failed)}")
    if self.stopped:
      parts.append(f"stopped on {len(self.stopped)}")
    if self.never or self.silent_nodes:
      rest = self.expected - len(self.running) - len(self.ok) - len(self.failed) - len(
          self.stopped)
      parts.append(f"installing or unreachable on {rest}")
    return ", ".join(parts)


def health(g: Gcloud, s: Settings, echo: bool = False) -> Health:
  """The trainer's state on every worker of every node (one ssh per node)."""
  h = Health(expected=s.hosts)
  pattern = re.compile(rf"^(\S+): {re.escape(s.run_name)} (running|finished with exit code "
                       r"(\d+)|was stopped or killed|never started)")
  for node, res in zip(s.nodes, g.ssh_all(s, "all", ga.status_command(s), capture=True),
                       strict=True):
    found = False
    for line in (res.stdout or "").splitlines():
      m = pattern.match(line.strip())
      if not m:
        continue
      found = True
      h.lines.append(line.strip())
      host, what = m.group(1), m.group(2)
      if what == "running":
        h.running.append(host)
      elif m.group(3) is not None:
        (h.ok.append(host) if m.group(3) == "0" else h.failed.__setitem__(host, int(m.group(3))))
      elif what.startswith("was stopped"):
        h.stopped.append(host)
      else:
        h.never.append(host)
    if not found and not g.dry_run:
      h.silent_nodes.append(node)
      problem = ssh_problem(node, res)
      if problem:
        raise LaunchError(problem)
  if echo:
    for line in h.lines:
      print(line, file=g.out, flush=True)
  return h


def progress(g: Gcloud, s: Settings) -> str:
  """The newest checkpoint step and the metrics' last step in a gs:// workdir."""
  if not s.workdir.startswith("gs://"):
    return ""
  ls = g.run(ga.checkpoints_cmd(s), capture=True)
  steps = [int(m) for m in re.findall(r"/checkpoints/(\d+)/\s*$", ls.stdout or "", re.M)]
  tail = g.run(ga.metrics_tail_cmd(s), capture=True)
  metric = None
  for line in reversed((tail.stdout or "").splitlines()):
    try:
      metric = int(json.loads(line)["step"])
      break
    except (ValueError, KeyError, TypeError):
      continue
  ckpt = f"newest checkpoint step {max(steps)}" if steps else "no checkpoint yet"
  return f"{ckpt}, metrics at step {metric if metric is not None else '-'}"


# ----------------------------------------------------------------------------------------------
# Subcommand steps

def prepare_source(g: Gcloud, s: Settings, tarball: str) -> tuple[str, str]:
  """Uploads this checkout's source (pinned by its sha256); returns (uri, sha256)."""
  data = ga.source_tarball()
  sha = hashlib.sha256(data).hexdigest()
  local = tarball or os.path.join(tempfile.gettempdir(), f"maxgemma-src-{s.name}.tar.gz")
  uri = f"{s.source_dir}/maxgemma-src-{sha[:16]}.tar.gz"
  if not g.dry_run:
    Path(local).write_bytes(data)
  res = g.run(ga.upload_cmd(local, uri))
  if res.returncode:
    raise LaunchError(f"uploading the source to {uri} failed (exit code {res.returncode}): check "
                      "that the bucket exists and you may write to it; nothing was created")
  return uri, sha


def do_create(g: Gcloud, s: Settings, opts: argparse.Namespace, trainer_args: Sequence[str],
              state: str | None = None) -> None:
  """Queues the TPU with the run's startup script and waits until it is ACTIVE."""
  if not s.source_dir:
    raise LaunchError("the workers install maxgemma at every boot from a gs:// copy of this "
                      "source: use a gs:// --workdir, or --source_uri=gs://BUCKET/PATH")
  check_bucket(g, s)
  if state is None and not g.dry_run:
    state = qr_state(g, s)
  if state:
    g.say(f"{s.name} exists ({state}): not creating it again (its startup script keeps the "
          "trainer arguments it was created with)")
    wait_active(g, s, opts)
    return
  uri, sha = prepare_source(g, s, opts.tarball)
  script = os.path.join(tempfile.gettempdir(), f"maxgemma-startup-{s.name}.sh")
  if not g.dry_run:
    Path(script).write_text(startup_script(s, trainer_args, uri, sha))
  res = g.run(ga.create_cmd(s, script))
  if res.returncode:
    raise LaunchError(f"creating {s.name} failed (exit code {res.returncode}); if part of it was "
                      f"created, {delete_hint(s)}")
  try:
    wait_active(g, s, opts)
  except LaunchError as e:
    raise LaunchError(str(e) if "delete it with" in str(e) else f"{e}; {delete_hint(s)}") from None
  if not g.dry_run:
    g.say(f"{s.name} is ACTIVE: its startup script installs maxgemma and starts the trainer on "
          f"every worker (boot log: {ga.REMOTE_HOME}/logs/boot.log); watch: python -m launch.tpu "
          "status")


def do_setup(g: Gcloud, s: Settings, opts: argparse.Namespace) -> int:
  """Runs the startup script again on every worker now (installs if missing, starts if idle)."""
  codes = [r.returncode for r in g.ssh_all(s, "all", ga.RERUN_STARTUP)]
  bad = [node for node, rc in zip(s.nodes, codes, strict=True) if rc]
  if bad:
    raise LaunchError(f"re-running the startup script failed on {', '.join(bad)} (see above; its "
                      f"log is {ga.REMOTE_HOME}/logs/boot.log on each worker); safe to re-run")
  return 0


def _preempted_nodes(g: Gcloud, s: Settings, h: Health) -> list[str]:
  out = []
  for node in h.silent_nodes:
    res = g.run(ga.node_state_cmd(s, node), capture=True)
    state = (res.stdout or "").strip()
    if state in ga.NODE_PREEMPTED:
      out.append(f"{node} {state}")
  return out


def do_run(g: Gcloud, s: Settings, opts: argparse.Namespace, trainer_args: list[str]) -> int:
  """Creates the TPU if needed, then watches the job until it ends; recreates after preemption."""
  if opts.restart_on_preemption and not s.workdir.startswith("gs://"):
    raise LaunchError("--restart_on_preemption needs a gs:// --workdir: a recreated TPU VM has a "
                      "new disk, so checkpoints must live in a bucket to resume")
  state = None if g.dry_run else qr_state(g, s)
  if state in ga.ENDED and opts.restart_on_preemption:
    _recreate(g, s, opts, trainer_args, state)
  elif state in ga.ENDED:
    raise LaunchError(f"queued resource {s.name} is {state}: re-run with --restart_on_preemption, "
                      f"or {delete_hint(s)} and run again")
  else:
    if state and trainer_args:
      g.say(f"{s.name} exists: the arguments after -- are ignored (the startup script keeps those "
            "it was created with; delete it to change them)")
    do_create(g, s, opts, trainer_args, "" if state is None else state)
  restarts, start = 0, g.clock()
  while True:
    state = qr_state(g, s)
    if g.dry_run:
      health(g, s)
      progress(g, s)
      return 0
    why = ""
    if state == ga.ACTIVE:
      h = health(g, s)
      preempted = _preempted_nodes(g, s, h) if h.silent_nodes else []
      if not preempted:
        g.say(f"{s.name} ACTIVE: {h.summary()}; {progress(g, s) or 'local workdir'} "
              f"({_ago(g.clock() - start)})")
        if len(h.ok) == h.expected:
          g.say(f"{s.run_name} finished OK on {s.name}")
          return 0
        if not h.running and (h.failed or h.stopped) and not h.never and not h.silent_nodes:
          host, rc = next(iter(h.failed.items()), (h.stopped[0] if h.stopped else "?", 1))
          what = (f"the trainer exited with code {rc} on {host}" if h.failed
                  else f"the trainer was stopped on {host}")
          raise LaunchError(f"{what}; logs: python -m launch.tpu logs --worker=all; start it "
                            "again: python -m launch.tpu setup", code=rc if 0 < rc < 126 else 1)
        g.sleep(opts.poll_s)
        continue
      why = ", ".join(preempted)
    elif state in ga.QUEUED:
      g.say(f"{s.name} is {state} ({_ago(g.clock() - start)}); waiting for ACTIVE")
      g.sleep(opts.poll_s)
      continue
    elif state in ga.ENDED or state is None:
      why = state or "deleted"
    else:
      g.say(f"{s.name} is {state or 'in an unknown state'}; waiting")
      g.sleep(opts.poll_s)
      continue
    if not opts.restart_on_preemption or restarts >= opts.max_restarts:
      what = ("re-run with --restart_on_preemption" if not opts.restart_on_preemption
              else f"gave up after {restarts} restarts")
      raise LaunchError(f"{s.name} was preempted ({why}): {what}; or recreate by hand: "
                        f"{shlex.join(ga.delete_cmd(s))} && python -m launch.tpu run")
    restarts += 1
    g.say(f"{s.name} was preempted ({why}): recreating it; the trainer resumes from {s.workdir} "
          f"(restart {restarts} of at most {opts.max_restarts})")
    _recreate(g, s, opts, trainer_args, why)


def _recreate(g: Gcloud, s: Settings, opts: argparse.Namespace, trainer_args: Sequence[str],
              why: str) -> None:
  res = g.run(ga.delete_cmd(s))
  if res.returncode:
    raise LaunchError(f"deleting the preempted {s.name} ({why}) failed (exit code "
                      f"{res.returncode}); retry: {shlex.join(ga.delete_cmd(s))}")
  do_create(g, s, opts, trainer_args, state="")


def do_status(g: Gcloud, s: Settings, opts: argparse.Namespace) -> int:
  state = qr_state(g, s)
  shown = state or ("not found" if state is None else "unknown")
  print(f"{s.name}: {shown} ({s.slices} x "
        f"{s.accelerator_type}, {s.zone})", file=g.out if not g.dry_run else sys.stderr,
        flush=True)
  if g.dry_run or state == ga.ACTIVE:
    h = health(g, s, echo=True)
    line = progress(g, s)
    if not g.dry_run:
      print(f"{h.summary()}{'; ' + line if line else ''}", file=g.out, flush=True)
  return 0


def do_logs(g: Gcloud, s: Settings, opts: argparse.Namespace) -> int:
  if not 0 <= opts.slice < s.slices:
    raise LaunchError(f"--slice={opts.slice} is out of range: this TPU has slices "
                      f"0..{s.slices - 1}")
  if opts.worker != "all" and not (opts.worker.isdigit()
                                   and int(opts.worker) < s.hosts_per_slice):
    raise LaunchError(f"--worker={opts.worker!r}: use all or 0..{s.hosts_per_slice - 1}")
  g.ensure_ssh_key()
  node = s.nodes[opts.slice]
  return g.run(ga.ssh_cmd(s, node, opts.worker, ga.logs_command(s, opts.lines, opts.follow))
               ).returncode


def do_stop(g: Gcloud, s: Settings, opts: argparse.Namespace) -> int:
  return 1 if any(r.returncode for r in g.ssh_all(s, "all", ga.stop_command(s, opts.grace_s))) \
      else 0


def do_delete(g: Gcloud, s: Settings, opts: argparse.Namespace) -> int:
  rc = g.run(ga.delete_cmd(s)).returncode
  if rc:
    raise LaunchError(f"deleting {s.name} failed (exit code {rc}); check with "
                      f"{shlex.join(ga.state_cmd(s))}")
  return 0
