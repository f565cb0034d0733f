"""Sharded residuals (`mesh.shard_residuals`): the residual stream between blocks split along its
length over `tensor` (Megatron-style sequence parallelism).

The same loss as one device (float32, 8 fake CPU devices) with and without it, and the compiled
programs (CPU and a small TPU topology) read for the buffers the scanned layers save for the
backward pass: their per-chip shape must carry length / tensor rows, not the whole length.
"""

import re

import jax
import numpy as np
import pytest

from maxgemma import aot, sharding
from maxgemma.trainer.build import build
from tests.test_parallelism import TOLERANCE, make_config, run_losses

# A dynamic-update-slice inside the forward scan (`jvp(...)`, not `transpose(jvp(...))`) writing one
# layer's slot of a stacked buffer: what the scan saves per layer for the backward pass.
_DUS = re.compile(r"= (\w+)\[([\d,]+)\]\{[^}]*\} dynamic-update-slice\(.*?op_name=\"([^\"]*)\"")


def saved_per_layer_shapes(hlo_text: str, num_layers: int) -> set[tuple[int, ...]]:
  """Per-chip shapes of the stacked [layers, B, L, D] buffers the forward scan fills."""
  shapes = set()
  for _, dims, op_name in _DUS.findall(hlo_text):
    shape = tuple(int(d) for d in dims.split(","))
    if ("/while/body/" in op_name and "jvp(" in op_name and "transpose(" not in op_name
        and len(shape) == 4 and shape[0] == num_layers):
      shapes.add(shape)
  return shapes


@pytest.fixture(scope="module")
def reference():
  return run_losses(make_config(), jax.devices()[:1])[0]


# With the rule on (the default) tests/test_parallelism.py covers data 2 x tensor 4, DCN 2 x
# (data 2 x tensor 2) and fsdp 4 x tensor 2; here fsdp 2 x tensor 4 with it, data 2 x tensor 4
# without.
@pytest.mark.parametrize("layout,shard", [
    (dict(ici_fsdp=2, ici_tensor=4), True),
    (dict(ici_data=2, ici_tensor=4), False),
])
def test_same_loss_as_one_device(reference, layout, shard):
  losses, _ = run_losses(make_config(**layout, shard_residuals=shard), jax.devices())
  assert np.all(np.diff(reference) < 0), reference  # really training
  np.testing.assert_allclose(losses, reference, rtol=TOLERANCE)


def test_rules_switch_only_the_residual_length():
  on = dict(sharding.rules_for(make_config(shard_residuals=True).mesh))
  off = dict(sharding.rules_for(make_config(shard_residuals=False).mesh))
  # The length is split over `sequence` everywhere; the rule adds `tensor` for the residual.
  assert on["act_residual_length"] == ("sequence", "tensor")
  assert off["act_residual_length"] == "sequence" and off["act_length"] == "sequence"
  assert {k: v for k, v in on.items() if k != "act_residual_length"} == \
         {k: v for k, v in off.items() if k != "act_residual_length"}
  # Sampling (no mesh config): the plain rules; its meshes have no `sequence` axis > 1.
  assert dict(sharding.rules_for(None))["act_residual_length"] == "sequence"


def _cpu_program(shard: bool, **mesh) -> str:
  cfg = make_config(**(mesh or dict(ici_data=2, ici_tensor=4)), shard_residuals=shard)
  setup = build(cfg, sharding.make_mesh(cfg.mesh, jax.devices()))
  with setup.scope():
    lowered = setup.train_step.lower(*setup.abstract_args(cfg.train.global_batch,
                                                          cfg.train.seq_len))
  return lowered.compile().as_text()


def _cpu_saved_shapes(shard: bool, **mesh) -> set[tuple[int, ...]]:
  return saved_per_layer_shapes(_cpu_program(shard, **mesh), 4)  # tiny_gemma2: 4 layers


def test_cpu_program_saves_sharded_residuals():
  # tiny_gemma2: 4 layers, d_model 96; batch 16 over data 2, length 32 over tensor 4.
  assert _cpu_saved_shapes(True) == {(4, 8, 8, 96)}
  assert _cpu_saved_shapes(False) == {(4, 8, 32, 96)}
  # Sequence parallelism (sequence 4 x data 2): the length is split 4 ways with or without the
  # rule (it adds `tensor`, 1 here), and XLA attention all-gathers the keys and values
  # [8 rows, all 32 positions, 2 kv heads, 16] over the sequence axis (queries stay split).
  hlo = _cpu_program(False, ici_data=2, ici_sequence=4)
  assert saved_per_layer_shapes(hlo, 4) == {(4, 8, 8, 96)}
  gathers = set(re.findall(r"= (\w+\[[\d,]+\])\{?[^ ]* all-gather\(", hlo))
  assert gathers & {"f32[8,32,2,16]"} and not gathers & {"f32[8,32,4,16]"}, gathers


def _tpu_config(shard: bool):
  c = make_config("tiny_gemma1_mha", ici_fsdp=2, ici_tensor=2, shard_residuals=shard)
  c.model.dtype = "bfloat16"
  c.model.num_layers = 3  # a leading dimension no other buffer has
  c.train.global_batch = 4
  c.train.seq_len = 256
  return c


@pytest.mark.slow
def test_tpu_program_saves_sharded_residuals():
  """The real TPU executable (v5e:2x2, fsdp 2 x tensor 2, remat full): the block inputs the scan
  saves are [layers, batch / fsdp, length / tensor, d_model] per chip; replicated over `tensor`
  without the rule, which is what made the 7B pod layout run out of HBM."""
  shapes = {}
  for shard in (True, False):
    r = aot.compile_train_step(_tpu_config(shard), "v5e:2x2", 1, keep_compiled=True)
    assert r["remat_policy"] == "full" and r["mesh"]["tensor"] == 2
    shapes[shard] = saved_per_layer_shapes(r["compiled"].as_text(), 3)
  assert shapes[True] == {(3, 2, 128, 64)}, shapes
  assert shapes[False] == {(3, 2, 256, 64)}, shapes
