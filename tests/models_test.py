"""Model pieces on tiny inputs: shapes, the dot interaction, pooling, shared tables, fusion."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlrm_jax import feature_spec as fs
from dlrm_jax import models


def tiny_spec(max_list_len=3):
  return fs.elm_spec(hash_buckets=50, embedding_dim=4, max_list_len=max_list_len)


def random_batch(spec, batch=5, seed=0):
  rng = np.random.default_rng(seed)
  rows = np.array([spec.table(f.table).rows for f in spec.sparse for _ in range(f.max_len)])
  ids = (rng.integers(0, 1 << 30, size=(batch, spec.num_slots)) % rows).astype(np.int32)
  weights = rng.random((batch, spec.num_slots)).astype(np.float32)
  dense = rng.normal(size=(batch, spec.num_dense)).astype(np.float32)
  return dense, ids, weights


@pytest.mark.parametrize('op,width', [('dot', 16 + 25 * 24 // 2), ('cat', 16 + 24 * 16),
                                      ('dcn', 16 + 24 * 16)])
def test_elm_interaction_widths_match_the_reference(op, width):
  # 316 and 400 are the top-MLP input widths of DeepRec's ELM model.
  spec = fs.elm_spec()
  assert models.interaction_width(spec, 16, op) == width


@pytest.mark.parametrize('op', ['dot', 'cat', 'dcn'])
def test_dlrm_output_shape_and_top_input_width(op):
  spec = tiny_spec()
  dense, ids, weights = random_batch(spec)
  model = models.DLRM(bottom_mlp=(8, 4), top_mlp=(6,), interaction_op=op)
  emb = jnp.ones((5, spec.num_sparse, 4))
  variables = model.init(jax.random.PRNGKey(0), dense, emb)
  logits = model.apply(variables, dense, emb)
  assert logits.shape == (5,) and logits.dtype == jnp.float32
  top_in = variables['params']['top_mlp']['Dense_0']['kernel'].shape[0]
  assert top_in == models.interaction_width(spec, 4, op)


def _randomized(variables, seed=7):
  """Every parameter redrawn at random, so that zero-initialised biases count too."""
  leaves, tree = jax.tree.flatten(variables['params'])
  rng = np.random.default_rng(seed)
  params = [jnp.asarray(rng.normal(scale=0.5, size=x.shape), jnp.float32) for x in leaves]
  return dict(variables, params=jax.tree.unflatten(tree, params))


def test_dcn_is_low_rank_cross_layers_over_the_concatenation():
  # TorchRec's LowRankCrossNet (MLPerf DLRMv2's interaction), written out in float64 on the
  # model's own bottom-MLP output: x_{l+1} = x_0 * (W_l (V_l x_l) + b_l) + x_l over
  # [x, e_1, ..., e_F]. float32 against float64 through two layers: ~1e-6 relative.
  spec = tiny_spec()
  dense, _, _ = random_batch(spec)
  emb = np.random.default_rng(1).normal(size=(5, spec.num_sparse, 4)).astype(np.float32)
  model = models.DLRM((8, 4), (6,), 'dcn', batch_norm=False, dcn_num_layers=2,
                      dcn_low_rank_dim=3)
  variables = _randomized(model.init(jax.random.PRNGKey(0), dense, emb))
  params = jax.tree.map(lambda a: np.asarray(a, np.float64), variables['params'])
  x = np.asarray(models.MLP((8, 4)).apply({'params': variables['params']['bottom_mlp']},
                                          dense, False), np.float64)
  x0 = np.concatenate([x, emb.reshape(5, -1)], axis=1)
  assert x0.shape[1] == models.interaction_width(spec, 4, 'dcn')
  z = x0
  for layer in range(2):
    v = z @ params['cross_net'][f'V_{layer}']['kernel']
    assert v.shape == (5, 3)
    w = params['cross_net'][f'W_{layer}']
    z = x0 * (v @ w['kernel'] + w['bias']) + z
  first = params['top_mlp']['Dense_0']
  top = np.maximum(z @ first['kernel'] + first['bias'], 0)
  logit = top @ params['logit']['kernel'] + params['logit']['bias']
  np.testing.assert_allclose(model.apply(variables, dense, emb), logit[:, 0], rtol=1e-5,
                             atol=1e-5)


def test_dcn_kernels_are_drawn_as_torchrec_draws_them():
  # torch.nn.init.xavier_normal_: a plain normal of variance 2 / (fan_in + fan_out), not Flax's
  # truncated one, which has no value beyond 2 standard deviations; zero biases. 16384 draws
  # per kernel: the sample std is within 1% (3 standard errors: 3 / sqrt(2 * 16384) = 1.7%
  # allowed) and a normal puts 4.55% beyond 2 std (standard error 0.16%).
  x = jnp.ones((2, 256))
  params = models.LowRankCrossNet(num_layers=1, low_rank=64).init(jax.random.PRNGKey(0), x)
  std = np.sqrt(2.0 / (256 + 64))
  for name in ('V_0', 'W_0'):
    kernel = np.asarray(params['params'][name]['kernel'])
    assert kernel.std() == pytest.approx(std, rel=0.017), name
    assert 0.04 < np.mean(np.abs(kernel) > 2 * std) < 0.051, name
  np.testing.assert_array_equal(params['params']['W_0']['bias'], np.zeros(256))
  assert 'bias' not in params['params']['V_0']


def test_dcn_under_bf16_keeps_the_cross_stream_float32():
  # Only the cross layers' products take bfloat16 operands; x_0, the running x and the output
  # stay float32 (a bfloat16 residual stream would round x_l at every layer).
  spec = tiny_spec()
  dense, _, _ = random_batch(spec)
  emb = jnp.asarray(np.random.default_rng(1).normal(size=(5, spec.num_sparse, 4)), jnp.float32)
  kw = dict(dcn_num_layers=2, dcn_low_rank_dim=3)
  variables = _randomized(models.DLRM((8, 4), (6,), 'dcn', **kw).init(
      jax.random.PRNGKey(0), dense, emb))
  out32 = models.DLRM((8, 4), (6,), 'dcn', **kw).apply(variables, dense, emb)
  out16, captured = models.DLRM((8, 4), (6,), 'dcn', dtype=jnp.bfloat16, **kw).apply(
      variables, dense, emb, capture_intermediates=True, mutable=['intermediates'])
  assert captured['intermediates']['cross_net']['__call__'][0].dtype == jnp.float32
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables['params']))
  # Roundings of 2^-9 relative of values as large as the largest logit (78 here, from the
  # redrawn weights): the largest change was 0.25% of it; 1% allows four times that, and
  # equality would mean bf16 never reached the layers.
  assert np.max(np.abs(out16 - out32)) < 0.01 * np.max(np.abs(out32))
  assert not np.array_equal(out16, out32)


def test_dot_interaction_equals_naive_double_loop():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(3, 4)).astype(np.float32)
  e = rng.normal(size=(3, 5, 4)).astype(np.float32)
  out = np.asarray(models.dot_interaction(jnp.asarray(x), jnp.asarray(e)))
  feats = np.concatenate([x[:, None], e], axis=1)
  expected = []
  for b in range(3):
    pairs = [feats[b, i] @ feats[b, j] for i in range(6) for j in range(i)]
    expected.append(np.concatenate([x[b], pairs]))
  np.testing.assert_allclose(out, np.stack(expected), rtol=1e-5, atol=1e-5)  # float32 sums


def test_dot_interaction_gradient_equals_the_naive_pairs_gradient():
  # The written-out backward (G f with G the symmetric cotangent) against autodiff of a plain
  # pair-by-pair version, in float64 terms: float32 sums of 6 products, so 1e-5.
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
  e = jnp.asarray(rng.normal(size=(3, 5, 4)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(3, 4 + 15)), jnp.float32)

  def naive(x, e):
    f = jnp.concatenate([x[:, None], e], axis=1)
    pairs = [jnp.sum(f[:, i] * f[:, j], axis=-1) for i in range(6) for j in range(i)]
    return jnp.concatenate([x, jnp.stack(pairs, axis=1)], axis=1)

  got = jax.grad(lambda x, e: jnp.sum(models.dot_interaction(x, e) * g), argnums=(0, 1))(x, e)
  want = jax.grad(lambda x, e: jnp.sum(naive(x, e) * g), argnums=(0, 1))(x, e)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(got[1]).max()) > 0


def slot_rows(tables, ids, spec, fused):
  """Every slot's row [B, S, D], looked up naively: the reference for the training path."""
  parts = []
  for i, (a, b) in enumerate(zip(spec.slot_starts[:-1], spec.slot_starts[1:])):
    table = spec.sparse[i].table
    if fused:
      parts.append(np.asarray(tables[models.FUSED])[
          ids[:, a:b] + spec.table_offsets[spec.table_index(table)]])
    else:
      parts.append(np.asarray(tables[table])[ids[:, a:b]])
  return np.concatenate(parts, axis=1)


