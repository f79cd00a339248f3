"""Checkpoints of the whole train state through orbax, in `workdir/checkpoints`.

orbax writes each step into a temporary directory and renames it into place only once every
file is written, so a crash or kill mid-save leaves the previous checkpoint as the newest
complete one; `restore_latest` only ever sees complete steps.
"""

import os
from typing import Optional

from absl import logging
import jax
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
