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


def init_tables(rng: Array, spec: fs.FeatureSpec, emb_fusion: bool,
                dtype=jnp.float32) -> Tables:
  """Truncated normal rows with stddev 1/sqrt(dim), as the reference's embedding columns."""
  def init(key, rows):
    stddev = 1.0 / np.sqrt(spec.embedding_dim)
    return stddev * jax.random.truncated_normal(key, -2.0, 2.0, (rows, spec.embedding_dim), dtype)

  keys = jax.random.split(rng, len(spec.tables))
  per_table = {t.name: init(k, t.rows) for k, t in zip(keys, spec.tables)}
  if emb_fusion:
    return {FUSED: jnp.concatenate([per_table[t.name] for t in spec.tables], axis=0)}
  return per_table


def global_ids(ids: Array, spec: fs.FeatureSpec, emb_fusion: bool) -> Dict[str, Array]:
  """Row ids into each table array, per group: [B, slots of that group]."""
  return {name: ids[:, slots] + offsets
          for name, (slots, offsets) in table_groups(spec, emb_fusion).items()}


def gather_rows(tables: Tables, ids: Array, spec: fs.FeatureSpec, emb_fusion: bool) -> Array:
  """Looks up every slot: [B, S] ids -> [B, S, D] rows, in slot order."""
  groups = table_groups(spec, emb_fusion)
  if emb_fusion:
    return jnp.take(tables[FUSED], ids + spec.slot_offsets, axis=0)
  parts, order = [], []
  for name, (slots, _) in groups.items():
    parts.append(jnp.take(tables[name], ids[:, slots], axis=0))
    order.append(slots)
  rows = jnp.concatenate(parts, axis=1)
  inverse = np.argsort(np.concatenate(order))
  return rows[:, inverse]


def pool(rows: Array, weights: Array, spec: fs.FeatureSpec) -> Array:
  """Weighted sum of each feature's slots: [B, S, D] -> [B, F, D] (mean pooling for lists)."""
  weighted = rows * weights[..., None].astype(rows.dtype)
  starts = spec.slot_starts
  pooled = [weighted[:, a:b].sum(axis=1) for a, b in zip(starts[:-1], starts[1:])]
  return jnp.stack(pooled, axis=1)


# ------------------------------------------------------------------------------------------------
# Dense part.

dense_init = nn.initializers.glorot_uniform()


class MLP(nn.Module):
  """Dense + ReLU layers, each optionally followed by batch norm (the reference's bottom MLP)."""
  features: Sequence[int]
  batch_norm: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    for width in self.features:
      x = nn.Dense(width, dtype=self.dtype, kernel_init=dense_init)(x)
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
    logit = nn.Dense(1, dtype=self.dtype, kernel_init=dense_init, name='logit')(z)
    return logit[:, 0].astype(jnp.float32)


def interaction_width(spec: fs.FeatureSpec, bottom_out: int, interaction_op: str) -> int:
  """Input width of the top MLP (ELM: 316 for dot, 400 for cat)."""
  if interaction_op == 'dot':
    n = spec.num_sparse + 1
    return bottom_out + n * (n - 1) // 2
  return bottom_out + spec.num_sparse * spec.embedding_dim
