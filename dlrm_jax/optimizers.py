"""The reference's five optimizers, with TensorFlow 1.x / DeepRec semantics, and TorchRec's
row-wise Adagrad, each dense and row-wise.

DeepRec's DLRM offers `--optimizer` in {adam, adamasync (default), adagrad, adagraddecay,
gradientdescent}. This module gives each of them twice:

* `create(name, learning_rate, **hparams)`: an `optax.GradientTransformation` for dense
  parameters (the MLPs), used as `updates, state = tx.update(grads, state, params)`.
* `create_sparse(name, learning_rate, **hparams)`: a `RowwiseOptimizer` for one embedding table
  `[num_rows, dim]`, fed with `dedup_rows(ids, row_grads, num_rows)` so only the rows looked up in
  a batch are read and written (gather, compute, `.at[ids].set(..., mode='drop')`, which XLA
  performs in place when the table and state are donated to `jax.jit`).

Semantics implemented, and where they come from (TF = TensorFlow 1.x's optimizers, read in
DeepRec's copy: `tensorflow/python/training/*.py`, kernels in
`tensorflow/core/kernels/training_ops.cc`; DR = DeepRec's own, github.com/DeepRec-AI/DeepRec,
formerly alibaba/DeepRec: optimizers in `tensorflow/python/training/`, kernels in
`tensorflow/core/kernels/training_ali_ops.cc`). `t` is the 1-based number of the update.

gradientdescent  TF `GradientDescentOptimizer` / `ApplyGradientDescent`: var -= lr * g.
    Row-wise: the same formula on the looked-up rows; other rows have g = 0 and do not move, so it
    equals the dense update on the full table.

adagrad  TF `AdagradOptimizer` (`adagrad.py`, initial_accumulator_value 0.1) / `ApplyAdagrad`,
    `SparseApplyAdagrad`: accum += g^2; var -= lr * g / sqrt(accum), no epsilon. Dense path:
    `optax.scale_by_rss(initial_accumulator_value, eps=0)`, which is exactly this. Row-wise: the
    same on looked-up rows; it equals the dense update on the full table.

adam  TF `AdamOptimizer` (`adam.py`) / `ApplyAdam`: m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
    lr_t = lr sqrt(1-b2^t) / (1-b1^t); var -= lr_t m / (sqrt(v) + eps), with b1 0.9, b2 0.999,
    eps 1e-8. TF puts epsilon outside the bias correction ("epsilon hat"), optax.adam inside it, so
    the dense path is our own `scale_by_tf_adam`. For an embedding held in an ordinary variable TF's
    sparse path (`_apply_sparse_shared`) first decays the whole m and v, then scatter-adds the rows'
    gradient terms and moves *every* row: it is the dense update. The row-wise 'adam' keeps that:
    it scatters the rows' gradients into a full-table gradient and runs the dense transformation,
    so each step costs a pass over the whole table and its two slots (use 'adamasync' to avoid it).
    (DR's `KvResourceSparseApplyAdam` for EmbeddingVariables is lazy instead; we follow the plain
    variable, the dense semantics.)

adamasync  DR `AdamAsyncOptimizer` (`adam_async.py`) / `ApplyAdamAsync`, `SparseApplyAdamAsync`.
    Dense: the Adam formula above. Row-wise: lazy Adam, as DR's sparse kernel: only the looked-up
    rows' m, v and values change, using the same lr_t for all of them. DR keeps the bias correction
    in per-variable `beta1_power`/`beta2_power` slots that are multiplied by beta once per apply
    call; we keep an int32 `count` in each table's state, incremented once per `update`, and
    compute beta**count. The trainer updates every table every step, so count is the global step
    and the two agree (up to float rounding of a power against a running product).
    DR's `apply_sparse_rmsprop` variant (off by default) is not implemented.

adagraddecay  DR `AdagradDecayOptimizer` (`adagrad_decay.py`) / `ApplyAdagradDecay`,
    `SparseApplyAdagradDecay`, defaults initial_accumulator_value 0.1, accumulator_decay_step
    100000, accumulator_decay_rate 0.9. DR passes t = global_step + 1 and keeps a decay counter p
    (`accumulator_decay_power`, starting at 0): if t // decay_step > p, then
    accum = max(accum * rate, baseline) and p += 1, where baseline = initial_accumulator_value;
    then accum += g^2; var -= lr * g / sqrt(accum). Dense: one counter per variable, so the decay
    happens on the steps t = k * decay_step; we derive that from `count` without a counter.
    Row-wise: a per-row counter `decay_period` ([N, 1] int32), looked at only when the row is
    next touched (lazily). DR's sparse kernel applies at most one decay per touch (p += 1), so a
    row that missed k period boundaries catches up over its next k touches. By default
    (`decay_all_missed_periods=True`) we apply all k missed decays at the next touch,
    accum = max(accum * rate^k, baseline) (which equals k successive decay-and-clamp steps, since
    baseline * rate < baseline), and set the counter to t // decay_step: this makes the row-wise
    update equal the dense update on the full table, where untouched rows only decay.
    `decay_all_missed_periods=False` reproduces DR's sparse kernel instead. Both agree for rows
    touched every step.

rowwise_adagrad  Not DeepRec's: FBGEMM's EXACT_ROWWISE_ADAGRAD (`rowwise_adagrad` in
    fbgemm_gpu/codegen/genscript/optimizers.py), TorchRec's usual table optimizer. A table keeps
    one accumulator per row ([N, 1], dim times less state than adagrad's): accum += mean over
    the row of g^2; row -= lr * g / (sqrt(accum) + eps), with FBGEMM's defaults accumulator 0 and
    eps 1e-8 (`initial_accumulator_value`, `epsilon`). The MLPs take the elementwise form with
    the same two values (torch.optim.Adagrad's update, as TorchRec's DLRM trains its dense
    part). Dense path: the leaves under a 'tables' key (the full tables) take the row-wise rule;
    a row absent from the batch has g = 0, so its accumulator and values stay, and the row-wise
    update equals it.

The step count starts at 0 in `init` (DR's global_step starts at 0), lives in the optimizer state
and is restored with it from checkpoints.

Floating point: hyperparameters are rounded to float32 as TF holds them, and Adam's 1 - beta is
taken in float32 as TF does, so the moments and the bias correction use the same beta. We compute
1 - beta^t as -expm1(t log beta), which is what TF's running float32 product beta_power
approximates (that product loses up to 1e-5 relative of 1 - beta2^t in early steps). Where the
row-wise path is said to equal the dense one, both evaluate the same float32 formula on each
touched row; XLA may still fuse a multiply and an add differently in the two programs, so they
agree to a few ulps (bit for bit on CPU in most cases), and rows neither may move stay bit-exact.
"""

