"""The memory planner on tiny configs and on the MLPerf config, which it never allocates."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import criteo_1tb_mlperf
from configs import default
from dlrm_jax import feature_spec as fs
from dlrm_jax import models
from dlrm_jax import optimizers
from dlrm_jax import planner
from dlrm_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Rows of the 26 tables of a tiny Criteo config: none a multiple of 64, some below it.
TINY_CRITEO_ROWS = (1000, 3, 64, 65, 130, 7) * 4 + (2000, 1)


def tiny_config(**overrides):
  """configs/default.py:tiny (hash_buckets 1000, small MLPs); no data, no devices needed."""
  config = default.get_config('tiny')
  for key, value in overrides.items():
    config[key] = value
  return config


def tiny_criteo_config(**overrides):
  config = tiny_config(feature_spec='criteo', **overrides)
  config.criteo_table_rows = TINY_CRITEO_ROWS
  return config


def nbytes(tree):
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def train_state_shapes(config):
  """train.create_train_state traced, not run: the real state's leaves without their values."""
  setup = train.make_setup(config)
  return jax.eval_shape(lambda rng: train.create_train_state(rng, setup), jax.random.PRNGKey(0))


def padded(rows):
  return -(-rows // 64) * 64


@pytest.mark.parametrize('emb_fusion', [True, False])
@pytest.mark.parametrize('mesh', [(8, 1), (2, 4), (1, 8)])
def test_table_bytes_are_padded_rows_times_dim_split_over_model(emb_fusion, mesh):
  config = tiny_criteo_config(emb_fusion=emb_fusion)
  p = planner.plan(config, 8, mesh)
  if emb_fusion:
    stored = padded(sum(TINY_CRITEO_ROWS))
  else:
    stored = sum(padded(r) for r in TINY_CRITEO_ROWS)
  assert p.table_rows == sum(TINY_CRITEO_ROWS)
  assert p.stored_table_rows == stored
  assert p.tables == stored * 4 * 4 // mesh[1]
  assert p.mesh_shape == mesh and p.rows_per_device == 64 // mesh[0]
  tables = p.components()[0]
  assert tables.total == p.tables * 8  # replicated over data: data copies of the whole


# Bytes per device of each optimizer's table state (one fused array, mesh (2, 4)), as multiples of
# the table's bytes, plus extras: a replicated int32 count, an int32 [rows, 1] decay period.
@pytest.mark.parametrize('optimizer,sparse_updates,slots,count,decay_period', [
    ('adam', True, 2, True, False),
    ('adamasync', True, 2, True, False),
    ('adagrad', True, 1, False, False),
    ('adagraddecay', True, 1, True, True),
    ('gradientdescent', True, 0, False, False),
    # The dense path keeps the optax state over the tables: no per-row decay period there.
    ('adam', False, 2, False, False),
    ('adamasync', False, 2, False, False),
    ('adagrad', False, 1, False, False),
    ('adagraddecay', False, 1, False, False),
    ('gradientdescent', False, 0, False, False),
])
def test_table_optimizer_slots(optimizer, sparse_updates, slots, count, decay_period):
  config = tiny_criteo_config(optimizer=optimizer, sparse_updates=sparse_updates)
  p = planner.plan(config, 8, (2, 4))
  rows_per_device = padded(sum(TINY_CRITEO_ROWS)) // 4
  expected = slots * p.tables + 4 * count + 4 * rows_per_device * decay_period
  assert p.table_optimizer_state == expected


@pytest.mark.parametrize('optimizer', optimizers.OPTIMIZER_NAMES)
@pytest.mark.parametrize('sparse_updates', [True, False])
def test_plan_matches_the_bytes_of_a_real_train_state(optimizer, sparse_updates):
  # ELM with 1038 buckets: 13 x 1038 + 2 x 5 = 13504 fused rows, a multiple of 64, so no padding
  # and one device hold exactly what create_train_state builds.
  config = tiny_config(hash_buckets=1038, optimizer=optimizer, sparse_updates=sparse_updates)
  assert fs.from_config(config).total_rows % 64 == 0
  state = train_state_shapes(config)
  p = planner.plan(config, 1, (1, 1))
  assert p.tables == nbytes(state.params['tables'])
  assert p.mlp_params == nbytes(state.params['mlp']) + nbytes(state.batch_stats)
  assert p.table_optimizer_state + p.mlp_optimizer_state == nbytes(
      (state.opt_state, state.table_opt_state))
  if sparse_updates:
    assert p.mlp_optimizer_state == nbytes(state.opt_state)
  persistent = p.tables + p.table_optimizer_state + p.mlp_params + p.mlp_optimizer_state
  assert persistent + 4 == nbytes(state)  # + the int32 step


def test_mlp_bytes_equal_the_flax_parameter_count_with_padded_tables():
  # A real state, allocated (tiny); hash_buckets 1000: the planned tables get padded.
  config = tiny_config(optimizer='adamasync')
  state = train.create_train_state(jax.random.PRNGKey(0), train.make_setup(config))
  p = planner.plan(config, 1, (1, 1))
  params = sum(x.size for x in jax.tree.leaves(state.params['mlp']))
  stats = sum(x.size for x in jax.tree.leaves(state.batch_stats))
  assert p.mlp_params == 4 * (params + stats)
  assert p.mlp_optimizer_state == nbytes(state.opt_state)
  assert p.tables == padded(13 * 1000 + 2 * 5) * 4 * 4


def test_sparse_temporaries_are_unique_row_buffers_and_adam_adds_a_full_table_gradient():
  config = tiny_criteo_config(optimizer='adagrad')
  p = planner.plan(config, 8, (1, 8))
  # 64 x 26 lookups + the padding entry, with models.UniqueRows' 1.25x headroom (2081), rounded
  # up to its step of 256 at that size.
  capacity = 2304
  assert models.unique_capacity(64 * 26 + 1) == capacity
  # Gathered rows, their gradient and the accumulator's rows.
  assert p.table_step_temporaries == 3 * capacity * 4 * 4
  adam = planner.plan(tiny_criteo_config(optimizer='adam'), 8, (1, 8))
  assert adam.table_step_temporaries == 2 * capacity * 4 * 4 + adam.tables
  dense = planner.plan(tiny_criteo_config(optimizer='adagrad', sparse_updates=False), 8, (1, 8))
  assert dense.table_step_temporaries == 2 * capacity * 4 * 4 + dense.tables


def test_adagraddecay_with_a_data_axis_plans_a_copy_of_its_decay_period():
  # XLA's partitioned scatter copies the int32 [rows, 1] period whole when data > 1: the plan
  # for DeepRec's Criteo tables on (8, 1) had 7 MB of temporaries where the step took 79 MB.
  config = tiny_criteo_config(optimizer='adagraddecay')
  one, split = planner.plan(config, 8, (1, 8)), planner.plan(config, 8, (2, 4))
  capacity = models.unique_capacity(64 * 26 + 1)
  rows = one.stored_table_rows
  # Gathered rows, their gradient, the accumulator's rows and the periods' (int32, one a row).
  assert one.table_step_temporaries == 3 * capacity * 4 * 4 + capacity * 4
  # The same unique-row buffers, plus the periods of this device's quarter of the rows.
  assert split.table_step_temporaries == one.table_step_temporaries + rows * 4 // 4


def test_activations_split_over_data_and_bf16_shrinks_them():
  config = tiny_criteo_config()
  one = planner.plan(config, 2, (1, 2))
  two = planner.plan(config, 2, (2, 1))
  assert one.activations == 2 * two.activations > 0
  assert one.batch > two.batch
  half = planner.plan(tiny_criteo_config(bf16=True), 2, (1, 2))
  assert one.activations / 2 < half.activations < one.activations  # embeddings stay float32
  # The count itself, written out for the tiny Criteo model with `dot`: 26 one-id slots and 26
  # pooled rows of dim 4; 13 dense inputs; bottom (16, 4) with Dense, ReLU and batch norm
  # outputs; `dot` over 27 vectors (stacked 27 x 4, Gram 27 x 27, float32 always) out to
  # 4 + 351; top (16,) with Dense and ReLU outputs, then the logit. x 2: saved values and their
  # gradients.
  dot = tiny_criteo_config(interaction_op='dot')
  spec, model = fs.from_config(dot), train.make_setup(dot).model
  assert (spec.num_slots, spec.num_sparse, spec.embedding_dim, spec.num_dense) == (26, 26, 4, 13)
  assert (model.bottom_mlp, model.top_mlp) == ((16, 4), (16,))
  float32 = (26 + 26) * 4 + 27 * 4 + 27 * 27
  compute = 13 + 3 * (16 + 4) + (4 + 27 * 26 // 2) + 2 * 16 + 1
  for bf16, width in ((False, 4), (True, 2)):
    p = planner.plan(tiny_criteo_config(interaction_op='dot', bf16=bf16), 2, (1, 2))
    assert p.activations == p.rows_per_device * 2 * (4 * float32 + width * compute), bf16


def test_dcn_activations_add_the_float32_cross_stream():
  # As `cat` (26 + 26 rows of dim 4 in float32; the 4 + 26 * 4 = 108 wide concatenation in the
  # compute dtype), plus the float32 cross stream: its input and, per layer, the rank-r product,
  # W's output and the next x.
  cat = planner.plan(tiny_criteo_config(interaction_op='cat'), 2, (1, 2))
  for layers, rank in ((1, 8), (3, 5)):
    dcn = planner.plan(tiny_criteo_config(interaction_op='dcn', dcn_num_layers=layers,
                                          dcn_low_rank_dim=rank), 2, (1, 2))
    cross = 108 + layers * (rank + 2 * 108)
    assert dcn.activations - cat.activations == dcn.rows_per_device * 2 * 4 * cross


def test_no_acceleration_plans_the_dense_path_without_staging():
  p = planner.plan(tiny_criteo_config(no_acceleration=True), 1, (1, 1))
  assert not p.sparse_updates and p.batches_on_device == 1
  # smartstaged: the step's batch, the 3 that train.step_batches' prefetch queue holds, and the
  # one its thread has put on the device while the queue is full.
  assert planner.plan(tiny_criteo_config(), 1, (1, 1)).batches_on_device == 1 + 3 + 1
  assert planner.plan(tiny_criteo_config(smartstaged=False), 1, (1, 1)).batches_on_device == 1


def test_fits_switches_with_device_memory():
  p = planner.plan(tiny_criteo_config(), 8, (2, 4))
  assert p.per_device == sum(c.per_device for c in p.components())
  assert p.fits(p.per_device) and p.headroom(p.per_device) == 0
  assert not p.fits(p.per_device - 1)
  assert planner.describe(p, p.per_device).splitlines()[-1].startswith('FITS')
  assert planner.describe(p, p.per_device - 1).splitlines()[-1].startswith('DOES NOT FIT')


@pytest.mark.parametrize('devices,mesh,message', [
    (8, (2, 2), 'does not cover the 8 devices'),
    (8, (-1, 3), 'does not divide 8 devices'),
    (8, (2, 0), 'model axis must be positive'),
    (8, (-1, -1), 'model axis must be positive'),
    (8, (8,), 'must be (data, model)'),
    (0, (-1, 1), 'devices must be positive'),
    (5, (1, 5), 'the model axis (5) must divide 64'),
    # 6 divides the padded rows here (the check used to end there), but the trainer refuses it.
    (6, (1, 6), 'the model axis (6) must divide 64'),
    (3, (3, 1), 'config.batch_size=64 does not split over the 3 devices'),
    (2, (2, 1), 'config.eval_batch_size=511 does not split over the 2 devices'),
    (1, (1, 1), 'config.batch_size=0 must be positive'),
])
def test_mesh_validation_errors(devices, mesh, message):
  # The planner refuses what the trainer would refuse, with the trainer's messages.
  config = tiny_criteo_config(eval_batch_size=511 if devices == 2 else 512)
  config.criteo_table_rows = (72,) * 26  # 1872 rows, padded to 1920: a multiple of 6
  if devices == 1:
    config.batch_size = 0
  with pytest.raises(ValueError, match=message.replace('(', r'\(').replace(')', r'\)')):
    planner.plan(config, devices, mesh)


def test_default_mesh_comes_from_the_config():
  config = tiny_criteo_config()
  config.mesh_shape = (-1, 2)
  assert planner.plan(config, 8).mesh_shape == (4, 2)


def test_mlperf_config_sizes_and_plan():
  config = criteo_1tb_mlperf.get_config()
  spec = fs.from_config(config)
  assert len(spec.tables) == 26 and spec.embedding_dim == 128
  assert spec.total_rows == 204_184_588
  assert (config.interaction_op, config.dcn_num_layers, config.dcn_low_rank_dim) == ('dcn', 3, 512)
  assert models.interaction_width(spec, 128, 'dcn') == 27 * 128
  memory = 80 * planner.GB
  p = planner.plan(config, 8)  # the config's mesh: (-1, 8)
  assert p.mesh_shape == (1, 8)
  assert p.tables == padded(204_184_588) * 128 * 4 // 8
  assert p.table_optimizer_state == p.tables  # adagrad: one accumulator like the table
  assert p.fits(memory)
  replicated = planner.plan(config, 8, (8, 1))
  assert replicated.tables > memory and not replicated.fits(memory)
  assert planner.plan(config, 64).mesh_shape == (8, 8)
  # Data axis 4 leaves each device half the tables (52 GB) and as much Adagrad state: over 80 GB;
  # data axis 2 a quarter of each (26 + 26 GB).
  assert not planner.plan(config, 8, (4, 2)).fits(memory)
  assert planner.plan(config, 8, (2, 4)).fits(memory)
  assert planner.largest_data_axis_that_fits(config, 8, memory).mesh_shape == (2, 4)


@pytest.mark.slow
def test_command_prints_the_table_and_the_verdict():
  result = subprocess.run(
      [sys.executable, '-m', 'dlrm_jax.planner', '--config=configs/criteo_1tb_mlperf.py',
       '--devices=8', '--mesh=1,8', '--device_memory_gb=80'],
      cwd=ROOT, capture_output=True, text=True, check=True, timeout=120)
  out = result.stdout
  assert 'mesh (data=1, model=8)' in out and 'embedding tables' in out
  assert 'FITS: ' in out and 'DOES NOT FIT' not in out
  # A mesh that does not fit prints its table and exits 1, for a launch script to check.
  small = subprocess.run(
      [sys.executable, '-m', 'dlrm_jax.planner', '--config=configs/criteo_1tb_mlperf.py',
       '--devices=8', '--mesh=1,8', '--device_memory_gb=20'],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert small.returncode == 1, small.stderr[-2000:]
  assert 'DOES NOT FIT: ' in small.stdout and 'Largest data axis' not in small.stdout
  bad = subprocess.run(
      [sys.executable, '-m', 'dlrm_jax.planner', '--config=configs/criteo_1tb_mlperf.py',
       '--devices=8', '--mesh=3,3'], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert bad.returncode != 0 and 'does not cover the 8 devices' in bad.stderr
  assert '(--devices=8, --mesh=3,3)' in bad.stderr
  # The config's own mesh does not fit one device: the error says where the mesh came from.
  bad = subprocess.run(
      [sys.executable, '-m', 'dlrm_jax.planner', '--config=configs/criteo_1tb_mlperf.py',
       '--devices=1'], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert bad.returncode != 0
  assert ("(--devices=1, the config's mesh_shape (-1, 8): --mesh=DATA,MODEL plans another)"
          in bad.stderr), bad.stderr[-2000:]
  for memory in ('-1', 'nan', '0'):
    bad = subprocess.run(
        [sys.executable, '-m', 'dlrm_jax.planner', '--config=configs/criteo_1tb_mlperf.py',
         '--devices=8', f'--device_memory_gb={memory}'], cwd=ROOT, capture_output=True,
        text=True, timeout=120)
    assert bad.returncode != 0
    assert f'--device_memory_gb={float(memory)}: expected a positive number' in bad.stderr


def test_the_readme_shows_the_planners_own_output():
  # The README quotes the planner for the MLPerf config on 8 and 64 devices of 80 GB (its table
  # and verdict lines); a change to the config or to the planner's accounting left them stale.
  with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
    readme = f.read()
  config = criteo_1tb_mlperf.get_config()
  memory = 80 * planner.GB
  for devices, mesh, title in ((8, (1, 8), '8 devices of 80 GB'),
                               (64, None, '64 devices of 80 GB')):
    p = planner.plan(config, devices, mesh)
    best = planner.largest_data_axis_that_fits(config, devices, memory)
    printed = planner.describe(p, memory).split('\n') + [
        f'Largest data axis that fits: --mesh={best.data},{best.model} '
        f'({planner.format_bytes(best.per_device)} per device)']
    table = printed[printed.index('') + 1:]  # from the column header on, as quoted
    block = readme[readme.index(title):].split('```\n')[1]
    assert block.splitlines() == [l for l in table if l and not l.startswith('---')], printed


def test_largest_data_axis_that_fits_may_split_the_tables_over_every_device():
  # Tables dominate here (26 x 100k rows): only (1, 8) holds them in its memory, and the
  # search must still try the model axis of all 8 devices before saying nothing fits.
  config = tiny_criteo_config()
  config.criteo_table_rows = (100000,) * 26
  plans = {m: planner.plan(config, 8, m) for m in ((8, 1), (4, 2), (2, 4), (1, 8))}
  memory = plans[(1, 8)].per_device
  assert all(not p.fits(memory) for m, p in plans.items() if m != (1, 8))
  best = planner.largest_data_axis_that_fits(config, 8, memory)
  assert best is not None and best.mesh_shape == (1, 8)
  assert planner.largest_data_axis_that_fits(config, 8, memory - 1) is None


def test_largest_data_axis_that_fits_skips_meshes_the_trainer_refuses():
  # An eval batch of 516 does not split over 8 devices of data, but over 4: (8, 1) is refused
  # and the search goes on to (4, 2) rather than saying no mesh fits.
  config = tiny_criteo_config(eval_batch_size=516)
  best = planner.largest_data_axis_that_fits(config, 8, 80 * planner.GB)
  assert best is not None and best.mesh_shape == (4, 2)


def test_the_verdict_says_how_much_is_short_or_spare():
  p = planner.plan(tiny_criteo_config(), 8, (2, 4))
  short = planner.describe(p, p.per_device - 2000).splitlines()[-1]
  assert short.endswith('(2.00 KB short)'), short
  spare = planner.describe(p, p.per_device + 2000).splitlines()[-1]
  assert ', 2.00 KB headroom (' in spare, spare
