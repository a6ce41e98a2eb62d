"""Load test of `--mode=serve`: requests/s and latency for concurrent clients, each
sending one sentence per request (sentences from WORKDIR/splits/test.src).

  python benchmarks/serve_load.py --workdir=runs/tiny                # starts a server here
  python benchmarks/serve_load.py --workdir=runs/tiny --url=http://127.0.0.1:8080

Without --url the server runs in this process on all local devices (its HTTP threads
then share the interpreter with the clients; --url measures a separate server). Every
sentence is first sent once, alone, so that every decode shape is compiled before the
timed runs (the server's shapes are fixed per length bucket).
"""

import http.client
import json
import os
import threading
import time
import urllib.parse

import numpy as np
from absl import app
from absl import flags

flags.DEFINE_string('workdir', None, 'A trained translation workdir (its test split '
                    'gives the sentences; without --url, its model is served).',
                    required=True)
flags.DEFINE_string('url', None, 'A running server (default: start one here).')
flags.DEFINE_list('clients', ['1', '16'], 'Concurrent clients, one run each.')
flags.DEFINE_integer('requests', 128, 'Requests per run.')
flags.DEFINE_integer('sentences', 64, 'Distinct test sentences sent.')
flags.DEFINE_integer('beam_size', 4, 'Beam size of the server started here.')
flags.DEFINE_integer('batch_size', 32, 'Batch rows of the server started here.')
FLAGS = flags.FLAGS


def _post(address, sentence: str) -> float:
  """One request on a new connection -> its latency in seconds."""
  started = time.perf_counter()
  connection = http.client.HTTPConnection(*address, timeout=600)
  try:
    connection.request('POST', '/translate', body=json.dumps([sentence]),
                       headers={'Content-Type': 'application/json'})
    response = connection.getresponse()
    body = response.read()
    if response.status != 200:
      raise RuntimeError(f'{response.status}: {body[:200]!r}')
  finally:
    connection.close()
  return time.perf_counter() - started


def measure(address, sentences: list[str], clients: int, requests: int) -> dict:
  """`clients` threads send `requests` requests in all, one sentence each."""
  latencies, lock, next_index = [], threading.Lock(), [0]

  def client():
    while True:
      with lock:
        index = next_index[0]
        next_index[0] += 1
      if index >= requests:
        return
      latency = _post(address, sentences[index % len(sentences)])
      with lock:
        latencies.append(latency)

  threads = [threading.Thread(target=client) for _ in range(clients)]
  started = time.perf_counter()
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  seconds = time.perf_counter() - started
  latencies = np.array(latencies) * 1000
  return {'clients': clients, 'requests': requests, 'seconds': seconds,
          'requests_per_sec': requests / seconds, 'p50_ms': float(np.percentile(latencies, 50)),
          'p95_ms': float(np.percentile(latencies, 95)), 'max_ms': float(latencies.max())}


def main(_):
  with open(os.path.join(FLAGS.workdir, 'splits', 'test.src'), encoding='utf-8') as handle:
    sentences = [line for line in handle.read().splitlines() if line.strip()]
  sentences = sentences[:FLAGS.sentences]
  server = None
  if FLAGS.url:
    parts = urllib.parse.urlsplit(FLAGS.url)
    address = (parts.hostname, parts.port or 80)
  else:
    # pylint: disable=g-import-not-at-top
    from jaxnmt.runtime import host
    host.prepare('auto', 'auto', multi_process=False, decoding=True)  # as serve does
    import jax
    from jaxnmt.commands import serve
    from jaxnmt.decoding import translation
    translator = translation.Translator.from_workdir(
        FLAGS.workdir, options=translation.DecodeOptions(beam_size=FLAGS.beam_size),
        devices=jax.local_devices())
    server = serve.Server(translator, port=0, batch_size=FLAGS.batch_size).start()
    address = server.httpd.server_address[:2]
  try:
    started = time.perf_counter()
    for sentence in sentences:  # compiles every shape
      _post(address, sentence)
    print(f'warm-up: {len(sentences)} sentences in {time.perf_counter() - started:.1f} s',
          flush=True)
    rows = [measure(address, sentences, int(clients), FLAGS.requests)
            for clients in FLAGS.clients]
  finally:
    if server is not None:
      server.stop()
  print(f'{"clients":>7} {"requests":>8} {"req/s":>8} {"p50 ms":>8} {"p95 ms":>8} '
        f'{"max ms":>8}')
  for row in rows:
    print(f'{row["clients"]:>7} {row["requests"]:>8} {row["requests_per_sec"]:>8.1f} '
          f'{row["p50_ms"]:>8.1f} {row["p95_ms"]:>8.1f} {row["max_ms"]:>8.1f}')
  print(json.dumps(rows))


if __name__ == '__main__':
  app.run(main)
