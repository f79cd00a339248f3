"""The row cache: exact round trip, validity, atomic builds, shuffling, resuming and shares."""

import json
import os
import re
import shutil
import socket
import time

from hypothesis import example, given, settings, strategies as st
import numpy as np
import pytest

from dlrm_jax import feature_spec
from dlrm_jax import input_pipeline
from dlrm_jax import row_cache
from input_pipeline_test import LINE, MAX_LEN, SPEC, elm_line, random_elm_lines

CRITEO = feature_spec.criteo_spec(1000, embedding_dim=4)


def write(tmp_path, name, lines):
  path = tmp_path / name
  path.write_text('\n'.join(lines) + '\n')
  return str(path)


def parse_all(path, spec=SPEC, **kwargs):
  chunks = list(input_pipeline.iter_row_chunks(path, spec, **kwargs))
  return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def assert_batches_equal(a, b):
  assert set(a) == set(b)
  for key in a:
    assert a[key].dtype == b[key].dtype, key
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def stream(batches, key='dense', column=1):
  """The real rows' values of one dense column, in the order the batches give them."""
  return [float(v) for b in batches for v, m in zip(b[key][:, column], b['mask']) if m]


def numbered(tmp_path, n, name='rows.csv'):
  """ELM rows whose avg_price (dense column 1) is the row's index."""
  return write(tmp_path, name, [elm_line(avg_price=str(i), clicked=str(i % 2))
                                for i in range(n)])


def reader_of(path, spec=SPEC, block_rows=16, **kwargs):
  cache, start, stop = row_cache.open_or_build(row_cache.Source(path), spec, **kwargs)
  return row_cache.RowReader([row_cache.cache_segment(cache, start, stop, block_rows)], spec)


# ------------------------------------------------------------------------------------------------
# The compact layout.

def test_compact_then_expand_is_the_parsed_batch_bit_for_bit():
  lines = random_elm_lines(400, seed=7, list_len=6)  # lists longer than MAX_LEN: truncated
  lines += [elm_line(time_type='x', time_type_list='x;y'), elm_line(shop_id='', item_id_list=''),
            elm_line(time_type_list=';'.join(['tea'] * 9))]
  parsed = input_pipeline.parse_chunk(lines, SPEC, path='p', first_line=1)
  rows = row_cache.compact(parsed, SPEC)
  assert rows.counts.dtype == np.uint8 and rows.ids.dtype == np.int32
  assert rows.counts.max() == MAX_LEN
  assert len(rows.ids) == int((parsed['weights'] > 0).sum()) < parsed['ids'].size
  expanded = row_cache.expand(rows, SPEC)
  assert expanded.pop('mask').tolist() == [1.0] * len(lines)
  assert_batches_equal(expanded, parsed)
  decoded = row_cache.decode_block(row_cache.encode_block(rows), SPEC)
  assert_batches_equal({k: v for k, v in row_cache.expand(decoded, SPEC).items() if k != 'mask'},
                       parsed)
  with pytest.raises(input_pipeline.DataError, match='another spec'):
    row_cache.decode_block(row_cache.encode_block(rows), CRITEO)


def test_weights_match_the_parsers_for_every_count():
  # 1/c in float32 as the parser rounds it, for every count a uint8 can hold.
  spec = feature_spec.elm_spec(hash_buckets=50, embedding_dim=4, max_list_len=255)
  lines = [elm_line(item_id_list=';'.join(map(str, range(k)))) for k in range(1, 256)]
  parsed = input_pipeline.parse_chunk(lines, spec, path='p', first_line=1)
  expanded = row_cache.expand(row_cache.compact(parsed, spec), spec)
  np.testing.assert_array_equal(expanded['weights'], parsed['weights'])
  assert row_cache.counts_dtype(feature_spec.elm_spec(max_list_len=300)) == np.uint16


@settings(max_examples=150, deadline=None)
@given(st.lists(LINE, min_size=1, max_size=6))
@example([elm_line()])
def test_fuzz_round_trip(lines):
  stats = input_pipeline.ParseStats()
  parsed = input_pipeline.parse_chunk(lines, SPEC, path='p', first_line=1, skip_bad_rows=True,
                                      stats=stats)
  assert stats.rows >= lines.count(elm_line())  # the valid rows are kept, not skipped
  rows = row_cache.compact(parsed, SPEC)
  expanded = row_cache.expand(rows, SPEC)
  expanded.pop('mask')
  assert_batches_equal(expanded, parsed)


