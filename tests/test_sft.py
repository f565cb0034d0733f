"""Supervised fine-tuning from imported weights: the loss on model turns only, a fine-tuned model
answering held-out chats, a fresh optimizer on the imported parameters and exact resume.

Every test starts from a tiny Gemma 2 with random weights exported to Hugging Face and read back by
`maxgemma.import_weights` (a params-only checkpoint at step 0), and trains on chats prepared by
`maxgemma.data.prepare --kind=sft`: the user says three digits, the model says them reversed.

Shapes: B batch rows, L sequence length, V vocabulary.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest

from configs import sft_tiny
from maxgemma import checkpoint, feed, sample, sharding
from maxgemma.data import pipeline
from maxgemma.data.prepare import prepare
from maxgemma.data.tokenizer import load_tokenizer
from maxgemma.export import export
from maxgemma.import_weights import import_weights
from maxgemma.model.gemma import Transformer
from maxgemma.trainer.build import build
from maxgemma.trainer.loop import train
from tests.convert_utils import make_workdir
from tests.train_utils import PEAK, losses_by_step, tiny_config

START_OF_TURN, END_OF_TURN = 106, 107  # the packaged tokenizer's chat control pieces


def reverse(text: str) -> str:
  return text[::-1]


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> str:
  """A workdir made by import_weights from the hf export of a random tiny Gemma 2."""
  root = tmp_path_factory.mktemp("imported")
  made, _, _ = make_workdir(str(root), "tiny_gemma2")
  export(made, "hf", str(root / "hf"))
  import_weights("hf", str(root / "hf"), str(root / "workdir"))
  return str(root / "workdir")


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> str:
  """configs/sft_tiny.py's chats, prepared: the user says three digits, the model reverses them."""
  root = tmp_path_factory.mktemp("chats")
  rows = sft_tiny.chats()
  assert not {r["messages"][0]["content"] for r in rows} & set(sft_tiny.HELD_OUT)
  assert all(r["messages"][1]["content"] == reverse(r["messages"][0]["content"]) for r in rows)
  with open(root / "chats.jsonl", "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  prepare([str(root / "chats.jsonl")], "", str(root / "sft"), kind="sft", workers=1,
          progress=False)
  return str(root / "sft")


def sft_config(chats: str, **overrides):
  """configs/sft_tiny.py on `chats` with dotted overrides."""
  cfg = sft_tiny.get_config()
  for key, value in {"data.sources": chats, "data.prefetch": 0,
                     "metrics.peak_flops_per_device": PEAK, **overrides}.items():
    section, name = key.split(".")
    cfg[section][name] = value
  return cfg


def copy_of(workdir: str, tmp_path, name: str) -> str:
  out = str(tmp_path / name)
  shutil.copytree(workdir, out)
  return out


def model_turn_targets(tokens_L: np.ndarray) -> list[int]:
  """Indices i of one packed conversation whose target tokens_L[i + 1] is the model's to say: its
  answer after the `<start_of_turn>model\\n` header through its `<end_of_turn>`, found from the
  template's tokens alone (not from the data's loss mask)."""
  starts = np.flatnonzero(tokens_L == START_OF_TURN)
  assert len(starts) == 2, tokens_L  # the user turn, then the model turn
  newline = load_tokenizer("").encode("\n")[-1]
  first = starts[1] + 1 + int(np.flatnonzero(tokens_L[starts[1]:] == newline)[0])
  last = starts[1] + int(np.flatnonzero(tokens_L[starts[1]:] == END_OF_TURN)[0])
  return list(range(first - 1, last))


