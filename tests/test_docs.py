"""Every command in README.md and docs/*.md is run, or marked with the reason it cannot be.

The convention for fenced code blocks in the docs:

- ```bash (or sh, shell): commands the reader types. Lines ending in `\\` continue on the next
  line, `# comments` are dropped, a leading `$ ` prompt is allowed. Each command is run.
- ```console: `$ command` lines, each followed by the output it prints. The command is run and
  its output (stdout and stderr) must be the documented lines: a line `...` stands for any number
  of lines, and `vary` regexes (below) mark the parts that differ from run to run.
- ```text (output, diagrams, usage synopses), ```toml, ```python, ```json: never run. A text
  block with a line that starts like a command (`python -m`, `make`, `gcloud` ...) must be marked
  `synopsis`, so commands cannot hide in a non-shell block. Untagged blocks are refused.

Markers are HTML comments (invisible on the rendered page) right before a block:
`<!-- docs-test: key=value ... -->`, values with spaces in quotes; several may be stacked.

- `skip="reason"`: not run here, and why (a real TPU, a GPU, weights that cannot be made here).
- `covered-by=docs/x.md`: the identical command is shown (and so run) in that doc.
- `match="text"`: the marker applies only to the block's commands containing `text`.
- `env=name[,name]`: set-up hooks run once per doc before the block (`SETUPS` below: a fake
  `gcloud`, placeholder inputs such as `tokenizer.model` or `/models/gemma-2-2b` made with the
  project's own tools). A new kind of environment (a local GCS emulator, say) is one more entry.
- `vary=REGEX`: console output: a documented span matching REGEX may differ in the output, which
  must match REGEX there.
- `synopsis`: a non-shell block whose command-like lines are a usage synopsis, not a command.

Each doc is one test, `test_doc_commands[docs/x.md]`, and one session: a scratch copy of the
repository as the working directory (a link to the real .venv; `.venv/bin` first on PATH), its
commands one after another as in one terminal (exported variables and `cd` carry on), with
`/tmp/...`, `/data/...` and `/models/...` paths moved under the session's temporary directory
(`REWRITES`, the only change made to a command's text). Exit code 0 is required, and `CHECKS`
assert something cheap about each result; the first failure stops the doc. A doc whose commands
start jax is `slow` (`make test` runs it, `make test-fast` does not); docs/tpu.md, all
`launch.tpu` against the fake gcloud, is not. `test_marked_command` lists what is not run, why.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import pytest

from tests import docs_utils, gcs_utils
from tests.docs_utils import REPO, Command, Result, Session
from tests.fake_gcloud import ALL_GOOD, Fake
from tests.xla_env import FAST_COMPILE

COMMANDS = docs_utils.all_commands()
TIMEOUT_S = 600
GCS_BUCKET = "my-bucket"  # the bucket the docs name

# Doc sessions compile at LLVM -O0 like the rest of the suite (tests/xla_env.py): their runs are
# short, so compiling dominates. These keep XLA's default optimisation, as test_demo does: their
# long runs gain more from optimised code than they spend compiling it (docs/performance.md).
OPTIMISED_DOCS = {"docs/distillation.md"}

# Commands that do not start jax: fast enough for `make test-fast`.
FAST = re.compile(r"^python -m launch\.tpu ")

# The only rewrites applied to a documented command before it runs.
REWRITES: list[tuple[re.Pattern, str, str]] = [
    (re.compile(r"(?<![\w.:/-])/(tmp|data|models)/"), "{fs}/\\1/",
     "absolute scratch and placeholder paths go under the session's temporary directory"),
]


# Documented commands that fail because of a bug in the code, reported and not fixed here: the
# test expects exactly that failure (its message in the output) and fails once the bug is fixed,
# so that the entry is removed.
# Entries: (regex on the command, message its failure prints, reason).
KNOWN_BUGS: list[tuple[re.Pattern, str, str]] = []


def known_bug(text: str, r: Result) -> str:
  """The reason when `text` failed as a KNOWN_BUGS entry says, else ''; fails when such a
  command succeeded (the bug is gone: remove the entry)."""
  for pattern, message, reason in KNOWN_BUGS:
    if pattern.search(text):
      if r.returncode != 0 and message in r.output:
        return reason
      if r.returncode == 0:
        pytest.fail(f"`{text}` no longer fails ({reason}): remove its KNOWN_BUGS entry")
  return ""


def rewrite(text: str, s: Session) -> str:
  for pattern, replacement, _ in REWRITES:
    text = pattern.sub(replacement.format(fs=s.fs), text)
  return text


# ---------------------------------------------------------------------------- set-up hooks

def run_python(s: Session, *args: str, timeout: float = TIMEOUT_S, optimised: bool = False
               ) -> str:
  """`python ARGS` in the session (for set-ups: not a documented command); `optimised`: with
  XLA's default optimisation whatever the session's XLA_FLAGS."""
  env = {k: v for k, v in s.env.items() if not (optimised and k == "XLA_FLAGS")}
  proc = subprocess.run([sys.executable, *args], cwd=s.cwd, env=env, capture_output=True,
                        text=True, timeout=timeout)
  assert proc.returncode == 0, f"set-up command failed: python {shlex.join(args)}\n" + (
      proc.stdout + proc.stderr)[-4000:]
  return proc.stdout


def tpu_settings() -> dict[str, str]:
  """docs/tpu.md's settings files: each ```toml block, named by its first line `# NAME`."""
  out = {}
  for block in docs_utils.parse_doc("docs/tpu.md"):
    if block.tag == "toml" and block.body and block.body[0].startswith("# "):
      out[block.body[0].removeprefix("# ").strip()] = "\n".join(block.body) + "\n"
  assert {"pod.toml", "pods16.toml"} <= set(out), out.keys()
  return out


