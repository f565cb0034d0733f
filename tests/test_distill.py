"""Online distillation in the trainer: it beats next-token training at matching the teacher, it
keeps equal losses across mesh layouts and exact resume, and bad teachers are refused in one line.

`python -m tests.test_distill` runs the held-out comparison and prints the numbers that
docs/distillation.md records.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import ml_collections
import numpy as np
import pytest

from configs import distill_tiny
from maxgemma import checkpoint, feed, sharding
from maxgemma.data import pipeline
from maxgemma.trainer.build import build
from maxgemma.trainer.loop import train
from tests import test_parallelism
from tests.test_train import _hand_counted_flops_per_token
from tests.train_utils import PEAK, losses_by_step, tiny_config

TEACHER_STEPS = 80
STUDENT_STEPS = 30
EVAL_BATCHES = 8
# The distilled student's held-out KL to the teacher must be below this fraction of the
# next-token student's (docs/distillation.md has the measured ratio).
KL_RATIO = 0.75


def student_config(teacher: str, **overrides) -> ml_collections.ConfigDict:
  cfg = distill_tiny.get_config()
  cfg.distill.teacher = teacher
  cfg.train.steps = STUDENT_STEPS
  cfg.checkpoint.every = STUDENT_STEPS
  cfg.data.prefetch = 0
  cfg.metrics.peak_flops_per_device = PEAK
  for key, value in overrides.items():
    section, name = key.split(".")
    cfg[section][name] = value
  return cfg


def held_out(cfg, workdir: str) -> dict[str, float]:
  """KL to `cfg.distill.teacher`, next-token loss and top-1 agreement of `workdir`'s latest
  parameters on EVAL_BATCHES held-out batches (temperature 1)."""
  mesh = sharding.make_mesh(cfg.mesh)
  setup = build(cfg, mesh)
  frozen = setup.load_frozen()
  host_params = checkpoint.load_params(workdir)[0]
  params = jax.device_put(host_params, setup.shardings["params"])
  shards = pipeline.loader_shard_count(cfg.data, cfg.train.global_batch)
  plan = feed.plan(mesh, cfg.train.global_batch, shards, cfg.optim.grad_accum_steps)
  it = pipeline.make_eval_iterator(cfg.data, seq_len=cfg.train.seq_len,
                                   global_batch=cfg.train.global_batch, seed=cfg.train.seed,
                                   shards=plan.shards_of(jax.process_index()))
  totals = {"kl_sum": 0.0, "nll_sum": 0.0, "agree": 0.0, "weight": 0.0}
  with setup.scope():
    for _ in range(EVAL_BATCHES):
      out = setup.eval_step(params, feed.global_batch(next(it), plan, mesh), frozen)
      for k in totals:
        totals[k] += float(out[k])
  w = totals["weight"]
  return {"kl": totals["kl_sum"] / w, "nll": totals["nll_sum"] / w,
          "agreement": totals["agree"] / w}


def compare(root: str) -> dict[str, dict[str, float]]:
  """Trains a teacher (configs/tiny.py), then one student by distillation and one by next-token
  prediction (same config, steps, batches and tokens); their held-out figures."""
  teacher = os.path.join(root, "teacher")
  train(tiny_config(**{"train.steps": TEACHER_STEPS, "checkpoint.every": TEACHER_STEPS}), teacher)
  distilled, next_token = os.path.join(root, "distilled"), os.path.join(root, "next_token")
  train(student_config(teacher), distilled)
  train(student_config("", **{"optim.z_loss": 0.0}), next_token)
  probe = student_config(teacher)  # evaluates either student against the teacher
  return {"distilled": held_out(probe, distilled), "next_token": held_out(probe, next_token)}


@pytest.mark.slow
def test_distilled_student_is_closer_to_the_teacher_than_next_token(tmp_path):
  got = compare(str(tmp_path))
  print(json.dumps(got))
  d, n = got["distilled"], got["next_token"]
  assert d["kl"] < KL_RATIO * n["kl"], got
  assert d["agreement"] > n["agreement"], got


# ---- equal loss across layouts, with distillation on (tests/test_parallelism.py's machinery) --


@pytest.fixture(scope="module")
def layout_teacher(tmp_path_factory):
  """A random teacher of another size (2 layers, d_model 128) for test_parallelism's configs."""
  cfg = test_parallelism.make_config()
  cfg.model.num_layers, cfg.model.d_model = 2, 128
  return _save_teacher(cfg, str(tmp_path_factory.mktemp("layout_teacher")))


