"""Checkpoints: one orbax `CheckpointManager` (tensorstore underneath) per workdir.

Layout: `WORKDIR/checkpoints/<step>/` with items
  params     the parameter tree (scanned layout), sharded arrays
  opt_state  the optimizer state (absent in a checkpoint written by `import_weights`)
  data       the data iterator's position, one file per process
  meta       JSON: step, the model config, the experiment config (a LoRA run: also `lora_base`,
             the base workdir and step it trains on)
Orbax writes each step into a temporary directory and renames it when every item is complete, so a
checkpoint is either whole or absent; saves are asynchronous (training goes on while they write).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from maxgemma import storage
from maxgemma.config import base_config
from maxgemma.model.config import ModelConfig

CHECKPOINT_DIR = "checkpoints"


class CorruptCheckpointError(RuntimeError):
  """A complete-looking checkpoint whose files cannot be read back."""


class CheckpointWriteError(RuntimeError):
  """A save that could not be completed (full disk, permissions...): nothing complete was lost."""


def _root_cause(e: BaseException) -> str:
  """The innermost message of an exception chain, on one line (orbax wraps tensorstore errors)."""
  while e.__cause__ is not None or e.__context__ is not None:
    e = e.__cause__ or e.__context__
  text = " ".join(str(e).split())
  return ("No space left on device: " if "No space left" in text else "") + text[:300]


def model_config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
  return dataclasses.asdict(cfg)


def model_config_from_dict(d: dict[str, Any]) -> ModelConfig:
  d = dict(d)
  d["attention_pattern"] = tuple(d["attention_pattern"])
  return ModelConfig(**d)


_ARCH_FIELDS = ("family", "num_layers", "d_model", "ffn_dim", "num_heads", "num_kv_heads",
                "head_dim", "vocab_size")


def check_same_architecture(saved: ModelConfig, current: ModelConfig, where: str,
                            fix: str = "use another --workdir or set config.model to match"
                            ) -> None:
  """Raises a clear error (ending in `fix`) when a checkpoint holds a different model than the
  config asks for."""
  diffs = [f"{f}: checkpoint {getattr(saved, f)!r} vs config {getattr(current, f)!r}"
           for f in _ARCH_FIELDS if getattr(saved, f) != getattr(current, f)]
  if diffs:
    raise ValueError(f"{where} holds checkpoints of a different model ({'; '.join(diffs)}); {fix}")


def _write_arrays_whole() -> None:
  """Has orbax write each array from its first replica (replica 0's shards), not slice it across
  replicas. Replica-parallel writes spread one array's bytes over the hosts holding copies of it;
  in a single process every replica is on the one host, so slicing only adds a small compiled
  slice program per replicated shard at the first save."""
  ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


class Checkpointer:
  """Saves and restores train states (with the data position) in `workdir/checkpoints`."""

  def __init__(self, workdir: str, ckpt_cfg: ml_collections.ConfigDict | None = None, *,
               read_only: bool = False):
    """`ckpt_cfg` is `config.checkpoint`; None takes `base_config().checkpoint`."""
    ckpt_cfg = base_config().checkpoint if ckpt_cfg is None else ckpt_cfg
    self.directory = epath.Path(storage.absolute(workdir)) / CHECKPOINT_DIR  # orbax: absolute
    options = ocp.CheckpointManagerOptions(
        max_to_keep=int(ckpt_cfg.keep_last) or None,
        keep_period=int(ckpt_cfg.keep_every) or None,
        enable_async_checkpointing=bool(ckpt_cfg.async_save),
        create=not read_only, read_only=read_only)
    if jax.process_count() == 1:
      _write_arrays_whole()
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step (orbax never lists a half-written one)."""
    return self.manager.latest_step()

  def step_or_latest(self, step: int | None = None) -> int:
    """`step`, or the newest complete checkpoint's; FileNotFoundError naming --workdir if none."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint in {self.directory}; train first or pass "
                              "the --workdir that holds one")
    return step

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: dict, *, config: ml_collections.ConfigDict | None = None,
           model_cfg: ModelConfig | None = None, data_args: Any = None, force: bool = True,
           extra_meta: dict | None = None) -> bool:
    """Starts an (async) save of `state` at `step`; returns whether a save was started.
    `extra_meta` adds entries to the meta (a LoRA run's `lora_base`)."""
    items: dict[str, Any] = {"params": ocp.args.StandardSave(state["params"])}
    if "opt_state" in state:
      items["opt_state"] = ocp.args.StandardSave(state["opt_state"])
    meta = {"step": int(step),
            "model": model_config_to_dict(model_cfg) if model_cfg is not None else None,
            "config": json.loads(config.to_json_best_effort()) if config is not None else None,
            **(extra_meta or {})}
    items["meta"] = ocp.args.JsonSave(meta)
    if data_args is not None:
      items["data"] = data_args
    try:
      return self.manager.save(int(step), args=ocp.args.Composite(**items), force=force)
    except Exception as e:  # an error of this save, or of the previous async one
      raise self._write_error(e) from e

  def _write_error(self, e: BaseException) -> CheckpointWriteError:
    return CheckpointWriteError(
        f"writing a checkpoint under {self.directory} failed ({_root_cause(e)}); the newest "
        f"complete checkpoint (step {self.latest_step()}) is intact; fix the cause and rerun "
        "to resume from it")

  def meta(self, step: int | None = None) -> dict[str, Any]:
    step = self.latest_step() if step is None else step
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def item_names(self, step: int) -> set[str]:
    path = self.directory / str(step)
    return {p.name for p in path.iterdir() if p.is_dir()}

  def restore(self, step: int, abstract: dict, shardings: dict, *, data_args: Any = None
              ) -> dict:
    """Restores onto `shardings` (any mesh: orbax reshards); missing opt_state is left out."""
    names = self.item_names(step)
    target = lambda tree, sh: jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)
    items: dict[str, Any] = {
        "params": ocp.args.StandardRestore(target(abstract["params"], shardings["params"]))}
    if "opt_state" in names and "opt_state" in abstract:
      items["opt_state"] = ocp.args.StandardRestore(
          target(abstract["opt_state"], shardings["opt_state"]))
    if data_args is not None and "data" in names:
      items["data"] = data_args
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax/tensorstore raise many types for a damaged checkpoint
      others = [s for s in self.all_steps() if s != step]
      first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
      raise CorruptCheckpointError(
          f"checkpoint {self.directory / str(step)} cannot be restored ({type(e).__name__}: "
          f"{first}); move that directory aside to resume from an earlier step "
          f"({others or 'none left'}); nothing was deleted") from e
    return {k: restored[k] for k in items if k != "data"}

  def wait(self) -> None:
    """Blocks until the in-flight async save has committed (raises CheckpointWriteError)."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      raise self._write_error(e) from e

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self.manager.close()


def load_params(workdir: str, step: int | None = None) -> tuple[dict, ModelConfig, int]:
  """(params as host numpy arrays in the scanned tree, model config, step) of a checkpoint.

  Works on any machine: the arrays are read onto this process's first device whatever mesh saved
  them, then copied to the host.
  """
  ckpt = Checkpointer(workdir, read_only=True)
  try:
    step = ckpt.step_or_latest(step)
    meta = ckpt.meta(step)
  finally:
    ckpt.close()
  directory = ckpt.directory / str(step) / "params"
  checkpointer = ocp.StandardCheckpointer()
  tree = checkpointer.metadata(directory)
  tree = getattr(tree, "item_metadata", tree)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)
  params = jax.device_get(checkpointer.restore(directory, target))
  checkpointer.close()
  return params, model_config_from_dict(meta["model"]), step
