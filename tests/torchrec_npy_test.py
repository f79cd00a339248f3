"""Reading TorchRec's preprocessed Criteo (.npy triples): values, shares, bad rows, caches, runs."""

import importlib.util
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_helpers  # pylint: disable=g-import-not-at-top,wrong-import-position

from dlrm_jax import datagen  # pylint: disable=g-import-not-at-top,wrong-import-order
from dlrm_jax import feature_spec
from dlrm_jax import input_pipeline
from dlrm_jax import row_cache
from dlrm_jax import torchrec_npy
from dlrm_jax import train

SPEC = feature_spec.criteo_spec(1000, embedding_dim=4)
# TorchRec's Criteo readers also need iopath (torchrec[datasets]).
HAS_TORCHREC = all(importlib.util.find_spec(m) is not None for m in ('torchrec', 'iopath'))


def write_triple(prefix, dense, sparse, labels):
  """Writes <prefix>_{dense,sparse,labels}.npy in TorchRec's types; returns the dense path."""
  np.save(f'{prefix}_dense.npy', np.asarray(dense, np.float32))
  np.save(f'{prefix}_sparse.npy', np.asarray(sparse, np.int64))
  np.save(f'{prefix}_labels.npy', np.asarray(labels, np.int32).reshape(-1, 1))
  return f'{prefix}_dense.npy'


def tsv_to_triple(tsv_path, prefix):
  """torchrec_npy.write_from_tsv, and the TSV's integers, hex values as integers, and labels."""
  path = torchrec_npy.write_from_tsv(tsv_path, prefix)
  with open(tsv_path) as f:
    rows = [line.rstrip('\n').split('\t') for line in f]
  ints = np.array([[int(v or '0') for v in r[1:14]] for r in rows], np.int64)
  sparse = np.array([[int(v or '0', 16) for v in r[14:40]] for r in rows], np.int64)
  return path, (ints, sparse, [int(r[0]) for r in rows])


def random_triple(tmp_path, n=300, seed=0, name='day_0'):
  rng = np.random.default_rng(seed)
  dense = rng.normal(size=(n, 13)).astype(np.float32)
  dense[:, 0] = np.arange(n)  # the row's number: tells which rows a reader returned
  sparse = rng.integers(0, 2**32, (n, 26))
  labels = rng.integers(0, 2, n)
  return write_triple(str(tmp_path / name), dense, sparse, labels), (dense, sparse, labels)


def read_all(paths, spec=SPEC, **kwargs):
  chunks = list(input_pipeline.iter_row_chunks(paths, spec, chunk_rows=64, **kwargs))
  return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def test_rows_are_torchrecs_values_ids_modulo_the_tables_rows(tmp_path):
  path, (dense, sparse, labels) = random_triple(tmp_path)
  sparse[::7, 3] = 0  # TorchRec's empty field
  np.save(tmp_path / 'day_0_sparse.npy', sparse)
  spec = feature_spec.criteo_spec([1000 + i for i in range(26)], embedding_dim=4)
  rows = read_all(path, spec)
  np.testing.assert_array_equal(rows['dense'], dense)
  np.testing.assert_array_equal(rows['label'], labels)
  np.testing.assert_array_equal(rows['ids'], sparse % (1000 + np.arange(26)))
  assert rows['weights'].min() == 1.0  # 0 is a value (an empty field's), as in TorchRec
  assert input_pipeline.count_rows(path) == 300 == input_pipeline.estimate_lines(path)
  assert input_pipeline.scoring_spec([path], SPEC) == SPEC