def setup_gcloud(s: Session) -> None:
  """A fake gcloud first on PATH (TPUs READY, queued resources ACTIVE, every call succeeds);
  docs/tpu.md's settings files in the working directory, `my_pod.toml` (quickstart) = pod.toml."""
  fake = Fake(s.root / "gcloud")
  fake.rules(ALL_GOOD)
  s.env.update(fake.env(s.env["PATH"]))
  s.data["gcloud"] = fake
  settings = tpu_settings()
  settings["my_pod.toml"] = settings["pod.toml"]
  for name, text in settings.items():
    (s.cwd / name).write_text(text)


def setup_corpus(s: Session) -> None:
  """`corpus/*.jsonl` (the packaged corpus) and `tokenizer.model` (the packaged tokenizer)."""
  assets = s.cwd / "maxgemma" / "data" / "assets"
  (s.cwd / "corpus").mkdir()
  shutil.copy(assets / "corpus.jsonl", s.cwd / "corpus" / "docstrings.jsonl")
  shutil.copy(assets / "tokenizer.model", s.cwd / "tokenizer.model")


def setup_chats(s: Session) -> None:
  """`chats/*.jsonl`: conversations in the format docs/data.md shows."""
  (s.cwd / "chats").mkdir()
  with open(s.cwd / "chats" / "arithmetic.jsonl", "w") as f:
    for a in range(20):
      messages = [{"role": "user", "content": f"{a}+{a}?"},
                  {"role": "assistant", "content": str(2 * a)}]
      f.write(json.dumps({"messages": messages}) + "\n")


def setup_demo_run(s: Session) -> None:
  """`runs/demo` as `make demo` leaves it (checkpoints at steps 60 and 120), from a short
  configs/tiny.py run instead of the demo's minutes of training (120 steps: optimised code)."""
  run_python(s, "-m", "maxgemma.train", "--config=configs/tiny.py",
             f"--workdir={s.cwd / 'runs' / 'demo'}", "--config.train.steps=120",
             "--config.checkpoint.every=60", optimised=True)


def setup_models(s: Session) -> None:
  """Placeholder downloads made from `runs/demo` with maxgemma.export: `/models/gemma-2-2b`
  (a Hugging Face directory) and `/models/gemma-2b.Q4_K_M.gguf`."""
  if "demo-run" not in s.setups_done:
    apply_setups(s, ["demo-run"])
  workdir = str(s.cwd / "runs" / "demo")
  run_python(s, "-m", "maxgemma.export", f"--workdir={workdir}", "--format=hf",
             f"--out={s.fs / 'models' / 'gemma-2-2b'}")
  run_python(s, "-m", "maxgemma.export", f"--workdir={workdir}", "--format=gguf",
             "--dtype=q8_0", f"--out={s.fs / 'models' / 'gemma-2b.Q4_K_M.gguf'}")


