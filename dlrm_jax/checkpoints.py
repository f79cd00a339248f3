"""Checkpoints of the whole train state through orbax, in `workdir/checkpoints`.

orbax writes each step into a temporary directory and renames it into place only once every
file is written, so a crash or kill mid-save leaves the previous checkpoint as the newest
complete one; `restore_latest` only ever sees complete steps.
"""

import contextlib
import errno
import fcntl
import itertools
import json
import logging as std_logging
import os
import signal
import threading
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from absl import logging
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp


def make_manager(workdir: str, config, training: bool = False) -> ocp.CheckpointManager:
  """The run's checkpoint manager. `training` (the run holding the run directory's lock)
  removes what saves killed mid-write left (`<step>.orbax-checkpoint-tmp*`, a near copy of the
  state each): a preemption save at a step off the save_steps grid is never written again.
  Nothing else may: an evaluation beside a running trainer would delete its save in flight."""
  options = ocp.CheckpointManagerOptions(
      cleanup_tmp_directories=training,
      # 0 keeps every checkpoint, as TensorFlow's Saver(max_to_keep=0) under DeepRec.
      max_to_keep=int(config.keep_checkpoint_max) or None,
      enable_async_checkpointing=bool(config.async_checkpointing),
      create=True)
  # Uncompressed: float tables barely compress, and tensorstore holds every encoded chunk of a
  # compressed write until the write completes, one table's worth of extra memory at each save
  # (1.08 GB for the Criteo tables); uncompressed chunks are written straight from the array.
  handler = ocp.PyTreeCheckpointHandler(use_compression=False)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'),
                               options=options, item_handlers=handler)


def _leaves(tree) -> Dict[str, Tuple[Tuple[int, ...], str]]:
  """`tree`'s array leaves by dotted path ('params.tables.fused'), as (shape, dtype), and its
  empty nodes (an optimizer without slots: EmptyState, {}; None in a checkpoint's metadata) as
  ((), 'empty'): gradient descent's sparse and dense states differ only in those."""
  def name(key):
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        return str(getattr(key, attr))
    return str(key)

  def empty(node) -> bool:
    return node is None or (isinstance(node, (dict, tuple, list)) and not node)
  return {'.'.join(name(k) for k in path):
          ((), 'empty') if empty(leaf) else (tuple(leaf.shape), str(leaf.dtype))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=empty)[0]}


def saved_config(workdir: str) -> Optional[Dict[str, Any]]:
  """The run's config.json (the settings its checkpoints were made with); None when there is
  none or it cannot be read."""
  try:
    with open(os.path.join(workdir, 'config.json')) as f:
      saved = json.load(f)
  except (OSError, ValueError):
    return None
  return saved if isinstance(saved, dict) else None


def config_differences(saved: Dict[str, Any], current: Dict[str, Any],
                       prefix: str = '') -> List[str]:
  """'field: saved -> current' for every (dotted) field whose value differs between two configs.

  `distributed` is left out: config.json is process 0's, and each process has its own id (and
  a resume may well run on other hosts).
  """
  lines = []
  # dcn's sizes shape nothing in a run of another interaction (and runs from before they existed
  # lack them): naming them would only make every such resume list two unchanged settings.
  uses_dcn = 'dcn' in (saved.get('interaction_op'), current.get('interaction_op'))
  for key in sorted((set(saved) | set(current)) - ({'distributed'} if not prefix else set())):
    if key.startswith('dcn_') and not prefix and not uses_dcn:
      continue
    old, new = saved.get(key, '(absent)'), current.get(key, '(absent)')
    if isinstance(old, dict) and isinstance(new, dict):
      lines += config_differences(old, new, f'{prefix}{key}.')
    elif old != new:
      lines.append(f'{prefix}{key}: {json.dumps(old)} -> {json.dumps(new)}')
  return lines