def test_loss_counts_model_turns_only(imported, chats):
  """The objective's loss on real pipeline batches from the imported weights is the summed
  next-token NLL of the model turns (positions read off the chat template, an unpacked forward
  pass per conversation); changing user-turn targets leaves it bit for bit, a model-turn target
  moves it."""
  cfg = sft_config(chats, **{"train.global_batch": 8})
  mesh = sharding.make_mesh(cfg.mesh)
  setup = build(cfg, mesh)
  params, model_cfg, step = checkpoint.load_params(imported)
  assert step == 0
  on_mesh = jax.device_put(params, setup.shardings["params"])
  it = pipeline.make_train_iterator(cfg.data, seq_len=64, global_batch=8, seed=0)
  local = next(it)
  it.close()
  plan = feed.for_config(cfg, mesh)
  frozen = setup.load_frozen()

  def nll_sum(batch) -> float:
    with setup.scope():
      out = setup.eval_step(on_mesh, feed.global_batch(batch, plan, mesh), frozen)
    return float(out["nll_sum"])

  tok = load_tokenizer("")
  conversations = []  # each packed segment, its last target appended
  for b in range(local["tokens"].shape[0]):
    for s in sorted(set(local["segment_ids"][b].tolist()) - {0}):
      idx = np.flatnonzero(local["segment_ids"][b] == s)
      conversations.append(np.append(local["tokens"][b, idx], local["targets"][b, idx[-1]]))
  tokens_BL = np.stack(conversations)  # every conversation has the same length here
  logits_BLV = Transformer(model_cfg.replace(dtype="float32")).apply({"params": params},
                                                                     tokens_BL[:, :-1])
  logp_BLV = jax.nn.log_softmax(np.asarray(logits_BLV, np.float64), axis=-1)
  expected, counted = 0.0, 0
  for tokens_L, logp_LV in zip(tokens_BL, logp_BLV, strict=True):
    answer = model_turn_targets(tokens_L)
    user = tok.decode(tokens_L[:answer[0]]).split("user\n")[1].split("<end_of_turn>")[0]
    assert tok.decode(tokens_L[answer[0] + 1:answer[-1] + 1]) == reverse(user)
    expected -= float(sum(logp_LV[i, tokens_L[i + 1]] for i in answer))
    counted += len(answer)
  assert counted == int(local["loss_weights"].sum()) > 50
  base = nll_sum(local)
  assert base == pytest.approx(expected, rel=1e-5)

  user_targets = (local["loss_weights"] == 0) & (local["segment_ids"] > 0)
  changed = dict(local, targets=np.where(user_targets, (local["targets"] + 7) % 2048,
                                         local["targets"]))
  assert (changed["targets"] != local["targets"]).sum() > 100
  assert nll_sum(changed) == base
  b, i = np.argwhere(local["loss_weights"] > 0)[0]
  one = local["targets"].copy()
  one[b, i] = (one[b, i] + 7) % 2048
  assert abs(nll_sum(dict(local, targets=one)) - base) > 1e-3


@pytest.mark.slow
def test_fine_tuned_model_answers_held_out_prompts(imported, chats, tmp_path):
  """After configs/sft_tiny.py's 60 steps on the chats, greedy sampling reverses every held-out
  triple; the imported random model reverses none."""
  workdir = copy_of(imported, tmp_path, "run")
  tok = load_tokenizer("")
  held = sft_tiny.HELD_OUT
  prompts = [tok.encode(tok.chat_template([{"role": "user", "content": t}],
                                          add_generation_prompt=True), add_bos=True)
             for t in held]

  def answers(step: int) -> list[str]:
    params, model_cfg, _ = checkpoint.load_params(workdir, step)
    gen = sample.generate(params, sample.decode_config(model_cfg, "float32"), prompts,
                          max_new_tokens=8)
    return [tok.decode(row) for row in gen.tokens]

  assert sum(a == reverse(t) for a, t in zip(answers(0), held, strict=True)) == 0
  cfg = sft_config(chats)
  train(cfg, workdir)
  got = answers(cfg.train.steps)
  print(dict(zip(held, got, strict=True)))
  assert got == [reverse(t) for t in held]  # all 8