import inspect
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

OPTIMIZER_NAMES = ('adam', 'adamasync', 'adagrad', 'adagraddecay', 'gradientdescent',
                   'rowwise_adagrad')


def _check_adam_hparams(beta1, beta2, epsilon):
  if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
    raise ValueError(f'beta1 and beta2 must be in [0, 1): {beta1}, {beta2}')
  if not 0.0 <= epsilon < math.inf:
    raise ValueError(f'epsilon must be non-negative and finite: {epsilon}')


def _check_adagrad_hparams(initial_accumulator_value):
  if not 0.0 < initial_accumulator_value < math.inf:
    raise ValueError(f'initial_accumulator_value must be positive: {initial_accumulator_value}')


def _check_rowwise_adagrad_hparams(initial_accumulator_value, epsilon):
  if not (0.0 <= initial_accumulator_value < math.inf and 0.0 <= epsilon < math.inf):
    raise ValueError('initial_accumulator_value and epsilon must be non-negative and finite: '
                     f'{initial_accumulator_value}, {epsilon}')


def _check_decay_hparams(accumulator_decay_step, accumulator_decay_rate):
  if int(accumulator_decay_step) != accumulator_decay_step or accumulator_decay_step <= 0:
    raise ValueError(f'accumulator_decay_step must be a positive integer: {accumulator_decay_step}')
  if not 0.0 < accumulator_decay_rate < 1.0:
    raise ValueError(f'accumulator_decay_rate must be in (0, 1): {accumulator_decay_rate}')


# Elementwise rules, shared by the dense and the row-wise paths so that the two compute the same
# float32 formula on the rows they both touch.


class _AdamConstants(NamedTuple):
  b1: float
  b2: float
  one_minus_b1: float
  one_minus_b2: float
  log_b1: float
  log_b2: float
  eps: float


