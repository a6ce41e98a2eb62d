"""`--mode=translate --input --output` on several processes (launch/local.sh, one CPU
device each): 2,000 lines sampled on 1, 2 and 4 processes give the same bytes, also
when one process is killed with SIGKILL mid-run and the job is run again (no line
missing, none twice)."""

import json
import os
import signal
import time

import pytest

from tests.helpers import environment, real_pairs, run_main, start_main

pytestmark = pytest.mark.slow

SAMPLING = ('--temperature=1.0', '--top_k=20', '--decode_seed=5', '--commit_lines=200')


@pytest.fixture(scope='module')
def compiled(tmp_path_factory) -> tuple[str, ...]:
  """One persistent compilation cache for every run here: the first run compiles the
  decode shapes, the others (any process count) load them; decoding is the same."""
  return (f'--compilation_cache_dir={tmp_path_factory.mktemp("xla_cache")}',)


@pytest.fixture(scope='module')
def corpus(tmp_path_factory) -> str:
  """2,000 English lines, every 97th blank."""
  path = tmp_path_factory.mktemp('corpus') / 'in.txt'
  pairs = real_pairs(5000)[3000:]
  path.write_text(''.join(('' if i % 97 == 0 else en) + '\n'
                          for i, (en, _) in enumerate(pairs)), encoding='utf-8')
  return str(path)


def _translate(workdir, corpus, output, processes: int, *extra):
  result = run_main('--mode=translate', f'--workdir={workdir}', f'--input={corpus}',
                    f'--output={output}', *SAMPLING, *extra, processes=processes,
                    devices=1, timeout=480, env=_environment(processes))
  assert result.returncode == 0, result.stderr[-3000:]
  return open(output, 'rb').read()


def _environment(processes: int) -> dict:
  # Small decode programs too (JAX caches only those that took a second to compile).
  return environment('', processes, 1, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')


def _done(parts: str) -> list[str]:
  """The chunks committed in `parts` (their counts files)."""
  if not os.path.isdir(parts):
    return []
  return sorted(name for name in os.listdir(parts) if name[:8].isdigit()
                and name.endswith('.json'))


def _process_id(number: int, marker: str) -> int:
  """The pid of process `number` of the job whose command line holds `marker`."""
  for pid in filter(str.isdigit, os.listdir('/proc')):
    try:
      with open(f'/proc/{pid}/cmdline', 'rb') as handle:
        words = handle.read().decode(errors='replace').split('\0')
    except OSError:
      continue
    if f'--process_id={number}' in words and any(marker in word for word in words):
      return int(pid)
  raise AssertionError(f'process {number} of the job writing {marker} not found')


def test_any_process_count_and_a_killed_process_give_the_same_bytes(trained_workdir,
                                                                     corpus, compiled,
                                                                     tmp_path):
  one = _translate(trained_workdir, corpus, tmp_path / 'one.txt', 1, *compiled)
  assert one.count(b'\n') == 2000 and len(set(one.split(b'\n'))) > 1000
  assert _translate(trained_workdir, corpus, tmp_path / 'two.txt', 2, *compiled) == one
  assert _translate(trained_workdir, corpus, tmp_path / 'four.txt', 4, *compiled) == one
  # Kill -9 process 1 once a few chunks are committed; the job ends (exit 1, the peer
  # watch names the lost process); the same command then finishes it.
  output = tmp_path / 'killed.txt'
  parts = f'{output}.parts'
  job = start_main('--mode=translate', f'--workdir={trained_workdir}', f'--input={corpus}',
                   f'--output={output}', *SAMPLING, *compiled, '--peer_timeout_s=5',
                   processes=2, devices=1, env=_environment(2))
  try:
    deadline = time.monotonic() + 180
    while not (os.path.isdir(parts) and
               len(_done(parts)) >= 4):
      assert job.poll() is None and time.monotonic() < deadline, job.communicate()[1][-3000:]
      time.sleep(0.2)
    os.kill(_process_id(1, str(output)), signal.SIGKILL)
    _, stderr = job.communicate(timeout=120)
  finally:
    if job.poll() is None:
      os.killpg(job.pid, signal.SIGKILL)
  assert job.returncode != 0
  assert 'lost process 1' in stderr, stderr[-3000:]
  assert not output.exists()
  done = _done(parts)
  assert 4 <= len(done) < 10  # stopped mid-run
  result = run_main('--mode=translate', f'--workdir={trained_workdir}', f'--input={corpus}',
                    f'--output={output}', *SAMPLING, *compiled, processes=2, devices=1,
                    timeout=480, env=_environment(2))
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'{len(done)} chunks done before' in result.stderr
  assert output.read_bytes() == one
  assert not os.path.exists(parts)


def test_eval_worker_on_two_processes_gives_the_one_process_bleu(workdir_copy, compiled,
                                                                tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  other = str(tmp_path / 'other')
  shutil.copytree(workdir_copy, other)
  results = {}
  for workdir, processes in ((workdir_copy, 1), (other, 2)):
    result = run_main('--mode=eval', f'--workdir={workdir}', '--checkpoint_step=20',
                      '--beam_size=2', '--max_valid_sentences=20', *compiled,
                      processes=processes, devices=1, timeout=480,
                      env=_environment(processes))
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(workdir, 'eval', 'results.jsonl'), encoding='utf-8') as handle:
      results[processes] = [json.loads(line) for line in handle][-1]
    with open(os.path.join(workdir, 'eval', 'test_hypotheses_20.txt'), 'rb') as handle:
      results[processes]['text'] = handle.read()
  assert results[2]['text'] == results[1]['text']
  for key in ('bleu', 'chrf', 'valid_bleu'):
    assert results[2][key] == results[1][key], key
  # The loss is every process's own (not split); XLA:CPU settings differ between one
  # process and several (host.prepare), hence a last-digit difference.
  assert abs(results[2]['valid_loss'] - results[1]['valid_loss']) < 1e-5
