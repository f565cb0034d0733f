"""`python tests/gcs_server.py PORT BUCKET`: gcp-storage-emulator, made faithful where we need it.

The emulator leaves out two parts of the GCS JSON API that tensorstore relies on (orbax's OCDBT
manifests are updated by conditional writes): object reads carry no `x-goog-generation` header,
and uploads ignore `ifGenerationMatch`. Both are added here, as the GCS documentation specifies
them: the header on every object read, and HTTP 412 when the live generation ("0" = no object)
differs from the precondition.
"""

from __future__ import annotations

import sys
import time
from http import HTTPStatus

from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects


def _generation(storage, bucket: str, name: str) -> str:
  try:
    return str(storage.get_file_obj(bucket, name).get("generation") or "0")
  except NotFound:
    return "0"


_DOWNLOAD, _INSERT = objects.download, objects.insert


def _download(request, response, storage, *args, **kwargs):
  _DOWNLOAD(request, response, storage, *args, **kwargs)
  if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))


def _insert(request, response, storage, *args, **kwargs):
  match = request.query.get("ifGenerationMatch")
  if match:
    name = (request.query.get("name") or [None])[0]
    if name is None and isinstance(request.data, dict):
      name = (request.data.get("meta") or {}).get("name")
    if name is not None and _generation(storage, request.params["bucket_name"], name) != match[0]:
      response.status = HTTPStatus.PRECONDITION_FAILED
      return None
  return _INSERT(request, response, storage, *args, **kwargs)


def main(port: int, bucket: str) -> None:
  replace = {_DOWNLOAD: _download, _INSERT: _insert}
  objects.download = _download  # `objects.get` with alt=media calls it by name
  for _, methods in server.HANDLERS:
    for method, handler in list(methods.items()):
      methods[method] = replace.get(handler, handler)
  srv = server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
  srv.start()
  try:
    while True:
      time.sleep(1)
  finally:
    srv.stop()


if __name__ == "__main__":
  main(int(sys.argv[1]), sys.argv[2])
