"""Gemma 3 27B on one TPU v5p 8x24x32 slice (6144 chips, v5p-12288), the Gemma 3 report's layout
(Table 2: data 24 x sequence 8 x replica 32).

The report's 6144 v5p chips are one real slice (v5p-12288 in launch/tpu_types.py, the shape the
Gemma 2 27B trained on, configs/gemma2_27b_v5p_8x24x32.py), so all three factors live on ICI and
nothing crosses DCN; each maps onto one side of the 8 x 24 x 32 torus: the report's `data` 24
(ZeRO-3) is `fsdp` 24 (d_model 5376 = 224 x 24), its `sequence` 8 is `sequence` 8 (a ring of 8
chips gathers each layer's keys and values), its `replica` 32 is `data` 32. Rows of 32,768 tokens
(the Gemma 3 pretraining context), 4096 positions per chip.
Compile it for the real TPU on a CPU machine (benchmarks/aot_pods.py, row g3_27b_v5p):

  python -m maxgemma.aot --config=configs/gemma3_27b_v5p_6144.py --topology=v5p:8x24x32

Train on the slice (see docs/tpu.md):

  python -m maxgemma.train --config=configs/gemma3_27b_v5p_6144.py --workdir=gs://BUCKET/g3_27b
"""

from maxgemma.config import base_config, use_splash

TOPOLOGY = "v5p:8x24x32"


def get_config():
  c = base_config()
  c.model.preset = "gemma3_27b"
  c.model.dtype = "bfloat16"  # compute; parameters and Adam moments stay float32
  c.model.remat_policy = "full"
  # Splash, every tile 512: the query tiles tile one shard's 4096 positions.
  use_splash(c.model, 512)
  c.train.seq_len = 32_768
  # One row per data-parallel (data x fsdp) group of 8 sequence chips: 768 x 32768 = 25.2M
  # tokens, the least this layout takes.
  c.train.global_batch = 768
  c.train.loss_chunk = 2048  # strided chunks: each chip computes 256 positions' logits at a time
  c.mesh.ici_data = 32
  c.mesh.ici_fsdp = 24
  c.mesh.ici_sequence = 8
  return c
