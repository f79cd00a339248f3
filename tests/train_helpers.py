"""Shared pieces of the training tests: tiny configs and per-step losses."""

import os
import sys

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from configs import default  # pylint: disable=g-import-not-at-top,wrong-import-position
from dlrm_jax import datagen  # pylint: disable=wrong-import-position
from dlrm_jax import input_pipeline  # pylint: disable=wrong-import-position
from dlrm_jax import train  # pylint: disable=wrong-import-position


def tiny_config(output_dir, **overrides):
  """The default config shrunk to seconds: small tables and MLPs, planted data of a few k rows."""
  config = default.get_config()
  config.output_dir = str(output_dir)
  config.hash_buckets = 1000
  config.embedding_dim = 4
  config.max_list_len = 8
  config.bottom_mlp = (16, 4)
  config.top_mlp = (16,)
  config.batch_size = 64
  config.eval_batch_size = 256
  config.shuffle_buffer = 256
  config.log_every_steps = 10
  config.learning_rate = 0.01
  config.planted.train_rows = 8000
  config.planted.eval_rows = 3000
  for key, value in overrides.items():
    config[key] = value
  return config


def planted_dir(tmp_root, train_rows=2000, eval_rows=500, seed=1):
  """A planted ELM data set shared by the tests of one session."""
  directory = os.path.join(str(tmp_root), f'planted_elm_{train_rows}_{eval_rows}_{seed}')
  datagen.ensure_planted_data(directory, 'elm', train_rows=train_rows, eval_rows=eval_rows,
                              seed=seed)
  return directory


def step_losses(config, train_path, num_steps):
  """Per-step losses and the final state of `num_steps` steps in file order (no shuffle)."""
  setup = train.make_setup(config)
  state = train.create_train_state(jax.random.PRNGKey(config.seed), setup)
  step_fn = train.compile_train_step(setup, state, train.effective_options(config)['op_fusion'])
  host = input_pipeline.batches([train_path], setup.spec, config.batch_size, num_epochs=None)
  batches = train.device_batches(host, setup, smartstaged=False)
  losses = []
  for _ in range(num_steps):
    state, loss = step_fn(state, next(batches))
    losses.append(float(loss))
  return np.asarray(losses), state
