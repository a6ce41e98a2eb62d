"""--mode=prepare: tokenize a translation corpus into WORKDIR's shards, once, before
training (training prepares them too when they are missing); with config.init_from,
with the tokenizer of the run fine-tuned."""

import logging

from jaxnmt import errors
from jaxnmt.data import inputs
from jaxnmt.runtime import checkpointing
from jaxnmt.training import init_from


def main(workdir: str, flags) -> None:
  if flags.config.task != 'translation':
    raise errors.ConfigError("--mode=prepare prepares translation corpora; task 'lm' "
                             'reads its text file directly')
  logging.info('Workdir: %s', workdir)
  if flags.config.init_from:  # the data of a fine-tuning run: the source's tokenizer
    checkpointer = checkpointing.Checkpointer(workdir, read_only=True)
    try:
      init_from.resolve(flags.config, workdir, checkpointer)
    finally:
      checkpointer.close()
  inputs.prepare_data(flags.config, workdir)
