"""The whole config surface (every key of `base_config()`, its type and default) against a snapshot.

A key added, removed, retyped or with a new default fails here until the snapshot is rewritten on
purpose (`python -m tests.test_config_snapshot --write`), so such a change is always a visible
diff of tests/golden/config_surface.json in review.
"""

from __future__ import annotations

import json
import pathlib
import sys

import ml_collections

from maxgemma import config as config_lib

GOLDEN = pathlib.Path(__file__).parent / "golden" / "config_surface.json"
REGENERATE = ".venv/bin/python -m tests.test_config_snapshot --write"


def surface(c: ml_collections.ConfigDict, prefix: str = "") -> dict[str, dict]:
  """{"section.key": {"type": name, "default": value}} for every leaf key, sorted."""
  out = {}
  for key in sorted(c.keys()):
    value = c[key]
    if isinstance(value, ml_collections.ConfigDict):
      out.update(surface(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = {"type": c.get_type(key).__name__, "default": value}
  return out


def _diff(want: dict, got: dict) -> list[str]:
  lines = [f"removed {k}" for k in want if k not in got]
  lines += [f"added {k}: {got[k]}" for k in got if k not in want]
  lines += [f"changed {k}: {want[k]} -> {got[k]}" for k in want if k in got and want[k] != got[k]]
  return lines


def test_config_surface_matches_the_snapshot():
  got = json.loads(json.dumps(surface(config_lib.base_config())))  # JSON-normalised
  want = json.loads(GOLDEN.read_text())
  diff = _diff(want, got)
  assert not diff, (
      "the config surface of maxgemma.config.base_config() changed:\n  " + "\n  ".join(diff)
      + f"\nIf intended, document it in docs/config.md and rewrite the snapshot: {REGENERATE}")


if __name__ == "__main__":
  if sys.argv[1:] != ["--write"]:
    sys.exit(f"usage: {REGENERATE}")
  GOLDEN.parent.mkdir(exist_ok=True)
  rows = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in surface(config_lib.base_config()
                                                                      ).items()]
  GOLDEN.write_text("{\n" + ",\n".join(rows) + "\n}\n")  # one key a line: diffs read well
  print(f"wrote {GOLDEN}")