def setup_tiny_hf(s: Session) -> None:
  """`/models/tiny-gemma2-hf`: a Hugging Face directory of a tiny Gemma 2 with random weights
  (vocabulary 2048, the packaged tokenizer), written by maxgemma.export as tests/test_sft.py
  makes one."""
  run_python(s, "-c", (
      "from tests.convert_utils import make_workdir; from maxgemma.export import export; "
      f"w, _, _ = make_workdir({str(s.root / 'tiny-hf')!r}, 'tiny_gemma2'); "
      f"export(w, 'hf', {str(s.fs / 'models' / 'tiny-gemma2-hf')!r})"))


def setup_gcs(s: Session) -> None:
  """A local Cloud Storage server (tests/gcs_utils.py) holding `gs://my-bucket` with what
  docs/storage.md's (skipped) `gcloud storage` commands put there: a prepared dataset at
  `data/prepared` and its tokenizer at `data/tokenizer.model`. Stopped when the tests end."""
  with mock.patch.dict(os.environ):  # the server's variables go to the session, not this process
    s.env.update(s.stack.enter_context(gcs_utils.emulator(GCS_BUCKET)))
  s.env["MAXGEMMA_CACHE"] = str(s.root / "cache")
  run_python(s, "-c", (
      "from maxgemma import storage; from maxgemma.data import sources; "
      f"storage.upload_tree(sources.demo_dir(), 'gs://{GCS_BUCKET}/data/prepared'); "
      f"storage.path('gs://{GCS_BUCKET}/data/tokenizer.model').write_bytes("
      "open(sources.demo_dir() + '/tokenizer.model', 'rb').read())"))


SETUPS: dict[str, Callable[[Session], None]] = {
    "gcloud": setup_gcloud,
    "corpus": setup_corpus,
    "chats": setup_chats,
    "demo-run": setup_demo_run,
    "models": setup_models,
    "tiny-hf": setup_tiny_hf,
    "gcs": setup_gcs,
}


def apply_setups(s: Session, names: list[str]) -> None:
  for name in names:
    if name not in s.setups_done:
      SETUPS[name](s)
      s.setups_done.add(name)


# ---------------------------------------------------------------------------- result checks

def flag(args: list[str], name: str, default: str | None = None) -> str | None:
  """The value of `--name=value` (the last one) in argv."""
  values = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
  return values[-1] if values else default


def path_in(s: Session, p: str) -> Path:
  return Path(p) if Path(p).is_absolute() else s.cwd / p


def check_train(s: Session, args: list[str], r: Result) -> None:
  """The run reached its last step (the one asked for, if given) and checkpointed it."""
  finished = re.findall(r"finished: \{'step': (\d+)", r.output)
  assert finished, r.output[-3000:]
  steps = flag(args, "config.train.steps", finished[-1])
  assert finished[-1] == steps
  workdir = flag(args, "workdir")
  if "://" not in workdir:
    assert (path_in(s, workdir) / "checkpoints" / steps).is_dir()


def check_local(s: Session, args: list[str], r: Result) -> None:
  processes = flag(args, "processes")
  assert f"all {processes} processes finished OK" in r.output
  workdir = flag(args, "workdir")
  if workdir:  # process 0's output carries no absl lines: read what the run left
    steps = json.loads((path_in(s, workdir) / "config.json").read_text())["train"]["steps"]
    assert (path_in(s, workdir) / "checkpoints" / str(steps)).is_dir()


def check_export(s: Session, args: list[str], r: Result) -> None:
  out = path_in(s, flag(args, "out"))
  fmt = flag(args, "format")
  if fmt == "hf":
    assert (out / "config.json").exists() and list(out.glob("*.safetensors"))
  elif fmt == "gguf":
    assert out.read_bytes()[:4] == b"GGUF" and struct.unpack("<I", out.read_bytes()[4:8])[0] >= 3
  elif fmt == "peft":
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
  else:
    assert (out / "maxgemma_config.json").exists() and (out / "tokenizer.model").exists()


def check_import(s: Session, args: list[str], r: Result) -> None:
  workdir = path_in(s, flag(args, "workdir"))
  assert (workdir / "checkpoints" / flag(args, "step", "0") / "params").is_dir()
  assert f"imported {flag(args, 'path')}" in r.output


def check_sample(s: Session, args: list[str], r: Result) -> None:
  prompts = [a.split("=", 1)[1] for a in args if a.startswith("--prompt=")]
  for prompt in prompts:
    assert f"=== {prompt}" in r.output
  assert f"{len(prompts)} prompts, prefill" in r.output


