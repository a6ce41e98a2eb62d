"""--mode=prepare: tokenize a translation corpus into WORKDIR's shards, once, before
training (training prepares them too when they are missing)."""

import logging

from jaxnmt import errors
from jaxnmt.data import inputs


def main(workdir: str, flags) -> None:
  if flags.config.task != 'translation':
    raise errors.ConfigError("--mode=prepare prepares translation corpora; task 'lm' "
                             'reads its text file directly')
  logging.info('Workdir: %s', workdir)
  inputs.prepare_data(flags.config, workdir)
