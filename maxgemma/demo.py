"""`make demo`: train a small Gemma on CPU, resume it, export it and sample from it.

Runs the real command-line tools one after another, on 8 fake CPU devices (data 4 x tensor 2):
  1. maxgemma.train   --config=configs/demo.py   (stops at RESUME_AT with an async checkpoint)
  2. maxgemma.train   again: resumes from that checkpoint and finishes
  3. maxgemma.export  --format=hf                (safetensors + config.json + tokenizer)
  4. maxgemma.sample  a continuation of a prompt
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

from maxgemma.distributed import with_cpu_devices

WORKDIR = os.environ.get("MAXGEMMA_DEMO_DIR", "runs/demo")
CONFIG = "configs/demo.py"
RESUME_AT = 60  # of configs/demo.py's train.steps
PROMPT = "The module provides functions to"
MIN_DROP = 1.5  # nats the loss must fall by for the demo to count as trained


def _env() -> dict[str, str]:
  """The trainer's environment: this one with 8 fake CPU devices (other XLA flags kept)."""
  env = dict(os.environ)
  env.update(XLA_FLAGS=with_cpu_devices(env.get("XLA_FLAGS", ""), 8), JAX_PLATFORMS="cpu",
             TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
  return env


def _run(title: str, args: list[str], progress_total: int | None = None) -> None:
  """Runs `python -m ...args`, showing a one-line progress display for training steps."""
  print(f"\n== {title}\n   $ python -m {shlex.join(args)}", flush=True)
  start = time.time()
  proc = subprocess.Popen([sys.executable, "-m", *args], env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  tail: list[str] = []
  for line in proc.stdout:
    tail = (tail + [line])[-40:]
    m = re.match(r"step (\d+) \|.*?\| loss ([\d.]+) \|.*\| tokens_per_sec ([\d.e+]+)", line)
    if progress_total and m:
      step, loss, tps = int(m[1]), float(m[2]), float(m[3])
      done = step / progress_total
      bar = "#" * int(30 * done)
      print(f"\r   [{bar:<30}] step {step}/{progress_total} loss {loss:.3f} "
            f"{tps:,.0f} tok/s  {time.time() - start:.0f}s", end="", flush=True)
    elif line.startswith("step") and "eval_loss" in line:
      print(f"\n   {line.strip()}", flush=True)
    elif not progress_total and not re.match(r"^[IWE]\d{4} ", line):
      print("   " + line, end="", flush=True)
  if proc.wait() != 0:
    sys.exit(f"\n{title} failed (exit {proc.returncode}); its last output:\n{''.join(tail)}")
  print(f"\n   done in {time.time() - start:.0f}s", flush=True)


def _losses() -> list[float]:
  with open(os.path.join(WORKDIR, "metrics.jsonl")) as f:
    return [r["loss"] for r in map(json.loads, f) if "loss" in r]


def main() -> None:
  shutil.rmtree(WORKDIR, ignore_errors=True)
  train = ["maxgemma.train", f"--config={CONFIG}", f"--workdir={WORKDIR}"]
  _run(f"train to step {RESUME_AT}, checkpointing asynchronously",
       train + [f"--config.train.steps={RESUME_AT}"], progress_total=RESUME_AT)
  from configs.demo import get_config
  total = get_config().train.steps
  _run(f"resume from the step-{RESUME_AT} checkpoint and train to step {total}", train,
       progress_total=total)
  losses = _losses()
  first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
  print(f"\n== loss fell from {first:.2f} to {last:.2f} (mean of the first and last 5 steps)")
  if first - last < MIN_DROP:
    sys.exit(f"the loss fell by only {first - last:.2f} nats (expected >= {MIN_DROP})")
  hf_dir = os.path.join(WORKDIR, "export_hf")
  _run("export to Hugging Face safetensors",
       ["maxgemma.export", f"--workdir={WORKDIR}", "--format=hf", f"--out={hf_dir}"])
  _run("sample a continuation (KV-cache decoding)",
       ["maxgemma.sample", f"--workdir={WORKDIR}", f"--prompt={PROMPT}", "--max_new_tokens=40",
        "--temperature=0.7", "--top_k=40", "--seed=0"])
  print(f"\nTensorBoard logs: {os.path.abspath(os.path.join(WORKDIR, 'tensorboard'))}\n"
        f"  view them with: tensorboard --logdir {os.path.join(WORKDIR, 'tensorboard')}\n"
        f"Checkpoints: {os.path.abspath(os.path.join(WORKDIR, 'checkpoints'))}\n"
        f"Hugging Face export: {os.path.abspath(hf_dir)}")


if __name__ == "__main__":
  main()
