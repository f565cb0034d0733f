"""Gemma 2 9B on a TPU v4 8x16x32 slice (4096 chips, v4-8192), the Gemma 2 report's layout.

1024-way data parallelism x 4-way model (tensor) inside one slice. The data-parallel 1024 is 2
replicas x 512-way ZeRO-3 (fsdp): d_model 3584 = 7 x 512 does not divide by 1024, and a parameter
dimension that does not divide stays replicated (the state would then be split 4 ways only: 40.9
GiB of temporaries per chip, refused). Tensor 4 is no product of the torus' axes: each tensor
group is 4 neighbouring chips of a ring of 8 (`maxgemma.sharding.make_mesh` splits that axis).
v4 runs megacore, one JAX device per chip.
Compile it for the real TPU on a CPU machine (prints per-chip memory, FLOPs, roofline time):

  python -m maxgemma.aot --config=configs/gemma2_9b_v4_8x16x32.py --topology=v4:8x16x32

Train on a v4-8192 (see docs/tpu.md):

  python -m maxgemma.train --config=configs/gemma2_9b_v4_8x16x32.py --workdir=gs://BUCKET/9b
"""

from maxgemma.config import base_config, use_splash

TOPOLOGY = "v4:8x16x32"


def get_config():
  c = base_config()
  c.model.preset = "gemma2_9b"
  c.model.dtype = "bfloat16"  # compute; parameters and Adam moments stay float32
  c.model.remat_policy = "full"
  # The Pallas splash kernel (sliding window and soft-capping inside), every tile 512.
  use_splash(c.model, 512)
  c.train.seq_len = 8192
  # One row per data-parallel group of 4 chips (8.4M tokens), the least this layout takes.
  c.train.global_batch = 1024
  c.train.loss_chunk = 512  # no [B, 8192, 256128] float32 logits
  c.mesh.ici_data = 2
  c.mesh.ici_fsdp = 512
  c.mesh.ici_tensor = 4
  c.mesh.shard_residuals = True  # residuals split over tensor between blocks (docs/parallelism.md)
  return c
