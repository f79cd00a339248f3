"""Tests for dlrm_jax.optimizers: TF/DeepRec semantics, and row-wise updates against dense ones.

The NumPy references below are written from the formulas in the optimizers' module docstring (TF
1.x and DeepRec kernels), in float64, and run step by step the way TF does, e.g. Adam's bias
correction as running products beta^t and AdagradDecay with an explicit decay counter.

Tolerances: the optimizers run in float32 (unit roundoff 6e-8); a handful of elementwise steps
accumulate a few ulps of relative error (we measured at most 2e-6, on a value near zero), so
rtol 1e-5 leaves a margin while the formula slips we guard against (Adam's epsilon inside or
outside the bias correction, the bias correction itself, a missed or extra decay, a moved
untouched row) change values far more with the settings used here. Slips at float32's own
resolution are not told from rounding: a Keras-style 1e-7 added to Adagrad's sqrt(accumulator)
(at least 0.3 here) moves a value by ~3e-7 relative. atol 1e-6 covers values that cancel to near
zero. Row-wise and dense paths that run the same float32 formula are compared at rtol 1e-6 (a few ulps: XLA may fuse a multiply
and an add into one rounding in one program and not the other), and rows that neither path may
move are compared bit for bit.
"""

import functools
import os

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from dlrm_jax import optimizers

RTOL = 1e-5
ATOL = 1e-6
LEARNING_RATE = 0.1
NUM_ROWS, DIM = 8, 3

# Hyperparameters that make each rule visible in a few steps: a large epsilon so its placement
# matters, a decay every 2 steps at rate 0.5 so decays, clamps to the baseline and missed periods
# all happen within 6 steps.
DENSE_CASES = [
    ('gradientdescent', {}),
    ('adagrad', {}),
    ('adagrad', {'initial_accumulator_value': 0.5}),
    ('adam', {}),
    ('adam', {'beta1': 0.5, 'beta2': 0.9, 'epsilon': 1e-2}),
    ('adamasync', {}),
    ('adamasync', {'epsilon': 1e-2}),
    ('adagraddecay', {}),
    ('adagraddecay', {'accumulator_decay_step': 2, 'accumulator_decay_rate': 0.5}),
    # The MLPs' (elementwise) form: FBGEMM's defaults, then a start and an eps that show.
    ('rowwise_adagrad', {}),
    ('rowwise_adagrad', {'initial_accumulator_value': 0.5, 'epsilon': 1e-1}),
]
DECAY = {'accumulator_decay_step': 2, 'accumulator_decay_rate': 0.5}

# Compiled once for the whole module: op-by-op dispatch of jnp.unique is slow on small machines.
dedup_rows = jax.jit(optimizers.dedup_rows, static_argnums=2)


# NumPy references (float64), one optimizer step at a time.


def tf_float32(x):
  """A hyperparameter as TF holds it, a float32 tensor (1 - 0.999 then differs by 1.3e-5)."""
  return np.float64(np.float32(x))


def np_gradient_descent(param, grads, lr):
  for g in grads:
    param = param - lr * g
  return param


def np_adagrad(param, grads, lr, initial_accumulator_value=0.1):
  accum = np.full_like(param, initial_accumulator_value)
  for g in grads:
    accum = accum + g * g
    param = param - lr * g / np.sqrt(accum)
  return param


def np_adam(param, grads, lr, beta1=0.9, beta2=0.999, epsilon=1e-8):
  beta1, beta2, epsilon = tf_float32(beta1), tf_float32(beta2), tf_float32(epsilon)
  m, v = np.zeros_like(param), np.zeros_like(param)
  beta1_power, beta2_power = 1.0, 1.0
  for g in grads:
    beta1_power *= beta1
    beta2_power *= beta2
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    lr_t = lr * np.sqrt(1 - beta2_power) / (1 - beta1_power)
    param = param - lr_t * m / (np.sqrt(v) + epsilon)
  return param


