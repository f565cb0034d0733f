"""Training metrics: peak FLOP/s and MFU, a console/TensorBoard/JSONL writer, one-step-behind fetch.

MFU = model FLOPs per step / (step time * devices * peak FLOP/s per device); the model FLOPs count
comes from the model's FLOPs function (REFERENCE.md section 5), the peak from `hardware.PEAK_FLOPS`
(bf16 dense, per chip) or, on a CPU, from a measured matmul.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np

from maxgemma import hardware, storage
from maxgemma.hardware import known_peak_flops


def measure_cpu_matmul_peak(dtype=jnp.float32, size: int = 1024, repeats: int = 3) -> float:
  """FLOP/s of a jitted [size, size] @ [size, size] matmul on the default device, best of `repeats`.

  Used as the "peak" on CPUs, which have no data-sheet figure here.
  """
  a = jax.random.normal(jax.random.key(0), (size, size), dtype)
  b = jax.random.normal(jax.random.key(1), (size, size), dtype)
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()  # compile and warm up
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * size ** 3 / best


def peak_flops_per_device(configured: float = 0.0, device: jax.Device | None = None) -> float:
  """The peak to use for MFU: `configured` if > 0, else the table entry, else measured on a CPU.

  Raises ValueError for an accelerator the table does not know (set
  `config.metrics.peak_flops_per_device`).
  """
  if configured and configured > 0:
    return float(configured)
  device = device or jax.devices()[0]
  peak = known_peak_flops(device.device_kind)
  if peak is not None:
    return peak
  if device.platform == "cpu":
    return measure_cpu_matmul_peak()
  raise ValueError(f"no peak FLOP/s known for device kind {device.device_kind!r}; set "
                   "config.metrics.peak_flops_per_device (known: " + ", ".join(hardware.PEAK_FLOPS)
                   + ")")


def mfu(model_flops_per_step: float, step_time_s: float, num_devices: int,
        peak_flops_per_device: float) -> float:
  """Model FLOPs utilisation: model_flops_per_step / (step_time_s * num_devices * peak)."""
  if step_time_s <= 0 or num_devices <= 0 or peak_flops_per_device <= 0:
    raise ValueError(f"step_time_s ({step_time_s}), num_devices ({num_devices}) and "
                     f"peak_flops_per_device ({peak_flops_per_device}) must be > 0")
  return model_flops_per_step / (step_time_s * num_devices * peak_flops_per_device)


def _flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in metrics.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(_flatten(value, name + "/"))
    else:
      flat[name] = value
  return flat


def to_scalars(metrics: Mapping[str, Any]) -> dict[str, float | int]:
  """Nested metrics of one-element arrays/numbers -> flat {"a/b": python scalar} (blocks)."""
  out = {}
  for name, value in _flatten(metrics).items():
    arr = np.asarray(value)
    if arr.size != 1:
      raise ValueError(f"metric {name!r} must be a scalar, got shape {arr.shape}")
    scalar = arr.reshape(()).item()
    out[name] = int(scalar) if isinstance(scalar, bool) else scalar
  return out


def _summary_writer_class() -> type:
  """tensorboardX's SummaryWriter, imported without torch.

  tensorboardX imports torch when it is installed, only to accept torch tensors (about 3 s of a
  trainer's start-up); every value written here is a Python float, so torch is hidden from that
  one import."""
  if "tensorboardX" in sys.modules or "torch" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None  # `import torch` raises ImportError: tensorboardX goes without it
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter


class MetricsBuffer:
  """Fetches step N's device metrics only once step N+1 has been dispatched (one step behind).

  The loop calls `push(step, metrics)` right after dispatching a step: the new arrays start copying
  to the host asynchronously and the previous step's arrays (long finished, or finishing while the
  new step is queued) are converted to Python scalars and handed to `sink` (and returned). Call
  `flush()` after the last step.
  """

  def __init__(self, sink: Callable[[int, dict[str, float | int]], None] | None = None):
    self._sink = sink
    self._pending: tuple[int, Any] | None = None

  def push(self, step: int, metrics: Mapping[str, Any]) -> tuple[int, dict] | None:
    """Holds `metrics` (device arrays) for `step`; returns the previous step's scalars, if any."""
    for leaf in jax.tree.leaves(metrics):
      if isinstance(leaf, jax.Array):
        leaf.copy_to_host_async()
    ready = self._emit()
    self._pending = (step, metrics)
    return ready

  def flush(self) -> tuple[int, dict] | None:
    """Converts and hands out the held step, if any."""
    return self._emit()

  def _emit(self) -> tuple[int, dict] | None:
    if self._pending is None:
      return None
    step, metrics = self._pending
    self._pending = None
    values = to_scalars(metrics)
    if self._sink is not None:
      self._sink(step, values)
    return step, values


