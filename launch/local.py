"""Run a multi-process JAX job on this machine: P processes x D fake CPU devices, real collectives.

  python -m launch.local --processes=2 --devices_per_process=4 [--port=N] [--module=maxgemma.train]
      [--log_dir=DIR] [--timeout=SECONDS] [--grace_s=SECONDS] [--signal_grace_s=SECONDS]
      -- <arguments for the module>

Each process runs `python -m <module> <arguments>` with MAXGEMMA_COORDINATOR=127.0.0.1:PORT,
MAXGEMMA_NUM_PROCESSES=P, MAXGEMMA_PROCESS_ID=i, JAX_PLATFORMS=cpu and
XLA_FLAGS=--xla_force_host_platform_device_count=D (see maxgemma/distributed.py). Process 0's output
is streamed with a `[p0]` prefix; every process's output goes to DIR/process_<i>.log. If a process
fails (non-zero exit or killed) the others are stopped (SIGTERM to each process group, SIGKILL after
--grace_s) and the launcher exits non-zero naming it. Ctrl-C / SIGTERM to the launcher is forwarded
as SIGTERM to every process (a preemption notice: the trainer saves and exits 0); the launcher waits
up to --signal_grace_s for them, SIGKILLs what is left (at once on a second Ctrl-C / SIGTERM),
prints every process's exit code and exits 0 only when all of them exited 0. No jax import here:
the launcher only starts and watches processes.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence

from maxgemma.distributed import with_cpu_devices


class LaunchError(Exception):
  """Bad input for the launcher: printed as one `error:` line, exit code 2."""


def free_port() -> int:
  """A TCP port on 127.0.0.1 that is free right now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def child_env(base: dict[str, str], *, port: int, processes: int, process_id: int,
              devices: int) -> dict[str, str]:
  """The environment of process `process_id`: base plus the MAXGEMMA_* / XLA / JAX settings."""
  env = dict(base)
  env["XLA_FLAGS"] = with_cpu_devices(env.get("XLA_FLAGS", ""), devices)
  env.update(MAXGEMMA_COORDINATOR=f"127.0.0.1:{port}", MAXGEMMA_NUM_PROCESSES=str(processes),
             MAXGEMMA_PROCESS_ID=str(process_id), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  return env


def _describe_exit(code: int) -> str:
  if code < 0:
    try:
      return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
      return f"was killed by signal {-code}"
  return f"exited with code {code}"


def _tail(path: str, lines: int = 15) -> str:
  try:
    with open(path, errors="replace") as f:
      return "".join(f.readlines()[-lines:])
  except OSError:
    return ""


class Job:
  """The P child processes, their log files and process 0's output pump."""

  def __init__(self, argv: list[str], processes: int, devices: int, port: int, log_dir: str,
               out=None, grace_s: float = 5.0):
    self.out = out or sys.stdout
    self.grace_s = grace_s
    self.logs = [os.path.join(log_dir, f"process_{i}.log") for i in range(processes)]
    self.procs: list[subprocess.Popen] = []
    self._pump: threading.Thread | None = None
    for i in range(processes):
      env = child_env(dict(os.environ), port=port, processes=processes, process_id=i,
                      devices=devices)
      log = open(self.logs[i], "w")  # noqa: SIM115 - closed in stop()/wait
      stdout = subprocess.PIPE if i == 0 else log
      # A new session per child: a terminal's Ctrl-C reaches only the launcher, which stops them.
      proc = subprocess.Popen(argv, env=env, stdout=stdout, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, start_new_session=True)
      proc.log_file = log  # type: ignore[attr-defined]
      self.procs.append(proc)
      if i == 0:
        self._pump = threading.Thread(target=self._stream, args=(proc, log), daemon=True)
        self._pump.start()

  def _stream(self, proc: subprocess.Popen, log) -> None:
    for raw in iter(proc.stdout.readline, b""):
      line = raw.decode(errors="replace")
      log.write(line)
      log.flush()
      self.out.write(f"[p0] {line}" if line.endswith("\n") else f"[p0] {line}\n")
      self.out.flush()

  def first_failure(self) -> int | None:
    """Index of a process that ended with a non-zero code, if any."""
    for i, proc in enumerate(self.procs):
      if proc.poll() not in (None, 0):
        return i
    return None

  def all_done(self) -> bool:
    return all(proc.poll() is not None for proc in self.procs)

  def signal_all(self, sig: int) -> int:
    """Sends `sig` to every running child's process group; returns how many were running."""
    running = [p for p in self.procs if p.poll() is None]
    for proc in running:
      try:
        os.killpg(proc.pid, sig)
      except ProcessLookupError:
        pass
    return len(running)

  def exit_codes(self) -> str:
    """`process 0 exited with code 0, process 1 was killed by SIGKILL` (every child has ended)."""
    return ", ".join(f"process {i} {_describe_exit(p.returncode)}"
                     for i, p in enumerate(self.procs))

  def stop(self) -> int:
    """SIGTERM every running child's process group, SIGKILL after a grace period; returns count."""
    running = [p for p in self.procs if p.poll() is None]
    for sig in (signal.SIGTERM, signal.SIGKILL):
      for proc in running:
        if proc.poll() is None:
          try:
            os.killpg(proc.pid, sig)
          except ProcessLookupError:
            pass
      deadline = time.monotonic() + self.grace_s
      while time.monotonic() < deadline and any(p.poll() is None for p in running):
        time.sleep(0.05)
      if all(p.poll() is not None for p in running):
        break
    for proc in running:
      proc.wait()
    return len(running)

  def close(self) -> None:
    if self._pump is not None:
      self._pump.join(timeout=5)
    for proc in self.procs:
      proc.log_file.close()


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  """Launcher flags before `--`, the module's arguments after it."""
  argv = list(argv)
  rest: list[str] = []
  if "--" in argv:
    cut = argv.index("--")
    argv, rest = argv[:cut], argv[cut + 1:]
  parser = argparse.ArgumentParser(prog="python -m launch.local",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--processes", type=int, required=True, help="number of processes P")
  parser.add_argument("--devices_per_process", type=int, default=1, help="fake CPU devices each")
  parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
  parser.add_argument("--module", default="maxgemma.train", help="python -m MODULE in each process")
  parser.add_argument("--log_dir", default="", help="per-process logs (default: a new temp dir)")
  parser.add_argument("--timeout", type=float, default=0.0,
                      help="stop everything after this many seconds (0: no limit)")
  parser.add_argument("--grace_s", type=float, default=5.0,
                      help="when stopping: SIGTERM, then SIGKILL after this many seconds")
  parser.add_argument("--signal_grace_s", type=float, default=120.0,
                      help="after forwarding Ctrl-C / SIGTERM: seconds the processes get to save "
                           "and exit before SIGKILL")
  args = parser.parse_args(argv)
  if args.processes < 1:
    raise LaunchError(f"--processes={args.processes}: need at least 1 process")
  if args.devices_per_process < 1:
    raise LaunchError(f"--devices_per_process={args.devices_per_process}: need at least 1 device")
  if not 0 <= args.port < 65536:
    raise LaunchError(f"--port={args.port} is not a TCP port: use 1..65535 or 0 for a free one")
  for name in ("timeout", "grace_s", "signal_grace_s"):
    if getattr(args, name) < 0:
      raise LaunchError(f"--{name}={getattr(args, name):g} is negative: give seconds >= 0")
  if not args.module or args.module.startswith("-"):
    raise LaunchError(f"--module={args.module!r}: give a module name such as maxgemma.train")
  return args, rest


def launch(args: argparse.Namespace, module_args: list[str], out=None) -> int:
  """Starts the job, watches it, returns the launcher's exit code."""
  out = out or sys.stdout
  port = args.port or free_port()
  log_dir = args.log_dir or tempfile.mkdtemp(prefix="maxgemma-local-")
  os.makedirs(log_dir, exist_ok=True)
  argv = [sys.executable, "-m", args.module, *module_args]
  print(f"launch.local: {args.processes} processes x {args.devices_per_process} devices, "
        f"coordinator 127.0.0.1:{port}, logs in {log_dir}", file=out, flush=True)

  stop_signal: list[int] = []
  handler = lambda signum, _frame: stop_signal.append(signum)
  previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
  job = Job(argv, args.processes, args.devices_per_process, port, log_dir, out=out,
            grace_s=args.grace_s)
  start = time.monotonic()
  forwarded_at = None  # when the first Ctrl-C / SIGTERM was forwarded to the processes
  killed = False
  try:
    while True:
      if stop_signal and forwarded_at is None:
        forwarded_at = time.monotonic()
        count = job.signal_all(signal.SIGTERM)
        print(f"launch.local: got {signal.Signals(stop_signal[0]).name}: forwarded SIGTERM to "
              f"{count} running process(es); waiting up to {args.signal_grace_s:g}s for them to "
              "save and exit (again: SIGKILL now)", file=sys.stderr, flush=True)
      if forwarded_at is not None and not killed and (
          len(stop_signal) > 1 or time.monotonic() - forwarded_at > args.signal_grace_s):
        killed = True
        job.signal_all(signal.SIGKILL)
      failed = job.first_failure()
      if forwarded_at is not None and (failed is not None or job.all_done()):
        job.stop()  # others of a failed process cannot finish their collectives
        job.close()
        codes = [p.returncode for p in job.procs]
        print(f"launch.local: after {signal.Signals(stop_signal[0]).name}: {job.exit_codes()}; "
              f"logs in {log_dir}", file=sys.stderr, flush=True)
        if all(c == 0 for c in codes):
          return 0
        return next((c for c in codes if 0 < c < 126), 128 + stop_signal[0])
      if failed is not None:
        code = job.procs[failed].returncode
        stopped = job.stop()
        job.close()
        tail = _tail(job.logs[failed])
        if failed != 0 and tail:
          print(f"launch.local: last lines of process {failed}'s log:\n{tail.rstrip()}",
                file=sys.stderr)
        print(f"launch.local: error: process {failed} {_describe_exit(code)} "
              f"(log: {job.logs[failed]}); stopped the other {stopped} running process(es)",
              file=sys.stderr, flush=True)
        return code if 0 < code < 126 else 1
      if job.all_done():
        job.close()
        print(f"launch.local: all {args.processes} processes finished OK "
              f"({time.monotonic() - start:.1f}s)", file=out, flush=True)
        return 0
      if args.timeout and time.monotonic() - start > args.timeout:
        stopped = job.stop()
        job.close()
        print(f"launch.local: error: timed out after {args.timeout:g}s: stopped {stopped} "
              f"running process(es); logs in {log_dir}", file=sys.stderr, flush=True)
        return 124
      time.sleep(0.05)
  finally:
    for sig, old in previous.items():
      signal.signal(sig, old)
    if any(p.poll() is None for p in job.procs):  # an unexpected exception: never leave orphans
      job.stop()


def main(argv: Sequence[str] | None = None) -> int:
  try:
    args, rest = parse(sys.argv[1:] if argv is None else argv)
  except LaunchError as e:
    print(f"launch.local: error: {e}", file=sys.stderr)
    return 2
  return launch(args, rest)


if __name__ == "__main__":
  sys.exit(main())
