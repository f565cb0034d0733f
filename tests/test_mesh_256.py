"""A 16 x 16 mesh of 256 fake CPU devices (16-way fsdp x 16-way tensor) runs a real train step."""

import json
import os
import subprocess
import sys

import numpy as np

from tests.xla_env import cpu_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What the rules table says for this model (every dimension divides 16).
EXPECTED = {
    "['embedder']['input_embedding']": ["tensor", "fsdp"],
    "['layers']['attn']['qkv_einsum']['w']": [None, None, "tensor", "fsdp", None],
    "['layers']['attn']['attn_vec_einsum']['w']": [None, "tensor", None, "fsdp"],
    "['layers']['mlp']['gating_einsum']": [None, None, "fsdp", "tensor"],
    "['layers']['mlp']['linear']": [None, "tensor", "fsdp"],
    "['layers']['pre_attention_norm']['scale']": [None, "fsdp"],
    "['final_norm']['scale']": ["fsdp"],
}


def test_16x16_mesh_trains_and_shards_as_the_rules_say():
  env = {**os.environ, "XLA_FLAGS": cpu_flags(256),
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
  result = subprocess.run([sys.executable, "-m", "tests.mesh256_probe"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  np.testing.assert_allclose(report["losses"], report["single_device"], rtol=1e-5)
  for name, spec in EXPECTED.items():
    assert report["leaves"][name]["spec"] == spec, name
  for name, leaf in report["leaves"].items():
    axes = [a for a in leaf["spec"] if a is not None]
    if len(axes) == 2:  # matrices: each of the 256 chips holds 1/256 of the leaf
      assert leaf["fraction"] == 1 / 256, name
