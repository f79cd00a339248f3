"""Criteo as TorchRec preprocesses it: the .npy triples of its `npy_preproc_criteo.py`.

TorchRec's `BinaryCriteoUtils.tsv_to_npys` turns each Criteo TSV file (`day_0` .. `day_23`, or
Kaggle's `train.txt`) into three arrays beside each other:

  <name>_dense.npy   float32 [n, 13]  log(x - m + 2) of the integer features, m the file's least
                                      integer (empty fields read as 0)
  <name>_sparse.npy  int64   [n, 26]  each categorical's hex value as an integer (0 if empty), or,
                                      after `contiguous_preproc_criteo.py`, its contiguous id
                                      (int32 from older converters and `shuffle_preproc_criteo.py`)
  <name>_labels.npy  int32   [n, 1]   0 or 1 (-1 for Kaggle's unlabelled test.txt)

A run reads them as rows of the `criteo` spec when the files it names are the dense ones
(`--config.train_files='day_?_dense.npy,day_1?_dense.npy,day_2[0-2]_dense.npy'`); the
sparse and labels files are found beside each. The values are taken as TorchRec's own reader
(`InMemoryBinaryCriteoIterDataPipe` with `hashes`) takes them, so a model sees what TorchRec's
sees: the dense values as they are (transformed already: the TSV reader's log(max(x, 0) + 1) is
not applied again), and each categorical's row is its value modulo its table's rows (the TSV
reader hashes the hex string instead; a negative value, a hex value past 2^31 that an int32 file
wrapped, takes the non-negative remainder, as in TorchRec), 0 included: an empty field has a row
of its own, as in TorchRec, unless `criteo_missing=''` drops empty fields (0 then has weight 0).
TorchRec's contiguous ids are read when their file bears the `_sparse.npy` name (a link will do),
since `contiguous_preproc_criteo.py` writes `_sparse_contig_freq.npy`; they number values from 2
(1: the rare ones), so an empty field is no longer told apart and `criteo_missing=''` drops
nothing there. The files are read as they are: a gzip'd .npy is refused (decompress it), as is
any .npy named other than a dense file and MLPerf's multi-hot .npz (not read). A
triple whose first label is -1 (Kaggle's test set) is scored by mode=predict as unlabelled rows.
A run reads one kind (`check_one_encoding`), and mode=eval, mode=predict and a resume refuse
the other kind than the run trained on (train.input_kind_changes). An export of a run trained on
triples needs inputs encoded as the triples are (the export's serving recipe parses text).

What a triple's rows read as is versioned with the text parser (input_pipeline.PARSER_VERSION,
which row caches record). Rows are numbered across the files as lines are in `input_pipeline`
(process k of n reads the rows i with i % n == k) and read from memory maps a chunk at a time, so
memory follows the chunk and not the file. A bad row (a label other than 0 or 1, a non-finite
dense value) is a `DataError` naming the file at fault, the row and the column, in the text
reader's form `path:N: column 'name': ...` with N counted from 1 as lines are (the message also
gives numpy's 0-based index), or with `skip_bad_rows` is counted and left out, as a bad line is.
"""

import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from dlrm_jax import feature_spec as feature_spec_lib
from dlrm_jax import input_pipeline

Batch = Dict[str, np.ndarray]

DENSE_SUFFIX = '_dense.npy'
_COMPANIONS = ('_sparse.npy', '_labels.npy')


def is_npy_source(path: str) -> bool:
  """Whether `path` names the dense file of a TorchRec triple (and so the triple)."""
  return os.fspath(path).endswith(DENSE_SUFFIX)


def reads_as_triple(path: str) -> bool:
  """Whether the reader takes `path` as a triple (True) or as text (False); raises for another
  .npy file, which text parsing would turn into bad rows."""
  name = os.fspath(path)
  if is_npy_source(name):
    return True
  if name.endswith(('.npy', '.npy.gz', '.npz')):
    raise input_pipeline.DataError(
        f"{name}: TorchRec's .npy triples are read through their dense file, plain (not "
        "gzip'd): name the <name>_dense.npy files (the _sparse and _labels files beside them "
        "are found; MLPerf's multi-hot .npz files are not read)", name)
  return False


