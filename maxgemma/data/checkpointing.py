"""Orbax support for the data iterator: one item of the trainer's composite checkpoint.

  mngr.save(step, args=ocp.args.Composite(state=..., data=data_save_args(it)))
  mngr.restore(step, args=ocp.args.Composite(state=..., data=data_restore_args(it)))

Each process writes its own `process_{index}-of-{count}.json` (the iterator's own process index,
not jax's, so it also works when processes are not a jax cluster); restore reads this process's
file back into the iterator in place and returns it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import orbax.checkpoint as ocp
from etils import epath

ITEM = "data"


def _filename(iterator: Any) -> str:
  index = getattr(iterator, "process_index", 0)
  count = getattr(iterator, "process_count", 1)
  return f"process_{index}-of-{count}.json"


class DataIteratorHandler(ocp.CheckpointHandler):
  """Saves/restores a grain `DatasetIterator`'s state as JSON, one file per process."""

  def save(self, directory: epath.Path, args: DataSave) -> None:
    state = json.dumps(args.state, indent=1)
    (epath.Path(directory) / _filename(args.iterator)).write_text(state)

  def restore(self, directory: epath.Path, args: DataRestore) -> Any:
    path = epath.Path(directory) / _filename(args.iterator)
    if not path.exists():
      saved = sorted(p.name for p in epath.Path(directory).glob("process_*.json"))
      raise FileNotFoundError(f"{path} does not exist (saved: {', '.join(saved) or 'none'}); "
                              "the data state is restored by the same process index and count "
                              "that saved it")
    args.iterator.set_state(json.loads(path.read_text()))
    return args.iterator

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


def saved_for(iterator: Any, directory: str) -> bool:
  """Whether `directory` (a checkpoint's "data" item) holds a position for this iterator's
  process index and count (a run resumed with another number of processes finds none)."""
  return (epath.Path(directory) / _filename(iterator)).exists()


def data_save_args(iterator: Any) -> DataSave:
  """Orbax args saving `iterator`'s position (item "data" of a Composite)."""
  return DataSave(iterator)


def data_restore_args(iterator: Any) -> DataRestore:
  """Orbax args restoring the saved position into `iterator` (item "data" of a Composite)."""
  return DataRestore(iterator)
