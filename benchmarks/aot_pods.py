"""The Gemma reports' pod layouts compiled ahead of time for real TPU topologies (v5e, v4, v5p).

Each row runs `python -m maxgemma.aot` (one process per compile, one at a time) on this
CPU-only machine with libtpu and records per-chip memory, model FLOPs per step, the roofline step
time, the cross-slice traffic and the compile time. Writes `benchmarks/results/aot_pods.json` and
three tables between their markers in `docs/aot.md`: the pod layouts (ROWS), each model's
layouts ranked by their step bounds (COMPARED, `best_of`; the ALTERNATIVES rows appear only
there) and the splash tiles of two configs (TILES). The compiled HLO text goes to
/tmp/aot_pods/NAME.hlo.txt (for reading, not kept).

  .venv/bin/python benchmarks/aot_pods.py [--rows 7b_1pod,2b_2pods] [--keep]

`--keep` keeps the rows of the existing JSON that are not re-run; `--import_report NAME=FILE`
takes a report compiled by hand (`python -m maxgemma.aot` with the row's flags and `--json_out`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from maxgemma.model.config import SPLASH_BLOCKS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "aot_pods.json"
DOC = ROOT / "docs" / "aot.md"
HLO_DIR = Path(tempfile.gettempdir()) / "aot_pods"  # compiled programs, for reading (not kept)
START, END = "<!-- aot_pods:start -->", "<!-- aot_pods:end -->"
COMPARE_START, COMPARE_END = "<!-- aot_layouts:start -->", "<!-- aot_layouts:end -->"
TILES_START, TILES_END = "<!-- aot_tiles:start -->", "<!-- aot_tiles:end -->"

# name -> (config file, extra flags, what the row shows)
ROWS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "7b_1pod": ("configs/gemma_7b_v5e_1pod.py", (),
                "7B, one v5e-256 pod: tensor 16 x fsdp 16"),
    "7b_16pods": ("configs/gemma_7b_v5e_16pods.py", (),
                  "7B, 16 pods: per pod tensor 16 x fsdp 16, data 16 over DCN"),
    "2b_1pod": ("configs/gemma_2b_v5e_1pod.py", (), "2B, one pod: fsdp 256"),
    "2b_2pods": ("configs/gemma_2b_v5e_2pods.py", (),
                 "2B, 2 pods: per pod fsdp 256, data 2 over DCN"),
    "g2_9b_v4": ("configs/gemma2_9b_v4_8x16x32.py", ("--topology=v4:8x16x32",),
                 "Gemma 2 9B, v4 8x16x32: data 2 x fsdp 512 x tensor 4"),
    "g2_27b_v5p": ("configs/gemma2_27b_v5p_8x24x32.py", ("--topology=v5p:8x24x32",),
                   "Gemma 2 27B, v5p 8x24x32: fsdp 768 x tensor 8"),
    "g2_9b_v4_2048": ("configs/gemma2_9b_v4_8x16x32.py",
                      ("--topology=v4:8x16x32", "--config.train.global_batch=2048"),
                      "Gemma 2 9B as above, 2 rows per data-parallel group"),
    "g2_27b_v5p_1536": ("configs/gemma2_27b_v5p_8x24x32.py",
                        ("--topology=v5p:8x24x32", "--config.train.global_batch=1536"),
                        "Gemma 2 27B as above, 2 rows per data-parallel group"),
    "7b_fsdp": ("configs/gemma_7b_v5e_fsdp.py", (), "7B, one v5e-256 pod: fsdp 256"),
    "7b": ("configs/gemma_7b_v5e.py", (), "7B, one v5e-256 pod: fsdp 128 x tensor 2"),
    "g3_1b_512": ("configs/gemma3_1b_v5e_512.py", (),
                  "Gemma 3 1B, 2 pods: per pod fsdp 16 x sequence 16, data 2 over DCN"),
    "sft_7b_v5e8": ("configs/sft_gemma_7b_v5e.py", ("--topology=v5e:2x4",),
                    "7B full SFT, v5e-8: fsdp 8, bfloat16 Adam moments"),
    "lora_sft_7b_v5e8": ("configs/sft_lora_gemma_7b_v5e8.py", ("--topology=v5e:2x4",),
                         "7B LoRA SFT (rank 16, all seven projections), v5e-8: fsdp 4 x tensor 2"),
    "g2_2b_distill": ("configs/gemma2_2b_distill_v5e.py", (),
                      "Gemma 2 2B distilled from 9B, 2 v5e pods: per pod fsdp 256, data 2 over "
                      "DCN"),
    # The Gemma 3 report's 4B and 12B layouts span 8 and 3 slices; one slice's program is the
    # same for any number of slices, so 2 of them show the memory and the cross-slice sends.
    "g3_4b_2048": ("configs/gemma3_4b_v5e_2048.py",
                   ("--num_slices=2", "--config.mesh.dcn_data=2",
                    "--config.train.global_batch=128"),
                   "Gemma 3 4B, 2 of its 8 pods: per pod fsdp 64 x sequence 4, data over DCN"),
    "g3_4b_report": ("configs/gemma3_4b_v5e_2048.py",
                     ("--num_slices=2", "--config.mesh.dcn_data=2",
                      "--config.train.global_batch=128", "--config.mesh.ici_fsdp=16",
                      "--config.mesh.ici_sequence=16"),
                     "Gemma 3 4B, 2 pods: per pod fsdp 16 x sequence 16 (the report's)"),
    # The 4B with its float32 state split over fsdp x sequence (docs/parallelism.md).
    "g3_4b_2048_sos": ("configs/gemma3_4b_v5e_2048.py",
                       ("--num_slices=2", "--config.mesh.dcn_data=2",
                        "--config.train.global_batch=128", "--config.mesh.ici_fsdp=16",
                        "--config.mesh.ici_sequence=16",
                        "--config.mesh.shard_state_over_sequence=true"),
                       "Gemma 3 4B, the report's, the state split over fsdp x sequence"),
    "g3_12b_v4": ("configs/gemma3_12b_v4_6144.py",
                  ("--topology=v4:8x16x16", "--num_slices=2", "--config.mesh.dcn_data=2",
                   "--config.train.global_batch=256"),
                  "Gemma 3 12B, 2 of its 3 v4 8x16x16 slices: per slice data 8 x fsdp 16 x "
                  "sequence 16, data over DCN"),
    "g3_27b_v5p": ("configs/gemma3_27b_v5p_6144.py", ("--topology=v5p:8x24x32",),
                   "Gemma 3 27B, v5p 8x24x32: data 32 x fsdp 24 x sequence 8"),
}

# Other layouts of the same model, chips and batch, compiled to rank the layouts (docs/aot.md,
# "Which layout is fastest"); they appear in that table only.
ALTERNATIVES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "alt_7b_fsdp128_tensor2": ("configs/gemma_7b_v5e_fsdp.py",
                               ("--config.mesh.ici_fsdp=128", "--config.mesh.ici_tensor=2"),
                               "7B, one pod: fsdp 128 x tensor 2"),
    "alt_7b_fsdp64_tensor4": ("configs/gemma_7b_v5e_fsdp.py",
                              ("--config.mesh.ici_fsdp=64", "--config.mesh.ici_tensor=4"),
                              "7B, one pod: fsdp 64 x tensor 4"),
    "alt_7b_fsdp_512": ("configs/gemma_7b_v5e_fsdp.py", ("--config.train.global_batch=512",),
                        "7B, one pod: fsdp 256"),
    "alt_7b_fsdp128_tensor2_512": ("configs/gemma_7b_v5e_fsdp.py",
                                   ("--config.train.global_batch=512", "--config.mesh.ici_fsdp=128",
                                    "--config.mesh.ici_tensor=2"),
                                   "7B, one pod: fsdp 128 x tensor 2"),
    "alt_7b_fsdp64_tensor4_512": ("configs/gemma_7b_v5e_fsdp.py",
                                  ("--config.train.global_batch=512", "--config.mesh.ici_fsdp=64",
                                   "--config.mesh.ici_tensor=4"),
                                  "7B, one pod: fsdp 64 x tensor 4"),
    "alt_7b_fsdp_768": ("configs/gemma_7b_v5e_fsdp.py", ("--config.train.global_batch=768",),
                        "7B, one pod: fsdp 256"),
    "alt_7b_fsdp64_tensor4_768": ("configs/gemma_7b_v5e_fsdp.py",
                                  ("--config.train.global_batch=768", "--config.mesh.ici_fsdp=64",
                                   "--config.mesh.ici_tensor=4"),
                                  "7B, one pod: fsdp 64 x tensor 4"),
    "alt_2b_1024": ("configs/gemma_2b_v5e_1pod.py", ("--config.train.global_batch=1024",),
                    "2B, one pod: fsdp 256"),
    "alt_2b_fsdp128_tensor2_1024": ("configs/gemma_2b_v5e_1pod.py",
                                    ("--config.train.global_batch=1024",
                                     "--config.mesh.ici_fsdp=128", "--config.mesh.ici_tensor=2"),
                                    "2B, one pod: fsdp 128 x tensor 2"),
    "alt_7b_1pod_1024": ("configs/gemma_7b_v5e_1pod.py", ("--config.train.global_batch=1024",),
                         "7B, one pod: tensor 16 x fsdp 16 (the report's)"),
    "alt_2b_fsdp128_tensor2": ("configs/gemma_2b_v5e_1pod.py",
                               ("--config.mesh.ici_fsdp=128", "--config.mesh.ici_tensor=2"),
                               "2B, one pod: fsdp 128 x tensor 2"),
    "alt_g3_1b_fsdp64_seq4": ("configs/gemma3_1b_v5e_512.py",
                              ("--config.mesh.ici_fsdp=64", "--config.mesh.ici_sequence=4"),
                              "Gemma 3 1B, 2 pods: per pod fsdp 64 x sequence 4"),
    "alt_g3_12b_data4_fsdp32": ("configs/gemma3_12b_v4_6144.py",
                                ("--topology=v4:8x16x16", "--num_slices=2",
                                 "--config.mesh.dcn_data=2", "--config.train.global_batch=256",
                                 "--config.mesh.ici_data=4", "--config.mesh.ici_fsdp=32"),
                                "Gemma 3 12B, 2 slices: per slice data 4 x fsdp 32 x sequence 16"),
    "alt_g3_27b_data8_seq32": ("configs/gemma3_27b_v5p_6144.py",
                               ("--topology=v5p:8x24x32", "--config.mesh.ici_data=8",
                                "--config.mesh.ici_sequence=32"),
                               "Gemma 3 27B, v5p 8x24x32: data 8 x fsdp 24 x sequence 32"),
    "alt_g2_9b_seq4": ("configs/gemma2_9b_v4_8x16x32.py",
                       ("--topology=v4:8x16x32", "--config.mesh.ici_tensor=1",
                        "--config.mesh.ici_sequence=4"),
                       "Gemma 2 9B, v4 8x16x32: data 2 x fsdp 512 x sequence 4"),
    "alt_g2_27b_seq8": ("configs/gemma2_27b_v5p_8x24x32.py",
                        ("--topology=v5p:8x24x32", "--config.mesh.ici_tensor=1",
                         "--config.mesh.ici_sequence=8"),
                        "Gemma 2 27B, v5p 8x24x32: fsdp 768 x sequence 8"),
}

def _tiles(tile: int, fused: bool = False) -> tuple[str, ...]:
  """Flags setting every splash tile to `tile` (the dq tiles 0 with the fused backward)."""
  return tuple(f"--config.model.splash_{b}={0 if fused and b.endswith('_dq') else tile}"
               for b in SPLASH_BLOCKS) + (f"--config.model.splash_fused_bwd={fused}",)


# The splash tiles of the configs closest to the HBM limit (every tile 512, separate dq kernel)
# against other choices; docs/aot.md, "Splash tiles".
for _model, _config, _base in (("7b_fsdp", "configs/gemma_7b_v5e_fsdp.py", "7B, fsdp 256"),
                               ("2b_1pod", "configs/gemma_2b_v5e_1pod.py", "2B, fsdp 256")):
  for _tile, _fused in ((256, False), (1024, False), (512, True)):
    ALTERNATIVES[f"tiles_{_model}_{_tile}{'_fused' if _fused else ''}"] = (
        _config, _tiles(_tile, _fused),
        f"{_base}: every tile {_tile}" + (", fused backward" if _fused else ""))
TILES = {"7B, one v5e-256 pod, fsdp 256, 1024 x 8192": (
             "7b_fsdp", *(n for n in ALTERNATIVES if n.startswith("tiles_7b_fsdp"))),
         "2B, one v5e-256 pod, fsdp 256, 2048 x 8192": (
             "2b_1pod", *(n for n in ALTERNATIVES if n.startswith("tiles_2b_1pod")))}
ROWS.update(ALTERNATIVES)

# model -> the rows that train it on the same chips with the same tokens per step.
COMPARED: dict[str, tuple[str, ...]] = {
    "Gemma 1 7B, one v5e-256 pod, 1024 x 8192": (
        "7b_fsdp", "alt_7b_fsdp128_tensor2", "alt_7b_fsdp64_tensor4", "alt_7b_1pod_1024"),
    "Gemma 1 7B, one v5e-256 pod, 768 x 8192": (
        "alt_7b_fsdp_768", "7b", "alt_7b_fsdp64_tensor4_768"),
    "Gemma 1 7B, one v5e-256 pod, 512 x 8192": (
        "7b_1pod", "alt_7b_fsdp_512", "alt_7b_fsdp128_tensor2_512", "alt_7b_fsdp64_tensor4_512"),
    "Gemma 1 2B, one v5e-256 pod, 2048 x 8192": ("2b_1pod", "alt_2b_fsdp128_tensor2"),
    "Gemma 1 2B, one v5e-256 pod, 1024 x 8192": ("alt_2b_1024", "alt_2b_fsdp128_tensor2_1024"),
    "Gemma 2 9B, v4 8x16x32, 1024 x 8192": ("g2_9b_v4", "alt_g2_9b_seq4"),
    "Gemma 2 27B, v5p 8x24x32, 768 x 8192": ("g2_27b_v5p", "alt_g2_27b_seq8"),
    "Gemma 3 1B, 2 v5e pods, 128 x 32768": ("g3_1b_512", "alt_g3_1b_fsdp64_seq4"),
    "Gemma 3 12B, 2 v4 8x16x16 slices, 256 x 32768": ("g3_12b_v4", "alt_g3_12b_data4_fsdp32"),
    "Gemma 3 27B, v5p 8x24x32, 768 x 32768": ("g3_27b_v5p", "alt_g3_27b_data8_seq32"),
    "Gemma 3 4B, 2 v5e pods, 128 x 32768": (
        "g3_4b_2048", "g3_4b_report", "g3_4b_2048_sos"),
}


def run_row(name: str, timeout: int) -> dict:
  """One compile in its own process; the report, or the one-line refusal."""
  config, extra, what = ROWS[name]
  with tempfile.TemporaryDirectory() as tmp:
    out = Path(tmp) / "report.json"
    HLO_DIR.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "maxgemma.aot", f"--config={config}", *extra,
           f"--hlo_out={HLO_DIR / name}.hlo.txt", f"--json_out={out}"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    wall = time.perf_counter() - t0
    row = {"name": name, "what": what, "command": " ".join(["python", *cmd[1:-2]]),
           "wall_s": round(wall, 1)}
    if p.returncode == 0:
      row.update(json.loads(out.read_text()), ok=True)
    else:
      lines = p.stderr.strip().splitlines()
      row.update(ok=False, error=lines[-1] if lines else f"exit {p.returncode}")
  print(f"{name}: {'ok' if row['ok'] else row['error']} ({wall:.0f} s)", flush=True)
  return row


def imported_row(name: str, report: dict) -> dict:
  """The row of a report compiled outside this script with the row's own flags."""
  config, extra, what = ROWS[name]
  cmd = ["python", "-m", "maxgemma.aot", f"--config={config}", *extra]
  batch = next((int(a.split("=", 1)[1]) for a in extra if a.startswith(
      "--config.train.global_batch=")), report["global_batch"])
  if report["global_batch"] != batch:
    raise SystemExit(f"{name}: the report's global batch {report['global_batch']} is not the "
                     f"row's {batch}")
  return {"name": name, "what": what, "command": " ".join(cmd),
          "wall_s": round(report["lower_s"] + report["compile_s"], 1), **report, "ok": True}


