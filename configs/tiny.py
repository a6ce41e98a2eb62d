"""A small English→Spanish Transformer that trains usefully on a 2-core CPU.

  python -m jaxnmt.main --config=configs/tiny.py                      # workdir runs/tiny
  python -m jaxnmt.main --mode=translate --workdir=runs/tiny < english.txt

3+3 layers, d_model 256, 6k joint SentencePiece vocabulary, 32 packed rows per batch,
stopped after 27 minutes of training. Measured BLEU and speed: BUILD_NOTES.md, "Configs".
"""

from configs import base


def get_config():
  config = base.get_config()
  config.num_train_steps = 2_000
  config.train_time_limit_minutes = 27.0
  config.log_every_steps = 25
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 500
  # A moving average of the parameters, which inference uses by default: +1.4 BLEU on
  # validation over the last checkpoint (BUILD_NOTES.md, "Better final weights").
  config.ema_decay = 0.999

  config.data.batch_size = 32

  config.tokenizer.vocab_size = 6_000

  config.model.num_encoder_layers = 3
  config.model.num_decoder_layers = 3
  config.model.d_model = 256
  config.model.num_heads = 4
  config.model.d_ff = 1024
  # No dropout on attention weights: its CPU cost buys little in a short run
  # (BUILD_NOTES.md, "Configs").
  config.model.attention_dropout_rate = 0.0

  config.optim.learning_rate = 2e-3
  config.optim.warmup_steps = 300
  return config
