"""Gemma 3 1B on 2 v5e-256 pods (512 chips), the Gemma 3 report's layout (Table 2: data 16 x
sequence 16 x replica 2).

The report's names on maxgemma's mesh axes: its 16-way `data` (with ZeRO-3 optimizer state, as the
report says) is `fsdp` 16, its `sequence` 16 is `sequence` 16 (both inside a pod: one 16 x 16
torus), its `replica` 2 is `data` 2 over DCN (the two pods). Each row of 32,768 tokens (the
context the report pretrained at, REFERENCE.md section 1) is split in 16 pieces of 2048 along a
`sequence` group; attention gathers the keys and values of the whole row (docs/parallelism.md).
Compile it for the real TPU on a CPU machine:

  python -m maxgemma.aot --config=configs/gemma3_1b_v5e_512.py --topology=v5e:16x16

Train on the pods (see docs/tpu.md):

  python -m maxgemma.train --config=configs/gemma3_1b_v5e_512.py --workdir=gs://BUCKET/g3_1b
"""

from maxgemma.config import base_config, use_splash

PODS = 2


def get_config():
  c = base_config()
  c.model.preset = "gemma3_1b"
  c.model.dtype = "bfloat16"  # compute; parameters and Adam moments stay float32
  c.model.remat_policy = "full"
  # Splash, every tile 512: the query tiles tile one shard's 2048 positions.
  use_splash(c.model, 512)
  c.train.seq_len = 32_768
  c.train.global_batch = PODS * 64  # 4 rows per fsdp group (docs/aot.md)
  c.train.loss_chunk = 2048  # strided chunks: each chip computes 128 positions' logits at a time
  c.mesh.ici_data = 1
  c.mesh.ici_fsdp = 16
  c.mesh.ici_sequence = 16
  c.mesh.dcn_data = PODS
  return c
