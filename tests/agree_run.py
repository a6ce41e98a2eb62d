"""Driver for the agreement-timeout test: joins a job through jaxnmt's own
`distributed.initialize`, then process 1 (the straggler) sleeps before the first
agreement point while the others wait for it there.

  NUM_PROCESSES=2 DEVICES_PER_PROCESS=1 JAXNMT_MAIN=tests.agree_run launch/local.sh \
      --straggle_s=30 --collective_timeout_s=5
"""

import time

from absl import app
from absl import flags

from jaxnmt.runtime import distributed
from jaxnmt import main as jaxnmt_main  # the exit path and its flags  # pylint: disable=unused-import

flags.DEFINE_float('straggle_s', 30.0, 'How long process 1 sleeps before agreeing.')
FLAGS = flags.FLAGS


def run(argv) -> None:
  del argv
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                         60, peer_timeout_s=FLAGS.peer_timeout_s,
                         collective_timeout_s=FLAGS.collective_timeout_s)
  if FLAGS.process_id == 1:
    time.sleep(FLAGS.straggle_s)
  try:
    print('agreed', distributed.agree([False], 'the first stop check'), flush=True)
  except distributed.LostPeerError as error:
    jaxnmt_main._exit(1, str(error))  # pylint: disable=protected-access


if __name__ == '__main__':
  app.run(run)
