"""Gemma 1 2B on 2 v5e-256 pods (512 chips), the Gemma report's layout.

Inside each pod 256-way data parallelism with ZeRO-3 (fsdp over all chips), the layout of
configs/gemma_2b_v5e_1pod.py; data parallel across the 2 pods over
the data-centre network (`dcn_data=2`): gradients are reduce-scattered inside a pod and only each
chip's shard crosses pods. Compile it for the real TPU on a CPU machine (`--num_slices` defaults
to 2 from mesh.dcn_*):

  python -m maxgemma.aot --config=configs/gemma_2b_v5e_2pods.py --topology=v5e:16x16

Train on the pods (see docs/tpu.md):

  python -m maxgemma.train --config=configs/gemma_2b_v5e_2pods.py --workdir=gs://BUCKET/2b
"""

from configs import gemma_2b_v5e_1pod

PODS = 2


def get_config():
  c = gemma_2b_v5e_1pod.get_config()  # each pod's layout, splash tiles, remat and loss chunks
  # 8 rows per chip per pod (a thin margin: docs/aot.md).
  c.train.global_batch = PODS * 2048
  c.mesh.dcn_data = PODS
  return c
