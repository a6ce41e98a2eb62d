"""--mode=train: train a model in WORKDIR from --config (resuming where it stopped)."""

import logging

from jaxnmt.training import loop


def main(workdir: str, flags) -> None:
  logging.info('Workdir: %s', workdir)
  loop.train_and_evaluate(flags.config, workdir)
