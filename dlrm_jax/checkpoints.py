"""Checkpoints of the whole train state through orbax, in `workdir/checkpoints`.

orbax writes each step into a temporary directory and renames it into place only once every
file is written, so a crash or kill mid-save leaves the previous checkpoint as the newest
complete one; `restore_latest` only ever sees complete steps.
"""

import contextlib
import os
import signal
import threading
from typing import Callable, Iterator, Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp


def make_manager(workdir: str, config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max(int(config.keep_checkpoint_max), 1),
      enable_async_checkpointing=bool(config.async_checkpointing),
      create=True)
  # Uncompressed: float tables barely compress, and tensorstore holds every encoded chunk of a
  # compressed write until the write completes, one table's worth of extra memory at each save
  # (1.08 GB for the Criteo tables); uncompressed chunks are written straight from the array.
  handler = ocp.PyTreeCheckpointHandler(use_compression=False)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'),
                               options=options, item_handlers=handler)


def latest_step(manager: ocp.CheckpointManager) -> Optional[int]:
  return manager.latest_step()


def restore_latest(manager: ocp.CheckpointManager, state):
  """The newest complete checkpoint restored into `state`'s structure, or `state` if none."""
  step = manager.latest_step()
  if step is None:
    return state
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  try:
    restored = manager.restore(step, args=ocp.args.PyTreeRestore(
        abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)))
  except ValueError as e:
    raise ValueError(
        f'the checkpoint at step {step} in {manager.directory} does not fit this config (another '
        'optimizer, model size, feature spec or emb_fusion?); compare with the config.json beside '
        f'it, or use a new run directory. orbax says: {str(e)[:2000]}') from e
  logging.info('restored checkpoint at step %d from %s', step, manager.directory)
  return restored


def save(manager: ocp.CheckpointManager, step: int, state) -> None:
  """Saves `state`; with async_checkpointing the step loop goes on while it is written."""
  manager.save(step, args=ocp.args.PyTreeSave(state))


def wait(manager: ocp.CheckpointManager) -> None:
  manager.wait_until_finished()


class Preempted(SystemExit):
  """Training stopped at a preemption notice (SIGTERM) after checkpointing its last step.

  A SystemExit, so that `python -m dlrm_jax.main` prints the message and exits with status 1
  (no traceback: nothing went wrong), while a scheduler's wrapper still sees that the run did
  not finish. Running the same command again resumes from the checkpoint.
  """


@contextlib.contextmanager
def preemption_notices() -> Iterator[Callable[[int], bool]]:
  """Yields `stop(step)`, to be asked after every train step: save this step, then stop?

  Multi-process runs ask JAX's preemption service, which makes every process answer True at the
  same step, so that their collective save lines up. Asking it is the only way such a run
  notices SIGTERM at all: from `jax.distributed.initialize` on, the service catches the signal,
  which then no longer ends the process. A single process answers from a Python handler
  installed only while the loop runs, so SIGTERM while the data is cached or the model evaluates
  still ends the process at once, as it did before (the newest complete checkpoint stays the
  newest).
  """
  if jax.distributed.is_initialized():
    yield multihost_utils.reached_preemption_sync_point
    return
  if threading.current_thread() is not threading.main_thread():
    yield lambda step: False  # Python delivers signals to the main thread only
    return
  noticed = threading.Event()
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: noticed.set())
  try:
    yield lambda step: noticed.is_set()
  finally:
    signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
