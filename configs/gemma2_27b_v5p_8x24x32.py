"""Gemma 2 27B on a TPU v5p 8x24x32 slice (6144 chips), the Gemma 2 report's layout.

768-way data parallelism with ZeRO-3 (fsdp) x 8-way model (tensor) inside one slice: each tensor
group is one 8-chip ring of the torus' first axis. Compile it for the real TPU on a CPU machine
(prints per-chip memory, FLOPs, roofline time):

  python -m maxgemma.aot --config=configs/gemma2_27b_v5p_8x24x32.py --topology=v5p:8x24x32

Train on a v5p-12288 (see docs/tpu.md):

  python -m maxgemma.train --config=configs/gemma2_27b_v5p_8x24x32.py --workdir=gs://BUCKET/27b
"""

from maxgemma.config import base_config, use_splash

TOPOLOGY = "v5p:8x24x32"


def get_config():
  c = base_config()
  c.model.preset = "gemma2_27b"
  c.model.dtype = "bfloat16"  # compute; parameters and Adam moments stay float32
  c.model.remat_policy = "full"
  # The Pallas splash kernel (sliding window and soft-capping inside), every tile 512.
  use_splash(c.model, 512)
  c.train.seq_len = 8192
  # One row per data-parallel group of 8 chips (6.3M tokens), the least this layout takes.
  c.train.global_batch = 768
  c.train.loss_chunk = 512  # no [B, 8192, 256128] float32 logits
  c.mesh.ici_data = 1
  c.mesh.ici_fsdp = 768
  c.mesh.ici_tensor = 8
  c.mesh.shard_residuals = True  # residuals split over tensor between blocks (docs/parallelism.md)
  return c
