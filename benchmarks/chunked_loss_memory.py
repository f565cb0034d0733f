"""Compiled memory of the materialised vs chunked cross-entropy at a Gemma-sized vocabulary.

Compiles (never runs) the loss and its gradient w.r.t. the hidden states and the embedding, for
V = 256128, B * L = 8192 tokens, bf16 hidden states and a float32 embedding, and reads XLA's
`memory_analysis()` (temporary buffers, on the host CPU backend). Prints a table and writes
`benchmarks/results/chunked_loss_memory.json`.

  .venv/bin/python benchmarks/chunked_loss_memory.py [--d_model 2048] [--chunks 128,256,512]
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import jax
import jax.numpy as jnp

from maxgemma.loss import chunked_cross_entropy, cross_entropy, output_logits

VOCAB = 256128
BATCH, LENGTH = 8, 1024  # 8192 tokens
SOFTCAP = 30.0


def _materialised(hidden_BLD, embedding_VD, targets_BL, weights_BL):
  logits_BLV = output_logits(hidden_BLD, embedding_VD, SOFTCAP, jnp.bfloat16)
  return cross_entropy(logits_BLV, targets_BL, weights_BL, z_loss=1e-4)


def _chunked(chunk_size):
  def fn(hidden_BLD, embedding_VD, targets_BL, weights_BL):
    return chunked_cross_entropy(hidden_BLD, embedding_VD, targets_BL, weights_BL,
                                 chunk_size=chunk_size, final_softcap=SOFTCAP, z_loss=1e-4,
                                 dtype=jnp.bfloat16)
  return fn


def _with_grad(fn):
  def loss_and_grads(hidden_BLD, embedding_VD, targets_BL, weights_BL):
    def mean_loss(h, e):
      loss, weight, _ = fn(h, e, targets_BL, weights_BL)
      return loss / weight
    return jax.value_and_grad(mean_loss, argnums=(0, 1))(hidden_BLD, embedding_VD)
  return loss_and_grads


def measure(fn, d_model: int, batch: int = BATCH, length: int = LENGTH,
            vocab: int = VOCAB) -> dict[str, int]:
  """XLA's compiled memory sizes (bytes) for `fn(hidden, embedding, targets, weights)`."""
  args = (jax.ShapeDtypeStruct((batch, length, d_model), jnp.bfloat16),
          jax.ShapeDtypeStruct((vocab, d_model), jnp.float32),
          jax.ShapeDtypeStruct((batch, length), jnp.int32),
          jax.ShapeDtypeStruct((batch, length), jnp.float32))
  stats = jax.jit(fn).lower(*args).compile().memory_analysis()
  return {"temp_bytes": int(stats.temp_size_in_bytes),
          "argument_bytes": int(stats.argument_size_in_bytes),
          "output_bytes": int(stats.output_size_in_bytes)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--d_model", type=int, default=2048)
  parser.add_argument("--chunks", default="128,256,512", help="sequence positions per chunk")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "chunked_loss_memory.json"))
  args = parser.parse_args()
  chunks = [int(c) for c in args.chunks.split(",")]

  rows = []
  for mode, wrap in (("forward", lambda f: f), ("forward+backward", _with_grad)):
    base = measure(wrap(_materialised), args.d_model)
    rows.append({"mode": mode, "variant": "materialised", "chunk_positions": LENGTH,
                 "chunk_tokens": BATCH * LENGTH, **base, "temp_ratio": 1.0})
    for c in chunks:
      m = measure(wrap(_chunked(c)), args.d_model)
      rows.append({"mode": mode, "variant": "chunked", "chunk_positions": c,
                   "chunk_tokens": BATCH * c, **m,
                   "temp_ratio": m["temp_bytes"] / base["temp_bytes"]})

  gib = 2 ** 30
  print(f"cross-entropy memory: V={VOCAB} D={args.d_model} B={BATCH} L={LENGTH} "
        f"({BATCH * LENGTH} tokens), bf16 hidden, f32 embedding, backend "
        f"{jax.default_backend()}")
  print(f"{'mode':<17} {'variant':<13} {'chunk tok':>9} {'temp GiB':>9} {'args GiB':>9} "
        f"{'out GiB':>8} {'temp/mat':>8}")
  for r in rows:
    print(f"{r['mode']:<17} {r['variant']:<13} {r['chunk_tokens']:>9} "
          f"{r['temp_bytes'] / gib:>9.3f} {r['argument_bytes'] / gib:>9.3f} "
          f"{r['output_bytes'] / gib:>8.3f} {r['temp_ratio']:>8.3f}")

  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"vocab": VOCAB, "d_model": args.d_model, "batch": BATCH, "length": LENGTH,
               "hidden_dtype": "bfloat16", "embedding_dtype": "float32",
               "final_softcap": SOFTCAP, "backend": jax.default_backend(),
               "jax_version": jax.__version__, "machine": platform.machine(), "rows": rows},
              f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