def test_a_planted_tsv_reads_as_its_fields_integers_and_the_run_trains(tmp_path):
  oracle = datagen.generate_criteo(str(tmp_path / 'tsv'), 2000, 600, seed=3)
  triples = tmp_path / 'npy'
  triples.mkdir()
  path, (ints, sparse, labels) = tsv_to_triple(oracle['train_path'], str(triples / 'day_0'))
  tsv_to_triple(oracle['eval_path'], str(triples / 'day_1'))
  rows = read_all(path)
  np.testing.assert_array_equal(rows['ids'], sparse % 1000)
  np.testing.assert_array_equal(rows['label'], labels)
  np.testing.assert_array_equal(rows['dense'], np.log(ints - (ints.min() - 2), dtype=np.float32))
  # A run reads the triples through the row cache: every row of both days, with their labels.
  eval_labels = np.load(triples / 'day_1_labels.npy')
  config = train_helpers.tiny_config(
      tmp_path / 'out', feature_spec='criteo', data_location=str(triples), embedding_dim=4,
      train_files='day_0_dense.npy', eval_files='day_1_dense.npy', steps=40, batch_size=64,
      hash_buckets=1000, export_dir=str(tmp_path / 'export'))
  results = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert results['rows_parsed'] == 2600 and results['eval_num_examples'] == 600
  assert results['eval_positive_rate'] == pytest.approx(eval_labels.mean())
  assert 0 < results['eval_auc'] < 1
  assert os.listdir(triples / 'dlrm_cache')
  # Kaggle's test set as TorchRec writes it (label -1) is scored, one probability a row.
  with open(oracle['eval_path']) as f:
    (tmp_path / 'test.txt').write_text(''.join(line.split('\t', 1)[1] for line in f))
  test = torchrec_npy.write_from_tsv(str(tmp_path / 'test.txt'), str(tmp_path / 'test'))
  config.mode, config.predict_input = 'predict', test
  predicted = train.train_and_evaluate(config, str(tmp_path / 'run'))
  with open(predicted['predict_output']) as f:
    probabilities = [float(line) for line in f]
  assert len(probabilities) == 600 and all(0 < p < 1 for p in probabilities)
  # The export scores a triple's rows as serving.py says: read by the triple reader.
  from dlrm_jax import serving  # pylint: disable=g-import-not-at-top
  export = str(tmp_path / 'export')
  # spec.json says so: a server that parsed text would feed the model other ids.
  assert serving.load_input_encoding(export) == 'torchrec_npy'
  spec = serving.load_spec(export).unlabeled()
  score = serving.load(export)
  served = np.concatenate([score(c['dense'], c['ids'], c['weights'])
                           for c in input_pipeline.iter_row_chunks(test, spec)])
  # predict printed 8 digits; the artifact is another XLA program over the same float32 values
  # (rounding ~1e-7 relative per op), where a row read other than predict read it (another id
  # or dense value) would move probabilities by ~1e-2.
  np.testing.assert_allclose(served, probabilities, rtol=1e-5, atol=1e-7)
  # The same rows as text would reach the model as other ids: refused, before anything is
  # written, whether evaluated, scored or trained on.
  refused = "trained on TorchRec's .npy triples, and text files would be read now"
  config.mode, config.predict_input = 'predict', oracle['eval_path']
  with pytest.raises(ValueError, match=refused):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  config.mode, config.data_location = 'eval', os.path.dirname(oracle['eval_path'])
  config.train_files, config.eval_files = 'train.txt', 'eval.txt'
  with pytest.raises(ValueError, match=refused):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  config.mode, config.steps = 'train', 60
  before = sorted(os.listdir(tmp_path / 'run'))
  with pytest.raises(ValueError, match=refused):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert sorted(os.listdir(tmp_path / 'run')) == before


def test_process_shares_and_line_ranges_number_rows_across_files_as_text_does(tmp_path):
  # Chunks of 16 rows a process (48 rows in all): several a file; ranges past a file's end.
  files = [random_triple(tmp_path, n=n, seed=n, name=f'day_{n}')[0] for n in (130, 70, 20)]
  ranges = [(10, 120), (60, 500), (30, 40)]
  wanted = np.concatenate([np.arange(10, 120), np.arange(60, 70)])
  seen = []
  for k in range(3):
    stats = input_pipeline.ParseStats()
    chunks = list(input_pipeline.iter_row_chunks(files, SPEC, chunk_rows=16, process_index=k,
                                                 process_count=3, line_ranges=ranges,
                                                 stats=stats))
    assert len(chunks) > 3
    rows = np.concatenate([c['dense'][:, 0] for c in chunks])
    np.testing.assert_array_equal(rows, wanted[k::3])
    assert stats.source_lines == 120 and stats.rows == len(wanted[k::3])
    seen.append(len(rows))
  assert sum(seen) == 120


