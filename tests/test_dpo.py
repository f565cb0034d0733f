"""DPO: the loss against float64 numpy, log 2 at the start, preference learning on a synthetic
set, the packed pair layout, bad settings refused in one line; prepared preference data through
the pipeline (rows, shuffle, exact resume, refusals) and through `maxgemma.train` end to end."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from maxgemma import sharding
from maxgemma.data.pipeline import make_eval_iterator, make_train_iterator
from maxgemma.data.sources import demo_dir
from maxgemma.data.tokenizer import load_tokenizer
from maxgemma.trainer import dpo
from maxgemma.trainer.build import build
from tests.train_utils import PEAK, ROOT, env, logged, losses_by_step, tiny_config

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


def _dpo_losses(cfg, devices, steps=3):
  setup = build(cfg, sharding.make_mesh(cfg.mesh, devices))
  state, frozen = setup.create_state(seed=cfg.train.seed), setup.load_frozen()
  rng, losses = np.random.default_rng(5), []
  with setup.scope():
    for _ in range(steps):
      batch = jax.device_put(synthetic_pairs(rng, 16), setup.batch_sharding)
      state, metrics = setup.train_step(state, batch, frozen)
      losses.append(float(metrics["loss"]))
  return np.array(losses)


def test_dpo_with_lora_gives_the_same_losses_on_a_sharded_layout():
  """DPO through LoRA adapters (the frozen reference is then the LoRA base, sharded like the
  policy's base): fsdp 2 x tensor 4 gives one device's losses, and the first loss is log 2 (the
  policy starts as the reference). test_lora.py covers LoRA alone on fsdp 8 and data x tensor."""
  def config(**mesh):
    cfg = dpo_config(steps=3)
    cfg.mesh.update(mesh)
    cfg.lora.targets, cfg.lora.rank, cfg.lora.alpha = "q,v,down", 4, 8.0
    return cfg

  want = _dpo_losses(config(), jax.devices()[:1])
  assert abs(want[0] - math.log(2.0)) <= 1e-6 and want[-1] < want[0]
  got = _dpo_losses(config(ici_data=1, ici_fsdp=2, ici_tensor=4), jax.devices())
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_a_bad_reference_is_refused_in_one_line(tmp_path):
  """config.dpo.reference: no checkpoint, another architecture, another tokenizer: refused
  when the step is built, each in one line naming the key; a matching one builds."""
  from maxgemma import checkpoint
  from maxgemma.data import tokenizer as tokenizer_lib

  def save(cfg, workdir):
    setup = build(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
    ckpt = checkpoint.Checkpointer(workdir)
    ckpt.save(0, {"params": setup.create_state(seed=1)["params"]}, config=cfg,
              model_cfg=setup.model_cfg)
    ckpt.close()
    return workdir

  def refused(reference, needle, error=ValueError, **overrides):
    cfg = dpo_config()
    cfg.dpo.reference = reference
    cfg.update_from_flattened_dict(overrides)
    with pytest.raises(error, match=f"config.dpo.reference={reference}:? {needle}") as e:
      build(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
    assert "\n" not in str(e.value)

  refused(str(tmp_path / "none"), "no complete checkpoint", FileNotFoundError)
  wider = tiny_config(**{"model.num_layers": 2, "model.d_model": 96, "train.steps": 1})
  refused(save(wider, str(tmp_path / "wider")), r"holds checkpoints of a different model "
          r"\(d_model: checkpoint 96 vs config 64\).*DPO's reference has the policy's")
  same = save(dpo_config(), str(tmp_path / "same"))
  texts = [f"document {i} about {w} and {w * 2}" for i in range(200) for w in ("cats", "rain")]
  other = str(tmp_path / "other.model")
  tokenizer_lib.train(texts, 440, output=other)
  refused(same, r"the reference's tokenizer .* is not the policy's config.data.tokenizer",
          **{"data.tokenizer": other})
  cfg = dpo_config()
  cfg.dpo.reference = same
  assert isinstance(build(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1])).objective,
                    dpo.DPO)


# ------------------------------------------------------------- preference data through the trainer

PIPE_SEQ = 40
WORDS = ("alpha", "beta", "gamma", "delta", "omega")


def _source_rows() -> list[dict[str, str]]:
  """64 plain pairs, the 8 with i % 8 == 5 too long for PIPE_SEQ (a long rejected answer)."""
  rows = []
  for i in range(64):
    rejected = " ".join(WORDS) * 3 if i % 8 == 5 else WORDS[(i + 1) % 5]
    rows.append({"prompt": f"Pair {i}: say {WORDS[i % 5]}", "chosen": WORDS[i % 5],
                 "rejected": rejected})
  return rows


@pytest.fixture(scope="module")
def pref_dir(tmp_path_factory):
  from maxgemma.data.prepare import prepare
  root = tmp_path_factory.mktemp("pref")
  with open(root / "pairs.jsonl", "w") as f:
    for row in _source_rows():
      f.write(json.dumps(row) + "\n")
  prepare([str(root / "pairs.jsonl")], "", str(root / "data"), kind="preference", progress=False)
  return str(root / "data")


def _expected_rows() -> list[dict[str, np.ndarray] | None]:
  """pack_pair of each source row, tokenized here (bos + prompt; answer + eos)."""
  tok = load_tokenizer("")
  out = []
  for row in _source_rows():
    prompt = [tok.bos_id, *tok.encode(row["prompt"])]
    answers = [[*tok.encode(row[k]), tok.eos_id] for k in ("chosen", "rejected")]
    out.append(dpo.pack_pair(prompt, *answers, PIPE_SEQ))
  return out


def _data_cfg(sources: str, eval_sources: str = ""):
  return tiny_config(**{"data.sources": sources, "data.eval_sources": eval_sources,
                        "data.loader_shards": 1}).data


def _rows_of(batches) -> list[tuple]:
  keys = ("tokens", "targets", "positions", "segment_ids", "loss_weights")
  return [tuple(b[k][i].tobytes() for k in keys) for b in batches for i in range(len(b["tokens"]))]


def _key(row) -> tuple:
  return (row["tokens"].tobytes(), row["targets"].tobytes(), row["positions"].tobytes(),
          row["segment_ids"].tobytes(), row["loss_weights"].tobytes())


def test_pipeline_rows_are_pack_pair_of_the_source_rows(pref_dir):
  expected = _expected_rows()
  fits = [_key(r) for r in expected if r is not None]
  assert len(fits) == 56  # the 8 long ones do not fit
  # Eval: unshuffled, so the fitting pairs in source order, one per row; 14 batches of 4.
  it = make_eval_iterator(_data_cfg(pref_dir, pref_dir), seq_len=PIPE_SEQ, global_batch=4,
                          seed=0)
  batches = [next(it) for _ in range(14)]
  assert _rows_of(batches) == fits
  assert set(batches[0]) == {"tokens", "targets", "positions", "segment_ids", "loss_weights"}
  assert it.stats()["dropped_pairs"] == 8
  # Train: a shuffled epoch holds every fitting pair once, in another order.
  it = make_train_iterator(_data_cfg(pref_dir), seq_len=PIPE_SEQ, global_batch=4, seed=0)
  rows = _rows_of([next(it) for _ in range(14)])
  assert sorted(rows) == sorted(fits) and rows != fits
  assert it.stats()["dropped_pairs"] == 8


def test_preference_stream_is_deterministic_and_resumes_exactly(pref_dir):
  cfg = _data_cfg(pref_dir)
  make = lambda: make_train_iterator(cfg, seq_len=PIPE_SEQ, global_batch=4, seed=3)  # noqa: E731
  it = make()
  head = [next(it) for _ in range(12)]
  state = it.get_state()
  tail = _rows_of([next(it) for _ in range(6)])  # crosses into the second epoch
  again = make()
  assert _rows_of([next(again) for _ in range(12)]) == _rows_of(head)
  resumed = make()
  resumed.set_state(json.loads(json.dumps(state)))
  assert _rows_of([next(resumed) for _ in range(6)]) == tail
  assert resumed.stats() == it.stats()


def test_preference_data_is_refused_mixed_or_too_long(pref_dir):
  with pytest.raises(ValueError, match=r"holds preference pairs and .* pretrain data: a run "
                                       r"reads one kind") as e:
    make_train_iterator(_data_cfg(f"{pref_dir},{demo_dir()}"), seq_len=PIPE_SEQ, global_batch=4,
                        seed=0)
  assert "\n" not in str(e.value)
  it = make_train_iterator(_data_cfg(pref_dir), seq_len=8, global_batch=4, seed=0)
  with pytest.raises(ValueError, match=r"none of 64 preference pairs in a row fits "
                                       r"train.seq_len=8 .*raise config.train.seq_len"):
    next(it)


def test_the_trainer_refuses_dpo_on_other_data_and_pairs_without_dpo(tmp_path, pref_dir):
  from maxgemma.trainer.loop import train

  with pytest.raises(ValueError, match=r"config.dpo.enabled=True trains on preference pairs, but "
                                       r"config.data.sources holds pretrain data"):
    train(tiny_config(**{"dpo.enabled": True}), str(tmp_path / "run"))
  with pytest.raises(ValueError, match=r"config.data.sources holds preference pairs, which only "
                                       r"DPO trains on: set config.dpo.enabled=True"):
    train(tiny_config(**{"data.sources": pref_dir}), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_maxgemma_train_learns_preferences_and_resumes_exactly(tmp_path):
  """configs/dpo_tiny.py through `maxgemma.train` on prepared pairs: held-out preference
  accuracy (metrics.jsonl) above 90%, and a run resumed from its step-10 checkpoint logs the
  straight run's losses."""
  from configs import dpo_tiny
  from maxgemma.data.prepare import prepare
  with open(tmp_path / "pairs.jsonl", "w") as f:
    for row in dpo_tiny.pairs(400, seed=1):
      f.write(json.dumps(row) + "\n")
  data = str(tmp_path / "data")
  prepare([str(tmp_path / "pairs.jsonl")], "", data, kind="preference", eval_fraction=0.15,
          progress=False)

  def run(workdir):
    command = [sys.executable, "-m", "maxgemma.train", f"--config={ROOT}/configs/dpo_tiny.py",
               f"--workdir={workdir}", f"--config.data.sources={data}", "--config.train.steps=20",
               "--config.train.eval_every=10", "--config.checkpoint.every=10",
               f"--config.metrics.peak_flops_per_device={PEAK}", "--config.data.prefetch=0"]
    proc = subprocess.run(command, env=env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

  straight = tmp_path / "straight"
  run(straight)
  records = logged(str(straight))
  evals = [r for r in records if "eval_preference_accuracy" in r]
  assert [r["step"] for r in evals] == [10, 20]
  print("held-out preference accuracy at steps 10, 20:",
        [r["eval_preference_accuracy"] for r in evals])
  assert evals[-1]["eval_preference_accuracy"] > 0.9, evals
  steps = [r for r in records if "loss" in r]
  assert {"reward_margin", "preference_accuracy", "chosen_logp", "rejected_logp"} <= set(steps[0])
  assert abs(steps[0]["loss"] - math.log(2.0)) < 1e-5  # the policy starts as the reference
  assert steps[-1]["reward_margin"] > 0

  resumed = tmp_path / "resumed"
  shutil.copytree(straight, resumed)
  shutil.rmtree(resumed / "checkpoints" / "20")
  run(resumed)
  want, got = losses_by_step(str(straight)), losses_by_step(str(resumed))
  for step in range(11, 21):
    assert got[step][-1] == want[step][0], (step, got[step], want[step])
  again = [r for r in logged(str(resumed)) if "eval_preference_accuracy" in r]
  assert again[-1] == evals[-1] | {"step": 20}