def _adam_constants(beta1, beta2, epsilon) -> _AdamConstants:
  """Adam's hyperparameters rounded as TF holds them: float32, with 1 - beta taken in float32.

  Using the same rounded beta in the moments and in the bias correction keeps them consistent:
  with beta2 = 0.999, float32(1 - beta2) and 1 - float32(beta2) differ by 1.3e-5 relative, which
  would otherwise become a systematic 6e-6 relative error in every Adam step.
  """
  _check_adam_hparams(beta1, beta2, epsilon)
  b1, b2 = np.float32(beta1), np.float32(beta2)
  log = lambda b: math.log(b) if b > 0 else -math.inf
  return _AdamConstants(
      b1=float(b1), b2=float(b2),
      one_minus_b1=float(np.float32(1) - b1), one_minus_b2=float(np.float32(1) - b2),
      log_b1=log(float(b1)), log_b2=log(float(b2)), eps=float(np.float32(epsilon)))


def _first_moment(mu, g, c: _AdamConstants):
  return c.b1 * mu + c.one_minus_b1 * g


def _second_moment(nu, g, c: _AdamConstants):
  return c.b2 * nu + c.one_minus_b2 * g * g


def _tf_adam_direction(mu, nu, count, c: _AdamConstants):
  """TF's bias-corrected step before the learning rate; `count` is the 1-based update number."""
  t = count.astype(jnp.float32)
  # 1 - beta^t as -expm1(t log beta): TF's float32 running product loses up to 1e-5 relative of
  # it in the first steps (beta2 = 0.999); this is accurate to a few ulps.
  correction = jnp.sqrt(-jnp.expm1(t * c.log_b2)) / -jnp.expm1(t * c.log_b1)
  return correction.astype(mu.dtype) * mu / (jnp.sqrt(nu) + c.eps)


def _adagrad_accumulate(accumulator, g):
  return g * g + accumulator


def _adagrad_direction(accumulator, g):
  # optax.scale_by_rss computes rsqrt(accumulator) * g too: the row-wise path must match it.
  return jax.lax.rsqrt(accumulator) * g


def _row_mean_square(g):
  """FBGEMM's row-wise Adagrad statistic: each row's mean squared gradient, [N, D] -> [N, 1]."""
  return jnp.mean(g * g, axis=-1, keepdims=True)


def _eps_adagrad_direction(accumulator, g, eps):
  # With accumulator 0 and eps 0 a row with g = 0 (a weight-0 slot's row) would be 0 / 0: as
  # for adagraddecay, a zero accumulator moves nothing.
  return jnp.where(accumulator > 0, g / (jnp.sqrt(accumulator) + eps), 0).astype(g.dtype)


def _decay_accumulator(accumulator, num_decays, rate, baseline):
  """`num_decays` successive DeepRec decays: accum = max(accum * rate, baseline), each time."""
  decayed = jnp.maximum(accumulator * rate**num_decays, baseline).astype(accumulator.dtype)
  return jnp.where(num_decays > 0, decayed, accumulator)


# Dense optimizers: optax GradientTransformations.


class ScaleByTfAdamState(NamedTuple):
  count: jax.Array  # int32 scalar: updates applied so far.
  mu: optax.Updates
  nu: optax.Updates


