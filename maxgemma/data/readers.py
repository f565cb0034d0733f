"""Input readers for `prepare`: plain text, JSON Lines and Parquet, split into work units.

Every record comes with its 1-based line (row for Parquet) so errors can name `FILE:LINE`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator

TEXT_EXT = (".txt", ".text", ".md")
JSONL_EXT = (".jsonl", ".ndjson", ".json")
PARQUET_EXT = (".parquet",)


class BadRecordError(ValueError):
  """A record that cannot be used, located as `path:line`."""

  def __init__(self, path: str, line: int, reason: str):
    super().__init__(f"{path}:{line}: {reason}")
    self.path, self.line, self.reason = path, line, reason

  def __reduce__(self):
    return BadRecordError, (self.path, self.line, self.reason)


class BadInputError(ValueError):
  """A whole input that cannot be used (missing, unreadable, wrong format)."""


@dataclasses.dataclass(frozen=True)
class Unit:
  """A slice of one input file that one worker turns into one output shard."""
  path: str
  fmt: str  # text | jsonl | parquet
  start: int  # byte offset (text/jsonl) or first row group (parquet)
  stop: int  # end byte offset or row group (exclusive)
  first_line: int  # 1-based line (row) number of `start`
  size: int  # input bytes this unit covers (for progress)


def input_format(path: str) -> str:
  """text, jsonl or parquet from the file name; a clear error otherwise."""
  name = path.lower()
  for fmt, exts in (("text", TEXT_EXT), ("jsonl", JSONL_EXT), ("parquet", PARQUET_EXT)):
    if name.endswith(exts):
      return fmt
  raise BadInputError(f"{path}: unknown input format; use {', '.join(TEXT_EXT + JSONL_EXT)} "
                 f"or {PARQUET_EXT[0]}")


def plan_units(path: str, unit_bytes: int, text_docs: str = "paragraph") -> list[Unit]:
  """Splits `path` into units of about `unit_bytes` at document boundaries."""
  fmt = input_format(path)
  try:
    size = os.path.getsize(path)
    if fmt == "parquet":
      return _plan_parquet(path, unit_bytes)
    if size == 0:
      raise BadInputError(f"{path}: the file is empty")
    if fmt == "text" and text_docs == "file":
      return [Unit(path, fmt, 0, size, 1, size)]
    return _plan_lines(path, fmt, size, unit_bytes, paragraphs=fmt == "text"
                       and text_docs == "paragraph")
  except OSError as e:
    raise BadInputError(f"{path}: cannot read: {e.strerror or e}") from None


def _plan_lines(path: str, fmt: str, size: int, unit_bytes: int, paragraphs: bool) -> list[Unit]:
  units, start, line = [], 0, 1
  with open(path, "rb") as f:
    while start < size:
      f.seek(start)
      newlines = f.read(min(unit_bytes, size - start)).count(b"\n")
      stop = f.tell()
      if stop < size:  # move the cut to the next line (paragraph) boundary
        tail = f.readline()
        newlines += tail.count(b"\n")
        while paragraphs and tail.strip():
          tail = f.readline()
          newlines += tail.count(b"\n")
        stop = f.tell()
      units.append(Unit(path, fmt, start, stop, line, stop - start))
      start, line = stop, line + newlines
  return units


def _plan_parquet(path: str, unit_bytes: int) -> list[Unit]:
  import pyarrow.parquet as pq  # only needed for Parquet inputs
  try:
    meta = pq.ParquetFile(path).metadata
  except Exception as e:
    raise BadInputError(f"{path}: not a readable Parquet file: {e}") from None
  if meta.num_rows == 0:
    raise BadInputError(f"{path}: the file has no rows")
  units, group, row = [], 0, 1
  while group < meta.num_row_groups:
    first, first_row, nbytes = group, row, 0
    while group < meta.num_row_groups and (group == first or nbytes < unit_bytes):
      nbytes += meta.row_group(group).total_byte_size
      row += meta.row_group(group).num_rows
      group += 1
    units.append(Unit(path, "parquet", first, group, first_row, nbytes))
  return units


def read_unit(unit: Unit, field: str, text_docs: str = "paragraph"
              ) -> Iterator[tuple[int, object, int]]:
  """(line, value, bytes consumed) per document (value: the JSONL/Parquet `field`, or the whole
  row as a dict when `field` is ""); a bad one yields a `BadRecordError` as value."""
  if unit.fmt == "parquet":
    yield from _read_parquet(unit, field)
    return
  with open(unit.path, "rb") as f:
    f.seek(unit.start)
    data = f.read(unit.stop - unit.start)
  if unit.fmt == "text" and text_docs == "file":
    yield unit.first_line, _utf8(data, unit.path, unit.first_line), len(data)
    return
  lines = data.split(b"\n")
  if lines and lines[-1] == b"":
    lines.pop()
  if unit.fmt == "jsonl":
    for i, raw in enumerate(lines):
      if raw.strip():  # blank lines hold no record
        line = unit.first_line + i
        yield line, _json_value(raw, unit.path, line, field), len(raw) + 1
  elif text_docs == "line":
    for i, raw in enumerate(lines):
      if raw.strip():
        yield unit.first_line + i, _utf8(raw, unit.path, unit.first_line + i), len(raw) + 1
  else:  # paragraphs: runs of non-blank lines
    para: list[bytes] = []
    first = nbytes = 0
    for i, raw in enumerate(lines + [b""]):
      nbytes += len(raw) + 1
      if raw.strip():
        if not para:
          first = unit.first_line + i
        para.append(raw)
      elif para:
        yield first, _utf8(b"\n".join(para), unit.path, first), nbytes
        para, nbytes = [], 0


def _utf8(data: bytes, path: str, line: int) -> str | BadRecordError:
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    bad_line = line + data[:e.start].count(b"\n")
    return BadRecordError(path, bad_line, f"not valid UTF-8 (byte {e.start}: {e.reason}); "
                     "re-encode the file as UTF-8")


def _json_value(raw: bytes, path: str, line: int, field: str) -> object:
  text = _utf8(raw, path, line)
  if isinstance(text, BadRecordError):
    return text
  try:
    obj = json.loads(text)
  except json.JSONDecodeError as e:
    return BadRecordError(path, line, f"malformed JSON ({e.msg} at column {e.colno})")
  if not isinstance(obj, dict):
    return BadRecordError(path, line, f"expected a JSON object, got {type(obj).__name__}")
  if not field:  # the whole row (preference pairs)
    return obj
  if field not in obj:
    keys = ", ".join(sorted(obj)[:8]) or "none"
    return BadRecordError(path, line, f"no {field!r} field (keys: {keys}); pass --text_field=NAME")
  return obj[field]


def _read_parquet(unit: Unit, field: str) -> Iterator[tuple[int, object, int]]:
  import pyarrow.parquet as pq
  try:
    pf = pq.ParquetFile(unit.path)
  except Exception as e:
    raise BadInputError(f"{unit.path}: not a readable Parquet file: {e}") from None
  if field and field not in pf.schema_arrow.names:
    raise BadInputError(f"{unit.path}: no column {field!r} (columns: "
                   f"{', '.join(pf.schema_arrow.names)}); pass --text_field=NAME")
  row = unit.first_line
  for group in range(unit.start, unit.stop):
    table = pf.read_row_group(group, columns=[field] if field else None)
    values = table.column(field).to_pylist() if field else table.to_pylist()  # "": whole rows
    per_row = pf.metadata.row_group(group).total_byte_size // max(1, len(values))
    for value in values:
      bad = value is None
      yield row, BadRecordError(unit.path, row, f"{field!r} is null") if bad else value, per_row
      row += 1
