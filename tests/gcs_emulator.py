"""A local Cloud Storage for the gs:// tests: gcp-storage-emulator, with the few GCS
semantics jaxnmt relies on patched in.

The stock emulator (2026.7.19) ignores
  * preconditions (ifGenerationMatch / ifGenerationNotMatch on uploads and deletes),
    so a create-if-absent "succeeds" twice and lock tests would pass without testing
    anything (real GCS answers 412);
  * startOffset / endOffset when listing (TensorStore, under Orbax, lists ranges so
    and would then see every object of the bucket);
  * objects.moveTo (it answers 501, which gcsfs retries for ~33 s per object);
  * the generation of a download (x-goog-generation; TensorStore's OCDBT manifest
    reads then fail with "Malformed StorageGeneration") and the preconditions of a
    download (ifGenerationNotMatch: 304, TensorStore's cache revalidation).
Its handlers are replaced here, in the emulator's own process; the package is not
forked.

  python -m tests.gcs_emulator --port 9023 [--bucket bucket]   # serves until killed

`environment(port)` is what a client process needs to talk to it.
"""

import argparse
import logging
import time
from http import HTTPStatus


def environment(port: int) -> dict[str, str]:
  """The variables that point gcsfs, google-cloud-storage (tensorboardX, Orbax's
  deletes) and TensorStore (Orbax's arrays) at the emulator on `port`."""
  url = f'http://127.0.0.1:{port}'
  return {'STORAGE_EMULATOR_HOST': url, 'TENSORSTORE_GCS_HTTP_URL': url,
          'FSSPEC_GCS_TOKEN': 'anon', 'NO_GCE_CHECK': 'true',
          'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
          'FSSPEC_GCS_USE_LISTINGS_CACHE': 'false'}


def _query(request, key):
  value = request.query.get(key)
  return value[0] if value else None


def _patch() -> None:
  """Replaces the emulator's upload, delete and list handlers and adds moveTo."""
  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator import server
  from gcp_storage_emulator.exceptions import NotFound
  from gcp_storage_emulator.handlers import objects
  if getattr(server, '_jaxnmt_patched', False):
    return
  original = {name: getattr(objects, name) for name in ('insert', 'upload_partial',
                                                        'delete', 'ls', 'download')}

  def generation(storage, bucket, name):
    try:
      return str(storage.get_file_obj(bucket, name).get('generation'))
    except NotFound:
      return None

  def refused(request, response, storage, bucket, name, reading=False) -> bool:
    """Answers 412 (and returns True) when a generation precondition does not hold;
    a read whose ifGenerationNotMatch fails is answered 304, as GCS does."""
    match = _query(request, 'ifGenerationMatch')
    not_match = _query(request, 'ifGenerationNotMatch')
    if match is None and not_match is None:
      return False
    current = generation(storage, bucket, name)
    holds = True
    if match is not None:
      holds = current is None if match == '0' else current == match
    if holds and not_match is not None:
      holds = current is not None if not_match == '0' else current != not_match
      if not holds and reading and current is not None:
        response.status = HTTPStatus.NOT_MODIFIED
        response['x-goog-generation'] = current
        return True
    if holds:
      return False
    response.status = HTTPStatus.PRECONDITION_FAILED
    response.json({'error': {'code': 412, 'message': 'conditionNotMet', 'errors': [
        {'reason': 'conditionNotMet', 'message': 'Precondition Failed'}]}})
    return True

  def upload_partial(request, response, storage, *args, **kwargs):
    try:
      upload = storage.get_resumable_file_obj(_query(request, 'upload_id'))
    except NotFound:
      upload = None
    if upload and refused(request, response, storage, upload['bucket'], upload['name']):
      return None
    return original['upload_partial'](request, response, storage, *args, **kwargs)

  def insert(request, response, storage, *args, **kwargs):
    if 'upload_id' in request.query:  # a resumable upload finished through POST
      return upload_partial(request, response, storage, *args, **kwargs)
    name = _query(request, 'name')
    if name is None and isinstance(request.data, dict):
      name = (request.data.get('meta') or {}).get('name') or request.data.get('name')
    if name and refused(request, response, storage, request.params['bucket_name'], name):
      return None
    return original['insert'](request, response, storage, *args, **kwargs)

  def delete(request, response, storage, *args, **kwargs):
    if refused(request, response, storage, request.params['bucket_name'],
               request.params['object_id']):
      return None
    return original['delete'](request, response, storage, *args, **kwargs)

  def ls(request, response, storage, *args, **kwargs):
    start, end = _query(request, 'startOffset'), _query(request, 'endOffset')
    if start or end:
      send = response.json

      def json(body):
        if isinstance(body, dict) and 'items' in body:
          body['items'] = [item for item in body['items']
                           if (not start or item['name'] >= start) and
                           (not end or item['name'] < end)]
        send(body)
      response.json = json
    return original['ls'](request, response, storage, *args, **kwargs)

  def download(request, response, storage, *args, **kwargs):
    bucket, name = request.params['bucket_name'], request.params['object_id']
    if refused(request, response, storage, bucket, name, reading=True):
      return None
    try:
      obj = storage.get_file_obj(bucket, name)
      response['x-goog-generation'] = str(obj.get('generation'))
      response['x-goog-metageneration'] = str(obj.get('metageneration', 1))
    except NotFound:
      pass
    return original['download'](request, response, storage, *args, **kwargs)

  def move(request, response, storage, *unused_args, **unused_kwargs):
    bucket = request.params['bucket_name']
    source, target = request.params['object_id'], request.params['dest_object_id']
    if refused(request, response, storage, bucket, target):
      return None
    try:
      moved = objects._copy(request.base_url, storage, bucket, source, bucket, target)  # pylint: disable=protected-access
      storage.delete_file(bucket, source)
    except NotFound:
      response.status = HTTPStatus.NOT_FOUND
      return None
    response.json(moved)
    return None

  replacements = {original['insert']: insert, original['upload_partial']: upload_partial,
                  original['delete']: delete, original['ls']: ls,
                  original['download']: download}
  for _, handlers in server.HANDLERS:
    for method, handler in list(handlers.items()):
      if handler in replacements:
        handlers[method] = replacements[handler]
  objects.insert = insert  # the router's fallback for uploads POSTed to .../o
  objects.download = download  # what `get` calls for ?alt=media
  move_routes = tuple(
      (rf'^{prefix}/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/'
       rf'(?P<dest_object_id>.*[^/]+)$', {server.POST: move})
      for prefix in ('/storage/v1', ''))
  server.HANDLERS = move_routes + tuple(server.HANDLERS)
  server._jaxnmt_patched = True  # pylint: disable=protected-access


def serve(port: int, bucket: str, host: str = '127.0.0.1') -> None:
  """Serves an in-memory emulator holding `bucket` until the process is killed."""
  from gcp_storage_emulator import server  # pylint: disable=g-import-not-at-top
  logging.getLogger('gcp_storage_emulator').setLevel(logging.CRITICAL)  # 404s log ERROR
  _patch()
  emulator = server.create_server(host, port, in_memory=True, default_bucket=bucket)
  emulator.start()
  print(f'emulator on http://{host}:{port}, bucket {bucket}', flush=True)
  try:
    while True:
      time.sleep(1)
  finally:
    emulator.stop()


if __name__ == '__main__':
  parser = argparse.ArgumentParser()
  parser.add_argument('--port', type=int, required=True)
  parser.add_argument('--bucket', default='bucket')
  flags = parser.parse_args()
  serve(flags.port, flags.bucket)
