"""`--mode=serve` (commands/serve): the HTTP translation server, started once per module
on the tiny trained model and spoken to with http.client."""

import http.client
import json
import os
import re
import signal
import subprocess
import threading
import time

import jax
import pytest

from jaxnmt.commands import serve
from jaxnmt.decoding import translation
from tests.helpers import start_main

LIMITS = serve.Limits(max_request_sentences=8, max_sentence_tokens=48)


@pytest.fixture(scope='module')
def server(loaded):
  translator = translation.Translator(loaded, translation.DecodeOptions(beam_size=2))
  running = serve.Server(translator, port=0, limits=LIMITS, batch_size=16).start()
  yield running
  running.stop()


@pytest.fixture(scope='module')
def sentences(trained_workdir):
  with open(os.path.join(trained_workdir, 'splits', 'test.src'), encoding='utf-8') as handle:
    lines = [line for line in handle.read().splitlines() if len(line) < 60]
  return lines[:16]


def _request(server, method, path, body=None, headers=None):
  """-> (status, decoded JSON answer)."""
  host, port = server.httpd.server_address[:2]
  connection = http.client.HTTPConnection(host, port, timeout=300)
  try:
    if isinstance(body, (list, dict)):
      body = json.dumps(body)
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    return response.status, json.loads(response.read())
  finally:
    connection.close()


def _translate(server, payload):
  status, answer = _request(server, 'POST', '/translate', payload)
  assert status == 200, answer
  return answer


def test_health_reports_the_model_and_limits_the_server_runs_with(server):
  status, answer = _request(server, 'GET', '/health')
  assert status == 200
  assert answer['status'] == 'ok' and answer['step'] == 20 and answer['weights'] == 'raw'
  assert answer['beam_size'] == 2 and answer['devices'] == len(jax.local_devices())
  assert answer['queued_requests'] == 0 and answer['uptime_s'] >= 0
  # The limits it reports are the ones it enforces (test_bad_requests_...).
  assert (answer['max_request_sentences'], answer['max_sentence_tokens']) == (8, 48)


def test_translate_and_nbest(server, sentences):
  answer = _translate(server, sentences[:3] + [''])
  assert len(answer['translations']) == 4 and answer['translations'][3] == ''
  assert all(isinstance(text, str) for text in answer['translations'])
  assert answer['step'] == 20 and 'nbest' not in answer
  again = _translate(server, {'sentences': sentences[:3], 'nbest': 2})
  assert again['translations'] == answer['translations'][:3]
  assert [hs[0]['translation'] for hs in again['nbest']] == again['translations']
  answer = _translate(server, {'sentences': ['Hello.', 'Thank you.'], 'beam_size': 3,
                               'nbest': 3})
  for translation, score, hypotheses in zip(answer['translations'], answer['scores'],
                                            answer['nbest']):
    assert len(hypotheses) == 3
    assert hypotheses[0] == {'translation': translation, 'score': score}
    scores = [h['score'] for h in hypotheses]
    assert scores == sorted(scores, reverse=True)


LONG = 'word ' * 500


