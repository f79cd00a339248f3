"""Criteo as TorchRec preprocesses it: the .npy triples of its `npy_preproc_criteo.py`.

TorchRec's `BinaryCriteoUtils.tsv_to_npys` turns each Criteo TSV file (`day_0` .. `day_23`, or
Kaggle's `train.txt`) into three arrays beside each other:

  <name>_dense.npy   float32 [n, 13]  log(x - m + 2) of the integer features, m the file's least
                                      integer (empty fields read as 0)
  <name>_sparse.npy  int64   [n, 26]  each categorical's hex value as an integer (0 if empty), or,
                                      after `contiguous_preproc_criteo.py`, its contiguous id
  <name>_labels.npy  int32   [n, 1]   0 or 1 (-1 for Kaggle's unlabelled test.txt)

A run reads them as rows of the `criteo` spec when the files it names are the dense ones
(`--config.train_files='day_[0-9]_dense.npy,day_1[0-9]_dense.npy,day_2[0-2]_dense.npy'`); the
sparse and labels files are found beside each. The values are taken as TorchRec's own reader
(`InMemoryBinaryCriteoIterDataPipe` with `hashes`) takes them, so a model sees what TorchRec's
sees: the dense values as they are (transformed already: the TSV reader's log(max(x, 0) + 1) is
not applied again), and each categorical's row is its value modulo its table's rows (the TSV
reader hashes the hex string instead), 0 included: an empty field has a row of its own, as in
TorchRec. TorchRec's contiguous ids are read when their file bears the `_sparse.npy` name (a link
will do), since `contiguous_preproc_criteo.py` writes `_sparse_contig_freq.npy`.

Rows are numbered across the files as lines are in `input_pipeline` (process k of n reads the
rows i with i % n == k) and read from memory maps a chunk at a time, so memory follows the chunk
and not the file. A bad row (a label other than 0 or 1, a non-finite dense value, a negative id)
is a `DataError` naming the file, the row (counted from 0, as numpy indexes it) and the column,
or with `skip_bad_rows` is counted and left out, as a bad line of text is.
"""

import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from dlrm_jax import feature_spec as feature_spec_lib
from dlrm_jax import input_pipeline

Batch = Dict[str, np.ndarray]

DENSE_SUFFIX = '_dense.npy'
_COMPANIONS = ('_sparse.npy', '_labels.npy')


def is_npy_source(path: str) -> bool:
  """Whether `path` names the dense file of a TorchRec triple (and so the triple)."""
  return os.fspath(path).endswith(DENSE_SUFFIX)


def companion_paths(path: str) -> Tuple[str, str]:
  """The sparse and labels files of the triple whose dense file is `path`."""
  stem = os.fspath(path)[:-len(DENSE_SUFFIX)]
  return tuple(stem + suffix for suffix in _COMPANIONS)


