"""What the command lines share (dlrm_jax.main, .planner, .data_sources, experiments.ablate):
reading --config and its --config.FIELD overrides, with a user's mistakes as short errors.

  app.run(main, flags_parser=cli.parse_flags)
  ...
  config = cli.command_line_config(FLAGS.config)

ml_collections reports two common mistakes as tracebacks of its own and absl's internals: a
config file that does not load (a typo in its path) and an override of a field the config does
not have (`--config.eval_every=...`). Here each is one line in absl's own format for bad flags,
and exit status 1.
"""

import os
import sys
from typing import List

from absl import app
from absl import flags

FLAGS = flags.FLAGS

# Path settings, whose '~' the shell leaves alone in '--config.output_dir=~/runs' (it expands a
# word's leading '~' only): a directory named '~' was made in the working directory.
_PATH_FIELDS = ('data_location', 'cache_dir', 'tfds_data_dir', 'predict_input', 'predict_output',
                'output_dir', 'checkpoint', 'export_dir')


def _fail(message: str) -> None:
  sys.stderr.write(f'FATAL Flags parsing error: {message}\n'
                   'Pass --helpshort or --helpfull to see help on flags.\n')
  sys.exit(1)


def _config_file_error(error: OSError) -> str:
  # Its first line names the module ml_collections loads the file as ('config_config').
  attempts = str(error.__cause__ or error).split('\n', 1)[-1]
  return f'--config: cannot load the config file:\n{attempts}'


def _unknown_field(error: Exception, argv: List[str]) -> str:
  """The override naming the missing field, with ml_collections' 'Did you mean' if it has one;
  '' when no --config.FIELD argument names it (then the error is not a user's typo)."""
  text = error
  while isinstance(text, BaseException):  # an AttributeError wraps ml_collections' KeyError
    text = text.args[0] if text.args else ''
  text = str(text)
  name, _, hint = text.partition('\n')
  name = name.strip('\'"')
  for arg in argv[1:]:
    path = arg.split('=', 1)[0]
    if path.startswith('--config.') and name in path[len('--config.'):].split('.'):
      return f'flag {arg}: the config has no field {name!r}' + (f'. {hint}' if hint else '')
  return ''


def parse_flags(argv: List[str]) -> List[str]:
  """absl's flag parsing (`app.run`'s flags_parser), with --config's mistakes as short errors."""
  try:
    argv = app.parse_flags_with_usage(argv)
    if 'config' in FLAGS and FLAGS.config is not None:
      FLAGS.config.get('mode')  # a file that did not load raises on its first use
  except OSError as e:
    _fail(_config_file_error(e))
  except (AttributeError, KeyError) as e:
    message = _unknown_field(e, argv)
    if not message:
      raise
    _fail(message)
  return argv


def command_line_config(config):
  """The parsed --config, its path settings' '~' as the home directory, as the shell would have
  expanded it."""
  for name in _PATH_FIELDS:
    if isinstance(config.get(name), str):
      config[name] = os.path.expanduser(config[name])
  return config
