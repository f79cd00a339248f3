"""The DLRM model: embedding tables, pooling, bottom MLP, interaction, top MLP.

The embedding tables are plain arrays outside the Flax module, so that the fast path can take
gradients with respect to the looked-up rows only and update those rows in place
(`train.py`), while the dense path differentiates through the gather like any other parameter.
The modules and functions are pure functions of their inputs; `UniqueRows`, the host-side
(numpy) preparation of a batch's lookups, keeps capacities and scratch buffers between batches.

    dense [B, n] -> bottom MLP -> x [B, D]
    ids, weights [B, S] -> table rows [B, S, D] -> mean pooling -> e [B, F, D]
    interaction(x, e) -> top MLP -> logit [B]
"""

import functools
from typing import Any, Dict, Optional, Sequence, Tuple

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


# Table arrays are padded to a multiple of this many rows so that they split evenly over any
# model axis that divides 64, and a checkpoint restores onto any such mesh. Padding rows are
# never looked up.
ROW_MULTIPLE = 64


# Rows drawn at a time when initialising tables. It bounds the initialiser's temporaries (about 6
# block-sized float32 buffers: 3 MB at dim 16), which sit on top of the finished tables at the
# end of the draw; 8192 rows take the same time as 65536 (Criteo's 19M rows: ~4.5 s either way).
_INIT_BLOCK_ROWS = 1 << 13


def padded_rows(rows: int) -> int:
  """Rows of a table array as stored: `rows` rounded up to a multiple of ROW_MULTIPLE."""
  return _round_up(rows, ROW_MULTIPLE)


def unique_capacity(needed: int, headroom: float = 1.25, multiple: int = 1) -> int:
  """UniqueRows' capacity for `needed` rows or entries: with headroom, in eighth-octave steps
  (m * 2^k, 8 <= m < 16: at most 12.5% padding beyond the headroom), and a multiple of
  `multiple`, the data-axis devices that split the array (3 and 6 divide few such steps)."""
  wanted = max(256, int(needed * headroom))
  step = 1 << max(0, wanted.bit_length() - 4)
  return _round_up(_round_up(wanted, step), multiple)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def table_array_rows(spec: fs.FeatureSpec, emb_fusion: bool) -> Dict[str, int]:
  """Row count of each table array, padding included."""
  if emb_fusion:
    return {FUSED: padded_rows(spec.total_rows)}
  return {t.name: padded_rows(t.rows) for t in spec.tables}


