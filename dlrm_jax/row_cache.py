"""A binary cache of parsed rows: CSV is parsed once, later epochs and runs read the cache.

Layout. One cache directory per (source file, line range, feature spec, process share), holding
the rows exactly as `input_pipeline.parse_chunk` produced them, in a compact columnar form:

  label.npy    uint8   [n]             the 0/1 label
  dense.npy    float32 [n, num_dense]  dense inputs, transforms applied (bit-identical)
  counts.npy   uint8   [n, num_sparse] slots each sparse feature fills (uint16 if max_len > 255)
  ids.npy      int32   [sum(counts)]   the filled slots' table rows, row after row, feature after
                                       feature (the padding slots are not stored)
  offsets.npy  int64   [n + 1]         where each row's ids start in ids.npy
  manifest.json                        what produced it (see below); written last

Weights are not stored: every filled slot of a feature with c filled slots has weight
float32(1 / c) (1 for a present scalar), padding has id 0 and weight 0, so `expand` rebuilds the
padded batch layout bit for bit. This is 3-15x smaller than the padded layout (ELM with
max_list_len 50 pads every row to 465 slots; planted rows fill ~105-180 of them on average).

The files are plain .npy (np.load(..., mmap_mode='r') works), but the reader fetches blocks with
positional reads instead of a memory map, so resident memory stays the size of one shuffle window
whatever the cache's size (mapped pages would count as the process's own).

Validity. manifest.json records the source (absolute path, size, mtime, line range), the share
(process k of n), the parse fingerprint of the spec (tables' rows, hashing, vocabularies,
max_len, transforms: everything but embedding_dim), the parser and cache format versions, the
row and id counts and the parse statistics. A cache is used only if all of them match and every
array file has its recorded size; otherwise it is rebuilt. A build writes into
`<name>.tmp-<host>-<pid>` and renames it into place only when complete (manifest last), under a
file lock, so a failed or killed build never leaves a cache that is used, and a stale cache is
replaced only once its successor is complete. After its first chunk a build estimates the
cache's size and stops at once if the disk cannot hold it.

Bad rows. A build leaves bad rows out and records them (count and first messages) whatever
`skip_bad_rows` says; opening the cache with skip_bad_rows=False then raises a DataError naming
the first bad row's file, line and column. So a bad row deep in a big file costs one parse, not
two: the rerun with skip_bad_rows=True uses the cache as it is. (Over 100 bad rows that are also
over 1% of the lines read, as another format gives, stop a strict build at once, without a
cache.)

Reading. `RowReader` serves a process's rows in batches: the rows are cut into blocks of
`block_rows`; each epoch visits the blocks in a seeded random order, a window of
shuffle_buffer / block_rows blocks at a time, and shuffles the rows of each window. An epoch's
order is a function of (seed, process, epoch) only, so a resumed run continues the same order
(`first_batch` skips batches without reading them).
"""

import dataclasses
import errno
import fcntl
import functools
import hashlib
import itertools
import json
import math
import os
import shutil
import socket
import time
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

from absl import logging
import numpy as np

from dlrm_jax import feature_spec as feature_spec_lib
from dlrm_jax import input_pipeline
from dlrm_jax import metrics
from dlrm_jax import torchrec_npy

Batch = Dict[str, np.ndarray]

# Bump when the layout of the cache files changes.
CACHE_FORMAT = 1

_HEADER_BYTES = 128  # fixed .npy header size, so data can be streamed before the shape is known
_ARRAYS = ('label', 'dense', 'counts', 'ids', 'offsets')


# ------------------------------------------------------------------------------------------------
# The compact row layout and its exact inverse.

@dataclasses.dataclass
class Rows:
  """Rows in the cache's compact layout (see the module docstring)."""
  label: np.ndarray   # uint8 [n]
  dense: np.ndarray   # float32 [n, num_dense]
  counts: np.ndarray  # uint8 / uint16 [n, num_sparse]
  ids: np.ndarray     # int32 [counts.sum()]

  def __len__(self) -> int:
    return len(self.label)


def counts_dtype(spec: feature_spec_lib.FeatureSpec) -> np.dtype:
  longest = max(f.max_len for f in spec.sparse)
  return np.dtype('<u1' if longest <= 0xff else '<u2' if longest <= 0xffff else '<u4')


def compact(batch: Batch, spec: feature_spec_lib.FeatureSpec) -> Rows:
  """Parsed rows (parse_chunk's layout) -> compact rows; `expand` inverts it exactly."""
  weights = batch['weights']
  filled = weights > 0
  starts = np.asarray(spec.slot_starts[:-1])
  counts = np.add.reduceat(filled.view(np.uint8), starts, axis=1, dtype=np.int64)
  return Rows(label=batch['label'].astype('<u1'),
              dense=np.ascontiguousarray(batch['dense'], '<f4'),
              counts=counts.astype(counts_dtype(spec)),
              ids=np.ascontiguousarray(batch['ids'][filled], '<i4'))