# ------------------------------------------------------------------------------------------------
# Building and validity.

def test_cache_files_are_numpy_arrays_and_the_manifest_says_what_made_them(tmp_path):
  path = write(tmp_path, 'train.csv', random_elm_lines(50, seed=1))
  cache, start, stop = row_cache.open_or_build(row_cache.Source(path), SPEC)
  assert (start, stop) == (0, 50)
  assert os.path.dirname(cache.directory) == str(tmp_path / 'dlrm_cache')
  manifest = json.load(open(os.path.join(cache.directory, 'manifest.json')))
  assert manifest['source'] == {'path': path, 'size': os.path.getsize(path),
                                'mtime_ns': os.stat(path).st_mtime_ns}
  assert manifest['spec_fingerprint'] == row_cache.parse_fingerprint(SPEC)
  assert (manifest['rows'], manifest['lines'], manifest['share']) == (50, 50, [0, 1])
  assert manifest['stats']['rows'] == 50 and manifest['stats']['bad_rows'] == 0
  parsed = parse_all(path)
  ids = np.load(os.path.join(cache.directory, 'ids.npy'), mmap_mode='r')
  assert ids.dtype == np.int32 and ids.shape == (manifest['ids'],)
  np.testing.assert_array_equal(ids, parsed['ids'][parsed['weights'] > 0])
  dense = np.load(os.path.join(cache.directory, 'dense.npy'))
  np.testing.assert_array_equal(dense, parsed['dense'])
  offsets = np.load(os.path.join(cache.directory, 'offsets.npy'))
  assert offsets[0] == 0 and offsets[-1] == len(ids) and len(offsets) == 51
  assert sorted(os.listdir(tmp_path / 'dlrm_cache')) == sorted(
      [os.path.basename(cache.directory), os.path.basename(cache.directory) + '.lock'])


def test_reused_until_the_source_or_the_spec_changes(tmp_path, monkeypatch):
  # Builds are counted: a rebuilt cache has the same manifest but for timings.
  builds = []
  build = row_cache._build
  monkeypatch.setattr(row_cache, '_build', lambda *a, **k: builds.append(1) or build(*a, **k))
  path = write(tmp_path, 'train.csv', random_elm_lines(40, seed=2))
  first, _, _ = row_cache.open_or_build(row_cache.Source(path), SPEC)
  again, _, _ = row_cache.open_or_build(row_cache.Source(path), SPEC)
  assert again.manifest == first.manifest and len(builds) == 1
  # The embedding dim does not change parsed rows: same cache.
  wider = feature_spec.elm_spec(hash_buckets=1000, embedding_dim=8, max_list_len=MAX_LEN)
  assert row_cache.open_or_build(row_cache.Source(path), wider)[0].directory == first.directory
  assert len(builds) == 1
  # Other hash buckets or list lengths: another cache, this one kept.
  other = feature_spec.elm_spec(hash_buckets=999, embedding_dim=4, max_list_len=MAX_LEN)
  assert row_cache.open_or_build(row_cache.Source(path), other)[0].directory != first.directory
  longer = feature_spec.elm_spec(hash_buckets=1000, embedding_dim=4, max_list_len=5)
  assert row_cache.open_or_build(row_cache.Source(path), longer)[0].directory != first.directory
  assert len(builds) == 3
  assert row_cache.open_or_build(row_cache.Source(path), SPEC)[0].manifest == first.manifest
  assert len(builds) == 3
  # The file grows by a row: rebuilt in place.
  with open(path, 'a') as f:
    f.write(elm_line() + '\n')
  grown, _, stop = row_cache.open_or_build(row_cache.Source(path), SPEC)
  assert grown.directory == first.directory and stop == 41 and len(builds) == 4
  # Same size, new mtime (a rewritten file): rebuilt.
  os.utime(path, ns=(0, os.stat(path).st_mtime_ns + 10**9))
  touched, _, _ = row_cache.open_or_build(row_cache.Source(path), SPEC)
  assert touched.manifest['source']['mtime_ns'] != grown.manifest['source']['mtime_ns']
  assert len(builds) == 5


