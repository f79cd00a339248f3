"""Tests of the CSV input pipeline: hand-written ELM and Criteo rows checked field by field.

The parsing speed is measured by running this file:
  PYTHONPATH=. python tests/input_pipeline_test.py [rows [list_len [max_len [num_workers]]]]
"""

import itertools
import math
import os
import re
import sys
import threading
import time

import farmhash
from hypothesis import example, given, settings, strategies as st
import numpy as np
import pytest

from dlrm_jax import feature_spec
from dlrm_jax import input_pipeline

MAX_LEN = 4
BUCKETS = 1000
SPEC = feature_spec.elm_spec(hash_buckets=BUCKETS, embedding_dim=4, max_list_len=MAX_LEN)
NAMES = [c.name for c in feature_spec.ELM_COLUMNS]

# A valid row with every field written out; tests override the fields they look at.
BASE = {
    'clicked': '1', 'user_id': 'u7', 'gender': '1', 'visit_city': '42', 'avg_price': '31.5',
    'is_supervip': '0', 'ctr_30': '3', 'ord_30': '2', 'total_amt_30': '120.25', 'shop_id': '900',
    'item_id': '55', 'city_id': '42', 'district_id': '7', 'shop_aoi_id': 'aoi1',
    'shop_geohash_6': 'wx4g0b', 'shop_geohash_12': 'wx4g0bm6c408', 'brand_id': '12',
    'category_1_id': '3', 'merge_standard_food_id': '88', 'rank_7': '1', 'rank_30': '4',
    'rank_90': '9', 'shop_id_list': '900;901', 'item_id_list': '55;56;57',
    'category_1_id_list': '3', 'merge_standard_food_id_list': '88;89',
    'brand_id_list': '12;13', 'price_list': '10;20', 'shop_aoi_id_list': 'aoi1',
    'shop_geohash6_list': 'wx4g0b', 'timediff_list': '5;6', 'hours_list': '11;13',
    'time_type_list': 'lunch;dinner', 'weekdays_list': '1;2', 'times': '3', 'hours': '12',
    'time_type': 'lunch', 'weekdays': '4', 'geohash12': 'wx4g0bm6c408',
}
assert list(BASE) == NAMES


def elm_line(**fields):
  unknown = set(fields) - set(NAMES)
  assert not unknown, unknown
  return ','.join(fields.get(name, BASE[name]) for name in NAMES)


def parse(lines, spec=SPEC, **kwargs):
  kwargs.setdefault('path', 'rows.csv')
  kwargs.setdefault('first_line', 1)
  return input_pipeline.parse_chunk(list(lines), spec, **kwargs)


def feature_slots(column, spec=SPEC):
  """Slots of the sparse feature reading `column`."""
  (index,) = [i for i, f in enumerate(spec.sparse) if f.column == column]
  return slice(spec.slot_starts[index], spec.slot_starts[index + 1])


def dense_index(column, spec=SPEC):
  return [f.column for f in spec.dense].index(column)


def hashed(value, rows=BUCKETS):
  return farmhash.fingerprint64(value) % rows


def list_ids_weights(out, column, row=0):
  s = feature_slots(column)
  return out['ids'][row, s].tolist(), out['weights'][row, s].tolist()


# ------------------------------------------------------------------------------------------------
# Hashing.

def test_fingerprint64_is_tensorflows_farmhash():
  # Literal values: 'hello' from the ELM notes, 'a'..'d' from TensorFlow's own
  # string_to_hash_bucket_fast test. A different hash library fails here.
  assert farmhash.fingerprint64('hello') == 13009744463427800296
  assert farmhash.fingerprint64('a') == 12917804110809363939
  assert farmhash.fingerprint64('d') == 4470636696479570465
  got = input_pipeline.fingerprint64(['hello', 'a', 'd', 'été', ''])
  assert got.dtype == np.uint64
  assert got[:3].tolist() == [13009744463427800296, 12917804110809363939, 4470636696479570465]
  assert got[3] == farmhash.fingerprint64('été'.encode('utf-8'))
  # TensorFlow's test: the four strings into 10 buckets are [9, 2, 2, 5].
  spec = feature_spec.criteo_spec(10)
  line = '\t'.join(['0'] + ['1'] * 13 + ['a', 'b', 'c', 'd'] + ['e'] * 22)
  assert parse([line], spec)['ids'][0, :4].tolist() == [9, 2, 2, 5]


def test_vectorised_fingerprint64_matches_farmhash_for_every_length():
  # The numpy hash has one branch per length range (0, 1-3, 4-7, 8-16, 17-32, longer): random
  # bytes of every length up to 70, undecodable ones included, against the C library.
  rng = np.random.default_rng(0)
  raw = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in range(71) for _ in range(40)]
  raw += [rng.integers(48, 58, n, dtype=np.uint8).tobytes() for n in range(71)]  # digits only
  strings = [r.decode('utf-8', 'surrogateescape') for r in raw]
  expected = [farmhash.fingerprint64(r) for r in raw]
  assert input_pipeline.fingerprint64(strings).tolist() == expected
  # And inside a chunk, as list tokens: same values modulo the table size.
  lines = [elm_line(item_id_list=';'.join(strings[i:i + MAX_LEN]).replace(',', '.')
                    .replace('\n', '.')) for i in range(0, 400, MAX_LEN)]
  out = parse(lines)
  for row, line in enumerate(lines):
    tokens = line.split(',')[NAMES.index('item_id_list')].split(';')[:MAX_LEN]
    assert list_ids_weights(out, 'item_id_list', row)[0][:len(tokens)] == [
        farmhash.fingerprint64(t.encode('utf-8', 'surrogateescape')) % BUCKETS for t in tokens]


def test_hashed_scalars_and_missing_values():
  rows = [elm_line(shop_id='0'), elm_line(shop_id=''), elm_line(shop_id='1.0'),
          elm_line(shop_id='1'), elm_line(shop_id=' 1')]
  out = parse(rows)
  s = feature_slots('shop_id')
  ids = out['ids'][:, s.start].tolist()
  assert ids == [hashed('0'), 0, hashed('1.0'), hashed('1'), hashed(' 1')]
  assert out['weights'][:, s.start].tolist() == [1, 0, 1, 1, 1]
  # The strings really are different values, not just different buckets of this table.
  fps = input_pipeline.fingerprint64(['0', '', '1.0', '1']).tolist()
  assert len(set(fps)) == 4


