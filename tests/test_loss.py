"""maxgemma.loss: numpy references, chunked == materialised (values and gradients), memory."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxgemma.loss import chunked_cross_entropy, cross_entropy
from maxgemma.model.gemma import Transformer
from maxgemma.model.presets import get_preset


def _numpy_cross_entropy(logits, targets, weights, z_loss):
  """float64 reference: (loss_sum, weight_sum, nll_sum, z_sum, correct)."""
  x = logits.astype(np.float64)
  m = x.max(-1, keepdims=True)
  lse = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]
  picked = np.take_along_axis(x, targets[..., None], -1)[..., 0]
  nll = (weights * (lse - picked)).sum()
  z = (weights * z_loss * lse ** 2).sum()
  correct = (weights * (x.argmax(-1) == targets)).sum()
  return nll + z, weights.sum(), nll, z, correct


def _inputs(B=3, L=13, D=16, V=50, seed=0, hidden_dtype=np.float32):
  rng = np.random.default_rng(seed)
  hidden = jnp.asarray(rng.normal(size=(B, L, D)), hidden_dtype)
  emb = jnp.asarray(rng.normal(size=(V, D)) * 0.5, jnp.float32)
  targets = jnp.asarray(rng.integers(0, V, size=(B, L)), jnp.int32)
  weights = jnp.asarray(rng.random((B, L)) > 0.25, jnp.float32)
  return hidden, emb, targets, weights


def test_cross_entropy_matches_numpy():
  rng = np.random.default_rng(0)
  logits = (rng.normal(size=(2, 7, 31)) * 4).astype(np.float32)
  targets = rng.integers(0, 31, size=(2, 7)).astype(np.int32)
  targets[0, :3] = logits[0, :3].argmax(-1)  # some right answers, so `correct` is not 0
  weights = (rng.random((2, 7)) > 0.3).astype(np.float32)
  loss, weight, aux = jax.jit(cross_entropy, static_argnums=3)(
      jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32), targets, weights, 1e-2)
  want = _numpy_cross_entropy(np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(np.float32)),
                              targets, weights, 1e-2)
  got = (loss, weight, aux["nll_sum"], aux["z_loss_sum"], aux["correct"])
  assert want[4] >= 1 and want[3] > 0
  np.testing.assert_allclose(np.array(got, np.float64), np.array(want), rtol=1e-5)


def test_cross_entropy_default_weights_and_bad_shapes():
  logits = jnp.zeros((2, 3, 4))
  targets = jnp.zeros((2, 3), jnp.int32)
  loss, weight, _ = cross_entropy(logits, targets, None)
  np.testing.assert_allclose([float(loss), float(weight)], [6 * np.log(4), 6], rtol=1e-6)
  with pytest.raises(ValueError, match="targets must have shape"):
    cross_entropy(logits, jnp.zeros((2, 4), jnp.int32), None)
  with pytest.raises(ValueError, match="integers"):
    cross_entropy(logits, jnp.zeros((2, 3)), None)
  with pytest.raises(ValueError, match="chunk_size"):
    chunked_cross_entropy(jnp.zeros((2, 3, 5)), jnp.zeros((7, 5)), targets, None, chunk_size=0)
  with pytest.raises(ValueError, match="embedding"):
    chunked_cross_entropy(jnp.zeros((2, 3, 5)), jnp.zeros((7, 4)), targets, None, chunk_size=2)


def _materialised(hidden, emb, targets, weights, softcap, z_loss, dtype):
  """Reference: the full [B, L, V] logits, built here independently of maxgemma.loss."""
  logits = jnp.einsum("bld,vd->blv", hidden.astype(dtype), emb.astype(dtype),
                      preferred_element_type=jnp.float32)
  if softcap is not None:
    logits = softcap * jnp.tanh(logits / softcap)
  return cross_entropy(logits, targets, weights, z_loss)


def _value_and_grads(fn, hidden, emb, targets, weights):
  def scalar(h, e):
    loss, weight, aux = fn(h, e, targets, weights)
    return loss / weight, (weight, aux)
  return jax.jit(jax.value_and_grad(scalar, argnums=(0, 1), has_aux=True))(hidden, emb)


@pytest.mark.parametrize("chunk_size,softcap,z_loss", [
    (4, 5.0, 1e-3),   # 13 = 3 chunks of 4 + 1 padded position
    (1, None, 0.0),
    (13, 2.0, 0.0),   # one chunk
    (64, None, 1e-2),  # chunk larger than L
])
def test_chunked_equals_materialised_float32(chunk_size, softcap, z_loss):
  hidden, emb, targets, weights = _inputs()
  chunked = lambda h, e, t, w: chunked_cross_entropy(
      h, e, t, w, chunk_size=chunk_size, final_softcap=softcap, z_loss=z_loss, dtype=jnp.float32)
  full = lambda h, e, t, w: _materialised(h, e, t, w, softcap, z_loss, jnp.float32)
  (v1, (w1, aux1)), (gh1, ge1) = _value_and_grads(chunked, hidden, emb, targets, weights)
  (v2, (w2, aux2)), (gh2, ge2) = _value_and_grads(full, hidden, emb, targets, weights)
  np.testing.assert_allclose(float(v1), float(v2), rtol=1e-6)
  assert float(w1) == float(w2) == float(weights.sum())
  for k in aux2:
    np.testing.assert_allclose(float(aux1[k]), float(aux2[k]), rtol=1e-6, err_msg=k)
  scale_h, scale_e = float(jnp.abs(gh2).max()), float(jnp.abs(ge2).max())
  assert scale_h > 0 and scale_e > 0
  np.testing.assert_allclose(np.asarray(gh1), np.asarray(gh2), rtol=1e-5, atol=1e-6 * scale_h)
  np.testing.assert_allclose(np.asarray(ge1), np.asarray(ge2), rtol=1e-5, atol=1e-6 * scale_e)
  # Weight-0 positions get exactly zero gradient.
  assert not np.any(np.asarray(gh1)[np.asarray(weights) == 0])


def test_chunked_equals_materialised_bfloat16():
  """bf16 hidden states and matmul (float32 accumulation): same logits, bf16-level tolerance."""
  hidden, emb, targets, weights = _inputs(B=2, L=24, D=32, V=96, seed=1,
                                          hidden_dtype=jnp.bfloat16)
  chunked = lambda h, e, t, w: chunked_cross_entropy(
      h, e, t, w, chunk_size=8, final_softcap=30.0, z_loss=1e-4, dtype=jnp.bfloat16)
  full = lambda h, e, t, w: _materialised(h, e, t, w, 30.0, 1e-4, jnp.bfloat16)
  (v1, _), (gh1, ge1) = _value_and_grads(chunked, hidden, emb, targets, weights)
  (v2, _), (gh2, ge2) = _value_and_grads(full, hidden, emb, targets, weights)
  assert gh1.dtype == jnp.bfloat16 and ge1.dtype == jnp.float32
  np.testing.assert_allclose(float(v1), float(v2), rtol=1e-5)
  # bf16 gradients carry 8 significant bits: compare to 2% of the largest entry.
  for a, b in ((gh1, gh2), (ge1, ge2)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, atol=0.02 * np.abs(b).max())


def test_chunked_matches_model_logits():
  """On a real model: the loss from hidden states equals the loss from the model's own logits."""
  cfg = get_preset("tiny_gemma2")
  model = Transformer(cfg)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16)), jnp.int32)
  shapes = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))["params"])
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.1, s.dtype), shapes)

  @jax.jit
  def both(params):
    hidden = model.apply({"params": params}, tokens, return_hidden=True)
    logits = model.apply({"params": params}, tokens)
    targets = jnp.roll(tokens, -1, axis=1)
    chunked = chunked_cross_entropy(hidden, params["embedder"]["input_embedding"], targets, None,
                                    chunk_size=5, final_softcap=cfg.final_logit_softcap,
                                    dtype=jnp.dtype(cfg.dtype))
    return chunked, cross_entropy(logits, targets, None)

  chunked, full = both(params)
  assert cfg.final_logit_softcap is not None
  np.testing.assert_allclose(float(chunked[0]), float(full[0]), rtol=1e-5)
  np.testing.assert_allclose(float(chunked[2]["correct"]), float(full[2]["correct"]))


