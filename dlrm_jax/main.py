"""Trains and evaluates DLRM. Kept short on purpose: all logic lives in train.py.

  python -m dlrm_jax.main --config=configs/default.py [--config.interaction_op=dot ...]

The run directory is --workdir if given, else the config's `checkpoint`, else
`output_dir/model_DLRM_<timestamp>` as in the reference (with -1, -2... for a second training
run started in the same second).
"""

import logging as std_logging
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from dlrm_jax import data_sources
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
  # Nothing here may touch JAX: train_and_evaluate first sets what only takes effect before the
  # backend starts (CPU dispatch, joining a multi-process run).
  data_sources.expand_home(FLAGS.config)
  # Without --workdir, train_and_evaluate names the run directory (train.resolve_workdir).
  workdir = os.path.expanduser(FLAGS.workdir) if FLAGS.workdir else None
  train.train_and_evaluate(FLAGS.config, workdir)


if __name__ == '__main__':
  app.run(main)
