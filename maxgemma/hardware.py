"""The accelerators we know: peak dense bf16 FLOP/s per chip and, for TPUs, HBM per chip.

One table for both users: MFU (`maxgemma.metrics`, looked up by `jax.Device.device_kind`) and the
AOT compile (`maxgemma.aot`, looked up by a TPU topology name such as `v5e:16x16`). Peaks are the
vendors' data-sheet figures.
"""

from __future__ import annotations

import dataclasses

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip.

  `device_kinds`: lower-case substrings of `jax.Device.device_kind` naming it (matched in table
  order, first match wins); `topology_names`: the prefixes of TPU topology names that describe it.
  `usable_hbm_bytes` is what XLA lets one program use (0 when not known). `chip_config_name`: how
  libtpu describes its devices for a topology; v4 runs "megacore" (one JAX device per chip, both
  TensorCores), as on the pods, where its "default" would give one device per TensorCore.
  """

  name: str
  peak_flops: float
  hbm_bytes: int = 0
  usable_hbm_bytes: int = 0
  device_kinds: tuple[str, ...] = ()
  topology_names: tuple[str, ...] = ()
  chip_config_name: str = "default"
  # Bytes per second one chip can send: over ICI with every link busy (half the data sheet's
  # bidirectional figure), and over the data-centre network (DCN); 0 when not published.
  ici_bytes_per_s: float = 0.0
  dcn_bytes_per_s: float = 0.0


# The "lite" TPUs come before the plain "v5": JAX names v5e "TPU v5 lite", v5p "TPU v5", v6e
# "TPU v6 lite". Usable HBM is the compiler's own figure where seen ("exceeds available HBM
# (15.75G)" on v5e, "(30.75G)" on a v4 megacore chip); the others assume v5e's 0.25 GiB reserve.
# ICI/DCN: v5e 400 GB/s bidirectional ICI and 6.4 Tbps DCN per 256-chip pod; v5p 1200 GB/s and
# 50 Gbps per chip; v4 the 1.1 PB/s all-reduce bandwidth of a 4096-chip pod (no DCN figure).
CHIPS: tuple[Chip, ...] = (
    Chip("TPU v5e", 197e12, 16 * GiB, int(15.75 * GiB), ("v5 lite", "v5lite", "v5e"),
         ("v5e", "v5litepod"), ici_bytes_per_s=200e9, dcn_bytes_per_s=6.4e12 / 8 / 256),
    Chip("TPU v6e", 918e12, 32 * GiB, int(31.75 * GiB), ("v6 lite", "v6lite", "v6e"),
         ("v6e",)),
    Chip("TPU v5p", 459e12, 95 * GiB, int(94.75 * GiB), ("v5p", "tpu v5"), ("v5p",),
         ici_bytes_per_s=600e9, dcn_bytes_per_s=50e9 / 8),
    Chip("TPU v4", 275e12, 32 * GiB, int(30.75 * GiB), ("tpu v4",), ("v4",), "megacore",
         ici_bytes_per_s=1.1e15 / 4096),
    Chip("NVIDIA H200", 989e12, device_kinds=("h200",)),
    Chip("NVIDIA H100", 989e12, device_kinds=("h100",)),
    Chip("NVIDIA A100", 312e12, device_kinds=("a100",)),
)

PEAK_FLOPS: dict[str, float] = {c.name: c.peak_flops for c in CHIPS}


def chip_for_device_kind(device_kind: str) -> Chip | None:
  """The chip a `jax.Device.device_kind` string names, or None when the table does not know it."""
  kind = device_kind.lower()
  return next((c for c in CHIPS if any(p in kind for p in c.device_kinds)), None)


def known_peak_flops(device_kind: str) -> float | None:
  """Peak bf16 FLOP/s for a `jax.Device.device_kind` string, or None when it is not in the table."""
  chip = chip_for_device_kind(device_kind)
  return chip.peak_flops if chip else None


def chip_for_topology(topology: str) -> Chip:
  """The chip of a TPU topology name such as `v5e:16x16`; ValueError naming the known kinds."""
  kind = topology.split(":")[0].split("-")[0]
  for chip in CHIPS:
    if kind in chip.topology_names:
      return chip
  known = [n for c in CHIPS for n in c.topology_names]
  raise ValueError(f"unknown TPU kind {kind!r} in topology {topology!r}; known: {', '.join(known)}")
