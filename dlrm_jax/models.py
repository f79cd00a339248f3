"""The DLRM model: embedding tables, pooling, bottom MLP, interaction, top MLP.

The embedding tables are plain arrays outside the Flax module, so that the fast path can take
gradients with respect to the looked-up rows only and update those rows in place
(`train.py`), while the dense path differentiates through the gather like any other parameter.
Everything here is a pure function of its inputs.

    dense [B, n] -> bottom MLP -> x [B, D]
    ids, weights [B, S] -> table rows [B, S, D] -> mean pooling -> e [B, F, D]
    interaction(x, e) -> top MLP -> logit [B]
"""

from typing import Any, Dict, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from dlrm_jax import feature_spec as fs

Array = jax.Array
Tables = Dict[str, Array]

FUSED = 'fused'


# ------------------------------------------------------------------------------------------------
# Embedding tables.

def table_groups(spec: fs.FeatureSpec, emb_fusion: bool) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
  """Maps each table array to (its slots, the row offset of each of those slots).

  With `emb_fusion` all tables live in one array ('fused') and every slot reads it at its table's
  offset: one gather and one scatter for the whole batch. Without it each table is its own array
  and reads only the slots of the features that use it.
  """
  if emb_fusion:
    return {FUSED: (np.arange(spec.num_slots), spec.slot_offsets)}
  groups = {}
  for t, table in enumerate(spec.tables):
    slots = np.flatnonzero(spec.slot_table == t)
    groups[table.name] = (slots, np.zeros(slots.size, np.int32))
  return groups


# Table arrays are padded to a multiple of this many rows so that they split evenly over any
# model axis of up to 64 devices, and a checkpoint restores onto any such mesh. Padding rows are
# never looked up.
ROW_MULTIPLE = 64


def padded_rows(rows: int) -> int:
  """Rows of a table array as stored: `rows` rounded up to a multiple of ROW_MULTIPLE."""
  return -(-rows // ROW_MULTIPLE) * ROW_MULTIPLE


def table_array_rows(spec: fs.FeatureSpec, emb_fusion: bool) -> Dict[str, int]:
  """Row count of each table array, padding included."""
  if emb_fusion:
    return {FUSED: padded_rows(spec.total_rows)}
  return {t.name: padded_rows(t.rows) for t in spec.tables}


def init_tables(rng: Array, spec: fs.FeatureSpec, emb_fusion: bool,
                dtype=jnp.float32) -> Tables:
  """Truncated normal rows with stddev 1/sqrt(dim), as the reference's embedding columns."""
  def init(key, rows):
    stddev = 1.0 / np.sqrt(spec.embedding_dim)
    return stddev * jax.random.truncated_normal(key, -2.0, 2.0, (rows, spec.embedding_dim), dtype)

  def pad(table, rows):
    return jnp.pad(table, ((0, rows - table.shape[0]), (0, 0)))

  keys = jax.random.split(rng, len(spec.tables))
  per_table = {t.name: init(k, t.rows) for k, t in zip(keys, spec.tables)}
  sizes = table_array_rows(spec, emb_fusion)
  if emb_fusion:
    fused = jnp.concatenate([per_table[t.name] for t in spec.tables], axis=0)
    return {FUSED: pad(fused, sizes[FUSED])}
  return {name: pad(table, sizes[name]) for name, table in per_table.items()}


class UniqueRows:
  """Host-side dedup of the rows a batch looks up, per table array.

  Runs on the input thread (numpy, hash-based factorize), so the device never sorts ids: it
  gathers each unique row once (`unique_ids`, padded to a capacity with the out-of-range id
  `rows`, which reads as a zero row) and expands them to slots through `inverse` [B, S]. The
  gradient of the gathered unique rows is then already summed per row, which is what the
  row-wise optimizers take. Slots with weight 0 (padding, a missing scalar, out-of-vocabulary)
  point at a padding entry: they are not looked up, as in the reference, so lazy optimizers do
  not move them.

  Capacities are rounded up to powers of two and never shrink, so the jitted step sees a handful
  of shapes over a run instead of one per batch.

  With several processes every process dedups its own rows: the unique lists are concatenated
  across processes (process p's list is block p of the global array), `inverse` points into the
  global array, and the capacity is fixed at its worst case so every process has the same
  shapes without a collective per batch. Ids repeated across processes are merged on device.
  """

  def __init__(self, spec: fs.FeatureSpec, emb_fusion: bool, min_capacity: int = 256,
               process_index: int = 0, process_count: int = 1, local_batch: int = 0):
    self._groups = table_groups(spec, emb_fusion)
    self._rows = table_array_rows(spec, emb_fusion)
    self._process_index = process_index
    if process_count > 1:
      self._capacity = {name: padded_rows(local_batch * len(slots) + 1)
                        for name, (slots, _) in self._groups.items()}
    else:
      self._capacity = {name: min_capacity for name in self._groups}
    self._fixed = process_count > 1

  def _capacity_for(self, name: str, needed: int) -> int:
    if needed > self._capacity[name]:
      if self._fixed:
        raise ValueError(f'{needed} unique rows exceed the fixed capacity {self._capacity[name]}')
      self._capacity[name] = 1 << (needed - 1).bit_length()
    return self._capacity[name]

  def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, Any]:
    ids, live = batch['ids'], batch['weights'] != 0
    inverse = np.empty(ids.shape, np.int32)
    unique_ids = {}
    for name, (slots, offsets) in self._groups.items():
      group_ids = ids[:, slots].astype(np.int64) + offsets
      group_live = live[:, slots]
      codes, uniques = pd.factorize(group_ids[group_live], sort=False)
      num_unique = len(uniques)
      capacity = self._capacity_for(name, num_unique + 1)  # + 1: the padding entry
      padded = np.full(capacity, self._rows[name], np.int32)
      padded[:num_unique] = uniques
      group_inverse = np.full(group_ids.shape, num_unique, np.int32)
      group_inverse[group_live] = codes
      inverse[:, slots] = group_inverse + self._process_index * capacity
      unique_ids[name] = padded
    return {**batch, 'unique_ids': unique_ids, 'inverse': inverse}