def np_adagrad_decay(param, grads, lr, initial_accumulator_value=0.1,
                     accumulator_decay_step=100000, accumulator_decay_rate=0.9):
  accum = np.full_like(param, initial_accumulator_value)
  decay_power = 0
  for global_step, g in enumerate(grads):
    # DeepRec hands the kernel global_step + 1.
    if (global_step + 1) // accumulator_decay_step > decay_power:
      accum = np.maximum(accum * accumulator_decay_rate, initial_accumulator_value)
      decay_power += 1
    accum = accum + g * g
    param = param - lr * g / np.sqrt(accum)
  return param


def np_eps_adagrad(param, grads, lr, initial_accumulator_value=0.0, epsilon=1e-8):
  """torch.optim.Adagrad's update (eps outside the root): rowwise_adagrad's MLP form."""
  accum = np.full_like(param, initial_accumulator_value)
  for g in grads:
    accum = accum + g * g
    param = param - lr * g / (np.sqrt(accum) + epsilon)
  return param


def np_fbgemm_rowwise_adagrad(table, full_grads, lr, initial_accumulator_value=0.0,
                              epsilon=1e-8):
  """FBGEMM's EXACT_ROWWISE_ADAGRAD over full-table gradients (its CPU kernel, in float64):
  one accumulator per row grows by the row's mean squared gradient."""
  table = table.astype(np.float64)
  accum = np.full(table.shape[0], initial_accumulator_value, np.float64)
  for g in full_grads:
    for row in range(table.shape[0]):
      if not np.any(g[row]):
        continue  # FBGEMM visits the batch's rows only: an absent row keeps all it has
      accum[row] += np.sum(g[row] * g[row]) / g.shape[1]
      table[row] = table[row] - lr / (np.sqrt(accum[row]) + epsilon) * g[row]
  return table, accum


NP_DENSE = {
    'rowwise_adagrad': np_eps_adagrad,
    'gradientdescent': np_gradient_descent,
    'adagrad': np_adagrad,
    'adam': np_adam,
    'adamasync': np_adam,
    'adagraddecay': np_adagrad_decay,
}


def np_summed_rows(ids, row_grads):
  """{row: summed gradient} for one batch."""
  summed = {}
  for row, g in zip(np.ravel(ids), np.reshape(row_grads, (-1, row_grads.shape[-1]))):
    summed[int(row)] = summed.get(int(row), 0.0) + g.astype(np.float64)
  return summed


def np_full_grad(ids, row_grads, num_rows):
  full = np.zeros((num_rows, row_grads.shape[-1]))
  for row, g in np_summed_rows(ids, row_grads).items():
    full[row] = g
  return full


def np_lazy_adam(table, batches, lr, beta1=0.9, beta2=0.999, epsilon=1e-8):
  """DeepRec's SparseApplyAdamAsync: only looked-up rows change; beta powers advance per step."""
  beta1, beta2, epsilon = tf_float32(beta1), tf_float32(beta2), tf_float32(epsilon)
  table = table.astype(np.float64)
  m, v = np.zeros_like(table), np.zeros_like(table)
  beta1_power, beta2_power = 1.0, 1.0
  for ids, row_grads in batches:
    beta1_power *= beta1
    beta2_power *= beta2
    lr_t = lr * np.sqrt(1 - beta2_power) / (1 - beta1_power)
    for row, g in np_summed_rows(ids, row_grads).items():
      m[row] = beta1 * m[row] + (1 - beta1) * g
      v[row] = beta2 * v[row] + (1 - beta2) * g * g
      table[row] = table[row] - lr_t * m[row] / (np.sqrt(v[row]) + epsilon)
  return table