def init_tables(rng: Array, spec: fs.FeatureSpec, emb_fusion: bool,
                dtype=jnp.float32) -> Tables:
  """Truncated normal rows with stddev 1/sqrt(dim), as the reference's embedding columns."""
  # All tables share dim and stddev: draw the fused array block by block into one buffer, so
  # that under jit the peak is about one copy of the tables (a whole-array draw keeps several
  # table-sized temporaries alive). Padding rows are zeroed; they are never looked up.
  stddev = 1.0 / np.sqrt(spec.embedding_dim)
  rows = padded_rows(spec.total_rows)
  block = min(rows, _INIT_BLOCK_ROWS)
  num_blocks = -(-rows // block)

  def draw(i, table):
    values = stddev * jax.random.truncated_normal(
        jax.random.fold_in(rng, i), -2.0, 2.0, (block, spec.embedding_dim), dtype)
    # The last block may start early to stay inside the array; rows it redraws stay valid.
    start = jnp.minimum(i * block, rows - block)
    return jax.lax.dynamic_update_slice(table, values, (start, 0))

  fused = jax.lax.fori_loop(0, num_blocks, draw, jnp.zeros((rows, spec.embedding_dim), dtype))
  fused = jnp.where(jax.lax.broadcasted_iota(jnp.int32, fused.shape, 0) < spec.total_rows,
                    fused, 0)
  return relayout_tables({FUSED: fused}, spec, emb_fusion)


def relayout_tables(tree, spec: fs.FeatureSpec, emb_fusion: bool):
  """`tree` (a train state, say) with every group of table arrays moved to the `emb_fusion`
  layout: the tables, and the row-wise or optax optimizer slots kept beside them.

  A group is a dict keyed by the other layout's table arrays. Row-shaped leaves are cut at the
  table offsets or concatenated; scalars (per-array step counts, equal across arrays) are copied.
  Padding rows are zero, as in fresh tables: they are never looked up.
  """
  source = set(table_array_rows(spec, not emb_fusion))

  def is_group(x):
    return isinstance(x, dict) and set(x) == source

  def pad_to(rows, leaf):
    return jnp.pad(leaf, [(0, rows - leaf.shape[0])] + [(0, 0)] * (leaf.ndim - 1))

  def fuse(group):
    def concatenate(*leaves):
      if leaves[0].ndim == 0:
        return leaves[0]
      cut = [leaf[:table.rows] for leaf, table in zip(leaves, spec.tables)]
      return pad_to(padded_rows(spec.total_rows), jnp.concatenate(cut))
    return {FUSED: jax.tree.map(concatenate, *[group[t.name] for t in spec.tables])}

  def split(group):
    def cut(table, start, leaf):
      if leaf.ndim == 0:
        return leaf
      return pad_to(padded_rows(table.rows), leaf[start:start + table.rows])
    return {t.name: jax.tree.map(functools.partial(cut, t, start), group[FUSED])
            for t, start in zip(spec.tables, spec.table_offsets)}

  convert = fuse if emb_fusion else split
  return jax.tree.map(lambda x: convert(x) if is_group(x) else x, tree, is_leaf=is_group)


def _pooling_layout(spec: fs.FeatureSpec):
  """Slots regrouped so that features of equal max_len sit together.

  Returns (slot order, [(first slot in that order, features, max_len)], feature order): pooling
  each group is then a reshape and a sum, and `feature order` puts the pooled features back in
  spec order.
  """
  lengths = np.asarray([f.max_len for f in spec.sparse])
  features = np.argsort(lengths, kind='stable')
  slot_order = np.concatenate([np.arange(spec.slot_starts[f], spec.slot_starts[f + 1])
                               for f in features])
  groups, start = [], 0
  for length in np.unique(lengths):
    count = int(np.sum(lengths == length))
    groups.append((start, count, int(length)))
    start += count * int(length)
  return slot_order, groups, np.argsort(features)


def _run_starts(sorted_ids: np.ndarray) -> np.ndarray:
  """Positions where a run of equal values begins in a sorted array."""
  is_first = np.empty(sorted_ids.size, bool)
  is_first[:1] = True
  np.not_equal(sorted_ids[1:], sorted_ids[:-1], out=is_first[1:])
  return np.flatnonzero(is_first)


def unique_inverse(ids: np.ndarray, row_scratch: Optional[np.ndarray] = None
                   ) -> Tuple[np.ndarray, np.ndarray]:
  """np.unique(ids, return_inverse=True) for non-negative int32 ids, as int32 arrays.

  With `row_scratch`, an int32 array with an entry for every id that can occur (its contents
  are overwritten and need not be initialised): the ids are sorted as they are, every distinct
  id's code is written to its entry, and each id reads its code back. No positions ride along
  with the sort and nothing is spread over runs: 0.45x the time of the path below for the
  ~52k live ids of an ELM batch of 512 or 4096.

  Without, one sort of int64 keys (id << 32 | position) replaces np.unique's argsort: NumPy
  sorts int64 with its vectorized (AVX-512) sort, several times faster than it argsorts, and the
  positions ride along in the low bits. Each id's code is spread over its run of the sorted keys
  by one np.repeat of the run lengths (a bool cumsum is a scalar loop in NumPy), and scattered
  back through the positions as int64 indices (int32 ones are converted first). 1.3-2x faster
  than np.unique for a batch's 10^4-10^5 ids.
  """
  n = ids.size
  if row_scratch is not None:
    sorted_ids = np.sort(ids)
    # take/put with intp indices: fancy indexing with int32 ones converts them element by
    # element, at about twice the cost.
    uniques = sorted_ids.take(_run_starts(sorted_ids))
    row_scratch.put(uniques, np.arange(uniques.size, dtype=np.int32))
    return uniques, row_scratch.take(ids.astype(np.intp))
  keys = ids.astype(np.int64) << 32
  keys |= np.arange(n, dtype=np.int64)
  keys.sort()
  sorted_ids = (keys >> 32).astype(np.int32)
  firsts = _run_starts(sorted_ids)
  keys &= 0xFFFFFFFF  # the positions
  codes = np.empty(n, np.int32)
  codes[keys] = np.repeat(np.arange(firsts.size, dtype=np.int32), np.diff(firsts, append=n))
  return sorted_ids[firsts], codes


# Rows of table arrays that UniqueRows dedups through a row-indexed scratch: 16 MiB at most.
SCRATCH_ROWS = 1 << 22


class UniqueRows:
  """Host-side preparation of a batch's lookups: dedup per table array, and the live entries.

  Runs on the input thread (numpy: `unique_inverse`), so the device neither sorts ids nor
  touches padding:
    unique_ids {array: int32 [capacity]}  each looked-up row once, padded with the out-of-range
                                          id `rows` (read clipped, weight 0, scatters dropped);
    entry_index int32 [entries]           for every live slot (weight != 0), its row in the
                                          concatenation of the arrays' unique lists;
    entry_weight f32 [entries]            its pooling weight;
    entry_segment int32 [entries]         b * F + feature, non-decreasing: the pooled output.
  The device gathers the unique rows once, and pools with one sorted segment sum over the live
  entries only (ELM: ~105 of 465 slots per row hold values). The gradient of the gathered unique
  rows is then already summed per row, which is what the row-wise optimizers take. Slots of
  weight 0 (padding, a missing scalar, out-of-vocabulary) are not looked up, as in the
  reference, so lazy optimizers do not move their rows.

  Capacities never shrink and are sized from the first batch with headroom, in coarse steps, so
  the jitted step sees a handful of shapes per run instead of one per batch.

  Table arrays dedup through a row-indexed scratch (`unique_inverse`, 4 bytes a row, kept for
  the reader's life) while their rows sum to at most `SCRATCH_ROWS`, the smallest arrays first:
  ELM's fused 1.3M rows take 5 MiB and halve the input thread's dedup. Larger arrays (DeepRec's
  Criteo tables, 19M rows: 73 MiB, more than that config's peak-memory target leaves) sort ids
  with their positions instead, which needs no memory per row.

  With several processes every process prepares its own rows: process p's unique lists and
  entries are block p of the global arrays, indices and segments point into those global arrays,
  and capacities are fixed at their worst case so that every process has the same shapes without
  a collective per batch. Ids repeated across processes are merged on device.

  Every capacity is a multiple of `data_devices`, the process's devices on the mesh's data axis,
  which split the unique and entry arrays (with several processes, each its own block).
  """

  def __init__(self, spec: fs.FeatureSpec, emb_fusion: bool, process_index: int = 0,
               process_count: int = 1, local_batch: int = 0, headroom: float = 1.25,
               data_devices: int = 1):
    self._spec = spec
    self._groups = table_groups(spec, emb_fusion)
    self._rows = table_array_rows(spec, emb_fusion)
    self._fused = emb_fusion
    if max(self._rows.values()) >= 2**31:
      raise ValueError(f'table arrays of {max(self._rows.values())} rows: row ids must fit int32')
    self._slot_group = np.zeros(spec.num_slots, np.int32)
    # int32 ids throughout: they pack with their positions into one int64 sort key.
    self._slot_offset = np.zeros(spec.num_slots, np.int32)
    for g, (slots, offsets) in enumerate(self._groups.values()):
      self._slot_group[slots] = g
      self._slot_offset[slots] = offsets
    # All slots of a feature read one table: per-feature views for compact batches.
    first_slots = np.asarray(spec.slot_starts[:-1])
    self._feature_group = self._slot_group[first_slots]
    self._feature_offset = self._slot_offset[first_slots]
    self._per_segment_cache = {}
    # float32(1 / c) for every slot count c: the parser's mean-pooling weight, looked up.
    max_count = max(f.max_len for f in spec.sparse)
    self._mean_weight = (1.0 / np.maximum(np.arange(max_count + 1), 1)).astype(np.float32)
    self._process_index, self._process_count = process_index, process_count
    self._headroom = headroom
    self._data_devices = data_devices
    self._scratch, scratch_rows = {}, 0
    for name in sorted(self._rows, key=self._rows.get):
      scratch_rows += self._rows[name]
      if scratch_rows > SCRATCH_ROWS:
        break
      self._scratch[name] = np.empty(self._rows[name], np.int32)
    self._fixed = process_count > 1
    if self._fixed:
      self._capacity = {name: _round_up(padded_rows(local_batch * len(slots) + 1), data_devices)
                        for name, (slots, _) in self._groups.items()}
      self._capacity['entries'] = _round_up(padded_rows(local_batch * spec.num_slots + 1),
                                            data_devices)
    else:
      self._capacity = {}

  def _capacity_for(self, name: str, needed: int) -> int:
    if needed > self._capacity.get(name, 0):
      if self._fixed:
        raise ValueError(f'{needed} {name} exceed the fixed capacity {self._capacity[name]}')
      self._capacity[name] = unique_capacity(needed, self._headroom, self._data_devices)
    return self._capacity[name]

  def _per_segment(self, num_segments: int):
    """(segment, row offset, array group) of each (row, feature) of a compact batch, as int32
    arrays; they depend on the batch size only, and are built once per size."""
    if num_segments not in self._per_segment_cache:
      rows = num_segments // self._spec.num_sparse
      self._per_segment_cache[num_segments] = (
          np.arange(num_segments, dtype=np.int32), np.tile(self._feature_offset, rows),
          np.tile(self._feature_group, rows))
    return self._per_segment_cache[num_segments]

  def _live_entries(self, batch: Dict[str, np.ndarray]):
    """(row * F + feature, weight, array row id, array group) of every live slot, in (row, slot)
    order, from a padded batch ('ids', 'weights' [B, num_slots]) or a compact one ('counts'
    [B, F], 'values': row_cache.compact_batch)."""
    num_features = self._spec.num_sparse
    if 'counts' in batch:
      counts = batch['counts'].reshape(-1)
      segments, offsets, groups = self._per_segment(counts.size)
      # Each (row, feature)'s values are contiguous, so every per-entry array is a per-segment
      # one repeated: no per-entry division or lookup.
      ids = np.repeat(offsets, counts)
      ids += batch['values']
      return (np.repeat(segments, counts), np.repeat(self._mean_weight[counts], counts), ids,
              None if self._fused else np.repeat(groups, counts))
    num_slots = batch['ids'].shape[1]
    # Flat positions of the live slots, row-major. A boolean flatnonzero is several times faster
    # than nonzero on the 2-D float array.
    flat_weights = batch['weights'].reshape(-1)
    live = np.flatnonzero(flat_weights != 0)
    rows, slots = np.divmod(live, num_slots)
    segment = rows * num_features + self._spec.slot_feature[slots]
    ids = batch['ids'].reshape(-1)[live].astype(np.int32, copy=False) + self._slot_offset[slots]
    return segment, flat_weights[live], ids, None if self._fused else self._slot_group[slots]

  def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, Any]:
    local_batch = batch['label'].shape[0]
    num_features = self._spec.num_sparse
    segment, weight, entry_ids, entry_groups = self._live_entries(batch)
    count = segment.size
    entries = self._capacity_for('entries', count + 1)
    p, n = self._process_index, self._process_count
    segment_base = p * local_batch * num_features

    entry_index = np.empty(entries, np.int32)
    entry_weight = np.zeros(entries, np.float32)
    entry_segment = np.empty(entries, np.int32)
    entry_weight[:count] = weight
    np.add(segment, segment_base, out=entry_segment[:count], casting='unsafe')
    entry_segment[count:] = segment_base + local_batch * num_features - 1

    unique_ids, base, padding_entry = {}, 0, None
    for g, name in enumerate(self._groups):
      mine = None if self._fused else np.flatnonzero(entry_groups == g)
      uniques, codes = unique_inverse(entry_ids if mine is None else entry_ids[mine],
                                      self._scratch.get(name))
      capacity = self._capacity_for(name, len(uniques) + 1)  # + 1: a row for the padding entries
      padded = np.full(capacity, self._rows[name], np.int32)
      padded[:len(uniques)] = uniques
      unique_ids[name] = padded
      start = base + p * capacity  # this process's block of the global unique list
      if mine is None:
        np.add(codes, start, out=entry_index[:count], casting='unsafe')
      else:
        entry_index[mine] = codes + start
      if padding_entry is None:
        padding_entry = start + len(uniques)
      base += n * capacity
    entry_index[count:] = padding_entry
    return {'label': batch['label'], 'dense': batch['dense'], 'mask': batch['mask'],
            'unique_ids': unique_ids, 'entry_index': entry_index,
            'entry_weight': entry_weight, 'entry_segment': entry_segment}


