"""maxgemma.optim against closed-form schedules and a hand-written numpy AdamW."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from maxgemma.config import base_config
from maxgemma.model.gemma import Transformer
from maxgemma.model.presets import get_preset
from maxgemma.optim import decay_mask, learning_rate_schedule, make_optimizer


def _cfg(**kw):
  """`base_config().optim` (a plain dict) with the values the worked numbers below assume."""
  base = dict(learning_rate=1.0, schedule="cosine", warmup_steps=10, decay_steps=110,
              end_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, clip_norm=0.0,
              moments_dtype="float32")
  return {**base_config().optim.to_dict(), **base, **kw}


# (schedule, step, expected) with lr 1, warmup 10, decay 110, end 0.1: numbers worked by hand.
_SCHEDULE_POINTS = [
    ("cosine", 0, 0.0), ("cosine", 5, 0.5), ("cosine", 10, 1.0),
    ("cosine", 35, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))), ("cosine", 60, 0.55),
    ("cosine", 110, 0.1), ("cosine", 500, 0.1),
    ("linear", 3, 0.3), ("linear", 35, 0.775), ("linear", 60, 0.55), ("linear", 110, 0.1),
    ("linear", 111, 0.1),
    ("constant", 0, 0.0), ("constant", 7, 0.7), ("constant", 10, 1.0), ("constant", 10_000, 1.0),
    ("rsqrt", 5, 0.5), ("rsqrt", 10, 1.0), ("rsqrt", 40, 0.5), ("rsqrt", 250, math.sqrt(0.04)),
]


@pytest.mark.parametrize("kind,step,expected", _SCHEDULE_POINTS)
def test_schedule_values(kind, step, expected):
  sched = learning_rate_schedule(_cfg(schedule=kind), total_steps=999)
  np.testing.assert_allclose(float(sched(step)), expected, rtol=1e-6, atol=1e-7)


def test_schedule_decay_steps_default_to_total_steps_and_scale_with_lr():
  sched = learning_rate_schedule(_cfg(learning_rate=3e-4, schedule="linear", decay_steps=None),
                                 total_steps=210)
  # Halfway between warmup end (10) and total_steps (210): lr * (1 + 0.1) / 2.
  np.testing.assert_allclose(float(sched(110)), 3e-4 * 0.55, rtol=1e-6)
  np.testing.assert_allclose(float(sched(210)), 3e-5, rtol=1e-6)


def test_schedule_rsqrt_without_warmup():
  sched = learning_rate_schedule(_cfg(schedule="rsqrt", warmup_steps=0), total_steps=100)
  np.testing.assert_allclose([float(sched(t)) for t in (0, 1, 4, 100)], [1.0, 1.0, 0.5, 0.1],
                             rtol=1e-6)


@pytest.mark.parametrize("changes,match", [
    (dict(schedule="cosin"), "cosine, linear, constant, rsqrt"),
    (dict(warmup_steps=200), "warmup_steps"),
    (dict(learning_rate=-1e-3), "learning_rate"),
    (dict(warmup_steps=-1), "warmup_steps"),
    (dict(decay_steps=0), "decay_steps"),
    (dict(end_lr_ratio=-0.5), "end_lr_ratio"),
    (dict(b2=1.0), "b2"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(clip_norm=-1.0), "clip_norm"),
    (dict(moments_dtype="float16"), "moments_dtype"),
])
def test_bad_values_raise_clear_errors(changes, match):
  with pytest.raises(ValueError, match=match):
    make_optimizer(_cfg(**changes), total_steps=100)


@pytest.mark.parametrize("name", ["b2", "end_lr_ratio", "decay_embeddings", "schedule"])
def test_a_missing_key_is_an_error_not_a_second_default(name):
  cfg = _cfg()
  del cfg[name]
  with pytest.raises(ValueError, match=f"optim.{name} is missing.*base_config"):
    make_optimizer(cfg, total_steps=100)


def test_base_config_defaults_reach_the_optimizer():
  """b2 and end_lr_ratio of base_config() are the ones used (numbers from docs/config.md)."""
  cfg = base_config().optim
  cfg.update(learning_rate=1.0, warmup_steps=0, weight_decay=0.0, clip_norm=0.0)
  sched = learning_rate_schedule(cfg, total_steps=10)
  np.testing.assert_allclose(float(sched(10)), 0.1, rtol=1e-6)  # end_lr_ratio 0.1
  params = {"w": jnp.zeros((1,), jnp.float32)}
  opt = make_optimizer(cfg, total_steps=10)
  state = opt.init(params)
  _, state = opt.update({"w": jnp.full((1,), 2.0)}, state, params)
  nu = [s.nu for s in jax.tree_util.tree_leaves(state, is_leaf=lambda s: hasattr(s, "nu"))
        if hasattr(s, "nu")][0]
  np.testing.assert_allclose(np.asarray(nu["w"]), (1 - 0.95) * 4.0, rtol=1e-6)  # b2 0.95


def test_decay_embeddings_is_a_config_key():
  """optim.decay_embeddings (base_config) puts the embedding under weight decay."""
  params = {"embedder": {"input_embedding": jnp.ones((2, 2), jnp.float32)}}
  zero = jax.tree.map(jnp.zeros_like, params)
  for on, expected in ((False, 0.0), (True, -0.5 * 0.2)):
    cfg = base_config().optim
    cfg.update(learning_rate=0.5, schedule="constant", warmup_steps=0, weight_decay=0.2,
               decay_embeddings=on)
    opt = make_optimizer(cfg, 10)
    updates, _ = opt.update(zero, opt.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["embedder"]["input_embedding"]), expected,
                               rtol=1e-6)


def test_missing_decay_and_total_steps_raises():
  with pytest.raises(ValueError, match="total_steps"):
    learning_rate_schedule(_cfg(decay_steps=None), total_steps=None)


def _toy_params(rng):
  return {
      "embedder": {"input_embedding": rng.normal(size=(8, 4)).astype(np.float32)},
      "layers": {
          "attn": {"q_einsum": {"w": rng.normal(size=(2, 4, 3)).astype(np.float32)}},
          "pre_attention_norm": {"scale": rng.normal(size=(2, 4)).astype(np.float32)},
      },
      "final_norm": {"scale": rng.normal(size=(4,)).astype(np.float32)},
  }


# Hand-written for the toy tree: only the attention weight is decayed.
_TOY_DECAYED = {"layers/attn/q_einsum/w"}


def _flat(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _numpy_adamw(params, grads_seq, lrs, b1, b2, eps, wd, clip, decayed):
  """Reference AdamW on flat dicts of numpy arrays, in float64."""
  p = {k: v.astype(np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v2 = {k: np.zeros_like(v) for k, v in p.items()}
  for t, grads in enumerate(grads_seq, start=1):
    g = {k: x.astype(np.float64) for k, x in grads.items()}
    norm = math.sqrt(sum(float(np.sum(x * x)) for x in g.values()))
    if clip > 0 and norm > clip:
      g = {k: x * (clip / norm) for k, x in g.items()}
    for k in p:
      m[k] = b1 * m[k] + (1 - b1) * g[k]
      v2[k] = b2 * v2[k] + (1 - b2) * g[k] ** 2
      update = (m[k] / (1 - b1 ** t)) / (np.sqrt(v2[k] / (1 - b2 ** t)) + eps)
      if k in decayed:
        update = update + wd * p[k]
      p[k] = p[k] - lrs[t - 1] * update
  return p


@pytest.mark.parametrize("clip_norm", [0.0, 3.0])
def test_adamw_matches_numpy_reference(clip_norm):
  rng = np.random.default_rng(0)
  params = _toy_params(rng)
  # Gradient scales vary so that, with clip 3, some steps are clipped and some are not.
  grads_seq = [jax.tree.map(lambda x, s=s: (s * rng.normal(size=x.shape)).astype(np.float32),
                            params) for s in (0.05, 2.0, 0.1, 1.0, 0.02, 0.5)]
  cfg = _cfg(learning_rate=0.1, schedule="linear", warmup_steps=2, decay_steps=6,
             weight_decay=0.3, clip_norm=clip_norm, b2=0.99)
  opt = make_optimizer(cfg, total_steps=6)
  state = opt.init(params)
  p = jax.tree.map(jnp.asarray, params)
  step = jax.jit(opt.update)
  for grads in grads_seq:
    updates, state = step(grads, state, p)
    p = optax.apply_updates(p, updates)
  lrs = [0.0, 0.05, 0.1, 0.1 + (0.01 - 0.1) * 1 / 4, 0.1 + (0.01 - 0.1) * 2 / 4,
         0.1 + (0.01 - 0.1) * 3 / 4]
  want = _numpy_adamw(_flat(params), [_flat(g) for g in grads_seq], lrs, 0.9, 0.99, 1e-8, 0.3,
                      clip_norm, _TOY_DECAYED)
  got = _flat(p)
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-5, atol=1e-6, err_msg=k)
  # The reference moved every parameter, so the comparison is not vacuous.
  for k, v in _flat(params).items():
    assert np.max(np.abs(want[k] - v)) > 1e-3, k


def test_bfloat16_moments_are_stored_in_bfloat16_and_track_float32():
  rng = np.random.default_rng(1)
  params = jax.tree.map(jnp.asarray, _toy_params(rng))
  grads_seq = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
               for _ in range(8)]
  results = {}
  for dtype in ("float32", "bfloat16"):
    opt = make_optimizer(_cfg(learning_rate=1e-2, warmup_steps=0, decay_steps=8,
                              weight_decay=0.1, clip_norm=1.0, moments_dtype=dtype), 8)
    state = opt.init(params)
    p = params
    for grads in grads_seq:
      updates, state = jax.jit(opt.update)(grads, state, p)
      p = optax.apply_updates(p, updates)
    adam = [s for s in jax.tree_util.tree_leaves(state, is_leaf=lambda s: hasattr(s, "nu"))
            if hasattr(s, "nu")]
    assert len(adam) == 1
    for moment in (adam[0].mu, adam[0].nu):
      assert {x.dtype for x in jax.tree.leaves(moment)} == {jnp.dtype(dtype)}
    assert {x.dtype for x in jax.tree.leaves(p)} == {jnp.dtype(jnp.float32)}  # master weights
    results[dtype] = p
  # Tolerance: the bf16 run's parameters differ from the f32 run's by under 2% of how far the f32
  # run moved them (bf16 keeps 8 significant bits in m and v: ~0.4% relative per rounding).
  for k, p32 in _flat(results["float32"]).items():
    moved = np.max(np.abs(np.asarray(p32) - np.asarray(_flat(params)[k])))
    diff = np.max(np.abs(np.asarray(_flat(results["bfloat16"])[k]) - np.asarray(p32)))
    assert moved > 1e-3
    assert diff < 0.02 * moved, (k, diff, moved)


def test_bfloat16_gradients_are_handled_in_float32():
  params = {"w": jnp.ones((3,), jnp.float32)}
  opt = make_optimizer(_cfg(warmup_steps=0, decay_steps=4, schedule="constant"), 4)
  state = opt.init(params)
  updates, _ = opt.update({"w": jnp.full((3,), 0.5, jnp.bfloat16)}, state, params)
  assert updates["w"].dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(updates["w"]), -1.0, rtol=1e-6)  # -lr * m_hat/sqrt(v_hat)


def _model_params(scan_layers=True):
  """The tiny_gemma2 parameter tree (boxed) as shapes: `eval_shape` skips the slow init."""
  cfg = get_preset("tiny_gemma2", scan_layers=scan_layers)
  init = lambda: Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  return cfg, jax.eval_shape(init)["params"]


def _expected_decayed(names):
  """Hand-written rule for the Gemma tree: the attention and MLP weights, nothing else."""
  return {n for n in names if "/attn/" in f"/{n}/" and n.endswith("einsum/w")
          or n.endswith("mlp/gating_einsum") or n.endswith("mlp/linear")}


@pytest.mark.parametrize("scan_layers", [True, False])
def test_decay_mask_on_model_params(scan_layers):
  cfg, boxed = _model_params(scan_layers)
  unboxed = nn.unbox(boxed)
  mask = _flat(decay_mask(unboxed))
  names = set(mask)
  decayed = {n for n, on in mask.items() if on}
  assert decayed == _expected_decayed(names)
  assert any("norm" in n for n in names) and "embedder/input_embedding" in names
  n_blocks = 1 if scan_layers else cfg.num_layers
  assert len(decayed) == 5 * n_blocks  # q, kv, attn_vec, gating, linear per block

  # The boxed tree gives the same bools inside the same boxes.
  boxed_mask = decay_mask(boxed)
  assert jax.tree.structure(boxed_mask) == jax.tree.structure(boxed)
  assert _flat(nn.unbox(boxed_mask)) == mask

  with_emb = _flat(decay_mask(unboxed, decay_embeddings=True))
  assert {n for n, on in with_emb.items() if on} == decayed | {"embedder/input_embedding"}


@pytest.mark.parametrize("boxed", [False, True])
def test_weight_decay_skips_masked_model_params(boxed):
  """With zero gradients, only weight decay moves parameters: exactly the masked-in ones."""
  rng = np.random.default_rng(2)
  tree = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), _model_params()[1])
  opt = make_optimizer(_cfg(learning_rate=0.5, schedule="constant", warmup_steps=0,
                            weight_decay=0.2), 10)
  tree = tree if boxed else nn.unbox(tree)
  updates, _ = jax.jit(opt.update)(jax.tree.map(jnp.zeros_like, tree), opt.init(tree), tree)
  params, updates = nn.unbox(tree), nn.unbox(updates)
  for name, u in _flat(updates).items():
    p = _flat(params)[name]
    if name in _expected_decayed(set(_flat(params))):
      np.testing.assert_allclose(np.asarray(u), -0.5 * 0.2 * np.asarray(p), rtol=1e-6)
    else:
      assert not np.any(np.asarray(u)), name
