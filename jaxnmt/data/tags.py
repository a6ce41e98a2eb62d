"""Tags: symbols put before a source sentence to tell the model what it reads
(back-translated data, `<bt>`) or which language to write (`<2es>`).

* **Config.** `data.tags`: one tag name per corpus of `data.path`, comma-separated, ''
  for none: `data.path='real.tsv,bt.tsv' data.tags=',bt'` puts `<bt>` before every
  source of bt.tsv. `data.target_langs`: one target language per corpus; when set the
  model is multilingual and each corpus's sources start with its target-language tag,
  `data.target_tag_format.format(lang)` (default `<2{}>`; `>>{}<<` for OPUS-MT's
  style). `tokenizer.reserved_tags`: symbols the tokenizer holds although no corpus
  uses them yet (languages or tags to add later without a new tokenizer).
* **Text.** A tagged source is `'<2es> <bt> ' + source`: target tag first, then the
  corpus tag, each followed by one space. Prepare writes it so into the training
  shards and held-out splits, and inference builds it the same way.
* **Tokens.** Every tag is a SentencePiece user-defined symbol (one id, never split),
  stored in the tokenizer (`tokenizer.Tokenizer.tags`); the tokenizer turns leading
  tags into their ids directly. Tags are fixed when the tokenizer is trained: a config
  that needs a tag its tokenizer lacks is refused (`check_tokenizer`), and so is input
  that starts with an unknown tag (`Tagger`).
"""

import re
from typing import Sequence

from jaxnmt.errors import DataError, UserError

TARGET_TAG_FORMAT = '<2{}>'
_GENERIC_TAG = r'<[^\s<>]+>'  # what a leading word must look like to be taken as a tag


def split_list(value: str) -> list[str]:
  """'a,,b' -> ['a', '', 'b']; '' -> []."""
  return [item.strip() for item in value.split(',')] if value.strip() else []


def tag_symbol(name: str) -> str:
  """The symbol of a corpus tag name: 'bt' -> '<bt>'."""
  return f'<{name}>'


def target_format(config) -> str:
  return config.data.get('target_tag_format', TARGET_TAG_FORMAT) or TARGET_TAG_FORMAT


def target_tag(config, lang: str) -> str:
  """The target-language tag of `lang` ('es' -> '<2es>')."""
  return target_format(config).format(lang)


def target_langs(config) -> list[str]:
  """The target languages of a multilingual model ([] if it is not one)."""
  return [lang for lang in split_list(config.data.get('target_langs', '')) if lang]


def corpus_prefixes(config, corpora: int) -> list[str]:
  """The text put before every source of each of `corpora` corpora ('' for none)."""
  data = config.data
  names = split_list(data.get('tags', '')) or [''] * corpora
  langs = split_list(data.get('target_langs', '')) or [''] * corpora
  return [''.join(symbol + ' ' for symbol in (
      [target_tag(config, lang)] if lang else []) + ([tag_symbol(name)] if name else []))
          for name, lang in zip(names, langs)]


def all_tags(config) -> list[str]:
  """Every symbol the config's tokenizer must hold, in id order: corpus tags,
  target-language tags, reserved tags (each once)."""
  symbols = [tag_symbol(name) for name in split_list(config.data.get('tags', '')) if name]
  symbols += [target_tag(config, lang) for lang in target_langs(config)]
  symbols += [s for s in split_list(config.tokenizer.get('reserved_tags', '')) if s]
  return list(dict.fromkeys(symbols))


def check_tokenizer(config, tokenizer, where: str) -> None:
  """A DataError when the tokenizer at `where` lacks a tag the config needs."""
  missing = [tag for tag in all_tags(config) if tag not in tokenizer.tags]
  if missing:
    raise DataError(
        f'the tokenizer {where} has no tag {", ".join(missing)} (its tags: '
        f'{", ".join(getattr(tokenizer, "tags", ())) or "none"}): tags are fixed when a '
        f'tokenizer is trained; reserve them up front (config.tokenizer.reserved_tags) '
        f'or train a new tokenizer')


class Tagger:
  """Puts the target-language tag before input lines, and refuses tags the model was
  not trained with. A model without tags leaves text as it is."""

  def __init__(self, config, tokenizer, target_lang: str | None = None):
    self.known = tuple(tokenizer.tags)
    self.langs = target_langs(config)
    fmt = target_format(config)
    prefix, _, suffix = fmt.partition('{}')
    self._target_pattern = re.compile(re.escape(prefix) + r'\S+?' + re.escape(suffix) + '$')
    self._tag_pattern = re.compile(f'(?:{_GENERIC_TAG}|{self._target_pattern.pattern[:-1]})$')
    self.target = None
    if target_lang:
      self.target = fmt.format(target_lang)
      if self.target not in self.known:
        langs = self.langs or [tag[len(prefix):len(tag) - len(suffix)] for tag in self.known
                               if self._target_pattern.match(tag)]
        raise UserError(f'--target_lang={target_lang}: this model has no tag {self.target} '
                        f'(its target languages: {", ".join(langs) or "none"})')

  def __call__(self, text: str, number: int) -> str:
    """`text` (stripped, not blank) of input line `number` (from 1), tagged."""
    if not self.known:
      return text
    leading = []
    for word in text.split(' '):
      if not self._tag_pattern.match(word):
        break
      leading.append(word)
    for word in leading:
      if word not in self.known:
        raise UserError(f'input line {number} starts with the tag {word}, which this model '
                        f'was not trained with (its tags: {", ".join(self.known)})')
    if not any(self._target_pattern.match(word) for word in leading):
      if self.target is None:
        if not self.langs:
          return text
        raise UserError(f'input line {number} names no target language and this model is '
                        f'multilingual ({", ".join(self.langs)}): give --target_lang or '
                        f'start the line with its tag, e.g. '
                        f'{target_tag_example(self)}')
      return f'{self.target} {text}'
    return text


def split_tags(text: str, known: Sequence[str]) -> tuple[str, str]:
  """(the known tags `text` starts with, each followed by one space; the rest)."""
  prefix = ''
  while True:
    word, space, rest = text.partition(' ')
    if not space or word not in known:
      return prefix, text
    prefix, text = prefix + word + ' ', rest


def target_tag_example(tagger: Tagger) -> str:
  for tag in tagger.known:
    if tagger._target_pattern.match(tag):  # pylint: disable=protected-access
      return tag
  return ''
