"""The Cloud TPU accelerator types and zones launch.tpu accepts: one table, one place.

Sizes are the supported configurations of each generation's Cloud TPU page, zones the TPU regions
and zones page (docs/tpu.md names the pages). A size outside the table is refused with the nearest
listed sizes; a zone outside the generation's list is refused with the zones that offer it.
Stdlib only.
"""

from __future__ import annotations

import bisect
import dataclasses
import re


class LaunchError(Exception):
  """Bad input (exit code 2) or a failed step (its own code): printed as one `error:` line."""

  def __init__(self, message: str, code: int = 2):
    super().__init__(message)
    self.code = code


@dataclasses.dataclass(frozen=True)
class Family:
  """One TPU generation as gcloud names it: `<prefix>-<size>`."""
  prefix: str
  generation: str
  runtime: str  # the default runtime (software) version for JAX
  unit: str  # what <size> counts: "chips" or "TensorCores" (2 per chip)
  sizes: tuple[int, ...]  # the documented sizes, ascending
  multislice: bool
  zones: tuple[str, ...]  # the documented zones
  sizes_text: str = ""  # `sizes` in words where listing them all would not read

  def hosts(self, size: int) -> int:
    """TPU VM workers (one process each) in one slice of this size."""
    if self.unit == "chips":  # v5e / v6e: up to 8 chips on one VM, then 4 chips per VM
      return 1 if size <= 8 else size // 4
    return max(1, size // 8)  # 4 chips = 8 TensorCores per VM

  def nearest(self, size: int) -> list[int]:
    """The listed sizes just below and just above `size` (one of them at the ends)."""
    i = bisect.bisect_left(self.sizes, size)
    return [n for n in (self.sizes[i - 1] if i else None,
                        self.sizes[i] if i < len(self.sizes) else None) if n is not None]

  def describe(self) -> str:
    sizes = self.sizes_text or ",".join(map(str, self.sizes))
    return f"{self.prefix}-{{{sizes}}} ({self.generation}, {self.unit})"


# v4 slices: the four single-cube shapes 2x2x1, 2x2x2, 2x2x4, 2x4x4, then AxBxC with every side a
# multiple of 4, i.e. n whole 4x4x4 cubes (128 TensorCores each) for n = 1 .. 64 (the 4096-chip pod;
# Gemma 2 9B's 8x16x32 is v4-8192).
_V4_SIZES = (8, 16, 32, 64) + tuple(128 * n for n in range(1, 65))

FAMILIES = {f.prefix: f for f in (
    Family("v5litepod", "v5e", "v2-alpha-tpuv5-lite", "chips", (1, 4, 8, 16, 32, 64, 128, 256),
           True, ("us-central1-a", "us-south1-a", "us-west1-c", "us-west4-a", "us-west4-b",
                  "us-east5-a", "us-east5-b", "us-east5-c", "europe-west4-b")),
    Family("v6e", "v6e", "v2-alpha-tpuv6e", "chips", (1, 4, 8, 16, 32, 64, 128, 256), True,
           ("us-central1-b", "us-east1-d", "us-east5-a", "us-east5-b", "us-east5-c", "us-east4-a",
            "us-east4-b", "us-west1-c")),
    Family("v5p", "v5p", "v2-alpha-tpuv5", "TensorCores",
           (8, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 12288), True,
           ("us-central1-a", "us-east5-a", "us-east5-b", "us-east5-c", "us-south1-a",
            "us-east1-d")),
    Family("v4", "v4", "tpu-ubuntu2204-base", "TensorCores", _V4_SIZES, True, ("us-central2-b",),
           "8,16,32,64,128*n for n=1..64"),
    Family("v3", "v3", "tpu-ubuntu2204-base", "TensorCores",
           (8, 32, 64, 128, 256, 512, 1024, 2048), False,
           ("us-central1-a", "us-central1-b", "us-central1-f", "europe-west4-a")),
    Family("v2", "v2", "tpu-ubuntu2204-base", "TensorCores", (8, 32, 128, 256, 512), False,
           ("us-central1-a", "us-central1-b", "us-central1-c", "us-central1-f", "europe-west4-a",
            "asia-east1-c")),
)}
ALIASES = {"v5e": "v5litepod"}


def known_types() -> str:
  """The accepted accelerator types, for error messages."""
  return "; ".join(f.describe() for f in FAMILIES.values())


def parse_accelerator(accelerator_type: str) -> tuple[Family, int, str]:
  """(family, size, gcloud's name) for e.g. `v5litepod-256` (alias `v5e-256`)."""
  m = re.fullmatch(r"([a-z0-9]+)-(\d+)", accelerator_type.strip().lower())
  prefix = ALIASES.get(m.group(1), m.group(1)) if m else ""
  if not m or prefix not in FAMILIES:
    raise LaunchError(f"unknown accelerator type {accelerator_type!r}: known types are "
                      f"{known_types()}")
  family, size = FAMILIES[prefix], int(m.group(2))
  if size not in family.sizes:
    near = " or ".join(f"{prefix}-{n}" for n in family.nearest(size))
    raise LaunchError(f"accelerator type {accelerator_type!r} is not a supported "
                      f"{family.generation} configuration (no slice of {size} {family.unit}): the "
                      f"nearest are {near}; all: {family.describe()}")
  return family, size, f"{prefix}-{size}"


def check_zone(family: Family, zone: str) -> None:
  """Refuses a zone the docs do not list for this generation."""
  if zone not in family.zones:
    raise LaunchError(f"zone {zone} offers no {family.generation} TPUs in the Cloud TPU zone "
                      f"table: use one of {', '.join(family.zones)} (or --skip_zone_check if "
                      "Google has added the zone since)")
