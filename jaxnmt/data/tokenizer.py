"""SentencePiece tokenizer: trained once on a sample of the training split, stored, reloaded.

Fixed ids: PAD=0, UNK=1, BOS=2, EOS=3. Text is not normalised (no lowercasing, no
Unicode rewriting), and unknown characters fall back to UTF-8 bytes, so decoding
restores the original casing and punctuation of anything the model reproduces.

Tags (`data/tags.py`: `<bt>`, `<2es>`) are user-defined symbols, given when the model
is trained (ids 4, 5, ... in that order) and read back from it (`Tokenizer.tags`); the
tags a text starts with (each followed by one space) become their ids directly.
"""

import base64
import json
import os
import random
import tempfile
from typing import Iterable, Sequence

import sentencepiece as spm

from jaxnmt.runtime import files
from jaxnmt.errors import ConfigError, WorkdirError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def content_ids(ids: Iterable[int], size: int | None = None) -> list[int]:
  """The ids of an output up to its first EOS, without PAD and BOS (and, with `size`,
  without ids from `size` on: a model's padding rows)."""
  kept = []
  for token in ids:
    token = int(token)
    if token == EOS_ID:
      break
    if token not in (PAD_ID, BOS_ID) and (size is None or token < size):
      kept.append(token)
  return kept


