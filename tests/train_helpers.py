"""Shared pieces of the training tests: tiny configs and per-step losses."""

import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from configs import default  # pylint: disable=g-import-not-at-top,wrong-import-position
from dlrm_jax import data_sources  # pylint: disable=wrong-import-position
from dlrm_jax import datagen  # pylint: disable=wrong-import-position
from dlrm_jax import input_pipeline  # pylint: disable=wrong-import-position
from dlrm_jax import train  # pylint: disable=wrong-import-position


def open_files():
  """The process's open files as (fd, target): identities, so that a file an earlier test's
  thread closes meanwhile neither hides a new one nor reads as a change (counts did both)."""
  files = set()
  for fd in os.listdir('/proc/self/fd'):
    try:
      files.add((fd, os.readlink(f'/proc/self/fd/{fd}')))
    except OSError:  # the listing's own fd, closed by now
      pass
  return files


def tiny_config(output_dir, **overrides):
  """configs/default.py:tiny writing under `output_dir`, with `overrides` applied."""
  config = default.get_config('tiny')
  config.output_dir = str(output_dir)
  for key, value in overrides.items():
    if isinstance(value, dict):
      config[key].update(value)
    else:
      config[key] = value
  return config


def planted_dir(tmp_root, train_rows=2000, eval_rows=500, seed=1):
  """A planted ELM data set (the tiny config's world) shared by the tests of a module."""
  directory = os.path.join(str(tmp_root), f'planted_elm_{train_rows}_{eval_rows}_{seed}')
  planted = default.get_config('tiny').planted.to_dict()
  planted.update(train_rows=train_rows, eval_rows=eval_rows, seed=seed)
  datagen.ensure_planted_data(directory, 'elm', **data_sources.planted_arguments(planted, 'elm'))
  return directory


def step_losses(config, train_path, num_steps):
  """Per-step losses and the final state of `num_steps` steps in file order (no shuffle)."""
  setup = train.make_setup(config)
  state = train.create_train_state(train.init_key(config.seed), setup)
  step_fn = train.compile_train_step(setup, state, train.effective_options(config)['op_fusion'])
  host = input_pipeline.batches([train_path], setup.spec, config.batch_size, num_epochs=None)
  batches = train.step_batches(host, setup, smartstaged=False)
  losses = []
  for _ in range(num_steps):
    state, loss = step_fn(state, next(batches))
    losses.append(float(loss))
  return np.asarray(losses), state


LOSSES_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
import train_helpers as th
config = th.tiny_config({out!r}, **{overrides!r})
from dlrm_jax import train
train.initialize_distributed(config)
import jax
assert jax.device_count() == {devices}, jax.devices()
losses, state = th.step_losses(config, {path!r}, {steps})
# Each table-shaped array of the state after the steps: its rows, and the rows of the device
# shards this process holds (with a model axis of m, rows / m each).
shards = [[leaf.shape[0], sorted({{s.data.shape[0] for s in leaf.addressable_shards}})]
          for leaf in jax.tree.leaves((state.params['tables'], state.table_opt_state))
          if leaf.ndim >= 1]
if jax.process_index() == 0:
  print('LOSSES', json.dumps(list(map(float, losses))))
  print('SHARDS', json.dumps(shards))
"""


def losses_in_subprocess(out_dir, train_path, steps, local_devices, total_devices=None,
                         num_processes=1, with_shards=False, **overrides):
  """Per-step losses from fresh processes with `local_devices` CPU devices each; with
  `with_shards` also [rows, [rows of each device's shard]] of the final state's table arrays.

  Device counts are fixed when JAX starts, so each configuration runs in its own interpreter.
  With num_processes > 1 the processes join through a coordinator on localhost.
  """
  import socket  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={local_devices}')
  procs = []
  if num_processes > 1:
    with socket.socket() as s:
      s.bind(('127.0.0.1', 0))
      port = s.getsockname()[1]
  for pid in range(num_processes):
    extra = dict(overrides)
    if num_processes > 1:
      extra['distributed'] = dict(coordinator_address=f'127.0.0.1:{port}',
                                  num_processes=num_processes, process_id=pid,
                                  cpu_collectives=True)
    code = LOSSES_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)),
                                out=str(out_dir), overrides=extra, path=str(train_path),
                                steps=steps, devices=total_devices or local_devices)
    procs.append(subprocess.Popen([sys.executable, '-c', code], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE))
  outputs = [p.communicate(timeout=900) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-4000:]
  printed = {l.split(' ', 1)[0]: json.loads(l.split(' ', 1)[1])
             for l in outputs[0][0].splitlines() if l.startswith(('LOSSES ', 'SHARDS '))}
  losses = np.asarray(printed['LOSSES'])
  return (losses, printed['SHARDS']) if with_shards else losses