@pytest.mark.parametrize('field, value, where, column, note', [
    ('labels', -1, 'day_0_labels.npy', 'label', "Kaggle's unlabelled test.txt"),
    ('dense', np.nan, 'day_0_dense.npy', 'I4', 'not a finite number'),
    ('dense', 1e300, 'day_0_dense.npy', 'I4', 'inf in float32, not a finite number'),
])
def test_a_bad_value_names_its_file_row_and_column_or_is_skipped(tmp_path, field, value, where,
                                                                 column, note):
  path, (dense, sparse, labels) = random_triple(tmp_path, n=200)
  arrays = {'dense': dense, 'sparse': sparse, 'labels': labels}
  index = {'labels': (150,), 'dense': (150, 3)}[field]
  arrays[field] = arrays[field].astype(np.float64 if field == 'dense' else np.int64)
  arrays[field][index] = value
  np.save(tmp_path / f'day_0_{field}.npy', arrays[field])  # float64 dense: cast as it is read
  # The text reader's form (line 151: the 151st row), which the row cache's error reads too.
  message = f"{where}:151: column '{column}': .*{note}.* \\(row 150 counted from 0\\)"
  with pytest.raises(input_pipeline.DataError, match=message) as e:
    read_all(path)
  wanted = (str(tmp_path / where), 151, column)
  assert (e.value.path, e.value.line, e.value.column) == wanted
  with pytest.raises(input_pipeline.DataError, match=message) as e:
    row_cache.open_or_build(row_cache.Source(path), SPEC, cache_root=str(tmp_path / 'cache'))
  assert (e.value.path, e.value.line, e.value.column) == wanted
  stats = input_pipeline.ParseStats()
  rows = read_all(path, skip_bad_rows=True, stats=stats)
  assert 150 not in rows['dense'][:, 0] and len(rows['label']) == 199
  assert stats.bad_rows == 1 and 'row 150' in stats.bad_row_examples[0]


def test_a_triple_that_cannot_be_read_says_which_file_and_why(tmp_path):
  path, (dense, sparse, labels) = random_triple(tmp_path, n=50)
  stem = str(tmp_path / 'day_0')
  os.rename(f'{stem}_labels.npy', f'{stem}_labels.bak')
  with pytest.raises(FileNotFoundError, match='day_0_labels.npy is missing'):
    read_all(path)
  os.rename(f'{stem}_labels.bak', f'{stem}_labels.npy')
  write_triple(stem, dense[:, :12], sparse, labels)
  with pytest.raises(input_pipeline.DataError, match=r'day_0_dense.npy: float32\[50, 12\], '
                                                     r'expected floating \[rows, 13\]'):
    read_all(path)
  write_triple(stem, dense, sparse[:40], labels)
  with pytest.raises(input_pipeline.DataError, match='dense 50, sparse 40, labels 50'):
    read_all(path)
  np.save(f'{stem}_sparse.npy', sparse.astype(np.float64))
  with pytest.raises(input_pipeline.DataError, match='sparse.npy: float64.*expected integer'):
    read_all(path)
  with open(path, 'w') as f:
    f.write('1\t2\n')
  with pytest.raises(input_pipeline.DataError, match='day_0_dense.npy: not a readable .npy'):
    read_all(path)


def test_only_a_criteo_like_spec_reads_a_triple_and_kinds_do_not_mix(tmp_path):
  path, _ = random_triple(tmp_path, n=20)
  elm = feature_spec.elm_spec(1000, embedding_dim=4)
  with pytest.raises(input_pipeline.DataError, match="the 'elm' spec .*feature_spec='criteo'"):
    read_all(path, elm)
  text = tmp_path / 'day_1'
  text.write_text('0' + '\t' * 39 + '\n')
  with pytest.raises(ValueError, match=r'triples \(.*day_0_dense.npy\) and text files \(.*day_1\)'):
    read_all([path, str(text)])
  # A run refuses them before reading: training on one and evaluating on the other too.
  from dlrm_jax import data_sources  # pylint: disable=g-import-not-at-top
  config = train_helpers.tiny_config(tmp_path / 'out', feature_spec='criteo',
                                     data_location=str(tmp_path), train_files='day_0_dense.npy',
                                     eval_files='day_1', hash_buckets=1000)
  with pytest.raises(ValueError, match='train and evaluate on one kind'):
    data_sources.resolve(config, SPEC, process_index=0, process_count=1)