def concat(parts: Sequence[Rows]) -> Rows:
  if len(parts) == 1:
    return parts[0]
  return Rows(*(np.concatenate([getattr(p, f.name) for p in parts])
                for f in dataclasses.fields(Rows)))


def _mean_weights(counts: np.ndarray) -> np.ndarray:
  """float32(1 / c) for c > 0, else 0: exactly the parser's pooling weights."""
  weights = np.zeros(counts.shape, np.float32)
  np.divide(1.0, counts, out=weights, where=counts > 0, casting='unsafe')
  return weights


def empty_batch(spec: feature_spec_lib.FeatureSpec, batch_size: int) -> Batch:
  """A batch of zero rows, all masked out."""
  return {'label': np.zeros(batch_size, np.float32),
          'dense': np.zeros((batch_size, spec.num_dense), np.float32),
          'ids': np.zeros((batch_size, spec.num_slots), np.int32),
          'weights': np.zeros((batch_size, spec.num_slots), np.float32),
          'mask': np.zeros(batch_size, np.float32)}


def expand_into(out: Batch, at: int, rows: Rows, row_starts: np.ndarray, index: np.ndarray,
                spec: feature_spec_lib.FeatureSpec) -> None:
  """Writes `rows[index]` into rows at, at + 1, ... of the zero-initialised batch `out`.

  `row_starts[i]` is where row i's ids begin in `rows.ids`. Every filled slot is written once;
  the rest keep their zeros (padding: id 0, weight 0).
  """
  k = len(index)
  if not k:
    return
  out['label'][at:at + k] = rows.label[index]
  out['dense'][at:at + k] = rows.dense[index]
  out['mask'][at:at + k] = 1.0
  counts = rows.counts[index].astype(np.int64)
  per_feature = counts.reshape(-1)
  total = int(per_feature.sum())
  if not total:
    return
  per_row = counts.sum(axis=1)
  position = np.arange(total)
  # Each row's ids are contiguous in `rows.ids` and each (row, feature)'s slots are contiguous in
  # the batch, both in the same order: so source and destination are repeat(base) + position.
  source = np.repeat(row_starts[index] - (np.cumsum(per_row) - per_row), per_row) + position
  num_slots = out['ids'].shape[1]
  slot_base = ((at + np.arange(k))[:, None] * num_slots
               + np.asarray(spec.slot_starts[:-1])[None, :]).reshape(-1)
  target = np.repeat(slot_base - (np.cumsum(per_feature) - per_feature), per_feature) + position
  out['ids'].reshape(-1)[target] = rows.ids[source]
  out['weights'].reshape(-1)[target] = np.repeat(_mean_weights(per_feature), per_feature)


def empty_compact_batch(spec: feature_spec_lib.FeatureSpec, batch_size: int) -> Batch:
  """A compact-layout batch of zero rows, all masked out."""
  return {'label': np.zeros(batch_size, np.float32),
          'dense': np.zeros((batch_size, spec.num_dense), np.float32),
          'counts': np.zeros((batch_size, spec.num_sparse), counts_dtype(spec)),
          'values': np.zeros(0, np.int32),
          'mask': np.zeros(batch_size, np.float32)}


def compact_batch(parts: Sequence[Tuple[Rows, np.ndarray, np.ndarray]],
                  spec: feature_spec_lib.FeatureSpec, batch_size: int) -> Batch:
  """The rows `index` of each (rows, row_starts, index) part as one compact-layout batch.

  The compact layout is the cache's own: 'counts' [batch, num_sparse] (0 on padding rows) and
  'values' int32 [counts.sum()], each row's ids feature after feature. It skips expanding every
  row to num_slots padded slots (465 for ELM) only for `models.UniqueRows` to find the filled
  ones again; `expand` gives the same rows in the padded layout.
  """
  out = empty_compact_batch(spec, batch_size)
  values, at = [], 0
  for rows, starts, index in parts:
    k = len(index)
    out['label'][at:at + k] = rows.label[index]
    out['dense'][at:at + k] = rows.dense[index]
    out['mask'][at:at + k] = 1.0
    counts = rows.counts[index]
    out['counts'][at:at + k] = counts
    per_row = counts.sum(axis=1, dtype=np.int64)
    source = (np.repeat(starts[index] - (np.cumsum(per_row) - per_row), per_row) +
              np.arange(int(per_row.sum())))
    values.append(rows.ids[source])
    at += k
  out['values'] = np.concatenate(values) if values else out['values']
  return out


def compact_from_padded(batch: Batch, spec: feature_spec_lib.FeatureSpec) -> Batch:
  """A padded-layout batch ('ids', 'weights' [B, num_slots]) in the compact layout.

  Every feature's live slots (weight != 0) must come first and weigh float32(1 / count), as the
  parser writes them; the compact layout cannot hold anything else.
  """
  live = batch['weights'] != 0
  starts = np.asarray(spec.slot_starts[:-1])
  counts = np.add.reduceat(live, starts, axis=1)
  feature = np.asarray(spec.slot_feature)  # each slot's feature
  position = np.arange(spec.num_slots) - starts[feature]
  slot_counts = counts[:, feature]
  if (not np.array_equal(live, position[None, :] < slot_counts) or
      not np.array_equal(batch['weights'][live], _mean_weights(slot_counts)[live])):
    raise ValueError('the compact layout holds mean-pooled features whose values come first')
  out = {k: batch[k] for k in ('label', 'dense', 'mask')}
  out['counts'] = counts.astype(counts_dtype(spec))
  out['values'] = batch['ids'][live].astype(np.int32)
  return out


