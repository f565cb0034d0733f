"""Reading a compiled XLA program's HLO text: instructions, while-loop trip counts, DCN transfers.

`parse_hlo` reads the text `compiled.as_text()` gives (one `%name = type opcode(operands), attrs`
per line, grouped into computations); `dcn_allreduce_sends` finds the cross-slice reduction
transfers of a multi-slice TPU program and how many times a step runs each; `ici_collectives`
the collectives inside a slice and the bytes each chip sends for them.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any


@dataclasses.dataclass(frozen=True)
class Instr:
  """One HLO instruction of a compiled program's text: `%name = type opcode(operands), attrs`."""

  name: str
  type: str
  opcode: str
  operands: tuple[str, ...]
  attrs: str
  computation: str = ""  # the computation (function) the instruction belongs to
  args: str = ""  # the raw text between the opcode's parentheses (a constant's value)

  @property
  def array(self) -> tuple[str, tuple[int, ...]]:
    """(dtype, dims) of the result, or of its first element when it is a tuple."""
    m = re.search(r"([a-z][a-z0-9]*)\[([0-9,]*)\]", self.type)
    if not m:
      return "", ()
    return m.group(1), tuple(int(d) for d in m.group(2).split(",") if d)


def _closing(text: str, start: int) -> int:
  """Index just past the parenthesis that closes the one at `start`."""
  depth = 0
  for i in range(start, len(text)):
    depth += {"(": 1, ")": -1}.get(text[i], 0)
    if depth == 0:
      return i + 1
  return len(text)


def parse_hlo(hlo_text: str) -> dict[str, Instr]:
  """Every instruction of an HLO module's text, by name."""
  out = {}
  computation = ""
  for line in hlo_text.splitlines():
    header = re.match(r"(?:ENTRY\s+)?%([\w.\-]+)\s+\(.*\{\s*$", line)
    if header:
      computation = header.group(1)
      continue
    m = re.match(r"\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*", line)
    if not m:
      continue
    rest = line[m.end():]
    end = _closing(rest, 0) if rest.startswith("(") else rest.find(" ")
    if end <= 0:
      continue
    typ, rest = rest[:end], rest[end:].lstrip()
    op = re.match(r"([\w\-]+)\(", rest)
    if not op:
      continue
    close = _closing(rest, op.end() - 1)
    operands = tuple(re.findall(r"%([\w.\-]+)", rest[op.end():close - 1]))
    out[m.group(1)] = Instr(m.group(1), typ, op.group(1), operands, rest[close:], computation,
                            rest[op.end():close - 1])
  return out


def _loop_start(loop: Instr, instrs: dict[str, Instr]) -> int:
  """The constant a while loop's counter (tuple element 0 of its operand) starts at, else 0."""
  init = instrs.get(loop.operands[0]) if loop.operands else None
  if init is None or init.opcode != "tuple" or not init.operands:
    return 0
  x = instrs.get(init.operands[0])
  while x is not None and x.opcode in ("copy", "bitcast") and x.operands:
    x = instrs.get(x.operands[0])
  if x is not None and x.opcode == "constant" and re.fullmatch(r"-?\d+", x.args.strip()):
    return int(x.args)
  return 0


def loop_multipliers(instrs: dict[str, Instr]) -> dict[str, int]:
  """How many times each while-loop body computation runs per execution (nested loops multiply).

  The trip count is the loop's `known_trip_count` when the compiler recorded one, else the
  integer constant its condition compares the counter against minus the counter's initial value
  (`lax.scan` loops count 0..N-1; the compiler may peel the first iteration and start at 1).
  """
  trips: dict[str, tuple[int, str]] = {}  # body -> (trip count, computation holding the while)
  for ins in instrs.values():
    if ins.opcode != "while":
      continue
    body = re.search(r"body=%([\w.\-]+)", ins.attrs)
    cond = re.search(r"condition=%([\w.\-]+)", ins.attrs)
    if not body:
      continue
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', ins.attrs)
    if known:
      n = int(known.group(1))
    else:
      consts = [int(c.args) for c in instrs.values() if cond and c.computation == cond.group(1)
                and c.opcode == "constant" and re.fullmatch(r"-?\d+", c.args.strip())]
      n = consts[0] - _loop_start(ins, instrs) if len(consts) == 1 else 1
    trips[body.group(1)] = (n, ins.computation)

  def mult(comp: str, depth: int = 0) -> int:
    if comp not in trips or depth > 16:
      return 1
    n, parent = trips[comp]
    return n * mult(parent, depth + 1)

  return {comp: mult(comp) for comp in trips}


_PASS_THROUGH = ("bitcast", "copy", "reshape", "get-tuple-element")