def np_rowwise_adagrad_decay(table, batches, lr, *, decay_all_missed_periods,
                             initial_accumulator_value=0.1, accumulator_decay_step=100000,
                             accumulator_decay_rate=0.9):
  """DeepRec's SparseApplyAdagradDecay with a per-row decay counter, optionally catching up."""
  table = table.astype(np.float64)
  accum = np.full_like(table, initial_accumulator_value)
  decay_power = np.zeros(table.shape[0], np.int64)
  for global_step, (ids, row_grads) in enumerate(batches):
    period = (global_step + 1) // accumulator_decay_step
    for row, g in np_summed_rows(ids, row_grads).items():
      while period > decay_power[row]:
        accum[row] = np.maximum(accum[row] * accumulator_decay_rate, initial_accumulator_value)
        decay_power[row] += 1
        if not decay_all_missed_periods:
          break
      accum[row] = accum[row] + g * g
      table[row] = table[row] - lr * g / np.sqrt(accum[row])
  return table


# Inputs.


def dense_problem(num_steps=5, seed=0):
  rng = np.random.default_rng(seed)
  params = {'kernel': rng.normal(size=(3, 4)), 'bias': rng.normal(size=(4,))}
  # Gradient scales spread over 0.03..2 so that accumulators both clamp to the baseline and not.
  scales = {k: np.geomspace(0.03, 2.0, p.size).reshape(p.shape) for k, p in params.items()}
  grads = [{k: rng.normal(size=p.shape) * scales[k] for k, p in params.items()}
           for _ in range(num_steps)]
  f32 = lambda tree: {k: np.asarray(x, np.float32) for k, x in tree.items()}
  return f32(params), [f32(g) for g in grads]


# Row 0 is looked up every step, row 7 never; rows 4 and 5 come back after missing two or more
# decay periods (of 2 steps) and row 6 first appears late; ids repeat within a batch, and the
# second batch holds only rows 0 and 1.
BATCH_IDS = np.array([
    [[0, 2, 2], [5, 0, 4]],
    [[1, 1, 1], [1, 0, 1]],
    [[0, 3, 0], [2, 3, 3]],
    [[0, 2, 0], [0, 2, 2]],
    [[6, 5, 0], [2, 1, 3]],
    [[0, 2, 4], [4, 4, 0]],
], np.int32)


def sparse_problem(batch_ids=BATCH_IDS, seed=1):
  rng = np.random.default_rng(seed)
  table = rng.normal(size=(NUM_ROWS, DIM)).astype(np.float32)
  scales = np.geomspace(0.03, 2.0, DIM)
  batches = [(ids, (rng.normal(size=ids.shape + (DIM,)) * scales).astype(np.float32))
             for ids in batch_ids]
  return table, batches


def run_dense(tx, params, grads):
  params = jax.tree.map(jnp.asarray, params)
  state = tx.init(params)

  @jax.jit
  def step(params, state, g):
    updates, state = tx.update(g, state, params)
    return jax.tree.map(lambda p, u: p + u, params, updates), state

  for g in grads:
    params, state = step(params, state, g)
  return params


@functools.lru_cache
def sparse_step(opt):

  @jax.jit
  def step(table, state, ids, row_grads):
    return opt.update(table, state, *optimizers.dedup_rows(ids, row_grads, table.shape[0]))

  return step


def run_sparse(opt, table, batches):
  table = jnp.asarray(table)
  state = opt.init(table)
  step = sparse_step(opt)
  for ids, row_grads in batches:
    table, state = step(table, state, ids, row_grads)
  return np.asarray(table), state


def run_dense_on_table(tx, table, full_grads):
  return np.asarray(run_dense(tx, {'t': table}, [{'t': g} for g in full_grads])['t'])


def assert_same_formula(got, want, unmoved_rows):
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(got[unmoved_rows], want[unmoved_rows])


# Tests.


@pytest.mark.parametrize('name,hparams', DENSE_CASES)
def test_dense_matches_numpy_reference(name, hparams):
  params, grads = dense_problem()
  got = run_dense(optimizers.create(name, LEARNING_RATE, **hparams), params, grads)
  for key in params:
    want = NP_DENSE[name](params[key].astype(np.float64), [g[key] for g in grads], LEARNING_RATE,
                          **hparams)
    np.testing.assert_allclose(got[key], want, rtol=RTOL, atol=ATOL, err_msg=key)


