"""`--mode=serve`: translation over HTTP, with the standard library only.

  POST /translate   ["a sentence", ...]  or  {"sentences": [...], "beam_size": 4, "nbest": 2}
                    (+ "target_lang": "es" for a multilingual model; default --target_lang)
      -> {"translations": [...], "scores": [...], "step": 20}
         (+ "nbest": [[{"translation": ..., "score": ...}, ...], ...] when asked for)
  GET /health       -> {"status": "ok", "step": 20, "weights": ..., ...}

Request threads (`http.server.ThreadingHTTPServer`) validate and tokenize, then queue a
job; one decode worker thread takes every job already queued (up to a token budget),
decodes their sentences together, and answers each. Decode shapes are fixed per length
bucket (`Translator.decode_encoded(..., fixed_rows=True)`), so a sentence's translation
does not depend on what it was batched with. A bad request gets a 4xx and an internal
error a 500, each with {"error": message}; the server stays up. SIGTERM or SIGINT
stops it: no new connections, queued jobs are finished, then it exits.
"""

import dataclasses
import json
import logging
import queue
import signal
import threading
import time
import urllib.parse
from http import server as http_server

from jaxnmt.decoding import translation
from jaxnmt.errors import UserError

MAX_BODY_BYTES = 1 << 20
MAX_BEAM_SIZE = 16
CHARS_PER_TOKEN = 8  # a sentence over max_sentence_tokens * this many characters is refused
ANSWER_TIMEOUT_S = 600.0


@dataclasses.dataclass(frozen=True)
class Limits:
  max_request_sentences: int = 64
  max_sentence_tokens: int = 256  # source tokens, EOS included