def dcn_allreduce_sends(hlo_text: str) -> list[dict[str, Any]]:
  """Every cross-slice reduction transfer in a compiled multi-slice TPU program.

  Multi-slice (megascale) reductions are not all-reduces with cross-slice replica groups: they
  are `send`/`recv` pairs tagged `_xla_megascale_transfer_type="ALL_REDUCE"`. For each send:
  what one chip sends over the data-centre network (`dtype`, `shape`, `elements`), how many times
  a step runs it (`per_step`: a send inside the scanned layers' loop runs once per layer), and the
  instruction that produced it (`source`: bitcasts and copies skipped), e.g. an in-slice
  reduce-scatter, which is what makes the reduction hierarchical.
  """
  instrs = parse_hlo(hlo_text)
  loops = loop_multipliers(instrs)
  sends = []
  for ins in instrs.values():
    if ins.opcode != "send" or 'megascale_transfer_type="ALL_REDUCE"' not in ins.attrs:
      continue
    source = instrs.get(ins.operands[0]) if ins.operands else None
    while source is not None and source.opcode in _PASS_THROUGH and source.operands:
      source = instrs.get(source.operands[0])
    dtype, shape = ins.array
    target = re.search(r'_xla_megascale_target="([^"]*)"', ins.attrs)
    sends.append({"name": ins.name, "dtype": dtype, "shape": shape,
                  "elements": math.prod(shape), "source": source,
                  "target": target.group(1) if target else "",
                  "per_step": loops.get(ins.computation, 1)})
  return sends


def is_reduce_scatter(ins: Instr | None) -> bool:
  """A reduce-scatter: the op itself or the TPU compiler's all-reduce-scatter fusion."""
  if ins is None:
    return False
  return ins.opcode == "reduce-scatter" or (
      ins.opcode == "fusion" and re.search(r"calls=%[\w.\-]*reduce-scatter", ins.attrs) is not None)


_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1}


def sends_bytes(sends: list[dict[str, Any]]) -> int:
  """The bytes one chip sends per step over all of `sends` (`dcn_allreduce_sends` entries)."""
  return sum(s["elements"] * s["per_step"] * _DTYPE_BYTES.get(s["dtype"], 4) for s in sends)


def _arrays(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
  """Every (dtype, dims) array of an HLO type (a tuple lists several)."""
  return [(m.group(1), tuple(int(d) for d in m.group(2).split(",") if d))
          for m in re.finditer(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]", type_text)
          if m.group(1) in _DTYPE_BYTES]


def _nbytes(arrays: list[tuple[str, tuple[int, ...]]]) -> int:
  return sum(math.prod(dims) * _DTYPE_BYTES[dtype] for dtype, dims in arrays)


def group_size(attrs: str) -> int:
  """Devices per replica group of a collective: explicit `{{0,1,..},..}`, iota `[G,n]<=[..]`,
  or `mesh['axis_0'=a,..] {'axis_0',..}` (the product of the named axes); 1 when not found."""
  m = re.search(r"replica_groups=\{\{([0-9,]*)\}", attrs)
  if m:
    return len([x for x in m.group(1).split(",") if x])
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attrs)
  if m:
    return int(m.group(2))
  m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\S+)? \{([^}]*)\}", attrs)
  if m:
    sizes = {k: int(v) for k, v in re.findall(r"'([\w]+)'=(\d+)", m.group(1))}
    return math.prod(sizes.get(a, 1) for a in re.findall(r"'([\w]+)'", m.group(2)))
  return 1


# Collective -> the kind whose ring traffic it moves (fusions are named by what they call).
_COLLECTIVES = {"all-gather": "all-gather", "all-gather-start": "all-gather",
                "all-reduce": "all-reduce", "all-reduce-start": "all-reduce",
                "reduce-scatter": "reduce-scatter", "all-to-all": "all-to-all",
                "collective-permute": "collective-permute",
                "collective-permute-start": "collective-permute"}


def _collective_kind(ins: Instr) -> str:
  if ins.opcode in _COLLECTIVES:
    return _COLLECTIVES[ins.opcode]
  if ins.opcode == "fusion":
    m = re.search(r"calls=%([a-z\-]+)", ins.attrs)
    name = m.group(1).rstrip("-.") if m else ""
    for prefix in ("all-reduce-scatter", "reduce-scatter", "all-gather", "all-reduce"):
      if name.startswith(prefix):
        return "reduce-scatter" if prefix.endswith("reduce-scatter") else prefix
  return ""


def ici_collectives(hlo_text: str) -> list[dict[str, Any]]:
  """The collectives of one chip's program (the cross-slice sends excluded) with the bytes a chip
  sends for each per step, as ring algorithms move them over a group of n chips: all-gather
  (n - 1)/n of its result, reduce-scatter (n - 1) x its result (the shard), all-reduce
  2 (n - 1)/n, all-to-all (n - 1)/n, collective-permute its whole buffer; a collective inside a
  loop counts once per iteration (`loop_multipliers`)."""
  instrs = parse_hlo(hlo_text)
  loops = loop_multipliers(instrs)
  out = []
  for ins in instrs.values():
    kind = _collective_kind(ins)
    if not kind:
      continue
    arrays = _arrays(ins.type)
    if ins.opcode.endswith("-start"):  # (operands..., results..., scalar context): the results
      arrays = [a for a in arrays if a[1]]
      arrays = arrays[len(arrays) // 2:] if len(arrays) > 1 else arrays
    nbytes, n = _nbytes(arrays), group_size(ins.attrs)
    factor = {"all-gather": (n - 1) / n, "reduce-scatter": n - 1, "all-reduce": 2 * (n - 1) / n,
              "all-to-all": (n - 1) / n, "collective-permute": 1.0}[kind]
    if kind != "collective-permute" and n <= 1:
      continue
    per_step = loops.get(ins.computation, 1)
    out.append({"name": ins.name, "kind": kind, "group": n, "bytes": nbytes,
                "per_step": per_step, "sent_bytes": int(nbytes * factor) * per_step})
  return out
