"""`--mode=generate`: sample text from a language-model checkpoint, continuing a prompt,
with temperature, top-k and top-p, on the KV-cached decoder."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxnmt.decoding import search
from jaxnmt.decoding import inference
from jaxnmt.data import tokenizer as tokenizer_lib
from jaxnmt.runtime import files
from jaxnmt.errors import UserError


class Generator:

  def __init__(self, workdir: str, step: int | None = None, weights: str = 'auto'):
    task = files.load_config(workdir).get('task', 'translation')
    if task != 'lm':
      raise GenerateError(f'{workdir} holds a {task} model; --mode=generate needs a '
                          f'language model (task lm)')
    loaded = inference.load(workdir, step, weights=weights)
    self.config, self.tokenizer = loaded.config, loaded.tokenizer
    self.model_config, self.step, self.params = loaded.model_config, loaded.step, loaded.params
    self._sample = jax.jit(
        functools.partial(_sample, loaded.graphdef, loaded.rest, self.tokenizer.vocab_size),
        static_argnames=('total_length', 'temperature', 'top_k', 'top_p'))

  def generate(self, prompt: str, num_tokens: int, *, temperature: float = 1.0,
               top_k: int = 0, top_p: float = 1.0, seed: int = 0,
               num_samples: int = 1) -> list[str]:
    """`num_samples` continuations of `prompt` by `num_tokens` tokens each (the prompt
    included in the returned text). Past the model's context the window slides: the
    last half-context of text is re-read and generation goes on."""
    prompt_ids = self.tokenizer.encode(prompt) or self.tokenizer.encode('\n')
    context = self.model_config.max_length
    if len(prompt_ids) >= context:
      raise GenerateError(f'the prompt is {len(prompt_ids)} tokens; the model reads at most '
                          f'{context - 1} (config.data.max_target_length)')
    rows = [list(prompt_ids) for _ in range(num_samples)]
    key, produced = jax.random.key(seed), 0
    while produced < num_tokens:
      window = len(rows[0]) if produced == 0 else min(len(rows[0]), context // 2)
      count = min(num_tokens - produced, context - window)
      window_ids = jnp.asarray([row[len(row) - window:] for row in rows], jnp.int32)
      key, chunk_key = jax.random.split(key)
      new = np.asarray(self._sample(self.params, window_ids, chunk_key,
                                    total_length=window + count, temperature=temperature,
                                    top_k=top_k, top_p=top_p))
      for row, tokens in zip(rows, new):
        row.extend(int(token) for token in tokens)
      produced += count
    return [self.tokenizer.decode(row) for row in rows]


class GenerateError(UserError):
  """The request does not fit the model (e.g. a prompt longer than its context)."""


def _sample(graphdef, rest, vocab_size: int, params, prompt, key, *, total_length: int,
            temperature: float, top_k: int, top_p: float):
  """prompt: int32 [B, P] -> int32 [B, total_length - P] new tokens, never an id at or
  beyond the tokenizer's `vocab_size` (the model's vocabulary may be padded)."""
  model = nnx.merge(graphdef, params, rest)

  def step_fn(cache, tokens, index):
    logits, cache = model.decode_step(cache, tokens, index)
    in_vocabulary = jnp.arange(logits.shape[-1]) < vocab_size
    return jnp.where(in_vocabulary, logits, search.NEG_INF), cache

  batch, prompt_length = prompt.shape
  cache = model.init_cache(batch, total_length)
  # Prefill: run the prompt (all but its last token) through the cache.
  def prefill(index, cache):
    _, cache = model.decode_step(cache, prompt[:, index], index)
    return cache
  cache = jax.lax.fori_loop(0, prompt_length - 1, prefill, cache)
  # Positions prompt_length - 1 ... total_length - 2 each yield the next token; no
  # length cap forces an EOS.
  no_cap = jnp.full((batch,), total_length + 1, jnp.int32)
  return search.sample(step_fn, cache, batch, total_length - 1,
                       tokenizer_lib.BOS_ID, tokenizer_lib.EOS_ID, key, temperature, top_k,
                       top_p, max_lengths=no_cap, start_index=prompt_length - 1,
                       first_tokens=prompt[:, -1])


def main(workdir: str, flags) -> None:
  generator = Generator(workdir, weights=flags.weights)
  for text in generator.generate(flags.prompt, flags.num_tokens,
                                 temperature=flags.temperature or 1.0, top_k=flags.top_k,
                                 top_p=flags.top_p, seed=flags.decode_seed,
                                 num_samples=flags.num_samples):
    print(text, flush=True)
