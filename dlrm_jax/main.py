"""Trains and evaluates DLRM. Kept short on purpose: all logic lives in train.py.

  python -m dlrm_jax.main --config=configs/default.py [--config.interaction_op=dot ...]

The run directory is --workdir or the config's `checkpoint` (both: the same directory), else
`output_dir/model_DLRM_<timestamp>` as in the reference (with -1, -2... for a second training
run started in the same second).
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from dlrm_jax import checkpoints
from dlrm_jax import cli
from dlrm_jax import train

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, summaries, results.json).')
config_flags.DEFINE_config_file('config', None, 'Training configuration file.', lock_config=True)
flags.mark_flags_as_required(['config'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  checkpoints.quiet_orbax_info()
  # Nothing here may touch JAX: train_and_evaluate first sets what only takes effect before the
  # backend starts (CPU dispatch, joining a multi-process run).
  config = cli.command_line_config(FLAGS.config)
  # Without --workdir, train_and_evaluate names the run directory (train.resolve_workdir).
  train.train_and_evaluate(config, cli.run_directory(FLAGS.workdir, config))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