def row_starts(rows: Rows) -> np.ndarray:
  per_row = rows.counts.sum(axis=1, dtype=np.int64)
  return np.cumsum(per_row) - per_row


def expand(rows: Rows, spec: feature_spec_lib.FeatureSpec) -> Batch:
  """Compact rows -> parse_chunk's layout (plus an all-ones 'mask')."""
  out = empty_batch(spec, len(rows))
  expand_into(out, 0, rows, row_starts(rows), np.arange(len(rows)), spec)
  return out


# A block of rows as one byte string (the TFDS records): a little-endian int64 header
# [format, rows, ids], then the four arrays' bytes.
def encode_block(rows: Rows) -> bytes:
  header = np.array([CACHE_FORMAT, len(rows), len(rows.ids)], '<i8').tobytes()
  return b''.join([header, rows.label.tobytes(), rows.dense.tobytes(), rows.counts.tobytes(),
                   rows.ids.tobytes()])


def decode_block(data: bytes, spec: feature_spec_lib.FeatureSpec) -> Rows:
  fmt, n, num_ids = np.frombuffer(data, '<i8', 3).tolist()
  if fmt != CACHE_FORMAT:
    raise input_pipeline.DataError(f'a block of format {fmt}; this reader reads {CACHE_FORMAT}')
  cdtype = counts_dtype(spec)
  sizes = [(np.dtype('<u1'), n), (np.dtype('<f4'), n * spec.num_dense),
           (cdtype, n * spec.num_sparse), (np.dtype('<i4'), num_ids)]
  expected = 24 + sum(d.itemsize * c for d, c in sizes)
  if len(data) != expected:
    raise input_pipeline.DataError(f'a block of {len(data)} bytes, expected {expected} for {n} '
                                   f'rows of spec {spec.name!r}: written with another spec?')
  arrays, offset = [], 24
  for dtype, count in sizes:
    arrays.append(np.frombuffer(data, dtype, count, offset))
    offset += dtype.itemsize * count
  label, dense, counts, ids = arrays
  return Rows(label, dense.reshape(n, spec.num_dense), counts.reshape(n, spec.num_sparse), ids)


# ------------------------------------------------------------------------------------------------
# What a cache is of.

def parse_fingerprint(spec: feature_spec_lib.FeatureSpec) -> str:
  """A digest of everything in the spec that changes parsed rows (not the embedding dim)."""
  tables = tuple(dataclasses.replace(t, dim=0) for t in spec.tables)
  return hashlib.sha256(repr(dataclasses.replace(spec, tables=tables)).encode()).hexdigest()[:20]


