"""Checks shared by the objectives that run a frozen model next to the trained one (a
distillation teacher, a DPO reference): the frozen model's workdir must use the run's
tokenizer."""

from __future__ import annotations

import ml_collections

from maxgemma import storage
from maxgemma.data import tokenizer as tokenizer_lib


def latest_checkpoint(workdir: str, key: str) -> tuple[int, dict]:
  """(step, meta) of `workdir`'s latest complete checkpoint; FileNotFoundError in one line
  starting with `key` when there is none."""
  from maxgemma.checkpoint import Checkpointer  # noqa: PLC0415

  ckpt = Checkpointer(workdir, read_only=True) \
      if storage.path(storage.join(workdir, "checkpoints")).is_dir() else None
  try:
    step = None if ckpt is None else ckpt.latest_step()
    if step is None:
      raise FileNotFoundError(
          f"{key}: no complete checkpoint in {storage.join(workdir, 'checkpoints')}; train the "
          "model there first, or bring one in with python -m maxgemma.import_weights")
    return int(step), ckpt.meta(step)
  finally:
    if ckpt is not None:
      ckpt.close()


def check_same_tokenizer(cfg: ml_collections.ConfigDict, workdir: str, meta: dict | None,
                         key: str, *, frozen: str, trained: str) -> None:
  """Refuses, in one line starting with `key`, a frozen model in `workdir` whose tokenizer is
  unknown or is not `cfg.data.tokenizer` (compared by SentencePiece fingerprint). `frozen` and
  `trained` name the two models in the message ("teacher", "student")."""
  from maxgemma.convert.workdir_tokenizer import find_tokenizer  # noqa: PLC0415

  found = find_tokenizer(workdir, meta=meta)
  if found.path is None:
    raise ValueError(f"{key}: the {frozen} has no known tokenizer ({found.origin}); write its "
                     f"tokenizer.model into {workdir} so that it can be checked against "
                     "config.data.tokenizer")
  mine = tokenizer_lib.load_tokenizer(str(cfg.data.tokenizer))
  theirs = tokenizer_lib.load(found.path)
  if mine.fingerprint != theirs.fingerprint:
    raise ValueError(f"{key}: the {frozen}'s tokenizer ({found.origin}) is not the {trained}'s "
                     f"config.data.tokenizer ({mine.path}); {frozen} and {trained} need one "
                     "tokenizer")