def _distill_layout(teacher, **mesh):
  cfg = test_parallelism.make_config(**mesh)
  cfg.distill.teacher, cfg.distill.temperature, cfg.distill.alpha = teacher, 2.0, 0.25
  cfg.distill.loss_chunk = 8
  return cfg


@pytest.fixture(scope="module")
def distill_reference(layout_teacher):
  return test_parallelism.run_losses(_distill_layout(layout_teacher), jax.devices()[:1])[0]


@pytest.mark.parametrize("layout", ["data2_tensor4"])  # teacher and student tensor-sharded
def test_distillation_gives_the_same_loss_on_every_layout(layout_teacher, distill_reference,
                                                         layout):
  cfg = _distill_layout(layout_teacher, **test_parallelism.LAYOUTS[layout])
  losses, _ = test_parallelism.run_losses(cfg, jax.devices())
  assert np.all(np.diff(distill_reference) < 0), distill_reference  # really training
  np.testing.assert_allclose(losses, distill_reference, rtol=test_parallelism.TOLERANCE)


# ---- exact resume and bad teachers ---------------------------------------------------------------


def _save_teacher(cfg, workdir: str, seed: int = 7) -> str:
  """`cfg`'s model, freshly initialised, saved as a teacher checkpoint (params only) in workdir."""
  setup = build(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
  ckpt = checkpoint.Checkpointer(workdir)
  ckpt.save(0, {"params": setup.create_state(seed=seed)["params"]}, config=cfg,
            model_cfg=setup.model_cfg)
  ckpt.close()
  return workdir


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
  """configs/tiny.py's model, untrained: the student's tokenizer and vocabulary."""
  return _save_teacher(tiny_config(), str(tmp_path_factory.mktemp("tiny_teacher")))


@pytest.mark.slow
def test_resumed_distillation_equals_an_uninterrupted_run(tiny_teacher, tmp_path):
  overrides = {"train.steps": 4, "checkpoint.every": 2, "optim.warmup_steps": 1,
               "distill.temperature": 2.0, "distill.alpha": 0.5}
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train(student_config(tiny_teacher, **overrides), straight)
  train(student_config(tiny_teacher, **{**overrides, "train.steps": 2}), resumed)
  train(student_config(tiny_teacher, **overrides), resumed)  # resumes at step 2
  want, got = losses_by_step(straight), losses_by_step(resumed)
  assert sorted(got) == [1, 2, 3, 4] and all(len(v) == 1 for v in got.values())
  assert got == want  # bit-identical losses
  records = [json.loads(line) for line in open(os.path.join(resumed, "metrics.jsonl"))]
  assert all({"distill_loss", "kl", "agreement", "next_token_loss"} <= set(r) for r in records
             if "loss" in r)
  # MFU counts the teacher's forward pass: a third of its hand-counted training FLOPs.
  cfg = student_config(tiny_teacher, **overrides)
  L, tokens = cfg.train.seq_len, cfg.train.global_batch * cfg.train.seq_len
  student, teacher = checkpoint.load_params(resumed)[:2], checkpoint.load_params(tiny_teacher)[:2]
  per_token = (_hand_counted_flops_per_token(*student, L)
               + _hand_counted_flops_per_token(*teacher, L) / 3)
  for r in (r for r in records if "loss" in r):
    assert r["mfu"] == pytest.approx(per_token * tokens / (r["step_time"] * 8 * PEAK), rel=1e-9)
  a, b = checkpoint.load_params(straight)[0], checkpoint.load_params(resumed)[0]
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def test_teacher_without_a_checkpoint_is_refused(tmp_path):
  empty = tmp_path / "empty_teacher"
  empty.mkdir()
  student = tmp_path / "student"
  with pytest.raises(FileNotFoundError) as e:
    train(student_config(str(empty)), str(student))
  message = str(e.value)
  assert f"config.distill.teacher={empty}: no complete checkpoint" in message
  assert "\n" not in message
  assert not (student / "checkpoints").exists()


def test_teacher_of_another_vocabulary_is_refused_and_the_student_kept(tmp_path):
  # test_parallelism's config: vocabulary 512, the student's is 2048
  teacher = _save_teacher(test_parallelism.make_config(), str(tmp_path / "teacher512"))
  student = str(tmp_path / "student")
  short = {"train.steps": 1, "checkpoint.every": 1, "optim.warmup_steps": 0}
  train(student_config("", **short), student)
  with pytest.raises(ValueError, match=r"teacher's vocabulary \(512\) differs from the "
                     r"student's config.model.vocab_size \(2048\)") as e:
    train(student_config(teacher, **{**short, "train.steps": 2}), student)
  assert "\n" not in str(e.value)
  assert checkpoint.Checkpointer(student).all_steps() == [1]  # nothing saved is lost


def test_teacher_with_another_tokenizer_is_refused(tiny_teacher, tmp_path):
  from maxgemma.data import tokenizer as tokenizer_lib  # noqa: PLC0415

  texts = [f"document {i} about {w} and {w * 2}" for i in range(200) for w in ("cats", "rain")]
  other = str(tmp_path / "other.model")
  tokenizer_lib.train(texts, 440, output=other)
  with pytest.raises(ValueError, match="the teacher's tokenizer .* is not the student's "
                     "config.data.tokenizer") as e:
    train(student_config(tiny_teacher, **{"data.tokenizer": other}), str(tmp_path / "s"))
  assert "\n" not in str(e.value)



def test_a_preset_teacher_builds_without_its_checkpoint_and_is_checked_when_loaded(tmp_path):
  """`distill.teacher_preset`: the step is built (as maxgemma.aot does) before any checkpoint
  exists; loading then refuses a checkpoint of another architecture and loads a matching one."""
  teacher_dir = tmp_path / "teacher"
  cfg = student_config(str(teacher_dir), **{"distill.teacher_preset": "demo_gemma2"})
  setup = build(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
  assert setup.objective.teacher.model_cfg.num_layers == 4  # demo_gemma2, no checkpoint read
  with pytest.raises(FileNotFoundError, match=f"config.distill.teacher={teacher_dir}: no "
                     "complete checkpoint"):
    setup.load_frozen()
  _save_teacher(tiny_config(), str(teacher_dir))  # tiny_gemma2: d_model 96, the preset's is 128
  with pytest.raises(ValueError, match=r"holds checkpoints of a different model \(d_model: "
                     r"checkpoint 96 vs config 128.*set config.distill.teacher_preset") as e:
    setup.load_frozen()
  assert "\n" not in str(e.value)
  demo = tiny_config(**{"model.preset": "demo_gemma2"})
  matching = _save_teacher(demo, str(tmp_path / "demo_teacher"), seed=3)
  cfg.distill.teacher = matching
  loaded = build(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1])).load_frozen()["teacher"]
  saved = checkpoint.load_params(matching)[0]
  assert jax.tree.structure(loaded) == jax.tree.structure(saved)
  for x, y in zip(jax.tree.leaves(loaded), jax.tree.leaves(saved), strict=True):
    np.testing.assert_array_equal(np.asarray(x), y)
  cfg.distill.teacher_preset = "gemma_9b"
  with pytest.raises(ValueError, match="config.distill.teacher_preset=gemma_9b: unknown model "
                     "preset 'gemma_9b'"):
    build(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))

if __name__ == "__main__":
  import tempfile

  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  with tempfile.TemporaryDirectory() as root:
    print(json.dumps(compare(sys.argv[1] if len(sys.argv) > 1 else root), indent=2))
