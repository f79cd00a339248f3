"""Bad input through the path a training run takes (files -> cache -> batches).

Each case either works or stops with a DataError naming the file, the line and the column; with
skip_bad_rows the bad rows are counted instead. A failed run leaves no cache behind and never
touches a cache that was already there.
"""

import gzip
import os

from hypothesis import example, given, settings, strategies as st
import numpy as np
import pytest

from dlrm_jax import data_sources
from dlrm_jax import feature_spec
from dlrm_jax import input_pipeline
from dlrm_jax import row_cache
from data_sources_test import config_for
from input_pipeline_test import elm_line

SPEC = feature_spec.elm_spec(hash_buckets=1000, embedding_dim=4, max_list_len=4)
CRITEO = feature_spec.criteo_spec(1000, embedding_dim=4)
GOOD = [elm_line(avg_price=str(i)) for i in range(6)]


def run(directory, spec=SPEC, **overrides):
  """Resolves, trains 2 steps and evaluates as the trainer does; returns (train, eval, stats)."""
  config = config_for(directory, **overrides)
  config.batch_size = 2
  config.eval_batch_size = 4
  stats = input_pipeline.ParseStats()
  data = data_sources.resolve(config, spec, process_index=0, process_count=1)
  train = list(data_sources.train_batches(config, spec, data, num_steps=2, stats=stats,
                                          process_index=0, process_count=1))
  evaluated = list(data_sources.eval_batches(config, spec, data, stats=stats, process_index=0,
                                             process_count=1))
  return train, evaluated, stats


def make(directory, train: bytes, evaluate: bytes = None, train_name='train.csv'):
  (directory / train_name).write_bytes(train)
  (directory / 'eval.csv').write_bytes(evaluate if evaluate is not None else
                                       ('\n'.join(GOOD) + '\n').encode())


def lines_bytes(lines, end='\n'):
  return (end.join(lines) + end).encode()


def cache_dirs(directory):
  root = directory / 'dlrm_cache'
  return sorted(n for n in os.listdir(root) if not n.endswith('.lock')) if root.exists() else []


def test_empty_and_bom_only_files(tmp_path):
  make(tmp_path, b'')
  with pytest.raises(input_pipeline.DataError, match='train.csv: the file is empty'):
    run(tmp_path)
  make(tmp_path, b'\xef\xbb\xbf')
  with pytest.raises(input_pipeline.DataError, match='train.csv: the file is empty'):
    run(tmp_path)
  assert cache_dirs(tmp_path) == []
  make(tmp_path, lines_bytes(GOOD), evaluate=b'')
  with pytest.raises(input_pipeline.DataError, match='eval.csv: the file is empty'):
    run(tmp_path)


def test_crlf_bom_and_a_missing_final_newline_read_as_plain_lines(tmp_path):
  make(tmp_path, lines_bytes(GOOD))
  plain, _, _ = run(tmp_path)
  make(tmp_path, b'\xef\xbb\xbf' + lines_bytes(GOOD, '\r\n')[:-2])
  windows, _, stats = run(tmp_path)
  for a, b in zip(plain, windows):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert stats.rows == 6 + 6 and stats.bad_rows == 0


def test_lines_ended_by_cr_alone_are_named_as_such(tmp_path):
  # Old Mac line ends: the whole file reads as one line of every row's fields.
  make(tmp_path, lines_bytes(GOOD, '\r'))
  with pytest.raises(input_pipeline.DataError, match=r'train.csv:1: .*CR alone\? convert'):
    run(tmp_path)
  make(tmp_path, lines_bytes(GOOD[:2] + [GOOD[2] + ',surplus'] + GOOD[3:]))
  with pytest.raises(input_pipeline.DataError, match='extra fields') as raised:
    run(tmp_path)
  assert 'CR alone' not in str(raised.value)


def test_a_file_without_line_feeds_stops_within_the_line_limit(tmp_path, monkeypatch):
  # Its bytes were gathered into one line, copied again for every 4 MiB block, until the end of
  # the file (11 GB for Criteo Kaggle's): only then were its fields counted.
  monkeypatch.setattr(input_pipeline, '_MAX_LINE_BYTES', 20000)
  monkeypatch.setattr(input_pipeline, '_READ_BYTES', 4096)
  path = os.path.join(tmp_path, 'rows.csv')
  with open(path, 'wb') as f:
    f.write(lines_bytes(GOOD[:3]) + lines_bytes(GOOD * 200, '\r'))
  blocks = []
  read = input_pipeline._read_blocks  # pylint: disable=protected-access
  monkeypatch.setattr(input_pipeline, '_read_blocks',
                      lambda *a: (blocks.append(b) or b for b in read(*a)))
  with pytest.raises(input_pipeline.DataError,
                     match=r'rows.csv:4: no line feed in 2\d,\d+ bytes: not a line of a CSV file '
                           r'\(lines ended by CR alone\? convert them to LF\)') as raised:
    list(input_pipeline.iter_row_chunks(path, SPEC))
  assert (raised.value.path, raised.value.line) == (path, 4)
  assert sum(map(len, blocks)) < 30000 < os.path.getsize(path)