def scale_by_tf_adam(b1: float = 0.9, b2: float = 0.999,
                     eps: float = 1e-8) -> optax.GradientTransformation:
  """Adam's direction as TF 1.x computes it: epsilon added after the bias correction.

  Chain with `optax.scale_by_learning_rate` for the full update
  var -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps).
  """
  constants = _adam_constants(b1, b2, eps)

  def init_fn(params):
    return ScaleByTfAdamState(
        count=jnp.zeros([], jnp.int32),
        mu=jax.tree.map(jnp.zeros_like, params),
        nu=jax.tree.map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_int32_increment(state.count)
    mu = jax.tree.map(lambda m, g: _first_moment(m, g, constants), state.mu, updates)
    nu = jax.tree.map(lambda v, g: _second_moment(v, g, constants), state.nu, updates)
    directions = jax.tree.map(lambda m, v: _tf_adam_direction(m, v, count, constants), mu, nu)
    return directions, ScaleByTfAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


# AdagradDecayOptimizer's default accumulator_decay_step.
DECAY_STEP = 100000


class ScaleByAdagradDecayState(NamedTuple):
  count: jax.Array  # int32 scalar: updates applied so far (DeepRec's global_step).
  accumulator: optax.Updates


def scale_by_adagrad_decay(initial_accumulator_value: float = 0.1,
                           accumulator_decay_step: int = DECAY_STEP,
                           accumulator_decay_rate: float = 0.9) -> optax.GradientTransformation:
  """DeepRec's AdagradDecay direction g / sqrt(accum), the accumulator decayed every decay_step."""
  _check_adagrad_hparams(initial_accumulator_value)
  _check_decay_hparams(accumulator_decay_step, accumulator_decay_rate)
  decay_step = int(accumulator_decay_step)

  def init_fn(params):
    return ScaleByAdagradDecayState(
        count=jnp.zeros([], jnp.int32),
        accumulator=jax.tree.map(lambda p: jnp.full_like(p, initial_accumulator_value), params))

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_int32_increment(state.count)
    # DeepRec's per-variable counter always equals (t - 1) // decay_step before step t, so the
    # decay is due exactly when t crosses a multiple of decay_step.
    num_decays = count // decay_step - state.count // decay_step

    def accumulate(accumulator, g):
      accumulator = _decay_accumulator(accumulator, num_decays, accumulator_decay_rate,
                                       initial_accumulator_value)
      return _adagrad_accumulate(accumulator, g)

    accumulator = jax.tree.map(accumulate, state.accumulator, updates)
    # A zero accumulator (a table's padding rows after a resume re-laid them: relayout_tables
    # zero-fills) would give 0 * inf = NaN there, and padding slots read those rows with weight
    # 0; as optax.scale_by_rss, a zero accumulator moves nothing.
    directions = jax.tree.map(
        lambda a, g: jnp.where(a > 0, _adagrad_direction(a, g), 0), accumulator, updates)
    return directions, ScaleByAdagradDecayState(count=count, accumulator=accumulator)

  return optax.GradientTransformation(init_fn, update_fn)


def under_tables(path) -> bool:
  """Whether a pytree path lies under a 'tables' key: a table, or an optimizer slot of one."""
  return any(isinstance(k, jax.tree_util.DictKey) and k.key == 'tables' for k in path)


def scale_by_rowwise_adagrad(initial_accumulator_value: float = 0.0,
                             epsilon: float = 1e-8) -> optax.GradientTransformation:
  """Adagrad with eps, row-wise on the leaves under a 'tables' key, elementwise elsewhere."""

  def slot_shape(path, x):
    return x.shape[:1] + (1,) if under_tables(path) and x.ndim == 2 else x.shape

  def init_fn(params):
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.full(slot_shape(p, x), initial_accumulator_value, x.dtype), params)

  def update_fn(updates, state, params=None):
    del params
    # A slot narrower than its gradient is a table's [rows, 1] (init chose the shape).
    accumulator = jax.tree.map(
        lambda g, a: a + (_row_mean_square(g) if a.shape != g.shape else g * g), updates, state)
    directions = jax.tree.map(lambda g, a: _eps_adagrad_direction(a, g, epsilon), updates,
                              accumulator)
    return directions, accumulator

  return optax.GradientTransformation(init_fn, update_fn)


def _dense_adam(learning_rate, *, beta1=0.9, beta2=0.999, epsilon=1e-8):
  return optax.chain(scale_by_tf_adam(beta1, beta2, epsilon),
                     optax.scale_by_learning_rate(learning_rate))


def _dense_adagrad(learning_rate, *, initial_accumulator_value=0.1):
  _check_adagrad_hparams(initial_accumulator_value)
  return optax.chain(optax.scale_by_rss(initial_accumulator_value, eps=0.0),
                     optax.scale_by_learning_rate(learning_rate))


def _dense_adagrad_decay(learning_rate, *, initial_accumulator_value=0.1,
                         accumulator_decay_step=DECAY_STEP, accumulator_decay_rate=0.9,
                         decay_all_missed_periods=True):
  # Every dense element sees every step, so no period is ever missed: the flag is accepted only so
  # that one hparams dict serves both `create` and `create_sparse`.
  del decay_all_missed_periods
  return optax.chain(
      scale_by_adagrad_decay(initial_accumulator_value, accumulator_decay_step,
                             accumulator_decay_rate),
      optax.scale_by_learning_rate(learning_rate))