def _dcn(r: dict) -> str:
  """A row's cross-slice bytes per chip per step ("-" on one slice)."""
  return f"{r['dcn_allreduce_bytes_per_chip'] / 2**20:.0f} MiB" if r["num_slices"] > 1 else "-"


def table(rows: list[dict]) -> str:
  """The markdown table of the rows."""
  head = ("| layout | chips | global batch (tokens) | peak / chip (of usable HBM) "
          "| arguments / chip | temporaries / chip | model TFLOPs / step | roofline step "
          "| step at 50% MFU | ICI bytes / chip / step | DCN bytes / chip / step "
          "| step bounds: compute / ICI / DCN | tokens / s / chip at the bounds: overlapped "
          "/ serial | compile (trace + TPU compile) |")
  lines = [head, "|---|" + "---:|" * 13]
  g = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
  for r in rows:
    if not r.get("ok"):
      lines.append(f"| {r['what']} | | | does not fit: {r['error']} | | | | | | | | | | |")
      continue
    m = r["memory"]
    dcn = _dcn(r)
    # ICI bytes and the bounds (maxgemma.hlo.ici_collectives) are in the reports compiled since
    # they were added; older rows show "-" until recompiled.
    ici = f"{r['ici_bytes_per_chip'] / 2**30:.1f} GiB" if "ici_bytes_per_chip" in r else "-"
    b = r.get("step_bounds_s")
    bounds = rate = "-"
    if b:
      per_chip = r["tokens_per_step"] / r["chips"]
      rate = f"{per_chip / b['overlapped']:,.0f} / {per_chip / b['serial']:,.0f}"
      dcn_s = f"{b['dcn']:.2f} s" if r["num_slices"] > 1 else "-"
      if r["num_slices"] > 1 and not b["dcn"] and r["dcn_allreduce_bytes_per_chip"]:
        dcn_s = "no DCN figure"  # maxgemma.hardware has none for this chip (v4)
      bounds = f"{b['compute']:.2f} s / {b['ici']:.2f} s / {dcn_s}"
    lines.append(
        f"| {r['what']} | {r['chips']} | {r['global_batch']} x {r['seq_len']} "
        f"({r['tokens_per_step'] / 1e6:.2f}M) | {m['peak_bytes'] / 2**30:.2f} of "
        f"{g(m['usable_hbm_bytes'])} {r['chip']} | {g(m['argument_bytes'])} "
        f"| {g(m['temp_bytes'])} | {r['model_flops_per_step'] / 1e12:,.0f} "
        f"| {r['roofline_step_s']:.2f} s | {r['step_s_at_target_mfu']:.2f} s | {ici} | {dcn} "
        f"| {bounds} | {rate} | {r['lower_s']:.0f} + {r['compile_s']:.0f} s |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", default=",".join(ROWS), help=f"some of {', '.join(ROWS)}")
  parser.add_argument("--keep", action="store_true", help="keep the other rows of the JSON")
  parser.add_argument("--timeout", type=int, default=1800, help="seconds per compile")
  parser.add_argument("--render", action="store_true",
                      help="compile nothing: rewrite docs/aot.md's table from the JSON")
  parser.add_argument("--import_report", action="append", default=[], metavar="NAME=FILE",
                      help="compile nothing for NAME: take the report `maxgemma.aot --json_out` "
                           "wrote (run with the row's flags) and keep the other rows")
  args = parser.parse_args()
  if args.render:
    write_doc(json.loads(RESULTS.read_text()))
    return
  if args.import_report:
    result = json.loads(RESULTS.read_text())
    old = {r["name"]: r for r in result["rows"]}
    for item in args.import_report:
      name, _, path = item.partition("=")
      if name not in ROWS:
        parser.error(f"unknown row {name!r}; known: {', '.join(ROWS)}")
      old[name] = imported_row(name, json.loads(Path(path).read_text()))
    result["rows"] = [old[n] for n in ROWS if n in old]
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    write_doc(result)
    return
  names = [n for n in args.rows.split(",") if n]
  unknown = set(names) - set(ROWS)
  if unknown:
    parser.error(f"unknown rows {sorted(unknown)}; known: {', '.join(ROWS)}")
  old = {}
  if args.keep and RESULTS.exists():
    old = {r["name"]: r for r in json.loads(RESULTS.read_text())["rows"]}
  for name in names:
    old[name] = run_row(name, args.timeout)
  rows = [old[n] for n in ROWS if n in old]
  result = {
      "date": datetime.date.today().isoformat(),
      "jax": metadata.version("jax"), "libtpu": metadata.version("libtpu"),
      "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
      "note": "compile on this CPU-only machine with libtpu; nothing runs on a TPU",
      "rows": rows,
  }
  RESULTS.parent.mkdir(parents=True, exist_ok=True)
  RESULTS.write_text(json.dumps(result, indent=2) + "\n")
  write_doc(result)


