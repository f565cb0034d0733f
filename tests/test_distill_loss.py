"""maxgemma.distill_loss against float64 numpy, token by token: online and top-k, chunked or not."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxgemma import distill_loss as dl


def _log_softmax(x):
  m = x.max(-1, keepdims=True)
  return x - (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))


def _packed_weights(B, L, rng):
  """Rows of two packed documents and a padded tail: 0 on the tail and on each document's last
  token (it has no next token in its document), 1 elsewhere, plus a few random zeros."""
  w = np.ones((B, L))
  for b in range(B):
    end1, end2 = rng.integers(2, L // 2), rng.integers(L // 2 + 1, L - 1)
    w[b, end1 - 1] = 0.0
    w[b, end2 - 1:] = 0.0
  w[rng.random((B, L)) < 0.1] = 0.0
  return w


def _numpy_student(s, y, w, z_loss):
  lse = s.max(-1) + np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1))
  nll = lse - np.take_along_axis(s, y[..., None], -1)[..., 0]
  return {"nll_sum": (w * nll).sum(), "z_loss_sum": (w * z_loss * lse ** 2).sum(),
          "correct": (w * (s.argmax(-1) == y)).sum()}


def _numpy_online(s, u, y, w, tau, alpha, z_loss):
  """float64, straight from the definitions, one token at a time."""
  s, u = s.astype(np.float64), u.astype(np.float64)
  ce, kl, agree = 0.0, 0.0, 0.0
  for b in range(s.shape[0]):
    for t in range(s.shape[1]):
      p = np.exp(_log_softmax(u[b, t] / tau))
      log_q = _log_softmax(s[b, t] / tau)
      ce += w[b, t] * -(p * log_q).sum()
      kl += w[b, t] * (p * (np.log(p) - log_q)).sum()
      agree += w[b, t] * (s[b, t].argmax() == u[b, t].argmax())
  out = _numpy_student(s, y, w, z_loss)
  obj = (1 - alpha) * tau ** 2 * ce + alpha * out["nll_sum"]
  out.update(objective_sum=obj, distill_sum=ce, kl_sum=kl, agree=agree)
  return obj + out["z_loss_sum"], w.sum(), out


def _numpy_topk(s, ids, r, y, w, alpha, z_loss):
  s = s.astype(np.float64)
  ce, kl, agree = 0.0, 0.0, 0.0
  for b in range(s.shape[0]):
    for t in range(s.shape[1]):
      log_q = _log_softmax(s[b, t])
      total = float(r[b, t].sum())
      best = ids[b, t][int(np.argmax(r[b, t]))]
      agree += w[b, t] * (s[b, t].argmax() == best)
      if total == 0:
        continue
      for k in range(ids.shape[-1]):
        p = r[b, t, k] / total
        ce += w[b, t] * -p * log_q[ids[b, t, k]]
        if p > 0:
          kl += w[b, t] * p * (np.log(p) - log_q[ids[b, t, k]])
  out = _numpy_student(s, y, w, z_loss)
  obj = (1 - alpha) * ce + alpha * out["nll_sum"]
  out.update(objective_sum=obj, distill_sum=ce, kl_sum=kl, agree=agree)
  return obj + out["z_loss_sum"], w.sum(), out


def _assert_sums(got, want, rtol=2e-5):
  assert set(got[2]) == set(want[2]) == set(dl.AUX_KEYS)
  np.testing.assert_allclose(float(got[0]), want[0], rtol=rtol)
  np.testing.assert_allclose(float(got[1]), want[1], rtol=rtol)
  for key in dl.AUX_KEYS:
    np.testing.assert_allclose(float(got[2][key]), want[2][key], rtol=rtol, atol=1e-5,
                               err_msg=key)


def _online_inputs(B=3, L=11, V=37, seed=0):
  rng = np.random.default_rng(seed)
  u = (rng.normal(size=(B, L, V)) * 3).astype(np.float32)
  s = (rng.normal(size=(B, L, V)) * 2).astype(np.float32)
  s[:, :5] += 10 * (u[:, :5] == u[:, :5].max(-1, keepdims=True))  # some top-1 agreement
  y = rng.integers(0, V, (B, L)).astype(np.int32)
  return s, u, y, _packed_weights(B, L, rng).astype(np.float32)


@pytest.mark.parametrize("tau,alpha,z_loss", [(1.0, 0.0, 0.0), (2.5, 0.3, 1e-3), (0.5, 1.0, 0.0)])
def test_online_matches_numpy(tau, alpha, z_loss):
  s, u, y, w = _online_inputs()
  got = jax.jit(lambda *a: dl.distill_cross_entropy(*a, temperature=tau, alpha=alpha,
                                                    z_loss=z_loss))(s, u, y, w)
  want = _numpy_online(s, u, y, w, tau, alpha, z_loss)
  assert want[2]["agree"] >= 3 and 0 < want[1] < w.size  # agreement and zeros really occur
  _assert_sums(got, want)


def test_online_gradient_is_the_tempered_probability_difference():
  """d loss / d s = w ((1 - alpha) tau (q_tau - p) + alpha (q - onehot(y))), in float64."""
  s, u, y, w = _online_inputs(seed=1)
  tau, alpha = 2.0, 0.25
  grad = jax.grad(lambda s: dl.distill_cross_entropy(s, u, y, w, temperature=tau,
                                                     alpha=alpha)[0])(jnp.asarray(s))
  s64, u64 = s.astype(np.float64), u.astype(np.float64)
  q_tau, p = np.exp(_log_softmax(s64 / tau)), np.exp(_log_softmax(u64 / tau))
  onehot = np.eye(s.shape[-1])[y]
  want = w[..., None] * ((1 - alpha) * tau * (q_tau - p)
                         + alpha * (np.exp(_log_softmax(s64)) - onehot))
  np.testing.assert_allclose(np.asarray(grad), want, atol=2e-6)
  teacher_grad = jax.grad(lambda u: dl.distill_cross_entropy(s, u, y, w)[0])(jnp.asarray(u))
  assert not np.any(np.asarray(teacher_grad))  # the teacher is frozen


def _topk_inputs(B=3, L=9, V=29, K=6, seed=0):
  rng = np.random.default_rng(seed)
  s = (rng.normal(size=(B, L, V)) * 2).astype(np.float32)
  ids = np.stack([[rng.choice(V, K, replace=False) for _ in range(L)] for _ in range(B)])
  ids[1, 2, :2] = 5  # a repeated id: its weights add up
  r = rng.random((B, L, K)).astype(np.float32) * (rng.random((B, L, K)) > 0.3)
  r[0, 3] = 0.0  # a token with no sampled weight (padding in the stored top-k)
  r *= 7.0  # unnormalised: renormalisation is the loss's job
  best = np.take_along_axis(ids, r.argmax(-1)[..., None], -1)[..., 0]
  s[-1, :5] += 12 * (np.arange(V) == best[-1, :5, None])  # some top-1 agreement
  y = rng.integers(0, V, (B, L)).astype(np.int32)
  return s, ids.astype(np.int32), r, y, _packed_weights(B, L, rng).astype(np.float32)


@pytest.mark.parametrize("alpha,z_loss", [(0.0, 0.0), (0.4, 1e-3)])
def test_topk_matches_numpy_with_renormalisation(alpha, z_loss):
  s, ids, r, y, w = _topk_inputs()
  w[0, 3] = 1.0  # the all-zero-weight token counts: it must add 0 distillation loss, not NaN
  got = jax.jit(lambda *a: dl.topk_cross_entropy(*a, alpha=alpha, z_loss=z_loss))(s, ids, r, y, w)
  want = _numpy_topk(s, ids, r, y, w, alpha, z_loss)
  assert want[2]["agree"] >= 3
  _assert_sums(got, want)
  # Scaling a token's weights changes nothing (renormalised); dropping the renormalisation would.
  r2 = r.copy()
  r2[1] *= 3.0
  _assert_sums(dl.topk_cross_entropy(s, ids, r2, y, w, alpha=alpha, z_loss=z_loss), want)


def test_topk_with_every_id_sampled_equals_online_at_temperature_1():
  s, u, y, w = _online_inputs(B=2, L=8, V=13, seed=3)
  ids = np.broadcast_to(np.arange(13), (2, 8, 13)).astype(np.int32)
  p = np.exp(_log_softmax(u.astype(np.float64))).astype(np.float32)
  online = dl.distill_cross_entropy(s, u, y, w)
  topk = dl.topk_cross_entropy(s, ids, p, y, w)
  _assert_sums(topk, (float(online[0]), float(online[1]),
                      {k: float(v) for k, v in online[2].items()}), rtol=1e-5)


def _hidden_inputs(B=2, L=13, D=16, E=24, V=41, seed=0):
  rng = np.random.default_rng(seed)
  h = rng.normal(size=(B, L, D)).astype(np.float32)
  t = rng.normal(size=(B, L, E)).astype(np.float32)
  emb = (rng.normal(size=(V, D)) * 0.5).astype(np.float32)
  temb = (rng.normal(size=(V, E)) * 0.5).astype(np.float32)
  y = rng.integers(0, V, (B, L)).astype(np.int32)
  return h, t, emb, temb, y, _packed_weights(B, L, rng).astype(np.float32)


def _capped(x, cap):
  return x if cap is None else cap * np.tanh(x / cap)


@pytest.mark.parametrize("chunk", [1, 4, 13, 64])
def test_chunked_online_matches_numpy(chunk):
  h, t, emb, temb, y, w = _hidden_inputs()
  fn = jax.jit(lambda *a: dl.chunked_distill_cross_entropy(
      *a, chunk_size=chunk, temperature=1.7, alpha=0.2, z_loss=1e-3, final_softcap=5.0,
      teacher_softcap=None, dtype=jnp.float32, teacher_dtype=jnp.float32))
  got = fn(h, emb, t, temb, y, w)
  s = _capped(h.astype(np.float64) @ emb.T.astype(np.float64), 5.0)
  u = t.astype(np.float64) @ temb.T.astype(np.float64)
  _assert_sums(got, _numpy_online(s, u, y, w, 1.7, 0.2, 1e-3), rtol=1e-4)


def test_chunked_gradients_equal_the_materialised_ones():
  h, t, emb, temb, y, w = _hidden_inputs(seed=2)
  kw = dict(temperature=2.0, alpha=0.3, z_loss=1e-3)

  def full(h, emb):
    s = jnp.einsum("BLD,VD->BLV", h, emb)
    return dl.distill_cross_entropy(s, jnp.einsum("BLE,VE->BLV", t, temb), y, w, **kw)[0]

  def chunked(h, emb):
    return dl.chunked_distill_cross_entropy(h, emb, t, temb, y, w, chunk_size=4,
                                            dtype=jnp.float32, teacher_dtype=jnp.float32,
                                            **kw)[0]

  want = jax.grad(full, argnums=(0, 1))(h, emb)
  got = jax.jit(jax.grad(chunked, argnums=(0, 1)))(h, emb)
  for g, e in zip(got, want, strict=True):
    assert float(jnp.abs(e).max()) > 0
    np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("chunk", [3, 9])
def test_chunked_topk_matches_numpy(chunk):
  s_unused, ids, r, y, w = _topk_inputs(B=2, L=9, V=41, K=5, seed=4)
  h, _, emb, _, _, _ = _hidden_inputs(B=2, L=9, V=41, seed=4)
  got = jax.jit(lambda *a: dl.chunked_topk_cross_entropy(
      *a, chunk_size=chunk, alpha=0.1, final_softcap=4.0, dtype=jnp.float32))(h, emb, ids, r, y, w)
  s = _capped(h.astype(np.float64) @ emb.T.astype(np.float64), 4.0)
  _assert_sums(got, _numpy_topk(s, ids, r, y, w, 0.1, 0.0), rtol=1e-4)


def test_bad_inputs_are_one_clear_line():
  s, u, y, w = _online_inputs(B=1, L=6, V=7)
  with pytest.raises(ValueError, match="one vocabulary"):
    dl.distill_cross_entropy(s, u[..., :5], y, w)
  with pytest.raises(ValueError, match="temperature must be > 0"):
    dl.distill_cross_entropy(s, u, y, w, temperature=0.0)
  with pytest.raises(ValueError, match=r"alpha .* must be in \[0, 1\]"):
    dl.distill_cross_entropy(s, u, y, w, alpha=1.5)
  ids = np.zeros((1, 6, 8), np.int32)
  with pytest.raises(ValueError, match="k=8 sampled ids per token exceeds the vocabulary \\(7\\)"):
    dl.topk_cross_entropy(s, ids, np.ones((1, 6, 8), np.float32), y, w)
  h, t, emb, temb, y2, w2 = _hidden_inputs(B=1, L=6, V=7)
  with pytest.raises(ValueError, match="need one tokenizer"):
    dl.chunked_distill_cross_entropy(h, emb, t, temb[:6], y2, w2, chunk_size=2)


def test_chunks_keep_a_length_sharding():
  """With the length sharded 8 ways, the chunked loss (and its gradient) gathers neither
  model's hidden states: each chunk is strided, so the sharded axis is not the scanned one."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  from maxgemma import hlo

  B, L, D, E, V = 2, 64, 16, 24, 32
  rng = np.random.default_rng(0)
  h, t = rng.normal(size=(B, L, D)), rng.normal(size=(B, L, E))
  emb, temb = rng.normal(size=(V, D)), rng.normal(size=(V, E))
  targets = rng.integers(0, V, (B, L))
  mesh = Mesh(np.array(jax.devices()[:8]), ("sequence",))
  along = NamedSharding(mesh, PartitionSpec(None, "sequence"))
  whole = NamedSharding(mesh, PartitionSpec())

  def loss(h, emb, t, temb, targets):
    return dl.chunked_distill_cross_entropy(h, emb, t, temb, targets, None, chunk_size=8,
                                            dtype=jnp.float32, teacher_dtype=jnp.float32)[0]

  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)),
               in_shardings=(along, whole, along, whole, along))
  args = [jnp.asarray(x, jnp.float32) for x in (h, emb, t, temb)]
  text = fn.lower(args[0], args[1], args[2], args[3], jnp.asarray(targets)).compile().as_text()
  gathers = [c for c in hlo.ici_collectives(text) if c["kind"] == "all-gather"]
  largest = max((c["bytes"] for c in gathers), default=0)
  assert largest < B * L * D * 4 // 2, gathers  # nothing near a whole [B, L, D] hidden state