def naive_pool(rows, weights, spec):
  return np.stack([(rows[:, a:b] * weights[:, a:b, None]).sum(1)
                   for a, b in zip(spec.slot_starts[:-1], spec.slot_starts[1:])], axis=1)


def train_path_pool(tables, ids, weights, spec, fused, unique_rows=None):
  """Dedup on the host, gather unique rows, pool the live entries: what train.py runs."""
  unique_rows = unique_rows or models.UniqueRows(spec, fused)
  batch = unique_rows({'ids': ids, 'weights': weights, 'label': np.zeros(len(ids)),
                       'dense': np.zeros((len(ids), 1)), 'mask': np.ones(len(ids))})
  unique = models.gather_unique_rows(tables, batch['unique_ids'])
  return np.asarray(models.embed(unique, jax.tree.map(jnp.asarray, batch), spec, fused)), batch


@pytest.mark.parametrize('fused', [True, False])
@pytest.mark.parametrize('buckets', [50, 64])
def test_training_pooling_equals_naive_mean_pooling(fused, buckets):
  # With 64 buckets a per-table array has no padding row (a multiple of ROW_MULTIPLE): the
  # entries that pad the dedup's buffers then read a real row, and only their zero weight keeps
  # it out of the pooled sums.
  spec = fs.elm_spec(hash_buckets=buckets, embedding_dim=4, max_list_len=3)
  _, ids, weights = random_batch(spec, batch=6, seed=4)
  weights[weights < 0.3] = 0.0  # dead slots: padding, missing scalars, out-of-vocabulary
  tables = models.init_tables(jax.random.PRNGKey(1), spec, emb_fusion=fused)
  pooled, batch = train_path_pool(tables, ids, weights, spec, fused)
  expected = naive_pool(slot_rows(tables, ids, spec, fused), weights, spec)
  np.testing.assert_allclose(pooled, expected, rtol=1e-5, atol=1e-6)  # float32 sums
  # The serving path (direct lookups) agrees too.
  if fused:
    rows = jnp.asarray(slot_rows(tables, ids, spec, fused))
    np.testing.assert_allclose(models.pool_slots(rows, jnp.asarray(weights), spec), expected,
                               rtol=1e-5, atol=1e-6)
  # Each looked-up row appears once, and dead slots' rows are not among them.
  live_ids = set()
  for i, (a, b) in enumerate(zip(spec.slot_starts[:-1], spec.slot_starts[1:])):
    t = spec.sparse[i].table
    name = models.FUSED if fused else t
    offset = spec.table_offsets[spec.table_index(t)] if fused else 0
    live_ids |= {(name, int(x) + offset) for x in ids[:, a:b][weights[:, a:b] != 0]}
  unique = {(name, int(x)) for name, arr in batch['unique_ids'].items()
            for x in arr if x < models.table_array_rows(spec, fused)[name]}
  assert unique == live_ids
  assert sum(int((arr < models.table_array_rows(spec, fused)[n]).sum())
             for n, arr in batch['unique_ids'].items()) == len(live_ids)