def take_rows(x: Array, index: Array, mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS) -> Array:
  """x[index] along the first axis, for non-negative indices.

  A plain lax.gather: jnp indexing would first wrap negative indices, and XLA:CPU recomputes
  that index arithmetic for every element of the fused gather. Its transpose is a scatter-add
  with the same mode.
  """
  dims = jax.lax.GatherDimensionNumbers(offset_dims=(1,), collapsed_slice_dims=(0,),
                                        start_index_map=(0,))
  return jax.lax.gather(x, index[:, None], dims, slice_sizes=(1,) + x.shape[1:], mode=mode)


def gather_unique_rows(tables: Tables, unique_ids: Dict[str, Array]) -> Dict[str, Array]:
  """Each table array's unique looked-up rows [capacity, D].

  Padding ids (the out-of-range id `rows`) read the clipped last row: only weight-0 entries
  point at them, and their updates are dropped on the scatter.
  """
  return {name: take_rows(tables[name], unique_ids[name], jax.lax.GatherScatterMode.CLIP)
          for name in unique_ids}


def embed(unique_rows: Dict[str, Array], batch: Dict[str, Array], spec: fs.FeatureSpec,
          emb_fusion: bool) -> Array:
  """Pooled embeddings [B, F, D]: a weighted sorted segment sum over the live entries.

  `unique_rows` are the table arrays' unique rows in `table_groups` order (UniqueRows' layout).
  """
  names = list(table_groups(spec, emb_fusion))
  rows = (unique_rows[names[0]] if len(names) == 1 else
          jnp.concatenate([unique_rows[name] for name in names], axis=0))
  # UniqueRows builds every index inside `rows`, so the gather (and its transpose, the scatter-add
  # of the backward pass) need no bounds checks or fill values.
  values = take_rows(rows, batch['entry_index']) * batch['entry_weight'][:, None]
  batch_size = batch['label'].shape[0]
  pooled = jax.ops.segment_sum(values, batch['entry_segment'],
                               num_segments=batch_size * spec.num_sparse,
                               indices_are_sorted=True)
  return pooled.reshape(batch_size, spec.num_sparse, rows.shape[-1])