def check_prepare(s: Session, args: list[str], r: Result) -> None:
  if flag(args, "output").startswith("gs://"):  # the bucket is the session's, not this process's
    assert f"prepare: wrote {flag(args, 'output')}: " in r.output
    return
  manifest = json.loads((path_in(s, flag(args, "output")) / "manifest.json").read_text())
  assert json.dumps(manifest).count("sha256") > 0 and manifest


def check_tokenizer(s: Session, args: list[str], r: Result) -> None:
  assert path_in(s, flag(args, "output")).stat().st_size > 0
  assert f"{flag(args, 'vocab_size')} pieces" in r.output


def check_compile(s: Session, args: list[str], r: Result) -> None:
  assert re.search(r"peak [\d.]+ GiB of 15\.75 GiB usable HBM", r.output), r.output[-2000:]


def check_tpu(s: Session, args: list[str], r: Result) -> None:
  """A dry run calls no gcloud; a real one makes the calls of its verb (on the fake)."""
  fake: Fake = s.data["gcloud"]
  calls = fake.calls()[s.data.pop("gcloud_calls_before"):]
  if "--dry_run" in args:
    assert calls == []
    return
  verb = args[3]
  wanted = {"create": " create ", "setup": "google_metadata_script_runner",
            "run": "worker.sh status"}.get(verb, "")
  assert any(wanted in " ".join(c) for c in calls), (verb, calls)


CHECKS: list[tuple[re.Pattern, Callable[[Session, list[str], Result], None]]] = [
    (re.compile(r"-m maxgemma\.train\b"), check_train),
    (re.compile(r"-m launch\.local\b"), check_local),
    (re.compile(r"-m maxgemma\.export\b"), check_export),
    (re.compile(r"-m maxgemma\.import_weights\b"), check_import),
    (re.compile(r"-m maxgemma\.sample\b"), check_sample),
    (re.compile(r"-m maxgemma\.data\.prepare\b"), check_prepare),
    (re.compile(r"-m maxgemma\.data\.train_tokenizer\b"), check_tokenizer),
    (re.compile(r"-m maxgemma\.aot\b"), check_compile),
    (re.compile(r"-m launch\.tpu\b"), check_tpu),
]


# ---------------------------------------------------------------------------- tests

def test_docs_follow_the_convention():
  """Every block is tagged, every marker valid and attached; `covered-by` names a doc where the
  identical command runs; nothing is left that is neither run nor marked."""
  by_doc: dict[str, list[Command]] = {}
  for c in COMMANDS:
    by_doc.setdefault(c.doc, []).append(c)
  for c in COMMANDS:
    assert not set(c.env) - set(SETUPS), f"{c.id}: unknown env {c.env} (known: {list(SETUPS)})"
    if c.covered_by:
      there = [o for o in by_doc.get(c.covered_by, []) if o.text == c.text]
      assert there, f"{c.id}: covered-by={c.covered_by}, which does not show `{c.text}`"
      assert not there[0].skip and not there[0].covered_by, f"{c.id}: not run in {c.covered_by}"
    if c.vary or c.expected is not None:
      assert c.expected is not None, f"{c.id}: vary= is for ```console blocks"
  assert len(COMMANDS) > 20 and all(c.doc in docs_utils.DOCS for c in COMMANDS)


def test_convention_is_enforced():
  """The parser refuses what would let a command escape the tests."""
  bad = {
      "```\npython -m maxgemma.train\n```\n": "untagged code block",
      "```text\npython -m maxgemma.train --config=x\n```\n": "with a command line",
      "<!-- docs-test: skpi=x -->\n```bash\nls\n```\n": "unknown docs-test key",
      "<!-- docs-test: skip=x -->\n\nprose\n```bash\nls\n```\n": "right before a fenced block",
      "<!-- docs-test: skip=x match=nothing -->\n```bash\nls\n```\n": "matches no command",
      "```console\noutput first\n$ ls\n```\n": "output before any",
  }
  for text, message in bad.items():
    with pytest.raises(docs_utils.DocError, match=message):
      docs_utils.parse_doc("x.md", text)
  (block,) = docs_utils.parse_doc("x.md", (
      "<!-- docs-test: skip='no TPU' match=gcloud -->\n```bash\n$ make a  # note\n"
      "python -m x --a='#1' \\\n    --b=2   # comment\n  # only a comment\ngcloud x\n```\n"))
  assert [(c.text, c.line, c.skip) for c in block.commands] == [
      ("make a", 3, ""), ("python -m x --a='#1' --b=2", 4, ""), ("gcloud x", 7, "no TPU")]


