"""The training loop: one function from a config and a workdir to a trained, checkpointed model.

Every scale runs this loop: the mesh, the state's shardings and the data shard per process come from
the config. Checkpoints hold params, optimizer state, step and data position; a run resumes from the
newest complete checkpoint in its workdir, on any mesh.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from typing import Any

import jax
import ml_collections
from absl import logging

from maxgemma import config as config_lib
from maxgemma import distributed, feed, lora, metrics, runlock, sharding, storage
from maxgemma.checkpoint import Checkpointer, check_same_architecture, model_config_from_dict
from maxgemma.data import checkpointing as data_ckpt
from maxgemma.data import pipeline
from maxgemma.trainer import dpo
from maxgemma.trainer.build import Setup, build
from maxgemma.trainer.preemption import Preemption


class NonFiniteError(RuntimeError):
  """A step produced a NaN/Inf loss or gradient (and `train.nan_policy` is "stop")."""


def _restore_or_create(cfg, setup: Setup, ckpt: Checkpointer, data_iter, workdir: str) -> dict:
  """The state to start from: a fresh one, the newest checkpoint's full state (params, optimizer
  state, step, data position), or, when that checkpoint holds parameters only (imported weights,
  `maxgemma.import_weights`), those parameters with a fresh optimizer state at step 0: the
  schedule and the data stream start over, and later restarts resume from the run's own
  checkpoints, which come after it."""
  latest = ckpt.latest_step()
  if latest is None:
    return setup.create_state(seed=cfg.train.seed)
  meta = ckpt.meta(latest)
  if meta.get("model"):
    check_same_architecture(model_config_from_dict(meta["model"]), setup.model_cfg, workdir)
  where = ckpt.directory / str(latest)
  shardings = setup.shardings
  if "opt_state" not in ckpt.item_names(latest):  # imported weights
    if meta["step"] != 0:
      raise ValueError(f"{where} holds parameters only (imported weights) at step {meta['step']}: "
                       "a run from imported weights starts its schedule at step 0 and checkpoints "
                       "after it; import them with --step=0 (the default)")
    restored = ckpt.restore(latest, setup.abstract_state, shardings)
    restored["opt_state"] = jax.jit(setup.tx.init, out_shardings=shardings["opt_state"])(
        restored["params"])
    restored["step"] = jax.device_put(jax.numpy.zeros((), jax.numpy.int32), shardings["step"])
    logging.info("fresh optimizer state and schedule from step 0, parameters from %s", where)
    return restored
  data_args = None
  if (where / data_ckpt.ITEM).exists():
    # Any process count resumes the stream: positions are per loader shard. Checked first, so
    # other data settings are refused before anything is restored.
    data_ckpt.check_saved(data_iter, str(where / data_ckpt.ITEM))
    data_args = data_ckpt.data_restore_args(data_iter)
  restored = ckpt.restore(latest, setup.abstract_state, shardings, data_args=data_args)
  restored["step"] = jax.device_put(jax.numpy.asarray(meta["step"], jax.numpy.int32),
                                    shardings["step"])
  logging.info("resumed from %s at step %d", where, meta["step"])
  return restored


def _check_data_kind(cfg, kinds: set[str], setting: str) -> None:
  """Refuses, in one line, DPO on data that is not preference pairs and pairs without DPO."""
  if dpo.enabled(cfg) and kinds != {"preference"}:
    raise ValueError(f"config.dpo.enabled=True trains on preference pairs, but {setting} holds "
                     f"{'/'.join(sorted(kinds))} data: prepare pairs with `python -m "
                     "maxgemma.data.prepare --kind=preference` (docs/finetune.md)")
  if not dpo.enabled(cfg) and "preference" in kinds:
    raise ValueError(f"{setting} holds preference pairs, which only DPO trains on: set "
                     "config.dpo.enabled=True (docs/finetune.md)")


def _evaluate(cfg, eval_step, params, mesh, plan: feed.FeedPlan) -> dict[str, float]:
  """`eval_loss` over `train.eval_steps` held-out batches (DPO: the DPO loss per pair, and
  `eval_preference_accuracy`)."""
  it = pipeline.make_eval_iterator(cfg.data, seq_len=cfg.train.seq_len,
                                   global_batch=cfg.train.global_batch, seed=cfg.train.seed,
                                   shards=plan.shards_of(jax.process_index()))
  nll, weight, correct = 0.0, 0.0, 0.0
  for _ in range(cfg.train.eval_steps):
    out = eval_step(params, feed.global_batch(next(it), plan, mesh))
    nll, weight = nll + float(out["nll_sum"]), weight + float(out["weight"])
    correct += float(out.get("correct", 0.0))  # DPO: pairs ranked right
  values = {"eval_loss": nll / max(weight, 1.0)}
  if dpo.enabled(cfg):
    values["eval_preference_accuracy"] = correct / max(weight, 1.0)
  return values


def _start_trace(workdir: str) -> str:
  """Starts a profiler trace into `workdir/profile` (a local directory first when remote)."""
  trace_dir = tempfile.mkdtemp(prefix="maxgemma-profile-") if storage.is_remote(workdir) \
      else storage.join(workdir, "profile")
  jax.profiler.start_trace(trace_dir)
  return trace_dir


def _stop_trace(trace_dir: str, workdir: str) -> None:
  jax.profiler.stop_trace()
  if storage.is_remote(workdir):
    storage.upload_tree(trace_dir, storage.join(workdir, "profile"))
    shutil.rmtree(trace_dir, ignore_errors=True)


def _persistent_cache_off_for_cpu_collectives(mesh: jax.sharding.Mesh) -> bool:
  """Turns jax's persistent compilation cache off (with a warning) for a run on several CPU
  devices; returns whether it did.

  A multi-device XLA:CPU train step loaded from that cache can stop in a collective (devices
  waiting on different all-gathers and all-reduces of one launch until XLA aborts the process);
  freshly compiled steps run. docs/performance.md has the details."""
  if (mesh.devices.flat[0].platform != "cpu" or mesh.size < 2
      or not jax.config.jax_enable_compilation_cache or not jax.config.jax_compilation_cache_dir):
    return False
  logging.warning("the persistent compilation cache (%s) is off for this run: XLA:CPU train steps "
                  "on %d devices loaded from it can deadlock in their collectives",
                  jax.config.jax_compilation_cache_dir, mesh.size)
  jax.config.update("jax_enable_compilation_cache", False)
  return True


def train(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains to `cfg.train.steps`, resuming from `workdir`; returns the last logged metrics.

  Holds the workdir's run lock throughout (maxgemma/runlock.py): a workdir in use by another live
  run raises RunLockError before anything is written.
  """
  distributed.initialize(cfg.distributed)
  config_lib.check_keys(cfg)
  _check_data_kind(cfg, pipeline.source_kinds(cfg.data), "config.data.sources")
  if cfg.train.eval_every and cfg.data.eval_sources:  # else the eval split of the same sources
    _check_data_kind(cfg, pipeline.source_kinds(cfg.data, eval_sources=True),
                     "config.data.eval_sources")
  storage.check_bucket(workdir, "--workdir")
  with runlock.hold(workdir, stale_s=cfg.checkpoint.lock_stale_s):
    return _train(cfg, workdir)


