"""Rebuilds maxgemma/data/assets (demo corpus, 2048-piece tokenizer, prepared shards).

  .venv/bin/python scripts/build_demo_assets.py   (same as python -m maxgemma.data.build_assets)
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maxgemma.data.build_assets import main  # noqa: E402

if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
