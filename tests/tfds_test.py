"""The TFDS builders: array_record blocks, read with tfds.data_source, without TensorFlow."""

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from dlrm_jax import data_sources
from dlrm_jax import datagen
from dlrm_jax import feature_spec
from dlrm_jax import input_pipeline
from dlrm_jax import tfds_builders
from data_sources_test import config_for, numbered_lines, rows_of, write
from input_pipeline_test import elm_line

tfds = pytest.importorskip('tensorflow_datasets')
SPEC = feature_spec.elm_spec(hash_buckets=1000, embedding_dim=4, max_list_len=4)


def manual_files(tmp_path, train_lines, eval_lines, **config):
  """A manual directory of train.csv and eval.csv, and a run config reading it through TFDS."""
  manual = tmp_path / 'manual'
  manual.mkdir()
  write(manual / 'train.csv', train_lines)
  write(manual / 'eval.csv', eval_lines)
  return manual, config_for(manual, tfds_data_dir=str(tmp_path / 'tfds'), **config)


def test_tensorflow_is_neither_installed_nor_needed():
  # If TensorFlow were importable this test would prove nothing: it would be used silently.
  code = ('import sys, importlib.util; assert importlib.util.find_spec("tensorflow") is None; '
          'from dlrm_jax import tfds_builders; assert "tensorflow" not in sys.modules')
  subprocess.run([sys.executable, '-c', code], check=True)
  assert 'tensorflow' not in sys.modules


def test_builders_say_where_the_files_go():
  assert 'train.csv' in tfds_builders.ElmBlocks.MANUAL_DOWNLOAD_INSTRUCTIONS
  assert 'tianchi' in tfds_builders.ElmBlocks.MANUAL_DOWNLOAD_INSTRUCTIONS
  assert 'day_23' in tfds_builders.CriteoBlocks.MANUAL_DOWNLOAD_INSTRUCTIONS
  assert 'train.txt' in tfds_builders.CriteoBlocks.MANUAL_DOWNLOAD_INSTRUCTIONS
  assert {c.name for c in tfds_builders.CriteoBlocks.BUILDER_CONFIGS} == {'kaggle', 'terabyte'}