def test_string_defaults_are_hashed():
  out = parse([elm_line(visit_city='', city_id='', user_id='', times='', timediff_list='')])
  # visit_city and city_id default to '0' and share one table: both are '0' there.
  assert out['ids'][0, feature_slots('visit_city').start] == hashed('0')
  assert out['ids'][0, feature_slots('city_id').start] == hashed('0')
  assert out['weights'][0, feature_slots('city_id').start] == 1
  assert out['weights'][0, feature_slots('user_id').start] == 0
  assert out['ids'][0, feature_slots('times').start] == hashed('0')
  assert list_ids_weights(out, 'timediff_list') == ([hashed('0'), 0, 0, 0], [1, 0, 0, 0])


def test_list_features_are_mean_pooled():
  stats = input_pipeline.ParseStats()
  rows = [elm_line(shop_id_list=''), elm_line(shop_id_list='x'),
          elm_line(shop_id_list='x;y;z'), elm_line(shop_id_list='a;b;c;d;e;f'),
          elm_line(shop_id_list='x;;x')]
  out = parse(rows, stats=stats)
  assert list_ids_weights(out, 'shop_id_list', 0) == ([hashed(''), 0, 0, 0], [1, 0, 0, 0])
  assert list_ids_weights(out, 'shop_id_list', 1) == ([hashed('x'), 0, 0, 0], [1, 0, 0, 0])
  ids, weights = list_ids_weights(out, 'shop_id_list', 2)
  assert ids == [hashed('x'), hashed('y'), hashed('z'), 0]
  assert weights == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0])
  ids, weights = list_ids_weights(out, 'shop_id_list', 3)
  assert ids == [hashed(v) for v in 'abcd']
  assert weights == pytest.approx([0.25] * 4)
  ids, weights = list_ids_weights(out, 'shop_id_list', 4)
  assert ids == [hashed('x'), hashed(''), hashed('x'), 0]
  assert weights == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0])
  # 'e' and 'f' of row 3; every other list of the base row fits in MAX_LEN.
  assert stats.truncated_values == 2
  assert stats.rows == 5


def test_shared_tables_give_the_same_row():
  out = parse([elm_line(shop_id='s1', shop_id_list='s2;s1', shop_geohash_12='g',
                        geohash12='g')])
  scalar = out['ids'][0, feature_slots('shop_id').start]
  assert out['ids'][0, feature_slots('shop_id_list')][1] == scalar == hashed('s1')
  assert (out['ids'][0, feature_slots('shop_geohash_12').start]
          == out['ids'][0, feature_slots('geohash12').start] == hashed('g'))


def test_elm_features_are_deeprecs_columns():
  # DeepRec's tianchi/DLRM/train.py, written out: SHARE_EMBEDDING_COLS share a table per group,
  # EMBEDDING_COLS have one each, TYPE_COLS a vocabulary table each over TYPE_LIST (its order is
  # the rows' order, so a checkpoint reads the same rows); every HISTORY_COLUMN but the two
  # continuous ones (averaged into dense inputs) and the unused weekdays_list is a ';' list.
  shared = [['shop_id', 'shop_id_list'], ['item_id', 'item_id_list'],
            ['category_1_id', 'category_1_id_list'],
            ['merge_standard_food_id', 'merge_standard_food_id_list'],
            ['brand_id', 'brand_id_list'], ['shop_aoi_id', 'shop_aoi_id_list'],
            ['shop_geohash_12', 'geohash12'], ['shop_geohash_6', 'shop_geohash6_list'],
            ['visit_city', 'city_id']]
  own = ['user_id', 'district_id', 'times', 'timediff_list', 'time_type', 'time_type_list']
  table_of = {f.column: f.table for f in SPEC.sparse}
  assert sorted(table_of) == sorted([c for group in shared for c in group] + own)
  groups = {frozenset(c for c in table_of if table_of[c] == t) for t in table_of.values()}
  assert groups == {frozenset(g) for g in shared} | {frozenset([c]) for c in own}
  lists = {'shop_id_list', 'item_id_list', 'category_1_id_list', 'merge_standard_food_id_list',
           'brand_id_list', 'shop_aoi_id_list', 'shop_geohash6_list', 'timediff_list',
           'time_type_list'}
  assert {f.column for f in SPEC.sparse if f.is_list} == lists
  assert all(f.max_len == (MAX_LEN if f.is_list else 1) for f in SPEC.sparse)
  assert feature_spec.ELM_TIME_TYPES == ('lunch', 'night', 'dinner', 'tea', 'breakfast')
  vocab = {f.column: f.vocabulary for f in SPEC.sparse if f.vocabulary}
  assert vocab == dict.fromkeys(['time_type', 'time_type_list'], feature_spec.ELM_TIME_TYPES)
  assert [d.column for d in SPEC.dense] == [
      'gender', 'avg_price', 'is_supervip', 'ctr_30', 'ord_30', 'total_amt_30', 'rank_7',
      'rank_30', 'rank_90', 'hours', 'price_list', 'hours_list']
  # The parsed row agrees: a two-value timediff list fills two slots of weight 1/2.
  batch = parse([elm_line(timediff_list='5;6')])
  np.testing.assert_array_equal(batch['weights'][0, feature_slots('timediff_list')][:2], 0.5)
  with pytest.raises(ValueError, match="feature 'shop_id_list' has max_len 0"):
    feature_spec.elm_spec(max_list_len=0)