class Tokenizer:
  """Encodes text to token ids and back."""

  def __init__(self, model_path: str):
    if not files.exists(model_path):
      raise FileNotFoundError(f'tokenizer model not found: {model_path}')
    self.model_path = model_path
    # From the bytes, so the model may lie on gs:// too.
    proto = files.read_bytes(model_path)
    self._processor = spm.SentencePieceProcessor(model_proto=proto)
    self.tags = _user_defined(proto)  # in id order
    self._tag_ids = {tag: self._processor.piece_to_id(tag) for tag in self.tags}

  @property
  def vocab_size(self) -> int:
    return self._processor.get_piece_size()

  @property
  def pieces(self) -> tuple[str, ...]:
    """The piece of every id."""
    return tuple(self._processor.id_to_piece(i) for i in range(self.vocab_size))

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without BOS/EOS; leading tags one id each."""
    if self._tag_ids:
      return self.encode_batch([text])[0]
    return self._processor.encode(text, out_type=int)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text (one call into SentencePiece)."""
    if not self._tag_ids:
      return self._processor.encode(list(texts), out_type=int)
    leading, rests = zip(*map(self._leading_tags, texts)) if texts else ((), ())
    return [tags + ids for tags, ids in zip(
        leading, self._processor.encode(list(rests), out_type=int))]

  def _leading_tags(self, text: str) -> tuple[list[int], str]:
    """(ids of the tags `text` starts with, the rest of it)."""
    ids = []
    while True:
      word, space, rest = text.partition(' ')
      if word not in self._tag_ids:
        return ids, text
      ids.append(self._tag_ids[word])
      text = rest

  # One model for both sides (a VocabTokenizer has one per side).
  def encode_target(self, text: str) -> list[int]:
    return self.encode(text)

  def encode_target_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self.encode_batch(texts)

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; stops at the first EOS and ignores PAD and BOS."""
    return self._processor.decode(content_ids(ids))

  def __getstate__(self):  # Grain may pickle the pipeline; keep only the path.
    return {'model_path': self.model_path}

  def __setstate__(self, state):
    self.__init__(state['model_path'])


def _user_defined(proto: bytes) -> tuple[str, ...]:
  """The user-defined pieces (tags) of a serialized SentencePiece model."""
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top
  model = sentencepiece_model_pb2.ModelProto()
  model.ParseFromString(proto)
  user_defined = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
  return tuple(piece.piece for piece in model.pieces if piece.type == user_defined)


def train(sentences: Sequence[str], model_path: str, vocab_size: int,
          model_type: str = 'unigram', max_sentences: int = 0, seed: int = 0,
          tags: Sequence[str] = ()) -> Tokenizer:
  """Trains a SentencePiece model on `sentences` and writes it to `model_path`; `tags`
  become user-defined symbols (ids 4, 5, ... in order)."""
  sentences = [s for s in sentences if s]
  if max_sentences and len(sentences) > max_sentences:
    sentences = random.Random(seed).sample(sentences, max_sentences)
  # SentencePiece writes local files: into a scratch folder beside the model (or a
  # local one for a gs:// model), then published whole.
  directory = None if files.is_remote(model_path) else files.dirname(model_path)
  if directory is not None:
    os.makedirs(directory, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=directory) as scratch:
    prefix = os.path.join(scratch, 'spm')
    try:
      _train_sentencepiece(sentences, prefix, vocab_size, model_type, tags)
    except RuntimeError as error:  # SentencePiece reports a bad request this way
      message = str(error).splitlines()[0]
      if 'Vocabulary size too high' in message:
        raise ConfigError(f'config.tokenizer.vocab_size={vocab_size} is too large for '
                          f'{len(sentences)} training sentences: {message.split("] ")[-1]}'
                          ) from None
      raise
    # Atomic publish: a crash never leaves a half-written model at `model_path`.
    if directory is None:
      files.copy_file(prefix + '.model', model_path)
    else:
      os.replace(prefix + '.model', model_path)
  return Tokenizer(model_path)


def _train_sentencepiece(sentences, prefix: str, vocab_size: int, model_type: str,
                         tags: Sequence[str] = ()) -> None:
  extra = {'user_defined_symbols': list(tags)} if tags else {}
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences),
      model_prefix=prefix,
      vocab_size=vocab_size,
      model_type=model_type,
      character_coverage=0.9999,
      byte_fallback=True,
      normalization_rule_name='identity',
      remove_extra_whitespaces=False,
      split_digits=True,
      pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
      num_threads=os.cpu_count() or 1,
      minloglevel=2,
      **extra,
  )


class CharTokenizer:
  """Character-level tokenizer with the same interface as `Tokenizer`: every distinct
  character of the training text gets an id after the four special ids. Characters
  never seen in training map to UNK. It holds no tags (no piece is a tag)."""

  tags: tuple[str, ...] = ()

  def __init__(self, model_path: str):
    if not files.exists(model_path):
      raise FileNotFoundError(f'tokenizer model not found: {model_path}')
    self.model_path = model_path
    self.characters = json.loads(files.read_text(model_path))['characters']
    self._ids = {char: index + 4 for index, char in enumerate(self.characters)}

  @property
  def vocab_size(self) -> int:
    return len(self.characters) + 4

  @property
  def pieces(self) -> tuple[str, ...]:
    """The piece of every id: the four specials, then the characters."""
    return ('<pad>', '<unk>', '<s>', '</s>', *self.characters)

  def encode(self, text: str) -> list[int]:
    return [self._ids.get(char, UNK_ID) for char in text]

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self.encode(text) for text in texts]

  encode_target, encode_target_batch = encode, encode_batch

  def decode(self, ids: Iterable[int]) -> str:
    chars = []
    for token in ids:
      token = int(token)
      if token == EOS_ID:
        break
      if 4 <= token < len(self.characters) + 4:  # ids past the vocabulary are padding
        chars.append(self.characters[token - 4])
    return ''.join(chars)


def train_chars(text: str, model_path: str) -> CharTokenizer:
  """Writes the character vocabulary of `text` to `model_path` (JSON)."""
  files.write_text(model_path, json.dumps({'characters': sorted(set(text))},
                                            ensure_ascii=False))
  return CharTokenizer(model_path)


def load(model_path: str, model_type: str):
  """The tokenizer stored at `model_path`: CharTokenizer for 'char', a VocabTokenizer
  (SentencePiece per side onto a fixed vocabulary: imported Marian models) for
  'spm_vocab', else SentencePiece."""
  if model_type == 'spm_vocab':
    return VocabTokenizer(model_path)
  return CharTokenizer(model_path) if model_type == 'char' else Tokenizer(model_path)


def from_workdir(workdir: str, model_type: str):
  """The tokenizer a run stored in `workdir` (SentencePiece, or a char vocabulary)."""
  target = files.tokenizer_path(workdir)
  if not files.exists(target):
    raise WorkdirError(f'{target} not found: train a model in {workdir} first')
  return load(target, model_type)


# ----------------------------------------------------------------------------- spm_vocab
# A SentencePiece model per side mapped onto one fixed vocabulary: the tokenizer of an
# imported Marian / OPUS-MT model (`tokenizer.model_type='spm_vocab'`). Marian splits
# text with `source.spm` and `target.spm` and looks the pieces up in its vocabulary;
# so does `VocabTokenizer`, with the vocabulary in jaxnmt's fixed ids
# (interop/marian.py). A piece the vocabulary lacks is UNK; leading `>>xxx<<` tags
# (multilingual OPUS-MT) in the vocabulary are one id each. One JSON file holds the
# pieces and both SentencePiece models, so its hash covers all a checkpoint depends on.


VOCAB_FORMAT = 1


def write_vocab_tokenizer(path: str, pieces: Sequence[str], source_model: bytes, target_model: bytes) -> None:
  files.write_text(path, json.dumps({
      'format': VOCAB_FORMAT, 'pieces': list(pieces),
      'source_spm': base64.b64encode(source_model).decode('ascii'),
      'target_spm': base64.b64encode(target_model).decode('ascii')}, ensure_ascii=False))


def is_language_tag(piece: str) -> bool:
  """Whether a vocabulary piece is a Marian / OPUS-MT target-language tag (`>>spa<<`)."""
  return len(piece) > 4 and piece.startswith('>>') and piece.endswith('<<')


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
    self.tags = tuple(piece for piece in self.pieces if is_language_tag(piece))

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
    kept = content_ids(ids, len(self.pieces))
    return self._target.decode_pieces([self.pieces[token] for token in kept])

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
