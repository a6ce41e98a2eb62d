"""A random Marian transformer as the Marian toolkit lays it out on disk: the .npz with
Marian's parameter names and its options as `special:model.yml`, decoder.yml, one
vocabulary .yml for both sides, source.spm and target.spm (SentencePiece models trained
here on real pairs)."""

import json
import os

import numpy as np
import sentencepiece as spm
import yaml

from tests import helpers

OPTIONS = {  # an OPUS-MT transformer, small
    'type': 'transformer', 'dim-emb': 32, 'enc-depth': 2, 'dec-depth': 2,
    'transformer-heads': 4, 'transformer-dim-ffn': 48, 'transformer-ffn-depth': 2,
    'transformer-ffn-activation': 'swish', 'transformer-preprocess': '',
    'transformer-postprocess': 'dan', 'transformer-postprocess-emb': 'd',
    'transformer-postprocess-top': '', 'tied-embeddings-all': True,
    'transformer-decoder-autoreg': 'self-attention', 'transformer-no-projection': False,
    'transformer-guided-alignment-layer': 'last', 'guided-alignment': 'none',
    'transformer-dropout': 0.1, 'right-left': False,
}


def _train_spm(lines, prefix: str) -> None:
  spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=prefix,
                                 vocab_size=120, model_type='unigram', minloglevel=2,
                                 character_coverage=1.0)


def _vocab_line(token: str, index: int) -> str:
  plain = token.isalnum() and token.isascii() and token.lower() not in ('yes', 'no', 'null',
                                                                         'true', 'false')
  return f'{token if plain else json.dumps(token, ensure_ascii=False)}: {index}\n'


def write(directory: str, seed: int = 0, tags: tuple[str, ...] = (), **options) -> dict:
  """Writes the model; returns its options. tags: vocabulary entries after `<unk>`
  (a multilingual OPUS-MT model's `>>spa<<`), which no SentencePiece model holds."""
  options = {**OPTIONS, **options}
  os.makedirs(directory, exist_ok=True)
  pairs = helpers.real_pairs(600, seed=3)
  _train_spm([en for en, _ in pairs], os.path.join(directory, 'source'))
  _train_spm([es for _, es in pairs], os.path.join(directory, 'target'))
  os.replace(os.path.join(directory, 'source.model'), os.path.join(directory, 'source.spm'))
  os.replace(os.path.join(directory, 'target.model'), os.path.join(directory, 'target.spm'))
  pieces = ['</s>', '<unk>', *tags]
  for side in ('source', 'target'):
    processor = spm.SentencePieceProcessor(model_file=os.path.join(directory, f'{side}.spm'))
    for i in range(processor.get_piece_size()):
      piece = processor.id_to_piece(i)
      if piece not in ('<unk>', '<s>', '</s>') and piece not in pieces:
        pieces.append(piece)
  with open(os.path.join(directory, 'vocab.yml'), 'w', encoding='utf-8') as handle:
    handle.writelines(_vocab_line(token, i) for i, token in enumerate(pieces))
  with open(os.path.join(directory, 'decoder.yml'), 'w', encoding='utf-8') as handle:
    yaml.safe_dump({'models': ['model.npz'], 'vocabs': ['vocab.yml', 'vocab.yml'],
                    'beam-size': 4, 'normalize': 0.6}, handle)
  rng = np.random.default_rng(seed)
  dim, ffn = options['dim-emb'], options['transformer-dim-ffn']
  vocab = len(pieces)
  arrays = {}

  def add(name, *shape, center=0.0, spread=None):
    spread = spread if spread is not None else shape[0] ** -0.5
    arrays[name] = (center + spread * rng.standard_normal(shape)).astype(np.float32)

  pre = '_pre' if options['transformer-preprocess'] == 'n' else ''
  for stack in ('encoder', 'decoder'):
    depth = options['enc-depth' if stack == 'encoder' else 'dec-depth']
    for layer in range(1, depth + 1):
      blocks = ['self'] + (['context'] if stack == 'decoder' else [])
      for block in blocks:
        prefix = f'{stack}_l{layer}_{block}'
        for letter in 'qkvo':
          add(f'{prefix}_W{letter}', dim, dim)
          add(f'{prefix}_b{letter}', 1, dim, spread=0.3)
        add(f'{prefix}_Wo_ln_scale{pre}', 1, dim, center=1.0, spread=0.3)
        add(f'{prefix}_Wo_ln_bias{pre}', 1, dim, spread=0.3)
      prefix = f'{stack}_l{layer}_ffn'
      add(f'{prefix}_W1', dim, ffn)
      add(f'{prefix}_b1', 1, ffn, spread=0.3)
      add(f'{prefix}_W2', ffn, dim)
      add(f'{prefix}_b2', 1, dim, spread=0.3)
      add(f'{prefix}_ffn_ln_scale{pre}', 1, dim, center=1.0, spread=0.3)
      add(f'{prefix}_ffn_ln_bias{pre}', 1, dim, spread=0.3)
    if pre:
      add(f'{stack}_top_ln_scale', 1, dim, center=1.0, spread=0.3)
      add(f'{stack}_top_ln_bias', 1, dim, spread=0.3)
  if options['tied-embeddings-all']:
    add('Wemb', vocab, dim, spread=0.3)
  else:
    add('encoder_Wemb', vocab, dim, spread=0.3)
    add('decoder_Wemb', vocab, dim, spread=0.3)
  add('decoder_ff_logit_out_b', 1, vocab, spread=0.5)
  config = yaml.safe_dump(options).encode('utf-8') + b'\0'
  arrays['special:model.yml'] = np.frombuffer(config, np.int8)
  np.savez(os.path.join(directory, 'model.npz'), **arrays)
  return options