def test_a_valid_cache_is_read_where_it_cannot_be_written(tmp_path, monkeypatch):
  # A cache built ahead (python -m dlrm_jax.data_sources) and shared on a read-only mount: the
  # write probe used to run first and refuse it.
  path = write(tmp_path, 'train.csv', random_elm_lines(40, seed=2))
  built, _, _ = row_cache.open_or_build(row_cache.Source(path), SPEC)
  # (Root writes anywhere: the probe's file is made unwritable by its name instead.)
  monkeypatch.setattr(row_cache.socket, 'gethostname', lambda: 'read-only/mount')
  assert row_cache.open_or_build(row_cache.Source(path), SPEC)[0].directory == built.directory
  other = write(tmp_path, 'other.csv', random_elm_lines(40, seed=3))
  with pytest.raises(OSError, match='cannot write the row cache in'):
    row_cache.open_or_build(row_cache.Source(other), SPEC)


def test_a_process_waiting_for_another_build_says_so(tmp_path, caplog):
  import fcntl  # pylint: disable=g-import-not-at-top
  import logging  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top
  path = write(tmp_path, 'train.csv', random_elm_lines(40, seed=2))
  source = row_cache.Source(path)
  directory = os.path.join(row_cache.default_cache_root(source), row_cache.cache_name(
      source, SPEC, (0, 1)))
  os.makedirs(os.path.dirname(directory), exist_ok=True)
  with open(f'{directory}.lock', 'w') as held:
    fcntl.flock(held, fcntl.LOCK_EX)  # as another process building it
    assert row_cache.open_or_build(source, SPEC, wait=False) is None

    done = threading.Event()

    def release_once_it_waits():
      # Not on a timer: a process slowed past it would find the lock free and say nothing.
      deadline = time.monotonic() + 60
      while ('waiting for another process' not in caplog.text and not done.is_set()
             and time.monotonic() < deadline):
        time.sleep(0.01)
      fcntl.flock(held, fcntl.LOCK_UN)
    releaser = threading.Thread(target=release_once_it_waits, daemon=True)
    with caplog.at_level(logging.INFO):
      releaser.start()
      try:
        cache, _, stop = row_cache.open_or_build(source, SPEC)
      finally:
        done.set()
        releaser.join()
  assert stop == 40 and cache.directory == directory
  assert 'waiting for another process to finish building the cache of' in caplog.text


def test_a_damaged_cache_is_rebuilt(tmp_path):
  path = write(tmp_path, 'train.csv', random_elm_lines(30, seed=3))
  cache, _, _ = row_cache.open_or_build(row_cache.Source(path), SPEC)
  ids_file = os.path.join(cache.directory, 'ids.npy')
  with open(ids_file, 'r+b') as f:
    f.truncate(os.path.getsize(ids_file) - 4)
  rebuilt, _, _ = row_cache.open_or_build(row_cache.Source(path), SPEC)
  assert os.path.getsize(ids_file) == rebuilt.manifest['arrays']['ids']['bytes']
  os.remove(os.path.join(cache.directory, 'manifest.json'))  # a build killed before the end
  rebuilt, _, _ = row_cache.open_or_build(row_cache.Source(path), SPEC)
  assert rebuilt.num_rows == 30


def test_a_failed_build_leaves_nothing_and_keeps_the_old_cache(tmp_path, monkeypatch):
  lines = random_elm_lines(300, seed=4)
  path = write(tmp_path, 'train.csv', lines)
  source = row_cache.Source(path)
  old, _, _ = row_cache.open_or_build(source, SPEC)
  root = tmp_path / 'dlrm_cache'
  listing = sorted(os.listdir(root))
  old_files = {n: open(os.path.join(old.directory, n), 'rb').read()
               for n in os.listdir(old.directory)}
  write(tmp_path, 'train.csv', lines[:-1])  # the source changes: the cache is stale
  appended = []
  original = row_cache._CacheWriter.append

  def interrupted(self, rows):
    appended.append(len(rows))
    if len(appended) == 2:
      raise KeyboardInterrupt  # killed half-way
    original(self, rows)

  monkeypatch.setattr(row_cache._CacheWriter, 'append', interrupted)
  with pytest.raises(KeyboardInterrupt):
    row_cache.open_or_build(source, SPEC, chunk_rows=64)

  def no_room(self, rows):
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(row_cache._CacheWriter, 'append', no_room)
  with pytest.raises(OSError, match='no room to cache .*config.cache_dir'):
    row_cache.open_or_build(source, SPEC)
  monkeypatch.undo()
  # Neither failure left a directory behind or touched the old cache.
  assert sorted(os.listdir(root)) == listing
  assert {n: open(os.path.join(old.directory, n), 'rb').read()
          for n in os.listdir(old.directory)} == old_files
  assert row_cache.open_or_build(source, SPEC)[0].num_rows == 299