@pytest.mark.parametrize('ids', [
    [], [7], [3, 3, 3], [2**31 - 1, 0, 2**31 - 1, 5],
    np.random.default_rng(0).integers(0, 50, 1000),  # many repeats
    np.random.default_rng(1).zipf(1.2, 5000) % 1000003,  # skewed, as hashed ids are
])
def test_unique_inverse_equals_numpy_unique(ids):
  ids = np.asarray(ids, np.int32)
  uniques, codes = models.unique_inverse(ids)
  expected_uniques, expected_codes = np.unique(ids, return_inverse=True)
  np.testing.assert_array_equal(uniques, expected_uniques)
  np.testing.assert_array_equal(codes, expected_codes.reshape(-1))
  assert uniques.dtype == np.int32 and codes.dtype == np.int32


def test_unique_inverse_through_a_reused_row_scratch_equals_numpy_unique():
  # The scratch is never cleared: whatever an earlier batch (or np.empty) left in it must not
  # leak into the codes.
  rng = np.random.default_rng(2)
  scratch = np.full(1000003, -7, np.int32)
  cases = [[], [7], [3, 3, 3], [1000002, 0, 1000002, 5], rng.integers(0, 50, 1000),
           rng.zipf(1.2, 5000) % 1000003, rng.integers(0, 1000003, 3000)]
  for ids in cases:
    ids = np.asarray(ids, np.int32)
    uniques, codes = models.unique_inverse(ids, scratch)
    expected_uniques, expected_codes = np.unique(ids, return_inverse=True)
    np.testing.assert_array_equal(uniques, expected_uniques)
    np.testing.assert_array_equal(codes, expected_codes.reshape(-1))
    assert uniques.dtype == np.int32 and codes.dtype == np.int32


@pytest.mark.parametrize('fused,scratch_rows', [(True, 0), (True, 1 << 22), (False, 0),
                                                (False, 120), (False, 1 << 22)])
def test_unique_rows_give_the_same_batch_with_or_without_row_scratches(fused, scratch_rows,
                                                                        monkeypatch):
  # 120 rows: the smallest of the unfused ELM arrays get a scratch and the rest sort.
  spec = tiny_spec()
  _, ids, weights = random_batch(spec, batch=16, seed=9)
  weights[weights < 0.4] = 0.0
  batch = {'ids': ids, 'weights': weights, 'label': np.zeros(16), 'dense': np.zeros((16, 1)),
           'mask': np.ones(16)}
  monkeypatch.setattr(models, 'SCRATCH_ROWS', 0)
  expected = models.UniqueRows(spec, fused)(batch)
  monkeypatch.setattr(models, 'SCRATCH_ROWS', scratch_rows)
  prepare = models.UniqueRows(spec, fused)
  rows = models.table_array_rows(spec, fused)
  with_scratch = [name for name in rows if name in prepare._scratch]
  assert sum(rows[name] for name in with_scratch) <= scratch_rows
  if scratch_rows == 1 << 22:
    assert len(with_scratch) == len(rows)
  elif scratch_rows:
    assert 0 < len(with_scratch) < len(rows)
  for _ in range(2):  # the second call reads scratches the first one filled
    got = prepare(batch)
    for key in ('entry_index', 'entry_weight', 'entry_segment'):
      np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    for name in expected['unique_ids']:
      np.testing.assert_array_equal(got['unique_ids'][name], expected['unique_ids'][name])


