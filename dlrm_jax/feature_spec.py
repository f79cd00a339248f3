"""Feature specs: what a data set's columns are and how the model turns them into inputs.

A data set is a spec, not a branch in the code: the CSV reader, the planted-data generator, the
model and the sparse optimizer all read the same `FeatureSpec`. Two specs ship: the Ali ELM
(Ele.me) schema exactly as Alibaba DeepRec's DLRM parses it, and Criteo (Kaggle / 1TB).

Batch layout produced from a spec (all fixed shapes, so one jitted step serves every batch):
  label   float32 [B]
  dense   float32 [B, num_dense]
  ids     int32   [B, num_slots]   row inside the feature's own table
  weights float32 [B, num_slots]   pooling weight of each slot (1/count for list tokens, 1 for a
                                   present scalar, 0 for padding, missing or out-of-vocabulary)
Each sparse feature owns `max_len` consecutive slots (1 for a scalar), so mean pooling is a
weighted sum over a static slice.
"""

import dataclasses
import functools
from typing import Optional, Tuple

import numpy as np


@dataclasses.dataclass(frozen=True)
class Column:
  """One field of the input file, in file order.

  kind: 'int' (must parse as an integer), 'float', or 'str' (kept as written).
  default: the value an empty field takes, written as the reference's record default.
  """
  name: str
  kind: str
  default: str


@dataclasses.dataclass(frozen=True)
class Table:
  """An embedding table; several sparse features may share one."""
  name: str
  rows: int
  dim: int

  def __post_init__(self):
    # Ids are hashes modulo rows: 0 rows would divide by zero (numpy warns and gives 0). (A dim
    # of 0 stands for "any dim" in row_cache.parse_fingerprint; train.check_config checks it.)
    if self.rows < 1:
      raise ValueError(f'table {self.name!r} has {self.rows} rows: it needs at least one')


@dataclasses.dataclass(frozen=True)
class SparseFeature:
  """A categorical input looked up in `table`.

  Hashed (FarmHash Fingerprint64 mod table rows) unless `vocabulary` is given, in which case a
  value's index in the vocabulary is its row and values outside it are dropped.
  List features hold `list_separator`-separated values pooled by mean over at most `max_len`
  values (the first ones); scalars use one slot.
  """
  column: str
  table: str
  is_list: bool = False
  max_len: int = 1
  vocabulary: Optional[Tuple[str, ...]] = None


@dataclasses.dataclass(frozen=True)
class DenseFeature:
  """A numeric input: a scalar column, or the mean of a list column.

  transform: 'identity' (the ELM reference feeds raw values) or 'log1p' (Criteo: clamp negatives
  to 0, then log(x + 1), as the Facebook reference does).
  """
  column: str
  is_list: bool = False
  transform: str = 'identity'


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
  """Everything needed to parse a file and build the model's inputs."""
  name: str
  columns: Tuple[Column, ...]
  label: str
  delimiter: str
  list_separator: str
  tables: Tuple[Table, ...]
  sparse: Tuple[SparseFeature, ...]
  dense: Tuple[DenseFeature, ...]

  def __post_init__(self):
    names = [c.name for c in self.columns]
    if len(set(names)) != len(names):
      raise ValueError(f'spec {self.name}: duplicate column names')
    known = set(names)
    table_names = {t.name for t in self.tables}
    for f in self.sparse:
      if f.column not in known:
        raise ValueError(f'spec {self.name}: sparse feature on unknown column {f.column!r}')
      if f.table not in table_names:
        raise ValueError(f'spec {self.name}: feature {f.column!r} uses unknown table {f.table!r}')
      if f.vocabulary is not None and len(f.vocabulary) != self.table(f.table).rows:
        raise ValueError(f'spec {self.name}: vocabulary table {f.table!r} must have one row per '
                         'vocabulary value')
      if f.max_len < 1 or (not f.is_list and f.max_len != 1):
        raise ValueError(f'spec {self.name}: feature {f.column!r} has max_len {f.max_len}')
    for f in self.dense:
      if f.column not in known:
        raise ValueError(f'spec {self.name}: dense feature on unknown column {f.column!r}')
    if self.label and self.label not in known:
      raise ValueError(f'spec {self.name}: unknown label column {self.label!r}')
    if len({t.dim for t in self.tables}) != 1:
      raise ValueError(f'spec {self.name}: all tables need one embedding dim for the interaction')

  def unlabeled(self) -> 'FeatureSpec':
    """The spec of rows to score that lack the label column (Criteo's test.txt has none).

    Its `label` is '': the parser gives such rows label 0.
    """
    if not self.label:
      return self
    return dataclasses.replace(
        self, columns=tuple(c for c in self.columns if c.name != self.label), label='')

  def column_index(self, name: str) -> int:
    return [c.name for c in self.columns].index(name)

  def table(self, name: str) -> Table:
    return next(t for t in self.tables if t.name == name)

  def table_index(self, name: str) -> int:
    return [t.name for t in self.tables].index(name)

  @property
  def embedding_dim(self) -> int:
    return self.tables[0].dim

  @property
  def num_dense(self) -> int:
    return len(self.dense)

  @property
  def num_sparse(self) -> int:
    return len(self.sparse)

  @functools.cached_property
  def slot_starts(self) -> Tuple[int, ...]:
    """First slot of each sparse feature; the last entry is the total slot count."""
    return tuple(int(x) for x in np.cumsum([0] + [f.max_len for f in self.sparse]))

  @property
  def num_slots(self) -> int:
    return self.slot_starts[-1]

  @functools.cached_property
  def table_offsets(self) -> Tuple[int, ...]:
    """Row offset of each table inside the fused (emb_fusion) array."""
    return tuple(int(x) for x in np.cumsum([0] + [t.rows for t in self.tables])[:-1])

  @property
  def total_rows(self) -> int:
    return sum(t.rows for t in self.tables)

  @functools.cached_property
  def slot_table(self) -> np.ndarray:
    """Table index of every slot, int32 [num_slots]."""
    return np.concatenate([
        np.full(f.max_len, self.table_index(f.table), np.int32) for f in self.sparse])

  @functools.cached_property
  def slot_feature(self) -> np.ndarray:
    """Sparse-feature index of every slot, int32 [num_slots] (non-decreasing)."""
    return np.repeat(np.arange(self.num_sparse, dtype=np.int32),
                     [f.max_len for f in self.sparse])

  @functools.cached_property
  def slot_offsets(self) -> np.ndarray:
    """Fused-array row offset of every slot, int32 [num_slots]."""
    return np.asarray(self.table_offsets, np.int64)[self.slot_table].astype(np.int32)