def test_vocabulary_features_drop_out_of_vocabulary_values():
  stats = input_pipeline.ParseStats()
  rows = [elm_line(time_type='lunch', time_type_list='tea;brunch;night'),
          elm_line(time_type='brunch', time_type_list='brunch'),
          elm_line(time_type='', time_type_list=''),
          elm_line(time_type='breakfast', time_type_list='tea;tea;lunch;dinner;night;x')]
  out = parse(rows, stats=stats)
  scalar = feature_slots('time_type').start
  vocab = feature_spec.ELM_TIME_TYPES
  assert out['ids'][:, scalar].tolist() == [vocab.index('lunch'), 0, 0, vocab.index('breakfast')]
  assert out['weights'][:, scalar].tolist() == [1, 0, 0, 1]
  ids, weights = list_ids_weights(out, 'time_type_list', 0)
  assert ids == [vocab.index('tea'), vocab.index('night'), 0, 0]
  assert weights == pytest.approx([0.5, 0.5, 0, 0])
  assert list_ids_weights(out, 'time_type_list', 1) == ([0] * 4, [0] * 4)
  assert list_ids_weights(out, 'time_type_list', 2) == ([0] * 4, [0] * 4)
  ids, weights = list_ids_weights(out, 'time_type_list', 3)
  assert ids == [vocab.index(v) for v in ('tea', 'tea', 'lunch', 'dinner')]
  assert weights == pytest.approx([0.25] * 4)
  assert stats.truncated_values == 1  # 'night' (the fifth in-vocabulary value) of row 3
  assert stats.oov_values == 4  # 'brunch' x3 and 'x'; the empty values are missing, not OOV


def test_dense_features():
  rows = [elm_line(price_list='10;20;33', hours_list='1;2', gender='-1', avg_price='2.5e1'),
          elm_line(price_list='', hours_list='', gender='', avg_price='', ctr_30='', hours=' 7 ')]
  out = parse(rows)
  dense = out['dense']
  assert dense.dtype == np.float32 and dense.shape == (2, 12)
  assert dense[0, dense_index('price_list')] == pytest.approx(21.0)
  assert dense[0, dense_index('hours_list')] == pytest.approx(1.5)
  assert dense[0, dense_index('gender')] == -1
  assert dense[0, dense_index('avg_price')] == 25
  assert dense[0, dense_index('total_amt_30')] == pytest.approx(120.25)
  assert dense[0, dense_index('rank_90')] == 9
  # Empty fields take the column defaults: '0', '-0', -99, 0.0.
  assert dense[1, dense_index('price_list')] == 0
  assert dense[1, dense_index('hours_list')] == 0
  assert dense[1, dense_index('gender')] == -99
  assert dense[1, dense_index('avg_price')] == 0
  assert dense[1, dense_index('ctr_30')] == 0
  assert dense[1, dense_index('hours')] == 7
  assert out['label'].tolist() == [1, 1]


NUMBER = st.one_of(
    st.text(alphabet=st.sampled_from(list('0123456789+-.eE _')), max_size=20),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.integers(-10**20, 10**20).map(str),
    st.decimals(places=6, allow_nan=False, allow_infinity=False).map(str))


@settings(max_examples=300, deadline=None)
@given(st.lists(NUMBER, min_size=1, max_size=8))
# Zeros' signs, spellings float() takes and the grammar does not, and 17-18 digit decimals that a
# naive digits / 10**k rounds wrongly.
@example(['-0', '+0', '-0.0', '007', '1_0', ' 7 ', '.5', '5.', '-.5e1', '1e999', 'nan', '١'])
@example(['56685727.3510445541', '9407420969.5309743', '4249369153131.93242', '0.1', '-2.675'])
def test_numbers_parse_exactly_as_python(values):
  # The numpy fast path for plain decimals must give float()'s exact bits, and only the strict
  # grammar may pass (no '1_0', no 'nan').
  for kind in ('float', 'int'):
    parsed, problems = input_pipeline._parse_numbers(  # pylint: disable=protected-access
        values, kind)
    for i, value in enumerate(values):
      grammar = r'\s*[+-]?\d+\s*' if kind == 'int' else (
          r'\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*')
      valid = re.fullmatch(grammar, value, re.ASCII) and math.isfinite(float(value))
      if not valid:
        assert i in problems, (kind, value)
        continue
      assert i not in problems, (kind, value, problems.get(i))
      expected = float(int(value)) if kind == 'int' else float(value)
      assert parsed[i] == expected and (
          math.copysign(1, parsed[i]) == math.copysign(1, expected)), (kind, value)


# ------------------------------------------------------------------------------------------------
# Bad rows.

@pytest.mark.parametrize('line, column, fragment', [
    (elm_line()[:elm_line().rindex(',')], 'geohash12', '38 fields, expected 39'),
    (elm_line() + ',extra', 'geohash12', '40 fields'),
    (elm_line(ctr_30='abc'), 'ctr_30', "'abc'"),
    (elm_line(ord_30='1.0'), 'ord_30', 'expected an integer'),
    (elm_line(clicked='2'), 'clicked', 'label must be 0 or 1'),
    # TorchRec's mark of an unlabelled row: in a CSV it is an error, not a negative.
    (elm_line(clicked='-1'), 'clicked', 'label must be 0 or 1'),
    (elm_line(avg_price='1.2.3'), 'avg_price', 'a number'),
    (elm_line(avg_price='nan'), 'avg_price', 'a number'),
    (elm_line(total_amt_30='1e999'), 'total_amt_30', 'out of range'),
    (elm_line(rank_7='1_000'), 'rank_7', 'expected an integer'),
    (elm_line(price_list='1;;2'), 'price_list', 'list value 2'),
    (elm_line(weekdays='x'), 'weekdays', "'x'"),  # read but unused, still validated
])
def test_bad_rows_name_file_line_and_column(line, column, fragment):
  good = elm_line()
  with pytest.raises(input_pipeline.DataError) as error:
    parse([good, good, line, good], path='/data/train.csv', first_line=101)
  message = str(error.value)
  assert message.startswith('/data/train.csv:103: ')
  assert f"column '{column}'" in message
  assert fragment in message
  assert (error.value.path, error.value.line, error.value.column) == (
      '/data/train.csv', 103, column)
  assert isinstance(error.value, ValueError)


def test_first_bad_row_is_reported():
  lines = [elm_line(), elm_line(clicked='3'), elm_line(ctr_30='x')[:-5]]
  with pytest.raises(input_pipeline.DataError, match=r'rows.csv:2: column .clicked.'):
    parse(lines)


