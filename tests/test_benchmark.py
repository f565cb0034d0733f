"""The train-throughput benchmark's smallest row runs end to end and writes its JSON and markdown
(no timing assertions: the numbers depend on the machine)."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from maxgemma.model.presets import get_preset

ROOT = Path(__file__).resolve().parents[1]


def _load():
  spec = importlib.util.spec_from_file_location("train_throughput",
                                                ROOT / "benchmarks" / "train_throughput.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up
  spec.loader.exec_module(module)
  return module


def test_smoke_grid_writes_json_and_markdown(tmp_path):
  bench = _load()
  out, doc = tmp_path / "t.json", tmp_path / "perf.md"
  doc.write_text("# Performance\n\nkept text\n")
  report = bench.main(["--grid", "smoke", "--steps", "1", "--repeats", "1", "--json_out",
                       str(out), "--markdown", "--doc", str(doc)])
  saved = json.loads(out.read_text())
  assert saved["rows"] == json.loads(json.dumps(report["rows"]))
  (row,) = saved["rows"]
  assert "error" not in row, row.get("error")
  assert row["model"] == "cpu-tiny" and row["tokens_per_step"] == 2 * 64
  for key in ("tokens_per_s", "step_s", "mfu", "compile_s", "peak_memory_bytes",
              "model_flops_per_step"):
    assert row[key] > 0, key
  # Two steps on one batch of uniform random tokens: the first loss is near ln(vocab) (an
  # untrained model), and the update lowers the loss on that same batch.
  cfg = get_preset("tiny_gemma1_mqa")
  first, final = row["loss_after_warmup"], row["final_loss"]
  assert math.isfinite(first) and math.isfinite(final), (first, final)
  assert abs(first - math.log(cfg.vocab_size)) < 1.5, first
  assert final < first, (first, final)
  # Model FLOPs counted by hand: 6 per matmul weight (all but the norm scales; the tied
  # embedding is the logits matmul) and 12 * heads * head_dim per causal (query, key) pair.
  L, B = 64, 2
  norm_scales = (2 * cfg.num_layers + 1) * cfg.d_model
  dense = 6 * (row["params"] - norm_scales)
  attention = 12 * cfg.num_heads * cfg.head_dim * cfg.num_layers * (L * (L + 1) / 2) / L
  assert row["model_flops_per_step"] == pytest.approx((dense + attention) * B * L, rel=1e-9)
  # MFU against the whole CPU's measured peak (fake devices share its cores: one device).
  assert row["mfu"] == pytest.approx((dense + attention) * B * L
                                     / (row["step_s"] * row["peak_flops_per_device"]), rel=1e-9)
  text = doc.read_text()
  assert "kept text" in text and "cpu-tiny" in text
  bench.write_markdown(str(doc), "smoke", "new table")
  text = doc.read_text()
  assert text.count("BEGIN train_throughput smoke") == 1  # replaced, not appended
  assert "new table" in text and "cpu-tiny" not in text and "kept text" in text


def _aot_pods():
  spec = importlib.util.spec_from_file_location("aot_pods", ROOT / "benchmarks" / "aot_pods.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_layout_ranking_breaks_a_compute_tie_on_the_serial_bound():
  pods = _aot_pods()

  def row(name, compute, ici, ok=True):
    return {"name": name, "ok": ok, "tokens_per_step": 1000, "chips": 10,
            "step_bounds_s": {"overlapped": max(compute, ici), "serial": compute + ici}}

  # a and b are compute-bound at the same 1.0 s (100 tokens/s/chip); b sends less over ICI.
  # c is ICI-bound (50 tokens/s/chip); d was refused.
  rows = [row("a", 1.0, 0.6), row("b", 1.0 + 1e-9, 0.2), row("c", 1.0, 2.0),
          {"name": "d", "ok": False, "error": "x"}]
  assert pods.best_of(rows) == "b"
  assert pods.best_of([rows[0], rows[2]]) == "a"
  assert pods.best_of([rows[3]]) is None
  assert pods.refusal("... Used 16.16G of 15.75G hbm. Exceeded ...") == (
      "refused: used 16.16G of 15.75G")
  assert pods.refusal("the total memory required for HLO temporaries (19.85G) exceeds") == (
      "refused: 19.85G of temporaries")
  assert pods.refusal("Ran out of memory in memory space vmem while allocating on stack for "
                      "%splash_mha_dkv.1 = (f32[4,1024,256]") == (
      "refused: out of VMEM in splash_mha_dkv")
