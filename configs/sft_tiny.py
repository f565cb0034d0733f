"""Supervised fine-tuning of a tiny Gemma 2 on CPU (a couple of minutes; docs/finetune.md, "SFT").

Write the chats (`python -m configs.sft_tiny FILE`), import the weights, prepare, train:

  python -m configs.sft_tiny chats/reverse.jsonl
  python -m maxgemma.import_weights --from=hf --path=/models/tiny-gemma2-hf --workdir=/tmp/sft_run
  python -m maxgemma.data.prepare --kind=sft --input='chats/*.jsonl' \
      --tokenizer=/tmp/sft_run/tokenizer.model --output=/tmp/sft_chats
  python -m maxgemma.train --config=configs/sft_tiny.py --workdir=/tmp/sft_run \
      --config.data.sources=/tmp/sft_chats --config.data.tokenizer=/tmp/sft_run/tokenizer.model

In each chat the user says three digits and the model says them reversed; the triples of
`HELD_OUT` are never among them.
"""

import itertools
import json
import os
import random
import sys

from maxgemma.config import base_config

HELD_OUT = ("4 0 7", "9 1 1", "2 8 3", "6 6 0", "5 3 9", "0 7 2", "8 4 4", "1 5 6")


def chats(n: int = 400, seed: int = 0) -> list[dict]:
  """`n` conversations {"messages": [user: "a b c", assistant: "c b a"]}, none of HELD_OUT."""
  triples = [" ".join(t) for t in itertools.product("0123456789", repeat=3)]
  triples = [t for t in triples if t not in HELD_OUT]
  random.Random(seed).shuffle(triples)
  return [{"messages": [{"role": "user", "content": t}, {"role": "assistant", "content": t[::-1]}]}
          for t in triples[:n]]


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


if __name__ == "__main__":
  if len(sys.argv) != 2:
    sys.exit("usage: python -m configs.sft_tiny CHATS.jsonl")
  os.makedirs(os.path.dirname(os.path.abspath(sys.argv[1])), exist_ok=True)
  rows = chats()
  with open(sys.argv[1], "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  print(f"wrote {len(rows)} chats to {sys.argv[1]}")
