"""No wrong tokenizer: a workdir records where its tokenizer came from, and one without a tokenizer
exports weights and config only (never the packaged demo tokenizer in its place)."""

import json
import os
import subprocess
import sys

import pytest

from maxgemma.checkpoint import load_params
from maxgemma.convert.workdir_tokenizer import RECORD_FILE, find_tokenizer, resolve_tokenizer
from maxgemma.data.tokenizer import demo_tokenizer_path, load_tokenizer
from maxgemma.export import export
from maxgemma.import_weights import import_weights
from tests.convert_utils import VOCAB, make_workdir

FORMATS = {"hf": "", "gguf": ".gguf", "gemma": ""}
# Tokenizer files each format writes when it has a tokenizer (GGUF: metadata keys).
HF_TOKENIZER_FILES = {"tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"}


@pytest.fixture(scope="module")
def no_tokenizer(tmp_path_factory):
  """A checkpoint saved without a training config: nothing names its tokenizer. Its vocabulary
  has as many rows as the demo tokenizer's pieces, so a fallback to it would pass the size check."""
  root = tmp_path_factory.mktemp("notok")
  workdir, cfg, _ = make_workdir(str(root), "tiny_gemma2", tokenizer=None)
  assert cfg.vocab_size == VOCAB == load_tokenizer(demo_tokenizer_path()).vocab_size
  return root, workdir


def _gguf_has_tokenizer(path: str) -> bool:
  import gguf  # noqa: PLC0415
  return "tokenizer.ggml.model" in gguf.GGUFReader(path).fields


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_export_without_a_tokenizer_writes_weights_and_config_only(no_tokenizer, fmt, tmp_path):
  _, workdir = no_tokenizer
  out = str(tmp_path / f"out{FORMATS[fmt]}")
  done = export(workdir, fmt, out)
  assert done.tokenizer_origin is None
  assert "\n" not in done.note and done.note.startswith("no tokenizer written: ")
  assert "--tokenizer=FILE --overwrite" in done.note
  if fmt == "hf":
    files = set(os.listdir(out))
    assert "config.json" in files and any(f.endswith(".safetensors") for f in files), files
    assert not files & HF_TOKENIZER_FILES, files
  elif fmt == "gguf":
    assert not _gguf_has_tokenizer(out)
  else:
    files = set(os.listdir(out))
    assert "maxgemma_config.json" in files and "tokenizer.model" not in files, files
  # The fix the note names: --tokenizer with --overwrite adds one.
  added = export(workdir, fmt, out, tokenizer=demo_tokenizer_path(), overwrite=True)
  assert added.note == "" and added.tokenizer_origin == f"--tokenizer={demo_tokenizer_path()}"
  if fmt == "gguf":
    assert _gguf_has_tokenizer(out)
  else:
    assert os.path.isfile(os.path.join(out, "tokenizer.model"))


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_import_without_a_tokenizer_records_it_and_exports_none(no_tokenizer, fmt, tmp_path):
  """An HF directory with no tokenizer.model (a GGUF file with no tokenizer metadata) imports
  into a workdir that says so; exporting that workdir writes no tokenizer."""
  _, workdir = no_tokenizer
  src = str(tmp_path / f"src{FORMATS[fmt]}")
  export(workdir, fmt, src)
  back = str(tmp_path / "imported")
  import_weights(fmt, src, back)
  assert load_params(back)[1].vocab_size == VOCAB
  assert not os.path.exists(os.path.join(back, "tokenizer.model"))
  with open(os.path.join(back, RECORD_FILE)) as f:
    record = json.load(f)
  assert record["tokenizer"] is None and os.path.abspath(src) in record["origin"], record
  found = find_tokenizer(back)
  assert found.path is None and found.origin == record["origin"]
  with pytest.raises(FileNotFoundError, match="no tokenizer for .*pass --tokenizer=FILE"):
    resolve_tokenizer(back)  # what maxgemma.sample uses
  done = export(back, "hf", str(tmp_path / "again"))
  assert done.tokenizer_origin is None and record["origin"] in done.note
  assert not set(os.listdir(tmp_path / "again")) & HF_TOKENIZER_FILES


def test_import_records_where_the_tokenizer_came_from(tmp_path):
  src_workdir, _, _ = make_workdir(str(tmp_path / "w"), "tiny_gemma1_mqa")  # trained with ""
  hf_dir = str(tmp_path / "hf")
  done = export(src_workdir, "hf", hf_dir)
  assert done.tokenizer_origin.startswith("the packaged demo tokenizer")
  back = str(tmp_path / "imported")
  import_weights("hf", hf_dir, back)
  with open(os.path.join(back, RECORD_FILE)) as f:
    record = json.load(f)
  assert record == {"tokenizer": "tokenizer.model",
                    "origin": os.path.join(os.path.abspath(hf_dir), "tokenizer.model")}
  assert export(back, "gemma", str(tmp_path / "g")).tokenizer_origin == record["origin"]


def test_training_config_tokenizer_is_used(tmp_path):
  """A checkpoint whose training config names a tokenizer exports that one."""
  from maxgemma.data.tokenizer import train  # noqa: PLC0415
  other = str(tmp_path / "other.model")
  texts = [f"word{i} other{i % 7} " * 3 for i in range(800)]
  train(texts, 390, output=other)
  workdir, _, _ = make_workdir(str(tmp_path / "w"), "tiny_gemma2", tokenizer=other)
  out = str(tmp_path / "hf")
  done = export(workdir, "hf", out)
  assert done.tokenizer_origin == f"the training config's data.tokenizer ({other})"
  with open(os.path.join(out, "tokenizer.model"), "rb") as f, open(other, "rb") as g:
    assert f.read() == g.read()


@pytest.mark.slow
def test_export_and_sample_commands_say_so_in_one_line(no_tokenizer):
  root, workdir = no_tokenizer
  out = str(root / "cli_hf")
  p = subprocess.run([sys.executable, "-m", "maxgemma.export", f"--workdir={workdir}",
                      "--format=hf", f"--out={out}"], capture_output=True, text=True,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  lines = [ln for ln in p.stdout.splitlines() if "tokenizer" in ln]
  assert len(lines) == 1 and lines[0].startswith("no tokenizer written: "), p.stdout
  assert os.path.isfile(os.path.join(out, "config.json"))
  p = subprocess.run([sys.executable, "-m", "maxgemma.sample", f"--workdir={workdir}",
                      "--prompt=Hello", "--max_new_tokens=2"], capture_output=True, text=True,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
  assert p.returncode != 0 and not p.stdout, p.stdout
  last = p.stderr.strip().splitlines()[-1]
  assert last.startswith("maxgemma.sample: no tokenizer for ") and "--tokenizer=FILE" in last, \
      p.stderr[-2000:]