def test_elm_blocks_hold_exactly_the_parsed_rows(tmp_path):
  # 1100 rows: two full 512-row records and a short one.
  manual, config = manual_files(tmp_path, numbered_lines(0, 1100), numbered_lines(5000, 30),
                                shuffle_buffer=0)
  config.batch_size = 100
  data = data_sources.resolve(config, SPEC, process_index=0, process_count=1)
  assert data.train_rows == 1100
  source = tfds.data_source('elm_blocks', data_dir=str(tmp_path / 'tfds'),
                            builder_kwargs={'config': tfds_builders.config_for(config, SPEC),
                                            'file_format': 'array_record'}, download=False)
  train = source['train']
  assert len(train) == 3 and [int(train[i]['rows']) for i in range(3)] == [512, 512, 76]
  assert list((tmp_path / 'tfds').rglob('*.array_record-*'))
  batches = list(data_sources.train_batches(config, SPEC, data, num_steps=11, process_index=0,
                                            process_count=1))
  parsed = input_pipeline.parse_chunk(numbered_lines(0, 1100), SPEC, path='p', first_line=1)
  for key in parsed:
    got = np.concatenate([b[key] for b in batches])[:1100]
    np.testing.assert_array_equal(got, parsed[key])
  assert rows_of(data_sources.eval_batches(config, SPEC, data, process_index=0,
                                           process_count=1)) == list(range(5000, 5030))
  # Shuffled: a permutation, fixed by the seed.
  config.shuffle_buffer = 600
  shuffled = rows_of(data_sources.train_batches(config, SPEC, data, num_steps=11,
                                                process_index=0, process_count=1))
  assert sorted(shuffled) == list(range(1100)) and shuffled != list(range(1100))
  # Two processes: disjoint record ranges, as many eval batches each, every row once (in
  # batches of 4 a process: the 15 rows of a share end in a part batch).
  config.eval_batch_size = 8
  counts, rows, parsed = [], [], []
  for k in range(2):
    stats = input_pipeline.ParseStats()
    batches = list(data_sources.eval_batches(config, SPEC, data, stats=stats, process_index=k,
                                             process_count=2))
    counts.append(len(batches))
    rows += rows_of(iter(batches))
    parsed.append(stats.rows)
  assert counts[0] == counts[1] and sorted(rows) == list(range(5000, 5030))
  # The build's counts are the whole split's: process 0 reports them, so that the run's sum
  # over processes (train.global_parse_stats) is the split's 30 rows, not 60.
  assert parsed == [30, 0]
  # Opened once a process: a builder per evaluation stayed alive in TFDS's cache, and logged.
  opened = tfds_builders.data_source(config, SPEC, str(manual))
  assert tfds_builders.data_source(config, SPEC, str(manual)) is opened
  # `python -m dlrm_jax.data_sources` prepares the TFDS data set (it used to print {}).
  prepared = data_sources.prepare(config, SPEC)
  assert [v['rows'] for v in prepared.values()] == [1100, 30], prepared

  # The source files may go once the data set is built; a replaced one is refused, named.
  os.remove(manual / 'train.csv')
  assert data_sources.resolve(config, SPEC, process_index=0, process_count=1).train_rows == 1100
  write(manual / 'eval.csv', numbered_lines(7000, 31))
  with pytest.raises(tfds_builders.SourceChanged, match=re.escape(f'{manual / "eval.csv"} (')):
    data_sources.resolve(config, SPEC, process_index=0, process_count=1)
  # ... also when only its modification time tells: the built file's bytes written again.
  write(manual / 'eval.csv', numbered_lines(5000, 30))
  with pytest.raises(tfds_builders.SourceChanged, match=re.escape(f'{manual / "eval.csv"} (')):
    data_sources.resolve(config, SPEC, process_index=0, process_count=1)


def test_a_split_is_written_shard_by_shard_in_bounded_memory(tmp_path, monkeypatch):
  # GeneratorBasedBuilder's writer held a whole split in memory and, past 1 GB (~5.7M Criteo
  # rows), spilled it through tf.io.gfile: without TensorFlow no real-sized split could be
  # built. Here the buffer is one byte and a shard is one block of 512 rows.
  from tensorflow_datasets.core import shuffle  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(shuffle, 'MAX_MEM_BUFFER_SIZE', 1)
  monkeypatch.setattr(tfds_builders, 'SHARD_BLOCKS', 1)
  manual, config = manual_files(tmp_path, numbered_lines(0, 1600), numbered_lines(5000, 30),
                                shuffle_buffer=0)
  config.batch_size = 100
  data = data_sources.resolve(config, SPEC, process_index=0, process_count=1)
  assert data.train_rows == 1600
  # 1600 lines: 4 blocks (the last short), a shard each (2000 lines' worth with a quarter to
  # spare), and a spare shard, left empty.
  assert len(list((tmp_path / 'tfds').rglob('*-train.array_record-*'))) == 5
  source = tfds_builders.data_source(config, SPEC, str(manual))['train']
  assert [int(source[i]['rows']) for i in range(len(source))] == [512, 512, 512, 64]
  assert rows_of(data_sources.train_batches(config, SPEC, data, num_steps=16, process_index=0,
                                            process_count=1)) == list(range(1600))
  assert rows_of(data_sources.eval_batches(config, SPEC, data, process_index=0,
                                           process_count=1)) == list(range(5000, 5030))
  # The shard count comes from an estimate of the lines: too high leaves empty shards (skipped
  # when read), too low a longer last shard; the rows are the same either way. A gzip file's
  # estimate 19% low still leaves no shard longer than SHARD_BLOCKS.
  for factor, longest in ((3, 1), (0.81, 1), (0.3, 2)):
    monkeypatch.setattr(input_pipeline, 'estimate_lines', lambda p, f=factor: int(1600 * f))
    config.tfds_data_dir = str(tmp_path / f'tfds-{factor}')
    data = data_sources.resolve(config, SPEC, process_index=0, process_count=1)
    assert data.train_rows == 1600
    assert rows_of(data_sources.train_batches(config, SPEC, data, num_steps=16, process_index=0,
                                              process_count=1)) == list(range(1600))
    info = tfds_builders.data_source(config, SPEC, str(manual))['train'].dataset_info
    assert max(info.splits['train'].shard_lengths) == longest, factor