def test_output_matching():
  vary = [r"\d+\.\d+s", r"port \d+"]
  documented = ["start on port 123", "...", "done (2.5s)"]
  assert docs_utils.output_mismatch(documented, ["start on port 9", "x", "y", "done (10.0s)"],
                                    vary) == ""
  assert docs_utils.output_mismatch(documented, ["start on port 9", "done (1.0s)"], vary) == ""
  assert "line 3" in docs_utils.output_mismatch(documented, ["start on port 9", "done"], vary)
  assert docs_utils.output_mismatch(["a", "b"], ["a", "x", "b"], []) != ""
  assert docs_utils.output_mismatch(["a.b"], ["aXb"], []) != ""  # literal, not a regex


def runnable(doc: str) -> list[Command]:
  return [c for c in COMMANDS if c.doc == doc and not c.skip and not c.covered_by]


def run_command(s: Session, c: Command) -> str:
  """Runs one documented command in the doc's session and checks it; returns '' or, for a
  command failing as a KNOWN_BUGS entry says, that entry's reason."""
  apply_setups(s, c.env)
  text = rewrite(c.text, s)
  if "gcloud" in s.data:
    s.data["gcloud_calls_before"] = len(s.data["gcloud"].calls())
  r = s.run(text, timeout=TIMEOUT_S)
  s.data.setdefault("timings", []).append((c.id, r.seconds, r.cpu_seconds))
  bug = known_bug(c.text, r)
  if bug:
    return bug
  assert r.returncode == 0, f"{c.id}: exit code {r.returncode}\n$ {text}\n" + r.output[-6000:]
  if c.expected is not None:
    problem = docs_utils.output_mismatch(c.expected, r.output.splitlines(), c.vary)
    assert not problem, f"{c.id}: {problem}\n$ {text}\n{r.output[-6000:]}"
  try:
    args = shlex.split(text)
  except ValueError:
    args = []
  for pattern, check in CHECKS:
    if pattern.search(c.text):
      check(s, args, r)
  return ""


def _doc_param(doc: str):
  """Slow unless every command it runs is FAST."""
  fast = all(FAST.match(c.text) for c in runnable(doc))
  return pytest.param(doc, id=doc, marks=[] if fast else [pytest.mark.slow])


@pytest.mark.parametrize("doc", [_doc_param(d) for d in docs_utils.DOCS if runnable(d)])
def test_doc_commands(doc: str, tmp_path):
  """Runs the doc's commands in order, in one session; stops at the first failure."""
  s = Session(doc, tmp_path, xla_flags="" if doc in OPTIMISED_DOCS else FAST_COMPILE)
  bugs = []
  try:
    for c in runnable(doc):
      bug = run_command(s, c)
      if bug:
        bugs.append(f"{c.id}: {bug}")
  finally:
    s.close()
    for cid, seconds, cpu in s.data.get("timings", []):
      print(f"{seconds:7.1f} s ({cpu:6.1f} s CPU)  {cid}")
  if bugs:
    pytest.xfail("known bugs: " + "; ".join(bugs))


@pytest.mark.parametrize("command", [pytest.param(c, id=f"{c.id} {c.text[:50]}") for c in COMMANDS
                                     if c.skip or c.covered_by])
def test_marked_command(command: Command):
  """Lists each command not run here, with its reason (a skip in the report)."""
  pytest.skip(f"{command.id}: {command.skip or 'run in ' + command.covered_by}")


def test_make_demo_runs_the_demo_module():
  """`make demo` (marked in the docs) is `python -m maxgemma.demo` after the install step."""
  makefile = (REPO / "Makefile").read_text()
  recipe = makefile.split("\ndemo: install\n", 1)[1].split("\n\n", 1)[0]
  assert recipe.strip() == "$(PY) -m maxgemma.demo", recipe


@pytest.mark.slow
def test_demo(tmp_path):
  """What `make demo` runs, in a scratch copy: train, resume, export, sample."""
  s = Session("demo", tmp_path)
  r = s.run("python -m maxgemma.demo", timeout=TIMEOUT_S)
  print(f"{r.seconds:7.1f} s ({r.cpu_seconds:6.1f} s CPU)  python -m maxgemma.demo")
  bug = known_bug(r.command, r)
  if bug:
    pytest.xfail(f"known bug: {bug}")
  assert r.returncode == 0, r.output[-6000:]
  assert "== loss fell from" in r.output
  assert (s.cwd / "runs" / "demo" / "export_hf" / "config.json").exists()
