"""Gemma 3 4B on 8 v5e-256 pods (2048 chips), the Gemma 3 report's layout (Table 2: data 16 x
sequence 16 x replica 8).

As for the 1B (configs/gemma3_1b_v5e_512.py): the report's 16-way `data` (ZeRO-3) is `fsdp` 16 and
its `sequence` 16 is `sequence` 16, both inside a pod (one 16 x 16 torus: the largest v5e slice,
launch/tpu_types.py, so the two 16-way factors fill it and each maps onto one side of the torus);
its `replica` 8 is `data` 8 over DCN, one pod each: only the gradient reduction crosses pods, and
with DCN-major axes each chip sends its reduce-scattered shard (docs/aot.md). Rows of 32,768
tokens (the Gemma 3 pretraining context, REFERENCE.md section 1), 2048 positions per chip.

Compile it for the real TPU on a CPU machine. The executable is one pod's program, so 2 slices
show the per-chip memory and the cross-slice sends (benchmarks/aot_pods.py, row g3_4b_2048):

  python -m maxgemma.aot --config=configs/gemma3_4b_v5e_2048.py --num_slices=2 \
      --config.mesh.dcn_data=2 --config.train.global_batch=128

and all 8 pods as trained (the same per-pod program):

  python -m maxgemma.aot --config=configs/gemma3_4b_v5e_2048.py   # 8 slices of v5e:16x16

Train on the pods (see docs/tpu.md):

  python -m maxgemma.train --config=configs/gemma3_4b_v5e_2048.py --workdir=gs://BUCKET/g3_4b
"""

from configs import gemma3_1b_v5e_512

PODS = 8
ROWS_PER_POD = 64  # 4 rows per fsdp group (docs/aot.md)


def get_config():
  c = gemma3_1b_v5e_512.get_config()  # the same per-pod layout, length, splash tiles and remat
  c.model.preset = "gemma3_4b"
  c.train.global_batch = PODS * ROWS_PER_POD  # 512 x 32768 = 16.8M tokens per step
  c.mesh.dcn_data = PODS
  return c
