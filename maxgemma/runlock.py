"""One trainer per workdir: a lock taken at the start of `train()` and released at its end.

The lock is `WORKDIR/run.lock`, and it names its holder (host, pid, start time).

  local workdir: the file is held with `fcntl.flock`. The kernel drops the lock when the holder
    exits in any way (kill -9 included), so a dead run never blocks a new one.
  gs:// workdir: the object is created with the precondition `ifGenerationMatch=0`, so of two
    runs starting together exactly one creates it. A background thread rewrites it every
    `stale_s / 4` seconds (a heartbeat, conditional on the generation it last wrote). A lock whose
    heartbeat is older than `stale_s` belongs to a run that died without releasing it: a new run
    takes it over with a write conditional on the generation it read, so again only one wins. A
    clean end deletes the object.

In a multi-process job process 0 takes the lock and broadcasts the outcome, so every process
either goes on or raises the same `RunLockError` (nobody waits on a process that stopped).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

from absl import logging

from maxgemma import storage

LOCK_NAME = "run.lock"
_MESSAGE_BYTES = 2048  # the broadcast outcome: one line of UTF-8, zero-padded


class RunLockError(ValueError):
  """The workdir is in use by another live run (or its lock could not be taken)."""


def _holder(stale_s: float) -> dict[str, Any]:
  now = time.time()
  return {"host": socket.gethostname(), "pid": os.getpid(), "started": now, "heartbeat": now,
          "stale_s": stale_s, "token": secrets.token_hex(8)}


def _when(t: float) -> str:
  return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _in_use(workdir: str, holder: dict[str, Any] | None, extra: str = "") -> RunLockError:
  if holder and {"host", "pid", "started"} <= set(holder):
    who = f"host {holder['host']}, pid {holder['pid']}, started {_when(float(holder['started']))}"
  else:
    who = "a run that is starting"
  return RunLockError(f"--workdir={workdir} is in use by another run ({who}{extra}); stop that "
                      "run or let it finish, or use another --workdir")


class _LocalLock:
  """`fcntl.flock` on WORKDIR/run.lock; the file holds the holder's JSON while locked."""

  def __init__(self, workdir: str, stale_s: float):
    import fcntl

    self._fcntl = fcntl
    os.makedirs(storage.absolute(workdir), exist_ok=True)
    self.path = os.path.join(storage.absolute(workdir), LOCK_NAME)
    self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(self._fd)
      raise _in_use(workdir, _read_json(self.path)) from None
    self.holder = _holder(stale_s)
    os.ftruncate(self._fd, 0)
    os.pwrite(self._fd, json.dumps(self.holder).encode(), 0)

  def release(self) -> None:
    if self._fd is None:
      return
    os.ftruncate(self._fd, 0)
    self._fcntl.flock(self._fd, self._fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None


def _read_json(path: str) -> dict[str, Any] | None:
  try:
    with open(path) as f:
      return json.loads(f.read() or "null")
  except (OSError, ValueError):
    return None


class _GcsLock:
  """The gs:// lease: a conditionally created object refreshed by a heartbeat thread."""

  def __init__(self, workdir: str, stale_s: float):
    import fsspec

    self.workdir, self.stale_s = workdir, float(stale_s)
    self.url = storage.join(workdir, LOCK_NAME)
    self._fs = fsspec.filesystem("gs")
    self._bucket, self._key, _ = self._fs.split_path(self.url)
    self.holder = _holder(self.stale_s)
    self.lost = False
    self.generation = self._take()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._beat, name="runlock-heartbeat", daemon=True)
    self._thread.start()

  def _read(self) -> tuple[str, dict[str, Any]] | None:
    """(generation, holder) of the live object, or None when there is none."""
    try:
      meta = self._fs.call("GET", "b/{}/o/{}", self._bucket, self._key, json_out=True)
    except FileNotFoundError:
      return None
    try:
      holder = json.loads((meta.get("metadata") or {}).get("holder", "null")) or {}
    except ValueError:
      holder = {}
    return str(meta["generation"]), holder

  def _write(self, if_generation_match: str) -> str:
    """Uploads the holder, only if the live generation is `if_generation_match` ("0": no object);
    returns the new generation. A failed precondition raises FileExistsError (HTTP 412)."""
    body = json.dumps(self.holder)
    meta = json.dumps({"name": self._key, "metadata": {"holder": body}})
    data = (f"--==0==\nContent-Type: application/json; charset=UTF-8\n\n{meta}\n--==0==\n"
            f"Content-Type: application/json\n\n{body}\n--==0==--").encode()
    out = self._fs.call(
        "POST", f"{self._fs._location}/upload/storage/v1/b/{quote(self._bucket)}/o",
        uploadType="multipart", ifGenerationMatch=if_generation_match, data=data, json_out=True,
        headers={"Content-Type": 'multipart/related; boundary="==0=="'})
    return str(out["generation"])

  def _take(self) -> str:
    for _ in range(5):
      live = self._read()
      if live is not None and live[1].get("token") == self.holder["token"]:
        return live[0]  # our own create, answered by a retried request
      if live is not None:
        generation, holder = live
        age = time.time() - float(holder.get("heartbeat", 0.0))
        if age <= self.stale_s:
          raise _in_use(self.workdir, holder,
                        f", last heartbeat {max(age, 0.0):.0f}s ago; a run that died is taken "
                        f"over once its heartbeat is older than checkpoint.lock_stale_s="
                        f"{self.stale_s:g}s")
        logging.warning("taking over the run lock %s: its holder (host %s, pid %s) last renewed "
                        "it %.0fs ago (> checkpoint.lock_stale_s=%gs)", self.url,
                        holder.get("host"), holder.get("pid"), age, self.stale_s)
      try:
        return self._write("0" if live is None else live[0])
      except FileExistsError:
        continue  # another run wrote it between the read and the write: look again
    raise RunLockError(f"--workdir={self.workdir}: {self.url} keeps changing under this run "
                       "(other runs are starting on it): start one run at a time")

  def _beat(self) -> None:
    while not self._stop.wait(max(self.stale_s / 4, 0.1)):
      self.holder["heartbeat"] = time.time()
      try:
        self.generation = self._write(self.generation)
      except FileExistsError:
        self.lost = True
        logging.error("lost the run lock %s: another run took it over (this run's heartbeat "
                      "stopped for more than checkpoint.lock_stale_s=%gs); stop one of them",
                      self.url, self.stale_s)
        return
      except Exception as e:  # noqa: BLE001  (a network error: the next beat retries)
        logging.warning("run lock heartbeat on %s failed (%s: %s); retrying", self.url,
                        type(e).__name__, e)

  def release(self) -> None:
    if self._stop.is_set():
      return
    self._stop.set()
    self._thread.join()
    if self.lost:
      return
    try:
      self._fs.call("DELETE", "b/{}/o/{}", self._bucket, self._key,
                    ifGenerationMatch=self.generation)
    except (FileNotFoundError, FileExistsError):
      pass  # already gone, or taken over: not ours to delete


