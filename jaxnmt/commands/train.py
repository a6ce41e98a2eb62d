"""--mode=train: train a model in WORKDIR from --config (resuming where it stopped);
with --compiled_step=PATH, run the train step saved there instead of compiling one."""

import logging

from jaxnmt.training import loop


def main(workdir: str, flags) -> None:
  logging.info('Workdir: %s', workdir)
  loop.train_and_evaluate(flags.config, workdir, compiled_step=flags.compiled_step)
