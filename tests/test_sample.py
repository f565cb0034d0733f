"""Sampling filters, stopping, and the `maxgemma.sample` CLI on a real workdir."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxgemma.model.presets import get_preset
from maxgemma.sample import SamplingConfig, filter_logits, generate, left_pad, sample_logits
from tests.convert_utils import make_workdir
from tests.model_utils import random_params


def test_top_k_and_top_p_keep_the_right_tokens():
  logits = jnp.log(jnp.asarray([[0.5, 0.2, 0.15, 0.1, 0.05]]))
  kept = lambda x: np.isfinite(np.asarray(x))[0].tolist()
  assert kept(filter_logits(logits, top_k=2)) == [True, True, False, False, False]
  # Nucleus 0.8: 0.5 + 0.2 = 0.7 < 0.8, so the third (0.15) is still needed; not the fourth.
  assert kept(filter_logits(logits, top_p=0.8)) == [True, True, True, False, False]
  assert kept(filter_logits(logits, top_p=0.3)) == [True, False, False, False, False]
  assert kept(filter_logits(logits, top_k=4, top_p=0.99)) == [True, True, True, True, False]


def test_sampling_follows_the_filtered_distribution():
  logits = jnp.broadcast_to(jnp.log(jnp.asarray([0.5, 0.2, 0.15, 0.1, 0.05])), (20_000, 5))
  draws = np.asarray(sample_logits(logits, jax.random.key(0), SamplingConfig(1.0, top_k=3)))
  freq = np.bincount(draws, minlength=5) / len(draws)
  np.testing.assert_allclose(freq, [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0], atol=0.015)
  greedy = sample_logits(logits[:3], jax.random.key(1), SamplingConfig(0.0))
  assert np.asarray(greedy).tolist() == [0, 0, 0]


def test_left_padding_marks_positions():
  tokens, positions = left_pad([[5, 6, 7], [8]])
  assert tokens.tolist() == [[5, 6, 7], [0, 0, 8]]
  assert positions.tolist() == [[0, 1, 2], [-1, -1, 0]]


def test_rows_stop_at_their_stop_token():
  cfg = get_preset("tiny_gemma2", dtype="float32", scan_layers=False, remat_policy="none")
  params = random_params(cfg, seed=1)
  prompts = [[2, 10, 11, 12], [2, 40, 41]]
  free = generate(params, cfg, prompts, max_new_tokens=12, stop_ids=())
  stop = free.tokens[0][3]  # the 4th token row 0 generates
  stopped = generate(params, cfg, prompts, max_new_tokens=12, stop_ids=(stop,))
  assert stopped.tokens[0] == free.tokens[0][:free.tokens[0].index(stop)]
  row1 = free.tokens[1]
  assert stopped.tokens[1] == (row1[:row1.index(stop)] if stop in row1 else row1)
  sampled = generate(params, cfg, prompts, max_new_tokens=12, stop_ids=(),
                     sampling=SamplingConfig(temperature=1.0, top_k=1))
  assert sampled.tokens == free.tokens  # top-k 1 is greedy at any temperature


def test_context_limit_is_checked():
  cfg = get_preset("tiny_gemma2", scan_layers=False)
  with pytest.raises(ValueError, match="max_seq_len=256"):
    generate(random_params(cfg), cfg, [[2] * 200], max_new_tokens=100)


def test_cli_generates_and_reports_tokens_per_second(tmp_path):
  workdir, _, _ = make_workdir(str(tmp_path), "tiny_gemma3")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  res = subprocess.run(
      [sys.executable, "-m", "maxgemma.sample", f"--workdir={workdir}", "--prompt=Hello",
       "--prompt=Once upon a time there", "--chat", "--max_new_tokens=16", "--temperature=0.8",
       "--top_p=0.9", "--top_k=50"],
      env=env, capture_output=True, text=True, timeout=300, cwd=os.getcwd())
  assert res.returncode == 0, res.stderr[-2000:]
  assert res.stdout.count("=== ") == 2
  assert "tokens/s" in res.stdout and "step 7: 2 prompts" in res.stdout