def test_skip_bad_rows_counts_and_keeps_the_rest():
  stats = input_pipeline.ParseStats()
  lines = [elm_line(avg_price='1'), elm_line(ctr_30='abc'), elm_line(avg_price='2'),
           'garbage', elm_line(ord_30='1.0', clicked='5'), elm_line(avg_price='3')]
  out = parse(lines, skip_bad_rows=True, stats=stats)
  assert out['dense'][:, dense_index('avg_price')].tolist() == [1, 2, 3]
  assert out['ids'].shape == (3, SPEC.num_slots)
  assert (stats.rows, stats.bad_rows, stats.lines) == (3, 3, 6)
  # One message per bad line, naming its first bad column.
  assert [e.split(':')[1] for e in stats.bad_row_examples] == ['2', '4', '5']
  assert "column 'clicked'" in stats.bad_row_examples[2]


# ------------------------------------------------------------------------------------------------
# Files.

def write(tmp_path, name, data):
  path = tmp_path / name
  path.write_bytes(data if isinstance(data, bytes) else data.encode('utf-8'))
  return str(path)


def read_all(paths, spec=SPEC, **kwargs):
  chunks = list(input_pipeline.iter_row_chunks(paths, spec, **kwargs))
  return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def test_crlf_and_byte_order_mark(tmp_path):
  lines = [elm_line(clicked='0', user_id='a'), elm_line(user_id='b', geohash12='g1'),
           elm_line(geohash12='')]
  plain = read_all(write(tmp_path, 'lf.csv', '\n'.join(lines) + '\n'))
  windows = read_all(write(tmp_path, 'crlf.csv',
                           b'\xef\xbb\xbf' + '\r\n'.join(lines).encode() + b'\r\n'))
  no_end = read_all(write(tmp_path, 'noend.csv', '\r\n'.join(lines)))
  for out in (windows, no_end):
    for key in plain:
      np.testing.assert_array_equal(out[key], plain[key])
  assert plain['label'].tolist() == [0, 1, 1]
  assert plain['ids'][0, feature_slots('user_id').start] == hashed('a')
  assert plain['weights'][2, feature_slots('geohash12').start] == 0


def test_non_utf8_bytes_are_hashed_as_raw_bytes(tmp_path):
  stats = input_pipeline.ParseStats()
  raw = elm_line(shop_id='@').encode().replace(b'@', b'\xff\xfeid')
  out = read_all(write(tmp_path, 'latin.csv', raw + b'\n' + elm_line().encode() + b'\n'),
                 stats=stats)
  assert out['ids'][0, feature_slots('shop_id').start] == (
      farmhash.fingerprint64(b'\xff\xfeid') % BUCKETS)
  assert stats.non_utf8_lines == 1
  bad = write(tmp_path, 'latin_int.csv', elm_line(ctr_30='@').encode().replace(b'@', b'\xff'))
  with pytest.raises(input_pipeline.DataError, match=r'latin_int.csv:1: column .ctr_30.'):
    read_all(bad)


def test_missing_and_empty_files(tmp_path):
  missing = str(tmp_path / 'nope.csv')
  with pytest.raises(FileNotFoundError, match='nope.csv'):
    list(input_pipeline.iter_row_chunks([missing], SPEC))
  with pytest.raises(FileNotFoundError, match='nope.csv'):
    input_pipeline.batches(missing, SPEC, 4)
  empty = write(tmp_path, 'empty.csv', b'')
  with pytest.raises(input_pipeline.DataError, match='empty.csv: the file is empty'):
    list(input_pipeline.iter_row_chunks(empty, SPEC))
  bom_only = write(tmp_path, 'bom.csv', b'\xef\xbb\xbf')
  with pytest.raises(input_pipeline.DataError, match='bom.csv: the file is empty'):
    list(input_pipeline.iter_row_chunks(bom_only, SPEC))


def test_line_numbers_across_chunks_and_files(tmp_path):
  first = write(tmp_path, 'a.csv', '\n'.join([elm_line()] * 5) + '\n')
  lines = [elm_line()] * 7
  lines[5] = elm_line(gender='m')
  second = write(tmp_path, 'b.csv', '\n'.join(lines))
  with pytest.raises(input_pipeline.DataError, match=r'b.csv:6: column .gender.'):
    read_all([first, second], chunk_rows=2)
  # With two processes, the bad line (global line 10) belongs to process 0.
  with pytest.raises(input_pipeline.DataError, match=r'b.csv:6: column .gender.'):
    read_all([first, second], chunk_rows=2, process_index=0, process_count=2)
  assert len(read_all([first, second], chunk_rows=2, process_index=1, process_count=2)[
      'label']) == 6


def test_count_rows(tmp_path):
  assert input_pipeline.count_rows(write(tmp_path, 'a.csv', 'x\ny\nz\n')) == 3
  assert input_pipeline.count_rows(write(tmp_path, 'b.csv', 'x\ny\nz')) == 3
  assert input_pipeline.count_rows(write(tmp_path, 'c.csv', '')) == 0
  with pytest.raises(FileNotFoundError, match='nope.csv'):
    input_pipeline.count_rows(str(tmp_path / 'nope.csv'))


def test_gzip_files_read_as_their_text(tmp_path):
  import gzip  # pylint: disable=g-import-not-at-top
  lines = random_elm_lines(40, seed=11)
  plain = write(tmp_path, 'a.csv', '\n'.join(lines) + '\n')
  packed = write(tmp_path, 'a.csv.gz', gzip.compress(('\n'.join(lines) + '\n').encode()))
  # Recognised by content, not name.
  unnamed = write(tmp_path, 'b.csv', gzip.compress(('\n'.join(lines)).encode()))
  expected = read_all(plain)
  for path in (packed, unnamed):
    got = read_all(path, chunk_rows=7)
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key])
    assert input_pipeline.count_rows(path) == 40
  assert abs(input_pipeline.estimate_lines(packed) - 40) <= 1
  assert input_pipeline.count_rows(write(tmp_path, 'bom.csv', b'\xef\xbb\xbf')) == 0