def pool_slots(rows: Array, weights: Array, spec: fs.FeatureSpec) -> Array:
  """Pooled embeddings [B, F, D] from every slot's row [B, S, D] and weight [B, S].

  The serving path, which looks ids up directly; one reshape and sum per distinct list length.
  """
  slot_order, length_groups, feature_order = _pooling_layout(spec)
  weighted = rows[:, slot_order] * weights[:, slot_order][..., None].astype(rows.dtype)
  batch, dim = weighted.shape[0], weighted.shape[2]
  pooled = [weighted[:, start:start + count * length].reshape(batch, count, length, dim).sum(2)
            for start, count, length in length_groups]
  return jnp.concatenate(pooled, axis=1)[:, feature_order]


# ------------------------------------------------------------------------------------------------
# Dense part.

dense_init = nn.initializers.glorot_uniform()


def gather_transposes() -> bool:
  """Whether the bfloat16 backward dots take transposes built by a gather (on CPU).

  XLA:CPU multiplies bfloat16 matrices natively (YNNPACK, bf16 x bf16 -> f32, AVX-512 BF16
  where the CPU has it) only when both operands are plain row-major arrays. A transpose that it
  can see, it folds into the dot as a transposed operand, and that dot then runs on float32
  copies: the backward pass's g w^T and x^T g would lose the bf16 kernel. A gather through a
  permutation is a transpose that XLA does not fold. GPUs and TPUs take transposed operands
  natively.

  One device only: with the batch split over several, the SPMD partitioner cannot see that the
  gather is a transpose, and assembles each activation's transpose by an all-reduce of the
  whole global array (a plain transpose stays local to each device). Not where the CPU has no
  bfloat16 arithmetic either: the dots are float32 products there (`_bf16_dot`), which take a
  folded transpose at no cost, and the gathers only added work (the bf16 `cat` b512 step ran
  1.04x and 1.07x as fast without them on an AVX2 EPYC, `dot` level; 11 and 15 rounds).
  """
  return (jax.default_backend() == 'cpu' and jax.device_count() == 1
          and not _upcast_bf16_dots())


