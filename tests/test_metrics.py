"""maxgemma.metrics: peak table, MFU, one-step-behind fetch, and files read back."""

import glob
import io
import json
import math
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.crc32c import crc32c
from tensorboardX.proto import event_pb2

from maxgemma import metrics
from maxgemma.metrics import (
    MetricsBuffer,
    MetricsWriter,
    known_peak_flops,
    measure_cpu_matmul_peak,
    mfu,
    peak_flops_per_device,
)


@pytest.mark.parametrize("kind,expected", [
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5", 459e12),
    ("TPU v5p", 459e12), ("TPU v6 lite", 918e12), ("TPU v6e", 918e12),
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-40GB", 312e12), ("cpu", None), ("NVIDIA GeForce RTX 4090", None),
])
def test_known_peak_flops(kind, expected):
  assert known_peak_flops(kind) == expected


def test_mfu():
  # 6e12 FLOPs in 2 s on 4 devices of 1e12 FLOP/s: 6 / 8.
  assert mfu(6e12, 2.0, 4, 1e12) == pytest.approx(0.75)
  assert mfu(197e12 * 256 * 0.5, 1.0, 256, 197e12) == pytest.approx(0.5)
  with pytest.raises(ValueError):
    mfu(1e12, 0.0, 1, 1e12)


def test_cpu_matmul_peak_and_peak_resolution(monkeypatch):
  measured = measure_cpu_matmul_peak(size=256, repeats=2)
  assert math.isfinite(measured) and measured > 0
  assert peak_flops_per_device(123.0) == 123.0
  monkeypatch.setattr(metrics, "measure_cpu_matmul_peak", lambda: 42.0)
  assert jax.devices()[0].platform == "cpu"
  assert peak_flops_per_device(0.0) == 42.0  # a CPU: measured

  class FakeDevice:
    platform, device_kind = "gpu", "NVIDIA H100 80GB HBM3"
  assert peak_flops_per_device(0.0, FakeDevice()) == 989e12
  FakeDevice.device_kind = "Some Future Chip"
  with pytest.raises(ValueError, match="peak_flops_per_device"):
    peak_flops_per_device(0.0, FakeDevice())


class _Lazy:
  """A metric value that records when it is converted to a host number."""

  def __init__(self, value):
    self.value, self.converted = value, False

  def __array__(self, dtype=None, copy=None):
    self.converted = True
    return np.asarray(self.value, dtype=dtype)


def test_buffer_converts_one_step_behind():
  seen = []
  buf = MetricsBuffer(sink=lambda step, values: seen.append((step, values)))
  a, b = _Lazy(1.5), _Lazy(2.5)
  assert buf.push(1, {"loss": a}) is None
  assert not a.converted and seen == []
  assert buf.push(2, {"loss": b}) == (1, {"loss": 1.5})
  assert a.converted and not b.converted
  assert buf.flush() == (2, {"loss": 2.5})
  assert b.converted
  assert buf.flush() is None
  assert seen == [(1, {"loss": 1.5}), (2, {"loss": 2.5})]


def test_buffer_device_values_arrive_in_order():
  @jax.jit
  def step(x):
    x = x * 1.5 + 1.0
    return x, {"loss": jnp.sum(x), "train": {"count": jnp.int32(x.size), "max": jnp.max(x)}}

  x = jnp.arange(6, dtype=jnp.float32)
  seen, expected = [], []
  buf = MetricsBuffer(sink=lambda s, v: seen.append((s, v)))
  for i in range(5):
    x, m = step(x)
    expected.append((i, {"loss": float(np.asarray(m["loss"])), "train/count": 6,
                         "train/max": float(np.asarray(m["train"]["max"]))}))
    buf.push(i, m)
  assert len(seen) == 4  # one behind
  buf.flush()
  assert seen == expected
  assert isinstance(seen[0][1]["train/count"], int)