def test_line_ranges_read_only_those_lines_and_number_them_truly(tmp_path):
  lines = [elm_line(avg_price=str(i)) for i in range(30)]
  lines[25] = elm_line(ctr_30='x')
  path = write(tmp_path, 'a.csv', '\n'.join(lines) + '\n')
  stats = input_pipeline.ParseStats()
  out = read_all(path, line_ranges=[(10, 20)], chunk_rows=3, stats=stats)
  assert out['dense'][:, dense_index('avg_price')].tolist() == list(range(10, 20))
  assert stats.source_lines == 10
  with pytest.raises(input_pipeline.DataError, match=r'a.csv:26: column .ctr_30.'):
    read_all(path, line_ranges=[(20, None)], chunk_rows=4)
  # Two processes share the range's lines; a range past the end reads nothing.
  shares = [read_all(path, line_ranges=[(3, 9)], process_index=k, process_count=2)['dense'][
      :, dense_index('avg_price')].tolist() for k in range(2)]
  assert shares == [[3, 5, 7], [4, 6, 8]]
  assert not list(input_pipeline.iter_row_chunks(path, SPEC, line_ranges=[(40, None)]))
  second = write(tmp_path, 'b.csv', '\n'.join(lines[:5]) + '\n')
  both = read_all([path, second], line_ranges=[(28, 29), None])
  assert both['dense'][:, dense_index('avg_price')].tolist() == [28, 0, 1, 2, 3, 4]


def test_dense_values_must_fit_float32():
  with pytest.raises(input_pipeline.DataError, match=r"column 'avg_price': '3.5e38' does not "
                     'fit in float32'):
    parse([elm_line(avg_price='3.5e38')])
  out = parse([elm_line(avg_price='3.4e38', ctr_30=str(2**31 - 1))])
  assert np.isfinite(out['dense']).all()
  # A larger integer fits in float32 too, but is refused as the reference refuses it (int32).
  with pytest.raises(input_pipeline.DataError, match=r"column 'ctr_30': .* does not fit in int32"):
    parse([elm_line(ctr_30='9' * 30)])


def _row_count(chunk):
  return len(chunk['label'])


def test_postprocess_runs_where_the_chunk_is_parsed(tmp_path):
  path = write(tmp_path, 'a.csv', '\n'.join(random_elm_lines(50, seed=12)) + '\n')
  for workers in (0, 2):
    assert list(input_pipeline.iter_row_chunks(path, SPEC, chunk_rows=16, num_workers=workers,
                                               postprocess=_row_count)) == [16, 16, 16, 2]


# ------------------------------------------------------------------------------------------------
# Criteo.

def test_criteo_rows():
  spec = feature_spec.criteo_spec(10000)
  ints = ['', '-3', '0', '5', '1000'] + ['2'] * 8
  cats = ['68fd1e64', '', '80e26c9b'] + ['fb936136'] * 23
  out = parse(['\t'.join(['1'] + ints + cats)], spec)
  expected = np.log1p([0, 0, 0, 5, 1000] + [2] * 8).astype(np.float32)
  # float32 log1p against numpy's float64 one rounded to float32: an ulp (1.2e-7) at most.
  np.testing.assert_allclose(out['dense'][0], expected, rtol=1e-6)
  # An empty C field is DeepRec's default ' ', hashed and looked up like any category.
  assert out['ids'][0, :3].tolist() == [hashed('68fd1e64', 10000), hashed(' ', 10000),
                                        hashed('80e26c9b', 10000)]
  assert out['weights'][0, :3].tolist() == [1, 1, 1]
  assert out['ids'].shape == (1, 26) and out['label'].tolist() == [1]
  with pytest.raises(input_pipeline.DataError, match="column 'I2'"):
    parse(['\t'.join(['0', '1', '2.5'] + ['1'] * 11 + cats)], spec)


def test_criteo_ids_are_remainders_modulo_each_tables_own_rows():
  # Criteo configs give each table its size (criteo_table_rows; DeepRec's differ by table):
  # every other test used one size for all 26, so hashing modulo the wrong table went unseen.
  rows = [1000 + 7 * i for i in range(26)]
  spec = feature_spec.criteo_spec(rows)
  cats = [f'{0x9e3779b9 * (i + 1) % 2**32:08x}' for i in range(26)]
  out = parse(['\t'.join(['0'] + ['1'] * 13 + cats)], spec)
  assert out['ids'][0].tolist() == [hashed(c, r) for c, r in zip(cats, rows)]
  with pytest.raises(input_pipeline.DataError, match="column 'label': label must be 0 or 1"):
    parse(['\t'.join(['-1'] + ['1'] * 13 + cats)], spec)



@pytest.mark.parametrize('spec', [SPEC, feature_spec.criteo_spec(10000)], ids=['elm', 'criteo'])
def test_rows_to_score_may_lack_the_label_column(tmp_path, spec):
  rng = np.random.default_rng(5)
  if spec.name == 'elm':
    labeled = random_elm_lines(20, seed=12)
  else:
    labeled = ['\t'.join([str(i % 2)] + [str(v) for v in rng.integers(0, 50, 13)]
                         + [f'{v:08x}' for v in rng.integers(0, 2**32, 26)]) for i in range(20)]
  label = spec.column_index(spec.label)

  def drop_label(line):
    fields = line.split(spec.delimiter)
    return spec.delimiter.join(fields[:label] + fields[label + 1:])

  with_path = write(tmp_path, 'with.txt', '\n'.join(labeled) + '\n')
  without_path = write(tmp_path, 'without.txt', '\n'.join(map(drop_label, labeled)) + '\n')
  assert input_pipeline.scoring_spec([with_path], spec) is spec
  unlabeled = input_pipeline.scoring_spec([without_path], spec)
  assert unlabeled == spec.unlabeled() and not unlabeled.label
  expected, got = read_all(with_path, spec), read_all(without_path, unlabeled)
  for key in ('dense', 'ids', 'weights'):
    np.testing.assert_array_equal(got[key], expected[key])
  assert expected['label'].any() and not got['label'].any()
  # One form per file: a labeled row among unlabeled ones is a bad row, named.
  mixed = write(tmp_path, 'mixed.txt', '\n'.join([drop_label(labeled[0]), labeled[1]]) + '\n')
  with pytest.raises(input_pipeline.DataError, match=r'mixed.txt:2: .*extra fields'):
    read_all(mixed, input_pipeline.scoring_spec([mixed], spec))


