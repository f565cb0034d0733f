"""Gemma 1 7B on one v5e-256 pod: fsdp 128 x tensor 2, 768 rows of 8192 tokens.

Of the 7B layouts compiled for one v5e-256 (docs/aot.md, "Which layout is fastest"), the one with
the best step bounds: ZeRO-3 over 128 chips with each tensor pair splitting heads, the MLP and
the vocabulary (and the residual stream along its length). Compared with fsdp 256
(configs/gemma_7b_v5e_fsdp.py) each chip gathers half of every layer's parameters, about half the
ICI bytes per step; compared with the report's tensor 16 x fsdp 16 (configs/gemma_7b_v5e_1pod.py)
far fewer activations cross the tensor group. 768 rows (6 per fsdp group) fit with 3.5 GiB
to spare; 1024 do not. Compile it for the real TPU on a CPU machine:

  python -m maxgemma.aot --config=configs/gemma_7b_v5e.py --topology=v5e:16x16

Train on a v5e-256 (see docs/tpu.md):

  python -m maxgemma.train --config=configs/gemma_7b_v5e.py --workdir=gs://BUCKET/7b
"""

from configs import gemma_7b_v5e_fsdp


def get_config():
  c = gemma_7b_v5e_fsdp.get_config()  # model, remat, splash tiles, length and loss chunks
  c.train.global_batch = 768  # 6 rows per fsdp group (docs/aot.md)
  c.train.loss_chunk = 1024  # fewer chunks, each gathering the tied embedding (docs/aot.md)
  c.mesh.ici_fsdp = 128
  c.mesh.ici_tensor = 2
  return c
