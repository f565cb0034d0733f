"""A seeded random permutation of [0, n) evaluated on index arrays: O(1) memory, vectorized.

A 4-round Feistel network over the smallest even-width power-of-two domain >= n, with
cycle-walking back into [0, n). Like grain's `index_shuffle` but on whole numpy arrays at once,
so a group of documents costs one call instead of one per document.
"""

from __future__ import annotations

import numpy as np

_ROUNDS = 4
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
  """splitmix64 finalizer: a fast, well-mixing 64-bit hash."""
  x = (x ^ (x >> np.uint64(30))) * _M1
  x = (x ^ (x >> np.uint64(27))) * _M2
  return x ^ (x >> np.uint64(31))


def _keys(seed: int) -> list[np.uint64]:
  state = np.random.SeedSequence(int(seed)).generate_state(_ROUNDS, dtype=np.uint64)
  return [np.uint64(k) for k in state]


def permute(indices: np.ndarray, n: int, seed: int) -> np.ndarray:
  """The images of `indices` (all in [0, n)) under the permutation of [0, n) chosen by `seed`."""
  x = np.asarray(indices, dtype=np.uint64)
  if n <= 1:
    return x.astype(np.int64)
  half = max(1, (int(n - 1).bit_length() + 1) // 2)
  mask = np.uint64((1 << half) - 1)
  keys = _keys(seed)

  def feistel(v: np.ndarray) -> np.ndarray:
    left, right = v >> np.uint64(half), v & mask
    with np.errstate(over="ignore"):
      for k in keys:
        left, right = right, left ^ (_mix(right ^ k) & mask)
    return (left << np.uint64(half)) | right

  with np.errstate(over="ignore"):
    out = feistel(x)
    outside = out >= np.uint64(n)
    while outside.any():  # cycle-walk: at most a few steps, the domain is < 4n
      out[outside] = feistel(out[outside])
      outside = out >= np.uint64(n)
  return out.astype(np.int64)
