"""A tiny Gemma 2 on the packaged demo corpus: runs anywhere in seconds.

  python -m maxgemma.train --config=configs/tiny.py --workdir=/tmp/tiny
"""

from maxgemma.config import base_config


def get_config():
  c = base_config()
  c.model.preset = "tiny_gemma2"
  c.model.vocab_size = 2048  # the demo tokenizer's pieces
  c.model.dtype = "float32"
  c.model.flatten_matmuls = True  # 2-D matmuls: faster on CPU
  c.train.steps = 20
  c.train.global_batch = 8
  c.train.seq_len = 64
  c.optim.warmup_steps = 5
  c.optim.learning_rate = 3e-3
  c.checkpoint.every = 10
  return c
