"""Character-level GPT on Tiny Shakespeare (the last 10% is validation), sized for a
CPU: 4 layers, d_model 128, RoPE, RMSNorm, GELU MLP, tied embeddings, no dropout.

  python -m jaxnmt.main --config=configs/lm_char.py                   # workdir runs/lm_char
  python -m jaxnmt.main --mode=generate --workdir=runs/lm_char --prompt="ROMEO:"
  python -m jaxnmt.main --mode=eval --workdir=runs/lm_char

Trains for at most 5 minutes. Measured loss and samples: BUILD_NOTES.md, "Configs".
"""

from configs import base


def get_config():
  config = base.get_config()
  config.task = 'lm'
  config.num_train_steps = 5_000
  config.train_time_limit_minutes = 5.0
  config.log_every_steps = 50
  config.eval_every_steps = 250
  config.checkpoint_every_steps = 1_000

  config.data.filename = 'tinyshakespeare.txt'
  config.data.url = ('https://raw.githubusercontent.com/karpathy/char-rnn/master/data/'
                     'tinyshakespeare/input.txt')
  config.data.valid_fraction = 0.1
  # Context length (characters per block) and blocks per batch.
  config.data.max_target_length = 128
  config.data.batch_size = 32
  config.data.eval_batch_size = 32

  config.tokenizer.model_type = 'char'

  config.model.num_decoder_layers = 4
  config.model.d_model = 128
  config.model.num_heads = 4
  config.model.d_ff = 512
  config.model.activation = 'gelu'
  config.model.norm = 'rmsnorm'
  config.model.position_embedding = 'rope'
  config.model.dropout_rate = 0.0
  config.model.attention_dropout_rate = 0.0

  config.optim.learning_rate = 2e-3
  config.optim.warmup_steps = 100
  config.optim.schedule = 'rsqrt'
  config.optim.b2 = 0.99
  config.optim.eps = 1e-8
  config.optim.weight_decay = 0.1
  config.optim.label_smoothing = 0.0
  return config
