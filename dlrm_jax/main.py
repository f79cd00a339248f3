"""Trains and evaluates DLRM. Kept short on purpose: all logic lives in train.py.

  python -m dlrm_jax.main --config=configs/default.py [--config.interaction_op=dot ...]

The run directory is --workdir if given, else the config's `checkpoint`, else
`output_dir/model_DLRM_<timestamp>`, as in the reference.
"""

import logging as std_logging

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from dlrm_jax import train

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, summaries, results.json).')
config_flags.DEFINE_config_file('config', None, 'Training configuration file.', lock_config=True)
flags.mark_flags_as_required(['config'])


class _QuietOrbax(std_logging.Filter):
  """Keeps orbax's per-save INFO chatter out of the run's log; its warnings still pass."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or 'orbax' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietOrbax())
  logging.info('JAX process %d / %d, local devices: %s', jax.process_index(),
               jax.process_count(), jax.local_devices())
  workdir = FLAGS.workdir or train.resolve_workdir(FLAGS.config)
  train.train_and_evaluate(FLAGS.config, workdir)


if __name__ == '__main__':
  app.run(main)
