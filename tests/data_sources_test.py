"""data_sources: which files and lines a config reads, and the batch streams the trainer gets."""

import fcntl
import gzip
import json
import os
import re
import threading
import time

import numpy as np
import pytest

from configs import criteo_1tb
from configs import criteo_1tb_mlperf
from configs import criteo_kaggle
from configs import default
from dlrm_jax import data_sources
from dlrm_jax import feature_spec
from dlrm_jax import input_pipeline
from dlrm_jax import row_cache
from input_pipeline_test import elm_line

SPEC = feature_spec.elm_spec(hash_buckets=1000, embedding_dim=4, max_list_len=4)


def config_for(directory, **overrides):
  config = default.get_config()
  config.data_location = str(directory)
  config.hash_buckets = 1000
  config.embedding_dim = 4
  config.max_list_len = 4
  config.batch_size = 16
  config.eval_batch_size = 16
  config.shuffle_buffer = 32
  values = dict(train_files='', eval_files='', split_parts=0, eval_parts=1, use_cache=True,
                cache_dir='', cache_block_rows=8, num_workers=0, tfds_data_dir='')
  values.update(overrides)
  for key, value in values.items():
    config[key] = value
  return config


def numbered_lines(first, n):
  return [elm_line(avg_price=str(i), clicked=str(i % 2)) for i in range(first, first + n)]


def write(path, lines, compress=False):
  data = ('\n'.join(lines) + '\n').encode()
  if compress:
    data = gzip.compress(data)
  with open(path, 'wb') as f:
    f.write(data)
  return str(path)


def rows_of(batches):
  return [int(v) for b in batches for v, m in zip(b['dense'][:, 1], b['mask']) if m]


@pytest.fixture
def elm_dir(tmp_path):
  write(tmp_path / 'train.csv', numbered_lines(0, 70))
  write(tmp_path / 'eval.csv', numbered_lines(1000, 45))
  return tmp_path


def test_default_files_and_row_count(elm_dir):
  config = config_for(elm_dir)
  data = data_sources.resolve(config, SPEC, process_index=0, process_count=1)
  assert data.train_path == str(elm_dir / 'train.csv')
  assert data.eval_path == str(elm_dir / 'eval.csv')
  assert data.train_rows == 70
  assert [s.path for s in data.train_sources] == [data.train_path]
  # With the cache, resolve has built it (the count comes from its manifest).
  assert os.listdir(elm_dir / 'dlrm_cache')
  config.use_cache = False
  assert data_sources.resolve(config, SPEC, process_index=0, process_count=1).train_rows == 70


def test_missing_eval_file_stops_before_anything_is_read(elm_dir):
  os.remove(elm_dir / 'eval.csv')
  with pytest.raises(FileNotFoundError, match='eval.csv') as error:
    data_sources.resolve(config_for(elm_dir), SPEC, process_index=0, process_count=1)
  # The stand-in it suggests goes beside the real train.csv, not over it.
  assert f'python -m dlrm_jax.datagen elm --out_dir {elm_dir / "planted"} ' in str(error.value)
  assert not (elm_dir / 'dlrm_cache').exists()
  config = config_for(elm_dir)
  config.no_eval = True
  assert data_sources.resolve(config, SPEC, process_index=0, process_count=1).train_rows == 70


def test_a_data_location_naming_the_train_file_says_to_name_its_directory(elm_dir):
  # It said the files were missing and suggested generating a stand-in at the file's path.
  with pytest.raises(NotADirectoryError, match=re.escape(
      f'data_location {elm_dir / "train.csv"} is a file: set it to the directory')):
    data_sources.resolve(config_for(elm_dir / 'train.csv'), SPEC, process_index=0,
                         process_count=1)