def row_major_transpose(a: Array) -> Array:
  """a.T [C, R] of a [R, C] matrix, as an array of its own (see `gather_transposes`)."""
  if not gather_transposes():
    return a.T
  rows, cols = a.shape
  # Element (i, j) of the transpose is element j * cols + i of `a` flattened. Built from iotas
  # (not a constant), so the program does not carry a [R * C] index table per shape.
  source = (jax.lax.broadcasted_iota(jnp.int32, (cols, rows), 0)
            + jax.lax.broadcasted_iota(jnp.int32, (cols, rows), 1) * cols)
  return take_rows(a.reshape(-1, 1), source.reshape(-1)).reshape(cols, rows)


def cpu_flags(path: str = '/proc/cpuinfo') -> Optional[frozenset]:
  """The first CPU's feature flags (Linux), or None where they cannot be read."""
  try:
    with open(path) as f:
      for line in f:
        if line.startswith('flags'):
          return frozenset(line.split(':', 1)[1].split())
  except OSError:
    pass
  return None


def emulates_bfloat16(flags: Optional[frozenset] = None) -> bool:
  """Whether the backend is a CPU without bfloat16 arithmetic (no AVX-512 BF16 or AMX)."""
  if jax.default_backend() != 'cpu':
    return False
  flags = cpu_flags() if flags is None else flags
  return flags is not None and not flags & {'avx512_bf16', 'amx_bf16'}