@pytest.mark.parametrize('data_devices', [1, 3, 6, 12])
def test_every_capacity_splits_over_the_data_axis(data_devices):
  # The unique and entry arrays are split over the data axis: 3, 6 or 12 devices divide few of
  # the eighth-octave steps (JAX refused them on the first batch).
  spec = tiny_spec()
  for needed in list(range(1, 3000, 7)) + [4096, 10**5 + 1]:
    capacity = models.unique_capacity(needed, multiple=data_devices)
    assert capacity % data_devices == 0 and capacity >= int(1.25 * needed)
    # At most one step (12.5%) beyond the headroom, plus the rounding to the device count.
    assert capacity <= max(256, 1.25 * needed) * 1.125 + data_devices
  for process_count in (1, 2):
    prepare = models.UniqueRows(spec, True, process_count=process_count, local_batch=24,
                                data_devices=data_devices)
    for seed in range(3):
      _, ids, weights = random_batch(spec, batch=24, seed=seed)
      batch = prepare({'ids': ids, 'weights': weights, 'label': np.zeros(24),
                       'dense': np.zeros((24, 1)), 'mask': np.ones(24)})
      for name in ('entry_index', 'entry_weight', 'entry_segment'):
        assert batch[name].shape[0] % data_devices == 0, name
      for name, unique in batch['unique_ids'].items():
        assert unique.shape[0] % data_devices == 0, name


@pytest.mark.parametrize('fused', [True, False])
def test_unique_rows_are_ascending_and_entries_point_at_their_ids(fused):
  # Ascending lists read and write each table array in address order; every entry's index must
  # still name its own id's row in the concatenated unique lists.
  spec = tiny_spec()
  _, ids, weights = random_batch(spec, batch=8, seed=6)
  weights[weights < 0.3] = 0.0
  batch = models.UniqueRows(spec, fused)({'ids': ids, 'weights': weights,
                                          'label': np.zeros(8), 'dense': np.zeros((8, 1)),
                                          'mask': np.ones(8)})
  rows = models.table_array_rows(spec, fused)
  concatenated = []
  for name, arr in batch['unique_ids'].items():
    real = arr[arr < rows[name]]
    assert np.all(np.diff(real) > 0), name  # strictly ascending: sorted and deduplicated
    concatenated.append(arr)
  concatenated = np.concatenate(concatenated)
  live = weights.reshape(-1) != 0
  count = int(live.sum())
  slot = np.tile(np.arange(spec.num_slots), 8)[live]
  expected = ids.reshape(-1)[live].astype(np.int64)
  if fused:
    expected += spec.slot_offsets[slot]
  np.testing.assert_array_equal(concatenated[batch['entry_index'][:count]], expected)
  # The device's segment sum is told its segments are sorted (models.embed): padding entries
  # too must keep them non-decreasing and inside the batch's B * F segments.
  assert np.all(np.diff(batch['entry_segment']) >= 0)
  assert batch['entry_segment'].min() >= 0
  assert batch['entry_segment'].max() < 8 * spec.num_sparse


@pytest.mark.parametrize('fused', [True, False])
def test_a_second_process_points_into_its_block_of_the_global_lists(fused):
  # Process 1 of 2 prepares rows B..2B-1 of the global batch: its segments follow process 0's,
  # and its entries index its own block (the second of two) of each array's global unique list,
  # the arrays' global lists concatenated. No test used to build a process other than 0.
  spec, local_batch, processes = tiny_spec(), 6, 2
  _, ids, weights = random_batch(spec, batch=local_batch, seed=3)
  weights[weights < 0.3] = 0.0
  batch = {'ids': ids, 'weights': weights, 'label': np.zeros(local_batch),
           'dense': np.zeros((local_batch, 1)), 'mask': np.ones(local_batch)}
  def prepare(process_index):
    return models.UniqueRows(spec, fused, process_index=process_index, process_count=processes,
                             local_batch=local_batch)(batch)
  first, second = prepare(0), prepare(1)
  num_segments = local_batch * spec.num_sparse
  np.testing.assert_array_equal(second['entry_segment'], first['entry_segment'] + num_segments)
  assert second['entry_segment'].max() < processes * num_segments
  global_lists = np.concatenate([  # process 0's blocks stand in as -1: never pointed at
      np.concatenate([np.full(block.size, -1), block]) for block in second['unique_ids'].values()])
  live = weights.reshape(-1) != 0
  count = int(live.sum())
  slot = np.tile(np.arange(spec.num_slots), local_batch)[live]
  expected = ids.reshape(-1)[live].astype(np.int64)
  if fused:
    expected += spec.slot_offsets[slot]
  np.testing.assert_array_equal(global_lists[second['entry_index'][:count]], expected)


