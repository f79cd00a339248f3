"""Tables sharded over a model axis, 2x2 meshes, two processes, and restoring on fewer devices.

CPU devices stand in for accelerators (XLA_FLAGS=--xla_force_host_platform_device_count=N);
each configuration runs in its own interpreter because the device count is fixed at start-up.
"""

import json
import os

import numpy as np
import pytest

import train_helpers as th


@pytest.fixture(scope='module')
def train_path(tmp_path_factory):
  return os.path.join(th.planted_dir(tmp_path_factory.mktemp('data')), 'train.csv')


@pytest.fixture(scope='module')
def one_device_losses(tmp_path_factory, train_path):
  return th.losses_in_subprocess(tmp_path_factory.mktemp('one'), train_path, 5, 1)


# Sharding changes which device sums which part of a reduction, nothing else: float32 agreement.
RTOL = 1e-5


@pytest.mark.slow
@pytest.mark.parametrize('mesh', [(1, 4), (2, 2)])
def test_sharded_tables_match_one_device(tmp_path, train_path, one_device_losses, mesh):
  losses, shards = th.losses_in_subprocess(tmp_path, train_path, 5, 4, mesh_shape=mesh,
                                           with_shards=True)
  np.testing.assert_allclose(losses, one_device_losses, rtol=RTOL)
  # The losses would agree as well with every table whole on every device: the tables and
  # their row-wise slots must be split by rows over the model axis.
  model = mesh[1]
  assert shards and all(parts == [rows // model] for rows, parts in shards), shards


@pytest.mark.slow
def test_cross_layers_and_row_wise_adagrad_sharded_match_one_device(tmp_path, train_path):
  # dcn's parameters are replicated like the MLPs'; rowwise_adagrad's [rows, 1] accumulators
  # are split by rows like the tables they belong to.
  common = dict(interaction_op='dcn', optimizer='rowwise_adagrad',
                optimizer_hparams={'initial_accumulator_value': 0.1})
  one = th.losses_in_subprocess(tmp_path, train_path, 4, 1, **common)
  four, shards = th.losses_in_subprocess(tmp_path, train_path, 4, 4, mesh_shape=(2, 2),
                                         with_shards=True, **common)
  np.testing.assert_allclose(four, one, rtol=RTOL)
  assert len(shards) == 2 and all(parts == [rows // 2] for rows, parts in shards), shards


@pytest.mark.slow
def test_unfused_tables_sharded_match_one_device(tmp_path, train_path):
  one = th.losses_in_subprocess(tmp_path, train_path, 4, 1, emb_fusion=False)
  four, shards = th.losses_in_subprocess(tmp_path, train_path, 4, 4, emb_fusion=False,
                                         mesh_shape=(2, 2), with_shards=True)
  np.testing.assert_allclose(four, one, rtol=RTOL)
  assert len(shards) > 2 and all(parts == [rows // 2] for rows, parts in shards), shards


@pytest.mark.slow
def test_two_processes_match_one_process_with_four_devices(tmp_path, train_path,
                                                           one_device_losses):
  two = th.losses_in_subprocess(tmp_path, train_path, 5, 2, total_devices=4, num_processes=2)
  np.testing.assert_allclose(two, one_device_losses, rtol=RTOL)


TRAIN_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import train_helpers as th
from dlrm_jax import train
config = th.tiny_config({out!r}, **{overrides!r})
train.train_and_evaluate(config, {workdir!r})
"""


def _train_in_subprocess(out_dir, workdir, devices, **overrides):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  code = TRAIN_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)), out=str(out_dir),
                             overrides=overrides, workdir=str(workdir))
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       timeout=900, check=False)
  assert out.returncode == 0, out.stderr[-4000:]


@pytest.mark.slow
def test_save_on_four_devices_restore_on_one_continues_identically(tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  from dlrm_jax import metric_writer  # pylint: disable=g-import-not-at-top
  common = dict(log_every_steps=1, shuffle_buffer=0, no_eval=True)
  first = tmp_path / 'first'
  _train_in_subprocess(tmp_path / 'out', first, 4, steps=4, mesh_shape=(2, 2), **common)
  shutil.copytree(first, tmp_path / 'on_one')
  os.rename(first, tmp_path / 'on_four')
  _train_in_subprocess(tmp_path / 'out', tmp_path / 'on_four', 4, steps=8, mesh_shape=(2, 2),
                       **common)
  _train_in_subprocess(tmp_path / 'out', tmp_path / 'on_one', 1, steps=8, **common)
  steps4, four = metric_writer.read_scalars(str(tmp_path / 'on_four'), 'train_loss')
  steps1, one = metric_writer.read_scalars(str(tmp_path / 'on_one'), 'train_loss')
  np.testing.assert_array_equal(steps4, np.arange(1, 9))
  np.testing.assert_array_equal(steps1, np.arange(1, 9))
  np.testing.assert_allclose(one[4:], four[4:], rtol=RTOL)
  # The first four steps were written once, by the run on four devices, in both directories.
  np.testing.assert_array_equal(one[:4], four[:4])


@pytest.mark.slow
def test_a_data_axis_of_three_trains_and_evaluates_as_one_device(tmp_path, train_path):
  # Batches of 36 split over 3 devices, but the dedup's capacities (steps of m * 2^k) rarely
  # did: JAX refused the first batch. Every capacity is now a multiple of the data axis.
  sizes = dict(batch_size=36, eval_batch_size=510)
  one = th.losses_in_subprocess(tmp_path / 'one', train_path, 4, 1, **sizes)
  three = th.losses_in_subprocess(tmp_path / 'three', train_path, 4, 3, **sizes)
  np.testing.assert_allclose(three, one, rtol=RTOL)
  # The trainer end to end, its eval batches (510 rows) split over the 3 devices too.
  _train_in_subprocess(tmp_path / 'out', tmp_path / 'run', 3, steps=4, **sizes)
  with open(tmp_path / 'run' / 'results.json') as f:
    results = json.load(f)
  eval_rows = th.tiny_config(tmp_path).planted.eval_rows  # every eval row, counted once
  assert results['steps'] == 4 and results['eval_num_examples'] == eval_rows
