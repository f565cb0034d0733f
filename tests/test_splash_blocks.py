"""The splash kernel's tiles as config keys (`model.splash_block_*`, `model.splash_fused_bwd`).

The keys reach the kernel that the model builds, other tiles (and the fused backward) still equal
the reference (Pallas interpret mode on CPU), and tiles that do not divide the length are refused
in one line naming the key.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxgemma import config as config_lib
from maxgemma.model import attention_kernels
from maxgemma.model.attention_reference import GLOBAL_WINDOW
from tests.test_attention_kernels import _inputs, _reference

TILES = dict(block_q=128, block_kv=256, block_kv_compute=128, block_q_dkv=256, block_kv_dkv=128,
             block_kv_dkv_compute=128, block_q_dq=0, block_kv_dq=0)


def _config(**model):
  c = config_lib.base_config()
  c.model.preset = "tiny_gemma1_mha"
  c.model.max_seq_len = 512
  c.train.seq_len = 256
  for key, value in model.items():
    c.model[key] = value
  return c


def test_tiles_resolve():
  # Unset tiles: the largest of 512/256/128 dividing the length; separate dq tiles.
  assert attention_kernels.splash_block_sizes(8192) == dict(
      block_q=512, block_kv=512, block_kv_compute=512, block_q_dkv=512, block_kv_dkv=512,
      block_kv_dkv_compute=512, block_q_dq=512, block_kv_dq=512, use_fused_bwd_kernel=False)
  # Set tiles as given; a compute tile of 0 takes its block; fused: no dq tiles.
  got = attention_kernels.splash_block_sizes(8192, (2048, 2048, 0, 2048, 1024, 0, 0, 0, True))
  assert got == dict(block_q=2048, block_kv=2048, block_kv_compute=2048, block_q_dkv=2048,
                     block_kv_dkv=1024, block_kv_dkv_compute=1024, block_q_dq=None,
                     block_kv_dq=None, use_fused_bwd_kernel=True)


def test_config_keys_reach_the_kernel():
  cfg = _config(**{f"splash_{k}": v for k, v in TILES.items()}, splash_fused_bwd=True)
  blocks = config_lib.model_config(cfg).splash_block_sizes()
  kernel = attention_kernels._splash_kernel(4, 256, GLOBAL_WINDOW, None, True, blocks)
  sizes = kernel.kwargs["block_sizes"]
  for name, value in TILES.items():
    assert getattr(sizes, name) == (value or None), name
  assert sizes.use_fused_bwd_kernel


@pytest.mark.parametrize("fused", [False, True])
def test_other_tiles_equal_reference(fused):
  """Forward and gradients with tiles of 128 and 256 (not the default 256 everywhere)."""
  q, k, v, seg = _inputs(B=2, L=256, N=2, K=1)
  window = 64
  tiles = dict(TILES, block_q_dq=0 if fused else 128, block_kv_dq=0 if fused else 256)
  blocks = (*tiles.values(), fused)
  cot = jax.random.normal(jax.random.key(7), q.shape)

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v) * cot)

  splash = lambda q, k, v: attention_kernels.attend(  # noqa: E731
      q, k, v, impl="splash", segment_ids_BL=seg, window=window, interpret=True,
      splash_blocks=blocks)
  np.testing.assert_allclose(np.asarray(splash(q, k, v)),
                             np.asarray(_reference(q, k, v, seg, window, None)), atol=2e-5)
  ref = jax.grad(loss(lambda q, k, v: _reference(q, k, v, seg, window, None)),
                 argnums=(0, 1, 2))(q, k, v)
  got = jax.grad(loss(splash), argnums=(0, 1, 2))(q, k, v)
  for g, r in zip(got, ref, strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("key,value,message", [
    ("splash_block_q", 96, r"model\.splash_block_q=96 does not divide the sequence length 256"),
    ("splash_block_kv_dkv", 512,
     r"model\.splash_block_kv_dkv=512 does not divide the sequence length 256"),
    ("splash_block_kv_compute", 256,
     r"model\.splash_block_kv_compute=256 does not divide model\.splash_block_kv=128"),
    ("splash_block_q_dq", 128, r"model\.splash_block_q_dq and model\.splash_block_kv_dq must be 0"),
])
def test_bad_tiles_name_the_key(key, value, message):
  cfg = _config(attention_impl="splash", splash_block_kv=128,
                splash_fused_bwd=key == "splash_block_q_dq", **{key: value})
  with pytest.raises(ValueError, match=message):
    config_lib.model_config(cfg)


def test_a_tile_that_does_not_divide_names_the_divisors_and_binds_only_splash():
  with pytest.raises(ValueError, match=r"use a divisor of it \(128, 256\) or 0"):
    config_lib.model_config(_config(attention_impl="splash", splash_block_q=512))
  with pytest.raises(ValueError, match=r"use 0 \(default\) or a length that is a multiple of 128"):
    short = _config(attention_impl="splash", splash_block_q=512)
    short.train.seq_len = 96
    config_lib.model_config(short)
  # A pod config's tiles under another kernel at a short length: nothing to tile.
  assert config_lib.model_config(_config(attention_impl="xla", splash_block_q=512))


def test_kernel_refuses_a_tile_that_does_not_divide_its_length():
  # The model config checks train.seq_len; a trace at another length is checked by the kernel.
  with pytest.raises(ValueError, match=r"model\.splash_block_q=256 does not divide the sequence "
                                       r"length 384"):
    attention_kernels.splash_block_sizes(384, (256,))
