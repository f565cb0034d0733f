"""Orbax support for the data iterator: one item of the trainer's composite checkpoint.

  mngr.save(step, args=ocp.args.Composite(state=..., data=data_save_args(it)))
  mngr.restore(step, args=ocp.args.Composite(state=..., data=data_restore_args(it)))

The item holds one `shard_{j}-of-{S}.json` per loader shard j: its position and the settings the
stream depends on. Each process writes the loader shards it owns (`iterator.owned`: every shard
is owned by exactly one process, so no file is written twice) and restores the shards it runs,
whatever process wrote them: a run resumes on any number of processes.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import orbax.checkpoint as ocp
from etils import epath

ITEM = "data"


def shard_filename(shard: int, shards: int) -> str:
  return f"shard_{shard:05d}-of-{shards:05d}.json"


class DataIteratorHandler(ocp.CheckpointHandler):
  """Saves/restores a `DataIterator`'s per-loader-shard positions as JSON files."""

  def save(self, directory: epath.Path, args: DataSave) -> None:
    it, state = args.iterator, args.state
    for j in it.owned:
      body = {"meta": state["meta"], "shard": j, "position": state["shards"][str(j)]}
      path = epath.Path(directory) / shard_filename(j, it.loader_shards)
      path.write_text(json.dumps(body, indent=1))

  def restore(self, directory: epath.Path, args: DataRestore) -> Any:
    it = args.iterator
    directory = epath.Path(directory)
    shards, meta = {}, None
    for j in it.shards:
      path = directory / shard_filename(j, it.loader_shards)
      if not path.exists():
        saved = sorted(p.name for p in directory.glob("*.json"))
        raise ValueError(f"{path} does not exist (saved: {', '.join(saved[:4]) or 'none'}"
                         f"{' ...' if len(saved) > 4 else ''}): the checkpoint's data state was "
                         f"not written for {it.loader_shards} loader shards; set "
                         "config.data.loader_shards (and train.global_batch) to the saved run's")
      body = json.loads(path.read_text())
      it.check_meta(body["meta"], where=str(directory.parent))
      shards[str(j)], meta = body["position"], body["meta"]
    it.set_state({"meta": meta, "shards": shards})
    return it

  def metadata(self, directory: epath.Path) -> None:
    return None

  def finalize(self, directory: epath.Path) -> None:
    pass

  def close(self) -> None:
    pass


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
  """Save args: the iterator whose position to checkpoint, snapshotted when the args are made
  (so an async save records this step's position even if training moves on meanwhile)."""
  iterator: Any
  state: Any = None

  def __post_init__(self):
    if self.state is None:
      self.state = self.iterator.get_state()


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
  """Restore args: a freshly made iterator (same settings) to move to the saved position."""
  iterator: Any


def check_saved(iterator: Any, directory: str) -> None:
  """Raises the one-line error `restore` would, before anything is restored: a missing loader
  shard file or other stream settings in checkpoint item `directory`."""
  directory = epath.Path(directory)
  for j in iterator.shards:
    path = directory / shard_filename(j, iterator.loader_shards)
    if not path.exists():
      DataIteratorHandler().restore(directory, DataRestore(iterator))  # raises the message
    iterator.check_meta(json.loads(path.read_text())["meta"], where=str(directory.parent))


def data_save_args(iterator: Any) -> DataSave:
  """Orbax args saving `iterator`'s position (item "data" of a Composite)."""
  return DataSave(iterator)


def data_restore_args(iterator: Any) -> DataRestore:
  """Orbax args restoring the saved position into `iterator` (item "data" of a Composite)."""
  return DataRestore(iterator)