def best_of(rows: list[dict]) -> str | None:
  """The row with the most tokens/s per chip at the overlapped bound (to 3 significant figures:
  layouts bound by the same compute tie), then at the serial bound; None if none compiled."""
  done = [r for r in rows if r.get("ok") and r.get("step_bounds_s")]
  if not done:
    return None
  rate = lambda r, k: r["tokens_per_step"] / r["chips"] / r["step_bounds_s"][k]  # noqa: E731
  return max(done, key=lambda r: (float(f"{rate(r, 'overlapped'):.3g}"), rate(r, "serial")))[
      "name"]


def refusal(error: str) -> str:
  """The TPU compiler's refusal in a few words (the HBM it wanted), or the error's last words."""
  used = re.search(r"Used ([\d.]+G) of ([\d.]+G) hbm", error)
  temps = re.search(r"HLO temporaries \(([\d.]+G)\)", error)
  if "memory space vmem" in error:
    kernel = re.search(r"allocating on stack for %(\w+)", error)
    return "refused: out of VMEM" + (f" in {kernel[1]}" if kernel else "")
  if used:
    return f"refused: used {used[1]} of {used[2]}"
  if temps:
    return f"refused: {temps[1]} of temporaries"
  return error[-120:]


def comparison(rows: list[dict]) -> str:
  """The markdown table of COMPARED: each model's layouts, the best in bold."""
  by_name = {r["name"]: r for r in rows}
  lines = ["| model, chips, batch | layout | peak / chip | ICI / chip / step | DCN / chip / step "
           "| step bounds: compute / ICI / DCN | tokens / s / chip: overlapped / serial |",
           "|---|---|---:|---:|---:|---:|---:|"]
  for model, names in COMPARED.items():
    group = [by_name[n] for n in names if n in by_name]
    best = best_of(group)
    for i, r in enumerate(group):
      label = model if i == 0 else ""
      if not r.get("ok"):
        lines.append(f"| {label} | {r['what']} | {refusal(r['error'])} | | | | |")
        continue
      b, per_chip = r["step_bounds_s"], r["tokens_per_step"] / r["chips"]
      dcn = _dcn(r)
      what = f"**{r['what']}** (best)" if r["name"] == best else r["what"]
      lines.append(
          f"| {label} | {what} | {r['memory']['peak_bytes'] / 2**30:.2f} GiB "
          f"| {r['ici_bytes_per_chip'] / 2**30:.1f} GiB | {dcn} | {b['compute']:.2f} / "
          f"{b['ici']:.2f} / {b['dcn']:.2f} s | {per_chip / b['overlapped']:,.0f} / "
          f"{per_chip / b['serial']:,.0f} |")
  return "\n".join(lines)