def _read_tfrecords(path):
  """Event protos from a TFRecord file, checking both masked CRC32C checksums."""
  def masked(data):
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

  events = []
  with open(path, "rb") as f:
    while header := f.read(8):
      (length,) = struct.unpack("<Q", header)
      assert struct.unpack("<I", f.read(4))[0] == masked(header)
      data = f.read(length)
      assert struct.unpack("<I", f.read(4))[0] == masked(data)
      event = event_pb2.Event()
      event.ParseFromString(data)
      events.append(event)
  return events


def test_writer_console_jsonl_and_tensorboard(tmp_path):
  out = io.StringIO()
  rows = [(10, {"loss": 2.5, "lr": jnp.float32(3e-4), "tokens": 4096}),
          (20, {"loss": jnp.asarray([1.25]), "lr": 1e-4, "tokens": np.int64(8192),
                "eval": {"loss": 1.75}}),
          (30, {"loss": float("nan"), "lr": 0.0, "tokens": 0})]
  with MetricsWriter(str(tmp_path), stream=out) as writer:
    for step, values in rows:
      writer.write(step, values)

  lines = out.getvalue().splitlines()
  assert len(lines) == 3
  assert lines[0] == "step 10 | loss 2.5 | lr 0.0003 | tokens 4096"
  assert lines[1].startswith("step 20 | loss 1.25") and "eval/loss 1.75" in lines[1]

  with open(tmp_path / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == [10, 20, 30]
  assert records[0] == {"step": 10, "loss": 2.5, "lr": pytest.approx(3e-4), "tokens": 4096}
  assert records[1]["eval/loss"] == 1.75 and records[1]["tokens"] == 8192
  assert math.isnan(records[2]["loss"])

  files = glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
  assert len(files) == 1
  scalars = {}
  for event in _read_tfrecords(files[0]):
    for value in event.summary.value:
      scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  assert scalars["loss"][:2] == [(10, 2.5), (20, 1.25)]
  assert scalars["loss"][2][0] == 30 and math.isnan(scalars["loss"][2][1])
  assert scalars["eval/loss"] == [(20, 1.75)]
  assert scalars["tokens"] == [(10, 4096.0), (20, 8192.0), (30, 0.0)]
  assert scalars["lr"][0] == (10, pytest.approx(3e-4))


def test_writer_appends_across_restarts(tmp_path):
  for step in (1, 2):
    with MetricsWriter(str(tmp_path), console=False, tensorboard=False) as writer:
      writer.write(step, {"loss": float(step)})
  with open(tmp_path / "metrics.jsonl") as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2]


def test_writer_is_silent_off_process_zero(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  out = io.StringIO()
  with MetricsWriter(str(tmp_path / "w"), stream=out) as writer:
    writer.write(1, {"loss": 1.0})
  assert out.getvalue() == "" and not os.path.exists(tmp_path / "w")
  with MetricsWriter(str(tmp_path / "all"), stream=out, all_processes=True) as writer:
    writer.write(1, {"loss": 1.0})
  assert out.getvalue() and os.path.exists(tmp_path / "all" / "metrics.jsonl")


def test_non_scalar_metric_raises(tmp_path):
  with MetricsWriter(str(tmp_path), console=False, tensorboard=False) as writer:
    with pytest.raises(ValueError, match="scalar"):
      writer.write(1, {"hist": np.zeros(3)})


def test_tensorboard_writer_does_not_import_torch(tmp_path):
  """tensorboardX imports torch when it is installed (seconds of every trainer's start-up); the
  writer hides it, writes its events, and leaves torch importable afterwards."""
  import importlib.util
  import subprocess
  import sys
  if importlib.util.find_spec("torch") is None:
    pytest.skip("torch is not installed: nothing to hide")
  code = ("import sys\n"
          "from maxgemma.metrics import MetricsWriter\n"
          f"w = MetricsWriter({str(tmp_path)!r}, tensorboard=True)\n"
          "w.write(1, {'loss': 2.5}); w.close()\n"
          "assert 'torch' not in sys.modules, 'torch was imported'\n"
          "import torch\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
