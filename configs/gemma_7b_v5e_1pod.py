"""Gemma 1 7B on one v5e-256 pod: 16-way model (tensor) x 16-way data with ZeRO-3 (fsdp).

The in-pod layout of the Gemma report's 7B run (16 pods: configs/gemma_7b_v5e_16pods.py).
Compile it for the real TPU on a CPU machine (prints per-chip memory, FLOPs, roofline time):

  python -m maxgemma.aot --config=configs/gemma_7b_v5e_1pod.py --topology=v5e:16x16

Train on a v5e-256 (see docs/tpu.md):

  python -m maxgemma.train --config=configs/gemma_7b_v5e_1pod.py --workdir=gs://BUCKET/7b
"""

from maxgemma.config import base_config, use_splash


def get_config():
  c = base_config()
  c.model.preset = "gemma1_7b"
  c.model.dtype = "bfloat16"  # compute; parameters and Adam moments stay float32
  c.model.remat_policy = "full"
  # The Pallas splash kernel: no [8192, 8192] scores per head while a layer is recomputed. Tiles
  # as measured by the AOT compile (docs/aot.md).
  use_splash(c.model, 512)
  c.train.seq_len = 8192
  # 32 rows per fsdp group (4.2M tokens) fit with splash and sharded residuals (docs/aot.md).
  c.train.global_batch = 512
  c.train.loss_chunk = 512  # no [B, 8192, 256128] float32 logits; 1024: 16 pods do not fit
  c.mesh.ici_data = 1
  c.mesh.ici_fsdp = 16
  c.mesh.ici_tensor = 16
  c.mesh.shard_residuals = True  # residuals split over tensor between blocks (docs/parallelism.md)
  return c