@pytest.mark.parametrize('name', ['day_0_sparse.npy', 'day_0_labels.npy', 'day_0_dense.npy.gz',
                                  'day_0_sparse_multi_hot.npz'])
def test_another_npy_file_is_refused_not_parsed_as_text(tmp_path, name):
  import gzip  # pylint: disable=g-import-not-at-top
  path, _ = random_triple(tmp_path, n=20)
  with open(path, 'rb') as f, gzip.open(f'{path}.gz', 'wb') as z:
    z.write(f.read())
  np.savez(tmp_path / 'day_0_sparse_multi_hot.npz', np.zeros((20, 26, 3)))
  with pytest.raises(input_pipeline.DataError, match=f'{name}: .*name the <name>_dense.npy'):
    read_all(str(tmp_path / name))
  with pytest.raises(input_pipeline.DataError, match=f'{name}: .*name the <name>_dense.npy'):
    input_pipeline.count_rows(str(tmp_path / name))


def test_ids_are_the_nonnegative_remainder_of_any_integer_type(tmp_path):
  # TorchRec's older converter wrote int32 ids: hex values past 2^31 wrapped to negative ones,
  # whose remainder numpy (and TorchRec's reader) takes non-negative. uint64 values past 2^63
  # must not wrap on the way.
  stem = str(tmp_path / 'day_0')
  path, (dense, sparse, labels) = random_triple(tmp_path, n=4)
  wrapped = sparse.astype(np.uint32).astype(np.int32)
  np.save(f'{stem}_sparse.npy', wrapped)
  assert wrapped.min() < 0
  np.testing.assert_array_equal(read_all(path)['ids'], np.remainder(wrapped.astype(np.int64),
                                                                      1000))
  huge = np.full((4, 26), 2**64 - 1, np.uint64)
  np.save(f'{stem}_sparse.npy', huge)
  assert (read_all(path)['ids'] == (2**64 - 1) % 1000).all()


def test_criteo_missing_empty_drops_the_empty_fields_value(tmp_path):
  path, (_, sparse, _) = random_triple(tmp_path, n=50)
  sparse[::3, 5] = 0  # empty fields, as TorchRec writes them
  np.save(tmp_path / 'day_0_sparse.npy', sparse)
  kept = read_all(path, feature_spec.criteo_spec(1000, embedding_dim=4, missing=' '))
  assert kept['weights'].min() == 1.0  # ' ': an empty field has a row of its own
  dropped = read_all(path, feature_spec.criteo_spec(1000, embedding_dim=4, missing=''))
  np.testing.assert_array_equal(dropped['weights'][:, 5], sparse[:, 5] != 0)
  assert (dropped['ids'][::3, 5] == 0).all() and dropped['weights'][:, 6].min() == 1.0


def test_kaggles_unlabelled_test_triple_is_scored_and_the_writer_makes_it(tmp_path):
  oracle = datagen.generate_criteo(str(tmp_path / 'tsv'), 30, 10, seed=2)
  with open(oracle['train_path']) as f:
    lines = [line.split('\t', 1)[1] for line in f]  # test.txt: no label column
  (tmp_path / 'test.txt').write_text(''.join(lines))
  path = torchrec_npy.write_from_tsv(str(tmp_path / 'test.txt'), str(tmp_path / 'test'))
  assert (np.load(tmp_path / 'test_labels.npy') == -1).all()
  spec = input_pipeline.scoring_spec([path], SPEC)
  assert spec == SPEC.unlabeled()
  rows = read_all(path, spec)
  assert len(rows['label']) == 30 and not rows['label'].any()
  with pytest.raises(input_pipeline.DataError, match="label -1, .*Kaggle's unlabelled"):
    read_all(path)  # trained or evaluated on, they are bad rows
  (tmp_path / 'short.txt').write_text(lines[0] + '1\t2\n')
  with pytest.raises(input_pipeline.DataError, match=r'short.txt:2: 2 fields, expected 40'):
    torchrec_npy.write_from_tsv(str(tmp_path / 'short.txt'), str(tmp_path / 'short'))
  (tmp_path / 'empty.txt').write_text('')
  empty = torchrec_npy.write_from_tsv(str(tmp_path / 'empty.txt'), str(tmp_path / 'empty'))
  assert input_pipeline.count_rows(empty) == 0
  assert not list(input_pipeline.iter_row_chunks(empty, SPEC))