def test_adagrad_decay_decays_on_schedule():
  # One parameter, gradient 1 each step, decay by 0.5 when t = 2, 4: accum = 0.1 + 1 = 1.1, then
  # max(1.1 * 0.5, 0.1) + 1 = 1.55, then 2.55, then max(2.55 * 0.5, 0.1) + 1 = 2.275.
  tx = optimizers.create('adagraddecay', 1.0, **DECAY)
  state = tx.init(jnp.zeros(1))
  accums = []
  for _ in range(4):
    _, state = tx.update(jnp.ones(1), state)
    accums.append(float(state[0].accumulator[0]))
  np.testing.assert_allclose(accums, [1.1, 1.55, 2.55, 2.275], rtol=1e-6)


@pytest.mark.parametrize('name', ['adam', 'adamasync'])
def test_first_adam_step_is_the_learning_rate_times_the_gradients_sign(name):
  # m = (1 - b1) g, v = (1 - b2) g^2 and the bias correction sqrt(1 - b2) / (1 - b1): with
  # epsilon 0 the first step is exactly -lr sign(g) when the moments and the correction use the
  # same float32 1 - beta, as the optimizers' docstring promises. A float64 1 - 0.999 in either
  # moves it by 6.4e-6 relative, below RTOL; a few float32 operations round to ~4e-7.
  g = jnp.asarray([0.3, -2.0, 1e-3], jnp.float32)
  tx = optimizers.create(name, 1.0, epsilon=0.0)
  updates, _ = tx.update(g, tx.init(jnp.zeros(3)))
  np.testing.assert_allclose(updates, -np.sign(g), rtol=1e-6)
  opt = optimizers.create_sparse(name, 1.0, epsilon=0.0)
  table = jnp.zeros((4, 3))
  ids = jnp.asarray([0, 1, 2, 4], jnp.int32)  # 4 is out of range: padding
  new_table, _ = opt.update(table, opt.init(table), ids, jnp.tile(g, (4, 1)))
  np.testing.assert_allclose(new_table[:3], -np.sign(np.tile(g, (3, 1))), rtol=1e-6)


def test_adagrad_decay_moves_nothing_where_the_accumulator_is_zero():
  # A resume that re-lays the tables zero-fills the padding rows' accumulators: 0 * rsqrt(0)
  # would be NaN there (only a slow end-to-end resume test noticed the guard missing).
  tx = optimizers.create('adagraddecay', 0.1, **DECAY)
  (state, *rest) = tx.init(jnp.zeros((2, 2)))
  state = state._replace(accumulator=jnp.zeros((2, 2)))
  updates, _ = tx.update(jnp.zeros((2, 2)), (state, *rest))
  np.testing.assert_array_equal(updates, np.zeros((2, 2)))


@pytest.mark.parametrize('create', [optimizers.create, optimizers.create_sparse])
def test_unknown_name_lists_valid_names(create):
  with pytest.raises(ValueError, match='adagraddecay'):
    create('rmsprop', 0.1)


def test_invalid_hparams_are_rejected():
  with pytest.raises(ValueError, match=r'accumulator_decay_rate must be in \(0, 1\): 1.5'):
    optimizers.create('adagraddecay', 0.1, accumulator_decay_rate=1.5)
  with pytest.raises(ValueError, match='initial_accumulator_value must be positive: 0.0'):
    optimizers.create_sparse('adagrad', 0.1, initial_accumulator_value=0.0)
  for create in (optimizers.create, optimizers.create_sparse):
    with pytest.raises(ValueError, match='must be non-negative and finite: 0.0, -1e-08'):
      create('rowwise_adagrad', 0.1, epsilon=-1e-8)
  # NaN passed the range checks (every comparison with NaN is false) and trained NaN.
  for create, name, hparams in ((optimizers.create, 'adam', dict(epsilon=float('nan'))),
                                (optimizers.create_sparse, 'adamasync', dict(epsilon=np.inf)),
                                (optimizers.create, 'adagrad',
                                 dict(initial_accumulator_value=float('nan')))):
    with pytest.raises(ValueError, match='finite|positive'):
      create(name, 0.1, **hparams)
  # Another optimizer's argument is named, with the ones this optimizer takes.
  with pytest.raises(ValueError, match="'gradientdescent' takes no beta1; its arguments: none"):
    optimizers.create('gradientdescent', 0.1, beta1=0.9)
  with pytest.raises(ValueError, match='takes no beta1; its arguments: initial_accumulator_value'):
    optimizers.create('adagrad', 0.1, beta1=0.9)