@dataclasses.dataclass(frozen=True)
class Source:
  """Lines of one input file: all of them, or part `part[0]` to `part[1]` (exclusive) of its
  lines cut into `part[2]` equal parts (Criteo Kaggle's 7 "days" of train.txt)."""
  path: str
  part: Optional[Tuple[int, int, int]] = None

  def __post_init__(self):
    if self.part is not None:
      first, stop, num = self.part
      if not 0 <= first < stop <= num:
        raise ValueError(f'{self.path}: bad part {self.part}: need 0 <= first < stop <= parts')

  def line_range(self, total_lines: Optional[int] = None) -> input_pipeline.LineRange:
    """0-based [start, stop) of the lines it takes; counts the file's lines if needed."""
    if self.part is None:
      return (0, None)
    first, stop, num = self.part
    if total_lines is None:
      total_lines = input_pipeline.count_rows(self.path)
    return (first * total_lines // num, stop * total_lines // num)

  def describe(self) -> str:
    if self.part is None:
      return self.path
    first, stop, num = self.part
    if stop - first == 1:
      return f'{self.path} (part {stop} of {num})'
    return f'{self.path} (parts {first + 1}-{stop} of {num})'


def file_identity(path: str) -> Dict[str, Any]:
  """What tells a source file apart from its replacement: path, size and modification time
  (a TorchRec triple's: its dense file's, and its other two files')."""
  st = os.stat(path)
  identity = {'path': os.path.abspath(path), 'size': st.st_size, 'mtime_ns': st.st_mtime_ns}
  if torchrec_npy.is_npy_source(path):
    identity['companions'] = [file_identity(c) for c in
                              torchrec_npy.companion_paths(path, must_exist=True)]
  return identity


def cache_name(source: Source, spec: feature_spec_lib.FeatureSpec,
               share: Tuple[int, int]) -> str:
  """The directory name: what the cache is of, not its contents' version (those are checked)."""
  key = json.dumps([os.path.abspath(source.path), source.part, parse_fingerprint(spec),
                    list(share)])
  digest = hashlib.sha256(key.encode()).hexdigest()[:12]
  share_tag = '' if share == (0, 1) else f'.share{share[0]}of{share[1]}'
  return f'{os.path.basename(source.path)}.{spec.name}{share_tag}.{digest}'


def default_cache_root(source: Source) -> str:
  return os.path.join(os.path.dirname(os.path.abspath(source.path)), 'dlrm_cache')


# ------------------------------------------------------------------------------------------------
# Writing.

def _npy_header(dtype: np.dtype, shape: Tuple[int, ...]) -> bytes:
  """A version 1.0 .npy header padded to exactly _HEADER_BYTES."""
  text = repr({'descr': np.lib.format.dtype_to_descr(np.dtype(dtype)), 'fortran_order': False,
               'shape': tuple(shape)}).encode('latin1')
  room = _HEADER_BYTES - 10 - 1
  if len(text) > room:
    raise ValueError(f'shape {shape} does not fit the .npy header')
  text = text + b' ' * (room - len(text)) + b'\n'
  return b'\x93NUMPY\x01\x00' + np.array([len(text)], '<u2').tobytes() + text


class _CacheWriter:
  """Streams compact rows into the .npy files of a directory; headers are written at close."""

  def __init__(self, directory: str, spec: feature_spec_lib.FeatureSpec):
    self._spec = spec
    self._dtypes = {'label': np.dtype('<u1'), 'dense': np.dtype('<f4'),
                    'counts': counts_dtype(spec), 'ids': np.dtype('<i4'),
                    'offsets': np.dtype('<i8')}
    self._files = {}
    for name in _ARRAYS:
      f = open(os.path.join(directory, f'{name}.npy'), 'wb')
      f.write(bytes(_HEADER_BYTES))
      self._files[name] = f
    self.rows = 0
    self.ids = 0
    self._files['offsets'].write(np.zeros(1, '<i8').tobytes())

  def append(self, rows: Rows) -> None:
    per_row = rows.counts.sum(axis=1, dtype=np.int64)
    offsets = self.ids + np.cumsum(per_row)
    for name, array in (('label', rows.label), ('dense', rows.dense), ('counts', rows.counts),
                        ('ids', rows.ids), ('offsets', offsets)):
      self._files[name].write(np.ascontiguousarray(array, self._dtypes[name]).tobytes())
    self.rows += len(rows)
    self.ids += int(per_row.sum())

  def bytes(self) -> int:
    """Bytes written so far."""
    return sum(f.tell() for f in self._files.values())

  def shapes(self) -> Dict[str, Tuple[int, ...]]:
    return {'label': (self.rows,), 'dense': (self.rows, self._spec.num_dense),
            'counts': (self.rows, self._spec.num_sparse), 'ids': (self.ids,),
            'offsets': (self.rows + 1,)}

  def close(self) -> Dict[str, Dict[str, Any]]:
    """Writes the headers, flushes everything to disk; returns the arrays' descriptions."""
    arrays = {}
    for name, shape in self.shapes().items():
      f = self._files[name]
      f.seek(0)
      f.write(_npy_header(self._dtypes[name], shape))
      f.flush()
      os.fsync(f.fileno())
      f.close()
      arrays[name] = {'dtype': self._dtypes[name].str, 'shape': list(shape),
                      'bytes': _HEADER_BYTES + int(np.prod(shape)) * self._dtypes[name].itemsize}
    return arrays

  def abort(self) -> None:
    for f in self._files.values():
      f.close()


def fsync_path(path: str) -> None:
  """fsync of a file or directory by its path."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def pid_alive(pid: int) -> bool:
  """Whether process `pid` runs on this host (one of another user counts)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _remove_dead_builds(directory: str) -> None:
  """Deletes what builds on this host whose process is gone left: their temporary directories,
  and the stale caches they had moved aside to delete (a copy of the cache each)."""
  parent, name = os.path.split(directory)
  for kind in ('tmp', 'stale'):
    prefix = f'{name}.{kind}-{socket.gethostname()}-'
    for entry in os.listdir(parent):
      if entry.startswith(prefix):
        pid = entry[len(prefix):]
        if pid.isdigit() and not pid_alive(int(pid)):
          shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _expected_manifest(source: Source, spec: feature_spec_lib.FeatureSpec,
                       share: Tuple[int, int]) -> Dict[str, Any]:
  """The fields a valid cache's manifest must have, as they are now."""
  return {'cache_format': CACHE_FORMAT, 'parser_version': input_pipeline.PARSER_VERSION,
          'spec_name': spec.name, 'spec_fingerprint': parse_fingerprint(spec),
          'source': file_identity(source.path),
          'part': list(source.part) if source.part else None, 'share': list(share)}


# A strict build (skip_bad_rows=False) goes on past bad rows, so that the cache is complete and a
# rerun with skip_bad_rows=True starts at once; but this many bad rows (and 1% of the lines) mean
# a wrong file or format, and stop it right away.
_STRICT_BAD_ROWS = 100


def bad_rows_error(stats: Dict[str, Any], where: str, path: str,
                   note: str) -> input_pipeline.DataError:
  """A DataError for the first recorded bad row of `stats` (ParseStats.as_dict()), with its
  file, line and column; `where` names what the rows were parsed into or from."""
  example = (stats['bad_row_examples'] or ['?'])[0]
  # The example reads "path:line: column 'name': message" (input_pipeline._report).
  head, _, rest = example.partition(': column ')
  line = column = None
  if head.rpartition(':')[2].isdigit():
    path, _, line = head.rpartition(':')
    line = int(line)
    column = rest.split("'")[1] if rest.count("'") >= 2 else None
  return input_pipeline.DataError(f"{example} ({stats['bad_rows']} bad rows in {where}{note})",
                                  path, line, column)


def _check_space(directory: str, source: Source, share: Tuple[int, int], writer: '_CacheWriter',
                 stats: input_pipeline.ParseStats) -> None:
  """Stops a build early when the cache, at the size per line of its first rows, cannot fit."""
  if not stats.lines:
    return
  lines = input_pipeline.estimate_lines(source.path)
  if source.part is not None:
    lines = lines * (source.part[1] - source.part[0]) // source.part[2]
  # stats.lines: this process's lines so far, 1 / share[1] of those read.
  needed = writer.bytes() / stats.lines * lines / share[1] - writer.bytes()
  free = shutil.disk_usage(directory).free
  if needed > 0.95 * free:
    raise OSError(errno.ENOSPC, f'the cache needs about {needed / 2**30:.2f} GiB more '
                  f'({writer.bytes() / stats.lines:.0f} bytes per row, ~{lines:,} lines) and '
                  f'there are {free / 2**30:.2f} GiB free')


def _build(source: Source, spec: feature_spec_lib.FeatureSpec, directory: str,
           share: Tuple[int, int], *, skip_bad_rows: bool, num_workers: int,
           chunk_rows: int) -> Dict[str, Any]:
  """Parses the source into a new cache at `directory` (replacing whatever is there).

  Bad rows are left out and recorded whatever `skip_bad_rows` says (opening the cache enforces
  it); strictness only stops the build early past _STRICT_BAD_ROWS bad rows that are also over
  1% of the lines read.
  """
  expected = _expected_manifest(source, spec, share)
  tmp = f'{directory}.tmp-{socket.gethostname()}-{os.getpid()}'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  writer = _CacheWriter(tmp, spec)
  stats = input_pipeline.ParseStats()
  started = time.perf_counter()
  try:
    start, stop = source.line_range()
    chunks = input_pipeline.iter_row_chunks(
        source.path, spec, chunk_rows=chunk_rows, skip_bad_rows=True, stats=stats,
        process_index=share[0], process_count=share[1], num_workers=num_workers,
        line_ranges=[(start, stop)], postprocess=functools.partial(compact, spec=spec))
    last_log, warned = started, False
    expected_lines = None
    for rows in chunks:
      writer.append(rows)
      if expected_lines is None:
        _check_space(tmp, source, share, writer, stats)
        expected_lines = (stop - start if stop is not None
                          else input_pipeline.estimate_lines(source.path))
      if stats.bad_rows and not skip_bad_rows:
        if stats.bad_rows > max(_STRICT_BAD_ROWS, stats.lines // 100):
          raise bad_rows_error(stats.as_dict(), source.describe(), source.path,
                               f' in the first {stats.lines:,} lines read: is it the '
                               f'right file for the {spec.name!r} format?')
        if not warned:
          warned = True
          logging.warning('%s; caching the rest of %s first, then the run stops (rerun with '
                          'skip_bad_rows=True to train without the bad rows: the cache is kept)',
                          stats.bad_row_examples[0], source.describe())
      now = time.perf_counter()
      if now - last_log > 30:
        done = stats.lines * share[1]  # lines read, every process's share included
        rate = done / (now - started)
        left = max(0, expected_lines - done) / max(rate, 1e-9)
        logging.info('caching %s: %d of ~%d lines, %.0f lines/s, ~%.0f min left',
                     source.describe(), done, expected_lines, rate, left / 60)
        last_log = now
    arrays = writer.close()
    if file_identity(source.path) != expected['source']:
      raise input_pipeline.DataError(
          f'{source.path} changed while it was being cached; not using the cache', source.path)
    seconds = time.perf_counter() - started
    manifest = dict(expected, rows=writer.rows, ids=writer.ids, lines=stats.source_lines,
                    first_line=start, arrays=arrays, stats=stats.as_dict(),
                    build_seconds=round(seconds, 3),
                    created=time.strftime('%Y-%m-%dT%H:%M:%S'))
    metrics.write_json_atomic(os.path.join(tmp, 'manifest.json'), manifest)
    fsync_path(tmp)
    if os.path.exists(directory):
      # A stale cache goes only now that its successor is complete.
      stale = f'{directory}.stale-{socket.gethostname()}-{os.getpid()}'
      # One of this pid's (this process's earlier rebuild, or a container's fixed pid) whose
      # delete did not finish: renaming onto it would fail with "Directory not empty".
      shutil.rmtree(stale, ignore_errors=True)
      os.rename(directory, stale)
      os.rename(tmp, directory)
      shutil.rmtree(stale, ignore_errors=True)
    else:
      os.rename(tmp, directory)
    fsync_path(os.path.dirname(directory))
  except BaseException as e:
    writer.abort()
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
      raise OSError(e.errno, f'no room to cache {source.describe()} in '
                    f'{os.path.dirname(directory)}: {e.strerror}. Nothing there was changed. '
                    'Point config.cache_dir at a larger disk, or set config.use_cache=False '
                    'to read the CSV every epoch') from e
    raise
  logging.info('cached %s: %d rows (%d bad) in %.1f s (%.0f rows/s) -> %s', source.describe(),
               writer.rows, stats.bad_rows, seconds, writer.rows / max(seconds, 1e-9),
               directory)
  return manifest


# ------------------------------------------------------------------------------------------------
# Opening.

def _problem(directory: str, expected: Dict[str, Any]) -> Optional[str]:
  """Why the cache at `directory` cannot be used, or None if it can."""
  try:
    with open(os.path.join(directory, 'manifest.json')) as f:
      manifest = json.load(f)
  except FileNotFoundError:
    return 'no cache yet'
  except (OSError, ValueError) as e:
    return f'unreadable manifest ({e})'
  for key, value in expected.items():
    if manifest.get(key) != value:
      return f'{key} changed: {manifest.get(key)} -> {value}'
  for name in _ARRAYS:
    try:
      size = os.path.getsize(os.path.join(directory, f'{name}.npy'))
    except OSError:
      return f'{name}.npy is missing'
    if size != manifest['arrays'][name]['bytes']:
      return f'{name}.npy has {size} bytes, expected {manifest["arrays"][name]["bytes"]}'
  return None


class Cache:
  """An open, valid cache: its manifest and positional reads of its rows."""

  def __init__(self, directory: str, manifest: Dict[str, Any],
               spec: feature_spec_lib.FeatureSpec):
    self.directory = directory
    self.manifest = manifest
    self.spec = spec
    self.num_rows = int(manifest['rows'])
    self._dtypes = {name: np.dtype(manifest['arrays'][name]['dtype']) for name in _ARRAYS}
    self._fds = {}
    try:
      for name in _ARRAYS:
        self._fds[name] = os.open(os.path.join(directory, f'{name}.npy'), os.O_RDONLY)
    except BaseException:
      self.close()
      raise

  def close(self, _close=os.close) -> None:
    # os.close bound at definition: __del__ can run at interpreter exit, after the module's
    # globals (os among them) were cleared.
    for fd in self._fds.values():
      _close(fd)
    self._fds = {}

  def __del__(self):
    self.close()

  def _read(self, name: str, start: int, count: int, width: int = 1) -> np.ndarray:
    dtype = self._dtypes[name]
    nbytes = count * width * dtype.itemsize
    data = os.pread(self._fds[name], nbytes, _HEADER_BYTES + start * width * dtype.itemsize)
    if len(data) != nbytes:
      raise input_pipeline.DataError(
          f'{self.directory}/{name}.npy is shorter than its manifest says: the cache was changed '
          'after it was written; delete the directory to rebuild it')
    return np.frombuffer(data, dtype)

  def read(self, start: int, stop: int) -> Rows:
    """Rows [start, stop)."""
    n = stop - start
    first, last = self._read('offsets', start, 1)[0], self._read('offsets', stop, 1)[0]
    return Rows(label=self._read('label', start, n),
                dense=self._read('dense', start, n, self.spec.num_dense).reshape(n, -1),
                counts=self._read('counts', start, n, self.spec.num_sparse).reshape(n, -1),
                ids=self._read('ids', int(first), int(last - first)))


def add_manifest_stats(stats: input_pipeline.ParseStats, manifest: Dict[str, Any]) -> None:
  """Adds a cache's build statistics to `stats` (the rows a cached run reads)."""
  recorded = input_pipeline.ParseStats(**manifest['stats'])
  stats.add(recorded)


def _check_bad_rows(manifest: Dict[str, Any], skip_bad_rows: bool, source: Source) -> None:
  stats = manifest['stats']
  if stats['bad_rows'] and not skip_bad_rows:
    raise bad_rows_error(stats, source.describe(), source.path,
                         '; set skip_bad_rows=True to train without them: the cache of the '
                          'good rows is ready and will be used as it is')
  key = (source.describe(), json.dumps(manifest.get('source')), str(manifest.get('share')))
  if stats['bad_rows'] and key not in _SAID_BAD_ROWS:
    # Said when a process first opens the cache, not only when it is built: a later run would
    # read it silently. Once: the trainer opens each cache several times.
    _SAID_BAD_ROWS.add(key)
    logging.warning('%s: %d bad rows left out (skip_bad_rows), the first: %s',
                    source.describe(), stats['bad_rows'], (stats['bad_row_examples'] or ['?'])[0])


_SAID_BAD_ROWS = set()


def has_full_cache(source: Source, spec: feature_spec_lib.FeatureSpec,
                   cache_root: str = '') -> bool:
  """Whether a valid cache of all of `source`'s rows is there to read."""
  directory = os.path.join(cache_root or default_cache_root(source),
                           cache_name(source, spec, (0, 1)))
  return _problem(directory, _expected_manifest(source, spec, (0, 1))) is None


def open_or_build(source: Source, spec: feature_spec_lib.FeatureSpec, *, cache_root: str = '',
                  skip_bad_rows: bool = False, num_workers: int = 0, process_index: int = 0,
                  process_count: int = 1, chunk_rows: int = 8192, wait: bool = True,
                  use_full_cache: bool = True) -> Optional[Tuple[Cache, int, int]]:
  """(cache, first row, row after the last) of this process's rows of `source`.

  A valid cache of all the source's rows is used if there is one and `use_full_cache` (process k
  of n then reads rows [k * rows // n, (k + 1) * rows // n) of it); otherwise this process's
  share of the lines (those whose number is k modulo n, as the CSV reader shares them) is cached
  and read whole, after being built if needed. The two give different shares: the processes of
  one run must all make the same choice. While another process builds the cache, this one waits
  for it, or with `wait=False` returns None.
  """
  input_pipeline.refuse_while_a_process_starts('row_cache.open_or_build')
  root = cache_root or default_cache_root(source)
  shares = [(process_index, process_count)]
  if use_full_cache and process_count > 1:
    shares.insert(0, (0, 1))
  # A valid cache is read where it is, also on a read-only mount (built ahead, shared).
  for share in shares:
    directory = os.path.join(root, cache_name(source, spec, share))
    if _problem(directory, _expected_manifest(source, spec, share)) is None:
      return _opened(directory, source, spec, share, skip_bad_rows, process_index,
                     process_count)
  try:
    os.makedirs(root, exist_ok=True)
    probe = os.path.join(root, f'.probe-{socket.gethostname()}-{os.getpid()}')
    open(probe, 'w').close()
    os.remove(probe)
  except OSError as e:
    raise OSError(e.errno, f'cannot write the row cache in {root} ({e.strerror}): set '
                  'config.cache_dir to a writable directory, or config.use_cache=False') from e
  share = shares[-1]
  directory = os.path.join(root, cache_name(source, spec, share))
  with open(f'{directory}.lock', 'w') as lock:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      if not wait:
        return None  # another process is building it
      logging.info('waiting for another process to finish building the cache of %s in %s',
                   source.describe(), directory)
      fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      problem = _problem(directory, _expected_manifest(source, spec, share))
      if problem is not None:
        logging.info('building the cache of %s (%s) in %s', source.describe(), problem,
                     directory)
        _remove_dead_builds(directory)
        _build(source, spec, directory, share, skip_bad_rows=skip_bad_rows,
               num_workers=num_workers, chunk_rows=chunk_rows)
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return _opened(directory, source, spec, share, skip_bad_rows, process_index, process_count)


def _opened(directory, source, spec, share, skip_bad_rows, process_index, process_count):
  with open(os.path.join(directory, 'manifest.json')) as f:
    manifest = json.load(f)
  _check_bad_rows(manifest, skip_bad_rows, source)
  cache = Cache(directory, manifest, spec)
  if share == (0, 1) and process_count > 1:
    n = cache.num_rows
    return cache, process_index * n // process_count, (process_index + 1) * n // process_count
  return cache, 0, cache.num_rows


# ------------------------------------------------------------------------------------------------
# Reading batches.

@dataclasses.dataclass
class Segment:
  """Rows [0, num_rows) of some storage, read `unit_rows` at a time: unit u is rows
  [u * unit_rows, min((u + 1) * unit_rows, num_rows)), returned by read_unit(u)."""
  num_rows: int
  unit_rows: int
  read_unit: Callable[[int], Rows]

  @property
  def num_units(self) -> int:
    return -(-self.num_rows // self.unit_rows)


def cache_segment(cache: Cache, start: int, stop: int, block_rows: int) -> Segment:
  def read_unit(u):
    first = start + u * block_rows
    return cache.read(first, min(first + block_rows, stop))
  return Segment(stop - start, block_rows, read_unit)


class RowReader:
  """Batches of the rows of several segments, read as one sequence (this process's share)."""

  def __init__(self, segments: Sequence[Segment], spec: feature_spec_lib.FeatureSpec,
               name: str = 'cache'):
    self.segments = [s for s in segments if s.num_rows]
    self.spec = spec
    self.name = name
    units = [s.num_units for s in self.segments]
    self._first_unit = np.cumsum([0] + units)
    self.num_units = int(self._first_unit[-1])
    self.num_rows = sum(s.num_rows for s in self.segments)

  def unit_sizes(self, units: np.ndarray) -> np.ndarray:
    seg = np.searchsorted(self._first_unit, units, side='right') - 1
    local = units - self._first_unit[seg]
    rows = np.asarray([s.num_rows for s in self.segments])[seg]
    size = np.asarray([s.unit_rows for s in self.segments])[seg]
    return np.minimum(size, rows - local * size)

  def _read_units(self, units: np.ndarray) -> Rows:
    parts = []
    for u in np.sort(units).tolist():  # in storage order, for sequential reads
      seg = int(np.searchsorted(self._first_unit, u, side='right') - 1)
      parts.append(self.segments[seg].read_unit(u - int(self._first_unit[seg])))
    return concat(parts)

  def _windows(self, epoch: int, shuffle_buffer: int, seed: int, process_index: int,
               skip_rows: int) -> Iterator[Tuple[Rows, np.ndarray]]:
    """(window rows, the order of its rows to emit) of one epoch, after `skip_rows` rows."""
    if shuffle_buffer:
      rng = np.random.default_rng([seed, process_index, epoch])
      order = rng.permutation(self.num_units)
      typical = max(s.unit_rows for s in self.segments)
      per_window = max(1, round(shuffle_buffer / typical))
    else:
      order = np.arange(self.num_units)
      per_window = max(1, -(-8192 // max(s.unit_rows for s in self.segments)))
    for w, first in enumerate(range(0, self.num_units, per_window)):
      units = order[first:first + per_window]
      size = int(self.unit_sizes(units).sum())
      if skip_rows >= size:
        skip_rows -= size
        continue
      rows = self._read_units(units)
      if shuffle_buffer:
        emit = np.random.default_rng([seed, process_index, epoch, w]).permutation(len(rows))
      else:
        emit = np.arange(len(rows))
      yield rows, emit[skip_rows:]
      skip_rows = 0

  def batches(self, batch_size: int, *, shuffle_buffer: int = 0, seed: int = 0,
              num_epochs: Optional[int] = 1, drop_remainder: bool = True, first_batch: int = 0,
              num_batches: Optional[int] = None, process_index: int = 0,
              compact: bool = False) -> Iterator[Batch]:
    """Batches of exactly `batch_size` rows with a 'mask' (as input_pipeline.batches).

    Batches run across epoch boundaries; `num_epochs=None` repeats forever. `num_batches` (if
    given) is the stream's exact length: it is cut there, or padded with all-masked batches, so
    every process of a multi-host run steps the same number of times. `first_batch` starts at
    that batch of the stream, without reading the rows before it (a resumed run). With `compact`
    the batches come in `compact_batch`'s layout (the same rows in the same order).
    """
    if batch_size < 1:
      raise ValueError(f'batch_size must be positive, got {batch_size}')
    if not self.num_rows and num_epochs is None:
      # Repeating nothing would give only padding (or spin forever).
      raise input_pipeline.DataError(f'{self.name}: no rows to read for process '
                                     f'{process_index}')
    return self._batches(batch_size, shuffle_buffer, seed, num_epochs, drop_remainder,
                         first_batch, num_batches, process_index, compact)

  def _batches(self, batch_size, shuffle_buffer, seed, num_epochs, drop_remainder, first_batch,
               num_batches, process_index, compact):
    empty = empty_compact_batch if compact else empty_batch
    produced = 0
    if num_batches is not None and first_batch >= num_batches:
      return
    skip = first_batch * batch_size
    epoch = 0
    if self.num_rows:
      epoch, skip = divmod(skip, self.num_rows)
    out, filled = None, 0
    epochs = itertools.count(epoch) if num_epochs is None else range(epoch, num_epochs)
    for e in epochs:
      if not self.num_rows:
        break
      for rows, emit in self._windows(e, shuffle_buffer, seed, process_index, skip):
        starts = row_starts(rows)
        while len(emit):
          if out is None:
            # Compact batches gather their parts (rows, starts, index) and are built when full.
            out, filled = ([] if compact else empty_batch(self.spec, batch_size)), 0
          take = min(len(emit), batch_size - filled)
          if compact:
            out.append((rows, starts, emit[:take]))
          else:
            expand_into(out, filled, rows, starts, emit[:take], self.spec)
          filled += take
          emit = emit[take:]
          if filled == batch_size:
            yield compact_batch(out, self.spec, batch_size) if compact else out
            produced += 1
            out = None
            if num_batches is not None and produced + first_batch >= num_batches:
              return
      skip = 0
    if out is not None and not drop_remainder:
      yield compact_batch(out, self.spec, batch_size) if compact else out
      produced += 1
    if num_batches is not None:
      for _ in range(num_batches - first_batch - produced):
        yield empty(self.spec, batch_size)


def max_share_batches(lines_per_source: Sequence[int], process_count: int,
                      batch_size: int) -> int:
  """Batches enough for the largest process share of the sources' lines, the same on every
  process: each process's share of a source has at most ceil(lines / process_count) rows."""
  rows = sum(-(-int(n) // process_count) for n in lines_per_source)
  return max(1, math.ceil(rows / batch_size))