def tiles_table(rows: list[dict]) -> str:
  """The markdown table of TILES: each config's peak per chip under other splash tiles."""
  by_name = {r["name"]: r for r in rows}
  lines = ["| config, batch | splash tiles | peak / chip | temporaries / chip |",
           "|---|---|---:|---:|"]
  for model, names in TILES.items():
    for i, name in enumerate(n for n in names if n in by_name):
      r = by_name[name]
      what = r["what"].split(": ", 1)[1] if name.startswith("tiles_") else (
          "every tile 512 (the config)")
      if not r.get("ok"):
        lines.append(f"| {model if i == 0 else ''} | {what} | {refusal(r['error'])} | |")
        continue
      m = r["memory"]
      lines.append(f"| {model if i == 0 else ''} | {what} | {m['peak_bytes'] / 2**30:.2f} GiB "
                   f"| {m['temp_bytes'] / 2**30:.2f} GiB |")
  return "\n".join(lines)


def _put(text: str, start: str, end: str, body: str) -> str:
  before, rest = text.split(start, 1)
  return before + start + body + end + rest.split(end, 1)[1]


def write_doc(result: dict) -> None:
  """Prints the tables and puts them between their markers in docs/aot.md."""
  main_rows = [r for r in result["rows"] if r["name"] not in ALTERNATIVES]
  md, ranked = table(main_rows), comparison(result["rows"])
  print(md, ranked, sep="\n\n")
  if DOC.exists() and START in DOC.read_text():
    text = DOC.read_text()
    stamp = (f"\n_Compiled {result['date']} with jax {result['jax']}, libtpu {result['libtpu']} "
             f"on {result['machine']}._\n\n")
    text = _put(text, START, END, stamp + md + "\n")
    if COMPARE_START in text:
      text = _put(text, COMPARE_START, COMPARE_END, "\n" + ranked + "\n")
    if TILES_START in text:
      text = _put(text, TILES_START, TILES_END, "\n" + tiles_table(result["rows"]) + "\n")
    DOC.write_text(text)


if __name__ == "__main__":
  main()
