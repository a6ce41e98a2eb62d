"""data/inputs: a corpus download happens on process 0 alone, the others wait for it (a
local HTTP server counts the requests; no internet is needed); a workdir whose tokenizer
is not the prepared data's is refused."""

import http.server
import os
import shutil
import threading

import jax
import ml_collections
import pytest

from jaxnmt.data import inputs
from jaxnmt.errors import DataError
from tests.tiny_config import tiny_config

TEXT = 'First Citizen:\nBefore we proceed any further, hear me speak.\n'


@pytest.fixture
def server():
  """Serves TEXT at /corpus.txt on 127.0.0.1; `server.requests` counts the GETs."""
  class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # pylint: disable=invalid-name
      httpd.requests += 1
      body = TEXT.encode()
      self.send_response(200)
      self.send_header('Content-Length', str(len(body)))
      self.end_headers()
      self.wfile.write(body)

    def log_message(self, *unused):
      pass

  httpd = http.server.HTTPServer(('127.0.0.1', 0), Handler)
  httpd.requests = 0
  httpd.url = f'http://127.0.0.1:{httpd.server_address[1]}/corpus.txt'
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield httpd
  httpd.shutdown()
  httpd.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> str:
  """An empty download cache (~/.cache/jaxnmt under a fresh home), no data dir."""
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  monkeypatch.delenv('JAXNMT_DATA_DIR', raising=False)
  return str(tmp_path / 'home' / '.cache' / 'jaxnmt')


def _config(url: str):
  return ml_collections.ConfigDict(
      {'data': {'path': '', 'url': url, 'filename': 'corpus.txt'}})


def _as_process(monkeypatch, index: int) -> None:
  monkeypatch.setattr(jax, 'process_index', lambda *unused, **unused_kw: index)


def test_process_zero_downloads_once(server, cache):
  path = inputs.corpus_path(_config(server.url))
  assert path == os.path.join(cache, 'corpus.txt')
  assert open(path, encoding='utf-8').read() == TEXT
  assert inputs.corpus_path(_config(server.url)) == path  # cached
  assert server.requests == 1
  assert os.listdir(cache) == ['corpus.txt']  # no partial file left


def test_other_processes_wait_for_process_zero(server, cache, monkeypatch):
  _as_process(monkeypatch, 1)
  def process_zero_done():  # its download lands in the shared cache a moment later
    os.makedirs(cache, exist_ok=True)
    with open(os.path.join(cache, 'corpus.txt'), 'w', encoding='utf-8') as handle:
      handle.write('from process 0\n')
  threading.Timer(0.5, process_zero_done).start()
  path = inputs.corpus_path(_config(server.url))
  assert open(path, encoding='utf-8').read() == 'from process 0\n'
  assert server.requests == 0


def test_a_host_without_the_shared_cache_downloads_after_the_wait(server, cache,
                                                                  monkeypatch):
  _as_process(monkeypatch, 1)
  monkeypatch.setattr(inputs, 'DOWNLOAD_WAIT_S', 0.3)
  path = inputs.corpus_path(_config(server.url))
  assert open(path, encoding='utf-8').read() == TEXT
  assert server.requests == 1


def test_prepare_downloads_the_default_corpus_on_process_zero_only(server, cache,
                                                                   monkeypatch, tmp_path):
  config = tiny_config('')
  config.data.url, config.data.filename = server.url, 'corpus.txt'
  _as_process(monkeypatch, 1)
  # Alone, process 1 finds no prepared data (process 0 prepares it); it never downloads.
  with pytest.raises(DataError, match='holds no manifest.json'):
    inputs.prepare_data(config, str(tmp_path / 'run'))
  assert server.requests == 0


def test_a_workdir_tokenizer_other_than_the_prepared_one_is_refused(trained_workdir,
                                                                    small_corpus, tmp_path):
  workdir = tmp_path / 'other_tokenizer_data'
  shutil.copytree(trained_workdir, workdir, ignore=shutil.ignore_patterns('checkpoints'))
  config = tiny_config(small_corpus)
  assert inputs.prepare_data(config, str(workdir), progress=False)  # its own: accepted
  shutil.copyfile(workdir / 'data' / 'manifest.json', workdir / 'tokenizer.model')
  with pytest.raises(DataError, match='is not the tokenizer of the prepared data'):
    inputs.prepare_data(config, str(workdir), progress=False)
