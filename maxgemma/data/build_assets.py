"""Rebuilds the packaged demo assets from material on this machine (no downloads).

  python -m maxgemma.data.build_assets          (or: python scripts/build_demo_assets.py)

Writes to maxgemma/data/assets/: `corpus.jsonl` (English docstrings of a fixed list of Python
standard-library modules, deterministic for a given Python version), `tokenizer.model` (BPE,
exactly 2048 pieces, Gemma's settings and special ids) and the corpus prepared with it
(`manifest.json`, `train-*.array_record`, `eval-*.array_record`, 5% eval split).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import os
import pkgutil
import platform
import re
import shutil
import sys
import tempfile
import warnings

from maxgemma.data import tokenizer as tokenizer_lib
from maxgemma.data.prepare import prepare

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
VOCAB_SIZE = 2048
MAX_BYTES = 1_500_000
# Standard-library modules skipped: side effects on import, GUI, platform-only or deprecated.
_SKIP = frozenset(
    "antigravity this idlelib tkinter turtle turtledemo pydoc_data ensurepip lib2to3 msilib "
    "msvcrt winreg winsound nt _winapi curses readline sitecustomize usercustomize __main__ "
    "asynchat asyncore imp distutils smtpd telnetlib nntplib cgi cgitb crypt spwd nis ossaudiodev "
    "audioop chunk sndhdr imghdr mailcap pipes uu xdrlib sunau aifc".split())


def _modules() -> list[str]:
  """Public standard-library modules and their direct submodules, sorted (fixed per Python)."""
  names = []
  for name in sorted(m for m in sys.stdlib_module_names if not m.startswith("_")):
    if name in _SKIP or name == "test":
      continue
    names.append(name)
    spec = importlib.util.find_spec(name)
    if spec is not None and spec.submodule_search_locations:
      subs = pkgutil.iter_modules(spec.submodule_search_locations)
      names += sorted(f"{name}.{m.name}" for m in subs
                      if not m.name.startswith("_") and "test" not in m.name)
  return names


def _docstrings(module_name: str) -> list[tuple[str, str]]:
  """(qualified name, cleaned docstring) of a module, its classes and their functions."""
  try:
    module = importlib.import_module(module_name)
  except Exception:  # an optional module this Python was built without
    return []
  out, seen = [], set()

  def add(name: str, obj: object) -> None:
    doc = inspect.getdoc(obj) if isinstance(getattr(obj, "__doc__", None), str) else None
    if doc and len(doc) >= 120 and id(obj) not in seen and doc.isascii():
      seen.add(id(obj))
      out.append((name, re.sub(r"\n{3,}", "\n\n", doc.strip())))

  add(module_name, module)
  for name, obj in sorted(vars(module).items()):
    if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
      continue
    if inspect.isclass(obj):
      add(f"{module_name}.{name}", obj)
      for attr, member in sorted(vars(obj).items()):
        if not attr.startswith("_") and inspect.isfunction(member):
          add(f"{module_name}.{name}.{attr}", member)
    elif inspect.isfunction(obj):
      add(f"{module_name}.{name}", obj)
  return out


def build_corpus(max_bytes: int = MAX_BYTES) -> list[dict]:
  """Deterministic documents {'id', 'text'}: standard-library docstrings, up to `max_bytes`."""
  docs, total, texts = [], 0, set()
  for module_name in _modules():
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      found = _docstrings(module_name)
    for name, text in found:
      if text in texts:
        continue
      size = len(text.encode()) + 1
      if total + size > max_bytes:
        return docs
      texts.add(text)
      docs.append({"id": name, "text": text})
      total += size
  return docs


def build(assets: str = ASSETS, *, max_bytes: int = MAX_BYTES, vocab_size: int = VOCAB_SIZE
          ) -> dict:
  """Writes corpus, tokenizer and prepared shards into `assets`; returns the manifest."""
  os.makedirs(assets, exist_ok=True)
  docs = build_corpus(max_bytes)
  corpus = os.path.join(assets, "corpus.jsonl")
  with open(corpus, "w") as f:
    for doc in docs:
      f.write(json.dumps(doc, ensure_ascii=False) + "\n")
  model = os.path.join(assets, "tokenizer.model")
  tokenizer_lib.train((d["text"] for d in docs), vocab_size, output=model, num_threads=1)
  for name in os.listdir(assets):
    if name.endswith(".array_record") or name == "manifest.json":
      os.remove(os.path.join(assets, name))
  with tempfile.TemporaryDirectory() as tmp:
    manifest = prepare([corpus], model, tmp, eval_fraction=0.05, workers=1, progress=False)
    for name in os.listdir(tmp):
      if name.endswith(".array_record"):
        shutil.copy(os.path.join(tmp, name), os.path.join(assets, name))
    manifest["tokenizer"]["path"] = "tokenizer.model"
    manifest["plan"]["tokenizer"]["path"] = "tokenizer.model"
    manifest["plan"]["inputs"] = [{"path": "corpus.jsonl"}]
    manifest["built_with_python"] = platform.python_version()  # docstrings vary by version
    with open(os.path.join(assets, "manifest.json"), "w") as f:
      json.dump(manifest, f, indent=1, sort_keys=True)
  return manifest


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--assets", default=ASSETS, help="output directory")
  a = p.parse_args(argv)
  m = build(a.assets)
  print(f"demo assets in {a.assets}: {m['documents']} documents, {m['tokens']} tokens "
        f"(train {m['splits']['train']['tokens']}, eval {m['splits']['eval']['tokens']}), "
        f"tokenizer {m['tokenizer']['fingerprint']}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
