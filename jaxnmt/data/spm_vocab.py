"""A SentencePiece model per side mapped onto one fixed vocabulary: the tokenizer of an
imported Marian / OPUS-MT model (`tokenizer.model_type='spm_vocab'`).

Marian splits text with `source.spm` and `target.spm` and looks the pieces up in its own
vocabulary; so does `VocabTokenizer`, with the vocabulary reordered to jaxnmt's fixed
ids (PAD 0, UNK 1, BOS 2, EOS 3; interop/marian.py). A piece the vocabulary lacks is
UNK. Leading `>>xxx<<` target-language tags (multilingual OPUS-MT models) that are in the
vocabulary are one id each. One JSON file holds the pieces and both SentencePiece
models, so its hash covers everything a checkpoint depends on.
"""

import base64
import json
import os
from typing import Iterable, Sequence

import sentencepiece as spm

from jaxnmt.runtime import files

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
FORMAT = 1


def write(path: str, pieces: Sequence[str], source_model: bytes, target_model: bytes) -> None:
  files.write_text(path, json.dumps({
      'format': FORMAT, 'pieces': list(pieces),
      'source_spm': base64.b64encode(source_model).decode('ascii'),
      'target_spm': base64.b64encode(target_model).decode('ascii')}, ensure_ascii=False))


class VocabTokenizer:
  """Encodes the source with one SentencePiece model, the target with the other, both
  onto `pieces` (one per id); decodes ids with the target model."""

  def __init__(self, model_path: str):
    if not files.exists(model_path):
      raise FileNotFoundError(f'tokenizer model not found: {model_path}')
    self.model_path = model_path
    stored = json.loads(files.read_text(model_path))
    self.pieces = tuple(stored['pieces'])
    self._source_model = base64.b64decode(stored['source_spm'])
    self._target_model = base64.b64decode(stored['target_spm'])
    self._source = spm.SentencePieceProcessor(model_proto=self._source_model)
    self._target = spm.SentencePieceProcessor(model_proto=self._target_model)
    self._ids = {piece: index for index, piece in enumerate(self.pieces)}
    self.tags = tuple(p for p in self.pieces if p.startswith('>>') and p.endswith('<<'))

  @property
  def vocab_size(self) -> int:
    return len(self.pieces)

  def tag_id(self, symbol: str) -> int | None:
    return self._ids.get(symbol) if symbol in self.tags else None

  def _lookup(self, pieces: Iterable[str]) -> list[int]:
    return [self._ids.get(piece, UNK_ID) for piece in pieces]

  def encode(self, text: str) -> list[int]:
    """Source-side ids of `text` (without EOS); leading vocabulary tags are one id each."""
    head = []
    words = text.split(' ')
    while words and self.tag_id(words[0]) is not None:
      head.append(self.tag_id(words.pop(0)))
    return head + self._lookup(self._source.encode(' '.join(words), out_type=str))

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self.encode(text) for text in texts]

  def encode_target(self, text: str) -> list[int]:
    return self._lookup(self._target.encode(text, out_type=str))

  def encode_target_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self.encode_target(text) for text in texts]

  def decode(self, ids: Iterable[int]) -> str:
    """Text of target ids; stops at the first EOS, skips PAD, BOS and padding rows."""
    kept = []
    for token in ids:
      token = int(token)
      if token == EOS_ID:
        break
      if token not in (PAD_ID, BOS_ID) and token < len(self.pieces):
        kept.append(self.pieces[token])
    return self._target.decode_pieces(kept)

  def write_sentencepiece(self, directory: str) -> list[str]:
    """source.spm and target.spm into `directory` (a CTranslate2 export's tokenizer)."""
    for name, model in (('source.spm', self._source_model), ('target.spm', self._target_model)):
      with open(os.path.join(directory, name), 'wb') as handle:
        handle.write(model)
    return ['source.spm', 'target.spm']

  def __getstate__(self):
    return {'model_path': self.model_path}

  def __setstate__(self, state):
    self.__init__(state['model_path'])