def test_a_cache_another_process_is_building_is_taken_last(tmp_path):
  # Preparers started together build different files instead of queueing for one: while the
  # lock of day_0's cache is held (as by another process building it), day_1 is built first.
  for day in range(2):
    write(tmp_path / f'day_{day}', numbered_lines(100 * day, 20))
  config = config_for(tmp_path, train_files='day_0,day_1', eval_files='day_1')
  root = tmp_path / 'dlrm_cache'
  root.mkdir()
  names = [row_cache.cache_name(row_cache.Source(str(tmp_path / f'day_{d}')), SPEC, (0, 1))
           for d in range(2)]
  holder = open(root / f'{names[0]}.lock', 'w')  # pylint: disable=consider-using-with
  fcntl.flock(holder, fcntl.LOCK_EX)
  done = []
  worker = threading.Thread(target=lambda: done.append(data_sources.prepare(config, SPEC)))
  worker.start()
  try:
    deadline = time.monotonic() + 60
    while not (root / names[1] / 'manifest.json').exists() and time.monotonic() < deadline:
      time.sleep(0.05)
    assert (root / names[1] / 'manifest.json').exists()
    time.sleep(0.2)
    assert not (root / names[0]).exists() and not done  # waiting for day_0's builder
  finally:
    fcntl.flock(holder, fcntl.LOCK_UN)
    holder.close()
  worker.join(60)
  assert {os.path.basename(k): v['rows'] for k, v in done[0].items()} == {'day_0': 20,
                                                                          'day_1': 20}


def test_a_config_naming_other_files_says_how_to_run_it_on_planted_data(tmp_path):
  # criteo_1tb.py names day_0..day_23; the planted data set and datagen's stand-ins have
  # train.txt and eval.txt. Both of the old hints led back to the same error.
  config = criteo_1tb.get_config('deeprec')
  config.output_dir, config.data_location = str(tmp_path), ''
  config.planted.train_rows, config.planted.eval_rows = 60, 20
  spec = feature_spec.from_config(config)
  with pytest.raises(FileNotFoundError, match='add --config.train_files= --config.eval_files='):
    data_sources.resolve(config, spec, process_index=0, process_count=1)
  config.train_files = config.eval_files = ''
  assert data_sources.resolve(config, spec, process_index=0, process_count=1).train_rows == 60
  config.data_location = str(tmp_path / 'planted_criteo')
  config.train_files = 'day_0'
  with pytest.raises(FileNotFoundError, match='add --config.train_files= --config.eval_files='):
    data_sources.resolve(config, spec, process_index=0, process_count=1)


def test_planted_criteo_data_from_the_default_config(tmp_path):
  # config.planted describes the ELM world; the Criteo generator takes what applies to it (its
  # ELM-only fields used to be passed on, a TypeError).
  config = default.get_config()
  config.feature_spec = 'criteo'
  config.output_dir = str(tmp_path)
  config.planted.train_rows, config.planted.eval_rows = 300, 100
  spec = feature_spec.from_config(config)
  data = data_sources.resolve(config, spec, process_index=0, process_count=1)
  assert data.train_rows == 300 and 0.5 < data.oracle['oracle_auc'] <= 1
  with open(tmp_path / 'planted_criteo' / 'oracle.json') as f:
    assert json.load(f)['planted']['target_ctr'] == config.planted.target_ctr


def test_every_planted_field_can_be_set_and_unset_ones_are_the_generators_defaults():
  # A field a config left out of config.planted could not be set from the command line (an
  # ml_collections KeyError: --config.planted.linear_weight=2 on the default config).
  import dataclasses  # pylint: disable=g-import-not-at-top
  from configs import ablation_interactions  # pylint: disable=g-import-not-at-top
  from dlrm_jax import datagen  # pylint: disable=g-import-not-at-top
  scalars = {f.name for m in datagen.PLANTED_MODELS.values() for f in dataclasses.fields(m)
             if isinstance(f.default, (int, float))}
  for config in (default.get_config(), default.get_config('tiny'),
                 ablation_interactions.get_config()):
    assert scalars <= set(config.planted), scalars - set(config.planted)
    config.planted.linear_weight = 2.0  # the placeholder takes a value like any field
  tiny = default.get_config('tiny').planted.to_dict()
  assert tiny['latent_dim'] is None
  # Unset (None) fields are not passed on: the generator's defaults, which differ by world.
  for kind in ('elm', 'criteo'):
    arguments = data_sources.planted_arguments(tiny, kind)
    assert None not in arguments.values() and arguments['train_rows'] == 8000
    parameters = data_sources.planted_parameters(tiny, kind)
    model = datagen.PLANTED_MODELS[kind]()
    assert parameters['latent_dim'] == model.latent_dim
    assert parameters['target_ctr'] == model.target_ctr  # 0.04 for ELM, 0.25 for Criteo
  assert 'num_users' not in data_sources.planted_parameters(tiny, 'criteo')
  # A config.json without the sizes cannot say which data set it made.
  assert data_sources.planted_parameters({**tiny, 'train_rows': None}, 'elm') is None