@functools.lru_cache(maxsize=None)
def _upcast_bf16_dots() -> bool:
  return emulates_bfloat16()


def _bf16_dot(a: Array, b: Array) -> Array:
  """a @ b of bfloat16 operands, accumulated in float32.

  Where the CPU has no bfloat16 arithmetic, XLA:CPU's bfloat16 product ran 1.3-1.6x slower than
  the float32 product of the operands converted first (ELM's layer shapes, timed alone on an
  AVX2 EPYC), which is the same product: a product of two bfloat16 values is exact in float32.
  """
  if _upcast_bf16_dots():
    return jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32))
  return jnp.dot(a, b, preferred_element_type=jnp.float32)


@jax.custom_vjp
def _bf16_matmul(x: Array, w: Array) -> Array:
  return _bf16_dot(x, w)


def _bf16_matmul_fwd(x, w):
  return _bf16_matmul(x, w), (x, w)


def _bf16_matmul_bwd(residuals, g):
  x, w = residuals
  g = g.astype(x.dtype)
  dx = _bf16_dot(g, row_major_transpose(w)).astype(x.dtype)
  dw = _bf16_dot(row_major_transpose(x), g).astype(w.dtype)
  return dx, dw


_bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)


def mixed_precision_dot_general(x, w, dimension_numbers, precision=None):
  """bfloat16 operands with float32 accumulation, forward and backward.

  Autodiff of `jnp.dot(..., preferred_element_type=float32)` would hand float32 cotangents to
  the backward dots and make them float32 products, so the backward pass is written out: the
  cotangent is rounded to bfloat16 and both backward dots take bfloat16 operands
  (`_bf16_matmul`). The product stays float32 until after the bias: a bfloat16 bias gradient is
  a batch reduction that XLA splits into slow pairwise windows to limit rounding.
  """
  del precision
  (contract_x, contract_w), _ = dimension_numbers
  if x.dtype != jnp.bfloat16 or x.ndim != 2 or contract_x != (1,) or contract_w != (0,):
    return jax.lax.dot_general(x, w, dimension_numbers)
  return _bf16_matmul(x, w)


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