def _dense_gradient_descent(learning_rate):
  return optax.scale_by_learning_rate(learning_rate)


def _dense_rowwise_adagrad(learning_rate, *, initial_accumulator_value=0.0, epsilon=1e-8):
  _check_rowwise_adagrad_hparams(initial_accumulator_value, epsilon)
  return optax.chain(scale_by_rowwise_adagrad(initial_accumulator_value, epsilon),
                     optax.scale_by_learning_rate(learning_rate))


_DENSE_BUILDERS = {
    'adam': _dense_adam,
    # DeepRec's AdamAsync only differs from Adam on sparse (row) updates.
    'adamasync': _dense_adam,
    'adagrad': _dense_adagrad,
    'adagraddecay': _dense_adagrad_decay,
    'gradientdescent': _dense_gradient_descent,
    'rowwise_adagrad': _dense_rowwise_adagrad,
}


def _builder(builders, name):
  key = name.lower()
  if key not in builders:
    raise ValueError(f'Unknown optimizer {name!r}; valid names: {", ".join(OPTIMIZER_NAMES)}')
  return builders[key]


def create(name: str, learning_rate: float, **hparams) -> optax.GradientTransformation:
  """The dense optimizer `name` (one of OPTIMIZER_NAMES) with TF/DeepRec semantics.

  Args:
    name: 'adam', 'adamasync', 'adagrad', 'adagraddecay', 'gradientdescent' or
      'rowwise_adagrad'.
    learning_rate: the step size.
    **hparams: DeepRec's constructor arguments: beta1, beta2, epsilon (adam, adamasync);
      initial_accumulator_value (adagrad, adagraddecay); accumulator_decay_step,
      accumulator_decay_rate, decay_all_missed_periods (adagraddecay); FBGEMM's
      initial_accumulator_value and epsilon (rowwise_adagrad).

  Returns:
    An optax GradientTransformation; its updates already include -learning_rate.
  """
  builder = _builder(_DENSE_BUILDERS, name)
  takes = [p.name for p in inspect.signature(builder).parameters.values()
           if p.kind == p.KEYWORD_ONLY]
  unknown = sorted(set(hparams) - set(takes))
  if unknown:
    raise ValueError(f'optimizer {name!r} takes no {", ".join(unknown)}; its arguments: '
                     f'{", ".join(takes) or "none (learning_rate only)"}')
  return builder(learning_rate, **hparams)


# Row-wise (sparse) optimizers for embedding tables.


def dedup_rows(ids: jax.Array, row_grads: jax.Array,
               num_rows: int) -> tuple[jax.Array, jax.Array]:
  """Sums the gradients of repeated row ids, in a jittable, static-shaped form.

  Args:
    ids: int array of any shape: row ids into a [num_rows, D] table.
    row_grads: the gradient of each looked-up row, shape ids.shape + (D,).
    num_rows: rows in the table.

  Returns:
    (unique_ids int32[K], summed_grads [K, D]) with K = ids.size: the distinct ids in increasing
    order, each with the sum of its rows' gradients, then padding entries whose id is num_rows
    (out of range, so scatters with mode='drop' skip them) and whose gradient is 0. Ids outside
    [0, num_rows) are treated as padding too.
  """
  if row_grads.shape[:-1] != jnp.shape(ids):
    raise ValueError(f'row_grads {row_grads.shape} must be ids.shape {jnp.shape(ids)} + (D,)')
  flat_ids = jnp.reshape(ids, (-1,)).astype(jnp.int32)
  flat_grads = jnp.reshape(row_grads, (flat_ids.shape[0], row_grads.shape[-1]))
  valid = (flat_ids >= 0) & (flat_ids < num_rows)
  flat_ids = jnp.where(valid, flat_ids, num_rows)
  flat_grads = jnp.where(valid[:, None], flat_grads, jnp.zeros_like(flat_grads))
  size = flat_ids.shape[0]
  unique_ids, inverse = jnp.unique(flat_ids, return_inverse=True, size=size, fill_value=num_rows)
  summed_grads = jax.ops.segment_sum(flat_grads, jnp.reshape(inverse, (-1,)), num_segments=size)
  return unique_ids.astype(jnp.int32), summed_grads


