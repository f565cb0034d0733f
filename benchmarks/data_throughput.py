"""Data throughput on this machine: prepare tokens/s and pipeline tokens/s (shuffle+pack+batch).

  .venv/bin/python benchmarks/data_throughput.py [--copies=24] [--batches=60]

Two corpora from the packaged demo corpus, repeated `--copies` times (each copy distinct) and
tokenized with the demo tokenizer: "short" (one docstring per document, ~150 tokens: the worst
case for per-document costs) and "long" (8 docstrings per document, ~1.2k tokens, closer to web
text). Pipeline rows are seq_len 2048 (and 8192), batch 16, this process only (1 host).
Prints a table and writes benchmarks/results/data_throughput.json. A v5e host (4 chips) training
Gemma 2B consumes about 30k tokens/s; the target is >= 500k tokens/s per host.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from maxgemma.config import base_config  # noqa: E402
from maxgemma.data.pipeline import make_train_iterator  # noqa: E402
from maxgemma.data.prepare import prepare  # noqa: E402
from maxgemma.data.sources import demo_dir  # noqa: E402

TARGET = 500_000


def _corpus(directory: str, copies: int, join: int) -> list[str]:
  with open(os.path.join(demo_dir(), "corpus.jsonl")) as f:
    docs = [json.loads(line)["text"] for line in f]
  docs = ["\n\n".join(docs[i:i + join]) for i in range(0, len(docs), join)]
  os.makedirs(directory)
  paths = []
  for c in range(copies):
    path = os.path.join(directory, f"corpus-{c:03d}.jsonl")
    with open(path, "w") as f:
      for i, text in enumerate(docs):
        f.write(json.dumps({"text": f"[{c}.{i}] {text}"}) + "\n")
    paths.append(path)
  return paths


def bench_prepare(inputs: list[str], out: str, workers: int, corpus: str) -> dict:
  t = time.perf_counter()
  m = prepare(inputs, "", out, workers=workers, unit_mb=4, progress=False)
  dt = time.perf_counter() - t
  mb = sum(os.path.getsize(p) for p in inputs) / 2**20
  return {"name": f"prepare {corpus} workers={workers}", "documents": m["documents"],
          "tokens": m["tokens"], "seconds": dt, "tokens_per_s": m["tokens"] / dt,
          "docs_per_s": m["documents"] / dt, "input_mb_per_s": mb / dt}


def bench_pipeline(source: str, corpus: str, *, seq_len: int, batch: int, batches: int,
                   **data) -> dict:
  cfg = base_config().data
  cfg.sources = source
  for k, v in data.items():
    cfg[k] = v
  it = make_train_iterator(cfg, seq_len=seq_len, global_batch=batch, seed=0)
  for _ in range(3):  # warm-up (worker start, first pack)
    next(it)
  start_stats = it.stats()
  t, cpu = time.perf_counter(), time.process_time()
  for _ in range(batches):
    next(it)
  dt, cpu = time.perf_counter() - t, time.process_time() - cpu
  stats = it.stats()
  it.close()
  real = stats["tokens"] - start_stats["tokens"]
  slots = batches * batch * seq_len
  desc = ", ".join(f"{k}={v}" for k, v in data.items())
  return {"name": f"pipeline {corpus} L={seq_len} B={batch} {desc}".strip(), "seconds": dt,
          "tokens_per_s": slots / dt, "real_tokens_per_s": real / dt,
          "real_tokens_per_cpu_s": real / cpu,
          "packing_efficiency": real / slots}


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--copies", type=int, default=24)
  p.add_argument("--batches", type=int, default=60)
  p.add_argument("--output", default=os.path.join(REPO, "benchmarks", "results",
                                                  "data_throughput.json"))
  a = p.parse_args()
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for corpus, join in (("short", 1), ("long", 8)):
      inputs = _corpus(os.path.join(tmp, corpus), a.copies, join)
      for workers in ((1, 2) if corpus == "short" else (2,)):
        out = os.path.join(tmp, f"{corpus}-out{workers}")
        rows.append(bench_prepare(inputs, out, workers, corpus))
        print(f"  {rows[-1]['name']}: {rows[-1]['tokens_per_s']:,.0f} tokens/s", file=sys.stderr)
      runs = [(2048, {})]
      if corpus == "short":
        runs += [(2048, {"packing_method": "first_fit"}), (2048, {"packing": False}),
                 (2048, {"worker_count": 2}), (8192, {})]
      for seq_len, data in runs:
        rows.append(bench_pipeline(out, corpus, seq_len=seq_len, batch=16, batches=a.batches,
                                   **data))
        print(f"  {rows[-1]['name']}: {rows[-1]['real_tokens_per_s']:,.0f} tokens/s",
              file=sys.stderr)
  print(f"\n{'benchmark':52s} {'tokens/s':>11s} {'real tok/s':>11s} {'tok/CPU-s':>11s} "
        f"{'packing':>8s}")
  for r in rows:
    real, eff = r.get("real_tokens_per_s"), r.get("packing_efficiency")
    cpu = r.get("real_tokens_per_cpu_s")
    print(f"{r['name']:52s} {r['tokens_per_s']:11,.0f} {(f'{real:11,.0f}' if real else ''):>11s} "
          f"{(f'{cpu:11,.0f}' if cpu else ''):>11s} {(f'{eff:8.1%}' if eff else ''):>8s}")
  defaults = [r for r in rows if r["name"].endswith("L=2048 B=16")]
  ok = all(r["real_tokens_per_s"] >= TARGET for r in defaults)
  for r in defaults:
    print(f"default config, {r['name']}: {r['real_tokens_per_s']:,.0f} real tokens/s per host "
          f"({'meets' if r['real_tokens_per_s'] >= TARGET else 'BELOW'} {TARGET:,})")
  print(f"(machine load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} "
        "cores; tok/CPU-s is this process's own CPU time, insensitive to other users)")
  os.makedirs(os.path.dirname(a.output), exist_ok=True)
  with open(a.output, "w") as f:
    json.dump({"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                           "platform": platform.platform(), "loadavg": os.getloadavg()},
               "target_tokens_per_s": TARGET, "meets_target": ok, "results": rows}, f, indent=1)
  print(f"wrote {a.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