def test_predict_output_may_not_be_a_file_of_the_input_triple(tmp_path):
  path, _ = random_triple(tmp_path, n=5)
  for name in ('day_0_sparse.npy', 'day_0_labels.npy'):
    with pytest.raises(ValueError, match='is the input file'):
      train.check_predict_output(path, str(tmp_path / name))


def test_a_missing_companion_is_named_when_the_cache_is_checked(tmp_path):
  path, _ = random_triple(tmp_path, n=5)
  os.remove(tmp_path / 'day_0_labels.npy')
  with pytest.raises(FileNotFoundError, match="day_0_labels.npy is missing: TorchRec's"):
    row_cache.open_or_build(row_cache.Source(path), SPEC, cache_root=str(tmp_path / 'cache'))


def test_a_tfds_data_set_of_a_triple_is_refused_when_its_sparse_file_changes(tmp_path):
  pytest.importorskip('tensorflow_datasets')
  from dlrm_jax import data_sources  # pylint: disable=g-import-not-at-top
  from dlrm_jax import tfds_builders  # pylint: disable=g-import-not-at-top
  path, (_, sparse, _) = random_triple(tmp_path, n=40)
  random_triple(tmp_path, n=10, name='day_1')
  config = train_helpers.tiny_config(
      tmp_path / 'out', feature_spec='criteo', data_location=str(tmp_path), hash_buckets=1000,
      train_files='day_0_dense.npy', eval_files='day_1_dense.npy',
      tfds_data_dir=str(tmp_path / 'tfds'))
  assert data_sources.resolve(config, SPEC, process_index=0, process_count=1).train_rows == 40
  np.save(tmp_path / 'day_0_sparse.npy', sparse + 1)  # the dense file stays as it was
  with pytest.raises(tfds_builders.SourceChanged, match=r'day_0_sparse.npy \(\d+ bytes\) is not'):
    data_sources.resolve(config, SPEC, process_index=0, process_count=1)


def test_the_cache_of_a_triple_is_rebuilt_when_its_sparse_file_changes(tmp_path):
  path, (dense, sparse, labels) = random_triple(tmp_path, n=100)
  source = row_cache.Source(path)
  cache_root = str(tmp_path / 'cache')

  def cached_ids():
    cache, start, stop = row_cache.open_or_build(source, SPEC, cache_root=cache_root)
    return row_cache.expand(cache.read(start, stop), SPEC)['ids']

  np.testing.assert_array_equal(cached_ids(), sparse % 1000)
  np.save(tmp_path / 'day_0_sparse.npy', sparse + 1)  # the dense file stays as it was
  np.testing.assert_array_equal(cached_ids(), (sparse + 1) % 1000)


@pytest.mark.skipif(not HAS_TORCHREC, reason='TorchRec and iopath: optional (experiments/)')
def test_torchrecs_own_files_and_reader_agree_with_ours(tmp_path):
  # pylint: disable=g-import-not-at-top
  from torchrec.datasets import criteo as torchrec_criteo
  oracle = datagen.generate_criteo(str(tmp_path / 'tsv'), 300, 10, seed=5)
  prefix = str(tmp_path / 'day_0')
  names = [f'{prefix}_{kind}.npy' for kind in ('dense', 'sparse', 'labels')]
  torchrec_criteo.BinaryCriteoUtils.tsv_to_npys(oracle['train_path'], *names)
  ours = str(tmp_path / 'ours' / 'day_0')
  os.makedirs(os.path.dirname(ours))
  tsv_to_triple(oracle['train_path'], ours)
  for kind, name in zip(('dense', 'sparse', 'labels'), names):  # write_from_tsv is right
    np.testing.assert_array_equal(np.load(name), np.load(f'{ours}_{kind}.npy'))
  rows = read_all(names[0])
  pipe = torchrec_criteo.InMemoryBinaryCriteoIterDataPipe(
      'train', [names[0]], [names[1]], [names[2]], batch_size=100, rank=0, world_size=1,
      hashes=[1000] * 26)
  batches = list(pipe)
  np.testing.assert_array_equal(
      rows['dense'], np.concatenate([b.dense_features.numpy() for b in batches]))
  np.testing.assert_array_equal(
      rows['label'], np.concatenate([b.labels.numpy() for b in batches]))
  ids = np.concatenate([b.sparse_features.values().numpy().reshape(26, -1).T for b in batches])
  np.testing.assert_array_equal(rows['ids'], ids)


