"""Helpers for trainer tests: configs, running `maxgemma.train` as a real process, reading logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import ml_collections

from configs import tiny
from tests.xla_env import cpu_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEAK = 1e11  # a fixed peak FLOP/s, so runs do not measure this machine's matmul speed


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  """configs/tiny.py with dotted overrides, e.g. tiny_config(**{"train.steps": 4})."""
  cfg = tiny.get_config()
  cfg.metrics.peak_flops_per_device = PEAK
  cfg.data.prefetch = 0
  cfg.optim.warmup_steps = 1
  return set_keys(cfg, **overrides)


def set_keys(cfg: ml_collections.ConfigDict, **overrides) -> ml_collections.ConfigDict:
  """`cfg` with dotted `section.key` overrides applied (in place), e.g. {"lora.rank": 4}."""
  for key, value in overrides.items():
    section, name = key.split(".")
    cfg[section][name] = value
  return cfg


def train_command(workdir: str, *overrides: str) -> list[str]:
  return [sys.executable, "-m", "maxgemma.train", f"--config={ROOT}/configs/tiny.py",
          f"--workdir={workdir}", f"--config.metrics.peak_flops_per_device={PEAK}",
          "--config.data.prefetch=0", "--config.optim.warmup_steps=1", *overrides]


def env(devices: int = 8) -> dict[str, str]:
  e = dict(os.environ)
  e.update(XLA_FLAGS=cpu_flags(devices), JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  return e


def run_train(workdir: str, *overrides: str, devices: int = 8, timeout: int = 300
              ) -> subprocess.CompletedProcess:
  return subprocess.run(train_command(workdir, *overrides), env=env(devices), cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


def logged(workdir: str) -> list[dict]:
  """Every record of metrics.jsonl, in order (a resumed run appends)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def losses_by_step(workdir: str) -> dict[int, list[float]]:
  out: dict[int, list[float]] = {}
  for record in logged(workdir):
    if "loss" in record:
      out.setdefault(record["step"], []).append(record["loss"])
  return out