def check_one_encoding(paths: Sequence[str]) -> None:
  """Refuses triples and text files in one run: a model reads one encoding of the values (ids
  modulo the tables and TorchRec's dense transform, or hashed strings and log(x + 1))."""
  triples = [p for p in paths if reads_as_triple(p)]
  if triples and len(triples) < len(paths):
    text = [p for p in paths if not is_npy_source(p)]
    raise ValueError(
        f"TorchRec .npy triples ({', '.join(triples)}) and text files ({', '.join(text)}) in one "
        'run: the two encode the same values differently (ids modulo the tables against hashed '
        'strings, another dense transform): train and evaluate on one kind')


def companion_paths(path: str, must_exist: bool = False) -> Tuple[str, str]:
  """The sparse and labels files of the triple whose dense file is `path` (FileNotFoundError,
  saying why both are needed, for a missing one with `must_exist`)."""
  stem = os.fspath(path)[:-len(DENSE_SUFFIX)]
  paths = tuple(stem + suffix for suffix in _COMPANIONS)
  for name in paths if must_exist else ():
    _require(name)
  return paths


def _require(path: str) -> None:
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f'{path} is missing: TorchRec\'s npy_preproc_criteo.py writes <name>_dense.npy, '
        '<name>_sparse.npy and <name>_labels.npy together, and all three are read')


