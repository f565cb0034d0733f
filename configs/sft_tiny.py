"""Supervised fine-tuning of a tiny Gemma 2 on CPU: a couple of minutes on a laptop.

Train it on imported weights and prepared chats (docs/finetune.md, "SFT", runs every command):

  python -m maxgemma.import_weights --from=hf --path=/models/tiny-gemma2-hf --workdir=/tmp/sft_run
  python -m maxgemma.data.prepare --kind=sft --input='chats/*.jsonl' \
      --tokenizer=/tmp/sft_run/tokenizer.model --output=/tmp/sft_chats
  python -m maxgemma.train --config=configs/sft_tiny.py --workdir=/tmp/sft_run \
      --config.data.sources=/tmp/sft_chats --config.data.tokenizer=/tmp/sft_run/tokenizer.model
"""

from maxgemma.config import base_config


def get_config():
  c = base_config()
  c.model.preset = "tiny_gemma2"
  c.model.vocab_size = 2048  # the packaged demo tokenizer's pieces
  c.model.dtype = "float32"
  c.model.flatten_matmuls = True  # 2-D matmuls: faster on CPU
  c.data.sources = ""  # set: a directory of `python -m maxgemma.data.prepare --kind=sft`
  c.train.steps = 60
  c.train.global_batch = 16
  c.train.seq_len = 64
  c.optim.warmup_steps = 10
  c.optim.learning_rate = 3e-3
  c.checkpoint.every = 30
  c.metrics.log_every = 10
  return c