def test_criteo_kaggle_split_from_planted_data(tmp_path):
  manual = tmp_path / 'criteo'
  datagen.generate_criteo(str(manual), train_rows=700, eval_rows=1, seed=2,
                          planted=dict(vocab_sizes=(20,) * 26))
  spec = feature_spec.criteo_spec(100, embedding_dim=4)
  config = config_for(manual, tfds_data_dir=str(tmp_path / 'tfds'), train_files='train.txt',
                      split_parts=7, eval_parts=1)
  config.feature_spec = 'criteo'
  data = data_sources.resolve(config, spec, process_index=0, process_count=1)
  assert data.train_rows == 600  # days 0-5 of 7
  evaluated = list(data_sources.eval_batches(config, spec, data, process_index=0,
                                             process_count=1))
  assert sum(int(b['mask'].sum()) for b in evaluated) == 100
  lines = (manual / 'train.txt').read_text().splitlines()[600:]
  parsed = input_pipeline.parse_chunk(lines, spec, path='p', first_line=601)
  np.testing.assert_array_equal(np.concatenate([b['ids'] for b in evaluated])[:100],
                                parsed['ids'])


def test_other_files_or_parts_make_another_data_set(tmp_path):
  # The data set's name used to ignore the files the run names: a run naming other files
  # trained and evaluated on the rows of the files of the first build, without a word.
  manual = tmp_path / 'manual'
  manual.mkdir()
  write(manual / 'train.csv', numbered_lines(0, 40))
  write(manual / 'eval.csv', numbered_lines(1000, 20))
  write(manual / 'other.csv', numbered_lines(2000, 30))
  write(manual / 'small_eval.csv', numbered_lines(3000, 5))
  resolve = lambda config: data_sources.resolve(config, SPEC, process_index=0, process_count=1)
  eval_rows = lambda config, data: rows_of(data_sources.eval_batches(
      config, SPEC, data, process_index=0, process_count=1))
  first = config_for(manual, tfds_data_dir=str(tmp_path / 'tfds'))
  assert resolve(first).train_rows == 40
  # Not the name earlier releases built every choice of files under: such a data set may hold
  # another choice's rows.
  fingerprint = tfds_builders.row_cache.parse_fingerprint(SPEC)
  assert tfds_builders.config_for(first, SPEC).name.startswith(f'elm_{fingerprint[:12]}_files_')
  # Another parser version is another data set (a prepared one is never checked again), while a
  # row cache keeps its name and is rebuilt in place by its manifest check (a new name left the
  # old cache on disk for good).
  source = tfds_builders.row_cache.Source(str(manual / 'train.csv'))
  names = (tfds_builders.config_for(first, SPEC).name,
           tfds_builders.row_cache.cache_name(source, SPEC, (0, 1)))
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(input_pipeline, 'PARSER_VERSION', input_pipeline.PARSER_VERSION + 1)
    assert tfds_builders.config_for(first, SPEC).name != names[0]
    assert tfds_builders.row_cache.cache_name(source, SPEC, (0, 1)) == names[1]
  other = config_for(manual, tfds_data_dir=str(tmp_path / 'tfds'), train_files='other.csv',
                     eval_files='small_eval.csv')
  data = resolve(other)
  assert data.train_rows == 30 and eval_rows(other, data) == list(range(3000, 3005))
  # Parts of one file: the eval split follows eval_parts.
  one_part = config_for(manual, tfds_data_dir=str(tmp_path / 'tfds'), train_files='train.csv',
                        split_parts=4, eval_parts=1)
  two_parts = config_for(manual, tfds_data_dir=str(tmp_path / 'tfds'), train_files='train.csv',
                         split_parts=4, eval_parts=2)
  assert (resolve(one_part).train_rows, resolve(two_parts).train_rows) == (30, 20)
  assert eval_rows(two_parts, resolve(two_parts)) == list(range(20, 40))


