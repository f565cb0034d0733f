"""KV-cache decoding equals full re-computation (greedy tokens and logits), for every family.

The reference runs the training forward pass on the whole sequence so far (right-padded to a
fixed length, which a causal model ignores) and takes the last real position's logits. Prompts
(20 and 13 tokens) are longer than the tiny presets' sliding window (8), and the batch mixes
lengths (left padding), so ring buffers, windows and padding are all exercised.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxgemma.model import kv_cache
from maxgemma.model.gemma import Transformer
from maxgemma.model.params import stack_layers
from maxgemma.model.presets import get_preset
from maxgemma.sample import generate
from tests.model_utils import random_params

STEPS = 64
TOLERANCE = 1e-5  # max |cached - full| / max |full| over all steps, float32


def reference(cfg, params, prompt, steps):
  """Greedy tokens and per-step logits by full re-computation."""
  model = Transformer(cfg.replace(scan_layers=True, remat_policy="none"))
  scanned = stack_layers(params)
  total = len(prompt) + steps
  fwd = jax.jit(lambda t: model.apply({"params": scanned}, t))
  seq = np.zeros((1, total), np.int32)
  seq[0, :len(prompt)] = prompt
  tokens, logits = [], []
  for t in range(steps):
    n = len(prompt) + t
    lg = np.asarray(fwd(jnp.asarray(seq)))[0, n - 1]
    logits.append(lg)
    tokens.append(int(np.argmax(lg)))
    seq[0, n] = tokens[-1]
  return tokens, np.stack(logits)


@pytest.mark.parametrize("preset,scan", [("tiny_gemma1_mqa", False), ("tiny_gemma2", False),
                                         ("tiny_gemma3", False), ("tiny_gemma3", True)])
def test_cached_greedy_equals_full_recomputation(preset, scan):
  cfg = get_preset(preset, dtype="float32", scan_layers=scan, remat_policy="none")
  params = random_params(cfg, seed=1)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(4, cfg.vocab_size, 20).tolist(),
             rng.integers(4, cfg.vocab_size, 13).tolist()]
  gen = generate(params, cfg, prompts, max_new_tokens=STEPS, stop_ids=(), return_logits=True)
  for b, prompt in enumerate(prompts):
    tokens, logits = reference(cfg, params, prompt, STEPS)
    err = float(np.max(np.abs(gen.logits[b] - logits)) / np.max(np.abs(logits)))
    print(f"{preset} scan={scan} row {b}: logits max rel diff {err:.2e}, "
          f"{gen.tokens_per_s:.0f} tokens/s")
    assert gen.tokens[b] == tokens
    assert err < TOLERANCE


def test_ring_buffer_is_window_sized_and_wraps():
  cfg = get_preset("tiny_gemma2", dtype="float32", scan_layers=False)
  cache = kv_cache.init_cache(cfg, batch=1, max_len=40)
  sizes = [cache[f"layer_{i}"]["k"].shape[1] for i in range(cfg.num_layers)]
  assert sizes == [8, 40, 8, 40]  # local layers: the window; global: every token
  layer = cache["layer_0"]
  k = jnp.arange(11, dtype=jnp.float32).reshape(1, 11, 1, 1) * jnp.ones((1, 11, 2, 16))
  out = kv_cache.write(layer, k, k, jnp.arange(11)[None])
  # 11 tokens into 8 slots: the last 8 (positions 3..10) survive, token t in slot t % 8.
  assert out["pos"][0].tolist() == [8, 9, 10, 3, 4, 5, 6, 7]
  assert out["k"][0, :, 0, 0].tolist() == [8, 9, 10, 3, 4, 5, 6, 7]
  assert int(out["index"]) == 11


def test_scanned_model_refuses_ring_buffers():
  cfg = get_preset("tiny_gemma2", scan_layers=True)
  with pytest.raises(ValueError, match="scan_layers=False"):
    kv_cache.init_cache(cfg, 1, 16, ring=True)