@pytest.mark.parametrize('bad_line, line, column', [
    (GOOD[0][:len(GOOD[0]) // 2], 4, None),                       # truncated mid-row
    (GOOD[0] + ',surplus', 4, 'geohash12'),                       # a field too many
    (elm_line(ord_30='seven'), 4, 'ord_30'),                      # text in an integer field
    (elm_line(avg_price='1e39'), 4, 'avg_price'),                 # beyond float32
    (elm_line(total_amt_30='1' + '0' * 400), 4, 'total_amt_30'),  # beyond float64
    (elm_line(price_list='9e38;1'), 4, 'price_list'),  # a list mean beyond float32
    (elm_line(clicked='1.0'), 4, 'clicked'),
    (elm_line(clicked='0.5'), 4, 'clicked'),   # the reference parses the label as an integer
])
def test_bad_rows_name_file_line_and_column_or_are_counted(tmp_path, bad_line, line, column):
  lines = GOOD[:3] + [bad_line] + GOOD[3:]
  make(tmp_path, lines_bytes(lines))
  with pytest.raises(input_pipeline.DataError) as error:
    run(tmp_path)
  assert str(error.value).startswith(f'{tmp_path / "train.csv"}:{line}: column ')
  assert error.value.line == line
  if column:
    assert error.value.column == column
  # The good rows were cached all the same: the rerun with skip_bad_rows reads that cache.
  (cached,) = [n for n in cache_dirs(tmp_path) if n.startswith('train.csv')]
  train, evaluated, stats = run(tmp_path, skip_bad_rows=True)
  assert [n for n in cache_dirs(tmp_path) if n.startswith('train.csv')] == [cached]
  assert stats.bad_rows == 1 and stats.rows == 6 + 6
  assert f'train.csv:{line}:' in stats.bad_row_examples[0]
  assert len(train) == 2 and sum(b['mask'].sum() for b in evaluated) == 6


@pytest.mark.parametrize('use_cache', [True, False])
def test_a_header_line_is_named_as_one(tmp_path, use_cache):
  header = ','.join(c.name for c in feature_spec.ELM_COLUMNS)
  make(tmp_path, lines_bytes([header] + GOOD))
  with pytest.raises(input_pipeline.DataError, match=r":1: column 'clicked': .*a header line\?"):
    run(tmp_path, use_cache=use_cache)
  # Text at line 1 that is no column name, and a name-like value below line 1, get no such hint;
  # nor do a real first row's mistaken words (the hint said to delete the row).
  for lines in ([elm_line(clicked='1.0')] + GOOD, GOOD[:2] + [header] + GOOD[2:],
                [elm_line(avg_price='nan')] + GOOD, [elm_line(clicked='NA')] + GOOD):
    make(tmp_path, lines_bytes(lines))
    with pytest.raises(input_pipeline.DataError) as error:
      run(tmp_path, use_cache=use_cache)
    assert 'a header line' not in str(error.value), error.value


def test_a_truncated_last_line_is_the_only_bad_row(tmp_path):
  data = lines_bytes(GOOD)[:-20]  # the download stopped inside the last row
  make(tmp_path, data)
  with pytest.raises(input_pipeline.DataError, match=r'train.csv:6: column .*fields'):
    run(tmp_path)
  _, _, stats = run(tmp_path, skip_bad_rows=True)
  assert stats.bad_rows == 1


@pytest.mark.parametrize('use_cache', [False, True])
def test_elm_integers_must_fit_in_int32_as_for_the_reference(tmp_path, use_cache):
  # A 22-digit rank_7 was read, and the loss was NaN from the first step with no word of why.
  make(tmp_path, lines_bytes(GOOD[:3] + [elm_line(rank_7=str(2**31))] + GOOD[3:]))
  with pytest.raises(input_pipeline.DataError,
                     match=r"train.csv:4: column 'rank_7': '2147483648' does not fit in int32"):
    run(tmp_path, use_cache=use_cache)
  edge = elm_line(rank_7=str(2**31 - 1), gender=str(-2**31))
  make(tmp_path, lines_bytes(GOOD), lines_bytes([edge] + GOOD))
  _, evaluated, _ = run(tmp_path, use_cache=use_cache)
  dense = np.concatenate([b['dense'] for b in evaluated])
  assert dense.max() == np.float32(2**31 - 1) and dense.min() == -2**31


def test_huge_integers_are_fine_where_they_fit(tmp_path):
  ints = ['99999999999999999999', '-5'] + ['1'] * 11
  line = '\t'.join(['0'] + ints + ['68fd1e64'] * 26)
  (tmp_path / 'train.txt').write_text('\n'.join([line] * 4) + '\n')
  (tmp_path / 'eval.txt').write_text(line + '\n')
  train, _, _ = run(tmp_path, spec=CRITEO)
  # approx: the parser's float32 against float64.
  assert train[0]['dense'][0, 0] == pytest.approx(np.log1p(1e20))
  assert train[0]['dense'][0, 1] == 0  # negatives clamp to 0 before log(x + 1)


def test_non_utf8_bytes_are_hashed_as_bytes_or_named_in_numbers(tmp_path):
  raw = elm_line(shop_id='@').encode().replace(b'@', b'\xff\xfe')
  make(tmp_path, lines_bytes(GOOD[:3]) + raw + b'\n' + lines_bytes(GOOD[3:]))
  _, _, stats = run(tmp_path)
  assert stats.non_utf8_lines == 1
  raw = elm_line(ctr_30='@').encode().replace(b'@', b'\xff')
  make(tmp_path, lines_bytes(GOOD[:3]) + raw + b'\n')
  with pytest.raises(input_pipeline.DataError, match=r"train.csv:4: column 'ctr_30'"):
    run(tmp_path)


def test_damaged_gzip_names_the_file_and_line(tmp_path):
  whole = gzip.compress(lines_bytes(GOOD * 200))
  make(tmp_path, whole[:len(whole) // 2], train_name='train.csv.gz')
  with pytest.raises(input_pipeline.DataError, match=r'train.csv.gz: the compressed data is '
                     r'damaged in line \d+') as error:
    run(tmp_path)
  assert error.value.line > 1
  make(tmp_path, whole[:20] + b'\x00' * 40 + whole[60:], train_name='train.csv.gz')
  with pytest.raises(input_pipeline.DataError, match='train.csv.gz: the compressed data'):
    run(tmp_path)
  assert cache_dirs(tmp_path) == []
  make(tmp_path, whole, train_name='train.csv.gz')
  _, _, stats = run(tmp_path)
  assert stats.rows == 1200 + 6


def test_a_failed_run_leaves_the_existing_cache_alone(tmp_path):
  whole = gzip.compress(lines_bytes(GOOD * 50))
  make(tmp_path, whole, train_name='train.csv.gz')
  run(tmp_path)
  (name,) = [n for n in cache_dirs(tmp_path) if n.startswith('train.csv')]
  before = {f: (tmp_path / 'dlrm_cache' / name / f).read_bytes()
            for f in os.listdir(tmp_path / 'dlrm_cache' / name)}
  listing = cache_dirs(tmp_path)
  # A new download of the file is cut short: its cache cannot be built.
  make(tmp_path, whole[:len(whole) // 2], train_name='train.csv.gz')
  with pytest.raises(input_pipeline.DataError, match='compressed data is damaged'):
    run(tmp_path)
  after = {f: (tmp_path / 'dlrm_cache' / name / f).read_bytes()
           for f in os.listdir(tmp_path / 'dlrm_cache' / name)}
  assert after == before and cache_dirs(tmp_path) == listing


# Random files: any bytes either parse (identically through the cache and the CSV reader) or
# stop with a DataError that names the file; a failure leaves no cache.
VALID_PIECES = (GOOD[0], GOOD[1], elm_line(ctr_30=''), elm_line(shop_id_list=''))
PIECES = st.sampled_from([
    *VALID_PIECES, ',' * 38, '', '\r', '\xef\xbb\xbf', '\ufeff', 'a,b', elm_line(avg_price='1e40'),
    '\udcff', 'é'])


@settings(max_examples=40, deadline=None)
@given(st.lists(PIECES, min_size=0, max_size=6), st.sampled_from(['\n', '\r\n']),
       st.booleans())
@example(list(VALID_PIECES), '\r\n', False)
def test_fuzz_files(tmp_path_factory, pieces, end, final_newline):
  directory = tmp_path_factory.mktemp('fuzz')
  text = end.join(pieces) + (end if final_newline else '')
  data = text.encode('utf-8', 'surrogateescape')
  path = directory / 'train.csv'
  path.write_bytes(data)
  try:
    cache, start, stop = row_cache.open_or_build(row_cache.Source(str(path)), SPEC)
  except input_pipeline.DataError as error:
    assert str(path) in str(error)
    assert not pieces or not set(pieces) <= set(VALID_PIECES)  # a file of good rows parses
    with pytest.raises(input_pipeline.DataError):
      list(input_pipeline.iter_row_chunks(str(path), SPEC))
    # Either nothing was cached (an empty file) or every good row was, the bad ones counted.
    if cache_dirs(directory):
      cache, _, _ = row_cache.open_or_build(row_cache.Source(str(path)), SPEC,
                                            skip_bad_rows=True)
      assert cache.manifest['stats']['bad_rows'] > 0
    return
  reader = row_cache.RowReader([row_cache.cache_segment(cache, start, stop, 4)], SPEC)
  cached = list(reader.batches(8, drop_remainder=False))
  csv = list(input_pipeline.batches(str(path), SPEC, 8, drop_remainder=False))
  assert len(cached) == len(csv)
  for a, b in zip(cached, csv):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
