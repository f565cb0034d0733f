"""A maxgemma checkpoint (`WORKDIR/checkpoints/<step>`) read layer by layer, in the official tree.

Blocks come out as the official `layer_{i}` subtrees whether the checkpoint was saved scanned
(`layers/...` with a leading layer axis) or unrolled (`layer_{i}/...`); each read is one
tensorstore slice, so an export holds one layer at a time.
"""

from __future__ import annotations

import numpy as np

from maxgemma import storage
from maxgemma.convert.orbax_arrays import OrbaxArrays, nest
from maxgemma.convert.workdir_tokenizer import WorkdirTokenizer, find_tokenizer
from maxgemma.model.config import ModelConfig


class CheckpointReader:
  """The params of one maxgemma checkpoint step, read lazily."""

  def __init__(self, workdir: str, step: int | None = None):
    from maxgemma.checkpoint import Checkpointer, model_config_from_dict  # noqa: PLC0415

    ckpt = Checkpointer(workdir, read_only=True)
    self.step = ckpt.latest_step() if step is None else step
    if self.step is None or self.step not in ckpt.all_steps():
      raise FileNotFoundError(f"no complete checkpoint{'' if step is None else f' {step}'} in "
                              f"{ckpt.directory}; steps there: {ckpt.all_steps() or 'none'}")
    self.meta = ckpt.meta(self.step)
    ckpt.close()
    self.workdir = workdir
    self.config: ModelConfig = model_config_from_dict(self.meta["model"])
    self.arrays = OrbaxArrays(storage.join(workdir, "checkpoints", str(self.step), "params"))
    self.scanned = any(k[0] == "layers" for k in self.arrays.keys)

  def embedder_and_final_norm(self) -> dict:
    """The `embedder` and `final_norm` subtrees (everything outside the layers)."""
    return nest({k: self.arrays.read(k) for k in self.arrays.keys
                 if k[0] in ("embedder", "final_norm")})

  def block(self, i: int) -> dict:
    """Layer i as the official `layer_{i}` subtree."""
    if self.scanned:
      return nest({k[1:]: self.arrays.read(k, i) for k in self.arrays.keys if k[0] == "layers"})
    return nest({k[1:]: self.arrays.read(k) for k in self.arrays.keys if k[0] == f"layer_{i}"})

  def leaf(self, i: int, path: tuple[str, ...]) -> np.ndarray:
    """One leaf of layer i, e.g. ("pre_attention_norm", "scale")."""
    if self.scanned:
      return self.arrays.read(("layers", *path), i)
    return self.arrays.read((f"layer_{i}", *path))

  def block_paths(self) -> list[tuple[str, ...]]:
    """The leaf paths of one block (the same for every layer)."""
    first = "layers" if self.scanned else "layer_0"
    return [k[1:] for k in self.arrays.keys if k[0] == first]

  def tokenizer(self, override: str = "") -> WorkdirTokenizer:
    """The tokenizer that belongs to this checkpoint (see `workdir_tokenizer.find_tokenizer`)."""
    return find_tokenizer(self.workdir, override, self.meta)
