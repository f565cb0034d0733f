"""LoRA supervised fine-tuning of Gemma 1 7B on a v5e-8 slice (`v5e:2x4`): ZeRO-3 over 4 x tensor 2.

Rank-16 adapters on all seven projections of every layer are the only trained parameters (and the
only optimizer state); the imported base (`config.lora.base`) is a frozen float32 input sharded
over the 8 chips, and each step merges the adapters into it (docs/finetune.md, "LoRA"). The AOT
compile's peak per chip is in docs/finetune.md ("What fits where"):

  python -m maxgemma.aot --config=configs/sft_lora_gemma_7b_v5e8.py --topology=v5e:2x4

The workflow (docs/finetune.md, "SFT"): import the released weights into a base workdir, prepare
the chats, train the adapters in a workdir of their own, export them (PEFT) or the merged model:

  python -m maxgemma.import_weights --from=hf --path=/models/gemma-7b --workdir=gs://BUCKET/gemma-7b
  python -m maxgemma.data.prepare --kind=sft --input='chats/*.jsonl' \
      --tokenizer=gs://BUCKET/gemma-7b/tokenizer.model --output=gs://BUCKET/chats
  python -m maxgemma.train --config=configs/sft_lora_gemma_7b_v5e8.py \
      --workdir=gs://BUCKET/lora7b --config.lora.base=gs://BUCKET/gemma-7b \
      --config.data.sources=gs://BUCKET/chats --config.data.tokenizer=gs://BUCKET/gemma-7b/tokenizer.model
  python -m maxgemma.export --workdir=gs://BUCKET/lora7b --format=peft --out=lora7b-adapter
"""

from maxgemma.config import base_config, use_splash


def get_config():
  c = base_config()
  c.model.preset = "gemma1_7b"
  c.model.dtype = "bfloat16"  # compute; the base and the adapters stay float32
  c.model.remat_policy = "full"
  use_splash(c.model, 512)  # the Pallas splash kernel, every tile 512 (docs/aot.md)
  c.lora.targets = "q,k,v,o,gate,up,down"
  c.lora.rank = 16
  c.lora.alpha = 32.0
  c.optim.learning_rate = 2e-4
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 50
  c.optim.weight_decay = 0.0
  c.train.steps = 2000
  c.train.seq_len = 2048
  c.train.global_batch = 8  # one packed row per chip
  c.train.loss_chunk = 512  # no [B, 2048, 256128] float32 logits
  # fsdp 4 x tensor 2, the layout compiled for docs/finetune.md (fsdp 8 also shards every
  # adapter: the rank axis goes over fsdp where the weight leaves it free).
  c.mesh.ici_data = 1
  c.mesh.ici_fsdp = 4
  c.mesh.ici_tensor = 2
  c.checkpoint.every = 200
  return c