def gather_unique_rows(tables: Tables, unique_ids: Dict[str, Array]) -> Dict[str, Array]:
  """Each table array's unique looked-up rows [capacity, D]; padding ids read as zeros."""
  return {name: jnp.take(tables[name], unique_ids[name], axis=0, mode='fill', fill_value=0)
          for name in unique_ids}


def expand_rows(unique_rows: Dict[str, Array], inverse: Array, spec: fs.FeatureSpec,
                emb_fusion: bool) -> Array:
  """The row of every slot, [B, S, D] in slot order, from the unique rows of each array."""
  if emb_fusion:
    return jnp.take(unique_rows[FUSED], inverse, axis=0)
  parts, order = [], []
  for name, (slots, _) in table_groups(spec, emb_fusion).items():
    parts.append(jnp.take(unique_rows[name], inverse[:, slots], axis=0))
    order.append(slots)
  rows = jnp.concatenate(parts, axis=1)
  return rows[:, np.argsort(np.concatenate(order))]


def pool(rows: Array, weights: Array, spec: fs.FeatureSpec) -> Array:
  """Weighted sum of each feature's slots: [B, S, D] -> [B, F, D] (mean pooling for lists).

  One sorted segment sum over the slot axis: its gradient is a single gather, where per-feature
  slices would each pad a full [B, S, D] gradient in the backward pass.
  """
  weighted = rows * weights[..., None].astype(rows.dtype)
  pooled = jax.ops.segment_sum(jnp.swapaxes(weighted, 0, 1), spec.slot_feature,
                               num_segments=spec.num_sparse, indices_are_sorted=True)
  return jnp.swapaxes(pooled, 0, 1)


# ------------------------------------------------------------------------------------------------
# Dense part.

dense_init = nn.initializers.glorot_uniform()


@jax.custom_vjp
def _low_precision_matmul(x: Array, w: Array) -> Array:
  return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def _low_precision_matmul_fwd(x, w):
  return _low_precision_matmul(x, w), (x, w)


def _low_precision_matmul_bwd(residuals, g):
  x, w = residuals
  g = g.astype(x.dtype)
  # The fast path also wants plain (non-transposed) operands; left alone, XLA folds these
  # transposes into the dots and then upcasts them to float32. The barrier keeps the (cheap)
  # bfloat16 transposes as real copies.
  w_t, x_t = jax.lax.optimization_barrier((w.T, x.T))
  dx = jnp.dot(g, w_t, preferred_element_type=jnp.float32).astype(x.dtype)
  dw = jnp.dot(x_t, g, preferred_element_type=jnp.float32).astype(w.dtype)
  return dx, dw


