"""configs/tiny.py shrunk to seconds (1+1 layers, width 32, vocab 400) for tests.

As a config file (`--config=tests/tiny_config.py`) it reads the corpus path from
$JAXNMT_TEST_CORPUS.
"""

import os

from configs import tiny


def tiny_config(corpus_path: str):
  config = tiny.get_config()
  config.data.path = corpus_path
  config.data.max_source_length = 24
  config.data.max_target_length = 24
  config.data.batch_size = 8
  config.data.eval_batch_size = 8
  config.data.pairs_per_shard = 1_000
  config.data.prepare_workers = 1
  config.data.valid_fraction = 0.02
  config.data.test_fraction = 0.02
  config.tokenizer.vocab_size = 400
  config.model.num_encoder_layers = 1
  config.model.num_decoder_layers = 1
  config.model.d_model = 32
  config.model.num_heads = 2
  config.model.d_ff = 64
  config.num_train_steps = 20
  config.train_time_limit_minutes = 0.0
  config.log_every_steps = 5
  config.eval_every_steps = 10
  config.checkpoint_every_steps = 10
  config.optim.warmup_steps = 5
  config.ema_decay = 0.0  # tests/decoding/test_averaging.py turns the moving average on
  return config


def get_config():
  return tiny_config(os.environ.get('JAXNMT_TEST_CORPUS', ''))