def test_a_disk_too_small_is_found_on_the_first_chunk(tmp_path, monkeypatch):
  path = write(tmp_path, 'train.csv', random_elm_lines(600, seed=9))
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(
      row_cache.open_or_build(row_cache.Source(path), SPEC, cache_root=str(tmp_path / 'a'))[
          0].directory) for f in files)
  for free, fits in ((int(size * 1.3), True), (int(size * 0.6), False)):
    monkeypatch.setattr(row_cache.shutil, 'disk_usage', lambda _, free=free: (
        shutil._ntuple_diskusage(10**12, 10**12 - free, free)))
    root = str(tmp_path / f'b{free}')
    if fits:
      row_cache.open_or_build(row_cache.Source(path), SPEC, chunk_rows=100, cache_root=root)
      continue
    with pytest.raises(OSError, match=r'needs about .* GiB more .* bytes per row, ~6\d\d '
                       'lines'):
      row_cache.open_or_build(row_cache.Source(path), SPEC, chunk_rows=100, cache_root=root)
    assert len(os.listdir(root)) == 1  # the lock file only


def test_a_strict_build_keeps_the_good_rows_so_a_rerun_need_not_parse(tmp_path, monkeypatch):
  lines = random_elm_lines(300, seed=10)
  lines[249] = elm_line(ctr_30='many')
  path = write(tmp_path, 'train.csv', lines)
  source = row_cache.Source(path)
  with pytest.raises(input_pipeline.DataError, match=r"train.csv:250: column 'ctr_30'.*"
                     r"1 bad rows .*skip_bad_rows=True") as error:
    row_cache.open_or_build(source, SPEC, chunk_rows=64)
  assert (error.value.path, error.value.line, error.value.column) == (path, 250, 'ctr_30')
  monkeypatch.setattr(input_pipeline, 'iter_row_chunks', None)  # nothing may be parsed now
  cache, _, stop = row_cache.open_or_build(source, SPEC, skip_bad_rows=True)
  assert stop == 299 and cache.manifest['stats']['bad_rows'] == 1
  monkeypatch.undo()
  # A file that is mostly bad (another format, say) stops at once, without a cache.
  criteo = write(tmp_path, 'criteo.txt', ['\t'.join(['0'] * 40)] * 300)
  with pytest.raises(input_pipeline.DataError,
                     match=r"\d+ bad rows .* in the first (\d+) lines read: is it the right file "
                           "for the 'elm' format") as error:
    row_cache.open_or_build(row_cache.Source(criteo), SPEC, chunk_rows=64)
  read = int(re.search(r'in the first (\d+) lines', str(error.value)).group(1))
  assert 100 < read <= 300  # the lines read when it stopped (it said 0: a whole file's count)
  assert not [n for n in os.listdir(tmp_path / 'dlrm_cache') if n.startswith('criteo.txt')
              and not n.endswith('.lock')]


def test_leftovers_of_killed_builds_are_removed(tmp_path):
  path = write(tmp_path, 'train.csv', random_elm_lines(10, seed=5))
  name = row_cache.cache_name(row_cache.Source(path), SPEC, (0, 1))
  root = tmp_path / 'dlrm_cache'
  dead = root / f'{name}.tmp-{socket.gethostname()}-999999999'
  alive = root / f'{name}.tmp-{socket.gethostname()}-{os.getpid()}x'
  other_host = root / f'{name}.tmp-elsewhere-1'
  # A stale cache is moved aside before it is deleted; a kill in between left it for good.
  dead_stale = root / f'{name}.stale-{socket.gethostname()}-999999999'
  for d in (dead, alive, other_host, dead_stale):
    d.mkdir(parents=True)
  row_cache.open_or_build(row_cache.Source(path), SPEC)
  assert not dead.exists() and alive.exists() and other_host.exists()
  assert not dead_stale.exists()
  # One of this process's own that its delete left (or a recycled pid's) failed the next
  # rebuild: "Directory not empty".
  own_stale = root / f'{name}.stale-{socket.gethostname()}-{os.getpid()}'
  (own_stale / 'rows').mkdir(parents=True)
  os.utime(path, ns=(1, 1))  # the source changed: the cache is stale and is rebuilt
  cache, _, _ = row_cache.open_or_build(row_cache.Source(path), SPEC)
  assert cache.manifest['rows'] == 10 and not own_stale.exists()