@pytest.mark.parametrize('fields, has_oracle', [
    ({}, True), ({'eval_files': 'eval.txt'}, True), ({'split_parts': 3}, False),
    ({'eval_files': 'train.txt'}, False)])
def test_planted_oracle_only_for_the_planted_eval_rows(tmp_path, fields, has_oracle):
  # oracle.json scores the planted eval file: beside the last part of the train file (as
  # criteo_kaggle.py evaluates) or another file its figures would describe other rows.
  config = default.get_config()
  config.feature_spec = 'criteo'
  config.output_dir = str(tmp_path)
  config.planted.train_rows, config.planted.eval_rows = 60, 20
  config.update(fields)
  data = data_sources.resolve(config, feature_spec.from_config(config), process_index=0,
                              process_count=1)
  assert bool(data.oracle) == has_oracle
  assert not has_oracle or set(data.oracle) == {'oracle_auc', 'oracle_logloss'}
  # The same planted files named by data_location (as datagen's command line writes them): the
  # same oracle figures, unless a file is no longer the one oracle.json describes.
  config.data_location = str(tmp_path / 'planted_criteo')
  resolve = lambda: data_sources.resolve(config, feature_spec.from_config(config),
                                         process_index=0, process_count=1).oracle
  assert resolve() == data.oracle
  # A label flipped keeps the file's size: the figures were of the rows before it.
  path = tmp_path / 'planted_criteo' / 'eval.txt'
  text = path.read_text()
  path.write_text(('1' if text[0] == '0' else '0') + text[1:])
  assert resolve() == {}
  path.write_text(text)
  assert resolve() == data.oracle
  with open(tmp_path / 'planted_criteo' / 'eval.txt', 'a') as f:
    f.write('1' + '\t' * 39 + '\n')
  assert resolve() == {}


def test_criteo_missing_is_recorded_and_absent_means_dropped():
  config = criteo_kaggle.get_config()
  assert feature_spec.spec_args(config)['criteo_missing'] == ' '
  assert feature_spec.from_config(config).columns[14].default == ' '
  # Records from before the field (config.json, an export's spec.json) were trained with ''.
  args = {k: v for k, v in feature_spec.spec_args(config).items() if k != 'criteo_missing'}
  assert feature_spec.from_args(**args).columns[14].default == ''


def test_spec_args_rebuild_the_spec_through_json():
  # What a serving artifact records (spec.json) to rebuild the spec without the run's config.
  configs = [default.get_config(), criteo_kaggle.get_config('reference'),
             criteo_1tb.get_config('deeprec')]
  for config in configs:
    args = json.loads(json.dumps(feature_spec.spec_args(config)))
    assert feature_spec.from_args(**args) == feature_spec.from_config(config), args


def test_named_files_gzip_and_globs(tmp_path):
  write(tmp_path / 'day_0.gz', numbered_lines(0, 10), compress=True)
  write(tmp_path / 'day_1', numbered_lines(10, 5))
  write(tmp_path / 'day_2.gz', numbered_lines(100, 7), compress=True)
  config = config_for(tmp_path, train_files='day_0,day_1', eval_files='day_[2]*')
  data = data_sources.resolve(config, SPEC, process_index=0, process_count=1)
  assert [os.path.basename(s.path) for s in data.train_sources] == ['day_0.gz', 'day_1']
  assert [os.path.basename(s.path) for s in data.eval_sources] == ['day_2.gz']
  assert data.train_rows == 15
  train = data_sources.train_batches(config, SPEC, data, num_steps=1, process_index=0,
                                     process_count=1)
  assert len(list(train)) == 1
  assert rows_of(data_sources.eval_batches(config, SPEC, data, process_index=0,
                                           process_count=1)) == list(range(100, 107))