def _load(path: str) -> np.ndarray:
  _require(path)
  try:
    return np.load(path, mmap_mode='r', allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise input_pipeline.DataError(f'{path}: not a readable .npy file ({e})', path) from e


def _check_spec(spec: feature_spec_lib.FeatureSpec, path: str) -> None:
  """The spec must be one the arrays can fill: one id per categorical, no list, no vocabulary."""
  scalars = all(not f.is_list and f.vocabulary is None for f in spec.sparse)
  if not scalars or any(f.is_list for f in spec.dense):
    raise input_pipeline.DataError(
        f"{path}: TorchRec's .npy files hold Criteo rows, one value per column; the "
        f"{spec.name!r} spec (lists or vocabularies) cannot read them: set "
        "config.feature_spec='criteo'", path)


def open_arrays(path: str, spec: feature_spec_lib.FeatureSpec
                ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(dense, sparse, labels) of the triple named by its dense file, memory-mapped and checked
  against the spec: shapes, types and a common row count (labels flattened to [n])."""
  _check_spec(spec, path)
  sparse_path, labels_path = companion_paths(path)
  dense, sparse, labels = _load(path), _load(sparse_path), _load(labels_path)
  want = ((path, dense, len(spec.dense), 'floating', 'dense'),
          (sparse_path, sparse, len(spec.sparse), 'integer', 'sparse'))
  for name, array, columns, kind, what in want:
    dtype_ok = np.issubdtype(array.dtype, np.floating if kind == 'floating' else np.integer)
    if array.ndim != 2 or array.shape[1] != columns or not dtype_ok:
      raise input_pipeline.DataError(
          f'{name}: {array.dtype}{list(array.shape)}, expected {kind} [rows, {columns}] '
          f'({what} features of the {spec.name!r} spec)', name)
  if labels.ndim == 2 and labels.shape[1] == 1:
    labels = labels.reshape(-1)
  if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer)
                              or np.issubdtype(labels.dtype, np.floating)):
    raise input_pipeline.DataError(
        f'{labels_path}: {labels.dtype}{list(labels.shape)}, expected numbers [rows, 1]',
        labels_path)
  rows = {len(dense), len(sparse), len(labels)}
  if len(rows) != 1:
    raise input_pipeline.DataError(
        f'{path}: the triple disagrees on its row count: dense {len(dense)}, sparse '
        f'{len(sparse)}, labels {len(labels)}', path)
  return dense, sparse, labels


def count_rows(path: str) -> int:
  """Rows of the triple named by its dense file (a memory map reads only the header)."""
  dense = _load(path)
  if dense.ndim == 0:
    raise input_pipeline.DataError(f'{path}: a 0-d array, expected [rows, columns]', path)
  return len(dense)


def unlabelled(path: str) -> bool:
  """Whether the triple's rows are unlabelled: TorchRec gives Kaggle's test rows label -1."""
  labels = _load(companion_paths(path)[1])
  return labels.size > 0 and labels.reshape(-1)[0] == -1


def _problem(path: str, row: int, column: str, message: str) -> str:
  # The text reader's form, which row_cache.bad_rows_error reads the file, line and column from.
  return f'{path}:{row + 1}: column {column!r}: {message} (row {row} counted from 0)'


def _bad_rows(path: str, dense: np.ndarray, labels: Optional[np.ndarray], rows: np.ndarray,
              spec: feature_spec_lib.FeatureSpec) -> Tuple[np.ndarray, List[str]]:
  """(indices of a chunk's bad rows, messages for the first few of them)."""
  bad_label = (np.zeros(len(dense), bool) if labels is None
               else (labels != 0) & (labels != 1))
  bad_dense = ~np.isfinite(dense)
  bad = np.flatnonzero(bad_label | bad_dense.any(axis=1))
  messages = []
  for i in bad[:input_pipeline.MAX_BAD_ROW_EXAMPLES].tolist():
    if bad_label[i]:
      note = (" (TorchRec writes -1 for the rows of Kaggle's unlabelled test.txt)"
              if labels[i] == -1 else '')
      messages.append(_problem(companion_paths(path)[1], rows[i], spec.label,
                               f'label {labels[i]}, expected 0 or 1{note}'))
    else:
      j = int(np.flatnonzero(bad_dense[i])[0])
      messages.append(_problem(path, rows[i], spec.dense[j].column,
                               f'{dense[i, j]} in float32, not a finite number'))
  return bad, messages


def _table_rows(sparse: np.ndarray, rows: np.ndarray) -> np.ndarray:
  """Each value's row: its remainder modulo its table's rows, non-negative as TorchRec's (numpy
  takes the divisor's sign), in a type that holds every value of the file's."""
  if np.issubdtype(sparse.dtype, np.unsignedinteger):
    return np.remainder(sparse.astype(np.uint64), rows.astype(np.uint64)).astype(np.int32)
  return np.remainder(sparse.astype(np.int64), rows).astype(np.int32)


def _layout(spec: feature_spec_lib.FeatureSpec) -> Tuple[np.ndarray, List[int]]:
  """(each sparse feature's table rows, the features whose empty field is dropped)."""
  table_rows = np.array([spec.table(f.table).rows for f in spec.sparse], np.int64)
  dropped = [f for f, feature in enumerate(spec.sparse)
             if spec.columns[spec.column_index(feature.column)].default == '']
  return table_rows, dropped


def _chunk(path: str, arrays, index: slice, spec: feature_spec_lib.FeatureSpec, layout,
           skip_bad_rows: bool, stats: Optional[input_pipeline.ParseStats]) -> Batch:
  """The rows `index` of one triple in the parsed batch layout (input_pipeline.parse_chunk's);
  an unlabelled spec (spec.label '') gives every row label 0, as the text reader does."""
  dense, sparse, labels = (np.asarray(a[index]) for a in arrays)
  with np.errstate(over='ignore'):  # the batch's type: a larger value becomes inf, refused below
    dense = dense.astype(np.float32)
  rows = np.arange(index.start, index.stop, index.step)
  if stats is not None:
    stats.lines += len(labels)
  bad, messages = _bad_rows(path, dense, labels if spec.label else None, rows, spec)
  if len(bad):
    if not skip_bad_rows:
      at_fault, _, column = messages[0].partition(': column ')
      at_fault, _, line = at_fault.rpartition(':')
      raise input_pipeline.DataError(messages[0], at_fault, int(line), column.split("'")[1])
    if stats is not None:
      stats.record_bad_rows(len(bad), messages)
    keep = np.ones(len(labels), bool)
    keep[bad] = False
    dense, sparse, labels = dense[keep], sparse[keep], labels[keep]
  table_rows, dropped = layout
  # Every feature is a scalar (_check_spec): feature f fills slot f.
  ids = _table_rows(sparse, table_rows)
  weights = np.ones(ids.shape, np.float32)
  if dropped:  # criteo_missing='': an empty field (0) is dropped, as the text reader drops it
    weights[:, dropped] = sparse[:, dropped] != 0
    ids[:, dropped] *= sparse[:, dropped] != 0
  if stats is not None:
    stats.rows += len(labels)
  label = labels.astype(np.float32) if spec.label else np.zeros(len(labels), np.float32)
  return {'label': label, 'dense': dense, 'ids': ids, 'weights': weights}


def row_chunks(files: Sequence[str], spec: feature_spec_lib.FeatureSpec, chunk_rows: int,
               skip_bad_rows: bool, stats: Optional[input_pipeline.ParseStats],
               process_index: int, process_count: int,
               line_ranges: Optional[Sequence[Optional[input_pipeline.LineRange]]] = None
               ) -> Iterator[Batch]:
  """input_pipeline.iter_row_chunks over triples: the same shares, ranges and statistics."""
  seen = 0  # rows of all processes before the current chunk, over all files
  layout = _layout(spec)
  for i, path in enumerate(files):
    arrays = open_arrays(path, spec)
    total = len(arrays[2])
    start, stop = line_ranges[i] if line_ranges and line_ranges[i] else (0, None)
    stop = total if stop is None else min(stop, total)
    step = chunk_rows * process_count
    for first in range(start, stop, step):
      last = min(stop, first + step)
      offset = (process_index - seen) % process_count
      seen += last - first
      if first + offset < last:
        yield _chunk(path, arrays, slice(first + offset, last, process_count), spec, layout,
                     skip_bad_rows, stats)
    if stats is not None:
      stats.source_lines += max(0, stop - start)


def write_from_tsv(tsv_path: str, prefix: str) -> str:
  """Writes a Criteo TSV file as TorchRec's `tsv_to_npys` stores it, without TorchRec: the
  triple `<prefix>_{dense,sparse,labels}.npy`; returns the dense file's path. A line of 39
  fields (Kaggle's test.txt) has no label: it gets -1, as TorchRec gives it. For tests and
  benchmarks: it holds the whole file in memory, as TorchRec's converter does."""
  num_dense, num_sparse = feature_spec_lib.CRITEO_NUM_DENSE, feature_spec_lib.CRITEO_NUM_SPARSE
  with open(tsv_path, encoding='utf-8') as f:
    fields = [line.rstrip('\r\n').split('\t') for line in f]
  for number, row in enumerate(fields, 1):
    if len(row) not in (num_dense + num_sparse, 1 + num_dense + num_sparse):
      raise input_pipeline.DataError(f'{tsv_path}:{number}: {len(row)} fields, expected 40 (39 '
                                     'without the label)', tsv_path, number)
  fields = [r if len(r) == 1 + num_dense + num_sparse else ['-1'] + r for r in fields]
  ints = np.array([[int(v or '0') for v in r[1:1 + num_dense]] for r in fields],
                  np.int64).reshape(-1, num_dense)
  sparse = np.array([[int(v or '0', 16) for v in r[1 + num_dense:]] for r in fields],
                    np.int64).reshape(-1, num_sparse)
  labels = np.array([int(r[0] or '0') for r in fields], np.int32).reshape(-1, 1)
  # TorchRec shifts by the file's least integer so that the smallest value is log(2).
  dense = np.log(ints - ((ints.min() if ints.size else 0) - 2), dtype=np.float32)
  for suffix, array in zip((DENSE_SUFFIX,) + _COMPANIONS, (dense, sparse, labels)):
    np.save(prefix + suffix, array)
  return prefix + DENSE_SUFFIX