def test_skipped_bad_rows_are_recorded_and_a_strict_run_refuses_them(tmp_path):
  lines = random_elm_lines(20, seed=6)
  lines[4] = elm_line(avg_price='cheap')
  path = write(tmp_path, 'train.csv', lines)
  cache, _, stop = row_cache.open_or_build(row_cache.Source(path), SPEC, skip_bad_rows=True)
  assert stop == 19 and cache.manifest['stats']['bad_rows'] == 1
  assert cache.manifest['lines'] == 20
  stats = input_pipeline.ParseStats()
  row_cache.add_manifest_stats(stats, cache.manifest)
  assert (stats.rows, stats.bad_rows) == (19, 1)
  assert "train.csv:5: column 'avg_price'" in stats.bad_row_examples[0]
  with pytest.raises(input_pipeline.DataError, match="train.csv:5: column 'avg_price'") as e:
    row_cache.open_or_build(row_cache.Source(path), SPEC)
  assert (e.value.path, e.value.line, e.value.column) == (path, 5, 'avg_price')


# ------------------------------------------------------------------------------------------------
# Reading.

def test_unshuffled_batches_are_the_csv_batches(tmp_path):
  path = write(tmp_path, 'train.csv', random_elm_lines(203, seed=8))
  reader = reader_of(path, block_rows=10)
  cached = list(reader.batches(32, drop_remainder=False))
  csv = list(input_pipeline.batches(path, SPEC, 32, drop_remainder=False, chunk_rows=50))
  assert len(cached) == len(csv) == 7
  for a, b in zip(cached, csv):
    assert_batches_equal(a, b)


def test_shuffle_is_seeded_and_mixes_the_whole_file(tmp_path):
  reader = reader_of(numbered(tmp_path, 500), block_rows=10)

  def order(seed, epochs=1, **kwargs):
    return stream(reader.batches(25, shuffle_buffer=50, seed=seed, num_epochs=epochs,
                                 drop_remainder=False, **kwargs))

  first = order(1)
  assert sorted(first) == list(range(500)) and first != list(range(500))
  assert order(1) == first and order(2) != first
  # Blocks come from anywhere in the file: the first 50 rows reach far beyond a 50-row buffer.
  assert max(first[:50]) > 250
  # Each epoch has its own order; batches run across the epoch boundary.
  two = order(1, epochs=2)
  assert two[:500] == first and sorted(two[500:]) == list(range(500)) and two[500:] != first
  # ... down to which blocks come first, not only the order inside each window of 50.
  assert set(two[500:550]) != set(first[:50])


def test_first_batch_continues_the_same_order_without_reading_skipped_rows(tmp_path):
  reader = reader_of(numbered(tmp_path, 130), block_rows=8)
  full = list(reader.batches(16, shuffle_buffer=40, seed=3, num_epochs=None, num_batches=25))
  assert len(full) == 25
  reads = []
  units = [s.read_unit for s in reader.segments]
  reader.segments[0].read_unit = lambda u: (reads.append(u), units[0](u))[1]
  resumed = list(reader.batches(16, shuffle_buffer=40, seed=3, num_epochs=None, first_batch=17,
                                num_batches=25))
  assert len(resumed) == 8
  for a, b in zip(resumed, full[17:]):
    assert_batches_equal(a, b)
  # 17 batches = 272 rows = two epochs of 130 plus 12: the first two epochs are not read, only
  # the third (17 blocks) and the first window (40 / 8 = 5 blocks) of the fourth.
  assert len(reads) == reader.num_units + 5