def test_config_optimizer_hparams_reach_the_optimizer_and_unset_ones_keep_its_defaults(
    monkeypatch):
  # The command line can only set fields the config has (it is locked): every optimizer
  # argument is a field, unset (None) unless given.
  import sys  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import default  # pylint: disable=g-import-not-at-top
  from dlrm_jax import train  # pylint: disable=g-import-not-at-top
  seen, create = [], optimizers.create
  monkeypatch.setattr(optimizers, 'create', lambda name, lr, **h: seen.append(h) or
                      create(name, lr, **h))
  config = default.get_config('tiny')
  config.optimizer = 'adagraddecay'
  config.lock()
  config.optimizer_hparams.accumulator_decay_step = 5000
  train.make_setup(config)
  assert seen == [{'accumulator_decay_step': 5000}]


def test_dedup_rows_sums_repeats_and_pads():
  ids = np.array([[3, 1, 3], [0, 3, 1]], np.int32)
  row_grads = np.arange(ids.size * 2, dtype=np.float32).reshape(ids.shape + (2,))
  unique_ids, summed = dedup_rows(ids, row_grads, 5)

  want_ids = np.unique(ids)
  want_sums = np.zeros((want_ids.size, 2))
  np.add.at(want_sums, np.searchsorted(want_ids, ids.ravel()), row_grads.reshape(-1, 2))
  num_pad = ids.size - want_ids.size
  assert unique_ids.dtype == jnp.int32 and unique_ids.shape == (ids.size,)
  np.testing.assert_array_equal(unique_ids, np.concatenate([want_ids, np.full(num_pad, 5)]))
  np.testing.assert_allclose(summed, np.concatenate([want_sums, np.zeros((num_pad, 2))]))


def test_dedup_rows_treats_out_of_range_ids_as_padding():
  ids = np.array([2, -1, 4, 2, 9], np.int32)
  row_grads = np.ones((5, 1), np.float32)
  unique_ids, summed = dedup_rows(ids, row_grads, 4)
  np.testing.assert_array_equal(unique_ids[:1], [2])
  assert np.all(np.asarray(unique_ids[1:]) == 4)
  np.testing.assert_array_equal(summed[:, 0], [2, 0, 0, 0, 0])


@pytest.mark.parametrize('name,hparams', [
    ('gradientdescent', {}),
    ('adagrad', {}),
    # A starting accumulator of 0.5 instead of 0.1 changes the first steps by up to sqrt(5):
    # the row-wise states used to be able to ignore it unnoticed (the MLPs' optax chain honoured
    # it, so only the embeddings would have trained otherwise).
    ('adagrad', {'initial_accumulator_value': 0.5}),
    ('adam', {'epsilon': 1e-2}),
    ('adagraddecay', DECAY),
    ('adagraddecay', {**DECAY, 'initial_accumulator_value': 0.5}),
])
def test_sparse_matches_numpy_dense_reference(name, hparams):
  # For these, the row-wise update is the dense update with zero gradient on absent rows.
  table, batches = sparse_problem()
  got, _ = run_sparse(optimizers.create_sparse(name, LEARNING_RATE, **hparams), table, batches)
  full_grads = [np_full_grad(ids, g, NUM_ROWS) for ids, g in batches]
  want = NP_DENSE[name](table.astype(np.float64), full_grads, LEARNING_RATE, **hparams)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize('hparams', [{}, {'initial_accumulator_value': 0.5, 'epsilon': 1e-1}])