def test_pool_is_weighted_mean_over_each_features_slots():
  spec = tiny_spec(max_list_len=3)
  _, ids, _ = random_batch(spec, batch=2)
  tables = models.init_tables(jax.random.PRNGKey(0), spec, emb_fusion=True)
  # Weights as the reader writes them: list of 0, 1 or 3 values -> 0, 1, 1/3 each.
  weights = np.zeros((2, spec.num_slots), np.float32)
  starts = spec.slot_starts
  list_features = [i for i, f in enumerate(spec.sparse) if f.is_list]
  empty, one, many = list_features[:3]
  weights[:, starts[one]] = 1.0
  weights[:, starts[many]:starts[many] + 3] = 1.0 / 3
  pooled, _ = train_path_pool(tables, ids, weights, spec, True)
  rows = slot_rows(tables, ids, spec, True)
  np.testing.assert_array_equal(pooled[:, empty], 0.0)
  # float32 weighted sums against exact rows and numpy means: a few ulps (1.2e-7 each).
  np.testing.assert_allclose(pooled[:, one], rows[:, starts[one]], rtol=1e-6)
  np.testing.assert_allclose(pooled[:, many], rows[:, starts[many]:starts[many] + 3].mean(1),
                             rtol=1e-5, atol=1e-7)


def test_capacities_are_coarse_and_never_shrink():
  spec = tiny_spec()
  _, ids, weights = random_batch(spec, batch=8, seed=5)
  prepare = models.UniqueRows(spec, True)
  tables = models.init_tables(jax.random.PRNGKey(1), spec, emb_fusion=True)
  _, big = train_path_pool(tables, ids, weights, spec, True, prepare)
  _, small = train_path_pool(tables, ids[:1].repeat(8, 0), weights[:1].repeat(8, 0), spec, True,
                             prepare)
  for batch in (big, small):
    size = batch['entry_index'].size
    assert size % 64 == 0 and size > (weights != 0).sum()
  assert small['entry_index'].size == big['entry_index'].size
  assert small['unique_ids'][models.FUSED].size == big['unique_ids'][models.FUSED].size


def test_shared_features_read_the_same_table():
  spec = tiny_spec(max_list_len=1)
  tables = models.init_tables(jax.random.PRNGKey(0), spec, emb_fusion=False)
  names = [f.column for f in spec.sparse]
  a, b = names.index('shop_id'), names.index('shop_id_list')
  c = names.index('user_id')
  ids = np.zeros((1, spec.num_slots), np.int32)
  ids[0, spec.slot_starts[a]] = ids[0, spec.slot_starts[b]] = ids[0, spec.slot_starts[c]] = 7
  for fused in (False, True):
    t = models.init_tables(jax.random.PRNGKey(0), spec, emb_fusion=fused)
    rows = slot_rows(t, ids, spec, fused)
    np.testing.assert_array_equal(rows[0, spec.slot_starts[a]], rows[0, spec.slot_starts[b]])
    assert not np.allclose(rows[0, spec.slot_starts[a]], rows[0, spec.slot_starts[c]])
  np.testing.assert_array_equal(rows[0, spec.slot_starts[a]], tables['shop_id'][7])


def test_fused_and_per_table_lookups_agree():
  spec = tiny_spec()
  _, ids, weights = random_batch(spec, batch=4, seed=3)
  per_table = models.init_tables(jax.random.PRNGKey(2), spec, emb_fusion=False)
  fused = models.init_tables(jax.random.PRNGKey(2), spec, emb_fusion=True)
  # The same rows pooled by two programs (sums in another order): float32 rounding.
  np.testing.assert_allclose(train_path_pool(per_table, ids, weights, spec, False)[0],
                             train_path_pool(fused, ids, weights, spec, True)[0],
                             rtol=1e-6, atol=1e-7)