@pytest.mark.parametrize('method, path, body, status, message', [
    ('POST', '/translate', 'not json', 400, 'not JSON'),
    ('POST', '/translate', b'\xff\xfe', 400, 'not JSON'),
    ('POST', '/translate', '42', 400, 'a list of sentences or an object'),
    ('POST', '/translate', '[1, 2]', 400, 'must be a list of strings'),
    ('POST', '/translate', '{"sentences": "Hello."}', 400, 'must be a list of strings'),
    ('POST', '/translate', '[]', 400, 'is empty'),
    ('POST', '/translate', json.dumps(['Hi.'] * 9), 400, 'at most 8 per request'),
    ('POST', '/translate', json.dumps(['Hi.', LONG]), 400, 'sentence 1 has 2500 characters'),
    ('POST', '/translate', json.dumps(['word ' * 60]), 400, 'sentence 0 has'),
    ('POST', '/translate', '{"sentences": ["Hi."], "beam": 2}', 400, "unknown fields ['beam']"),
    ('POST', '/translate', '{"sentences": ["Hi."], "beam_size": 0}', 400, '"beam_size" must'),
    ('POST', '/translate', '{"sentences": ["Hi."], "beam_size": 17}', 400, '"beam_size" must'),
    ('POST', '/translate', '{"sentences": ["Hi."], "nbest": 3}', 400, 'in [1, 2], got 3'),
    ('POST', '/translate', '{"sentences": ["Hi."], "nbest": "2"}', 400, '"nbest" must'),
    ('POST', '/translate', '{"sentences": ["Hi."], "beam_size": 1, "nbest": 2}', 400,
     'in [1, 1]'),
    ('POST', '/translate', '{"sentences": ["Hi."], "target_lang": "fr"}', 400,
     'this model has no tag <2fr>'),
    ('GET', '/nowhere', None, 404, 'no GET /nowhere'),
    ('POST', '/health', '[]', 405, 'no POST /health'),
    ('GET', '/translate', None, 405, 'no GET /translate'),
])
def test_bad_requests_get_a_4xx_and_the_server_stays_up(server, method, path, body, status,
                                                        message):
  got, answer = _request(server, method, path, body)
  assert got == status and message in answer['error'], answer
  assert _request(server, 'GET', '/health')[0] == 200
  assert len(_translate(server, ['Hello.'])['translations']) == 1


def test_a_missing_or_huge_body_is_refused(server):
  host, port = server.httpd.server_address[:2]
  for headers, status in (({}, 411), ({'Content-Length': str(10 ** 8)}, 413)):
    connection = http.client.HTTPConnection(host, port, timeout=60)
    connection.putrequest('POST', '/translate')
    for name, value in headers.items():
      connection.putheader(name, value)
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == status and 'error' in json.loads(response.read())
    connection.close()
  assert _request(server, 'GET', '/health')[0] == 200


def test_an_internal_error_is_a_500_and_the_server_stays_up(server, monkeypatch):
  def broken(*unused_args, **unused_kwargs):
    raise RuntimeError('the decoder broke')
  monkeypatch.setattr(server.translator, 'decode_encoded', broken)
  status, answer = _request(server, 'POST', '/translate', ['Hello.'])
  assert status == 500 and 'the decoder broke' in answer['error']
  monkeypatch.undo()
  assert len(_translate(server, ['Hello.'])['translations']) == 1


def test_concurrent_requests_are_batched_and_answer_as_alone(server, sentences, monkeypatch):
  alone = [_translate(server, [sentence]) for sentence in sentences]
  batch_sizes = []
  decode_encoded = server.translator.decode_encoded

  def counting(encoded, *args, **kwargs):
    batch_sizes.append(len(encoded))
    return decode_encoded(encoded, *args, **kwargs)

  monkeypatch.setattr(server.translator, 'decode_encoded', counting)
  answers = [None] * len(sentences)
  start = threading.Barrier(len(sentences))

  def client(index):
    start.wait()
    answers[index] = _translate(server, [sentences[index]])

  threads = [threading.Thread(target=client, args=(i,)) for i in range(len(sentences))]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join(timeout=300)
  assert max(batch_sizes) > 1  # some requests were decoded together
  for single, concurrent in zip(alone, answers):
    assert concurrent['translations'] == single['translations']
    assert concurrent['scores'] == pytest.approx(single['scores'], abs=1e-4)


@pytest.mark.slow
def test_serve_mode_stops_on_sigterm(trained_workdir):
  process = start_main('--mode=serve', f'--workdir={trained_workdir}', '--port=0',
                       '--beam_size=1', stdout=subprocess.DEVNULL, start_new_session=False)
  try:
    deadline, url, log = time.monotonic() + 240, None, []
    while url is None and time.monotonic() < deadline:
      line = process.stderr.readline()
      assert line, ''.join(log)[-2000:]
      log.append(line)
      url = re.search(r'on http://([\d.]+):(\d+)', line)
    host, port = url.group(1), int(url.group(2))
    connection = http.client.HTTPConnection(host, port, timeout=120)
    connection.request('POST', '/translate', body=json.dumps(['Hello.']))
    response = connection.getresponse()
    assert response.status == 200 and len(json.loads(response.read())['translations']) == 1
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    assert 'Server stopped' in process.stderr.read()
  finally:
    process.kill()
