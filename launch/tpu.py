"""Run maxgemma's trainer on Cloud TPU: queue the TPUs, let every worker install and start the
trainer by itself at each boot, watch the job, recreate it after a preemption, clean up.

  python -m launch.tpu SUBCOMMAND [--settings=FILE] [flags] [--dry_run] [-- trainer arguments]

Subcommands: create, setup, run, status, logs, stop, delete (see docs/tpu.md). Every TPU is a queued
resource NAME (it waits for capacity) whose nodes are NAME, or NAME-0 .. NAME-(S-1) for S slices.
Its startup script (launch/startup.py) installs the pinned source and starts the trainer on every
boot of every worker, so a rebuilt node rejoins with no ssh from here. Settings come from
`--settings` (JSON, or TOML by the .toml suffix) and flags (flags win). `--dry_run` prints every
gcloud command, one per line, shell-quoted, and runs nothing.

This module is the command line; launch/gcloud_argv.py builds the commands, launch/gcloud_run.py
runs them, launch/tpu_types.py holds the accelerator table. Stdlib only: a laptop without jax must
run this.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from launch import gcloud_run as gr
from launch.gcloud_argv import FIELDS, Settings, load_settings_file, validate
from launch.tpu_types import LaunchError, known_types


def _env_pair(text: str) -> tuple[str, str]:
  key, sep, value = text.partition("=")
  if not sep:
    raise argparse.ArgumentTypeError(f"--env {text!r}: use KEY=VALUE")
  return key, value


def build_parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False)
  g = common.add_argument_group("settings (flags override --settings)")
  g.add_argument("--settings", default="", help="JSON or TOML file with the settings below")
  g.add_argument("--name", help="queued resource name (and the node name or prefix)")
  g.add_argument("--zone", help="e.g. us-west4-a")
  g.add_argument("--project", help="GCP project (default: gcloud's)")
  g.add_argument("--accelerator_type", help=f"one of: {known_types()}")
  g.add_argument("--slices", type=int, help="number of slices (>1: multislice)")
  g.add_argument("--provisioning", choices=("on-demand", "spot", "reserved"))
  g.add_argument("--runtime_version", help="TPU software version (default: by accelerator type)")
  g.add_argument("--workdir", help="trainer --workdir (gs://BUCKET/PATH to survive preemption)")
  g.add_argument("--config", help="trainer --config file, e.g. configs/gemma_2b.py")
  g.add_argument("--module", help="trainer module (default maxgemma.train)")
  g.add_argument("--run_name", help="names the log/pid files on the workers (default train)")
  g.add_argument("--python", help="workers' Python version (default 3.11)")
  g.add_argument("--env", action="append", type=_env_pair, default=None, metavar="KEY=VALUE",
                 help="extra trainer environment variable (repeatable)")
  g.add_argument("--internal_ip", action="store_const", const=True, default=None,
                 help="no external IPs: create with --internal-ips, ssh with --internal-ip")
  g.add_argument("--source_uri",
                 help="gs:// folder for the source tarball (default WORKDIR/launch)")
  g.add_argument("--skip_zone_check", action="store_const", const=True, default=None,
                 help="accept a zone the Cloud TPU zone table does not list")
  common.add_argument("--dry_run", action="store_true", help="print the gcloud commands only")
  common.add_argument("--poll_s", type=float, default=30.0, help="seconds between state checks")
  common.add_argument("--wait_timeout_s", type=float, default=0.0,
                      help="give up waiting in the queue after this long (0: wait)")
  common.add_argument("--tarball", default="", help="where the source tarball is packed locally")

  parser = argparse.ArgumentParser(prog="python -m launch.tpu",
                                   description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
  sub.add_parser("create", parents=[common],
                 help="queue the TPU with the run's startup script: create [-- ARGS]")
  sub.add_parser("setup", parents=[common],
                 help="run the startup script again on every worker now (idempotent)")
  run = sub.add_parser("run", parents=[common],
                       help="create if needed, then watch the job: run [-- ARGS]")
  run.add_argument("--restart_on_preemption", action="store_true",
                   help="recreate the TPU after a preemption (the trainer resumes)")
  run.add_argument("--max_restarts", type=int, default=100)
  sub.add_parser("status", parents=[common], help="TPU state, the trainer on each worker, steps")
  logs = sub.add_parser("logs", parents=[common], help="a worker's trainer log")
  logs.add_argument("--worker", default="0", help="worker index, or all")
  logs.add_argument("--slice", type=int, default=0, help="which slice's node (multislice)")
  logs.add_argument("--lines", type=int, default=100)
  logs.add_argument("--follow", action="store_true")
  stop = sub.add_parser("stop", parents=[common], help="stop the trainer on every worker")
  stop.add_argument("--grace_s", type=int, default=30,
                    help="SIGTERM, then SIGKILL after this many seconds")
  sub.add_parser("delete", parents=[common], help="delete the queued resource and its TPU VMs")
  return parser


def settings_from(opts: argparse.Namespace) -> Settings:
  values = load_settings_file(opts.settings) if opts.settings else {}
  for name in FIELDS:
    flag = getattr(opts, name, None)
    if flag is not None:
      values[name] = dict(flag) if name == "env" else flag
  if "env" in values and not isinstance(values["env"], dict):
    raise LaunchError("setting env must be a table of NAME = VALUE strings")
  values["env"] = {str(k): str(v) for k, v in values.get("env", {}).items()}
  for key, field in FIELDS.items():
    if key not in values:
      continue
    if field.type in ("bool", bool) and not isinstance(values[key], bool):
      raise LaunchError(f"setting {key} must be true or false, not {values[key]!r}")
    if field.type in ("int", int) and (not isinstance(values[key], int)
                                       or isinstance(values[key], bool)):
      raise LaunchError(f"setting {key} must be an integer, not {values[key]!r}")
  return validate(Settings(**values))


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  trainer_args: list[str] = []
  if "--" in argv:
    cut = argv.index("--")
    argv, trainer_args = argv[:cut], argv[cut + 1:]
  opts = build_parser().parse_args(argv)
  try:
    if trainer_args and opts.command not in ("create", "run"):
      raise LaunchError(f"arguments after -- are for the trainer: only `create` and `run` take "
                        f"them, not {opts.command!r}")
    s = settings_from(opts)
    g = gr.Gcloud(opts.dry_run)
    if opts.command == "create":
      gr.do_create(g, s, opts, trainer_args)
      return 0
    if opts.command == "run":
      return gr.do_run(g, s, opts, trainer_args)
    steps = {"setup": gr.do_setup, "status": gr.do_status, "logs": gr.do_logs, "stop": gr.do_stop,
             "delete": gr.do_delete}
    return steps[opts.command](g, s, opts)
  except LaunchError as e:
    print(f"launch.tpu: error: {e}", file=sys.stderr)
    return e.code
  except KeyboardInterrupt:
    print("launch.tpu: interrupted (the TPU and its trainer keep running: `python -m launch.tpu "
          "status` watches, `stop` stops, `delete` deletes)", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