class BadRequest(Exception):
  """A request the client can fix: answered with `status` and the message."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


@dataclasses.dataclass
class _Job:
  encoded: list  # token ids (None: blank) per sentence
  options: translation.DecodeOptions
  nbest: int
  done: threading.Event = dataclasses.field(default_factory=threading.Event)
  results: list | None = None  # per sentence, a list of Hypothesis
  error: Exception | None = None

  @property
  def tokens(self) -> int:
    return sum(translation.source_tokens(ids) for ids in self.encoded)


class DecodeWorker:
  """The one thread that decodes: batches all queued jobs up to `batch_tokens` source
  tokens (a job is never split), one decode per decoding options."""

  def __init__(self, translator: translation.Translator, batch_size: int):
    self.translator, self.batch_size = translator, batch_size
    self._queue = queue.Queue()
    self._stopping = False
    self._thread = threading.Thread(target=self._loop, name='decode-worker', daemon=True)
    self._thread.start()

  def submit(self, job: _Job) -> None:
    if self._stopping:
      raise BadRequest(503, 'the server is shutting down')
    self._queue.put(job)

  def queued(self) -> int:
    return self._queue.qsize()

  def stop(self, timeout: float | None = None) -> None:
    """Finishes the queued jobs, then ends the thread."""
    self._stopping = True
    self._queue.put(None)
    self._thread.join(timeout)

  def _loop(self) -> None:
    stopping = False
    while not stopping:
      jobs = [self._queue.get()]
      if jobs[0] is None:
        break
      tokens = jobs[0].tokens
      while tokens < self.translator.batch_tokens:
        try:
          job = self._queue.get_nowait()
        except queue.Empty:
          break
        if job is None:
          stopping = True  # after this round: the sentinel came after these jobs
          break
        jobs.append(job)
        tokens += job.tokens
      by_options = {}
      for job in jobs:
        by_options.setdefault(job.options, []).append(job)
      for options, group in by_options.items():
        self._decode(options, group)

  def _decode(self, options: translation.DecodeOptions, jobs: list[_Job]) -> None:
    try:
      encoded = [ids for job in jobs for ids in job.encoded]
      results = self.translator.decode_encoded(
          encoded, max(job.nbest for job in jobs), self.batch_size, options,
          fixed_rows=True)
      start = 0
      for job in jobs:
        job.results = results[start:start + len(job.encoded)]
        start += len(job.encoded)
    except Exception as error:  # pylint: disable=broad-except
      logging.exception('decoding failed')
      for job in jobs:
        job.error = error
    finally:
      for job in jobs:
        job.done.set()


def parse_request(body: bytes, translator: translation.Translator, limits: Limits,
                  options: translation.DecodeOptions) -> tuple[_Job, bool]:
  """A /translate body -> (the job, whether n-best lists were asked for); BadRequest
  says what is wrong."""
  try:
    request = json.loads(body.decode('utf-8'))
  except (UnicodeDecodeError, ValueError) as error:
    raise BadRequest(400, f'the body is not JSON: {error}') from None
  if isinstance(request, list):
    request = {'sentences': request}
  if not isinstance(request, dict):
    raise BadRequest(400, 'the body must be a list of sentences or an object with '
                          '"sentences"')
  unknown = sorted(set(request) - {'sentences', 'beam_size', 'nbest', 'target_lang'})
  if unknown:
    raise BadRequest(400, f'unknown fields {unknown}: expected "sentences", "beam_size", '
                          f'"nbest", "target_lang"')
  sentences = request.get('sentences')
  if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
    raise BadRequest(400, '"sentences" must be a list of strings')
  if not sentences:
    raise BadRequest(400, '"sentences" is empty')
  if len(sentences) > limits.max_request_sentences:
    raise BadRequest(400, f'{len(sentences)} sentences: at most '
                          f'{limits.max_request_sentences} per request')
  beam_size = _integer(request, 'beam_size', options.beam_size, 1, MAX_BEAM_SIZE)
  options = dataclasses.replace(options, beam_size=beam_size)
  nbest = _integer(request, 'nbest', 1, 1, options.max_nbest)
  max_tokens = min(limits.max_sentence_tokens, translator.max_source_tokens or 1 << 30)
  for index, sentence in enumerate(sentences):
    if len(sentence) > max_tokens * CHARS_PER_TOKEN:
      raise BadRequest(400, f'sentence {index} has {len(sentence)} characters: at most '
                            f'{max_tokens * CHARS_PER_TOKEN}')
  try:
    encoded = translator.encode([sentence.replace('\n', ' ') for sentence in sentences],
                                target_lang=request.get('target_lang') or None)
  except UserError as error:  # longer than a learned position table, an unknown tag
    raise BadRequest(400, str(error)) from None
  for index, ids in enumerate(encoded):
    if translation.source_tokens(ids) > max_tokens:
      raise BadRequest(400, f'sentence {index} has {translation.source_tokens(ids)} tokens: '
                            f'at most {max_tokens}')
  return _Job(encoded, options, nbest), 'nbest' in request


def _integer(request: dict, name: str, default: int, low: int, high: int) -> int:
  value = request.get(name, default)
  if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
    raise BadRequest(400, f'"{name}" must be an integer in [{low}, {high}], got {value!r}')
  return value


class _Handler(http_server.BaseHTTPRequestHandler):
  """One request; `self.server.app` is the `Server`."""
  protocol_version = 'HTTP/1.1'
  server_version = 'jaxnmt'

  def do_GET(self):  # pylint: disable=invalid-name
    path = urllib.parse.urlsplit(self.path).path
    if path == '/health':
      self._answer(200, self.server.app.health())
    else:
      self._error(405 if path == '/translate' else 404, f'no GET {path}')

  def do_POST(self):  # pylint: disable=invalid-name
    path = urllib.parse.urlsplit(self.path).path
    if path != '/translate':
      self._error(405 if path == '/health' else 404, f'no POST {path}')
      return
    try:
      length = self.headers.get('Content-Length')
      if length is None:
        raise BadRequest(411, 'a Content-Length header is required')
      if not length.isdigit():
        raise BadRequest(400, f'bad Content-Length {length!r}')
      if int(length) > MAX_BODY_BYTES:
        raise BadRequest(413, f'the body has {length} bytes: at most {MAX_BODY_BYTES}')
      body = self.rfile.read(int(length))
      self._answer(200, self.server.app.translate(body))
    except BadRequest as error:
      self._error(error.status, str(error))
    except Exception as error:  # pylint: disable=broad-except
      logging.exception('request failed')
      self._error(500, f'internal error: {type(error).__name__}: {error}')

  def _error(self, status: int, message: str) -> None:
    if status in (411, 413) or status >= 500:
      self.close_connection = True  # the body may be unread: the connection is done
    self._answer(status, {'error': message})

  def _answer(self, status: int, payload: dict) -> None:
    data = json.dumps(payload, ensure_ascii=False).encode('utf-8')
    self.send_response(status)
    self.send_header('Content-Type', 'application/json; charset=utf-8')
    self.send_header('Content-Length', str(len(data)))
    if self.close_connection:
      self.send_header('Connection', 'close')
    self.end_headers()
    self.wfile.write(data)

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    logging.debug('%s %s', self.address_string(), format % args)


class _HTTPServer(http_server.ThreadingHTTPServer):
  daemon_threads = True
  request_queue_size = 256  # the listen backlog (default 5: bursts of clients are reset)


class Server:
  """The HTTP server and its decode worker; `start()` runs both in threads."""

  def __init__(self, translator: translation.Translator, host: str = '127.0.0.1',
               port: int = 0, limits: Limits = Limits(), batch_size: int = 64):
    self.translator, self.limits = translator, limits
    self.worker = DecodeWorker(translator, batch_size)
    self.httpd = _HTTPServer((host, port), _Handler)
    self.httpd.app = self
    self._thread = None
    self._started = time.time()

  @property
  def url(self) -> str:
    host, port = self.httpd.server_address[:2]
    return f'http://{host}:{port}'

  def start(self) -> 'Server':
    self._thread = threading.Thread(target=self.httpd.serve_forever, name='http',
                                    daemon=True)
    self._thread.start()
    return self

  def stop(self) -> None:
    """Stops accepting requests, answers the queued ones, closes the socket."""
    self.httpd.shutdown()
    self.worker.stop(ANSWER_TIMEOUT_S)
    self.httpd.server_close()

  def health(self) -> dict:
    translator = self.translator
    return {'status': 'ok', 'step': translator.step,
            'weights': getattr(translator.loaded, 'weights', None),
            'strategy': translator.options.strategy, 'beam_size': translator.options.beam_size,
            'devices': translator.devices, 'queued_requests': self.worker.queued(),
            'uptime_s': round(time.time() - self._started, 1),
            'max_request_sentences': self.limits.max_request_sentences,
            'max_sentence_tokens': self.limits.max_sentence_tokens}

  def translate(self, body: bytes) -> dict:
    """A /translate body -> the answer; BadRequest, or the decode error."""
    job, with_nbest = parse_request(body, self.translator, self.limits,
                                    self.translator.options)
    self.worker.submit(job)
    if not job.done.wait(ANSWER_TIMEOUT_S):
      raise BadRequest(503, f'no translation within {ANSWER_TIMEOUT_S:.0f} s')
    if job.error is not None:
      raise job.error
    answer = {'translations': [hypotheses[0].text for hypotheses in job.results],
              'scores': [hypotheses[0].score for hypotheses in job.results],
              'step': self.translator.step}
    if with_nbest:
      answer['nbest'] = [[{'translation': h.text, 'score': h.score}
                          for h in hypotheses[:job.nbest]] for hypotheses in job.results]
    return answer


def run(workdir: str, host: str, port: int, options: translation.DecodeOptions,
        step: int | None = None, weights: str = 'auto', batch_size: int = 64,
        batch_tokens: int = translation.BATCH_TOKENS, limits: Limits = Limits(),
        target_lang: str | None = None) -> None:
  """Serves checkpoint `step` of `workdir` on all local devices until SIGTERM/SIGINT."""
  import jax  # pylint: disable=g-import-not-at-top
  if not 0 <= port < 65536 or batch_tokens < 1 or limits.max_request_sentences < 1 or \
      limits.max_sentence_tokens < 1:
    raise UserError('--port must be in [0, 65535]; --batch_tokens, '
                    '--max_request_sentences and --max_sentence_tokens >= 1')
  translator = translation.Translator.from_workdir(workdir, step, options, jax.local_devices(),
                                                 weights, batch_tokens, target_lang)
  try:
    server = Server(translator, host, port, limits, batch_size)
  except OSError as error:
    raise UserError(f'cannot listen on {host}:{port}: {error.strerror}') from None
  stop = threading.Event()

  def request_stop(signum, frame):  # pylint: disable=unused-argument
    logging.warning('%s received: stopping the server', signal.Signals(signum).name)
    stop.set()

  previous = {signum: signal.signal(signum, request_stop)
              for signum in (signal.SIGTERM, signal.SIGINT)}
  try:
    server.start()
    logging.info('Serving checkpoint %s of %s on %s (POST /translate, GET /health)',
                 translator.step, workdir, server.url)
    while not stop.wait(0.5):
      pass
  finally:
    server.stop()
    for signum, handler in previous.items():
      signal.signal(signum, handler)
  logging.info('Server stopped')


def main(workdir: str, flags) -> None:
  run(workdir, flags.host, flags.port, translation.DecodeOptions.from_flags(flags),
      step=flags.checkpoint_step, weights=flags.weights, batch_size=flags.serve_batch_size,
      batch_tokens=flags.batch_tokens,
      limits=Limits(flags.max_request_sentences, flags.max_sentence_tokens),
      target_lang=flags.target_lang)
