"""DPO: the loss against float64 numpy, log 2 at the start, preference learning on a synthetic
set, the packed pair layout, and bad settings refused in one line."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from maxgemma import sharding
from maxgemma.trainer import dpo
from maxgemma.trainer.build import build
from tests.train_utils import tiny_config

SEQ = 24


def numpy_dpo(pc, pr, rc, rr, beta, eps):
  """The DPO loss per pair in float64, written from the paper's formula."""
  pc, pr, rc, rr = (np.asarray(x, np.float64) for x in (pc, pr, rc, rr))
  s = beta * ((pc - rc) - (pr - rr))
  log_sig = lambda x: -np.logaddexp(0.0, -x)  # noqa: E731
  return -(1 - eps) * log_sig(s) - eps * log_sig(-s)


@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.1), (2.0, 0.3)])
def test_dpo_loss_matches_numpy(beta, eps):
  rng = np.random.default_rng(0)
  pc, pr, rc, rr = (rng.normal(-40, 15, 64).astype(np.float32) for _ in range(4))
  loss, figures = dpo.dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
  np.testing.assert_allclose(np.asarray(loss), numpy_dpo(pc, pr, rc, rr, beta, eps), rtol=1e-5,
                             atol=1e-6)
  margin = beta * ((pc.astype(np.float64) - rc) - (pr.astype(np.float64) - rr))
  np.testing.assert_allclose(np.asarray(figures["margin"]), margin, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(figures["correct"]), (margin > 0).astype(np.float32))


@pytest.mark.parametrize("kwargs,needle", [({"beta": 0.0}, "config.dpo.beta"),
                                           ({"beta": 0.1, "label_smoothing": 0.5},
                                            "config.dpo.label_smoothing")])
def test_bad_settings_one_line(kwargs, needle):
  z = np.zeros(1, np.float32)
  with pytest.raises(ValueError, match=needle) as e:
    dpo.dpo_loss(z, z, z, z, **kwargs)
  assert "\n" not in str(e.value)


def test_pack_pair_layout():
  row = dpo.pack_pair([5, 6, 7], [8, 9], [10], seq_len=10)
  np.testing.assert_array_equal(row["tokens"], [5, 6, 7, 8, 5, 6, 7, 0, 0, 0])
  np.testing.assert_array_equal(row["targets"], [6, 7, 8, 9, 6, 7, 10, 0, 0, 0])
  np.testing.assert_array_equal(row["segment_ids"], [1, 1, 1, 1, 2, 2, 2, 0, 0, 0])
  np.testing.assert_array_equal(row["positions"], [0, 1, 2, 3, 0, 1, 2, 0, 0, 0])
  np.testing.assert_array_equal(row["loss_weights"], [0, 0, 1, 1, 0, 0, 1, 0, 0, 0])
  assert dpo.pack_pair([5, 6, 7], [8, 9], [10], seq_len=6) is None
  with pytest.raises(ValueError, match="non-empty"):
    dpo.pack_pair([5], [], [6], seq_len=8)


def synthetic_pairs(rng, n):
  """Prompts of random tokens; the chosen answer repeats the prompt's first token, the rejected
  one is a random token of the same range: learnable, and held-out pairs are new prompts."""
  rows = []
  for _ in range(n):
    prompt = rng.integers(10, 200, size=int(rng.integers(3, 7))).tolist()
    chosen = [prompt[0]] * 3
    rejected = rng.integers(10, 200, size=3).tolist()
    rows.append(dpo.pack_pair(prompt, chosen, rejected, SEQ))
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def dpo_config(steps=1):
  return tiny_config(**{"model.num_layers": 2, "model.d_model": 64, "train.seq_len": SEQ,
                        "train.global_batch": 16, "train.steps": steps, "dpo.enabled": True,
                        "dpo.beta": 0.5, "optim.learning_rate": 3e-3, "optim.weight_decay": 0.0,
                        "optim.warmup_steps": 1})


def test_first_loss_is_log_two_and_accuracy_rises():
  steps = 40
  cfg = dpo_config(steps)
  mesh = sharding.make_mesh(cfg.mesh)
  setup = build(cfg, mesh)
  assert isinstance(setup.objective, dpo.DPO)
  state = setup.create_state(seed=cfg.train.seed)
  frozen = setup.load_frozen()  # the policy's starting weights
  rng = np.random.default_rng(1)
  held_out = jax.device_put(synthetic_pairs(np.random.default_rng(99), 64), setup.batch_sharding)
  with setup.scope():
    before = setup.eval_step(state["params"], held_out, frozen)
    history = []
    for _ in range(steps):
      batch = jax.device_put(synthetic_pairs(rng, 16), setup.batch_sharding)
      state, metrics = setup.train_step(state, batch, frozen)
      history.append(jax.device_get(metrics))
    after = setup.eval_step(state["params"], held_out, frozen)
  first = history[0]
  assert abs(float(first["loss"]) - math.log(2.0)) <= 1e-6, first["loss"]
  assert abs(float(first["reward_margin"])) < 1e-5  # the policy is the reference
  assert float(before["nll_sum"]) / float(before["weight"]) == pytest.approx(math.log(2), abs=1e-6)
  accuracy = float(after["correct"]) / float(after["weight"])
  assert float(after["weight"]) == 64
  print(f"held-out preference accuracy after {steps} steps: {accuracy:.3f}")
  assert accuracy > 0.9, (accuracy, [float(h["loss"]) for h in history])
  assert float(history[-1]["chosen_logp"]) > float(history[0]["chosen_logp"])


def test_the_trainer_refuses_dpo_without_preference_data(tmp_path):
  from maxgemma.trainer.loop import train

  with pytest.raises(ValueError, match=r"config.dpo.enabled=True: maxgemma.train has no "
                                       r"preference-data input"):
    train(tiny_config(**{"dpo.enabled": True}), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
