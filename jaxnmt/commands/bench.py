"""`--mode=bench`: how fast a config trains and decodes on this job's devices.

  python -m jaxnmt.main --mode=bench --config=configs/tiny.py --workdir=runs/bench

Builds everything a training run builds (mesh, tokenizer, Grain pipeline, sharded
state, the jitted step with device prefetch), compiles the step ahead of time, warms
up, then times `--bench_steps` steps and `--bench_decode_sentences` test sentences of
greedy and beam-4 decoding. Prints a table and writes WORKDIR/bench.json. It measures
and reports; it never fails on a slow result. No checkpoint is written.

Model FLOPs (`model_flops`) count the matrix multiplications a step does for the real
(non-padding) tokens of a batch, with the backward pass as twice the forward pass:

  per source token, encoder:  6 * L_enc * (4 D^2 + k D F + 2 S D)
                    + cross-attention keys/values: 6 * L_dec * 2 D^2
  per target token, decoder:  6 * L_dec * (6 D^2 + k D F + 2 T D + 2 S D) + 6 D V
  per token, decoder-only LM: 6 * L * (4 D^2 + k D F + 2 T D) + 6 D V

D model width, F feed-forward width (k = 2, or 3 for SwiGLU), V vocabulary, S and T
the source and target row lengths (attention is computed over whole rows), L layer
counts. MFU = model FLOPs per second / peak FLOPs per second of the devices: the
datasheet dense bf16 peak of an accelerator (table below), or on a CPU a float32 matrix
multiply timed on this machine.
"""

import dataclasses
import json
import os
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxnmt.decoding import inference
from jaxnmt.decoding import translation
from jaxnmt.model import initialize
from jaxnmt.model import transformer
from jaxnmt.runtime import checkpointing
from jaxnmt.runtime import files
from jaxnmt.runtime import host
from jaxnmt.training import feeding
from jaxnmt.training import fit
from jaxnmt.training import setup

# Dense bf16 peak FLOP/s per JAX device (datasheets; TPU v2/v3 devices are single
# cores, half a chip). Matched in order against `device.device_kind`.
ACCELERATOR_PEAKS = (
    ('H100 PCIe', 756e12),
    ('H100', 989e12),
    ('H200', 989e12),
    ('GH200', 989e12),
    ('B200', 2250e12),
    ('A100', 312e12),
    ('A10G', 70e12),
    ('L40S', 362e12),
    ('L4', 121e12),
    ('V100', 125e12),
    ('TPU v6', 918e12),
    ('TPU v5p', 459e12),
    ('TPU v5', 197e12),  # v5e ('TPU v5 lite')
    ('TPU v4', 275e12),
    ('TPU v3', 61.5e12),
    ('TPU v2', 22.5e12),
)


def model_flops(model_cfg: transformer.ModelConfig, source_tokens: float,
                target_tokens: float, source_length: int, target_length: int) -> float:
  """Training FLOPs (forward + backward) for these real-token counts; see the module
  docstring for the formula."""
  d, f, v = model_cfg.d_model, model_cfg.d_ff, model_cfg.vocab_size
  mlp = (3 if model_cfg.activation == 'swiglu' else 2) * d * f
  if model_cfg.kind == 'decoder_lm':
    per_token = model_cfg.num_decoder_layers * (4 * d * d + mlp + 2 * target_length * d)
    return 6.0 * target_tokens * (per_token + d * v)
  per_source = (model_cfg.num_encoder_layers * (4 * d * d + mlp + 2 * source_length * d)
                + model_cfg.num_decoder_layers * 2 * d * d)
  per_target = model_cfg.num_decoder_layers * (
      6 * d * d + mlp + 2 * target_length * d + 2 * source_length * d) + d * v
  return 6.0 * (source_tokens * per_source + target_tokens * per_target)


def measured_matmul_peak(dtype=jnp.float32, size: int = 2048, repeats: int = 10) -> float:
  """FLOP/s of the best of `repeats` [size, size] matrix products on the first local
  device (on a CPU that one device uses every core)."""
  a = jnp.ones((size, size), dtype)
  product = jax.jit(lambda x, y: x @ y)
  product(a, a).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    started = time.perf_counter()
    product(a, a).block_until_ready()
    best = min(best, time.perf_counter() - started)
  return 2.0 * size**3 / best


def device_peak() -> tuple[float, str]:
  """(peak FLOP/s of the whole job, where the figure comes from)."""
  device = jax.devices()[0]
  if device.platform == 'cpu':
    # Virtual CPU devices share the host's cores: the peak is per process, not device.
    peak = measured_matmul_peak()
    return peak * jax.process_count(), (
        f'measured float32 2048x2048 matmul, {peak / 1e9:.1f} GFLOP/s per process')
  for name, peak in ACCELERATOR_PEAKS:
    if name.lower() in device.device_kind.lower():
      return peak * jax.device_count(), f'datasheet dense bf16, {name}: {peak / 1e12:g} TFLOP/s per device'
  return 0.0, f'unknown device kind {device.device_kind!r}: no MFU'