def acquire(workdir: str, *, stale_s: float) -> _LocalLock | _GcsLock:
  """Takes the run lock of `workdir` for this process; raises RunLockError naming a live holder."""
  if storage.is_remote(workdir):
    return _GcsLock(workdir, stale_s)
  return _LocalLock(workdir, stale_s)


def _broadcast_text(text: str) -> str:
  """Process 0's `text` on every process (UTF-8, cut to fit a fixed-size buffer)."""
  import numpy as np
  from jax.experimental import multihost_utils

  raw = text.encode()[:_MESSAGE_BYTES]
  buf = np.zeros(_MESSAGE_BYTES, np.uint8)
  buf[:len(raw)] = np.frombuffer(raw, np.uint8)
  out = np.asarray(multihost_utils.broadcast_one_to_all(buf))
  return bytes(out[out != 0].astype(np.uint8)).decode(errors="replace")


@contextlib.contextmanager
def hold(workdir: str, *, stale_s: float) -> Iterator[None]:
  """Holds the run lock of `workdir` for the job while the block runs (process 0 takes it)."""
  import jax

  lock, error = None, ""
  if jax.process_index() == 0:
    try:
      lock = acquire(workdir, stale_s=stale_s)
    except RunLockError as e:
      error = str(e)
    except Exception as e:  # noqa: BLE001  (every process must learn that process 0 failed)
      error = (f"--workdir={workdir}: taking the run lock {storage.join(workdir, LOCK_NAME)} "
               f"failed ({type(e).__name__}: {' '.join(str(e).split())[:300]})")
  if jax.process_count() > 1:
    error = _broadcast_text(error)
  if error:
    raise RunLockError(error)
  try:
    yield
  finally:
    if lock is not None:
      lock.release()
