"""Sampling filters, stopping, the sharded sampler, and the `maxgemma.sample` CLI on a workdir.

The sharded sampler is checked against the single-device one (itself checked against full
re-computation in tests/test_decode.py): in this process on the 8 fake devices, and as two
processes under `launch.local`.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxgemma.model.presets import get_preset
from maxgemma.sample import (
  SamplingConfig,
  filter_logits,
  generate,
  left_pad,
  param_shardings,
  place,
  sample_logits,
  sampler_mesh,
)
from tests.convert_utils import make_workdir
from tests.model_utils import random_params
from tests.xla_env import FAST_COMPILE


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
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": FAST_COMPILE}
  res = subprocess.run(
      [sys.executable, "-m", "maxgemma.sample", f"--workdir={workdir}", "--prompt=Hello",
       "--prompt=Once upon a time there", "--chat", "--max_new_tokens=16", "--temperature=0.8",
       "--top_p=0.9", "--top_k=50"],
      env=env, capture_output=True, text=True, timeout=300, cwd=os.getcwd())
  assert res.returncode == 0, res.stderr[-2000:]
  assert res.stdout.count("=== ") == 2
  assert "tokens/s" in res.stdout and "step 7: 2 prompts" in res.stdout


def _greedy(prompts, mesh=None, steps=24):
  cfg = get_preset("tiny_gemma3", dtype="float32", scan_layers=False, remat_policy="none")
  params = random_params(cfg, seed=3)
  return generate(params, cfg, prompts, max_new_tokens=steps, stop_ids=(), return_logits=True,
                  mesh=mesh)


@pytest.mark.parametrize("tensor", [2, 4])
def test_sharded_greedy_equals_single_device(tensor):
  # 3 prompts on 8 / tensor data shards: the batch is padded (2 -> 4 rows, 4 -> 4).
  prompts = [[2, 10, 11, 12, 13, 14, 15, 16, 17, 18], [2, 40, 41], [2, 77, 78, 79, 80]]
  single = _greedy(prompts)
  sharded = _greedy(prompts, mesh=sampler_mesh(tensor))
  assert sharded.tokens == single.tokens
  np.testing.assert_allclose(sharded.logits, single.logits, rtol=0, atol=1e-5)
  assert sharded.batch == 3 and sharded.decode_steps == 24


def test_parameters_follow_the_rules_table():
  cfg = get_preset("tiny_gemma3", dtype="bfloat16", scan_layers=False)
  mesh = sampler_mesh(4)  # data 2 x tensor 4
  params = place(random_params(cfg), param_shardings(cfg, mesh), cfg)
  emb = params["embedder"]["input_embedding"]  # [V=512, D=64]: vocab over tensor
  assert emb.dtype == jnp.bfloat16 and emb.addressable_shards[0].data.shape == (128, 64)
  q = params["layer_0"]["attn"]["q_einsum"]["w"]  # [N=4, D, H]: heads over tensor
  assert q.addressable_shards[0].data.shape == (1, 64, 16)
  kv = params["layer_0"]["attn"]["kv_einsum"]["w"]  # [2, K=2, D, H]: K=2 does not split 4 ways
  assert kv.addressable_shards[0].data.shape == (2, 2, 64, 16)
  norm = params["layer_0"]["pre_attention_norm"]["scale"]  # vectors keep their dtype
  assert norm.dtype == jnp.float32


def test_tensor_must_divide_the_devices():
  with pytest.raises(ValueError, match=r"--tensor=3 does not divide the 8 devices"):
    sampler_mesh(3)


def _texts(stdout: str) -> list[str]:
  """The `=== prompt` blocks of the CLI's output (the launcher's `[p0] ` prefix removed)."""
  lines = [ln.removeprefix("[p0] ") for ln in stdout.splitlines()]
  return [f"{a}\n{b}" for a, b in zip(lines, lines[1:], strict=False) if a.startswith("=== ")]


@pytest.mark.slow
def test_two_processes_sample_the_single_device_text(tmp_path):
  workdir, _, _ = make_workdir(str(tmp_path), "tiny_gemma3")
  args = [f"--workdir={workdir}", "--prompt=Once upon a time", "--prompt=The sea",
          "--prompt=Hello", "--max_new_tokens=12"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": FAST_COMPILE, "PYTHONPATH": os.getcwd()}
  one = subprocess.run([sys.executable, "-m", "maxgemma.sample", *args], env=env,
                       capture_output=True, text=True, timeout=300, cwd=os.getcwd())
  assert one.returncode == 0, one.stderr[-2000:]
  two = subprocess.run(
      [sys.executable, "-m", "launch.local", "--processes=2", "--devices_per_process=2",
       "--module=maxgemma.sample", f"--log_dir={tmp_path / 'logs'}", "--timeout=400", "--",
       *args, "--tensor=2"],
      env=env, capture_output=True, text=True, timeout=500, cwd=os.getcwd())
  assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
  assert "mesh {'data': 2, 'fsdp': 1, 'sequence': 1, 'tensor': 2} (2 process(es)" in two.stdout
  assert len(_texts(one.stdout)) == 3
  assert _texts(two.stdout) == _texts(one.stdout)