def test_chunked_memory_is_a_fraction_of_materialised():
  """Compiled (not run) at Gemma's vocabulary: V = 256128, 8192 bf16 tokens, D = 256.

  Bound: the chunked loss + gradients needs < 25% of the materialised version's temporary memory
  (measured on CPU: ~7% with 512-token chunks; the materialised [B, L, V] f32 logits alone are
  8 GiB, several copies of which live at once).
  """
  B, L, D, V = 8, 1024, 256, 256128
  args = (jax.ShapeDtypeStruct((B, L, D), jnp.bfloat16), jax.ShapeDtypeStruct((V, D), jnp.float32),
          jax.ShapeDtypeStruct((B, L), jnp.int32), jax.ShapeDtypeStruct((B, L), jnp.float32))
  chunked = lambda h, e, t, w: chunked_cross_entropy(h, e, t, w, chunk_size=64, final_softcap=30.0,
                                                     dtype=jnp.bfloat16)
  full = lambda h, e, t, w: _materialised(h, e, t, w, 30.0, 0.0, jnp.bfloat16)

  def temp_bytes(fn):
    def grads(h, e, t, w):
      return jax.grad(lambda h, e: fn(h, e, t, w)[0], argnums=(0, 1))(h, e)
    return jax.jit(grads).lower(*args).compile().memory_analysis().temp_size_in_bytes

  full_bytes, chunked_bytes = temp_bytes(full), temp_bytes(chunked)
  assert full_bytes > B * L * V * 4  # the materialised version does hold the f32 logits
  assert chunked_bytes < 0.25 * full_bytes, (chunked_bytes, full_bytes)
