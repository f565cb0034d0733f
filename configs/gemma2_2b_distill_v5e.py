"""Gemma 2 2B distilled from Gemma 2 9B on 2 v5e-256 pods (512 chips), the Gemma 2 report's recipe.

The student trains on the cross-entropy against the frozen 9B teacher's next-token distribution
(online distillation, docs/distillation.md), in the report's 2B layout: 512-way data parallelism,
ZeRO-3 (fsdp) over the 256 chips of each pod and data parallel across the 2 pods over the
data-centre network. The teacher is a frozen input of the step, sharded by the same rules table,
in bfloat16, without optimizer state. `distill.teacher_preset` declares its architecture, so the
step compiles before the teacher's checkpoint exists; training checks the checkpoint against it.
Compile it for the real TPU on a CPU machine:

  python -m maxgemma.aot --config=configs/gemma2_2b_distill_v5e.py --topology=v5e:16x16

Train on the pods (see docs/tpu.md), with the teacher imported first
(`python -m maxgemma.import_weights`) and the tokenizer both models share:

  python -m maxgemma.train --config=configs/gemma2_2b_distill_v5e.py \
      --workdir=gs://BUCKET/g2-2b-distill --config.distill.teacher=gs://BUCKET/g2-9b \
      --config.data.tokenizer=gs://BUCKET/tokenizer.model --config.data.train=gs://BUCKET/data
"""

from maxgemma.config import base_config, use_splash

PODS = 2


def get_config():
  c = base_config()
  c.model.preset = "gemma2_2b"
  c.model.dtype = "bfloat16"  # compute; the student's parameters and Adam moments stay float32
  c.model.remat_policy = "full"
  use_splash(c.model, 512)  # the Pallas splash kernel, every tile 512; the teacher runs it too
  c.train.seq_len = 8192
  c.train.global_batch = PODS * 1024
  c.distill.teacher = "gs://BUCKET/g2-9b"  # a maxgemma workdir (import_weights writes one)
  c.distill.teacher_preset = "gemma2_9b"
  c.distill.teacher_dtype = "bfloat16"
  c.distill.temperature = 1.0
  c.distill.alpha = 0.0  # pure distillation, as in the report
  c.distill.loss_chunk = 256  # positions per chunk of both models' [B, chunk, 256128] logits
  c.mesh.ici_data = 1
  c.mesh.ici_fsdp = 256
  c.mesh.dcn_data = PODS
  return c