def misfits(manager: ocp.CheckpointManager, abstract_state,
            parts: Optional[Sequence[str]] = None) -> List[str]:
  """How the newest checkpoint's arrays differ from `abstract_state`'s, read from its metadata
  (nothing is loaded); [] when they fit, when there is no checkpoint, or when its step was
  deleted meanwhile (restore_latest then takes the newer one). With `parts`, only the
  checkpoint's entries under those top-level names count (a partial restore's)."""
  step = manager.latest_step()
  if step is None:
    return []
  try:
    metadata = manager.item_metadata(step)
    if metadata is None or not jax.tree_util.tree_leaves(metadata):
      raise ValueError('no arrays in its metadata')
    saved = _leaves(metadata)
  except Exception as e:  # pylint: disable=broad-except
    path = os.path.join(str(manager.directory), str(step))
    if not os.path.exists(path) or _reloaded_latest_step(manager) != step:
      return []  # deleted meanwhile, by a trainer keeping keep_checkpoint_max steps
    # A directory named as a step that orbax did not write (or a damaged one) failed only at
    # the restore, with orbax's KeyError, after the run had replaced config.json.
    raise ValueError(f'{path} is not a checkpoint that can be read ({type(e).__name__}: '
                     f'{str(e)[:300]}): move it out of {manager.directory}, or train into a '
                     'new run directory') from None
  if parts is not None:
    saved = {path: leaf for path, leaf in saved.items() if path.split('.')[0] in parts}
  wanted = _leaves(abstract_state)
  show = lambda leaf: f'{leaf[0]} {leaf[1]}'  # pylint: disable=unnecessary-lambda-assignment
  kinds = [
      ('arrays of another shape or dtype',
       [f'{p}: {show(saved[p])} saved, {show(wanted[p])} now'
        for p in sorted(wanted) if p in saved and saved[p] != wanted[p]]),
      ('state entries this config needs and the checkpoint lacks',
       sorted(set(wanted) - set(saved))),
      ('state entries in the checkpoint this config has no place for',
       sorted(set(saved) - set(wanted)))]
  return [f'{len(paths)} {kind} (first: {paths[0]})' for kind, paths in kinds if paths]


def refuse(manager: ocp.CheckpointManager, problems: List[str], config, workdir: str):
  """Raises the error for a checkpoint that does not fit `config`: the arrays that differ
  (`misfits`), and the config fields that differ from the run's config.json.

  Raised before a run writes anything. Otherwise a changed model size or optimizer would
  surface as orbax's tree dump, after the data were cached and the step compiled, and the run
  would already have replaced config.json, the record of the settings the checkpoint was made
  with.
  """
  message = [f'the checkpoint at step {manager.latest_step()} in {manager.directory} does not '
             'fit this config: ' + '; '.join(problems) + '.']
  saved = saved_config(workdir)
  if saved is not None:
    differences = config_differences(saved, json.loads(config.to_json_best_effort()))
    message.append(f'The config differs from {os.path.join(workdir, "config.json")} (the '
                   'settings the checkpoint was made with) in: '
                   + (', '.join(differences) or 'nothing') + '.')
  if config.mode == 'train':
    message.append('Those among them that shape the state (table sizes, embedding_dim, the '
                   'MLPs, the dcn_* sizes, the optimizer, sparse_updates, no_acceleration) must '
                   'be the run\'s; '
                   'the others (steps, learning_rate, emb_fusion, ...) may change on a resume. '
                   'Or train into a new run directory (--config.checkpoint).')
  else:  # eval and predict read the parameters only
    message.append('Those among them that shape the parameters (table sizes, embedding_dim, '
                   'the MLPs, batch_norm, interaction_op, the dcn_* sizes) must be the run\'s; '
                   'the optimizer settings and emb_fusion may differ.')
  raise ValueError(' '.join(message))


def _reloaded_latest_step(manager: ocp.CheckpointManager, attempts: int = 5) -> Optional[int]:
  """The newest step on disk now; listing the steps races with a trainer deleting old ones."""
  for attempt in range(attempts):
    try:
      manager.reload()
      return manager.latest_step()
    except FileNotFoundError:
      if attempt + 1 == attempts:
        raise
  return None


def restore_latest(manager: ocp.CheckpointManager, state, attempts: int = 5,
                   partial: bool = False):
  """The newest complete checkpoint restored into `state`'s structure, or `state` if none.
  With `partial`, `state` may hold a part of the checkpoint's entries, and only those are read.

  An evaluator that follows a run still training can see its chosen step deleted under it (the
  trainer keeps keep_checkpoint_max steps); it then takes the newer step instead.
  """
  step = manager.latest_step()
  if step is None:
    return state
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  for attempt in range(attempts):
    try:
      restored = manager.restore(step, args=ocp.args.PyTreeRestore(
          abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
          partial_restore=partial))
      break
    except Exception as e:  # pylint: disable=broad-except
      newer = _reloaded_latest_step(manager)
      if attempt + 1 < attempts and newer is not None and newer > step and not os.path.exists(
          os.path.join(str(manager.directory), str(step))):
        logging.warning('checkpoint %d was deleted while it was read (a run still training '
                        'there?); restoring %d instead', step, newer)
        step = newer
        continue
      if isinstance(e, ValueError):
        raise ValueError(
            f'the checkpoint at step {step} in {manager.directory} does not fit this config '
            '(another optimizer, model size or feature spec?); compare with the '
            f'config.json beside it, or use a new run directory. orbax says: {str(e)[:2000]}'
        ) from e
      raise
  logging.info('restored checkpoint at step %d from %s', step, manager.directory)
  return restored