class RowwiseOptimizer(NamedTuple):
  """Pure functions updating one embedding table on the rows a batch looked up.

  init(table) -> state
  update(table, state, unique_ids, summed_grads, rows=None) -> (new_table, new_state), with
  (unique_ids, summed_grads) from `dedup_rows`: ids must be distinct apart from padding ids
  >= num_rows, which are ignored. `rows`, when given, is `table[unique_ids]` as the forward pass
  already gathered it (padding rows may hold anything finite): the update then reads the table
  once per step instead of twice. Random row reads are most of a CPU step's embedding cost.
  """
  init: Callable[[jax.Array], Any]
  update: Callable[..., tuple[jax.Array, Any]]


def _gather_rows(x, ids):
  # Padding ids read the last row: the result is finite and is dropped on the write back.
  return jnp.take(x, ids, axis=0, mode='clip')


def _table_rows(table, ids, rows):
  return _gather_rows(table, ids) if rows is None else rows.astype(table.dtype)


def _set_rows(x, ids, rows):
  return x.at[ids].set(rows.astype(x.dtype), mode='drop')


def _apply_rate(rows, directions, learning_rate):
  # Same operations as optax.scale_by_learning_rate followed by optax.apply_updates.
  return rows + (-learning_rate) * directions


def _rowwise_from_dense(tx: optax.GradientTransformation) -> RowwiseOptimizer:
  """A dense transformation fed the full-table gradient: for optimizers that touch every row."""

  def update(table, state, unique_ids, summed_grads, rows=None):
    del rows  # every row moves: the update reads the whole table anyway
    full_grad = jnp.zeros_like(table).at[unique_ids].add(summed_grads, mode='drop')
    updates, state = tx.update(full_grad, state, table)
    return optax.apply_updates(table, updates), state

  return RowwiseOptimizer(tx.init, update)


def _rowwise_gradient_descent(learning_rate):

  def init(table):
    del table
    return optax.EmptyState()

  def update(table, state, unique_ids, summed_grads, rows=None):
    rows = _apply_rate(_table_rows(table, unique_ids, rows), summed_grads, learning_rate)
    return _set_rows(table, unique_ids, rows), state

  return RowwiseOptimizer(init, update)


class RowAdagradState(NamedTuple):
  accumulator: jax.Array  # like the table.


def _rowwise_adagrad(learning_rate, *, initial_accumulator_value=0.1):
  _check_adagrad_hparams(initial_accumulator_value)

  def init(table):
    return RowAdagradState(jnp.full_like(table, initial_accumulator_value))

  def update(table, state, unique_ids, summed_grads, rows=None):
    accumulator = _adagrad_accumulate(_gather_rows(state.accumulator, unique_ids), summed_grads)
    rows = _apply_rate(_table_rows(table, unique_ids, rows),
                       _adagrad_direction(accumulator, summed_grads), learning_rate)
    return (_set_rows(table, unique_ids, rows),
            RowAdagradState(_set_rows(state.accumulator, unique_ids, accumulator)))

  return RowwiseOptimizer(init, update)


class RowRowwiseAdagradState(NamedTuple):
  accumulator: jax.Array  # [N, 1]: one per row.


def _rowwise_rowwise_adagrad(learning_rate, *, initial_accumulator_value=0.0, epsilon=1e-8):
  _check_rowwise_adagrad_hparams(initial_accumulator_value, epsilon)

  def init(table):
    return RowRowwiseAdagradState(
        jnp.full((table.shape[0], 1), initial_accumulator_value, table.dtype))

  def update(table, state, unique_ids, summed_grads, rows=None):
    accumulator = (_gather_rows(state.accumulator, unique_ids)
                   + _row_mean_square(summed_grads))
    rows = _apply_rate(_table_rows(table, unique_ids, rows),
                       _eps_adagrad_direction(accumulator, summed_grads, epsilon), learning_rate)
    return (_set_rows(table, unique_ids, rows),
            RowRowwiseAdagradState(_set_rows(state.accumulator, unique_ids, accumulator)))

  return RowwiseOptimizer(init, update)


