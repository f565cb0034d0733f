"""20 float32 steps of configs/tiny.py: the loss of every step against tests/golden/tiny_loss.json.

Any change to what a training step computes (init, data order, packing, model math, loss,
optimizer, schedule) moves these numbers. When such a change is intended, rewrite the file with
`.venv/bin/python -m tests.test_golden_loss --write` and say why in the commit.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

GOLDEN = pathlib.Path(__file__).parent / "golden" / "tiny_loss.json"
REGENERATE = ".venv/bin/python -m tests.test_golden_loss --write"
DEVICES = 8  # fake CPU devices, as tests/conftest.py sets
# Relative tolerance per step: float32 reductions may reorder between XLA builds and CPUs; a real
# change of the step moves the loss by orders of magnitude more.
RTOL = 1e-4


def tiny_losses(workdir: str) -> list[float]:
  """The logged loss of each step of configs/tiny.py, trained from scratch in `workdir`."""
  import jax  # noqa: PLC0415 (the device count is set before jax starts, see __main__)

  from configs import tiny  # noqa: PLC0415
  from maxgemma.trainer.loop import train  # noqa: PLC0415

  if jax.device_count() != DEVICES:
    raise RuntimeError(f"the golden losses are for {DEVICES} devices, this process has "
                       f"{jax.device_count()}; run with "
                       f"XLA_FLAGS=--xla_force_host_platform_device_count={DEVICES}")
  cfg = tiny.get_config()
  # Only what does not change the numbers: no matmul timing, no TensorBoard, no data thread.
  cfg.metrics.peak_flops_per_device = 1e11
  cfg.metrics.tensorboard = False
  cfg.data.prefetch = 0
  train(cfg, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f if line.strip()]
  losses = {r["step"]: r["loss"] for r in records if "loss" in r}
  assert sorted(losses) == list(range(1, cfg.train.steps + 1)), sorted(losses)
  return [losses[s] for s in sorted(losses)]


def check(got: list[float], want: list[float]) -> list[str]:
  """One line per step whose loss is off by more than RTOL (or a length mismatch)."""
  if len(got) != len(want):
    return [f"{len(got)} steps logged, the golden file has {len(want)}"]
  return [f"step {i}: {g:.7g}, golden {w:.7g} (rel {abs(g - w) / abs(w):.1e})"
          for i, (g, w) in enumerate(zip(got, want, strict=True), start=1)
          if not abs(g - w) <= RTOL * abs(w)]


def test_tiny_losses_match_the_golden_file(tmp_path):
  want = json.loads(GOLDEN.read_text())["loss"]
  bad = check(tiny_losses(str(tmp_path)), want)
  assert not bad, (
      "the configs/tiny.py losses moved from tests/golden/tiny_loss.json:\n  " + "\n  ".join(bad)
      + f"\nIf the change is intended (a new init, data order, loss...), rewrite the file with: "
      f"{REGENERATE}")


def test_check_flags_a_moved_loss():
  """The comparison itself: within RTOL passes, just past it fails, on the first step too."""
  want = [7.0, 6.5]
  assert check([7.0 * (1 + 0.5 * RTOL), 6.5], want) == []
  assert len(check([7.0 * (1 + 2 * RTOL), 6.5], want)) == 1
  assert check([7.0], want) == ["1 steps logged, the golden file has 2"]


if __name__ == "__main__":
  if sys.argv[1:] != ["--write"]:
    sys.exit(f"usage: {REGENERATE}")
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES}"
  os.environ["JAX_PLATFORMS"] = "cpu"
  import tempfile  # noqa: PLC0415

  with tempfile.TemporaryDirectory() as workdir:
    losses = tiny_losses(workdir)
  GOLDEN.write_text(json.dumps({"config": "configs/tiny.py", "devices": DEVICES,
                                "dtype": "float32", "loss": losses}, indent=1) + "\n")
  print(f"wrote {GOLDEN}: {len(losses)} steps, final loss {losses[-1]:.6f}")