def peak_memory_bytes() -> tuple[int | None, str]:
  """(peak bytes in use on the fullest local device, source) or (None, why)."""
  peaks = [(device.memory_stats() or {}).get('peak_bytes_in_use')
           for device in jax.local_devices()]
  if all(peak is not None for peak in peaks):
    return max(peaks), 'device allocator peak'
  return None, 'the device reports no allocator statistics (CPU)'


def run(config, workdir: str, *, steps: int = 20, warmup: int = 3,
        decode_sentences: int = 128, decode_batch_size: int = 64) -> dict:
  """Benchmarks `config` (see the module docstring); returns and writes the results."""
  mesh, rules = setup.plan(config)
  result = {'config': config.to_dict(), 'devices': jax.device_count(),
            'processes': jax.process_count(), 'device_kind': jax.devices()[0].device_kind,
            'mesh': dict(mesh.shape)}
  training, state = setup.build(config, workdir, mesh, rules)
  if training.memory_fit is not None:
    result['memory_fit'] = training.memory_fit
  result['batch_rows'] = config.data.batch_size
  result['parameters'] = initialize.count_params(state['params'])
  state, timing = _time_steps(training, state, config.data.prefetch_to_device, steps, warmup)
  result.update(timing.compiled)

  real_source, real_target = timing.real_source_tokens, timing.real_target_tokens
  real, window = real_source + real_target, timing.window_seconds
  flops = model_flops(training.model_cfg, real_source, real_target,
                      config.data.max_source_length, config.data.max_target_length)
  peak, peak_source = max(timing.peak_before, device_peak())
  devices = jax.device_count()
  memory, memory_source = peak_memory_bytes()
  result.update({
      'steps_timed': steps,
      'median_step_seconds': float(np.median(timing.step_seconds)),
      'step_seconds': [round(t, 4) for t in timing.step_seconds],
      'real_tokens_per_sec': real / window,
      'real_tokens_per_sec_per_device': real / window / devices,
      'padded_tokens_per_sec': timing.slots / window,
      'padded_tokens_per_sec_per_device': timing.slots / window / devices,
      'real_token_fraction': real / timing.slots,
      'model_flops_per_real_token': flops / real,
      'model_flops_per_sec': flops / window,
      'peak_flops_per_sec': peak,
      'peak_source': peak_source,
      'mfu': flops / window / peak if peak else None,
      # XLA's own count runs over every slot, padding included.
      'xla_flops_utilization': (result['xla_flops_per_step_per_device'] * devices * steps
                                / window / peak if peak else None),
      'peak_memory_bytes': memory,
      'peak_memory_source': memory_source,
      'host_max_rss_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      # Page faults show an allocator that hands memory back to the OS every step.
      'host_page_faults_per_step': timing.page_faults / steps,
      'host_allocator': host.describe_allocator(),
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
  })
  if decode_sentences and config.task != 'lm':
    result['decode'] = _decode_throughput(config, workdir, training.inputs.tokenizer,
                                          training.model_cfg, state['params'],
                                          decode_sentences, decode_batch_size)
  if jax.process_index() == 0:
    files.write_text(files.join(workdir, files.BENCH), json.dumps(result, indent=2))
    print(format_table(result), flush=True)
  return result


@dataclasses.dataclass(frozen=True)
class _Timing:
  """What `_time_steps` measured."""
  compiled: dict  # compile_seconds, compiled_step_bytes_per_device, xla_flops_per_step_per_device
  peak_before: tuple[float, str]  # device_peak() before the timed steps
  step_seconds: list[float]
  real_source_tokens: float
  real_target_tokens: float
  slots: int  # batch slots, padding included
  window_seconds: float
  page_faults: int  # minor page faults of the process over the timed steps


def _time_steps(training: setup.Run, state, prefetch: int, steps: int,
                warmup: int) -> tuple[dict, _Timing]:
  """Compiles the training step ahead of time, runs `warmup` steps, then times `steps`
  (each the dispatch of a step, the load of the next batch and the fetch of the step's
  metrics). Returns (the state after them, the timing)."""
  iterator = iter(training.inputs.train_data)
  feeder = feeding.DeviceFeeder(iterator, training.batch_sharding, prefetch)
  try:
    batch, _ = next(feeder)
    started = time.perf_counter()
    compiled = training.step_fn.lower(state, training.rest, batch).compile()
    compile_seconds = time.perf_counter() - started
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, list):  # older jax: one dict per program
      cost = cost[0] if cost else {}
    figures = {'compile_seconds': compile_seconds,
               'compiled_step_bytes_per_device': fit.step_bytes(compiled),
               'xla_flops_per_step_per_device': float(cost.get('flops', 0.0))}

    # On a shared CPU the matmul rate moves with the neighbours' load: measure it
    # before and after the timed steps and divide by the higher (conservative MFU).
    peak_before = device_peak()
    for _ in range(warmup):
      state, metrics = compiled(state, training.rest, batch)
      batch, _ = next(feeder)
      jax.block_until_ready(metrics)
    times, real_source, real_target, slots = [], 0.0, 0.0, 0
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    window_started = time.perf_counter()
    for _ in range(steps):
      step_started = time.perf_counter()
      state, metrics = compiled(state, training.rest, batch)
      batch, batch_slots = next(feeder)  # the next batch loads while this step runs
      metrics = jax.device_get(metrics)
      times.append(time.perf_counter() - step_started)
      real_source += float(metrics['source_tokens'])
      real_target += float(metrics['tokens'])
      slots += batch_slots
    window = time.perf_counter() - window_started
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
  finally:
    feeder.close()
    iterator.close()
  return state, _Timing(figures, peak_before, times, real_source, real_target, slots, window,
                        faults)


