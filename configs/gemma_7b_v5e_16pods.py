"""Gemma 1 7B on 16 v5e-256 pods (4096 chips), the Gemma report's layout.

Inside each pod 16-way model (tensor) x 16-way data with ZeRO-3 (fsdp), as
configs/gemma_7b_v5e_1pod.py; data parallel across the 16 pods over the data-centre network
(`dcn_data=16`): gradients are reduce-scattered inside a pod and only each chip's shard crosses
pods. Compile it for the real TPU on a CPU machine (`--num_slices` defaults to the product of
mesh.dcn_*, here 16):

  python -m maxgemma.aot --config=configs/gemma_7b_v5e_16pods.py --topology=v5e:16x16

Train on the pods (see docs/tpu.md):

  python -m maxgemma.train --config=configs/gemma_7b_v5e_16pods.py --workdir=gs://BUCKET/7b
"""

from configs import gemma_7b_v5e_1pod

PODS = 16


def get_config():
  c = gemma_7b_v5e_1pod.get_config()  # each pod's layout, splash tiles, remat and loss chunks
  c.train.global_batch = PODS * 512  # each pod's share as in gemma_7b_v5e_1pod.py: 67M tokens
  c.mesh.dcn_data = PODS
  return c