def test_rowwise_adagrad_is_fbgemms_on_both_paths(hparams):
  # One accumulator per row, the row's mean squared gradient added: the table's state is
  # [rows, 1]. The dense path runs it on the leaves under 'tables' (the trainer's full params),
  # where an absent row's gradient is 0 and so nothing of it moves.
  table, batches = sparse_problem()
  full_grads = [np_full_grad(ids, g, NUM_ROWS) for ids, g in batches]
  want, want_accum = np_fbgemm_rowwise_adagrad(table, full_grads, LEARNING_RATE, **hparams)
  got, state = run_sparse(optimizers.create_sparse('rowwise_adagrad', LEARNING_RATE, **hparams),
                          table, batches)
  assert state.accumulator.shape == (NUM_ROWS, 1)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(np.asarray(state.accumulator)[:, 0], want_accum, rtol=RTOL)
  np.testing.assert_array_equal(got[7], table[7])  # never looked up
  dense = optimizers.create('rowwise_adagrad', LEARNING_RATE, **hparams)
  params = {'tables': {'t': jnp.asarray(table)}}
  assert jax.tree.leaves(dense.init(params))[0].shape == (NUM_ROWS, 1)
  deduped = [dedup_rows(ids, g, NUM_ROWS) for ids, g in batches]
  full = [{'tables': {'t': jnp.zeros((NUM_ROWS, DIM)).at[u].add(g, mode='drop')}}
          for u, g in deduped]
  assert_same_formula(got, np.asarray(run_dense(dense, params, full)['tables']['t']),
                      unmoved_rows=[7])


def test_rowwise_adagrad_with_no_start_and_no_eps_moves_nothing_at_zero_gradient():
  # A weight-0 slot's row is in the batch with gradient 0: 0 / (sqrt(0) + 0) must not be NaN.
  table, _ = sparse_problem()
  opt = optimizers.create_sparse('rowwise_adagrad', LEARNING_RATE, epsilon=0.0)
  ids = np.array([[0, 3]], np.int32)
  got, state = run_sparse(opt, table, [(ids, np.zeros((1, 2, DIM), np.float32))])
  np.testing.assert_array_equal(got, table)
  np.testing.assert_array_equal(np.asarray(state.accumulator), 0.0)


@pytest.mark.parametrize('hparams', [{}, {'beta1': 0.5, 'beta2': 0.9, 'epsilon': 1e-2}])
def test_sparse_adamasync_is_lazy_adam(hparams):
  table, batches = sparse_problem()
  got, state = run_sparse(optimizers.create_sparse('adamasync', LEARNING_RATE, **hparams), table,
                          batches)
  want = np_lazy_adam(table, batches, LEARNING_RATE, **hparams)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  # Row 7 is never looked up: it and its moments are untouched, bit for bit.
  np.testing.assert_array_equal(got[7], table[7])
  np.testing.assert_array_equal(state.mu[7], 0.0)
  assert int(state.count) == len(batches)


def test_sparse_adam_moves_rows_absent_from_the_batch():
  # TF's Adam keeps its dense semantics on embeddings: a row with momentum keeps moving.
  table, batches = sparse_problem()
  opt = optimizers.create_sparse('adam', LEARNING_RATE)
  after_first, _ = run_sparse(opt, table, batches[:1])
  after_two, _ = run_sparse(opt, table, batches[:1] + [(np.full_like(batches[0][0], 1),
                                                        batches[1][1])])
  moved = np.abs(after_two - after_first).max(axis=1) > 0
  # Rows 0, 2, 4, 5 had gradients in step 1 only (step 2 looks up row 1): they still move.
  np.testing.assert_array_equal(np.nonzero(moved)[0], [0, 1, 2, 4, 5])


