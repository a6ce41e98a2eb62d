"""--mode=import: a workdir from an OPUS-MT / Marian model directory (interop/marian.py
does the work). The run config starts from --config (default configs/base.py: data,
optimizer and decoding settings for fine-tuning); its model and tokenizer fields come
from the model.

  python -m jaxnmt.main --mode=import --from=marian --input=opus-mt-en-es \
      --workdir=runs/opus-en-es
"""

import os

import jax

from jaxnmt.errors import UserError
from jaxnmt.interop import marian


def _default_config():
  from configs import base  # pylint: disable=import-outside-toplevel
  return base.get_config()


def main(workdir: str, flags) -> None:
  if not flags.input:
    raise UserError('--mode=import needs --input=DIR (the Marian model directory)')
  if jax.process_count() > 1:
    raise UserError('--mode=import runs on one process: start it without the launcher')
  config = flags.config if flags.config is not None else _default_config()
  imported = marian.import_model(os.path.expanduser(flags.input), workdir, config)
  fields = imported['fields']
  print(f'imported {imported["model"]} ({fields["num_encoder_layers"]}+'
        f'{fields["num_decoder_layers"]} layers, d_model {fields["d_model"]}, '
        f'{imported["vocabulary"]} tokens, padded to {imported["padded_vocabulary"]}) into '
        f'{workdir} as checkpoint 0: translate, eval, serve, export and train take it')
