"""Subword (SentencePiece, 1k pieces) GPT on Tiny Shakespeare: lm_char.py with a
SentencePiece tokenizer trained on the training 90% of the text.

  python -m jaxnmt.main --config=configs/lm_subword.py                # workdir runs/lm_subword
  python -m jaxnmt.main --mode=generate --workdir=runs/lm_subword --prompt="ROMEO:"

Measured figures: BUILD_NOTES.md, "Configs".
"""

from configs import lm_char


def get_config():
  config = lm_char.get_config()
  config.tokenizer.model_type = 'unigram'
  config.tokenizer.vocab_size = 1_024
  config.data.max_target_length = 64
  return config
