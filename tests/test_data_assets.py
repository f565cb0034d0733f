"""The packaged demo assets: consistent, small, and rebuilt exactly by the build script."""

import json
import os
import platform
import subprocess
import sys

import pytest

from maxgemma.data import records
from maxgemma.data import tokenizer as tok_lib
from maxgemma.data.sources import demo_dir


def test_demo_assets_are_consistent():
  assets = demo_dir()
  manifest = records.verify(assets)  # every shard present with the recorded sha256
  tok = tok_lib.load_tokenizer("")
  assert tok.vocab_size == 2048 == manifest["tokenizer"]["vocab_size"]
  assert manifest["tokenizer"]["fingerprint"] == tok.fingerprint
  assert os.path.getsize(os.path.join(assets, "corpus.jsonl")) <= 2 * 2**20
  with open(os.path.join(assets, "corpus.jsonl")) as f:
    docs = [json.loads(line) for line in f]
  assert len(docs) == manifest["documents"] and manifest["splits"]["eval"]["documents"] > 0
  assert all(d["text"].isascii() and d["text"] for d in docs)


def test_build_script_rebuilds_the_same_assets(tmp_path):
  manifest = records.read_manifest(demo_dir())
  if manifest.get("built_with_python") != platform.python_version():
    pytest.skip(f"assets built with Python {manifest.get('built_with_python')}; docstrings "
                "differ between versions")
  # A fresh interpreter: modules other tests imported or patched would change the docstrings.
  subprocess.run([sys.executable, "-m", "maxgemma.data.build_assets", f"--assets={tmp_path}"],
                 check=True, capture_output=True, timeout=600)
  for name in sorted(os.listdir(demo_dir())):
    if name.endswith((".jsonl", ".model", ".array_record", ".json")):
      with open(os.path.join(demo_dir(), name), "rb") as a, open(tmp_path / name, "rb") as b:
        assert a.read() == b.read(), name
