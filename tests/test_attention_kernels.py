"""Every attention implementation equals the "xla" reference on the inputs it supports.

"dot_product" runs here through jax.nn.dot_product_attention's XLA path; its cuDNN flash path runs
only when a GPU is present (skipped otherwise). "splash" runs here in Pallas interpret mode (the
same kernel code, interpreted on CPU); on a TPU it is compiled (see also the AOT test).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxgemma.model import attention, attention_kernels, presets
from maxgemma.model.gemma import Transformer

HAS_GPU = any(d.platform == "gpu" for d in jax.devices()) if jax.default_backend() == "gpu" \
    else False
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="no GPU lent to this run")


def _inputs(B=2, L=256, N=4, K=2, H=64, dtype=jnp.float32, seed=0, packed=True):
  ks = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(ks[0], (B, L, N, H), dtype) * H ** -0.5
  k = jax.random.normal(ks[1], (B, L, K, H), dtype)
  v = jax.random.normal(ks[2], (B, L, K, H), dtype)
  seg = np.ones((B, L), np.int32)
  if packed:  # uneven packed documents, and padding (segment 0) at the end of row 0
    seg[:, L // 3:] = 2
    seg[1, 3 * L // 4:] = 3
    seg[0, L - 16:] = 0
  return q, k, v, jnp.asarray(seg)


def _reference(q, k, v, seg, window, softcap):
  B, L = seg.shape
  idx = jnp.broadcast_to(jnp.arange(L), (B, L))
  mask = attention.attention_mask(idx, idx, seg, seg, window)
  return attention.dot_product_attention(q, k, v, mask, softcap=softcap)


CASES = {  # name: (N, K, window, softcap)
    "causal_gqa": (4, 2, None, None),
    "causal_mqa": (4, 1, None, None),
    "causal_mha": (2, 2, None, None),
    "window_gqa": (4, 2, 48, None),
    "softcap_window": (4, 2, 48, 50.0),
    "softcap_causal_mqa": (4, 1, None, 30.0),
}


@pytest.mark.parametrize("impl", ["dot_product", "splash"])
@pytest.mark.parametrize("case", list(CASES))
def test_impl_equals_reference(impl, case):
  N, K, window, softcap = CASES[case]
  q, k, v, seg = _inputs(N=N, K=K)
  expected = _reference(q, k, v, seg, window, softcap)
  got = attention_kernels.attend(q, k, v, impl=impl, segment_ids_BL=seg, window=window,
                                 softcap=softcap, interpret=True)
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("impl", ["dot_product", "splash"])
def test_gradients_equal_reference(impl):
  q, k, v, seg = _inputs(B=2, L=256, N=4, K=1)
  window = 64
  cot = jax.random.normal(jax.random.key(7), q.shape)

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v) * cot)

  ref = jax.grad(loss(lambda q, k, v: _reference(q, k, v, seg, window, None)),
                 argnums=(0, 1, 2))(q, k, v)
  got = jax.grad(loss(lambda q, k, v: attention_kernels.attend(
      q, k, v, impl=impl, segment_ids_BL=seg, window=window, interpret=True)),
      argnums=(0, 1, 2))(q, k, v)
  for g, r in zip(got, ref, strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", ["dot_product", "splash"])
def test_traced_window_switch(impl):
  """A traced per-layer window (the scan's) picks the matching static branch."""
  q, k, v, seg = _inputs(L=128)
  windows = (32, None)
  fn = jax.jit(lambda w: attention_kernels.attend(q, k, v, impl=impl, segment_ids_BL=seg,
                                                  window=w, windows=windows, interpret=True))
  for w in (32, attention.GLOBAL_WINDOW):
    expected = _reference(q, k, v, seg, None if w == attention.GLOBAL_WINDOW else w, None)
    np.testing.assert_allclose(np.asarray(fn(jnp.int32(w))), np.asarray(expected), atol=2e-5)


def test_splash_off_tpu_falls_back(caplog):
  """Without interpret mode off a TPU, splash logs why and computes the reference."""
  q, k, v, seg = _inputs(L=128)
  with caplog.at_level("WARNING"):
    got = attention_kernels.attend(q, k, v, impl="splash", segment_ids_BL=seg, window=None)
  np.testing.assert_allclose(np.asarray(got), np.asarray(_reference(q, k, v, seg, None, None)),
                             atol=1e-6)
  assert "TPU only" in caplog.text or jax.default_backend() == "tpu"


@pytest.mark.parametrize("impl", ["dot_product"])
@pytest.mark.parametrize("preset,scan", [("tiny_gemma3", True), ("tiny_gemma3", False),
                                         ("tiny_gemma1_mqa", True)])
def test_model_logits_equal_reference(impl, preset, scan):
  """The whole model with a kernel impl (scanned: traced windows; unrolled: static) equals xla."""
  cfg = presets.get_preset(preset, dtype="float32", scan_layers=scan)
  tokens = jax.random.randint(jax.random.key(1), (2, 32), 0, cfg.vocab_size)
  seg = jnp.asarray(np.repeat([[1] * 20 + [2] * 12], 2, 0), jnp.int32)
  pos = jnp.asarray(np.repeat([list(range(20)) + list(range(12))], 2, 0), jnp.int32)
  params = Transformer(cfg).init(jax.random.key(0), tokens)["params"]
  ref = Transformer(cfg).apply({"params": params}, tokens, pos, seg)
  got = Transformer(cfg.replace(attention_impl=impl)).apply({"params": params}, tokens, pos, seg)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-4, rtol=1e-4)


@needs_gpu
@pytest.mark.parametrize("case", ["causal_gqa", "causal_mqa", "window_gqa"])
def test_cudnn_flash_equals_reference(case):
  """cuDNN flash attention (bf16) against the float32 reference on the same bf16 inputs."""
  N, K, window, _ = CASES[case]
  q, k, v, seg = _inputs(N=N, K=K, L=512, H=128, dtype=jnp.bfloat16)
  assert attention_kernels.dot_product_backend(q.dtype) == "cudnn"
  expected = _reference(*(x.astype(jnp.float32) for x in (q, k, v)), seg, window, None)
  got = jax.jit(lambda q, k, v: attention_kernels.attend(
      q, k, v, impl="dot_product", segment_ids_BL=seg, window=window))(q, k, v)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(expected), atol=2e-2,
                             rtol=2e-2)


@pytest.mark.slow
def test_splash_and_offload_compile_for_tpu():
  """The train step with splash attention (Gemma 2 local/global windows via the switch, soft-caps,
  heads split over `tensor`) and host-offloaded remat compiles for a v5e slice through
  `maxgemma.compile`'s AOT path: the Mosaic kernels and the host-memory buffers are in the HLO."""
  from maxgemma import compile as compile_lib
  from maxgemma.config import base_config

  c = base_config()
  c.model.preset = "tiny_gemma2"
  c.model.update(head_dim=128, sliding_window=128, max_seq_len=512, attention_impl="splash",
                 remat_policy="offload_names")
  c.train.update(global_batch=8, seq_len=256)
  c.mesh.update(ici_data=1, ici_fsdp=2, ici_tensor=2)
  report = compile_lib.compile_train_step(c, "v5e:2x2", 1, keep_compiled=True)
  hlo = report["compiled"].as_text()
  assert "tpu_custom_call" in hlo  # the splash kernels (forward, dq, dkv)
  assert "S(5)" in hlo  # buffers in host memory space: the offloaded activations
  assert report["fits"]
