"""Before/after ratios of the speed switches, measured in one process: each variant (a
set of config overrides) is compiled once, then the variants take turns for several
rounds on the same real packed batches (a variant that changes the data pipeline, e.g.
packing off, gets its own), so a busy machine slows them all alike.

  python benchmarks/train_speed.py --config=configs/tiny.py --workdir=runs/speed \
      --variant=baseline: --variant=no_packing:data.packing=False \
      --variant=bf16:model.dtype=bfloat16

A variant is NAME:field=value,field=value (fields as in --config.<field>). Prints one
line per variant: median step, real tokens/s, MFU on real tokens and the ratio of its
real tokens/s to the first variant's.
"""

import ast
import copy
import json
import statistics
import time

import jax
from absl import app
from absl import flags
from ml_collections import config_flags

from jaxnmt.commands import bench
from jaxnmt import config_lib
from jaxnmt.runtime import host
from jaxnmt.data import inputs
from jaxnmt.training import optim
from jaxnmt.runtime import sharding
from jaxnmt.training import steps
from jaxnmt.training import train_state

config_flags.DEFINE_config_file('config', 'configs/tiny.py', 'Run config.')
flags.DEFINE_string('workdir', None, 'Workdir for the tokenizer and splits.', required=True)
flags.DEFINE_multi_string('variant', ['baseline:'], 'NAME:field=value,... (repeatable).')
flags.DEFINE_integer('rounds', 4, 'Rounds over all variants.')
flags.DEFINE_integer('steps', 3, 'Timed steps per variant per round.')
flags.DEFINE_integer('batches', 4, 'Distinct real batches cycled through.')
FLAGS = flags.FLAGS

_DATA_FIELDS = ('data.', 'tokenizer.')


def _parse(spec: str, base):
  name, _, assignments = spec.partition(':')
  config = copy.deepcopy(base)
  overrides = {}
  for assignment in filter(None, assignments.split(',')):
    field, value = assignment.split('=', 1)
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass  # a bare string
    node = config
    *parents, last = field.split('.')
    for parent in parents:
      node = node[parent]
    node[last] = value
    overrides[field] = value
  config_lib.validate(config)
  return name, config, overrides


def _variant(config, workdir: str, batches_cache: dict):
  """(run one step -> (real source, real target) tokens, model config)."""
  mesh, rules = sharding.plan_mesh(config)
  data_key = json.dumps({k: v for k, v in config.to_dict().items() if k in ('data', 'tokenizer')},
                        sort_keys=True)
  if data_key not in batches_cache:
    run_inputs = inputs.training_inputs(config, workdir)
    tokenizer, iterator = run_inputs.tokenizer, iter(run_inputs.train_data)
    batches_cache[data_key] = (tokenizer, [next(iterator) for _ in range(FLAGS.batches)])
    iterator.close()
  tokenizer, host_batches = batches_cache[data_key]
  model_cfg = config_lib.model_config(config, tokenizer.vocab_size)
  tx, _ = optim.make_optimizer(config.optim, config.num_train_steps)
  graphdef, state, rest, shardings = train_state.create_train_state(model_cfg, tx, config.seed,
                                                              mesh, rules)
  step_fn, _ = steps.compile_steps(graphdef, tx, config, mesh, rules, shardings)
  where = sharding.batch_sharding(mesh, rules)
  batches = [sharding.to_global(batch, where) for batch in host_batches]
  holder = {'state': state, 'index': 0}

  def run():
    batch = batches[holder['index'] % len(batches)]
    holder['index'] += 1
    holder['state'], metrics = step_fn(holder['state'], rest, batch)
    metrics = jax.device_get(metrics)
    return float(metrics['source_tokens']), float(metrics['tokens'])

  run()  # compile
  run()
  return run, model_cfg


def main(_):
  host.prepare('auto', 'auto', multi_process=False)  # as jaxnmt.main does
  base = FLAGS.config
  variants = [_parse(spec, base) for spec in FLAGS.variant]
  cache, runners = {}, {}
  for name, config, _ in variants:
    runners[name] = _variant(config, FLAGS.workdir, cache)
  peaks = [bench.device_peak()]
  times = {name: [] for name in runners}
  tokens = {name: [0.0, 0.0] for name in runners}
  for _ in range(FLAGS.rounds):
    for name, (run, _) in runners.items():
      for _ in range(FLAGS.steps):
        started = time.perf_counter()
        source, target = run()
        times[name].append(time.perf_counter() - started)
        tokens[name][0] += source
        tokens[name][1] += target
    peaks.append(bench.device_peak())  # after every round; the highest is used
  peak, peak_source = max(peaks)
  print(f'peak: {peak / 1e9:.1f} GFLOP/s ({peak_source})')
  first = None
  for name, config, overrides in variants:
    _, model_cfg = runners[name]
    steps = len(times[name])
    median = statistics.median(times[name])
    real_per_step = sum(tokens[name]) / steps
    flops_per_step = bench.model_flops(model_cfg, tokens[name][0] / steps,
                                       tokens[name][1] / steps,
                                       config.data.max_source_length,
                                       config.data.max_target_length)
    rate = real_per_step / median
    first = rate if first is None else first
    print(json.dumps({'variant': name, 'overrides': overrides,
                      'median_step_seconds': round(median, 4),
                      'real_tokens_per_sec': round(rate, 1),
                      'mfu': round(flops_per_step / median / peak, 4) if peak else None,
                      'ratio_to_first': round(rate / first, 3)}), flush=True)


if __name__ == '__main__':
  app.run(main)