def test_kaggles_train_triple_is_cut_into_days_as_train_txt_is(tmp_path):
  # configs/criteo_kaggle.py cuts its one file into 7 days by line: a triple by row.
  from configs import criteo_kaggle  # pylint: disable=g-import-not-at-top
  from dlrm_jax import data_sources  # pylint: disable=g-import-not-at-top
  random_triple(tmp_path, n=701, name='train')
  config = criteo_kaggle.get_config()
  config.data_location, config.train_files = str(tmp_path), 'train_dense.npy'
  config.cache_dir = str(tmp_path / 'cache')
  spec = feature_spec.from_config(config)
  data = data_sources.resolve(config, spec, process_index=0, process_count=1)
  assert data.train_rows == 6 * 701 // 7
  eval_rows = [b['dense'][b['mask'] > 0, 0] for b in
               data_sources.eval_batches(config, spec, data, process_index=0, process_count=1)]
  np.testing.assert_array_equal(np.sort(np.concatenate(eval_rows)), np.arange(6 * 701 // 7, 701))


def test_the_documented_patterns_name_days_0_to_22_in_order(tmp_path):
  # README and configs/criteo_1tb_mlperf.py give these patterns for TorchRec's 1TB triples.
  from dlrm_jax import data_sources  # pylint: disable=g-import-not-at-top
  for day in range(24):
    (tmp_path / f'day_{day}_dense.npy').touch()
  names = 'day_?_dense.npy,day_1?_dense.npy,day_2[0-2]_dense.npy'.split(',')
  files, missing = data_sources.match_files(str(tmp_path), names)
  assert [os.path.basename(f) for f in files] == [f'day_{d}_dense.npy' for d in range(23)]
  assert not missing


def test_no_parse_workers_start_for_triples(tmp_path, monkeypatch):
  # Workers parse text; a triple is read in the process: -1 (auto) must not start them for it.
  from dlrm_jax import data_sources  # pylint: disable=g-import-not-at-top
  path, _ = random_triple(tmp_path, n=5)
  text = tmp_path / 'day_1'
  text.write_text('0' + '\t' * 39 + '\n')
  monkeypatch.setattr(data_sources, '_AUTO_WORKERS_BYTES', 1)
  monkeypatch.setattr(os, 'cpu_count', lambda: 4)
  assert data_sources.workers_for(-1, [path]) == 0
  assert data_sources.workers_for(-1, [str(text)]) == 4


def test_criteo_missing_empty_keeps_a_value_whose_row_is_0(tmp_path):
  # Only an empty field (value 0) is dropped; a value that is a multiple of its table's rows
  # (1000 here) lands in row 0 and is a real value, kept with weight 1.
  path, (_, sparse, _) = random_triple(tmp_path, n=30)
  sparse[0::3, 5] = 0
  sparse[1::3, 5] = 1000 * np.arange(1, 11)
  np.save(tmp_path / 'day_0_sparse.npy', sparse)
  rows = read_all(path, feature_spec.criteo_spec(1000, embedding_dim=4, missing=''))
  assert (rows['ids'][1::3, 5] == 0).all()
  np.testing.assert_array_equal(rows['weights'][:, 5], sparse[:, 5] != 0)
  assert rows['weights'][1::3, 5].min() == 1.0


def test_an_export_of_a_run_without_eval_records_the_triple_encoding(tmp_path):
  # The encoding comes from the train files: a run with no eval files is no less a triple run.
  from dlrm_jax import serving  # pylint: disable=g-import-not-at-top
  oracle = datagen.generate_criteo(str(tmp_path / 'tsv'), 500, 100, seed=3)
  triples = tmp_path / 'npy'
  triples.mkdir()
  tsv_to_triple(oracle['train_path'], str(triples / 'day_0'))
  config = train_helpers.tiny_config(
      tmp_path / 'out', feature_spec='criteo', data_location=str(triples), embedding_dim=4,
      train_files='day_0_dense.npy', steps=4, batch_size=64, hash_buckets=1000, no_eval=True,
      export_dir=str(tmp_path / 'export'))
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert serving.load_input_encoding(str(tmp_path / 'export')) == 'torchrec_npy'