# ------------------------------------------------------------------------------------------------
# Batches.

def numbered_file(tmp_path, n, name='rows.csv'):
  """n rows whose avg_price is the row's index, so batches can be traced to lines."""
  lines = [elm_line(avg_price=str(i), clicked=str(i % 2)) for i in range(n)]
  return write(tmp_path, name, '\n'.join(lines) + '\n')


def row_numbers(batch_list):
  column = dense_index('avg_price')
  return [int(b['dense'][i, column]) for b in batch_list for i in range(len(b['mask']))
          if b['mask'][i]]


def test_batches_in_file_order(tmp_path):
  path = numbered_file(tmp_path, 50)
  full = list(input_pipeline.batches(path, SPEC, 16))
  assert len(full) == 3
  assert all(b['ids'].shape == (16, SPEC.num_slots) and b['mask'].sum() == 16 for b in full)
  assert row_numbers(full) == list(range(48))
  padded = list(input_pipeline.batches(path, SPEC, 16, drop_remainder=False, chunk_rows=7))
  assert len(padded) == 4
  last = padded[-1]
  assert last['mask'].tolist() == [1, 1] + [0] * 14
  assert not last['ids'][2:].any() and not last['weights'][2:].any()
  assert not last['dense'][2:].any() and not last['label'][2:].any()
  assert row_numbers(padded) == list(range(50))
  assert set(padded[0]) == {'label', 'dense', 'ids', 'weights', 'mask'}


def test_batches_run_across_epochs(tmp_path):
  path = numbered_file(tmp_path, 10)
  out = list(input_pipeline.batches(path, SPEC, 4, num_epochs=3))
  assert len(out) == 7  # 30 rows
  assert row_numbers(out) == (list(range(10)) * 3)[:28]
  forever = input_pipeline.batches(path, SPEC, 4, num_epochs=None)
  assert len(list(itertools.islice(forever, 20))) == 20


def test_shuffle_is_a_seeded_permutation(tmp_path):
  path = numbered_file(tmp_path, 300)

  def order(seed, **kwargs):
    return row_numbers(input_pipeline.batches(
        path, SPEC, 32, shuffle_buffer=64, seed=seed, drop_remainder=False, chunk_rows=50,
        **kwargs))

  first = order(1)
  assert sorted(first) == list(range(300))
  assert first != list(range(300))
  assert order(1) == first
  assert order(2) != first
  # The order does not depend on how the rows are chunked or batched.
  two_epochs = row_numbers(input_pipeline.batches(
      path, SPEC, 30, shuffle_buffer=64, seed=1, num_epochs=2, chunk_rows=7))
  assert two_epochs[:300] == first
  assert sorted(two_epochs[300:]) == list(range(300)) and two_epochs[300:] != first
  # A buffer of 64 cannot move a row more than 64 places earlier (tf.data's bound).
  assert all(position >= row - 64 for position, row in enumerate(first))
  # As with tf.data, a row can stay in the buffer long: about a third of the first 64 rows are
  # still there after 64 more have come in (a block-wise shuffle would have none).
  assert sum(row < 64 for row in first[128:]) > 5
  # A buffer larger than the file: the whole epoch comes out of the final draining, shuffled.
  whole = row_numbers(input_pipeline.batches(path, SPEC, 32, shuffle_buffer=1000, seed=1,
                                             drop_remainder=False))
  assert sorted(whole) == list(range(300)) and whole[:100] != list(range(100))


def test_process_shares_are_disjoint_and_cover_all_rows(tmp_path):
  paths = [numbered_file(tmp_path, 13, 'a.csv'), numbered_file(tmp_path, 8, 'b.csv')]
  shares = []
  for k in range(3):
    out = read_all(paths, chunk_rows=4, process_index=k, process_count=3)
    shares.append(out['dense'][:, dense_index('avg_price')].astype(int).tolist())
  assert [len(s) for s in shares] == [7, 7, 7]
  everything = sorted(sum(shares, []))
  assert everything == sorted(list(range(13)) + list(range(8)))
  # Lines are numbered across the files: b.csv's first line is global line 13.
  assert shares[0] == [0, 3, 6, 9, 12, 2, 5]
  assert shares[1] == [1, 4, 7, 10, 0, 3, 6]
  with pytest.raises(ValueError, match=re.escape('process_index 3 is not in [0, 3)')):
    next(input_pipeline.iter_row_chunks(paths, SPEC, process_index=3, process_count=3))


