"""Gemma 1 2B on one v5e-256 pod: 256-way data parallelism with ZeRO-3 (fsdp over all chips).

The in-pod layout of the Gemma report's 2B run (2 pods: configs/gemma_2b_v5e_2pods.py). Compile
it for the real TPU on a CPU machine (prints per-chip memory, FLOPs, roofline time):

  python -m maxgemma.aot --config=configs/gemma_2b_v5e_1pod.py --topology=v5e:16x16

Train on a v5e-256 (see docs/tpu.md):

  python -m maxgemma.train --config=configs/gemma_2b_v5e_1pod.py --workdir=gs://BUCKET/2b
"""

from maxgemma.config import base_config


def get_config():
  c = base_config()
  c.model.preset = "gemma1_2b"
  c.model.dtype = "bfloat16"  # compute; parameters and Adam moments stay float32
  c.model.remat_policy = "full"
  c.train.seq_len = 8192
  c.train.global_batch = 768  # 3 rows per chip
  c.train.loss_chunk = 1024  # no [B, 8192, 256128] float32 logits
  c.mesh.ici_data = 1
  c.mesh.ici_fsdp = 256
  return c
