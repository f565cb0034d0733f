"""Gemma 3 4B on 8 v5e-256 pods (2048 chips): per pod fsdp 64 x sequence 4, data 8 over DCN.

The Gemma 3 report trained it as data 16 x sequence 16 x replica 8 (Table 2). Mapped as for the
1B (configs/gemma3_1b_v5e_512.py), that is per pod `fsdp` 16 (the report's data, ZeRO-3) x
`sequence` 16, one 16-way factor on each side of the pod's 16 x 16 torus:

  --config.mesh.ici_fsdp=16 --config.mesh.ici_sequence=16

The default instead splits a pod as fsdp 64 x sequence 4: compiled for 2 pods at the same batch,
it has the better step bounds (ICI 63.0 against 77.7 GiB per chip per step) and the lower peak
(6.44 against 8.90 GiB per chip); docs/aot.md, "Which layout is fastest". The report's `replica`
8 is `data` 8 over DCN, one pod each: only the gradient reduction crosses pods, and with
DCN-major axes each chip sends its reduce-scattered shard (docs/aot.md). Rows of 32,768 tokens
(the Gemma 3 pretraining context, REFERENCE.md section 1), 8192 positions per chip.

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
ROWS_PER_POD = 64  # 1 row per fsdp group (4 in the report's layout)


def get_config():
  c = gemma3_1b_v5e_512.get_config()  # the same length, splash tiles, loss chunks and remat
  c.model.preset = "gemma3_4b"
  c.train.global_batch = PODS * ROWS_PER_POD  # 512 x 32768 = 16.8M tokens per step
  c.mesh.ici_fsdp = 64
  c.mesh.ici_sequence = 4
  c.mesh.dcn_data = PODS
  return c