def test_num_batches_pads_with_masked_batches_or_cuts(tmp_path):
  reader = reader_of(numbered(tmp_path, 50))
  padded = list(reader.batches(16, drop_remainder=False, num_batches=6))
  assert [int(b['mask'].sum()) for b in padded] == [16, 16, 16, 2, 0, 0]
  assert not padded[-1]['ids'].any() and not padded[-1]['weights'].any()
  assert stream(padded) == list(range(50))
  assert len(list(reader.batches(16, num_epochs=None, num_batches=9))) == 9
  assert len(list(reader.batches(16, drop_remainder=True))) == 3


def test_process_shares_cover_every_row_once_with_equal_batch_counts(tmp_path):
  path = numbered(tmp_path, 101)
  source = row_cache.Source(path)
  # No full cache: every process caches its own share of the lines.
  shares, counts = [], []
  for k in range(3):
    cache, start, stop = row_cache.open_or_build(source, SPEC, process_index=k, process_count=3)
    assert '.share' in cache.directory and (start, stop) == (0, cache.num_rows)
    reader = row_cache.RowReader([row_cache.cache_segment(cache, start, stop, 8)], SPEC)
    batches = list(reader.batches(8, drop_remainder=False, num_batches=row_cache.max_share_batches(
        [101], 3, 8)))
    counts.append(len(batches))
    shares.append(stream(batches))
  assert counts == [5, 5, 5]
  assert shares[0][:3] == [0, 3, 6]
  assert sorted(sum(shares, [])) == list(range(101))
  # Once a cache of all rows exists, processes read row ranges of it.
  full, _, _ = row_cache.open_or_build(source, SPEC)
  ranges = [row_cache.open_or_build(source, SPEC, process_index=k, process_count=3)
            for k in range(3)]
  assert all(cache.directory == full.directory for cache, _, _ in ranges)
  assert [(a, b) for _, a, b in ranges] == [(0, 33), (33, 67), (67, 101)]


def test_readers_memory_does_not_grow_with_epochs(tmp_path, monkeypatch):
  # Reading uses positional reads into fresh buffers, not a map of the files whose pages a
  # long run would keep resident: no way of mapping a file may be used while batches are read.
  import mmap  # pylint: disable=g-import-not-at-top
  reader = reader_of(numbered(tmp_path, 64), block_rows=8)
  it = reader.batches(8, shuffle_buffer=16, seed=0, num_epochs=None)

  def refuse(*args, **kwargs):
    raise AssertionError('the reader maps a file')

  monkeypatch.setattr(mmap, 'mmap', refuse)
  monkeypatch.setattr(np, 'memmap', refuse)
  monkeypatch.setattr(np, 'load', refuse)
  rows = stream(next(it) for _ in range(200))
  assert len(rows) == 1600 and sorted(rows) == sorted(list(range(64)) * 25)  # 25 epochs


@pytest.mark.parametrize('fused', [True, False])
def test_compact_batches_give_unique_rows_the_same_lookups_as_padded_ones(tmp_path, fused):
  # The trainer reads the cache in the compact layout; what reaches the device (unique ids,
  # entries, weights, segments) must be exactly what the padded layout gives, shuffled, across
  # block boundaries, with list truncation, missing scalars and trailing all-masked batches.
  from dlrm_jax import models  # pylint: disable=g-import-not-at-top
  lines = random_elm_lines(300, seed=11, list_len=6)
  lines += [elm_line(shop_id='', item_id_list=''), elm_line(time_type='x', time_type_list='x;y')]
  reader = reader_of(write(tmp_path, 'train.csv', lines), block_rows=16)
  kwargs = dict(shuffle_buffer=64, seed=3, drop_remainder=False, num_batches=12)
  padded = list(reader.batches(32, **kwargs))
  compact = list(reader.batches(32, compact=True, **kwargs))
  assert len(padded) == len(compact) == 12
  assert 'ids' not in compact[0] and compact[0]['values'].dtype == np.int32
  a, b = models.UniqueRows(SPEC, fused), models.UniqueRows(SPEC, fused)
  for p, c in zip(padded, compact):
    want, got = a(p), b(c)
    assert set(got) == set(want)
    for key in want:
      if key == 'unique_ids':
        for name in want[key]:
          np.testing.assert_array_equal(got[key][name], want[key][name], err_msg=name)
      else:
        assert got[key].dtype == want[key].dtype, key
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  assert np.count_nonzero(padded[0]['weights']) == compact[0]['values'].size > 0