def test_worker_processes_match_the_serial_parser(tmp_path):
  lines = random_elm_lines(120, seed=5)
  lines[51] = elm_line(ctr_30='x')
  lines[90] = elm_line(price_list='1;a')
  path = write(tmp_path, 'random.csv', '\n'.join(lines) + '\n')
  serial_stats, worker_stats = input_pipeline.ParseStats(), input_pipeline.ParseStats()
  kwargs = dict(chunk_rows=16, skip_bad_rows=True, process_index=1, process_count=2)
  serial = read_all(path, stats=serial_stats, **kwargs)
  workers = read_all(path, stats=worker_stats, num_workers=2, **kwargs)
  for key in serial:
    np.testing.assert_array_equal(workers[key], serial[key])
  assert worker_stats == serial_stats
  # Process 1 reads the odd lines (0-based): line 52 is bad, line 91 is process 0's.
  assert (worker_stats.rows, worker_stats.bad_rows) == (59, 1)
  assert worker_stats.bad_row_examples == [
      f"{path}:52: column 'ctr_30': expected an integer, got 'x'"]
  with pytest.raises(input_pipeline.DataError, match=r'random.csv:91: column .price_list.') as e:
    list(input_pipeline.batches(path, SPEC, 8, num_workers=2, chunk_rows=16, process_index=0,
                                process_count=2))
  assert (e.value.line, e.value.column) == (91, 'price_list')


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='prctl is Linux only')
def test_parse_workers_end_with_a_killed_parent(tmp_path):
  # SIGKILL (or SIGTERM while caching) runs no cleanup in the parent: its parse workers used to
  # wait for work forever, re-parented to init.
  import signal  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  path = write(tmp_path, 'rows.csv', '\n'.join(random_elm_lines(200, seed=1)) + '\n')
  code = ('import multiprocessing, sys, time\n'
          'from dlrm_jax import input_pipeline\n'
          'from input_pipeline_test import SPEC\n'
          f'chunks = input_pipeline.iter_row_chunks({path!r}, SPEC, chunk_rows=16, num_workers=2)\n'
          'next(chunks)\n'
          'print(*[p.pid for p in multiprocessing.active_children()], flush=True)\n'
          'time.sleep(60)\n')
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(
          os.path.abspath(__file__)))]))
  parent = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True,
                            env=env)
  try:
    workers = [int(p) for p in parent.stdout.readline().split()]
  finally:
    parent.send_signal(signal.SIGKILL)
    parent.wait()
  assert len(workers) >= 2
  deadline = time.time() + 20
  alive = lambda pid: os.path.exists(f'/proc/{pid}') and 'Z' not in open(
      f'/proc/{pid}/stat').read().split(')')[-1].split()[0]
  while any(alive(w) for w in workers) and time.time() < deadline:
    time.sleep(0.1)
  assert not [w for w in workers if alive(w)]


def test_a_script_without_the_main_guard_stops_with_a_message_instead_of_waiting(tmp_path):
  # The spawned parse workers run their parent's script again as they start. Unguarded, the
  # script trained again in each: a run directory of its own, then a wait forever for the
  # row-cache lock its parent held while waiting for the workers.
  import subprocess  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  script = tmp_path / 'sweep.py'
  script.write_text(
      'from configs import default\n'
      'from dlrm_jax import train\n'
      "config = default.get_config('tiny')\n"
      f'config.output_dir = {str(tmp_path / "out")!r}\n'
      'config.num_workers = 2\n'
      'config.steps = 2\n'
      'config.no_eval = True\n'
      'train.train_and_evaluate(config)\n')
  proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                        timeout=300, env=dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert ('train_and_evaluate was called while a new process (a CSV parse worker) was starting'
          in proc.stderr), proc.stderr[-3000:]
  assert 'RuntimeError: a CSV parse worker process stopped' in proc.stderr, proc.stderr[-3000:]
  assert os.listdir(tmp_path / 'out') == ['planted_elm']  # no run directory left behind


def test_a_spawned_process_that_has_started_may_train():
  import multiprocessing  # pylint: disable=g-import-not-at-top
  child = multiprocessing.get_context('spawn').Process(
      target=input_pipeline.refuse_while_a_process_starts, args=('training',))
  child.start()
  child.join(120)
  assert child.exitcode == 0


# ------------------------------------------------------------------------------------------------
# Prefetch.

def test_prefetch_keeps_order_and_applies_transform():
  out = list(input_pipeline.prefetch(iter(range(20)), size=2, transform=lambda x: x * 10))
  assert out == [x * 10 for x in range(20)]


def test_prefetch_reraises_producer_errors():
  def producer():
    yield 1
    raise input_pipeline.DataError('train.csv:7: column \'x\': broken')

  it = input_pipeline.prefetch(producer())
  assert next(it) == 1
  with pytest.raises(input_pipeline.DataError, match="train.csv:7: column 'x': broken"):
    next(it)

  def device_put(x):
    raise RuntimeError(f'no room for {x}')

  with pytest.raises(RuntimeError, match='no room for 0'):
    list(input_pipeline.prefetch(iter(range(3)), transform=device_put))


def test_prefetch_thread_stops_with_the_consumer():
  produced = []

  def endless():
    for i in itertools.count():
      produced.append(i)
      yield i

  before = set(threading.enumerate())
  it = input_pipeline.prefetch(endless(), size=2)
  (thread,) = [t for t in set(threading.enumerate()) - before if t.name == 'input-prefetch']
  assert thread.daemon
  assert next(it) == 0
  it.close()
  thread.join(timeout=5)
  assert not thread.is_alive()
  assert len(produced) < 10


# ------------------------------------------------------------------------------------------------
# Fuzz: anything parses or is a DataError.

CHARS = list('0123456789.-+eE; \tabc_\r\x00\u00e9\udcff\ud800')
FIELD = st.text(alphabet=st.sampled_from(CHARS), max_size=6)
ANY_FIELD = st.text(alphabet=st.sampled_from(CHARS + [',', '\n']), max_size=6)
# Valid rows with a few fields replaced (these often still parse), and lines of random fields.
LINE = st.one_of(
    st.dictionaries(st.sampled_from(NAMES), FIELD, max_size=3).map(lambda d: elm_line(**d)),
    st.lists(ANY_FIELD, min_size=37, max_size=41).map(','.join))


