"""Gemma 3 12B on 6144 TPU v4 chips: 3 slices of v4 8x16x16 (v4-4096, 2048 chips each), the Gemma 3
report's layout (Table 2: data 16 x sequence 16 x replica 24).

6144 chips are more than one v4 pod holds (4096, v4-8192), so the layout spans slices; only the
report's `replica` factor can cross DCN cheaply (one gradient reduction per step, each chip sending
its reduce-scattered shard; the 16-way ZeRO-3 `data` would all-gather parameters every layer and
the 16-way `sequence` keys and values every layer). The fewest slices that hold it as whole real
topologies are 2 x 3072 (v4-6144, 8x16x24) or 3 x 2048 (v4-4096, 8x16x16, launch/tpu_types.py):
on 8x16x16 each mesh axis is one side of the torus (`data` 8, `fsdp` 16, `sequence` 16, the
report's data 16 being `fsdp`, ZeRO-3), while 8x16x24 would have to split a side for a 16-way
axis. So: per slice `data` 8 x `fsdp` 16 x `sequence` 16, and `data` 3 over DCN (replica 24 =
8 x 3). Rows of 32,768 tokens (the Gemma 3 pretraining context), 2048 positions per chip. v4 runs
megacore, one JAX device per chip.

Compile it for the real TPU on a CPU machine; the executable is one slice's program, so 2 slices
show the per-chip memory and the cross-slice sends (benchmarks/aot_pods.py, row g3_12b_v4):

  python -m maxgemma.aot --config=configs/gemma3_12b_v4_6144.py --topology=v4:8x16x16 \
      --num_slices=2 --config.mesh.dcn_data=2 --config.train.global_batch=256

and as trained (3 slices, the same per-slice program):

  python -m maxgemma.aot --config=configs/gemma3_12b_v4_6144.py --topology=v4:8x16x16

Train on the slices (see docs/tpu.md):

  python -m maxgemma.train --config=configs/gemma3_12b_v4_6144.py --workdir=gs://BUCKET/g3_12b
"""

from maxgemma.config import base_config, use_splash

TOPOLOGY = "v4:8x16x16"
SLICES = 3
ROWS_PER_SLICE = 128  # one row per data-parallel (data x fsdp) group of 16 sequence chips


def get_config():
  c = base_config()
  c.model.preset = "gemma3_12b"
  c.model.dtype = "bfloat16"  # compute; parameters and Adam moments stay float32
  c.model.remat_policy = "full"
  # Splash, every tile 512: the query tiles tile one shard's 2048 positions.
  use_splash(c.model, 512)
  c.train.seq_len = 32_768
  c.train.global_batch = SLICES * ROWS_PER_SLICE  # 384 x 32768 = 12.6M tokens per step
  c.train.loss_chunk = 2048  # strided chunks: each chip computes 128 positions' logits at a time
  c.mesh.ici_data = 8
  c.mesh.ici_fsdp = 16
  c.mesh.ici_sequence = 16
  c.mesh.dcn_data = SLICES
  return c
