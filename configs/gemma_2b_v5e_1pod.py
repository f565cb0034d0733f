"""Gemma 1 2B on one v5e-256 pod: 256-way data parallelism with ZeRO-3 (fsdp over all chips).

The in-pod layout of the Gemma report's 2B run (2 pods: configs/gemma_2b_v5e_2pods.py, the same
per-pod program plus the cross-pod reduction). Compile it for the real TPU on a CPU machine
(prints per-chip memory, FLOPs, roofline time):

  python -m maxgemma.aot --config=configs/gemma_2b_v5e_1pod.py --topology=v5e:16x16

Train on a v5e-256 (see docs/tpu.md):

  python -m maxgemma.train --config=configs/gemma_2b_v5e_1pod.py --workdir=gs://BUCKET/2b
"""

from maxgemma.config import base_config, use_splash


def get_config():
  c = base_config()
  c.model.preset = "gemma1_2b"
  c.model.dtype = "bfloat16"  # compute; parameters and Adam moments stay float32
  c.model.remat_policy = "full"
  # The Pallas splash kernel, every tile 512 (docs/aot.md).
  use_splash(c.model, 512)
  c.train.seq_len = 8192
  c.train.global_batch = 2048  # 8 rows per chip, as per pod in configs/gemma_2b_v5e_2pods.py
  # No [B, 8192, 256128] float32 logits (the vocabulary is not sharded); 512 rather than 256:
  # half the chunks, each gathering the tied embedding (docs/aot.md, "What the ICI bytes are").
  c.train.loss_chunk = 512
  c.mesh.ici_data = 1
  c.mesh.ici_fsdp = 256
  return c
