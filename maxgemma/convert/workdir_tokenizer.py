"""Which tokenizer belongs to a workdir, and the record of where it came from.

A workdir's tokenizer is, in order:
  1. the `--tokenizer` flag of the command;
  2. `WORKDIR/tokenizer.model`, written by `maxgemma.import_weights`, whose origin (a source
     file, GGUF metadata, or `--tokenizer` at import) is recorded in `WORKDIR/tokenizer.json`;
  3. the checkpoint's training config, `data.tokenizer` (empty: the packaged demo tokenizer,
     which that run trained with).
A workdir with none of these (an import whose source carried no tokenizer, a checkpoint saved
without a training config) has no tokenizer: nothing falls back to the demo tokenizer.
"""

from __future__ import annotations

import dataclasses
import json

from maxgemma import storage

TOKENIZER_FILE = "tokenizer.model"
RECORD_FILE = "tokenizer.json"


@dataclasses.dataclass(frozen=True)
class WorkdirTokenizer:
  """A workdir's tokenizer: `path` (None when it has none) and where it came from."""

  path: str | None
  origin: str


def record_tokenizer(workdir: str, proto: bytes | None, origin: str) -> None:
  """Writes WORKDIR/tokenizer.model (when `proto` is given) and WORKDIR/tokenizer.json, which
  names its origin or, without `proto`, why the workdir has no tokenizer."""
  if proto is not None:
    storage.write_bytes(storage.join(workdir, TOKENIZER_FILE), proto)
  record = {"tokenizer": TOKENIZER_FILE if proto is not None else None, "origin": origin}
  storage.write_text(storage.join(workdir, RECORD_FILE), json.dumps(record, indent=2) + "\n")


def _record(workdir: str) -> dict:
  file = storage.path(storage.join(workdir, RECORD_FILE))
  if not file.is_file():
    return {}
  try:
    return json.loads(file.read_text())
  except ValueError:
    return {}


def _latest_meta(workdir: str) -> dict:
  from maxgemma.checkpoint import Checkpointer  # noqa: PLC0415

  try:
    ckpt = Checkpointer(workdir, read_only=True)
  except Exception:  # noqa: BLE001  (no checkpoint directory: no training config either)
    return {}
  try:
    return ckpt.meta() if ckpt.latest_step() is not None else {}
  finally:
    ckpt.close()


def find_tokenizer(workdir: str, override: str = "", meta: dict | None = None
                   ) -> WorkdirTokenizer:
  """The tokenizer of `workdir` (the order is in the module docstring). `meta` is the meta item
  of the checkpoint in use; without it the latest checkpoint's is read."""
  if override:
    return WorkdirTokenizer(override, f"--tokenizer={override}")
  record = _record(workdir)
  local = storage.join(workdir, TOKENIZER_FILE)
  if storage.path(local).is_file():
    return WorkdirTokenizer(local, record.get("origin") or local)
  if meta is None:
    meta = _latest_meta(workdir)
  train_cfg = meta.get("config") or {}
  if "data" in train_cfg:
    path = str((train_cfg["data"] or {}).get("tokenizer") or "")
    if path:
      return WorkdirTokenizer(path, f"the training config's data.tokenizer ({path})")
    from maxgemma.data.tokenizer import demo_tokenizer_path  # noqa: PLC0415
    return WorkdirTokenizer(demo_tokenizer_path(), "the packaged demo tokenizer (the training "
                            "config's data.tokenizer is empty)")
  if record.get("origin"):
    return WorkdirTokenizer(None, record["origin"])
  return WorkdirTokenizer(None, f"{workdir} has no {TOKENIZER_FILE} and its checkpoint records "
                          "no training config")


def resolve_tokenizer(workdir: str, override: str = "") -> str:
  """The path of `workdir`'s tokenizer; raises FileNotFoundError naming the fix when it has none."""
  found = find_tokenizer(workdir, override)
  if found.path is None:
    raise FileNotFoundError(f"no tokenizer for {workdir}: {found.origin}; pass --tokenizer=FILE "
                            "(the model's SentencePiece tokenizer.model)")
  return found.path