def test_relayout_moves_tables_and_row_slots_between_layouts():
  spec = tiny_spec()
  per_table = models.init_tables(jax.random.PRNGKey(2), spec, emb_fusion=False)
  fused = models.init_tables(jax.random.PRNGKey(2), spec, emb_fusion=True)
  # A state-like tree: tables, and row-wise slots (rows and a scalar count) beside other leaves.
  def state(tables):
    slots = {name: {'count': jnp.int32(7), 'nu': 2 * table + 1} for name, table in tables.items()}
    return {'params': {'tables': tables, 'mlp': {'w': jnp.ones(3)}}, 'table_opt_state': slots}
  def assert_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  as_fused = models.relayout_tables(state(per_table), spec, emb_fusion=True)
  # Rows of the fused init and of the per-table init are the same draws; slot padding differs
  # (2 * 0 + 1 in the slots built here, zero after the re-layout), so only tables compare whole.
  assert_equal(as_fused['params'], state(fused)['params'])
  rows = spec.total_rows
  np.testing.assert_array_equal(as_fused['table_opt_state'][models.FUSED]['nu'][:rows],
                                state(fused)['table_opt_state'][models.FUSED]['nu'][:rows])
  assert int(as_fused['table_opt_state'][models.FUSED]['count']) == 7
  back = models.relayout_tables(as_fused, spec, emb_fusion=False)
  assert_equal(back['params'], state(per_table)['params'])
  for t in spec.tables:
    np.testing.assert_array_equal(back['table_opt_state'][t.name]['nu'][:t.rows],
                                  state(per_table)['table_opt_state'][t.name]['nu'][:t.rows])
  # A tree already in the wanted layout is left as it is.
  assert_equal(models.relayout_tables(state(fused), spec, emb_fusion=True), state(fused))


def test_embedding_init_is_truncated_normal_with_reference_stddev():
  spec = fs.elm_spec(hash_buckets=2000, embedding_dim=16)
  table = np.asarray(models.init_tables(jax.random.PRNGKey(0), spec, True)[models.FUSED])
  stddev = 1 / 4
  assert np.abs(table).max() <= 2 * stddev + 1e-6  # + float32 rounding of the bound
  # Truncation at 2 sigma shrinks the stddev to 0.880 sigma; 500k draws pin it to ~0.1%.
  assert table.std() == pytest.approx(0.880 * stddev, rel=0.01)


def test_bf16_policy_keeps_float32_params_and_logits():
  spec = tiny_spec()
  dense, _, _ = random_batch(spec)
  emb = jnp.ones((5, spec.num_sparse, 4))
  model = models.DLRM(bottom_mlp=(8, 4), top_mlp=(6,), interaction_op='dot',
                      dtype=jnp.bfloat16)
  variables = model.init(jax.random.PRNGKey(0), dense, emb)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables['params']))
  out32 = models.DLRM((8, 4), (6,), 'dot').apply(variables, dense, emb)
  out16 = model.apply(variables, dense, emb)
  assert out16.dtype == jnp.float32
  # bfloat16 keeps 8 mantissa bits (a rounding is off by up to 2^-9 = 0.2% relative); through
  # these few small layers the logits (about -15) moved 0.04%: 0.5% allows about two roundings'
  # worth, ten times what was seen.
  np.testing.assert_allclose(out16, out32, rtol=5e-3)
  assert not np.array_equal(out16, out32)


