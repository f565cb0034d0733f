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

from maxgemma.config import base_config, use_splash

PODS = 16


def get_config():
  c = base_config()
  c.model.preset = "gemma1_7b"
  c.model.dtype = "bfloat16"  # compute; parameters and Adam moments stay float32
  c.model.remat_policy = "full"
  # The Pallas splash kernel: no [8192, 8192] scores per head while a layer is recomputed. Tiles
  # as measured by the AOT compile (docs/aot.md).
  use_splash(c.model, 512)
  c.train.seq_len = 8192
  c.train.global_batch = PODS * 512  # each pod's share as in gemma_7b_v5e_1pod.py: 67M tokens
  c.train.loss_chunk = 512  # no [B, 8192, 256128] float32 logits; 1024: 16 pods do not fit
  c.mesh.ici_data = 1
  c.mesh.ici_fsdp = 16
  c.mesh.ici_tensor = 16
  c.mesh.shard_residuals = True  # residuals split over tensor between blocks (docs/parallelism.md)
  c.mesh.dcn_data = PODS
  return c
