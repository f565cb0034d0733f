"""maxgemma's logits equal Hugging Face transformers' on the same random weights (float32).

The reference is the torch implementation of GemmaForCausalLM / Gemma2ForCausalLM /
Gemma3ForCausalLM, given our weights through `maxgemma.convert.hf`. Sequences are longer than the
tiny presets' sliding window (8), so local layers really mask.
"""

import numpy as np
import pytest
import torch
import transformers

from maxgemma.convert import hf
from maxgemma.model.presets import get_preset
from tests.model_utils import random_params, rel_err, run_maxgemma

TOLERANCE = 1e-5  # max |ours - theirs| / max |theirs|
PRESETS = ["tiny_gemma1_mqa", "tiny_gemma1_mha", "tiny_gemma2", "tiny_gemma3"]


def hf_logits(cfg, params, tokens) -> np.ndarray:
  config = transformers.AutoConfig.for_model(**hf.hf_config(cfg))
  config._attn_implementation = "eager"
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
  state = {k: torch.from_numpy(v) for k, v in hf.to_hf(params, cfg).items()}
  missing, unexpected = model.load_state_dict(state, strict=False)
  assert not unexpected, unexpected
  assert set(missing) <= {"lm_head.weight"}, missing  # tied to the embedding
  with torch.no_grad():
    return model(torch.from_numpy(np.asarray(tokens))).logits.numpy()


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
def test_logits_match_transformers(preset, scan):
  cfg = get_preset(preset, dtype="float32", scan_layers=scan)
  params = random_params(cfg, seed=1)
  tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 24))
  theirs = hf_logits(cfg, params, tokens)
  ours = run_maxgemma(cfg, params, tokens)
  err = rel_err(ours, theirs)
  print(f"{preset} scan={scan}: max relative difference {err:.2e}")
  assert err < TOLERANCE


def test_hf_name_map_round_trips():
  cfg = get_preset("tiny_gemma3")
  params = random_params(cfg)
  back = hf.from_hf(hf.to_hf(params, cfg), cfg)
  import jax
  for path, a in jax.tree_util.tree_leaves_with_path(params):
    b = back
    for k in path:
      b = b[k.key]
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
