"""Train a SentencePiece tokenizer with Gemma's settings from text, JSONL or Parquet files.

  python -m maxgemma.data.train_tokenizer --input='corpus/*.jsonl' --vocab_size=32000 \\
      --output=tok.model
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Iterator

from maxgemma.data.prepare import PrepareError, _expand_inputs
from maxgemma.data.readers import BadInputError, plan_units, read_unit
from maxgemma.data.tokenizer import train


def iter_texts(patterns: list[str], text_field: str = "text", text_docs: str = "paragraph",
               max_bytes: int = 0) -> Iterator[str]:
  """Documents of the inputs (bad records skipped), up to `max_bytes` of text when > 0."""
  total = 0
  for path in _expand_inputs(patterns):
    for unit in plan_units(path, 1 << 62, text_docs):
      for _, value, _ in read_unit(unit, text_field, text_docs):
        if isinstance(value, str) and value:
          yield value
          total += len(value)
          if max_bytes and total >= max_bytes:
            return


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--input", action="append", required=True, help="glob(s) of input files")
  p.add_argument("--vocab_size", type=int, required=True, help="exact number of pieces")
  p.add_argument("--output", required=True, help="the .model file to write")
  p.add_argument("--text_field", default="text")
  p.add_argument("--text_docs", default="paragraph", choices=("paragraph", "line", "file"))
  p.add_argument("--max_mb", type=float, default=1024, help="text sampled for training (MB)")
  a = p.parse_args(argv)
  try:
    texts = iter_texts(a.input, a.text_field, a.text_docs, int(a.max_mb * 2**20))
    first = list(itertools.islice(texts, 1))
    if not first:
      raise PrepareError("no documents in the inputs")
    tok = train(itertools.chain(first, texts), a.vocab_size, output=a.output)
  except (BadInputError, PrepareError, ValueError) as e:
    print(f"train_tokenizer: error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {a.output}: {tok.vocab_size} pieces, fingerprint {tok.fingerprint}",
        file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