@pytest.mark.parametrize('decay_all_missed_periods', [True, False])
def test_sparse_adagrad_decay_matches_rowwise_reference(decay_all_missed_periods):
  table, batches = sparse_problem()
  opt = optimizers.create_sparse('adagraddecay', LEARNING_RATE,
                                 decay_all_missed_periods=decay_all_missed_periods, **DECAY)
  got, state = run_sparse(opt, table, batches)
  want = np_rowwise_adagrad_decay(table, batches, LEARNING_RATE,
                                  decay_all_missed_periods=decay_all_missed_periods, **DECAY)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  # Row 4, seen at step 1, returns at step 6 (period 3): it catches up all three decays, or
  # DeepRec's one.
  assert int(state.decay_period[4, 0]) == (3 if decay_all_missed_periods else 1)
  assert int(state.decay_period[7, 0]) == 0


def test_adagrad_decay_modes_differ_only_on_rows_that_missed_periods():
  table, batches = sparse_problem()
  results = [
      run_sparse(optimizers.create_sparse('adagraddecay', LEARNING_RATE,
                                          decay_all_missed_periods=mode, **DECAY),
                 table, batches)[0] for mode in (True, False)]
  differs = np.abs(results[0] - results[1]).max(axis=1) > 0
  # Only rows 4 and 5 return with two or more missed periods on an accumulator above the baseline
  # (row 6 also misses two, but its first accumulator is the baseline, which decays to itself).
  np.testing.assert_array_equal(np.nonzero(differs)[0], [4, 5])


@pytest.mark.parametrize('name,hparams', [
    ('gradientdescent', {}),
    ('adagrad', {}),
    ('adam', {}),
    ('adagraddecay', DECAY),
])
def test_sparse_equals_dense_optax_on_full_table(name, hparams):
  table, batches = sparse_problem()
  got, _ = run_sparse(optimizers.create_sparse(name, LEARNING_RATE, **hparams), table, batches)
  dense = optimizers.create(name, LEARNING_RATE, **hparams)

  # Full-table gradient built from the deduplicated rows. Row 7 is never looked up and has no
  # momentum, so neither path may move it.
  deduped = [dedup_rows(ids, g, NUM_ROWS) for ids, g in batches]
  full = [jnp.zeros((NUM_ROWS, DIM)).at[u].add(s, mode='drop') for u, s in deduped]
  assert_same_formula(got, run_dense_on_table(dense, table, full), unmoved_rows=[7])

  # Full-table gradient as autodiff of a gather makes it: a scatter-add of every looked-up row,
  # which sums repeated rows in another order.
  full = [jnp.zeros((NUM_ROWS, DIM)).at[ids.ravel()].add(g.reshape(-1, DIM)) for ids, g in batches]
  assert_same_formula(got, run_dense_on_table(dense, table, full), unmoved_rows=[7])


def test_sparse_adamasync_equals_dense_adam_when_every_row_is_looked_up():
  every_row = np.tile(np.arange(NUM_ROWS, dtype=np.int32), (4, 1))
  table, batches = sparse_problem(batch_ids=every_row)
  got, _ = run_sparse(optimizers.create_sparse('adamasync', LEARNING_RATE), table, batches)
  want = run_dense_on_table(optimizers.create('adam', LEARNING_RATE), table,
                            [jnp.asarray(g) for _, g in batches])
  assert_same_formula(got, want, unmoved_rows=[])


@pytest.mark.parametrize('name', optimizers.OPTIMIZER_NAMES)
def test_sparse_update_jits_with_donated_buffers(name):
  table, batches = sparse_problem()
  opt = optimizers.create_sparse(name, LEARNING_RATE, **(DECAY if name == 'adagraddecay' else {}))
  update = jax.jit(opt.update, donate_argnums=(0, 1))

  eager_table, eager_state = jnp.asarray(table), opt.init(jnp.asarray(table))
  jit_table, jit_state = jnp.asarray(table), opt.init(jnp.asarray(table))
  for ids, row_grads in batches[:3]:
    unique_ids, summed = dedup_rows(ids, row_grads, NUM_ROWS)
    eager_table, eager_state = opt.update(eager_table, eager_state, unique_ids, summed)
    donated = jit_table
    jit_table, jit_state = update(jit_table, jit_state, unique_ids, summed)
    assert donated.is_deleted()
  np.testing.assert_allclose(jit_table, eager_table, rtol=1e-6, atol=1e-7)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), jit_state,
               eager_state)