def test_rows_a_build_dropped_are_counted_and_a_strict_run_refuses_them(tmp_path):
  lines = numbered_lines(0, 40)
  lines[9] = elm_line(ctr_30='x')
  manual, lenient = manual_files(tmp_path, lines, numbered_lines(1000, 20), skip_bad_rows=True)
  data = data_sources.resolve(lenient, SPEC, process_index=0, process_count=1)
  stats = input_pipeline.ParseStats()
  assert len(rows_of(data_sources.train_batches(lenient, SPEC, data, num_steps=3, stats=stats,
                                                process_index=0, process_count=1))) == 3 * 16
  # As a row cache's counts reach results.json's parse_stats: the rows read and the one dropped.
  assert (stats.rows, stats.bad_rows) == (39, 1)
  assert stats.bad_row_examples[0].startswith(f'{manual / "train.csv"}:10: column \'ctr_30\'')
  strict = config_for(manual, tfds_data_dir=str(tmp_path / 'tfds'), skip_bad_rows=False)
  with pytest.raises(input_pipeline.DataError, match=r"train.csv:10: column 'ctr_30'.*1 bad rows "
                     r'in the train split of the TFDS data set') as error:
    data_sources.resolve(strict, SPEC, process_index=0, process_count=1)
  assert (error.value.path, error.value.line) == (str(manual / 'train.csv'), 10)


def test_a_split_without_a_good_row_is_not_kept(tmp_path):
  # Its empty shard was kept as a prepared data set that no open could read ("Paths sequence can
  # not be of 0 length"), and TFDS never rebuilds one: fixing the file did not help.
  manual, config = manual_files(tmp_path, numbered_lines(0, 600), ['not,a,row'] * 5,
                                skip_bad_rows=True)
  with pytest.raises(input_pipeline.DataError,
                     match=r'eval.csv:1: .*5 bad rows in .*eval.csv; the eval split has no good '
                           r'row left'):
    data_sources.resolve(config, SPEC, process_index=0, process_count=1)
  assert not list((tmp_path / 'tfds').rglob('dataset_info.json'))
  write(manual / 'eval.csv', numbered_lines(1000, 20))
  data = data_sources.resolve(config, SPEC, process_index=0, process_count=1)
  assert data.train_rows == 600
  assert rows_of(data_sources.eval_batches(config, SPEC, data, process_index=0,
                                           process_count=1)) == list(range(1000, 1020))


def test_build_parses_with_the_runs_worker_count_and_names_missing_files(tmp_path, monkeypatch):
  # The build used to read num_workers=-1 (the default: one parse process per core for large
  # files) as 0, so a Terabyte build parsed in one process where the row cache used every core.
  manual = tmp_path / 'manual'
  manual.mkdir()
  write(manual / 'train.csv', numbered_lines(0, 40))
  write(manual / 'eval.csv', numbered_lines(1000, 20))
  (manual / 'days_dir.csv').mkdir()
  monkeypatch.setattr(data_sources, '_AUTO_WORKERS_BYTES', 1)  # every file is "large"
  monkeypatch.setattr(os, 'cpu_count', lambda: 3)
  used = []
  parse = input_pipeline.iter_row_chunks

  def spy(*args, num_workers=0, **kwargs):
    used.append(num_workers)
    return parse(*args, num_workers=0, **kwargs)  # the rows, without starting processes

  monkeypatch.setattr(input_pipeline, 'iter_row_chunks', spy)
  config = config_for(manual, tfds_data_dir=str(tmp_path / 'tfds'), num_workers=-1)
  # A temporary directory of the test's own: another process's TFDS may make one in /tmp.
  (tmp_path / 'tmp').mkdir()
  monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path / 'tmp'))
  stray = lambda: glob.glob(os.path.join(tempfile.gettempdir(), 'tmp*tfds'))
  assert data_sources.resolve(config, SPEC, process_index=0, process_count=1).train_rows == 40
  assert used == [3, 3]  # train and eval, as data_sources.parse_workers gives a run's cache
  # TFDS's empty temporary directories (one per builder made before the data set is prepared)
  # are removed.
  assert not stray()
  # A pattern that matches only a directory names no file: it is missing, named, as the row
  # cache's reader says (the build used to take the directory for a file).
  config = config_for(manual, tfds_data_dir=str(tmp_path / 'tfds'), train_files='days_*.csv')
  with pytest.raises(FileNotFoundError, match=re.escape(f'{manual / "days_*.csv"} missing')):
    data_sources.resolve(config, SPEC, process_index=0, process_count=1)


