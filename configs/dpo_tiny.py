"""DPO of a tiny Gemma 2 on synthetic preference pairs (CPU, a couple of minutes; docs/finetune.md).

Write the pairs (`python -m configs.dpo_tiny FILE`), prepare them, train:

  python -m configs.dpo_tiny /tmp/dpo/pairs.jsonl
  python -m maxgemma.data.prepare --kind=preference --input=/tmp/dpo/pairs.jsonl \
      --output=/tmp/dpo/data --eval_fraction=0.1
  python -m maxgemma.train --config=configs/dpo_tiny.py --workdir=/tmp/dpo/run \
      --config.data.sources=/tmp/dpo/data

In each pair the prompt asks to repeat a word; the chosen answer is that word, the rejected one
another word. The reference is the policy's starting weights (`config.dpo.reference` empty).
"""

import json
import os
import random
import sys

from configs import tiny

WORDS = ("apple", "river", "stone", "cloud", "green", "table", "light", "music", "paper", "water",
         "house", "tiger", "bread", "chair", "glass", "horse", "lemon", "night", "ocean", "plant",
         "queen", "sugar", "train", "voice", "world", "yellow", "zebra", "candle", "forest",
         "garden", "island", "jacket", "kitten", "market", "number", "orange", "pencil", "rabbit",
         "silver", "window")


def pairs(n: int, seed: int = 0) -> list[dict[str, str]]:
  """`n` rows {"prompt", "chosen", "rejected"}: repeat the prompt's word, not another one."""
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    word, other = rng.sample(WORDS, 2)
    out.append({"prompt": f"Repeat the word: {word}", "chosen": word, "rejected": other})
  return out


def get_config():
  c = tiny.get_config()  # the demo tokenizer, float32, 2-D matmuls
  c.model.num_layers = 2
  c.model.d_model = 64
  c.data.sources = "/tmp/dpo/data"  # written by the commands above
  c.train.seq_len = 40  # a pair takes 23 to 34 slots (two prompts, two answers)
  c.train.global_batch = 16  # pairs per step
  c.train.steps = 60
  c.train.eval_every = 20
  c.train.eval_steps = 4  # 64 held-out pairs
  c.checkpoint.every = 30
  c.optim.learning_rate = 3e-3
  c.optim.weight_decay = 0.0
  c.dpo.enabled = True
  c.dpo.beta = 0.5
  return c


if __name__ == "__main__":
  if len(sys.argv) != 2:
    sys.exit("usage: python -m configs.dpo_tiny PAIRS.jsonl")
  os.makedirs(os.path.dirname(os.path.abspath(sys.argv[1])), exist_ok=True)
  with open(sys.argv[1], "w") as f:
    for row in pairs(1000):
      f.write(json.dumps(row) + "\n")
  print(f"wrote 1000 preference pairs to {sys.argv[1]}")
