"""What the command lines share (dlrm_jax.main, .planner, .data_sources, experiments.ablate):
reading --config and its --config.FIELD overrides, with a user's mistakes as short errors.

  app.run(main, flags_parser=cli.parse_flags)
  ...
  config = cli.command_line_config(FLAGS.config)

ml_collections reports two common mistakes as tracebacks of its own and absl's internals: a
config file that does not load (a typo in its path) and an override of a field the config does
not have (`--config.eval_every=...`). Here each is a short error in absl's own format for bad
flags (the paths tried, or the override and ml_collections' 'Did you mean'), and exit status 1.
"""

import importlib.util
import os
import re
import sys
from typing import List, NoReturn

from absl import app
from absl import flags
from ml_collections.config_flags import config_path

FLAGS = flags.FLAGS

# Path settings, whose '~' the shell leaves alone in '--config.output_dir=~/runs' (it expands a
# word's leading '~' only): a directory named '~' was made in the working directory.
_PATH_FIELDS = ('data_location', 'cache_dir', 'tfds_data_dir', 'predict_input', 'predict_output',
                'output_dir', 'checkpoint', 'export_dir')


def fail(message: str) -> NoReturn:
  """A command-line mistake: one short message and exit status 1, as absl's flag errors."""
  sys.stderr.write(f'FATAL Flags parsing error: {message}\n'
                   'Pass --helpshort or --helpfull to see help on flags.\n')
  sys.exit(1)


def _config_file_error(error: OSError) -> str:
  # Its first line names the module ml_collections loads the file as ('config_config').
  attempts = str(error.__cause__ or error).split('\n', 1)[-1]
  return f'--config: cannot load the config file:\n{attempts}'


# The override forms ml_collections accepts: --config.a.b=v, -config.a[0] v, --noconfig.a.b.
_OVERRIDE = re.compile(r'^-{1,2}(?:no)?config\.([^=]*)')


def _config_of(argv: List[str]):
  """The config the command line names, loaded again: absl has unset the flags by the time
  a parse error reaches us."""
  for i, arg in enumerate(argv[1:], 1):
    match = re.match(r'^-{1,2}config(?:=(.*))?$', arg)
    spec = match and (match.group(1) if match.group(1) is not None else
                      (argv[i + 1] if i + 1 < len(argv) else None))
    if spec:
      path, _, argument = spec.partition(':')
      try:
        module_spec = importlib.util.spec_from_file_location('_dlrm_cli_config', path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module.get_config(*([argument] if argument else []))
      except Exception:  # pylint: disable=broad-except
        return None  # then its own error is the one to show
  return None


def _message(error: BaseException) -> str:
  while isinstance(error, BaseException):  # an AttributeError wraps ml_collections' KeyError
    error = error.args[0] if error.args else ''
  return str(error)


def _bad_override(argv: List[str]) -> str:
  """The first override whose path the config cannot take, and why ('' if none: then the
  error is not a user's typo). An unknown field comes with ml_collections' 'Did you mean'."""
  # Overrides and --config itself may come from a --flagfile, which absl expands as it parses.
  argv = FLAGS.read_flags_from_files(argv, force_gnu=False)
  config = _config_of(argv)
  if config is None:
    return ''
  for arg in argv[1:]:
    match = _OVERRIDE.match(arg)
    if not match:
      continue
    try:
      config_path.get_value(match.group(1), config)
    except (KeyError, AttributeError) as e:
      name, _, hint = _message(e).partition('\n')
      return (f'flag {arg}: the config has no field {name.strip(chr(34) + chr(39))!r}'
              + (f'. {hint}' if hint else ''))
    except (IndexError, ValueError) as e:
      return f'flag {arg}: {e}'
  return ''


def parse_flags(argv: List[str]) -> List[str]:
  """absl's flag parsing (`app.run`'s flags_parser), with --config's mistakes as short errors."""
  try:
    argv = app.parse_flags_with_usage(argv)
    if 'config' in FLAGS and FLAGS.config is not None:
      FLAGS.config.get('mode')  # a file that did not load raises on its first use
  except OSError as e:
    fail(_config_file_error(e))
  except (AttributeError, KeyError, IndexError, ValueError):
    message = _bad_override(argv)
    if not message:
      raise
    fail(message)
  return argv


def run_directory(workdir, config):
  """--workdir (its '~' expanded), or None to let the trainer name the run directory.

  Both --workdir and --config.checkpoint name the run directory, and two different ones are
  refused: --workdir used to win, and a job script's fresh --workdir beside the
  --config.checkpoint that a stopped run's message asks for trained from step 0 elsewhere, the
  checkpoint unused. (train_and_evaluate(config, workdir), called from Python, takes workdir.)
  """
  if not workdir:
    return None
  workdir = os.path.expanduser(workdir)
  if config.checkpoint and os.path.realpath(workdir) != os.path.realpath(config.checkpoint):
    raise app.UsageError(
        f'--workdir={workdir} and --config.checkpoint={config.checkpoint} name two run '
        'directories: pass one of them (--config.checkpoint is the one a stopped run resumes '
        'from)')
  return workdir


def command_line_config(config):
  """The parsed --config, its path settings' '~' as the home directory, as the shell would have
  expanded it."""
  for name in _PATH_FIELDS:
    if isinstance(config.get(name), str):
      config[name] = os.path.expanduser(config[name])
  return config