class RowAdagradDecayState(NamedTuple):
  count: jax.Array  # int32 scalar: updates applied to this table (DeepRec's global_step).
  accumulator: jax.Array  # like the table.
  decay_period: jax.Array  # int32 [N, 1]: the period each row's accumulator is decayed up to.


def _rowwise_adagrad_decay(learning_rate, *, initial_accumulator_value=0.1,
                           accumulator_decay_step=DECAY_STEP, accumulator_decay_rate=0.9,
                           decay_all_missed_periods=True):
  _check_adagrad_hparams(initial_accumulator_value)
  _check_decay_hparams(accumulator_decay_step, accumulator_decay_rate)
  decay_step = int(accumulator_decay_step)

  def init(table):
    return RowAdagradDecayState(
        count=jnp.zeros([], jnp.int32),
        accumulator=jnp.full_like(table, initial_accumulator_value),
        decay_period=jnp.zeros((table.shape[0], 1), jnp.int32))

  def update(table, state, unique_ids, summed_grads, rows=None):
    count = optax.safe_int32_increment(state.count)
    decay_period = _gather_rows(state.decay_period, unique_ids)
    num_decays = count // decay_step - decay_period
    if not decay_all_missed_periods:
      num_decays = jnp.minimum(num_decays, 1)
    accumulator = _decay_accumulator(_gather_rows(state.accumulator, unique_ids), num_decays,
                                     accumulator_decay_rate, initial_accumulator_value)
    accumulator = _adagrad_accumulate(accumulator, summed_grads)
    rows = _apply_rate(_table_rows(table, unique_ids, rows),
                       _adagrad_direction(accumulator, summed_grads), learning_rate)
    new_state = RowAdagradDecayState(
        count=count,
        accumulator=_set_rows(state.accumulator, unique_ids, accumulator),
        decay_period=_set_rows(state.decay_period, unique_ids, decay_period + num_decays))
    return _set_rows(table, unique_ids, rows), new_state

  return RowwiseOptimizer(init, update)


class RowAdamState(NamedTuple):
  count: jax.Array  # int32 scalar: updates applied to this table (the global step).
  mu: jax.Array  # like the table.
  nu: jax.Array  # like the table.


def _rowwise_lazy_adam(learning_rate, *, beta1=0.9, beta2=0.999, epsilon=1e-8):
  constants = _adam_constants(beta1, beta2, epsilon)

  def init(table):
    return RowAdamState(count=jnp.zeros([], jnp.int32), mu=jnp.zeros_like(table),
                        nu=jnp.zeros_like(table))

  def update(table, state, unique_ids, summed_grads, rows=None):
    count = optax.safe_int32_increment(state.count)
    mu = _first_moment(_gather_rows(state.mu, unique_ids), summed_grads, constants)
    nu = _second_moment(_gather_rows(state.nu, unique_ids), summed_grads, constants)
    directions = _tf_adam_direction(mu, nu, count, constants)
    rows = _apply_rate(_table_rows(table, unique_ids, rows), directions, learning_rate)
    new_state = RowAdamState(count=count, mu=_set_rows(state.mu, unique_ids, mu),
                             nu=_set_rows(state.nu, unique_ids, nu))
    return _set_rows(table, unique_ids, rows), new_state

  return RowwiseOptimizer(init, update)


def _rowwise_dense_adam(learning_rate, **hparams):
  return _rowwise_from_dense(_dense_adam(learning_rate, **hparams))


_ROWWISE_BUILDERS = {
    'adam': _rowwise_dense_adam,
    'adamasync': _rowwise_lazy_adam,
    'adagrad': _rowwise_adagrad,
    'adagraddecay': _rowwise_adagrad_decay,
    'gradientdescent': _rowwise_gradient_descent,
    'rowwise_adagrad': _rowwise_rowwise_adagrad,
}


def create_sparse(name: str, learning_rate: float, **hparams) -> RowwiseOptimizer:
  """The row-wise optimizer `name` for one embedding table; see the module docstring.

  Args:
    name: one of OPTIMIZER_NAMES.
    learning_rate: the step size.
    **hparams: as for `create`.

  Returns:
    A RowwiseOptimizer whose `update` is pure and jittable (donate the table and the state).
  """
  return _builder(_ROWWISE_BUILDERS, name)(learning_rate, **hparams)