@functools.lru_cache(maxsize=None)
def _pairwise_dots(n: int):
  """f [B, n, D] -> <f_i, f_j> for i > j, row-major [B, n(n-1)/2], with a written-out backward.

  The gradient of sum_p dz_p <f_i, f_j> is G f, with G symmetric, G_ij = G_ji = dz_p and a zero
  diagonal: one static gather and one batched matmul. Autodiff of the Gram matrix and its
  triangle gather would instead scatter dz into zeros and run two batched matmuls, about 3x the
  time of this on CPU.
  """
  rows, cols = np.tril_indices(n, k=-1)
  triangle = rows * n + cols
  symmetric = np.zeros((n, n), np.int32)  # 0 reads a zero; pair p reads dz[p - 1]
  symmetric[rows, cols] = symmetric[cols, rows] = np.arange(1, rows.size + 1)
  symmetric = symmetric.reshape(-1)

  @jax.custom_vjp
  def pairs(f):
    gram = jnp.einsum('bid,bjd->bij', f, f)
    return gram.reshape(f.shape[0], n * n)[:, triangle]

  def pairs_fwd(f):
    return pairs(f), f

  def pairs_bwd(f, dz):
    padded = jnp.concatenate([jnp.zeros_like(dz[:, :1]), dz], axis=1)
    g = padded[:, symmetric].reshape(dz.shape[0], n, n).astype(f.dtype)
    return (jnp.einsum('bij,bjd->bid', g, f),)

  pairs.defvjp(pairs_fwd, pairs_bwd)
  return pairs


def dot_interaction(x: Array, embeddings: Array) -> Array:
  """Pairwise dot products of [x, e_1..e_F], strict lower triangle, after x: [B, D + n(n-1)/2]."""
  # Under bf16 the products are taken in float32 and only the pairs are rounded to x's
  # bfloat16, as DeepRec's --bf16 computes its interaction: x comes back to float32 from the
  # bottom MLP and the embeddings never leave it.
  features = jnp.concatenate([x[:, None, :], embeddings], axis=1).astype(jnp.float32)
  pairs = _pairwise_dots(features.shape[1])(features)
  return jnp.concatenate([x, pairs.astype(x.dtype)], axis=1)


def cat_interaction(x: Array, embeddings: Array) -> Array:
  """[x, e_1, ..., e_F] flattened: [B, D + F * D]."""
  return jnp.concatenate([x, embeddings.reshape(embeddings.shape[0], -1).astype(x.dtype)], axis=1)


# A fixed normal, not Flax's truncated one: DCN-v2's kernels as TorchRec draws them
# (torch.nn.init.xavier_normal_, the MLPerf DLRMv2 reference's initialisation).
cross_init = nn.initializers.variance_scaling(1.0, 'fan_avg', 'normal')


