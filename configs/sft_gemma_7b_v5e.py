"""Full supervised fine-tuning of Gemma 1 7B on a v5e-8 slice (`v5e:2x4`): ZeRO-3 over 8 chips.

Every weight is trained. The state is float32 parameters (32 GiB) and bfloat16 Adam moments
(32 GiB), sharded over the 8 chips with the float32 gradients; a v5e-4 (63 GiB of usable HBM)
cannot hold the parameters and moments alone. The AOT compile's peak per chip is in
docs/finetune.md ("What fits where"):

  python -m maxgemma.aot --config=configs/sft_gemma_7b_v5e.py --topology=v5e:2x4

The workflow (docs/finetune.md, "SFT"): import the released weights into the run's workdir, prepare
the chats, train (a fresh optimizer and schedule from step 0 on the imported parameters):

  python -m maxgemma.import_weights --from=hf --path=/models/gemma-7b --workdir=gs://BUCKET/sft7b
  python -m maxgemma.data.prepare --kind=sft --input='chats/*.jsonl' \
      --tokenizer=gs://BUCKET/sft7b/tokenizer.model --output=gs://BUCKET/chats
  python -m maxgemma.train --config=configs/sft_gemma_7b_v5e.py --workdir=gs://BUCKET/sft7b \
      --config.data.sources=gs://BUCKET/chats --config.data.tokenizer=gs://BUCKET/sft7b/tokenizer.model
"""

from maxgemma.config import base_config, use_splash


def get_config():
  c = base_config()
  c.model.preset = "gemma1_7b"
  c.model.dtype = "bfloat16"  # compute; parameters stay float32
  c.model.remat_policy = "full"
  use_splash(c.model, 512)  # the Pallas splash kernel, every tile 512 (docs/aot.md)
  c.optim.moments_dtype = "bfloat16"  # float32 moments (+32 GiB) need a v5e-16
  c.optim.learning_rate = 1e-5
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 50
  c.optim.weight_decay = 0.0
  c.train.steps = 2000
  c.train.seq_len = 2048
  c.train.global_batch = 8  # one packed row per chip
  c.train.loss_chunk = 512  # no [B, 2048, 256128] float32 logits
  c.mesh.ici_data = 1
  c.mesh.ici_fsdp = 8
  c.checkpoint.every = 200
  c.checkpoint.keep_last = 2
  return c
