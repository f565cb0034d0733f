"""Local paths and Cloud Storage (`gs://`) paths behind one small API.

Workdirs, tokenizers and prepared datasets may live in a bucket. Directories and small files go
through `etils.epath` (gcsfs underneath for `gs://`), arrays through tensorstore (orbax).
ArrayRecord shards can only be read from a local file, so remote shards are copied once into a
local cache, verified against the dataset manifest (`cached_copy`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from etils import epath

DEFAULT_CACHE = os.path.join("~", ".cache", "maxgemma")


def is_remote(path: str | os.PathLike) -> bool:
  """Whether `path` is a URL (`gs://bucket/...`) rather than a local path."""
  return "://" in str(path)


def path(p: str | os.PathLike) -> epath.Path:
  """An `epath.Path` for a local path (user-expanded) or a `gs://` URL."""
  return epath.Path(str(p) if is_remote(p) else os.path.expanduser(str(p)))


def absolute(p: str) -> str:
  """`p` made absolute when local; URLs unchanged."""
  return p if is_remote(p) else os.path.abspath(os.path.expanduser(p))


def tensorstore_url(p: str) -> str:
  """A tensorstore kvstore URL for a directory (`file:///abs/` or `gs://bucket/dir/`)."""
  return (p if is_remote(p) else "file://" + absolute(p)).rstrip("/") + "/"


def join(p: str, *parts: str) -> str:
  """`os.path.join` that also joins URLs with `/`."""
  return "/".join([p.rstrip("/"), *parts]) if is_remote(p) else os.path.join(p, *parts)


def write_bytes(p: str, data: bytes) -> None:
  """Writes a whole file: a local one through a temporary name and a rename, a Cloud Storage
  object in one upload (objects are replaced atomically). Creates parent directories."""
  target = path(p)
  target.parent.mkdir(parents=True, exist_ok=True)
  if is_remote(p):
    target.write_bytes(data)
    return
  tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
  tmp.write_bytes(data)
  os.replace(tmp, target)


def write_text(p: str, text: str) -> None:
  """`write_bytes` of UTF-8 text."""
  write_bytes(p, text.encode())


def upload_file(local_file: str | os.PathLike, dest: str) -> None:
  """Copies a local file to `dest` (a local path or a URL), streaming it in blocks."""
  out = path(dest)
  out.parent.mkdir(parents=True, exist_ok=True)
  with open(local_file, "rb") as src, out.open("wb") as dst:
    for block in iter(lambda: src.read(8 << 20), b""):
      dst.write(block)


def upload_tree(local_dir: str, dest: str) -> None:
  """Copies every file under `local_dir` to the same relative path under `dest`."""
  root = Path(local_dir)
  for f in sorted(root.rglob("*")):
    if f.is_file():
      upload_file(f, join(dest, f.relative_to(root).as_posix()))


def cache_dir(configured: str = "") -> str:
  """The local cache directory: `configured`, else $MAXGEMMA_CACHE, else ~/.cache/maxgemma."""
  return os.path.expanduser(configured or os.environ.get("MAXGEMMA_CACHE") or DEFAULT_CACHE)


def sha256_of(local_file: str) -> str:
  h = hashlib.sha256()
  with open(local_file, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def cached_copy(url: str, *, size: int, sha256: str, cache: str) -> str:
  """A verified local copy of the remote file `url` under `cache`; downloads it when missing.

  The copy is written under a temporary name, checked against `size` and `sha256` (from the
  dataset manifest), then renamed: a file in the cache is always complete and verified, so
  concurrent processes and interrupted downloads are safe.
  """
  scheme, _, rest = url.partition("://")
  local = os.path.join(cache, "remote", scheme, rest)
  if os.path.isfile(local) and os.path.getsize(local) == size:
    return local
  os.makedirs(os.path.dirname(local), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(local), prefix=".download-")
  try:
    with os.fdopen(fd, "wb") as out, path(url).open("rb") as src:
      for block in iter(lambda: src.read(8 << 20), b""):
        out.write(block)
    got = os.path.getsize(tmp)
    if got != size or sha256_of(tmp) != sha256:
      raise ValueError(f"{url}: downloaded {got} bytes that do not match the manifest ({size} "
                       "bytes and its sha256); the shard was replaced or damaged: re-upload the "
                       "prepared dataset")
    os.replace(tmp, local)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return local


def check_bucket(url: str, setting: str) -> None:
  """Raises a one-line error naming `setting` when the bucket of a URL does not exist.

  Lists the bucket's top level (object read permission) rather than reading the bucket's own
  metadata, which a service account with only object roles may not see.
  """
  if not is_remote(url):
    return
  scheme, _, rest = url.partition("://")
  bucket = f"{scheme}://{rest.split('/')[0]}"
  try:
    next(iter(path(bucket).iterdir()), None)
  except FileNotFoundError:
    raise FileNotFoundError(
        f"{setting}={url}: bucket {bucket} does not exist; create it (gcloud storage buckets "
        f"create {bucket} --location=REGION) or fix the path") from None
  except Exception as e:  # noqa: BLE001  (gcsfs raises several types for denied access)
    raise FileNotFoundError(
        f"{setting}={url}: cannot list bucket {bucket} ({type(e).__name__}: "
        f"{str(e).splitlines()[0][:200] if str(e) else ''}); check the credentials' access "
        "(roles/storage.objectAdmin) or the path") from None
