"""A local Cloud Storage server for tests (`tests/gcs_server.py`, on gcp-storage-emulator).

gcsfs (so `etils.epath` and orbax's directory operations), tensorstore's `gcs` kvstore (orbax's
arrays) and google-cloud-storage (tensorboardX) are all pointed at it through their documented
endpoint variables, so `gs://` workdirs run the real client code paths end to end.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

BUCKET = "maxgemma-test"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def emulator(bucket: str = BUCKET) -> Iterator[dict[str, str]]:
  """Runs an in-memory GCS server holding `bucket`; yields the environment that points clients
  at it (also set in this process's `os.environ` while it runs)."""
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  proc = subprocess.Popen(
      [sys.executable, os.path.join(os.path.dirname(__file__), "gcs_server.py"), str(port), bucket],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
         "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "GOOGLE_CLOUD_PROJECT": "maxgemma-test"}
  saved = {k: os.environ.get(k) for k in env}
  try:
    deadline = time.monotonic() + 30
    while True:
      try:
        urllib.request.urlopen(f"{url}/storage/v1/b/{bucket}", timeout=2).read()
        break
      except OSError:
        if proc.poll() is not None or time.monotonic() > deadline:
          raise RuntimeError("the GCS emulator did not start") from None
        time.sleep(0.2)
    os.environ.update(env)
    yield env
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    proc.terminate()
    proc.wait(timeout=10)