@settings(max_examples=200, deadline=None)
@given(st.lists(LINE, min_size=1, max_size=4))
@example([elm_line()])
def test_fuzz_parse_or_data_error(lines):
  try:
    out = parse(lines)
  except input_pipeline.DataError as error:
    assert 'rows.csv:' in str(error) and error.column in NAMES
    assert lines[error.line - 1] != elm_line()  # never a valid row's
    return
  assert out['ids'].shape == (len(lines), SPEC.num_slots)
  assert ((out['ids'] >= 0) & (out['ids'] < BUCKETS)).all()
  assert np.isfinite(out['dense']).all()
  for feature, start, end in zip(SPEC.sparse, SPEC.slot_starts, SPEC.slot_starts[1:]):
    if feature.is_list and feature.vocabulary is None:
      # n float32 weights of 1/n: their sum is off 1 by a few ulps.
      np.testing.assert_allclose(out['weights'][:, start:end].sum(axis=1), 1, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Random ELM rows: a consistency check here, and the speed measurement (run as a script).

def random_elm_lines(n, seed=0, list_len=10):
  """Valid ELM rows with ~`list_len`-token lists drawn from Zipf-like id spaces."""
  rng = np.random.default_rng(seed)

  def ids(size, vocab):  # ids of as many digits as the vocabulary size has, frequent ones first
    return (vocab + rng.zipf(1.3, size) % vocab).astype(str)

  def lists(vocab, sep=';'):
    lengths = rng.integers(max(1, list_len // 2), list_len * 3 // 2 + 1, n)
    tokens = ids(int(lengths.sum()), vocab)
    ends = np.cumsum(lengths)
    return [sep.join(tokens[e - k:e]) for e, k in zip(ends, lengths)]

  times = np.asarray(feature_spec.ELM_TIME_TYPES + ('',))
  columns = {
      'clicked': (rng.random(n) < 0.02).astype(int).astype(str),
      'user_id': ids(n, 10**7), 'gender': rng.choice(['-99', '0', '1'], n),
      'visit_city': ids(n, 400), 'avg_price': np.round(rng.random(n) * 80, 2).astype(str),
      'is_supervip': rng.integers(0, 2, n).astype(str),
      'ctr_30': rng.integers(0, 50, n).astype(str), 'ord_30': rng.integers(0, 50, n).astype(str),
      'total_amt_30': np.round(rng.random(n) * 900, 2).astype(str),
      'shop_id': ids(n, 10**5), 'item_id': ids(n, 10**6), 'city_id': ids(n, 400),
      'district_id': ids(n, 3000), 'shop_aoi_id': ids(n, 10**5),
      'shop_geohash_6': ids(n, 10**5), 'shop_geohash_12': ids(n, 10**6),
      'brand_id': ids(n, 10**5), 'category_1_id': ids(n, 100),
      'merge_standard_food_id': ids(n, 10**4), 'rank_7': rng.integers(0, 99, n).astype(str),
      'rank_30': rng.integers(0, 99, n).astype(str), 'rank_90': rng.integers(0, 99, n).astype(str),
      'shop_id_list': lists(10**5), 'item_id_list': lists(10**6),
      'category_1_id_list': lists(100), 'merge_standard_food_id_list': lists(10**4),
      'brand_id_list': lists(10**5), 'price_list': lists(100),
      'shop_aoi_id_list': lists(10**5), 'shop_geohash6_list': lists(10**5),
      'timediff_list': lists(10**4), 'hours_list': lists(24), 'time_type_list': [
          ';'.join(rng.choice(times[:-1], k)) for k in rng.integers(1, list_len + 1, n)],
      'weekdays_list': lists(7), 'times': ids(n, 1000), 'hours': rng.integers(0, 24, n).astype(str),
      'time_type': rng.choice(times, n), 'weekdays': rng.integers(0, 7, n).astype(str),
      'geohash12': ids(n, 10**6),
  }
  return [','.join(row) for row in zip(*(columns[name] for name in NAMES))]


def test_random_rows_parse_consistently(tmp_path):
  lines = random_elm_lines(300, seed=3)
  out = parse(lines)
  assert out['label'].shape == (300,)
  for feature, start, end in zip(SPEC.sparse, SPEC.slot_starts, SPEC.slot_starts[1:]):
    totals = out['weights'][:, start:end].sum(axis=1)
    if feature.is_list and feature.vocabulary is None:  # hashed: a mean always sums to one
      np.testing.assert_allclose(totals, 1.0, rtol=1e-5)  # float32 sums of 1/n, as above
    elif feature.vocabulary is None:  # a scalar is present or not
      assert set(np.unique(totals)) <= {0.0, 1.0}, feature.name
  # Row by row in Python gives the same ids (the vectorised path is not the only path).
  column = NAMES.index('item_id_list')
  for row in (0, 17, 299):
    tokens = lines[row].split(',')[column].split(';')[:MAX_LEN]
    assert list_ids_weights(out, 'item_id_list', row)[0][:len(tokens)] == [
        hashed(t) for t in tokens]
  path = write(tmp_path, 'random.csv', '\n'.join(lines) + '\n')
  chunked = read_all(path, chunk_rows=64)
  for key in out:
    np.testing.assert_array_equal(chunked[key], out[key])


def benchmark(num_rows=65536, list_len=10, max_list_len=50, num_workers=2):
  """Rows per second of parsing random ELM rows (file in page cache), printed.

  CPU seconds of this process are reported beside wall seconds: on a shared machine the CPU
  figure is the one-core speed.
  """
  import tempfile  # pylint: disable=g-import-not-at-top
  spec = feature_spec.elm_spec(max_list_len=max_list_len)

  def timed(make_iterator):
    wall, cpu = time.perf_counter(), time.process_time()
    rows = sum(len(b['label']) * (b['mask'].mean() if 'mask' in b else 1)
               for b in make_iterator())
    return rows, time.perf_counter() - wall, time.process_time() - cpu

  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'elm.csv')
    with open(path, 'w') as f:
      f.write('\n'.join(random_elm_lines(num_rows, seed=1, list_len=list_len)) + '\n')
    print(f'{num_rows} random ELM rows, {os.path.getsize(path) / num_rows:.0f} bytes/row, lists '
          f'of {list_len // 2}-{list_len * 3 // 2} tokens, max_len {max_list_len}')
    runs = [
        ('iter_row_chunks', lambda: input_pipeline.iter_row_chunks(path, spec)),
        ('batches(512, shuffle_buffer=20000)',
         lambda: input_pipeline.batches(path, spec, 512, shuffle_buffer=20000)),
        (f'iter_row_chunks(num_workers={num_workers}) (wall includes starting the workers)',
         lambda: input_pipeline.iter_row_chunks(path, spec, num_workers=num_workers)),
    ]
    for name, make_iterator in runs:
      rows, wall, cpu = timed(make_iterator)
      print(f'  {name}: {rows / wall:,.0f} rows/s wall, {rows / cpu:,.0f} rows/s per CPU second '
            'of the main process')


if __name__ == '__main__':
  benchmark(*(int(a) for a in sys.argv[1:]))