def test_a_data_directory_named_like_a_pattern_is_read_as_named(tmp_path):
  # 'ds[1]' as a glob matches 'ds1': patterned file names used to read the sibling's data.
  (tmp_path / 'ds[1]').mkdir()
  (tmp_path / 'ds1').mkdir()
  write(tmp_path / 'ds[1]' / 'day_0', numbered_lines(0, 4))
  write(tmp_path / 'ds[1]' / 'day_1', numbered_lines(0, 3))
  write(tmp_path / 'ds1' / 'day_0', numbered_lines(50, 9))
  write(tmp_path / 'ds1' / 'day_1', numbered_lines(50, 8))
  config = config_for(tmp_path / 'ds[1]', train_files='day_[0]*', eval_files='day_1')
  data = data_sources.resolve(config, SPEC, process_index=0, process_count=1)
  assert [s.path for s in data.train_sources] == [str(tmp_path / 'ds[1]' / 'day_0')]
  assert data.train_rows == 4


def test_split_parts_cut_the_train_file_into_days(tmp_path):
  write(tmp_path / 'train.txt', numbered_lines(0, 71))
  config = config_for(tmp_path, train_files='train.txt', split_parts=7, eval_parts=1)
  data = data_sources.resolve(config, SPEC, process_index=0, process_count=1)
  # 71 lines in 7 parts: the eval part is lines [71 * 6 // 7, 71) = [60, 71).
  assert data.train_rows == 60
  for use_cache in (True, False):
    config.use_cache = use_cache
    eval_rows = rows_of(data_sources.eval_batches(config, SPEC, data, process_index=0,
                                                  process_count=1))
    assert eval_rows == list(range(60, 71))
    config.shuffle_buffer = 0
    train = data_sources.train_batches(config, SPEC, data, num_steps=4, process_index=0,
                                       process_count=1)
    assert rows_of(train) == list(range(60)) + list(range(4))
  # Every part evaluated would leave nothing to train on.
  for eval_parts in (0, 7):
    config.eval_parts = eval_parts
    with pytest.raises(ValueError, match=r'must be in \[1, split_parts=7\)'):
      data_sources.resolve(config, SPEC, process_index=0, process_count=1)


@pytest.mark.parametrize('use_cache', [True, False])
def test_every_process_gets_the_same_number_of_batches(elm_dir, use_cache):
  config = config_for(elm_dir, use_cache=use_cache)
  config.batch_size = 12  # 4 rows a process
  config.eval_batch_size = 48  # global too: 16 rows a process
  shares, counts = [], []
  for k in range(3):
    data = data_sources.resolve(config, SPEC, process_index=k, process_count=3)
    train = list(data_sources.train_batches(config, SPEC, data, num_steps=30, start_step=2,
                                            process_index=k, process_count=3))
    assert len(train) == 28 and all(len(b['label']) == 4 for b in train)
    batches = list(data_sources.eval_batches(config, SPEC, data, process_index=k,
                                             process_count=3))
    counts.append(len(batches))
    shares.append(rows_of(batches))
    assert all(len(b['label']) == 16 for b in batches)
  # 45 eval rows: 15 a process, one batch of 16 each.
  assert counts == [1, 1, 1]
  assert sorted(sum(shares, [])) == list(range(1000, 1045))
  # Two processes, 11 rows a batch: shares of 23 and 22 rows take 3 and 2 batches, and the
  # second process pads a masked batch so that both run the same number of eval steps.
  config.eval_batch_size = 22
  shares, counts = [], []
  for k in range(2):
    data = data_sources.resolve(config, SPEC, process_index=k, process_count=2)
    batches = list(data_sources.eval_batches(config, SPEC, data, process_index=k,
                                             process_count=2))
    counts.append(len(batches))
    shares.append(rows_of(batches))
  assert counts == [3, 3] and sorted(shares[0] + shares[1]) == list(range(1000, 1045))