def _decode_throughput(config, workdir: str, tokenizer, model_cfg, params, sentences: int,
                       batch_size: int) -> dict:
  """Greedy and beam-4 decoding of the first test sentences: with the workdir's latest
  checkpoint if it has one (a trained model: real output lengths), else with the
  benchmarked parameters (an untrained model, which may stop at once). Each strategy
  decodes once to compile, then once timed."""
  sources = files.read_lines(files.split_file(workdir, 'test.src'))[:sentences]
  checkpointer = checkpointing.Checkpointer(workdir, read_only=True)
  trained = checkpointer.latest_step() is not None
  checkpointer.close()
  if not trained and jax.process_count() > 1:
    params = multihost_utils.process_allgather(params, tiled=True)
  results = {'sentences': len(sources)}
  if trained:
    loaded = inference.load(workdir)
  else:
    loaded = inference.from_params(config, tokenizer, model_cfg, params)
  for name, beam in (('greedy', 1), ('beam4', 4)):
    translator = translation.Translator(loaded, translation.DecodeOptions(beam_size=beam))
    results['parameters'] = (f'checkpoint {translator.step}' if trained else
                             'the benchmarked (untrained) model')
    translator.translate(sources, batch_size)
    started = time.perf_counter()
    outputs = translator.translate(sources, batch_size)
    seconds = time.perf_counter() - started
    tokens = sum(len(translator.tokenizer.encode(line)) + 1 for line in outputs)
    results[name] = {'seconds': seconds, 'sentences_per_sec': len(sources) / seconds,
                     'tokens_per_sec': tokens / seconds}
  return results


def format_table(result: dict) -> str:
  """The headline figures, one per line."""
  def number(value, digits=1):
    return 'n/a' if value is None else f'{value:,.{digits}f}'
  memory = result['peak_memory_bytes']
  lines = [
      f'devices                 {result["devices"]} x {result["device_kind"]} '
      f'(mesh {result["mesh"]}), {result["processes"]} process(es)',
      f'parameters              {result["parameters"]:,}',
      f'batch                   {result["batch_rows"]} rows',
      f'compile                 {number(result["compile_seconds"])} s',
      f'median step             {number(result["median_step_seconds"], 3)} s',
      f'real tokens/s           {number(result["real_tokens_per_sec"], 0)} '
      f'({number(result["real_tokens_per_sec_per_device"], 0)} per device)',
      f'padded tokens/s         {number(result["padded_tokens_per_sec"], 0)} '
      f'({number(result["padded_tokens_per_sec_per_device"], 0)} per device)',
      f'real-token fraction     {number(result["real_token_fraction"], 3)}',
      f'model FLOPs/real token  {number(result["model_flops_per_real_token"] / 1e6, 2)} M',
      f'model FLOP/s            {number(result["model_flops_per_sec"] / 1e9, 1)} G',
      f'peak FLOP/s             {number(result["peak_flops_per_sec"] / 1e9, 1)} G '
      f'({result["peak_source"]})',
      f'MFU (real tokens)       {number(100 * result["mfu"] if result["mfu"] else None)} %',
      f'XLA FLOPs utilization   '
      f'{number(100 * result["xla_flops_utilization"] if result["xla_flops_utilization"] else None)} % '
      f'(every slot, padding included)',
      f'compiled step memory    {result["compiled_step_bytes_per_device"] / 2**20:,.1f} MiB '
      f'per device',
      f'peak device memory      '
      f'{"n/a (" + result["peak_memory_source"] + ")" if memory is None else f"{memory / 2**20:,.1f} MiB"}',
      f'host max RSS            {result["host_max_rss_bytes"] / 2**20:,.1f} MiB',
      f'host page faults/step   {result["host_page_faults_per_step"]:,.0f} '
      f'({result["host_allocator"]})',
  ]
  for name in ('greedy', 'beam4'):
    if name in result.get('decode', {}):
      figures = result['decode'][name]
      lines.append(f'decode {name:<16} {figures["sentences_per_sec"]:,.2f} sentences/s, '
                   f'{figures["tokens_per_sec"]:,.1f} tokens/s '
                   f'({result["decode"]["sentences"]} test sentences, '
                   f'{result["decode"]["parameters"]})')
  return '\n'.join(lines)


def main(workdir: str, flags) -> None:
  run(flags.config, workdir, steps=flags.bench_steps, warmup=flags.bench_warmup,
      decode_sentences=flags.bench_decode_sentences, decode_batch_size=flags.batch_size)