def _load(path: str) -> np.ndarray:
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f'{path} is missing: TorchRec\'s npy_preproc_criteo.py writes <name>_dense.npy, '
        '<name>_sparse.npy and <name>_labels.npy together, and all three are read')
  try:
    return np.load(path, mmap_mode='r', allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise input_pipeline.DataError(f'{path}: not a readable .npy file ({e})', path) from e


def _check_spec(spec: feature_spec_lib.FeatureSpec, path: str) -> None:
  """The spec must be one the arrays can fill: one id per categorical, no list, no vocabulary."""
  scalars = all(not f.is_list and f.vocabulary is None for f in spec.sparse)
  if not scalars or any(f.is_list for f in spec.dense) or not spec.label:
    raise input_pipeline.DataError(
        f"{path}: TorchRec's .npy files hold labelled Criteo rows, one value per column; the "
        f"{spec.name!r} spec (lists, vocabularies or no label) cannot read them: set "
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


def identity(path: str) -> List[Dict[str, Any]]:
  """Size and modification time of the triple's other two files: a rewritten sparse or labels
  file makes a cache of the triple stale, as a rewritten dense file does."""
  out = []
  for name in companion_paths(path):
    st = os.stat(name)
    out.append({'path': os.path.abspath(name), 'size': st.st_size, 'mtime_ns': st.st_mtime_ns})
  return out


def _bad_rows(path: str, dense: np.ndarray, sparse: np.ndarray, labels: np.ndarray,
              rows: np.ndarray, spec: feature_spec_lib.FeatureSpec
              ) -> List[Tuple[int, str]]:
  """(row, message) of every bad row of a chunk, in row order; `rows` are the rows' numbers."""
  sparse_path, labels_path = companion_paths(path)
  problems = []
  bad_label = (labels != 0) & (labels != 1)
  for i in np.flatnonzero(bad_label).tolist():
    note = (' (TorchRec writes -1 for the rows of Kaggle\'s unlabelled test.txt)'
            if labels[i] == -1 else '')
    problems.append((i, f'{labels_path}: row {rows[i]}: column {spec.label!r}: label '
                        f'{labels[i]}, expected 0 or 1{note}'))
  for i, j in zip(*np.nonzero(~np.isfinite(dense))):
    problems.append((int(i), f'{path}: row {rows[i]}: column {spec.dense[j].column!r}: '
                             f'{dense[i, j]} is not a finite number'))
  for i, j in zip(*np.nonzero(sparse < 0)):
    problems.append((int(i), f'{sparse_path}: row {rows[i]}: column '
                             f'{spec.sparse[j].column!r}: negative id {sparse[i, j]}'))
  problems.sort(key=lambda p: p[0])
  return problems


def _chunk(path: str, arrays, index: slice, spec: feature_spec_lib.FeatureSpec,
           skip_bad_rows: bool, stats: Optional[input_pipeline.ParseStats]) -> Batch:
  """The rows `index` of one triple in the parsed batch layout (input_pipeline.parse_chunk's)."""
  dense, sparse, labels = (np.asarray(a[index]) for a in arrays)
  dense = dense.astype(np.float32)  # the batch's type: a larger value becomes inf, refused below
  rows = np.arange(index.start, index.stop, index.step)[:len(labels)]
  if stats is not None:
    stats.lines += len(labels)
  problems = _bad_rows(path, dense, sparse, labels, rows, spec)
  if problems:
    if not skip_bad_rows:
      first, message = problems[0]
      raise input_pipeline.DataError(message, path, int(rows[first]) + 1)
    bad = sorted({i for i, _ in problems})
    if stats is not None:
      stats.record_bad_rows(len(bad), [m for _, m in problems])
    keep = np.setdiff1d(np.arange(len(labels)), bad)
    dense, sparse, labels = dense[keep], sparse[keep], labels[keep]
  table_rows = np.array([spec.table(f.table).rows for f in spec.sparse], np.int64)
  # Every feature is a scalar (_check_spec): feature f fills slot f, always (0 is a value).
  ids = np.remainder(sparse.astype(np.int64), table_rows).astype(np.int32)
  weights = np.ones(ids.shape, np.float32)
  if stats is not None:
    stats.rows += len(labels)
  return {'label': labels.astype(np.float32), 'dense': dense, 'ids': ids,
          'weights': weights}


def row_chunks(files: Sequence[str], spec: feature_spec_lib.FeatureSpec, chunk_rows: int,
               skip_bad_rows: bool, stats: Optional[input_pipeline.ParseStats],
               process_index: int, process_count: int,
               line_ranges: Optional[Sequence[Optional[input_pipeline.LineRange]]] = None
               ) -> Iterator[Batch]:
  """input_pipeline.iter_row_chunks over triples: the same shares, ranges and statistics."""
  seen = 0  # rows of all processes before the current chunk, over all files
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
        yield _chunk(path, arrays, slice(first + offset, last, process_count), spec,
                     skip_bad_rows, stats)
    if stats is not None:
      stats.source_lines += max(0, stop - start)


def write_from_tsv(tsv_path: str, prefix: str) -> str:
  """Writes a Criteo TSV file as TorchRec's `tsv_to_npys` stores it, without TorchRec: the
  triple `<prefix>_{dense,sparse,labels}.npy`; returns the dense file's path. For tests and
  benchmarks: it holds the whole file in memory, as TorchRec's converter does."""
  with open(tsv_path, encoding='utf-8') as f:
    fields = [line.rstrip('\r\n').split('\t') for line in f]
  num_dense = feature_spec_lib.CRITEO_NUM_DENSE
  ints = np.array([[int(v or '0') for v in r[1:1 + num_dense]] for r in fields], np.int64)
  sparse = np.array([[int(v or '0', 16) for v in r[1 + num_dense:]] for r in fields], np.int64)
  labels = np.array([int(r[0] or '0') for r in fields], np.int32).reshape(-1, 1)
  # TorchRec shifts by the file's least integer so that the smallest value is log(2).
  dense = np.log(ints - ((ints.min() if ints.size else 0) - 2), dtype=np.float32)
  for suffix, array in zip((DENSE_SUFFIX,) + _COMPANIONS, (dense, sparse, labels)):
    np.save(prefix + suffix, array)
  return prefix + DENSE_SUFFIX