def save(manager: ocp.CheckpointManager, step: int, state) -> None:
  """Saves `state`; with async_checkpointing the step loop goes on while it is written."""
  manager.save(step, args=ocp.args.PyTreeSave(state))


def wait(manager: ocp.CheckpointManager) -> None:
  manager.wait_until_finished()


@contextlib.contextmanager
def finished_on_failure(manager: ocp.CheckpointManager) -> Iterator[None]:
  """Lets a save still being written finish when the block fails: the error names it as the
  checkpoint to resume from, and the exiting process would leave it half written. One process
  only: the others, which did not fail, would not join a collective wait."""
  try:
    yield
  except Exception:
    if jax.process_count() == 1:
      try:
        wait(manager)
      except Exception:  # pylint: disable=broad-except
        # The failure that stopped the run is the one to report (and to catch by its type).
        logging.exception('the checkpoint save in flight failed too')
    raise


class RunDirectoryInUse(RuntimeError):
  """Another training run holds the run directory's lock."""


class _QuietOrbax(std_logging.Filter):
  """Passes orbax's warnings and errors, not its INFO lines (several a save)."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or 'orbax' not in record.pathname


def quiet_orbax_info() -> None:
  """Keeps orbax's per-save INFO chatter out of absl's log (once per process)."""
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietOrbax) for f in handler.filters):
    handler.addFilter(_QuietOrbax())


def make_new_directory(path: str) -> str:
  """Creates `path`, or else the first of `path`-1, `path`-2... that does not exist; its name.

  The default run directory is named by the second: a second run started in the same second
  (a sweep's jobs launched together) found the first one's directory and stopped at its lock.
  mkdir creates a name for one caller only, so each run gets a directory of its own.
  """
  parent = os.path.dirname(path)
  try:
    if parent:
      os.makedirs(parent, exist_ok=True)
    for n in itertools.count():
      name = f'{path}-{n}' if n else path
      try:
        os.mkdir(name)
        return name
      except FileExistsError:
        continue
  except OSError as e:
    raise OSError(f'run directory {path} is not writable: {e}') from e


@contextlib.contextmanager
def training_lock(workdir: str, made: bool = False) -> Iterator[None]:
  """Holds `workdir/.train.lock` while a training run writes into `workdir`.

  Two runs started on one directory (the same --config.checkpoint twice) would save the same
  steps into one checkpoint directory and overwrite each other's results; the second one now
  stops at once instead. flock is released by the kernel when the process ends, so a crashed or
  killed run leaves no stale lock. Evaluation and prediction only read, and take no lock: an
  evaluator may follow a run that is still training. In a multi-process run process 0 holds it.
  A run that fails before writing anything removes the directory if it made it (`made`: the
  caller did, for this run).
  """
  if jax.process_index() != 0:
    yield
    return
  path = os.path.join(workdir, '.train.lock')
  created = made or not os.path.isdir(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
    lock = open(path, 'a+')  # pylint: disable=consider-using-with
  except OSError as e:
    raise OSError(f'run directory {workdir} is not writable: {e}') from e
  with lock:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        # A file system without flock (some network mounts): train unguarded, as before.
        logging.warning('cannot lock %s (%s): nothing stops a second run on this directory',
                        path, e)
        yield
        return
      lock.seek(0)
      raise RunDirectoryInUse(
          f'run directory {workdir} is being trained by another process ({lock.read().strip()}); '
          'wait for it to end, or train into another directory (--config.checkpoint)') from None
    lock.seek(0)
    lock.truncate()
    lock.write(f'pid {os.getpid()} on {os.uname().nodename}\n')
    lock.flush()
    try:
      yield
    except BaseException:
      # A run that fails before writing anything (missing data, say) leaves no empty
      # model_DLRM_<timestamp> directory behind it for every try.
      if created and os.listdir(workdir) == ['.train.lock']:
        # Another run may open the lock in between: the directory is then its, and the error
        # to raise is still this run's own.
        with contextlib.suppress(OSError):
          os.remove(path)
          os.rmdir(workdir)
      raise
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


class Preempted(SystemExit):
  """Training stopped at a preemption notice (SIGTERM) or a Ctrl-C after checkpointing its last
  step.

  A SystemExit, so that `python -m dlrm_jax.main` prints the message and exits with status 1
  (no traceback: nothing went wrong), while a scheduler's wrapper still sees that the run did
  not finish. The same command with --config.checkpoint=<the run directory> resumes from the
  checkpoint.
  """


@contextlib.contextmanager
def _ctrl_c_as_sigterm(install: bool) -> Iterator[List[str]]:
  """In a multi-process run, turns a first Ctrl-C into a SIGTERM to this process, which JAX's
  preemption service takes as a notice for every process; a second one aborts at once. Yields
  a list that holds 'SIGINT' once that happened."""
  noticed: List[str] = []
  if not install:
    yield noticed
    return

  def notice(signum, frame):
    del signum, frame
    noticed.append('SIGINT')
    logging.warning('Ctrl-C: every process saves the step they agree on, then stops (Ctrl-C '
                    'again aborts)')
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.kill(os.getpid(), signal.SIGTERM)

  previous = signal.signal(signal.SIGINT, notice)
  try:
    yield noticed
  finally:
    signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)


class NoticeWhileWaiting(Exception):
  """A preemption notice (SIGTERM, a first Ctrl-C) that came while the loop waited for its
  next batch (`stop.waiting()`): the input may never come (a hung mount), so the loop stops at
  the step it reached instead of waiting on."""

  def __init__(self, name: str):
    super().__init__(f'{name} while waiting for the next batch')
    self.name = name


class _Notices:
  """`stop(step)`, and `stop.waiting()` around the wait for the next batch."""

  def __init__(self, ask: Callable[[int], str], interruptible: bool):
    self._ask, self._interruptible, self._waiting = ask, interruptible, False

  def __call__(self, step: int) -> str:
    return self._ask(step)

  @contextlib.contextmanager
  def waiting(self) -> Iterator[None]:
    self._waiting = self._interruptible
    try:
      yield
    finally:
      self._waiting = False

  def notice(self, name: str) -> None:
    """From a signal handler, on the main thread: interrupts a wait for the next batch."""
    if self._waiting:
      self._waiting = False
      raise NoticeWhileWaiting(name)


@contextlib.contextmanager
def preemption_notices() -> Iterator[_Notices]:
  """Yields `stop(step)`, to be asked after every train step: save this step, then stop? It
  answers the signal's name ('SIGTERM', 'SIGINT'), or '' to go on.

  In a single process, a notice while the loop waits inside `stop.waiting()` (for its next
  batch) raises NoticeWhileWaiting there: the batch may never come.

  Multi-process runs ask JAX's preemption service, which makes every process answer at the same
  step, so that their collective save lines up. Asking it is the only way such a run notices
  SIGTERM at all: from `jax.distributed.initialize` on, the service catches the signal, which
  then no longer ends the process. The service takes no SIGINT, so there a first Ctrl-C is
  passed on to it as a SIGTERM to the process. A single process answers from Python handlers
  installed only while the loop runs: SIGTERM, and a first Ctrl-C (a second one aborts at once,
  as before). So a signal while the data is cached or the model evaluates still ends the
  process at once (the newest complete checkpoint stays the newest).
  """
  on_main_thread = threading.current_thread() is threading.main_thread()
  if jax.distributed.is_initialized():
    # The service answers at a step every process reaches: a process waiting for input cannot
    # be stopped apart from the others.
    with _ctrl_c_as_sigterm(on_main_thread) as ctrl_c:
      yield _Notices(lambda step: ((ctrl_c[0] if ctrl_c else 'SIGTERM')
                                   if multihost_utils.reached_preemption_sync_point(step) else ''),
                     interruptible=False)
    return
  if not on_main_thread:
    yield _Notices(lambda step: '', interruptible=False)  # signals reach the main thread only
    return
  noticed = []
  notices = _Notices(lambda step: noticed[0] if noticed else '', interruptible=True)

  def notice(signum, frame):
    del frame
    noticed.append(signal.Signals(signum).name)
    if signum == signal.SIGINT:
      logging.warning('Ctrl-C: saving the current step, then stopping (Ctrl-C again aborts)')
      signal.signal(signal.SIGINT, signal.default_int_handler)
    notices.notice(noticed[0])

  previous = {s: signal.signal(s, notice) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield notices
  finally:
    for s, handler in previous.items():
      signal.signal(s, signal.SIG_DFL if handler is None else handler)