SHARES_SCRIPT = """
import json, os, sys
sys.path[:0] = [{tests!r}, os.path.dirname({tests!r})]
import jax
from data_sources_test import SPEC, config_for, rows_of
from dlrm_jax import data_sources
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize(coordinator_address={address!r}, num_processes=2, process_id={pid})
config = config_for({data!r}, cache_dir={cache!r})
data = data_sources.resolve(config, SPEC, train=False)
print('ROWS', json.dumps(rows_of(data_sources.eval_batches(config, SPEC, data))))
"""


@pytest.mark.slow
def test_processes_with_different_caches_still_share_the_rows_exactly(elm_dir, tmp_path):
  # Hosts with a cache directory each: process 0's holds a full cache of eval.csv (from a
  # one-process run), process 1's none. Reading a slice of the full cache on one and its share
  # of the lines on the other read some rows twice and others never; they must agree.
  import socket  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  caches = [str(tmp_path / 'host0'), str(tmp_path / 'host1')]
  eval_source = row_cache.Source(str(elm_dir / 'eval.csv'))
  row_cache.open_or_build(eval_source, SPEC, cache_root=caches[0])
  assert row_cache.has_full_cache(eval_source, SPEC, caches[0])
  assert not row_cache.has_full_cache(eval_source, SPEC, caches[1])
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    address = f'127.0.0.1:{s.getsockname()[1]}'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  procs = [subprocess.Popen(
      [sys.executable, '-c', SHARES_SCRIPT.format(
          tests=os.path.dirname(os.path.abspath(__file__)), address=address, pid=pid,
          data=str(elm_dir), cache=caches[pid])],
      env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for pid in (0, 1)]
  outputs = [p.communicate(timeout=300) for p in procs]
  shares = []
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-4000:]
    shares.append(json.loads([l for l in out.splitlines() if l.startswith('ROWS')][-1][5:]))
  assert sorted(shares[0] + shares[1]) == list(range(1000, 1045))


def test_cache_and_csv_give_the_same_unshuffled_batches_and_resume(elm_dir):
  streams = {}
  for use_cache in (True, False):
    config = config_for(elm_dir, use_cache=use_cache, shuffle_buffer=0)
    data = data_sources.resolve(config, SPEC, process_index=0, process_count=1)
    whole = list(data_sources.train_batches(config, SPEC, data, num_steps=9, process_index=0,
                                            process_count=1))
    resumed = list(data_sources.train_batches(config, SPEC, data, num_steps=9, start_step=5,
                                              process_index=0, process_count=1))
    assert len(whole) == 9 and rows_of(resumed) == rows_of(whole[5:])
    streams[use_cache] = whole
  for a, b in zip(streams[True], streams[False]):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_shuffled_training_is_reproducible_per_seed(elm_dir):
  def run(seed):
    config = config_for(elm_dir, seed=seed)
    data = data_sources.resolve(config, SPEC, process_index=0, process_count=1)
    return rows_of(data_sources.train_batches(config, SPEC, data, num_steps=4, process_index=0,
                                              process_count=1))
  first = run(1)
  assert sorted(first) == sorted(set(first)) and len(first) == 64
  assert run(1) == first and run(2) != first


@pytest.mark.parametrize('use_cache', [True, False])
def test_parse_stats_count_each_line_once(tmp_path, use_cache):
  # 8 steps of 16 rows run through the 39 good rows three times: the parse figures that
  # results.json reports are the file's, whichever path read it and however many epochs ran.
  lines = numbered_lines(0, 40)
  lines[7] = elm_line(ctr_30='x')
  write(tmp_path / 'train.csv', lines)
  write(tmp_path / 'eval.csv', numbered_lines(0, 5))
  config = config_for(tmp_path, skip_bad_rows=True, use_cache=use_cache)
  data = data_sources.resolve(config, SPEC, process_index=0, process_count=1)
  stats = input_pipeline.ParseStats()
  list(data_sources.train_batches(config, SPEC, data, num_steps=8, stats=stats, process_index=0,
                                  process_count=1))
  assert (stats.rows, stats.bad_rows, len(stats.bad_row_examples)) == (39, 1, 1)
  assert (stats.lines, stats.source_lines) == (40, 40)
  assert "train.csv:8: column 'ctr_30'" in stats.bad_row_examples[0]