def _format(value: Any) -> str:
  if isinstance(value, int):
    return str(value)
  return f"{value:.4g}" if isinstance(value, float) else str(value)


class _ObjectLog:
  """An append-only text log kept as one Cloud Storage object.

  Objects cannot be appended to: the log holds the object's text (read back on a resumed run) and
  `flush` uploads it whole, which replaces the object atomically.
  """

  def __init__(self, url: str):
    self._path = storage.path(url)
    self._chunks = [self._path.read_text()] if self._path.exists() else []
    self._dirty = False

  def write(self, text: str) -> None:
    self._chunks.append(text)
    self._dirty = True

  def flush(self) -> None:
    if self._dirty:
      self._path.write_text("".join(self._chunks))
      self._dirty = False

  def close(self) -> None:
    self.flush()


class MetricsWriter:
  """Writes each step's scalars to the console, TensorBoard and `workdir/metrics.jsonl`.

  TensorBoard event files go under `workdir/tensorboard`; the JSON Lines file holds one object
  per `write` (`{"step": ..., name: value}`, non-finite values as NaN/Infinity). Local files are
  flushed at every write; in a `gs://` workdir both are uploaded at most every `remote_flush_s`
  seconds and on `close`. Only process 0 writes, unless `all_processes`.
  """

  def __init__(self, workdir: str, *, tensorboard: bool = True, console: bool = True,
               jsonl: bool = True, all_processes: bool = False, stream: TextIO | None = None,
               remote_flush_s: float = 30.0):
    self.active = all_processes or jax.process_index() == 0
    self._console = console
    self._stream = stream
    self._tb = None
    self._jsonl: Any = None
    remote = storage.is_remote(workdir)
    self._flush_every = remote_flush_s if remote else 0.0
    self._flushed = time.monotonic()
    self._tb_dir = storage.join(workdir, "tensorboard")
    self._tb_staging = None  # remote: event files are written here, then uploaded
    if not self.active:
      return
    if not remote:
      os.makedirs(workdir, exist_ok=True)
    if tensorboard:
      SummaryWriter = _summary_writer_class()
      if remote:
        self._tb_staging = tempfile.mkdtemp(prefix="maxgemma-tensorboard-")
      self._tb = SummaryWriter(logdir=self._tb_staging or self._tb_dir)
    if jsonl:
      log = storage.join(workdir, "metrics.jsonl")
      self._jsonl = _ObjectLog(log) if remote else open(log, "a")  # noqa: SIM115

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Writes one step's metrics (nested dicts of scalars or one-element arrays)."""
    if not self.active:
      return
    values = to_scalars(metrics)
    step = int(step)
    if self._console:
      line = " | ".join([f"step {step}"] + [f"{k} {_format(v)}" for k, v in values.items()])
      print(line, file=self._stream or sys.stdout, flush=True)
    if self._tb is not None:
      for name, value in values.items():
        self._tb.add_scalar(name, float(value), global_step=step)
    if self._jsonl is not None:
      self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
    if time.monotonic() - self._flushed >= self._flush_every:
      self.flush()

  def flush(self) -> None:
    """Writes out everything written so far."""
    for f in (self._tb, self._jsonl):
      if f is not None:
        f.flush()
    if self._tb_staging is not None:
      storage.upload_tree(self._tb_staging, self._tb_dir)
    self._flushed = time.monotonic()

  def close(self) -> None:
    """Flushes and closes the files."""
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._tb_staging is not None:
      storage.upload_tree(self._tb_staging, self._tb_dir)
      shutil.rmtree(self._tb_staging, ignore_errors=True)
      self._tb_staging = None
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
