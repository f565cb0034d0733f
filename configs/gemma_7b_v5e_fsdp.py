"""Gemma 1 7B on one v5e-256 pod in pure FSDP: 256-way data parallelism with ZeRO-3.

The alternative to the report's 16 x 16 layout (configs/gemma_7b_v5e_1pod.py), as MaxText's
8B-class v5e-256 config (REFERENCE.md section 5): no model parallelism, every chip holds
4 rows of 8192 tokens and gathers each layer's parameters from the 256-way shards. Compile it for
the real TPU on a CPU machine:

  python -m maxgemma.aot --config=configs/gemma_7b_v5e_fsdp.py --topology=v5e:16x16

Train on a v5e-256 (see docs/tpu.md):

  python -m maxgemma.train --config=configs/gemma_7b_v5e_fsdp.py --workdir=gs://BUCKET/7b_fsdp
"""

from maxgemma.config import base_config, use_splash


def get_config():
  c = base_config()
  c.model.preset = "gemma1_7b"
  c.model.dtype = "bfloat16"  # compute; parameters and Adam moments stay float32
  c.model.remat_policy = "full"
  use_splash(c.model, 512)  # every tile 512 (docs/aot.md)
  c.train.seq_len = 8192
  c.train.global_batch = 1024  # 4 rows per chip (docs/aot.md)
  c.train.loss_chunk = 256  # [4, 256, 256128] float32 logits per chip at a time (vocab unsharded)
  c.mesh.ici_data = 1
  c.mesh.ici_fsdp = 256
  return c
