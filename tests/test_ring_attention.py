"""Ring attention (`attention_impl="ring"`): the sequence axis without gathering keys and values.

The ring alone equals the float64 reference (outputs and gradients) on sequence 4 x data 2 and
sequence 4 x tensor 2 meshes of the 8 fake CPU devices; the tiny Gemma 2 trains with it as one
device does with "xla"; the compiled program passes key/value chunks round (collective-permute)
and gathers no full-length keys or values.
"""

import logging
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxgemma import sharding
from maxgemma.model import attention_kernels
from maxgemma.model.attention_reference import GLOBAL_WINDOW, self_attention
from tests.test_attention_kernels import _inputs
from tests.test_parallelism import TOLERANCE, make_config, run_losses

B, L, H = 2, 64, 16  # sequence 4: chunks of 16 positions
AXES = ("act_batch", "act_length", "act_heads", None)


def _mesh(data=2, sequence=4, tensor=1):
  devices = np.array(jax.devices()[:data * sequence * tensor]).reshape(data, 1, sequence, tensor)
  return jax.sharding.Mesh(devices, sharding.MESH_AXES)


def _ring(seg, window, softcap):
  return lambda q, k, v: attention_kernels.attend(q, k, v, impl="ring", segment_ids_BL=seg,
                                                  window=window, softcap=softcap)


def _value_and_grads(f, q, k, v, cot):
  """The output and the gradients wrt q, k, v of sum(output * cot)."""
  out, pull = jax.vjp(f, q, k, v)
  return (out, *pull(cot))


CASES = {  # name: (N, K, window, softcap, tensor, packed)
    "global": (4, 2, GLOBAL_WINDOW, None, 1, False),
    "window_below_chunk": (4, 2, 5, None, 1, True),
    "window_above_chunk": (4, 2, 24, None, 1, True),
    "softcap_packed": (4, 2, GLOBAL_WINDOW, 1.5, 1, True),
    "mqa_heads_split": (4, 1, 24, None, 2, True),  # tensor 2 splits the heads, K=1 repeated
    "gqa_heads_split": (4, 2, GLOBAL_WINDOW, 1.5, 2, True),  # 2 groups of 2, one kv head each
}


@pytest.mark.parametrize("case", CASES)
def test_ring_equals_float64_reference(case):
  N, K, window, softcap, tensor, packed = CASES[case]
  q, k, v, seg = _inputs(B=B, L=L, N=N, K=K, H=H, packed=packed)
  seg = seg if packed else None
  cot = jax.random.normal(jax.random.key(7), q.shape)
  mesh = _mesh(data=2 // tensor, tensor=tensor)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    spec = attention_kernels.shard_spec(AXES, q.shape, mesh)
    got = jax.jit(lambda *a: _value_and_grads(_ring(seg, window, softcap), *a))(q, k, v, cot)
  assert spec[1] == "sequence" and (spec[2] == "tensor") == (tensor > 1)
  with jax.enable_x64(True):
    as64 = lambda x: jnp.asarray(np.asarray(x, np.float64))
    reference = lambda q, k, v: self_attention(q, k, v, seg, window, softcap)
    want = _value_and_grads(reference, *map(as64, (q, k, v, cot)))
    want = [np.asarray(w) for w in want]
  assert got[0].dtype == jnp.float32
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
    np.testing.assert_allclose(np.asarray(g), w, atol=1e-5, rtol=1e-5, err_msg=name)


def test_traced_window_and_fallback_without_sequence_axis(caplog):
  """A traced per-layer window goes through attend's switch; a mesh whose rules do not split the
  length (data 8) has nothing to ring over: the reference, with the reason logged."""
  q, k, v, seg = _inputs(B=8, L=L, N=4, K=2, H=H)
  with jax.set_mesh(_mesh()), nn.logical_axis_rules(sharding.RULES):
    got = jax.jit(lambda w: attention_kernels.attend(
        q, k, v, impl="ring", segment_ids_BL=seg, window=w, windows=(5, GLOBAL_WINDOW)))(5)
  np.testing.assert_allclose(got, self_attention(q, k, v, seg, 5), atol=1e-5, rtol=1e-5)
  attention_kernels._logged.clear()
  with caplog.at_level(logging.WARNING), jax.set_mesh(_mesh(data=8, sequence=1)), \
      nn.logical_axis_rules(sharding.RULES):
    got = jax.jit(_ring(seg, 5, None))(q, k, v)
  assert "nothing to ring over" in caplog.text
  np.testing.assert_allclose(got, self_attention(q, k, v, seg, 5), atol=1e-6, rtol=1e-6)


def test_compiled_ring_permutes_and_gathers_no_keys():
  """The compiled CPU program (forward and backward) of sequence 4 x data 2: collective-permutes
  pass the chunks round; no all-gather makes a full-length [.., 64, K, H] key/value array."""
  q, k, v, seg = _inputs(B=B, L=L, N=4, K=2, H=H)
  with jax.set_mesh(_mesh()), nn.logical_axis_rules(sharding.RULES):
    hlo = jax.jit(lambda *a: _value_and_grads(_ring(seg, 24, None), *a)).lower(
        q, k, v, q).compile().as_text()
  assert "collective-permute" in hlo
  gathers = [ln for ln in hlo.splitlines() if "all-gather(" in ln
             and re.search(rf"= \w+\[\d+,{L},", ln)]
  assert not gathers, f"keys/values gathered to the whole length: {gathers[:3]}"


def test_model_trains_as_one_device_with_xla(monkeypatch):
  """Tiny Gemma 2 (sliding windows of 8 and global layers, soft-caps, two packed documents per
  row) with the ring on sequence 4 x data 2: the losses of 3 float32 steps are one device's with
  the dense "xla" attention."""
  reference, _ = run_losses(make_config(), jax.devices()[:1])
  cfg = make_config(ici_sequence=4, ici_data=2)
  cfg.model.attention_impl = "ring"
  rings = []  # the ring's traces of one shard (not the reference's fallback)
  local = attention_kernels._ring_local
  monkeypatch.setattr(attention_kernels, "_ring_local",
                      lambda q, *a, **kw: rings.append(q.shape) or local(q, *a, **kw))
  losses, _ = run_losses(cfg, jax.devices())
  # Each shard's queries: 16 rows / data 2, 32 positions / sequence 4, 4 heads, head_dim 16.
  assert rings and set(rings) == {(8, 8, 4, 16)}, rings
  assert np.all(np.diff(reference) < 0), reference
  np.testing.assert_allclose(losses, reference, rtol=TOLERANCE)