def test_batch_norm_has_tensorflows_momentum_and_epsilon():
  # tf.layers.batch_normalization's defaults, as DeepRec builds its bottom MLP: momentum 0.99,
  # epsilon 1e-3 (flax's own default epsilon is 1e-5). One training step moves the running
  # statistics 1% of the way to the batch's; evaluation normalizes with them and 1e-3.
  x = jnp.asarray(np.random.default_rng(0).normal(2.0, 3.0, size=(64, 5)), jnp.float32)
  mlp = models.MLP((3,), batch_norm=True)
  variables = mlp.init(jax.random.PRNGKey(0), x, False)
  _, updates = mlp.apply(variables, x, True, mutable=['batch_stats'])
  dense = variables['params']['Dense_0']
  h = np.maximum(np.asarray(x @ dense['kernel'] + dense['bias'], np.float64), 0)
  stats = updates['batch_stats']['BatchNorm_0']
  # float32 layers against a float64 reference of the same values: float32 rounding (1e-5).
  np.testing.assert_allclose(stats['mean'], 0.01 * h.mean(0), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(stats['var'], 0.99 + 0.01 * h.var(0), rtol=1e-5)
  out = mlp.apply({'params': variables['params'], 'batch_stats': updates['batch_stats']}, x,
                  False)
  expected = (h - stats['mean']) / np.sqrt(np.asarray(stats['var'], np.float64) + 1e-3)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('op', ['dot', 'cat'])
def test_bf16_keeps_the_interaction_inputs_and_the_logit_float32_as_deeprec(op):
  # DeepRec's --bf16 runs the MLPs in bfloat16 but casts the bottom MLP's output back to float32,
  # takes the dot products of float32 embeddings, rounds only the interaction's output for the
  # top MLP and casts the top MLP's output to float32 for the logit layer. The reference below
  # is built from the model's own pieces in that order; both sides run the same ops on the same
  # values, so they agree to float32 rounding (rtol 1e-6), while rounding the embeddings or the
  # logit layer to bfloat16 moves the output by ~2^-8 relative.
  spec = tiny_spec()
  dense, _, _ = random_batch(spec)
  emb = jnp.asarray(np.random.default_rng(1).normal(size=(5, spec.num_sparse, 4)), jnp.float32)
  model = models.DLRM((8, 4), (6,), op, dtype=jnp.bfloat16)
  variables = model.init(jax.random.PRNGKey(0), dense, emb)
  params = variables['params']
  bottom = models.MLP((8, 4), True, jnp.bfloat16).apply(
      {'params': params['bottom_mlp'], 'batch_stats': variables['batch_stats']['bottom_mlp']},
      jnp.asarray(dense, jnp.bfloat16), False)
  if op == 'dot':
    features = jnp.concatenate([bottom[:, None, :].astype(jnp.float32), emb], axis=1)
    gram = jnp.einsum('bid,bjd->bij', features, features)
    rows, cols = np.tril_indices(features.shape[1], k=-1)
    z = jnp.concatenate([bottom, gram[:, rows, cols].astype(jnp.bfloat16)], axis=1)
  else:
    z = jnp.concatenate([bottom, emb.reshape(5, -1).astype(jnp.bfloat16)], axis=1)
  top = models.MLP((6,), False, jnp.bfloat16).apply({'params': params['top_mlp']}, z, False)
  logit = top.astype(jnp.float32) @ params['logit']['kernel'] + params['logit']['bias']
  np.testing.assert_allclose(model.apply(variables, dense, emb), logit[:, 0], rtol=1e-6,
                             atol=1e-7)


@pytest.mark.parametrize('upcast', [True, False])
@pytest.mark.parametrize('gather', [True, False])
def test_bf16_matmul_is_the_rounded_operands_product_in_float32(gather, upcast, monkeypatch):
  # Both transposes of the backward pass (a gather on CPU, a plain .T on accelerators) must give
  # the product of the bf16-rounded operands with float32 accumulation, forward and backward,
  # with the cotangent rounded to bf16 and dx, dw rounded to bf16. Reference: float64 on the
  # same rounded values. Tolerance: float32 accumulation of 64 terms (~1e-6 relative) forward;
  # one bf16 rounding (2^-8 relative) of each gradient.
  # The same with the operands converted to float32 first (CPUs without bfloat16 arithmetic).
  monkeypatch.setattr(models, 'gather_transposes', lambda: gather)
  monkeypatch.setattr(models, '_upcast_bf16_dots', lambda: upcast)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((32, 64)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((64, 16)), jnp.bfloat16)
  g = rng.standard_normal((32, 16))
  dims = (((1,), (0,)), ((), ()))

  def loss(x, w):
    return jnp.sum(models.mixed_precision_dot_general(x, w, dims) * g.astype(np.float32))

  y = jax.jit(lambda x, w: models.mixed_precision_dot_general(x, w, dims))(x, w)
  dx, dw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
  x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
  assert y.dtype == jnp.float32 and dx.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
  np.testing.assert_allclose(y, x64 @ w64, rtol=1e-5, atol=1e-5)
  g64 = np.asarray(jnp.asarray(g, jnp.bfloat16), np.float64)
  np.testing.assert_allclose(np.asarray(dx, np.float64), g64 @ w64.T, rtol=2**-8, atol=1e-5)
  np.testing.assert_allclose(np.asarray(dw, np.float64), x64.T @ g64, rtol=2**-8, atol=1e-5)


def test_row_major_transpose_is_the_transpose():
  a = jnp.arange(7 * 5, dtype=jnp.float32).reshape(7, 5)
  np.testing.assert_array_equal(jax.jit(models.row_major_transpose)(a), np.asarray(a).T)


def _operand_dtypes_of_dots(hlo: str):
  """(lhs dtype, rhs dtype) of every dot in optimized HLO text (fused computations included)."""
  dtype_of = dict(re.findall(r'%([\w.\-]+) = (\w+)\[', hlo))
  return [tuple(dtype_of.get(o) for o in operands)
          for operands in re.findall(r' dot\(%([\w.\-]+), %([\w.\-]+)\)', hlo)]


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='XLA:CPU layout of bf16 dots')
@pytest.mark.parametrize('upcast', [False, True])
def test_bf16_dense_layer_runs_bf16_dots_forward_and_backward_on_cpu(upcast, monkeypatch):
  # The point of the gathered transposes: XLA:CPU must not turn the backward dots (g w^T and
  # x^T g) into float32 ones. Checked on the compiled program: its three dots all multiply
  # bfloat16 operands. (With a plain .T, two of the three become float32 dots.) On a CPU without
  # bfloat16 arithmetic all three are float32 products of converted operands instead: faster
  # there than XLA's bfloat16 ones.
  monkeypatch.setattr(models, '_upcast_bf16_dots', lambda: upcast)
  x = jnp.ones((256, 128), jnp.bfloat16)
  w = jnp.ones((128, 64), jnp.bfloat16)
  dims = (((1,), (0,)), ((), ()))

  def loss(x, w):
    return jnp.sum(models.mixed_precision_dot_general(x, w, dims) ** 2)

  hlo = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(x, w).compile().as_text()
  dots = _operand_dtypes_of_dots(hlo)
  want = ('f32', 'f32') if upcast else ('bf16', 'bf16')
  assert len(dots) == 3 and all(d == want for d in dots), dots
  # The float32 dots take plain transposes: a gathered one would only add work.
  assert (' gather(' in hlo) == (not upcast and jax.device_count() == 1)