# ----------------------------------------------------------------------------------------------
# Ali ELM (Ele.me), in the column order of DeepRec's tianchi/DLRM reader.

ELM_COLUMNS = (
    Column('clicked', 'int', '0'),
    Column('user_id', 'str', ''),
    Column('gender', 'int', '-99'),
    Column('visit_city', 'str', '0'),
    Column('avg_price', 'float', '0.0'),
    Column('is_supervip', 'int', '0'),
    Column('ctr_30', 'int', '0'),
    Column('ord_30', 'int', '0'),
    Column('total_amt_30', 'float', '0.0'),
    Column('shop_id', 'str', ''),
    Column('item_id', 'str', ''),
    Column('city_id', 'str', '0'),
    Column('district_id', 'str', '0'),
    Column('shop_aoi_id', 'str', ''),
    Column('shop_geohash_6', 'str', ''),
    Column('shop_geohash_12', 'str', ''),
    Column('brand_id', 'str', '0'),
    Column('category_1_id', 'str', '0'),
    Column('merge_standard_food_id', 'str', '0'),
    Column('rank_7', 'int', '0'),
    Column('rank_30', 'int', '0'),
    Column('rank_90', 'int', '0'),
    Column('shop_id_list', 'str', ''),
    Column('item_id_list', 'str', ''),
    Column('category_1_id_list', 'str', ''),
    Column('merge_standard_food_id_list', 'str', ''),
    Column('brand_id_list', 'str', ''),
    Column('price_list', 'str', '0'),
    Column('shop_aoi_id_list', 'str', ''),
    Column('shop_geohash6_list', 'str', ''),
    Column('timediff_list', 'str', '0'),
    Column('hours_list', 'str', '-0'),
    Column('time_type_list', 'str', ''),
    Column('weekdays_list', 'str', ''),
    Column('times', 'str', '0'),
    Column('hours', 'int', '0'),
    Column('time_type', 'str', ''),
    Column('weekdays', 'int', '0'),
    Column('geohash12', 'str', ''),
)

ELM_TIME_TYPES = ('lunch', 'night', 'dinner', 'tea', 'breakfast')

# (table, scalar column, list column or None): the reference's shared embeddings.
_ELM_SHARED = (
    ('shop_id', 'shop_id', 'shop_id_list'),
    ('item_id', 'item_id', 'item_id_list'),
    ('category_1_id', 'category_1_id', 'category_1_id_list'),
    ('merge_standard_food_id', 'merge_standard_food_id', 'merge_standard_food_id_list'),
    ('brand_id', 'brand_id', 'brand_id_list'),
    ('shop_aoi_id', 'shop_aoi_id', 'shop_aoi_id_list'),
    ('shop_geohash_6', 'shop_geohash_6', 'shop_geohash6_list'),
)
_ELM_LIST_COLUMNS = frozenset(
    [lst for _, _, lst in _ELM_SHARED] + ['timediff_list', 'time_type_list'])

ELM_DENSE = ('gender', 'avg_price', 'is_supervip', 'ctr_30', 'ord_30', 'total_amt_30', 'rank_7',
             'rank_30', 'rank_90', 'hours')