def test_criteo_configs(tmp_path):
  kaggle = criteo_kaggle.get_config()
  assert (kaggle.train_files, kaggle.split_parts, kaggle.eval_parts) == ('train.txt', 7, 1)
  assert feature_spec.from_config(kaggle).total_rows == 26 * 10000
  # DeepRec reads its test set in batches of the train batch size (and a larger eval batch
  # would set the Criteo run's peak memory).
  assert kaggle.eval_batch_size == kaggle.batch_size == 512
  reference = feature_spec.from_config(criteo_kaggle.get_config('reference'))
  assert [t.rows for t in reference.tables] == list(criteo_kaggle.KAGGLE_REFERENCE_ROWS)
  deeprec_tables = feature_spec.from_config(criteo_kaggle.get_config('deeprec_tables'))
  assert deeprec_tables.total_rows == 19044490 and deeprec_tables.tables[2].rows == 5000000
  terabyte = criteo_1tb.get_config()
  assert terabyte.train_files.split(',') == [f'day_{d}' for d in range(23)]
  assert terabyte.eval_files == 'day_23'
  assert feature_spec.from_config(terabyte).tables[0].rows == 9980333
  with pytest.raises(ValueError, match="variant 'big': expected one of"):
    criteo_kaggle.get_config('big')
  # The 1TB file layout, found with gzip'd and plain days mixed.
  spec = feature_spec.criteo_spec(100, embedding_dim=4)
  line = '\t'.join(['1'] + ['3'] * 13 + ['68fd1e64'] * 26)
  for day in range(24):
    write(tmp_path / (f'day_{day}.gz' if day % 2 else f'day_{day}'), [line] * 2, day % 2 == 1)
  # The MLPerf sizes read the same day files (the config used to want them concatenated).
  for config in criteo_1tb.get_config('deeprec'), criteo_1tb_mlperf.get_config():
    config.data_location = str(tmp_path)
    config.num_workers = 0
    data = data_sources.resolve(config, spec, process_index=0, process_count=1)
    assert data.train_rows == 46 and len(data.train_sources) == 23
    assert data.eval_sources[0].path == str(tmp_path / 'day_23.gz')


def test_a_table_of_no_rows_is_refused_by_the_spec():
  # Ids are hashes modulo the rows: with 0 every id read 0 and numpy only warned.
  with pytest.raises(ValueError, match="table 'shop_id' has 0 rows: it needs at least one"):
    feature_spec.elm_spec(hash_buckets=0)
  with pytest.raises(ValueError, match="table 'C26' has -1 rows"):
    feature_spec.criteo_spec((8,) * 25 + (-1,))


