"""A 3.3-billion-parameter encoder-decoder the size of NLLB-200 3.3B (24+24 layers,
d_model 2048, d_ff 8192, 16 heads, a 256k shared vocabulary): what jaxnmt is for at pod
scale. Check its fit and mesh before a launch:

  python -m jaxnmt.main --mode=compile --config=configs/nllb3b.py --topology=v5e-64 --plan
  python -m jaxnmt.main --mode=compile --config=configs/nllb3b.py --topology=v5p-128 \
      --config.mesh.fsdp=64

Figures (per-chip memory, FLOPs, collectives on v5e-64 and v5p-128): BUILD_NOTES.md,
"Before a launch".
"""

from configs import big


def get_config():
  config = big.get_config()
  config.model.num_encoder_layers = 24
  config.model.num_decoder_layers = 24
  config.model.d_model = 2048
  config.model.num_heads = 16
  config.model.d_ff = 8192
  config.model.dropout_rate = 0.1
  config.model.dtype = 'bfloat16'
  config.model.remat = 'full'
  config.tokenizer.vocab_size = 256_000
  # One row per chip of a 64-chip slice at least: the batch splits over data and fsdp.
  config.data.batch_size = 256
  config.data.eval_batch_size = 256
  config.data.max_source_length = 128
  config.data.max_target_length = 128
  config.optim.learning_rate = 1e-4
  return config
