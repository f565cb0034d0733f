"""A fake `gcloud` executable that records its argv and answers from canned rules.

Used by tests/test_launch_tpu.py (in-process `launch.tpu.main`) and tests/test_docs.py (the
documented `python -m launch.tpu ...` commands run as real processes).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BASH = shutil.which("bash") or "/bin/bash"

FAKE_GCLOUD = r'''#!{python}
import fcntl, json, os, sys
argv = sys.argv[1:]
log = os.environ["FAKE_GCLOUD_LOG"]
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
'''

# Rules under which every launch.tpu command succeeds: TPUs are READY, queued resources ACTIVE,
# every other call (bucket check, create, scp, ssh, log stream) exits 0.
ALL_GOOD = [{"match": ["queued-resources", "describe"], "stdout": "ACTIVE\n"},
            {"match": ["tpu-vm", "describe"], "stdout": "READY\n"}]


class Fake:
  """A fake gcloud in `tmp/bin`: `rules` pick canned output; `calls()` returns recorded argv.

  `env()` holds the variables that put it first on PATH (for subprocesses); `install` sets them
  in this process.
  """

  def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch | None = None):
    self.bin = tmp / "bin"
    self.bin.mkdir(parents=True)
    gcloud = self.bin / "gcloud"
    gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
    gcloud.chmod(0o755)
    self.log, self.rules_path = tmp / "calls.jsonl", tmp / "rules.json"
    self.rules([])
    if monkeypatch is not None:
      self.install(monkeypatch)

  def env(self, path: str | None = None) -> dict[str, str]:
    """FAKE_GCLOUD_* and a PATH (default: this process's) with the fake first."""
    path = os.environ["PATH"] if path is None else path
    return {"PATH": f"{self.bin}{os.pathsep}{path}", "FAKE_GCLOUD_LOG": str(self.log),
            "FAKE_GCLOUD_RULES": str(self.rules_path)}

  def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in self.env().items():
      monkeypatch.setenv(key, value)

  def rules(self, rules: list[dict]) -> None:
    self.rules_path.write_text(json.dumps(rules))

  def calls(self) -> list[list[str]]:
    if not self.log.exists():
      return []
    return [["gcloud", *json.loads(line)] for line in self.log.read_text().splitlines()]


def as_bash_reads_it(line: str) -> list[str]:
  """The argv bash passes to gcloud for one printed line (so copy-paste is exact)."""
  script = "gcloud() { printf '%s\\0' gcloud \"$@\"; }; " + line
  res = subprocess.run([BASH, "-c", script], capture_output=True, check=True)
  return res.stdout.decode().split("\0")[:-1]
