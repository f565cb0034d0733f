"""A tiny student distilled from a tiny teacher on the packaged demo corpus (CPU, a minute or two).

Train the teacher first with configs/tiny.py, then the student from it (docs/distillation.md):

  python -m maxgemma.train --config=configs/tiny.py --workdir=/tmp/tiny_teacher \
      --config.train.steps=150
  python -m maxgemma.train --config=configs/distill_tiny.py --workdir=/tmp/tiny_student \
      --config.distill.teacher=/tmp/tiny_teacher
"""

from configs import tiny


def get_config():
  c = tiny.get_config()  # the teacher's data, tokenizer, batch and length
  c.model.num_layers = 2  # half the teacher's depth, two thirds of its width
  c.model.d_model = 64
  c.train.steps = 60
  c.checkpoint.every = 30
  c.distill.teacher = "/tmp/tiny_teacher"
  c.distill.temperature = 1.0
  c.distill.alpha = 0.0  # pure distillation, as Gemma 2 and 3
  c.distill.loss_chunk = 32
  return c