_low_precision_matmul.defvjp(_low_precision_matmul_fwd, _low_precision_matmul_bwd)


def mixed_precision_dot_general(x, w, dimension_numbers, precision=None):
  """bfloat16 operands with float32 accumulation, forward and backward.

  XLA:CPU only takes its fast bfloat16 path (AVX-512 BF16 dot products, about 2x float32 here)
  when a bfloat16 product asks for a float32 result; a bfloat16 -> bfloat16 dot is upcast and
  runs at float32 speed. Autodiff of that form would hand float32 cotangents to the backward
  dots, so the backward pass is written out to keep bfloat16 operands there too.
  """
  del precision
  (contract_x, contract_w), _ = dimension_numbers
  if x.dtype != jnp.bfloat16 or x.ndim != 2 or contract_x != (1,) or contract_w != (0,):
    return jax.lax.dot_general(x, w, dimension_numbers)
  return _low_precision_matmul(x, w)


class MLP(nn.Module):
  """Dense + ReLU layers, each optionally followed by batch norm (the reference's bottom MLP)."""
  features: Sequence[int]
  batch_norm: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    for width in self.features:
      x = nn.Dense(width, dtype=self.dtype, kernel_init=dense_init,
                   dot_general=mixed_precision_dot_general)(x)
      x = nn.relu(x)
      if self.batch_norm:
        # TF's tf.layers.batch_normalization defaults: momentum 0.99, epsilon 1e-3.
        x = nn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=1e-3,
                         dtype=self.dtype)(x)
    return x


def dot_interaction(x: Array, embeddings: Array) -> Array:
  """Pairwise dot products of [x, e_1..e_F], strict lower triangle, after x: [B, D + n(n-1)/2]."""
  features = jnp.concatenate([x[:, None, :], embeddings], axis=1)
  n = features.shape[1]
  gram = jnp.einsum('bid,bjd->bij', features, features)
  rows, cols = np.tril_indices(n, k=-1)
  return jnp.concatenate([x, gram[:, rows, cols]], axis=1)


def cat_interaction(x: Array, embeddings: Array) -> Array:
  """[x, e_1, ..., e_F] flattened: [B, D + F * D]."""
  return jnp.concatenate([x, embeddings.reshape(embeddings.shape[0], -1)], axis=1)


INTERACTIONS = {'dot': dot_interaction, 'cat': cat_interaction}


class DLRM(nn.Module):
  """Dense features and pooled embeddings in, click logits out.

  The top MLP is chained (each layer feeds the next) as in the DLRM paper; DeepRec's script feeds
  every top layer the interaction output, so only its last layer reaches the logit.
  `dtype` is the compute dtype (bfloat16 under `bf16`); parameters stay float32 and the logit is
  returned in float32 so the loss is computed in full precision.
  """
  bottom_mlp: Sequence[int]
  top_mlp: Sequence[int]
  interaction_op: str = 'cat'
  batch_norm: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, dense: Array, embeddings: Array, train: bool = False) -> Array:
    if self.interaction_op not in INTERACTIONS:
      raise ValueError(f'interaction_op={self.interaction_op!r}: expected one of '
                       f'{sorted(INTERACTIONS)}')
    if self.interaction_op == 'dot' and self.bottom_mlp[-1] != embeddings.shape[-1]:
      raise ValueError(f'dot interaction needs the bottom MLP to end at the embedding dim '
                       f'{embeddings.shape[-1]}, got {self.bottom_mlp[-1]}')
    x = MLP(self.bottom_mlp, self.batch_norm, self.dtype, name='bottom_mlp')(
        dense.astype(self.dtype), train)
    z = INTERACTIONS[self.interaction_op](x, embeddings.astype(self.dtype))
    z = MLP(self.top_mlp, False, self.dtype, name='top_mlp')(z, train)
    logit = nn.Dense(1, dtype=self.dtype, kernel_init=dense_init,
                     dot_general=mixed_precision_dot_general, name='logit')(z)
    return logit[:, 0].astype(jnp.float32)


def interaction_width(spec: fs.FeatureSpec, bottom_out: int, interaction_op: str) -> int:
  """Input width of the top MLP (ELM: 316 for dot, 400 for cat)."""
  if interaction_op == 'dot':
    n = spec.num_sparse + 1
    return bottom_out + n * (n - 1) // 2
  return bottom_out + spec.num_sparse * spec.embedding_dim