class LowRankCrossNet(nn.Module):
  """DCN-v2's cross layers with low-rank kernels, the interaction of MLPerf's DLRMv2.

  x_{l+1} = x_0 * (W_l (V_l x_l) + b_l) + x_l, with V_l [N -> r] and W_l [r -> N]: the width N
  stays the input's, and each layer costs 2 N r multiply-adds per example instead of a full
  cross layer's N^2 (TorchRec's LowRankCrossNet). The running x stays float32 under bf16; only
  the two products take bfloat16 operands.
  """
  num_layers: int
  low_rank: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x0: Array) -> Array:
    x = x0
    for layer in range(self.num_layers):
      v = nn.Dense(self.low_rank, use_bias=False, dtype=self.dtype, kernel_init=cross_init,
                   dot_general=mixed_precision_dot_general, name=f'V_{layer}')(x)
      w = nn.Dense(x0.shape[-1], dtype=self.dtype, kernel_init=cross_init,
                   dot_general=mixed_precision_dot_general, name=f'W_{layer}')(v)
      x = x0 * w.astype(jnp.float32) + x
    return x


def dcn_interaction(x: Array, embeddings: Array, cross: LowRankCrossNet) -> Array:
  """`cross` over [x, e_1, ..., e_F] flattened, in float32: [B, D + F * D]."""
  flat = embeddings.reshape(embeddings.shape[0], -1)
  return cross(jnp.concatenate([x.astype(jnp.float32), flat.astype(jnp.float32)], axis=1))


INTERACTIONS = ('cat', 'dcn', 'dot')


class DLRM(nn.Module):
  """Dense features and pooled embeddings in, click logits out.

  The top MLP is chained (each layer feeds the next) as in the DLRM paper; DeepRec's script feeds
  every top layer the interaction output, so only its last layer reaches the logit.
  `dtype` is the compute dtype of the MLPs (bfloat16 under `bf16`); parameters stay float32. As
  DeepRec's --bf16 does, the embeddings enter the interaction in float32 (`dot` multiplies them
  in float32; `cat` rounds the concatenation for the top MLP) and the logit layer is float32.
  `dcn` is TorchRec's DLRM_DCN (MLPerf DLRMv2): the cross layers over `cat`'s concatenation,
  which need no common width of x and the embeddings (TorchRec's stacking does).
  """
  bottom_mlp: Sequence[int]
  top_mlp: Sequence[int]
  interaction_op: str = 'cat'
  batch_norm: bool = True
  dtype: Any = jnp.float32
  dcn_num_layers: int = 3     # interaction_op='dcn' only (MLPerf DLRMv2's sizes)
  dcn_low_rank_dim: int = 512

  @nn.compact
  def __call__(self, dense: Array, embeddings: Array, train: bool = False) -> Array:
    if self.interaction_op not in INTERACTIONS:
      raise ValueError(f'interaction_op={self.interaction_op!r}: expected one of '
                       f'{list(INTERACTIONS)}')
    if self.interaction_op == 'dot' and self.bottom_mlp[-1] != embeddings.shape[-1]:
      raise ValueError(f'dot interaction needs the bottom MLP to end at the embedding dim '
                       f'{embeddings.shape[-1]}, got {self.bottom_mlp[-1]}')
    x = MLP(self.bottom_mlp, self.batch_norm, self.dtype, name='bottom_mlp')(
        dense.astype(self.dtype), train)
    embeddings = embeddings.astype(jnp.float32)
    if self.interaction_op == 'dcn':
      cross = LowRankCrossNet(self.dcn_num_layers, self.dcn_low_rank_dim, self.dtype,
                              name='cross_net')
      z = dcn_interaction(x, embeddings, cross)
    elif self.interaction_op == 'dot':
      z = dot_interaction(x, embeddings)
    else:
      z = cat_interaction(x, embeddings)
    z = MLP(self.top_mlp, False, self.dtype, name='top_mlp')(z, train)
    logit = nn.Dense(1, dtype=jnp.float32, kernel_init=dense_init, name='logit')(z)
    return logit[:, 0]


def interaction_width(spec: fs.FeatureSpec, bottom_out: int, interaction_op: str) -> int:
  """Input width of the top MLP (ELM: 316 for dot, 400 for cat and dcn)."""
  if interaction_op == 'dot':
    n = spec.num_sparse + 1
    return bottom_out + n * (n - 1) // 2
  return bottom_out + spec.num_sparse * spec.embedding_dim
