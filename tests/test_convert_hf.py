"""The `hf` export loads in transformers (`from_pretrained`) and gives maxgemma's logits."""

import json
import os

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

from maxgemma.data.tokenizer import load_tokenizer
from maxgemma.export import export
from tests.convert_utils import PRESETS, make_workdir, tokens_for, torch_logits
from tests.model_utils import rel_err, run_maxgemma

TOLERANCE = 1e-5  # max |ours - theirs| / max |theirs|, float32


@pytest.mark.parametrize("preset", PRESETS)
def test_from_pretrained_logits_match(preset, tmp_path):
  workdir, cfg, params = make_workdir(str(tmp_path), preset)
  out = str(tmp_path / "hf")
  export(workdir, "hf", out, max_shard_mb=0.25)  # several shards + index
  assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
  model = transformers.AutoModelForCausalLM.from_pretrained(
      out, dtype=torch.float32, attn_implementation="eager").eval()
  assert type(model).__name__ == hf_arch(cfg)
  tokens = tokens_for(cfg)
  theirs = torch_logits(model, tokens)
  ours = run_maxgemma(cfg.replace(dtype="float32"), params, tokens)
  err = rel_err(ours, theirs)
  print(f"hf {preset}: max relative logit difference {err:.2e}")
  assert err < TOLERANCE


def hf_arch(cfg) -> str:
  return {"gemma1": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
          "gemma3": "Gemma3ForCausalLM"}[cfg.family]


def test_tokenizer_loads_with_auto_tokenizer(tmp_path):
  workdir, cfg, _ = make_workdir(str(tmp_path), "tiny_gemma2")
  out = str(tmp_path / "hf")
  export(workdir, "hf", out, dtype="bfloat16")
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["torch_dtype"] == "bfloat16"
  tok = transformers.AutoTokenizer.from_pretrained(out)
  ours = load_tokenizer("")
  text = "Hello world 2024: <start_of_turn>user\nhi  there<end_of_turn>"
  assert tok(text)["input_ids"] == ours.encode(text, add_bos=True)
  assert tok.convert_tokens_to_ids("<end_of_turn>") == 107


def test_bfloat16_export_rounds_each_weight(tmp_path):
  workdir, cfg, params = make_workdir(str(tmp_path), "tiny_gemma3")
  out = str(tmp_path / "hf")
  export(workdir, "hf", out, dtype="bfloat16")
  model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
  emb = model.model.embed_tokens.weight.detach().float().numpy()
  want = params["embedder"]["input_embedding"].astype(np.float32)
  np.testing.assert_array_equal(emb, want.astype(ml_dtypes.bfloat16).astype(np.float32))
