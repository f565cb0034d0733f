"""The CPU demo: a small Gemma 2 on the packaged corpus, on 8 fake devices as data 4 x tensor 2.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
    python -m maxgemma.train --config=configs/demo.py --workdir=runs/demo

(`make demo` runs this, resumes it, exports and samples: see maxgemma/demo.py.)
"""

from maxgemma.config import base_config


def get_config():
  c = base_config()
  c.model.preset = "demo_gemma2"  # vocab 2048: the packaged demo tokenizer
  c.model.dtype = "float32"  # faster than bfloat16 on CPU (docs/performance.md)
  c.model.remat_policy = "none"
  c.model.flatten_matmuls = True  # 2-D matmuls: faster on CPU (docs/performance.md)
  c.mesh.ici_data = 4
  c.mesh.ici_tensor = 2
  c.train.steps = 120
  c.train.global_batch = 16
  c.train.seq_len = 128
  c.train.eval_every = 60
  c.train.eval_steps = 2
  c.optim.learning_rate = 3e-3
  c.optim.warmup_steps = 20
  c.optim.decay_steps = 120  # fixed, so a run stopped early and resumed follows the same schedule
  c.optim.weight_decay = 0.01
  c.checkpoint.every = 60
  c.metrics.log_every = 5
  return c
