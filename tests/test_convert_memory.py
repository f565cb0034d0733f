"""Import peak memory: a ~340 MB float32 HF model imports with < 1.5x its size of extra memory.

The import runs in a fresh subprocess; peak RSS (VmHWM) is taken right before the import
(Python, jax, orbax and tensorstore loaded: the baseline) and after it. The increase is what the
import itself needed: one float32 copy of the model plus a layer of temporaries and orbax's write
buffers.
"""

import json
import os
import subprocess
import sys

import numpy as np

from maxgemma.convert import hf
from maxgemma.convert.safetensors_io import ShardedWriter
from maxgemma.model.config import ModelConfig
from tests.xla_env import FAST_COMPILE

LIMIT = 1.5
SCRIPT = """
import json, sys
def peak():  # VmHWM: this process's peak RSS (ru_maxrss would include the forking parent's)
  line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
  return int(line.split()[1]) * 1024
from maxgemma.import_weights import import_weights
import jax, orbax.checkpoint, tensorstore  # the baseline includes the libraries
before = peak()
import_weights("hf", sys.argv[1], sys.argv[2])
print(json.dumps({"before": before, "after": peak()}))
"""


def test_import_peak_memory_below_1_5x_model(tmp_path):
  cfg = ModelConfig(family="gemma1", num_layers=8, d_model=1024, ffn_dim=2048, num_heads=8,
                    num_kv_heads=1, head_dim=128, vocab_size=16_384, max_seq_len=2048)
  src = str(tmp_path / "hf")
  os.makedirs(src)
  shapes = hf.hf_shapes(cfg)
  writer = ShardedWriter(src, {n: (s, np.float32) for n, s in shapes.items()},
                         max_shard_bytes=128 << 20)
  rng = np.random.default_rng(0)
  for name, shape in shapes.items():
    writer.write(name, rng.standard_normal(shape, np.float32) * 0.02)
  writer.close()
  with open(os.path.join(src, "config.json"), "w") as f:
    json.dump(hf.hf_config(cfg), f)
  model_bytes = sum(int(np.prod(s)) * 4 for s in shapes.values())
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": FAST_COMPILE}
  res = subprocess.run([sys.executable, "-c", SCRIPT, src, str(tmp_path / "wd")], env=env,
                       capture_output=True, text=True, timeout=600, cwd=os.getcwd())
  assert res.returncode == 0, res.stderr[-3000:]
  rss = json.loads(res.stdout.strip().splitlines()[-1])
  ratio = (rss["after"] - rss["before"]) / model_bytes
  print(f"model {model_bytes / 2**20:.0f} MiB, baseline {rss['before'] / 2**20:.0f} MiB, "
        f"peak {rss['after'] / 2**20:.0f} MiB: import used {ratio:.2f}x the model")
  assert os.path.isdir(tmp_path / "wd" / "checkpoints" / "0")
  assert ratio < LIMIT