def test_compact_from_padded_inverts_expand():
  lines = random_elm_lines(200, seed=5, list_len=6)
  lines += [elm_line(shop_id='', item_id_list=''), elm_line(time_type='x', time_type_list='x;y')]
  rows = row_cache.compact(input_pipeline.parse_chunk(lines, SPEC, path='p', first_line=1), SPEC)
  padded = row_cache.expand(rows, SPEC)
  compact = row_cache.compact_from_padded(padded, SPEC)
  expected = row_cache.compact_batch([(rows, row_cache.row_starts(rows), np.arange(len(rows)))],
                                     SPEC, len(rows))
  assert compact.keys() == expected.keys()
  for k in expected:
    np.testing.assert_array_equal(compact[k], expected[k], err_msg=k)
  assert compact['counts'].dtype == expected['counts'].dtype
  # A live slot after a dead one (or a weight other than the mean's) has no compact form.
  first_list = next(i for i, f in enumerate(SPEC.sparse) if f.is_list)
  broken = {k: v.copy() for k, v in padded.items()}
  broken['weights'][0, SPEC.slot_starts[first_list]:SPEC.slot_starts[first_list + 1]] = 0
  broken['weights'][0, SPEC.slot_starts[first_list] + 1] = 1.0
  with pytest.raises(ValueError, match='values come first'):
    row_cache.compact_from_padded(broken, SPEC)


def test_a_cache_built_in_many_chunks_reads_back_every_rows_ids(tmp_path):
  # offsets.npy must run on across the build's chunks; a cache of a big file is built in
  # many chunks (8192 rows each by default), and rows after the first chunk read others' ids.
  path = write(tmp_path, 'rows.csv', random_elm_lines(60, seed=3, list_len=4))
  cache, start, stop = row_cache.open_or_build(row_cache.Source(path), SPEC, chunk_rows=7)
  assert (start, stop) == (0, 60)
  offsets = np.load(os.path.join(cache.directory, 'offsets.npy'))
  counts = np.load(os.path.join(cache.directory, 'counts.npy')).astype(np.int64)
  np.testing.assert_array_equal(offsets, np.concatenate([[0], np.cumsum(counts.sum(1))]))
  expanded = row_cache.expand(cache.read(0, 60), SPEC)
  expanded.pop('mask')
  assert_batches_equal(expanded, parse_all(path))
  # And through the reader, in blocks that straddle the build's chunks.
  reader = row_cache.RowReader([row_cache.cache_segment(cache, start, stop, 5)], SPEC)
  (batch,) = reader.batches(60)
  batch.pop('mask')
  assert_batches_equal(batch, parse_all(path))


def test_every_first_batch_continues_the_uninterrupted_order(tmp_path):
  # A block shorter than block_rows (the file's last) counts its own rows when a resumed
  # run skips the windows before its first batch; 130 rows in blocks of 8 leave one of 2 rows.
  reader = reader_of(numbered(tmp_path, 130), block_rows=8)
  full = list(reader.batches(16, shuffle_buffer=40, seed=3, num_epochs=None, num_batches=30))
  for first in range(1, 30):
    resumed = list(reader.batches(16, shuffle_buffer=40, seed=3, num_epochs=None,
                                  first_batch=first, num_batches=30))
    assert len(resumed) == 30 - first
    for a, b in zip(resumed, full[first:]):
      assert_batches_equal(a, b)


def test_a_source_changed_while_being_cached_leaves_no_cache(tmp_path, monkeypatch):
  # A file rewritten during the build (its size or mtime moved) must not leave a cache that
  # claims the new file's identity while holding the old file's rows.
  path = write(tmp_path, 'rows.csv', random_elm_lines(40, seed=5))
  original = input_pipeline.iter_row_chunks

  def changing(*args, **kwargs):
    for i, chunk in enumerate(original(*args, **kwargs)):
      if i == 1:
        with open(path, 'a') as f:
          f.write(random_elm_lines(1, seed=6)[0] + '\n')
      yield chunk
  monkeypatch.setattr(input_pipeline, 'iter_row_chunks', changing)
  with pytest.raises(input_pipeline.DataError, match='changed while it was being cached'):
    row_cache.open_or_build(row_cache.Source(path), SPEC, chunk_rows=8)
  root = row_cache.default_cache_root(row_cache.Source(path))
  assert [e for e in os.listdir(root) if not e.endswith('.lock')] == []