def _train(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  model_cfg = config_lib.model_config(cfg)
  if jax.process_index() == 0:
    storage.write_text(storage.join(workdir, "config.json"), cfg.to_json_best_effort(indent=2))
  logging.info("%s", distributed.process_summary())
  logging.info("config:\n%s", cfg)

  mesh = sharding.make_mesh(cfg.mesh)
  _persistent_cache_off_for_cpu_collectives(mesh)
  plan = feed.for_config(cfg, mesh)
  logging.info("%s", plan.describe())
  total = int(cfg.train.steps)
  setup = build(cfg, mesh)
  data_iter = pipeline.make_train_iterator(
      cfg.data, seq_len=cfg.train.seq_len, global_batch=cfg.train.global_batch,
      seed=cfg.train.seed, shards=plan.shards_of(jax.process_index()))
  data_iter.owned = plan.owned_by(jax.process_index())
  ckpt = Checkpointer(workdir, cfg.checkpoint)
  state = _restore_or_create(cfg, setup, ckpt, data_iter, workdir)
  start = int(jax.device_get(state["step"]))

  # A LoRA run trains on one base checkpoint throughout: the one its checkpoints record.
  resumed_from = ckpt.latest_step()
  extra_meta = lora.pin_base(setup.objective,
                             None if resumed_from is None else ckpt.meta(resumed_from))
  frozen = setup.load_frozen()
  eval_step = lambda params, batch: setup.eval_step(params, batch, frozen)  # noqa: E731
  tokens_per_step = cfg.train.global_batch * cfg.train.seq_len
  flops_per_step = setup.objective.flops_per_token(cfg.train.seq_len) * tokens_per_step
  peak = metrics.peak_flops_per_device(cfg.metrics.peak_flops_per_device)
  writer = metrics.MetricsWriter(workdir, tensorboard=cfg.metrics.tensorboard)
  profile = tuple(int(s) for s in cfg.train.profile_steps.split(":")) \
      if cfg.train.profile_steps else None
  preemption = Preemption(ckpt, start)
  last: dict[str, Any] = {}
  clock = {"t": time.perf_counter()}

  def emit(step: int, values: dict) -> None:
    now = time.perf_counter()
    step_time, clock["t"] = now - clock["t"], now
    if not values.pop("finite"):
      bad = {k: values[k] for k in ("loss", "grad_norm")}
      message = f"step {step}: non-finite {bad}; the update was not applied"
      if cfg.train.nan_policy != "skip":
        raise NonFiniteError(message + " (train.nan_policy=stop; no checkpoint written)")
      logging.warning("%s; skipping the batch (train.nan_policy=skip)", message)
    values.update(step_time=step_time, tokens_per_sec=tokens_per_step / step_time,
                  mfu=metrics.mfu(flops_per_step, step_time, jax.device_count(), peak))
    if step % cfg.metrics.log_every == 0 or step == total:
      writer.write(step, values)
    last.clear()
    last.update(step=step, **values)

  buffer = metrics.MetricsBuffer(emit)
  try:
    with setup.scope():
      for step in range(start, total):
        if profile and step == profile[0]:
          trace_dir = _start_trace(workdir)
        batch = feed.global_batch(next(data_iter), plan, mesh)
        state, step_metrics = setup.train_step(state, batch, frozen)
        buffer.push(step + 1, step_metrics)
        if profile and step + 1 == profile[1]:
          _stop_trace(trace_dir, workdir)
        done = step + 1
        if cfg.train.eval_every and done % cfg.train.eval_every == 0:
          writer.write(done, _evaluate(cfg, eval_step, state["params"], mesh, plan))
        preempted = preemption.reached(done)
        if done % cfg.checkpoint.every == 0 or done == total or preempted:
          buffer.flush()  # never checkpoint past a step whose metrics were not checked
          ckpt.save(done, state, config=cfg, model_cfg=model_cfg,
                    data_args=data_ckpt.data_save_args(data_iter), extra_meta=extra_meta)
        if preempted:
          logging.warning("preempted: checkpoint at step %d, exiting", done)
          break
      buffer.flush()
  finally:
    preemption.restore()
    ckpt.close()
    writer.close()
  if jax.process_index() == 0:
    storage.write_text(storage.join(workdir, "last_metrics.json"), json.dumps(last))
  return last