def _as_process(monkeypatch, index, count, failed_at_call):
  """This interpreter as process `index` of `count` of a multi-process run, whose gathers see
  the others' rows from `failed_at_call`: {gather number: {process: its error text}}."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  calls = []

  def gather(local):
    failures = failed_at_call.get(len(calls), {})
    calls.append(local)
    rows = []
    for p in range(count):
      row = local if p == index else np.zeros_like(local)
      if p in failures:
        text = failures[p][:len(local) - 1]
        row[0], row[1:1 + len(text)] = 1, np.frombuffer(text, np.uint8)
      rows.append(row)
    return np.stack(rows)
  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: True)
  monkeypatch.setattr(jax, 'process_count', lambda: count)
  monkeypatch.setattr(jax, 'process_index', lambda: index)
  monkeypatch.setattr(multihost_utils, 'process_allgather', gather)
  return calls


def test_a_failure_on_another_process_is_raised_here_with_its_error_text(monkeypatch):
  # The text is cut at a byte limit and may be any bytes: cut inside a character, or not UTF-8.
  text = b'\xff\xfe FileNotFoundError: ' + 'é'.encode() * 600
  _as_process(monkeypatch, 1, 3, {0: {2: text}, 1: {2: text}})
  with pytest.raises(data_sources.OtherProcessFailed,
                     match=r'^finding the files failed on process 2: its log says why '
                           r'\(process 2: .* FileNotFoundError: (é)+\)$'):
    data_sources.agreeing('finding the files', lambda: 'found')
  with pytest.raises(input_pipeline.DataError, match='reading rows failed on process 2'):
    data_sources.fail_together(None, 'reading rows')


def test_a_failure_elsewhere_releases_this_processs_planted_data_readers_lock(tmp_path,
                                                                              monkeypatch):
  # Process 1 opens the planted data (taking the readers lock), then process 2 fails to: the
  # run stops, and the lock must not stay held by the exception's frames.
  from dlrm_jax import datagen  # pylint: disable=g-import-not-at-top
  import train_helpers  # pylint: disable=g-import-not-at-top
  config = train_helpers.tiny_config(tmp_path)
  config.planted.update(train_rows=200, eval_rows=50)
  directory = str(tmp_path / 'planted_elm')
  calls = _as_process(monkeypatch, 1, 3, {1: {2: b'PlantedDataInUse: elsewhere'}})
  # Kept, as a notebook keeps its last exception (and main prints it) with its frames.
  with pytest.raises(data_sources.OtherProcessFailed,
                     match='reading the planted data in') as raised:
    data_sources._planted_data(config, feature_spec.from_config(config), directory)
  assert len(calls) == 2  # process 0's write, then every other process's read
  fd = os.open(os.path.join(directory, datagen.READERS_LOCK), os.O_RDWR)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while a reader holds it
  finally:
    os.close(fd)
  assert raised.value.__traceback__ is not None


def test_counting_rows_without_the_cache_is_agreed_over_the_processes(elm_dir, monkeypatch):
  # Counted without a collective (use_cache=False), a file unreadable on one host alone left
  # the others waiting in their next collective for JAX's 5-minute shutdown timeout.
  config = config_for(elm_dir)
  config.use_cache = False
  sources = (data_sources.Source(str(elm_dir / 'train.csv')),)
  _as_process(monkeypatch, 0, 2, {0: {1: b'PermissionError: [Errno 13] Permission denied'}})
  with pytest.raises(data_sources.OtherProcessFailed,
                     match=r'counting the rows failed on process 1: .*Permission denied'):
    data_sources.source_lines(config, SPEC, sources, 0, 2)
  _as_process(monkeypatch, 0, 2, {})
  assert data_sources.source_lines(config, SPEC, sources, 0, 2) == [70]


def test_num_workers_zero_starts_no_workers_even_for_a_big_file(tmp_path):
  # 0 means "parse in this process" (the config's documented value); only -1 is auto.
  big = tmp_path / 'big.csv'
  with open(big, 'wb') as f:
    f.truncate(data_sources._AUTO_WORKERS_BYTES)  # sparse: no disk used
  assert data_sources.workers_for(0, [str(big)]) == 0
  assert data_sources.workers_for(3, [str(big)]) == 3
  if (os.cpu_count() or 1) > 1:
    assert data_sources.workers_for(-1, [str(big)]) > 0


def test_stats_of_a_full_cache_read_by_two_processes_count_each_line_once(tmp_path):
  # A cache of all of train.csv (from a one-process run) read in slices by two processes:
  # its parse figures are process 0's alone, so the run's totals are the file's.
  lines = numbered_lines(0, 40)
  lines[7] = elm_line(ctr_30='x')
  write(tmp_path / 'train.csv', lines)
  write(tmp_path / 'eval.csv', numbered_lines(0, 5))
  config = config_for(tmp_path, skip_bad_rows=True)
  data_sources.resolve(config, SPEC, process_index=0, process_count=1)  # the full cache
  totals = input_pipeline.ParseStats()
  for k in range(2):
    data = data_sources.resolve(config, SPEC, process_index=k, process_count=2)
    stats = input_pipeline.ParseStats()
    list(data_sources.train_batches(config, SPEC, data, num_steps=4, stats=stats,
                                    process_index=k, process_count=2))
    totals.add(stats)
  assert (totals.rows, totals.bad_rows, totals.lines, totals.source_lines) == (39, 1, 40, 40)
