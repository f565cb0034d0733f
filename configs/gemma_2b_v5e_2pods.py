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

from maxgemma.config import base_config, use_splash

PODS = 2


def get_config():
  c = base_config()
  c.model.preset = "gemma1_2b"
  c.model.dtype = "bfloat16"  # compute; parameters and Adam moments stay float32
  c.model.remat_policy = "full"
  # The Pallas splash kernel, every tile 512 (docs/aot.md).
  use_splash(c.model, 512)
  c.train.seq_len = 8192
  # 8 rows per chip fit with splash (peak 14.95 of 15.75 GiB: a thin margin; docs/aot.md).
  c.train.global_batch = PODS * 2048
  c.train.loss_chunk = 256  # no [B, 8192, 256128] float32 logits (the vocabulary is not sharded)
  c.mesh.ici_data = 1
  c.mesh.ici_fsdp = 256
  c.mesh.dcn_data = PODS
  return c