def test_a_deleted_data_set_is_built_again_in_the_same_process(tmp_path):
  # The data set is opened once a process; deleting it, as a SourceChanged error says to, must
  # still rebuild it (the opened one used to be served again, and refused again).
  import shutil  # pylint: disable=g-import-not-at-top
  manual, config = manual_files(tmp_path, numbered_lines(0, 40), numbered_lines(1000, 20))
  resolve = lambda: data_sources.resolve(config, SPEC, process_index=0, process_count=1)
  assert resolve().train_rows == 40
  write(manual / 'train.csv', numbered_lines(0, 70))
  with pytest.raises(tfds_builders.SourceChanged):
    resolve()
  shutil.rmtree(tmp_path / 'tfds')
  assert resolve().train_rows == 70


def test_a_row_left_over_after_full_blocks_is_kept(tmp_path):
  # 1025 rows: two full blocks and the one row after them, which is the last block on its own.
  manual, config = manual_files(tmp_path, numbered_lines(0, 1025), numbered_lines(5000, 30),
                                shuffle_buffer=0)
  config.batch_size = 100
  data = data_sources.resolve(config, SPEC, process_index=0, process_count=1)
  assert data.train_rows == 1025
  rows = rows_of(data_sources.train_batches(config, SPEC, data, num_steps=11, process_index=0,
                                            process_count=1))
  assert rows[:1025] == list(range(1025))


def test_an_empty_split_is_refused_and_not_kept(tmp_path):
  # A split of no rows and no bad rows either (here one line cut into 7 parts: the train split's
  # 6 parts hold none of it): a data set kept with it cannot be opened again, and TFDS never
  # rebuilds it.
  manual, _ = manual_files(tmp_path, numbered_lines(0, 1), numbered_lines(1000, 20))
  config = config_for(manual, tfds_data_dir=str(tmp_path / 'tfds'), train_files='train.csv',
                      split_parts=7, eval_parts=1)
  with pytest.raises(input_pipeline.DataError, match=r'train.csv.*no rows for the train split'):
    data_sources.resolve(config, SPEC, process_index=0, process_count=1)
  assert not list((tmp_path / 'tfds').rglob('dataset_info.json'))
  write(manual / 'train.csv', numbered_lines(0, 70))
  assert data_sources.resolve(config, SPEC, process_index=0, process_count=1).train_rows == 60


def test_a_data_set_deleted_after_a_good_open_is_built_again(tmp_path):
  # Opened once a process; deleted (and its files replaced) with no refused call in between,
  # the next open must build it again rather than serve the one held since.
  manual, config = manual_files(tmp_path, numbered_lines(0, 40), numbered_lines(1000, 20))
  resolve = lambda: data_sources.resolve(config, SPEC, process_index=0, process_count=1)
  assert resolve().train_rows == 40
  shutil.rmtree(tmp_path / 'tfds')
  write(manual / 'train.csv', numbered_lines(0, 70))
  assert resolve().train_rows == 70
