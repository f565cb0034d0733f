"""Joining a multi-process JAX job (one process per TPU host, or several CPU processes locally).

Where the settings come from, per key, first found wins:
  1. the config section `config.distributed` (`coordinator` "", `num_processes` 0, `process_id` -1
     mean unset);
  2. the environment: `MAXGEMMA_COORDINATOR`, `MAXGEMMA_NUM_PROCESSES`, `MAXGEMMA_PROCESS_ID`
     (`launch.local` sets all three; `launch.tpu` sets `MAXGEMMA_COORDINATOR=auto` on multi-host
     TPU slices).

What `initialize` then does:
  - coordinator `host:port`: an explicit job of `num_processes` processes (CPU collectives over
    gloo);
  - coordinator `auto`, or a multi-host Cloud TPU environment detected from the variables jax itself
    reads (`TPU_WORKER_HOSTNAMES` / `TPU_PROCESS_ADDRESSES` with several hosts, `MEGASCALE_*`):
    `jax.distributed.initialize()` with no arguments (jax finds the workers itself);
  - nothing set: a single process, nothing to do.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

ENV_COORDINATOR = "MAXGEMMA_COORDINATOR"
ENV_NUM_PROCESSES = "MAXGEMMA_NUM_PROCESSES"
ENV_PROCESS_ID = "MAXGEMMA_PROCESS_ID"
AUTO = "auto"

# Environment variables that mark a multi-host Cloud TPU job (those jax's TPU cluster detection
# reads; on GCE TPU VMs the worker list lives in the metadata server instead, which is why
# launch.tpu sets `MAXGEMMA_COORDINATOR=auto`).
_TPU_HOST_LISTS = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES")
_MEGASCALE = ("MEGASCALE_COORDINATOR_ADDRESS", "MEGASCALE_NUM_SLICES")


@dataclasses.dataclass(frozen=True)
class Plan:
  """What `initialize` will do: mode is "single", "explicit" or "auto"; `why` names the source."""
  mode: str
  coordinator: str = ""
  num_processes: int = 1
  process_id: int = 0
  why: str = "nothing set"


_state: dict[str, Plan] = {}
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def with_cpu_devices(xla_flags: str, devices: int) -> str:
  """An XLA_FLAGS value with its fake CPU device count set to `devices`, its other flags kept."""
  flags = [f for f in xla_flags.split() if not f.startswith(DEVICE_COUNT_FLAG)]
  return " ".join([*flags, f"{DEVICE_COUNT_FLAG}={devices}"])


def _section(dist_cfg: Any) -> Mapping[str, Any]:
  """The `distributed` section from a whole config, the section itself, or None."""
  if dist_cfg is None:
    return {}
  if "distributed" in dist_cfg and not isinstance(dist_cfg["distributed"], (str, int)):
    dist_cfg = dist_cfg["distributed"]
  unknown = set(dist_cfg.keys()) - {"coordinator", "num_processes", "process_id"}
  if unknown:
    raise ValueError(f"unknown key(s) in config.distributed: {', '.join(sorted(unknown))}; "
                     "valid keys: coordinator, num_processes, process_id")
  return dist_cfg


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
  raw = environ.get(name, "").strip()
  if not raw:
    return None
  try:
    return int(raw)
  except ValueError:
    raise ValueError(f"{name}={raw!r} is not an integer: set it to a whole number or unset it") \
        from None


def _tpu_multihost_hint(environ: Mapping[str, str]) -> str:
  """The name of an environment variable showing a multi-host Cloud TPU job, or ""."""
  for name in _TPU_HOST_LISTS:
    hosts = [h for h in environ.get(name, "").split(",") if h.strip()]
    if len(hosts) > 1:
      return name
  if environ.get("MEGASCALE_COORDINATOR_ADDRESS", "").strip():
    return "MEGASCALE_COORDINATOR_ADDRESS"
  slices = environ.get("MEGASCALE_NUM_SLICES", "").strip()
  if slices.isdigit() and int(slices) > 1:
    return "MEGASCALE_NUM_SLICES"
  return ""


def resolve(dist_cfg: Any = None, environ: Mapping[str, str] | None = None) -> Plan:
  """Works out what `initialize` would do, without touching jax. Raises ValueError on bad input."""
  environ = os.environ if environ is None else environ
  section = _section(dist_cfg)

  coordinator = (section.get("coordinator") or "").strip()
  coord_src = "config.distributed.coordinator"
  if not coordinator:
    coordinator, coord_src = environ.get(ENV_COORDINATOR, "").strip(), ENV_COORDINATOR
  num = section.get("num_processes") or 0
  num_src = "config.distributed.num_processes"
  if not num:
    num, num_src = _env_int(environ, ENV_NUM_PROCESSES), ENV_NUM_PROCESSES
  pid = section.get("process_id")
  pid_src = "config.distributed.process_id"
  if pid is None or pid == -1:
    pid, pid_src = _env_int(environ, ENV_PROCESS_ID), ENV_PROCESS_ID

  if coordinator.lower() == AUTO:
    if num is not None or pid is not None:
      given = num_src if num is not None else pid_src
      raise ValueError(f"{coord_src}=auto detects the processes itself, but {given} is also set: "
                       "unset it (or give an explicit host:port coordinator)")
    return Plan("auto", why=f"{coord_src}=auto")

  if coordinator:
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise ValueError(f"{coord_src}={coordinator!r} is not host:port: use e.g. 10.0.0.2:8476 "
                       "(or 'auto' on a Cloud TPU VM)")
    if num is None:
      raise ValueError(f"{coord_src}={coordinator} is set but the number of processes is missing: "
                       f"set config.distributed.num_processes or {ENV_NUM_PROCESSES}")
    if num < 1:
      raise ValueError(f"{num_src}={num} must be at least 1")
    if pid is None:
      raise ValueError(f"{coord_src}={coordinator} is set but this process's id is missing: set "
                       f"config.distributed.process_id or {ENV_PROCESS_ID} (0..{num - 1})")
    if not 0 <= pid < num:
      raise ValueError(f"{pid_src}={pid} is out of range for {num} processes: use 0..{num - 1}")
    return Plan("explicit", coordinator, num, pid, why=coord_src)

  if num is not None or pid is not None:
    if (num in (None, 1)) and (pid in (None, 0)):
      return Plan("single", why=f"{num_src if num is not None else pid_src} says one process")
    given = ", ".join(f"{src}={v}" for src, v in ((num_src, num), (pid_src, pid)) if v is not None)
    raise ValueError(f"{given} is set but no coordinator: set config.distributed.coordinator or "
                     f"{ENV_COORDINATOR} to host:port of process 0 (or 'auto' on a Cloud TPU VM)")

  hint = _tpu_multihost_hint(environ)
  if hint:
    return Plan("auto", why=f"multi-host Cloud TPU environment ({hint})")
  return Plan("single")


def initialize(dist_cfg: Any = None) -> None:
  """Joins the multi-process JAX job described by `dist_cfg` / the environment (see module doc).

  `dist_cfg` is `config.distributed` (or the whole config, or None). Call it before any other jax
  use. A second call is a no-op. Raises ValueError with a one-line fix for inconsistent settings.
  """
  if "plan" in _state:
    return
  import jax

  plan = resolve(dist_cfg)
  if plan.mode != "single" and jax.distributed.is_initialized():
    plan = dataclasses.replace(plan, why=plan.why + "; jax.distributed was already initialized")
  elif plan.mode == "explicit":
    platforms = (jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "") or "cpu").lower()
    if "cpu" in platforms:
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=plan.coordinator,
                               num_processes=plan.num_processes, process_id=plan.process_id)
  elif plan.mode == "auto":
    jax.distributed.initialize()
  _state["plan"] = plan


def plan() -> Plan | None:
  """The plan `initialize` carried out, or None before it ran."""
  return _state.get("plan")


def process_summary() -> str:
  """One line: `process i of P: L local / G global devices (platform)`."""
  import jax

  how = _state.get("plan")
  mode = f", {how.mode}: {how.why}" if how is not None else ""
  return (f"process {jax.process_index()} of {jax.process_count()}: "
          f"{jax.local_device_count()} local / {jax.device_count()} global "
          f"{jax.default_backend()} devices{mode}")