_SHARDED_BF16_LAYER = r'''
import math, re, jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from dlrm_jax import models
mesh = jax.sharding.Mesh(jax.devices(), ('data',))
x = jax.device_put(jnp.ones((256, 128), jnp.bfloat16), NamedSharding(mesh, P('data')))
w = jax.device_put(jnp.ones((128, 64), jnp.bfloat16), NamedSharding(mesh, P()))
loss = lambda x, w: jnp.sum(models.mixed_precision_dot_general(x, w, (((1,), (0,)), ((), ()))) ** 2)
hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile().as_text()
# Values each collective moves: the element counts of its result shape(s).
moved = [sum(math.prod(int(d) for d in dims.split(',') if d)
             for dims in re.findall(r'\[([\d,]*)\]', line.split(' = ', 1)[1].split(' all-')[0]))
         for line in hlo.splitlines() if re.search(r' all-(reduce|gather)(-start)?\(', line)]
print(models.gather_transposes(), max(moved))
'''


def test_sharded_bf16_layer_keeps_activations_local():
  # With the batch over 2 devices, a gathered transpose of x would be assembled by an
  # all-reduce of all of x^T (256 x 128 = 32768 values): the only communication must be the
  # weight gradient (128 x 64 = 8192 values).
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2')
  out = subprocess.run([sys.executable, '-c', _SHARDED_BF16_LAYER], env=env, capture_output=True,
                       text=True, timeout=300, check=True).stdout.split()
  assert out == ['False', str(128 * 64)], out


def test_bf16_dots_are_converted_only_where_the_cpu_lacks_bfloat16():
  # /proc/cpuinfo's flags decide (the trainer warns from the same test).
  assert models.emulates_bfloat16(frozenset({'avx2', 'fma'})) == (jax.default_backend() == 'cpu')
  assert not models.emulates_bfloat16(frozenset({'avx2', 'avx512_bf16'}))
  assert not models.emulates_bfloat16(frozenset({'amx_bf16'}))
  assert models._upcast_bf16_dots() == models.emulates_bfloat16()  # pylint: disable=protected-access


def test_dcn_input_keeps_a_bf16_bottom_output_beside_float32_embeddings():
  # Zero cross weights: x_1 = x_0 * 0 + x_0, the concatenation itself; an embedding value that
  # bfloat16 cannot hold must come out whole.
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  x = jnp.full((2, 4), 1.5, jnp.bfloat16)
  emb = jnp.full((2, 3, 4), 1 + 2**-12, jnp.float32)
  cross = models.LowRankCrossNet(num_layers=1, low_rank=2, dtype=jnp.bfloat16)
  variables = jax.tree.map(jnp.zeros_like, cross.init(jax.random.PRNGKey(0), jnp.zeros((2, 16))))
  z = nn.apply(lambda m, x, e: models.dcn_interaction(x, e, m), cross)(variables, x, emb)
  assert z.dtype == jnp.float32
  np.testing.assert_array_equal(z[:, 4:], np.float32(1 + 2**-12))


def test_dcn_cross_layers_run_in_the_models_dtype():
  # The DLRM's cross_net output is LowRankCrossNet's at the model's bfloat16, not at float32.
  spec = tiny_spec()
  dense, _, _ = random_batch(spec)
  emb = jnp.asarray(np.random.default_rng(1).normal(size=(5, spec.num_sparse, 4)), jnp.float32)
  model = models.DLRM((8, 4), (6,), 'dcn', batch_norm=False, dtype=jnp.bfloat16,
                      dcn_num_layers=2, dcn_low_rank_dim=3)
  variables = _randomized(model.init(jax.random.PRNGKey(0), dense, emb))
  _, captured = model.apply(variables, dense, emb, capture_intermediates=True,
                            mutable=['intermediates'])
  x = captured['intermediates']['bottom_mlp']['__call__'][0]
  x0 = jnp.concatenate([x.astype(jnp.float32), emb.reshape(5, -1)], axis=1)
  cross = {'params': variables['params']['cross_net']}
  out = captured['intermediates']['cross_net']['__call__'][0]
  np.testing.assert_array_equal(out, models.LowRankCrossNet(2, 3, jnp.bfloat16).apply(cross, x0))
  assert not np.array_equal(out, models.LowRankCrossNet(2, 3).apply(cross, x0))


def test_dcn_defaults_are_mlperfs_sizes():
  spec = tiny_spec()
  dense, _, _ = random_batch(spec)
  emb = jnp.zeros((5, spec.num_sparse, 4))
  params = models.DLRM((8, 4), (6,), 'dcn').init(jax.random.PRNGKey(0), dense, emb)['params']
  assert sorted(params['cross_net']) == ['V_0', 'V_1', 'V_2', 'W_0', 'W_1', 'W_2']
  assert params['cross_net']['V_0']['kernel'].shape == (100, 512)