def elm_spec(hash_buckets: int = 100000, embedding_dim: int = 16,
             max_list_len: int = 50) -> FeatureSpec:
  """The ELM schema: 13 hashed tables + 2 vocabulary tables, 24 lookups, 12 dense inputs."""
  hashed = [t for t, _, _ in _ELM_SHARED] + [
      'shop_geohash_12', 'visit_city', 'user_id', 'district_id', 'times', 'timediff_list']
  tables = [Table(name, hash_buckets, embedding_dim) for name in hashed]
  tables += [Table('time_type', len(ELM_TIME_TYPES), embedding_dim),
             Table('time_type_list', len(ELM_TIME_TYPES), embedding_dim)]

  def hashed_feature(column, table):
    if column in _ELM_LIST_COLUMNS:
      return SparseFeature(column, table, is_list=True, max_len=max_list_len)
    return SparseFeature(column, table)

  sparse = []
  for table, scalar, lst in _ELM_SHARED:
    sparse += [hashed_feature(scalar, table), hashed_feature(lst, table)]
  sparse += [hashed_feature('shop_geohash_12', 'shop_geohash_12'),
             hashed_feature('geohash12', 'shop_geohash_12'),
             hashed_feature('visit_city', 'visit_city'),
             hashed_feature('city_id', 'visit_city')]
  for own in ('user_id', 'district_id', 'times', 'timediff_list'):
    sparse.append(hashed_feature(own, own))
  sparse += [SparseFeature('time_type', 'time_type', vocabulary=ELM_TIME_TYPES),
             SparseFeature('time_type_list', 'time_type_list', is_list=True,
                           max_len=max_list_len, vocabulary=ELM_TIME_TYPES)]

  dense = [DenseFeature(c) for c in ELM_DENSE]
  dense += [DenseFeature('price_list', is_list=True), DenseFeature('hours_list', is_list=True)]
  return FeatureSpec(name='elm', columns=ELM_COLUMNS, label='clicked', delimiter=',',
                     list_separator=';', tables=tuple(tables), sparse=tuple(sparse),
                     dense=tuple(dense))


# ----------------------------------------------------------------------------------------------
# Criteo: label, I1..I13 integers, C1..C26 8-hex-digit strings, tab separated, no header.

CRITEO_NUM_DENSE = 13
CRITEO_NUM_SPARSE = 26


def criteo_spec(table_rows, embedding_dim: int = 16, missing: str = ' ') -> FeatureSpec:
  """Criteo Kaggle / 1TB; `table_rows` is one int for all 26 tables, or a sequence of 26.

  `missing` is what an empty categorical field reads as: DeepRec's record default ' ' is hashed
  like any value, so a missing category learns a row of its own, as in the Facebook reference
  ('0') and TorchRec (0), and C19-C26 are often empty; '' drops it (a zero vector), as this
  project did before.
  """
  if isinstance(table_rows, int):
    table_rows = [table_rows] * CRITEO_NUM_SPARSE
  if len(table_rows) != CRITEO_NUM_SPARSE:
    raise ValueError(f'criteo needs {CRITEO_NUM_SPARSE} table sizes, got {len(table_rows)}')
  columns = [Column('label', 'int', '0')]
  columns += [Column(f'I{i}', 'int', '0') for i in range(1, CRITEO_NUM_DENSE + 1)]
  columns += [Column(f'C{i}', 'str', missing) for i in range(1, CRITEO_NUM_SPARSE + 1)]
  tables = tuple(Table(f'C{i + 1}', int(r), embedding_dim) for i, r in enumerate(table_rows))
  sparse = tuple(SparseFeature(f'C{i}', f'C{i}') for i in range(1, CRITEO_NUM_SPARSE + 1))
  dense = tuple(DenseFeature(f'I{i}', transform='log1p') for i in range(1, CRITEO_NUM_DENSE + 1))
  return FeatureSpec(name='criteo', columns=tuple(columns), label='label', delimiter='\t',
                     list_separator=';', tables=tables, sparse=sparse, dense=dense)


def spec_args(config) -> dict:
  """The config fields a spec is built from (`from_args`), as JSON values."""
  return {'feature_spec': config.feature_spec, 'hash_buckets': int(config.hash_buckets),
          'embedding_dim': int(config.embedding_dim), 'max_list_len': int(config.max_list_len),
          'criteo_table_rows': [int(r) for r in config.criteo_table_rows],
          'criteo_missing': str(config.criteo_missing)}


def from_args(feature_spec: str, hash_buckets: int, embedding_dim: int, max_list_len: int,
              criteo_table_rows=(), criteo_missing: str = '') -> FeatureSpec:
  """The spec named by `feature_spec` with these sizes (criteo_table_rows: () = hash_buckets).

  criteo_missing defaults to '' (empty fields dropped): what the records written before the
  field existed (a run's config.json, an export's spec.json) were trained with.
  """
  if feature_spec == 'elm':
    return elm_spec(hash_buckets, embedding_dim, max_list_len)
  if feature_spec == 'criteo':
    return criteo_spec(list(criteo_table_rows) or hash_buckets, embedding_dim, criteo_missing)
  raise ValueError(f"config.feature_spec={feature_spec!r}: expected 'elm' or 'criteo'")


def from_config(config) -> FeatureSpec:
  """Builds the spec named by `config.feature_spec` with the config's sizes."""
  return from_args(**spec_args(config))