@pytest.mark.slow
def test_fresh_optimizer_then_exact_resume(imported, chats, tmp_path, caplog):
  """From imported weights the run logs a fresh optimizer and schedule from step 0 (the first
  update's learning rate is the schedule's at 0); resumed from its step-3 checkpoint it ends with
  the parameters and losses of the straight 6 steps bit for bit, for full SFT and for LoRA on the
  imported base with adapter dropout (a mask per step, drawn again on resume); the LoRA run's
  checkpoints record the base step it trains on, which the resumed run loads though the base
  has a newer checkpoint by then."""
  lr = 1e-3
  common = {"train.global_batch": 8, "train.steps": 6, "checkpoint.every": 3,
            "checkpoint.keep_last": 0, "optim.warmup_steps": 2, "optim.learning_rate": lr,
            "metrics.log_every": 1}

  straight = copy_of(imported, tmp_path, "straight")
  with caplog.at_level(logging.INFO):
    train(sft_config(chats, **common), straight)
  where = f"{straight}/checkpoints/0"
  assert f"fresh optimizer state and schedule from step 0, parameters from {where}" \
      in caplog.text
  lrs = {r["step"]: r["learning_rate"] for r in _records(straight)}
  assert lrs[1] == 0.0 and lrs[2] == pytest.approx(lr / 2)  # warmup from t = 0
  caplog.clear()
  with caplog.at_level(logging.INFO):
    resumed = _resume_from_step_3(straight, sft_config(chats, **common))
  assert f"resumed from {resumed}/checkpoints/3 at step 3" in caplog.text
  assert "fresh optimizer" not in caplog.text
  _assert_same_run(straight, resumed)

  base = copy_of(imported, tmp_path, "lora_base")
  lora = {**common, "lora.base": base, "lora.targets": "q,v,down", "lora.rank": 4,
          "lora.dropout": 0.2}
  lora_straight = str(tmp_path / "lora_straight")
  train(sft_config(chats, **lora), lora_straight)
  ckpt = checkpoint.Checkpointer(lora_straight, read_only=True)
  assert ckpt.meta(6)["lora_base"] == {"workdir": base, "step": 0}
  ckpt.close()
  # The base moves on (a newer checkpoint): the resumed run still trains on its step 0.
  params, model_cfg, _ = checkpoint.load_params(base, 0)
  ckpt = checkpoint.Checkpointer(base, ml_collections.ConfigDict(dict(
      keep_last=0, keep_every=0, async_save=False)))
  ckpt.save(5, {"params": jax.tree.map(lambda x: x + 0.5, params)}, model_cfg=model_cfg)
  ckpt.close()
  _assert_same_run(lora_straight, _resume_from_step_3(lora_straight, sft_config(chats, **lora)))


def _resume_from_step_3(workdir: str, cfg) -> str:
  """A copy of `workdir` without its step-6 checkpoint and its metrics, trained on to step 6
  (resuming at 3)."""
  copy = workdir + "-resumed"
  shutil.copytree(workdir, copy)
  shutil.rmtree(f"{copy}/checkpoints/6")
  os.remove(f"{copy}/metrics.jsonl")
  train(cfg, copy)
  return copy


def _records(workdir: str) -> list[dict]:
  with open(f"{workdir}/metrics.jsonl") as f:
    return [r for r in map(json.loads, f) if "learning_rate" in r]


def _assert_same_run(a: str, b: str) -> None:
  """The step-6 parameters of the straight run `a` and the resumed `b` are equal bit for bit, and
  so are the losses of steps 4 to 6."""
  pa, _, _ = checkpoint.load_params(a, 6)
  pb, _, _ = checkpoint.load_params(b, 6)
  leaves_a, leaves_b = jax.tree.leaves(pa), jax.tree.leaves(pb)
  assert len(leaves_a) == len(leaves_b) > 0
  for x, y in zip(leaves_a, leaves_b, strict=True):
    np.testing.assert_array_equal(x, y)
  straight, resumed = losses_by_step(a), losses_by_step(b)
  assert sorted(resumed) == [4, 5, 6]
  assert {s: straight[s] for s in resumed} == resumed


def test_imported_weights_at_another_step_are_refused(tmp_path):
  """A params-only checkpoint at step 7 would start the schedule off step 0: one line, the fix."""
  made, _, _ = make_workdir(str(tmp_path), "tiny_gemma2")
  with pytest.raises(ValueError, match=r"parameters only .* at step 7: .* --step=0") as e:
    train(tiny_config(**{"train.steps": 2}), made)
  assert "\n" not in str(e.value)