@pytest.mark.parametrize('name', ['adamasync', 'adagrad', 'adagraddecay', 'gradientdescent',
                                  'rowwise_adagrad'])
def test_sparse_update_does_not_copy_the_table(name):
  # The row-wise path must write the looked-up rows into the donated buffers, not rebuild them:
  # XLA's scratch memory stays far below one table (the dense 'adam' needs a table-sized gradient).
  num_rows, dim, batch = 4096, 8, 64
  opt = optimizers.create_sparse(name, LEARNING_RATE)
  table = jnp.zeros((num_rows, dim))
  ids = jnp.arange(batch, dtype=jnp.int32)

  def step(table, state, ids, row_grads):
    return opt.update(table, state, *optimizers.dedup_rows(ids, row_grads, num_rows))

  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
      table, opt.init(table), ids, jnp.ones((batch, dim))).compile()
  memory = compiled.memory_analysis()
  if memory is None:
    pytest.skip('this backend reports no memory analysis')
  assert memory.temp_size_in_bytes < table.nbytes // 4


@pytest.mark.parametrize('name', optimizers.OPTIMIZER_NAMES)
def test_update_from_gathered_rows_equals_update_that_gathers(name):
  # The trainer hands the update the rows its forward pass gathered (padding ids read clipped,
  # i.e. some other finite row). Both must give the same table and state, bit for bit, as the
  # same float32 formula runs on the same values.
  table, batches = sparse_problem()
  opt = optimizers.create_sparse(name, LEARNING_RATE, **(DECAY if name == 'adagraddecay' else {}))

  def step(table, state, ids, row_grads, pass_rows):
    unique_ids, summed = dedup_rows(ids, row_grads, NUM_ROWS)
    rows = jnp.take(table, unique_ids, axis=0, mode='clip') if pass_rows else None
    return opt.update(table, state, unique_ids, summed, rows)

  step = jax.jit(step, static_argnums=4)
  results = []
  for pass_rows in (False, True):
    t, state = jnp.asarray(table), opt.init(jnp.asarray(table))
    for ids, row_grads in batches:
      t, state = step(t, state, ids, row_grads, pass_rows)
    results.append((np.asarray(t), jax.tree.map(np.asarray, state)))
  (t0, s0), (t1, s1) = results
  assert not np.array_equal(t0, table)  # the rows did move
  np.testing.assert_array_equal(t1, t0)
  jax.tree.map(np.testing.assert_array_equal, s1, s0)


def test_rowwise_adagrads_default_epsilon_is_fbgemms_1e_8_on_both_paths():
  # A gradient of 1e-8 everywhere: sqrt(accum) = 1e-8 and each step moves by
  # -lr * g / (g + eps) = -0.5 at eps 1e-8 (0.99 at 1e-10).
  g = 1e-8
  dense = optimizers.create('rowwise_adagrad', 1.0)
  params = {'tables': {'t': jnp.zeros((NUM_ROWS, DIM))}, 'mlp': {'w': jnp.zeros((3, 2))}}
  grads = jax.tree.map(lambda x: jnp.full_like(x, g), params)
  updates, _ = dense.update(grads, dense.init(params), params)
  for u in jax.tree.leaves(updates):
    np.testing.assert_allclose(np.asarray(u), -0.5, rtol=1e-4)
  ids = np.array([[0, 3]], np.int32)
  got, _ = run_sparse(optimizers.create_sparse('rowwise_adagrad', 1.0), np.zeros((NUM_ROWS, DIM),
                      np.float32), [(ids, np.full((1, 2, DIM), g, np.float32))])
  np.testing.assert_allclose(got[[0, 3]], -0.5, rtol=1e-4)
