"""Planted data: the exact ELM / Criteo file formats, determinism, the oracle, and reuse."""

import collections
import copy
import dataclasses
import json
import logging
import math
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from dlrm_jax import datagen
from dlrm_jax import feature_spec as fs
from dlrm_jax import metrics
import train_helpers as th

# Small vocabularies keep a world's build well under a second; the model's terms are the same.
SMALL = dict(num_users=400, num_items=300, num_shops=60, num_categories=12, num_foods=80,
             num_brands=20, num_cities=3, num_districts=6, num_aois=30, max_history=12,
             mean_history=4.0)
SMALL_CRITEO = dict(vocab_sizes=(50, 30, 200, 100, 20, 5, 80, 40, 3, 60, 30, 90, 25, 7, 40,
                                 70, 4, 30, 20, 4, 60, 6, 5, 40, 10, 30))
ELM_LISTS = ('shop_id_list', 'item_id_list', 'category_1_id_list', 'merge_standard_food_id_list',
             'brand_id_list', 'price_list', 'shop_aoi_id_list', 'shop_geohash6_list',
             'timediff_list', 'hours_list', 'time_type_list', 'weekdays_list')
COL = {c.name: k for k, c in enumerate(fs.ELM_COLUMNS)}
INT_RE = re.compile(r'-?[0-9]+\Z')
GEOHASH_RE = re.compile(r'[0-9b-hjkmnp-z]+\Z')
HEX_RE = re.compile(r'[0-9a-f]{8}\Z')


def _rows(path, delimiter):
  with open(path) as f:
    return [line.rstrip('\n').split(delimiter) for line in f]


@pytest.fixture(scope='module')
def elm_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp('elm'))
  datagen.generate_elm(directory, train_rows=1500, eval_rows=4000, seed=3, planted=SMALL)
  return directory


@pytest.fixture(scope='module')
def elm_rows(elm_dir):
  return _rows(os.path.join(elm_dir, 'eval.csv'), ',')


@pytest.fixture(scope='module')
def criteo_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp('criteo'))
  datagen.generate_criteo(directory, train_rows=500, eval_rows=3000, seed=3,
                          planted=SMALL_CRITEO)
  return directory


def test_elm_lines_have_39_fields_and_no_header(elm_dir, elm_rows):
  assert len(elm_rows) == 4000
  assert {len(r) for r in elm_rows} == {len(fs.ELM_COLUMNS)}
  # A header would put a column name where the label is.
  assert {r[0] for r in elm_rows} == {'0', '1'}
  with open(os.path.join(elm_dir, 'eval.csv'), 'rb') as f:
    data = f.read()
  assert data.endswith(b'\n') and b'\r' not in data and b'"' not in data


def test_elm_field_values_have_the_real_types(elm_rows):
  for column in fs.ELM_COLUMNS:
    values = [r[COL[column.name]] for r in elm_rows]
    if column.kind == 'int':
      # Only gender is ever empty (missing: the reader's default -99).
      allowed_empty = column.name == 'gender'
      assert all(INT_RE.match(v) or (allowed_empty and v == '') for v in values), column.name
    elif column.kind == 'float':
      assert all(math.isfinite(float(v)) for v in values), column.name
  ints = lambda name: {int(r[COL[name]]) for r in elm_rows}
  assert ints('hours') <= set(range(24)) and len(ints('hours')) > 10
  assert ints('weekdays') <= set(range(7))
  assert ints('is_supervip') == {0, 1}
  assert {r[COL['gender']] for r in elm_rows} == {'1', '2', ''}
  assert min(ints('rank_7')) >= 1
  assert {r[COL['time_type']] for r in elm_rows} == set(fs.ELM_TIME_TYPES)
  for name in ('user_id', 'item_id', 'shop_id', 'category_1_id', 'merge_standard_food_id',
               'city_id', 'visit_city', 'district_id'):
    assert all(r[COL[name]].isdigit() for r in elm_rows), name
  for name, length in (('shop_geohash_6', 6), ('shop_geohash_12', 12), ('geohash12', 12)):
    assert all(len(r[COL[name]]) == length and GEOHASH_RE.match(r[COL[name]])
               for r in elm_rows), name
  # The real data has empty scalars: brand (no brand) and AOI (no AOI).
  assert any(r[COL['brand_id']] == '' for r in elm_rows)
  assert any(r[COL['shop_aoi_id']] == '' for r in elm_rows)


def test_elm_history_lists_are_aligned_and_hours_match_time_types(elm_rows):
  lengths = []
  for r in elm_rows:
    count = len(r[COL['item_id_list']].split(';')) if r[COL['item_id_list']] else 0
    lengths.append(count)
    if count == 0:
      assert all(r[COL[name]] == '' for name in ELM_LISTS), r
      continue
    # A one-event list of a shop without an AOI is '' too, so split every field the same way.
    values = {name: r[COL[name]].split(';') for name in ELM_LISTS}
    assert {len(v) for v in values.values()} == {count}, values
    hours = [int(h) for h in values['hours_list']]
    assert all(0 <= h < 24 for h in hours)
    assert [fs.ELM_TIME_TYPES[datagen._HOUR_TIME_TYPE[h]] for h in hours] == values[
        'time_type_list']
    assert all(INT_RE.match(v) for v in values['timediff_list'] + values['weekdays_list'])
    assert all(float(v) > 0 for v in values['price_list'])
  lengths = np.array(lengths)
  assert lengths.max() <= SMALL['max_history']
  assert 0 < np.mean(lengths == 0) < 0.2   # some empty histories, as in the real data
  assert lengths.mean() > 2


def test_elm_item_attributes_never_contradict(elm_rows):
  """An item has one shop, category, food, brand and geohash, in scalars and history lists."""
  seen = collections.defaultdict(set)
  attributes = (('shop_id', 'shop_id_list'), ('category_1_id', 'category_1_id_list'),
                ('merge_standard_food_id', 'merge_standard_food_id_list'),
                ('shop_geohash_6', 'shop_geohash6_list'), ('shop_aoi_id', 'shop_aoi_id_list'))
  for r in elm_rows:
    for scalar, _ in attributes:
      seen[r[COL['item_id']], scalar].add(r[COL[scalar]])
    items = r[COL['item_id_list']].split(';') if r[COL['item_id_list']] else []
    for scalar, listed in attributes:
      for item, value in zip(items, r[COL[listed]].split(';')):
        seen[item, scalar].add(value)
    # Within a row, each history item always has the same price.
    prices = collections.defaultdict(set)
    for item, price in zip(items, r[COL['price_list']].split(';')):
      prices[item].add(price)
    assert all(len(p) == 1 for p in prices.values())
  assert max(len(v) for v in seen.values()) == 1
  assert len({item for item, _ in seen}) > 100


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
  digests = []
  for name, seed in (('a', 7), ('b', 7), ('c', 8)):
    datagen.generate_elm(str(tmp_path / name), 300, 200, seed, planted=SMALL)
    with open(tmp_path / name / 'train.csv', 'rb') as f:
      train = f.read()
    with open(tmp_path / name / 'eval.csv', 'rb') as f:
      digests.append((train, f.read()))
  assert digests[0] == digests[1]
  assert digests[0][0] != digests[2][0] and digests[0][1] != digests[2][1]
  # Train and eval come from different streams.
  assert digests[0][0][:1000] != digests[0][1][:1000]


@pytest.mark.parametrize('split', ['train', 'eval'])
def test_elm_oracle_matches_probabilities_recomputed_from_the_file(elm_dir, split):
  with open(os.path.join(elm_dir, 'oracle.json')) as f:
    oracle = json.load(f)
  for key in ('oracle_auc', 'oracle_logloss', 'train_oracle_auc', 'train_oracle_logloss',
              'eval_oracle_auc', 'eval_oracle_logloss', 'train_ctr', 'eval_ctr', 'train_rows',
              'eval_rows', 'seed', 'kind', 'planted', 'intercept', 'generator_version'):
    assert key in oracle, key
  assert oracle['planted'] == dataclasses.asdict(datagen.PlantedModel(**SMALL))
  labels, probs = datagen.true_probabilities(elm_dir, split)
  assert labels.size == oracle[f'{split}_rows']
  # The generator's figures and these, recomputed from the files' text: the same float64 sums
  # (1e-12 absorbs their order), while another row or probability moves them by 1e-4 and more.
  assert oracle[f'{split}_ctr'] == pytest.approx(labels.mean(), abs=1e-12)
  assert oracle[f'{split}_oracle_auc'] == pytest.approx(metrics.exact_auc(labels, probs),
                                                        abs=1e-12)
  assert oracle[f'{split}_oracle_logloss'] == pytest.approx(metrics.logloss(labels, probs),
                                                            abs=1e-12)
  assert oracle['oracle_auc'] == oracle['eval_oracle_auc']
  # The planted signal is real: well above chance, and the labels follow the probabilities.
  assert oracle[f'{split}_oracle_auc'] > 0.65
  assert oracle[f'{split}_oracle_logloss'] < oracle[f'{split}_constant_logloss']


def _assert_ctr_near(labels, probs, target):
  # Rows are i.i.d. given the world, so the label mean has standard deviation sqrt(t(1-t)/n);
  # 4 of those, plus 0.003 for the intercept being fitted on 32768 rows of another stream.
  n = labels.size
  assert abs(labels.mean() - target) < 4 * math.sqrt(target * (1 - target) / n) + 0.003
  assert abs(probs.mean() - target) < 4 * probs.std() / math.sqrt(n) + 0.003


def test_ctr_follows_target(elm_dir, criteo_dir):
  _assert_ctr_near(*datagen.true_probabilities(elm_dir, 'eval'), 0.04)
  _assert_ctr_near(*datagen.true_probabilities(criteo_dir, 'eval'), 0.25)


def _resample_factors(world, rng):
  if isinstance(world, datagen.ElmWorld):
    return dataclasses.replace(
        world, user_factors=rng.permutation(world.user_factors),
        item_factors=rng.normal(size=world.item_factors.shape),
        category_factors=rng.normal(size=world.category_factors.shape))
  return dataclasses.replace(
      world, factors={c: rng.normal(size=f.shape) for c, f in world.factors.items()})


@pytest.mark.parametrize('kind, small', [('elm', SMALL), ('criteo', SMALL_CRITEO)])
def test_zero_interaction_weight_removes_latent_products(kind, small):
  rng = np.random.default_rng(0)
  for weight in (0.0, 0.6):
    world = datagen.build_world(kind, dict(small, interaction_weight=weight), seed=2)
    rows = world.draw(np.random.default_rng(1), 2000)
    change = world.logits(rows) - _resample_factors(world, rng).logits(rows)
    if weight == 0.0:
      np.testing.assert_array_equal(change, 0.0)
    else:
      assert np.abs(change).max() > 0.5


def test_ensure_reuses_identical_data_and_regenerates_otherwise(tmp_path, monkeypatch, caplog):
  directory = str(tmp_path / 'planted')
  args = (directory, 'elm', 300, 200, 5)
  first = datagen.ensure_planted_data(*args, planted=SMALL)
  assert not first['reused']
  stamp = lambda name: os.stat(os.path.join(directory, name)).st_mtime_ns
  stamps = {name: stamp(name) for name in ('train.csv', 'eval.csv', 'oracle.json')}
  with open(first['train_path'], 'rb') as f:
    original = f.read()

  real_generate = datagen.generate

  def must_not_generate(*unused_args, **unused_kwargs):
    raise AssertionError('regenerated an identical data set')

  monkeypatch.setattr(datagen, 'generate', must_not_generate)
  second = datagen.ensure_planted_data(*args, planted=SMALL)
  assert second['reused'] and second['oracle_auc'] == first['oracle_auc']
  assert {name: stamp(name) for name in stamps} == stamps
  monkeypatch.setattr(datagen, 'generate', real_generate)

  changed = datagen.ensure_planted_data(*args, planted=SMALL, interaction_weight=0.0)
  assert not changed['reused'] and changed['planted']['interaction_weight'] == 0.0
  with open(changed['train_path'], 'rb') as f:
    assert f.read() != original
  assert not datagen.ensure_planted_data(directory, 'elm', 300, 201, 5, planted=SMALL)['reused']

  os.remove(os.path.join(directory, 'oracle.json'))
  assert not datagen.ensure_planted_data(*args, planted=SMALL)['reused']
  with open(first['train_path'], 'rb') as f:
    assert f.read() == original   # back to the first parameters: the same bytes again

  with open(first['train_path'], 'ab') as f:   # a file changed after the oracle was written
    f.write(b'0\n')
  assert not datagen.ensure_planted_data(*args, planted=SMALL)['reused']
  assert datagen.ensure_planted_data(*args, planted=SMALL)['reused']
  # An eval label flipped in place keeps the size: written again, and the log says why.
  with open(first['eval_path'], 'r+b') as f:
    label = f.read(1)
    f.seek(0)
    f.write(b'1' if label == b'0' else b'0')
  with caplog.at_level(logging.WARNING):
    assert not datagen.ensure_planted_data(*args, planted=SMALL)['reused']
  assert 'not the ones oracle.json records' in caplog.text


def test_data_a_run_reads_are_not_rewritten_for_a_run_asking_for_others(tmp_path):
  # Another planted seed on the same output_dir rewrote the files under a training run: its
  # final evaluation scored the other run's rows. (flock locks of two opens conflict within one
  # process as between two.)
  directory = str(tmp_path / 'planted')
  args = (directory, 'elm', 300, 200)
  first, held = datagen.ensure_and_hold(*args, 5, planted=SMALL)
  with pytest.raises(datagen.PlantedDataInUse, match=r'another run is reading.*\(seed\)'):
    datagen.ensure_planted_data(*args, 6, planted=SMALL)
  with pytest.raises(datagen.PlantedDataInUse):
    datagen.main(['elm', '--out_dir', directory, '--train_rows', '300', '--eval_rows', '200',
                  '--force'])
  assert datagen.read_oracle(directory)['seed'] == 5
  assert datagen.ensure_planted_data(*args, 5, planted=SMALL)['reused']  # the same data: shared
  held.close()  # the run ended
  assert datagen.ensure_planted_data(*args, 6, planted=SMALL)['seed'] == 6
  assert first['seed'] == 5
  # A writer's lock left held (kept alive by a failed --force's traceback) is an error, not a
  # wait that holds the directory's writer lock for every other run.
  leftover = datagen.ReadersLock.open(directory)
  leftover.for_writing('a test')
  with pytest.raises(datagen.PlantedDataInUse, match='another process is rewriting'):
    datagen.ensure_planted_data(*args, 6, planted=SMALL)
  assert copy.deepcopy(leftover) is leftover  # a copy would close the original's descriptor
  leftover.close()
  assert datagen.ensure_planted_data(*args, 6, planted=SMALL)['reused']


def test_interrupted_generation_is_never_reused(tmp_path, monkeypatch):
  directory = str(tmp_path / 'planted')
  args = (directory, 'elm', 300, 200, 5)
  datagen.ensure_planted_data(*args, planted=SMALL)
  real_write = datagen._write_split

  def fail_on_eval(world, path, split, rows, use_gzip):
    if split == 1:
      raise KeyboardInterrupt
    return real_write(world, path, split, rows, use_gzip)

  monkeypatch.setattr(datagen, '_write_split', fail_on_eval)
  with pytest.raises(KeyboardInterrupt):
    datagen.ensure_planted_data(*args, planted=SMALL, linear_weight=0.5)
  assert not os.path.exists(os.path.join(directory, 'oracle.json'))
  assert sorted(os.listdir(directory)) == ['.planted', '.readers.lock', 'eval.csv', 'train.csv']
  monkeypatch.setattr(datagen, '_write_split', real_write)
  assert not datagen.ensure_planted_data(*args, planted=SMALL)['reused']


def test_a_second_writer_waits_and_then_reuses_the_data(tmp_path):
  # Two runs started on one output_dir both generated the planted data: the second rewrote the
  # files under the first's row-cache build, which failed ("changed while it was being cached").
  directory = str(tmp_path / 'planted')
  log = tmp_path / 'second.log'
  script = ('import json, sys\nfrom absl import logging\nfrom dlrm_jax import datagen\n'
            'logging.set_verbosity(logging.INFO)\n'
            f'r = datagen.ensure_planted_data({directory!r}, "elm", 300, 200, 5, '
            f'planted={SMALL!r})\n'
            'print(json.dumps({"reused": r["reused"]}))\n')
  with datagen.writer_lock(directory):
    with open(log, 'w') as err:
      second = subprocess.Popen([sys.executable, '-c', script], stdout=subprocess.PIPE,
                                stderr=err, text=True)
    deadline = time.monotonic() + 120  # an import and a model build on a busy machine
    while 'waiting for another process' not in log.read_text():
      assert second.poll() is None and time.monotonic() < deadline, log.read_text()
      time.sleep(0.1)
    first = datagen.generate('elm', directory, 300, 200, 5, SMALL)
    inode = os.stat(first['train_path']).st_ino
  out, _ = second.communicate(timeout=120)
  assert second.returncode == 0, log.read_text()
  assert json.loads(out.splitlines()[-1]) == {'reused': True}
  assert os.stat(first['train_path']).st_ino == inode  # not written again
  # The writer lock is the directory's own flock (no file); the readers lock has its file.
  assert sorted(os.listdir(directory)) == ['.planted', '.readers.lock', 'eval.csv',
                                           'oracle.json', 'train.csv']


def test_a_failed_writer_removing_its_directory_lets_one_writer_in_at_a_time(tmp_path, caplog):
  # A made the directory and failed, removing it while B waited on its lock: B held a lock on
  # the removed directory, and C locked the new one beside it: two writers at once.
  import threading  # pylint: disable=g-import-not-at-top
  directory = str(tmp_path / 'new')
  events = []

  def writer(name, seconds):
    with datagen.writer_lock(directory):
      events.append(f'{name} in')
      time.sleep(seconds)
      events.append(f'{name} out')
  caplog.set_level('INFO')
  second = threading.Thread(target=writer, args=('B', 0.5))
  with pytest.raises(KeyboardInterrupt):
    with datagen.writer_lock(directory):
      second.start()
      deadline = time.monotonic() + 30
      while 'waiting for another process' not in caplog.text:
        assert time.monotonic() < deadline
        time.sleep(0.01)
      raise KeyboardInterrupt
  while not events:  # B is in
    time.sleep(0.01)
  third = threading.Thread(target=writer, args=('C', 0))
  third.start()
  second.join()
  third.join()
  assert events == ['B in', 'B out', 'C in', 'C out']


def test_a_failed_writer_raises_its_own_error_when_another_has_just_begun(tmp_path,
                                                                          monkeypatch):
  # The failed writer removes the directory it made; another writer's first file appearing in
  # between made the removal raise 'Directory not empty' in place of the first one's error.
  directory = tmp_path / 'planted'
  real_listdir = os.listdir

  def listdir_then_another_writer_begins(path):
    names = real_listdir(path)
    (directory / 'train.csv.tmp').write_text('')
    return names
  with pytest.raises(RuntimeError, match='disk full'):
    with datagen.writer_lock(str(directory)):
      monkeypatch.setattr(os, 'listdir', listdir_then_another_writer_begins)
      raise RuntimeError('disk full')
  monkeypatch.undo()
  assert os.listdir(directory) == ['train.csv.tmp']


def test_a_ctrl_c_while_waiting_for_the_writer_lock_leaves_no_fd(tmp_path):
  # The interrupted waiter kept its fd of the directory open for the rest of the process.
  import signal  # pylint: disable=g-import-not-at-top
  directory = tmp_path / 'planted'
  directory.mkdir()
  holder = subprocess.Popen(
      [sys.executable, '-c', f'import fcntl, os, time\nfd = os.open({str(directory)!r}, '
       'os.O_RDONLY)\nfcntl.flock(fd, fcntl.LOCK_EX)\nprint("held", flush=True)\ntime.sleep(60)'],
      stdout=subprocess.PIPE, text=True)

  def interrupt(signum, frame):
    raise KeyboardInterrupt
  old = signal.signal(signal.SIGALRM, interrupt)
  try:
    assert holder.stdout.readline().strip() == 'held'
    before = th.open_files()
    signal.setitimer(signal.ITIMER_REAL, 0.5)  # while it waits for the holder
    with pytest.raises(KeyboardInterrupt):
      with datagen.writer_lock(str(directory)):
        pass
    assert not th.open_files() - before
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)
    holder.kill()
    holder.communicate()


def test_files_not_written_by_datagen_are_never_overwritten(tmp_path):
  # E.g. a data_location with the real train.csv and no eval.csv yet.
  for kind, name, planted in (('elm', 'train.csv', SMALL), ('criteo', 'eval.txt.gz', None)):
    real = tmp_path / kind
    real.mkdir()
    (real / name).write_text('the real rows\n')
    with pytest.raises(FileExistsError, match=f'holds {name}, not written by datagen'):
      datagen.ensure_planted_data(str(real), kind, 300, 200, 5, planted=planted)
    assert sorted(os.listdir(real)) == [name]
    assert (real / name).read_text() == 'the real rows\n'
  # An oracle.json datagen did not write was deleted (or, not a JSON object, crashed the check).
  for text in ('{"my": "notes"}', '[1, 2]', 'not json'):
    notes = tmp_path / 'notes'
    notes.mkdir(exist_ok=True)
    (notes / 'oracle.json').write_text(text)
    with pytest.raises(FileExistsError, match='holds oracle.json, not written by datagen'):
      datagen.ensure_planted_data(str(notes), 'elm', 300, 200, 5, planted=SMALL)
    assert sorted(os.listdir(notes)) == ['oracle.json']
    assert (notes / 'oracle.json').read_text() == text


def test_planted_data_of_one_kind_never_vouches_for_real_files_of_the_other(tmp_path):
  # Real Criteo files, then a mistaken ELM generation in their directory: the marker it leaves
  # names the ELM files only, so a Criteo generation there still refuses to overwrite them.
  real = tmp_path / 'criteo'
  real.mkdir()
  for name in ('train.txt', 'eval.txt'):
    (real / name).write_text('the real rows\n')
  datagen.generate_elm(str(real), 300, 200, 5, planted=SMALL)
  with pytest.raises(FileExistsError, match='holds train.txt, eval.txt, not written by datagen'):
    datagen.generate_criteo(str(real), 300, 200, 5, planted=SMALL_CRITEO)
  assert (real / 'train.txt').read_text() == (real / 'eval.txt').read_text() == 'the real rows\n'


def test_a_rejected_model_or_seed_leaves_the_directory_alone(tmp_path):
  for planted, seed in ((SMALL, -1), (dict(SMALL, empty_history_rate=1.0), 5)):
    with pytest.raises(ValueError, match='seed=-1 must be non-negative|empty_history_rate=1.0'):
      datagen.generate_elm(str(tmp_path / 'd'), 300, 200, seed, planted=planted)
    assert not os.path.exists(tmp_path / 'd')


def test_switching_compression_removes_the_other_files(tmp_path):
  # The reader prefers train.csv over train.csv.gz: a stale plain file would shadow new .gz data.
  directory = str(tmp_path / 'planted')
  datagen.ensure_planted_data(directory, 'elm', 300, 200, 1, planted=SMALL)
  gz = datagen.ensure_planted_data(directory, 'elm', 300, 200, 2, gzip_files=True, planted=SMALL)
  assert sorted(os.listdir(directory)) == ['.planted', '.readers.lock', 'eval.csv.gz',
                                           'oracle.json', 'train.csv.gz']
  assert not gz['reused'] and gz['seed'] == 2


def test_an_undefined_oracle_auc_is_written_as_json_null(tmp_path):
  # One eval row has one class: its AUC is undefined, and JSON has no NaN.
  oracle = datagen.generate_elm(str(tmp_path), 300, 1, 5, planted=SMALL)
  assert oracle['oracle_auc'] is None  # as when the data set is reused and read back
  assert datagen.ensure_planted_data(str(tmp_path), 'elm', 300, 1, 5, planted=SMALL) == dict(
      oracle, reused=True)
  with open(tmp_path / 'oracle.json') as f:
    written = json.load(f, parse_constant=lambda c: pytest.fail(f'{c} in oracle.json'))
  assert written['oracle_auc'] is None and written['eval_rows'] == 1


def test_criteo_lines_have_40_fields_and_hex_categoricals(criteo_dir):
  rows = _rows(os.path.join(criteo_dir, 'eval.txt'), '\t')
  assert len(rows) == 3000 and {len(r) for r in rows} == {40}
  assert {r[0] for r in rows} == {'0', '1'}
  dense = [r[1:14] for r in rows]
  assert all(v == '' or INT_RE.match(v) for r in dense for v in r)
  assert any(v == '' for r in dense for v in r)
  assert any(r[1].startswith('-') for r in dense)   # I2 has negatives, as in the real data
  categorical = [r[14:] for r in rows]
  assert all(v == '' or HEX_RE.match(v) for r in categorical for v in r)
  assert any(v == '' for r in categorical for v in r)
  labels, probs = datagen.true_probabilities(criteo_dir, 'eval')
  with open(os.path.join(criteo_dir, 'oracle.json')) as f:
    oracle = json.load(f)
  assert oracle['oracle_auc'] == pytest.approx(metrics.exact_auc(labels, probs), abs=1e-12)  # ditto
  assert oracle['oracle_auc'] > 0.6


def test_command_line_writes_and_records_the_planted_weights(tmp_path, capsys):
  directory = str(tmp_path / 'cli')
  flags = [f'--{k}={v}' for k, v in SMALL.items()]
  from absl import logging  # pylint: disable=g-import-not-at-top
  verbosity = logging.get_verbosity()
  datagen.main(['elm', '--out_dir', directory, '--train_rows', '200', '--eval_rows', '100',
                '--seed', '4', '--interaction_weight', '0', '--history_weight', '0.5'] + flags)
  # A notebook's log level is its own: main() turned on INFO (orbax's lines) for the process.
  assert logging.get_verbosity() == verbosity
  summary = json.loads(capsys.readouterr().out)
  assert not summary['reused']
  with open(os.path.join(directory, 'oracle.json')) as f:
    oracle = json.load(f)
  assert oracle['planted']['interaction_weight'] == 0.0
  assert oracle['planted']['history_weight'] == 0.5
  assert oracle['seed'] == 4 and oracle['train_rows'] == 200
  datagen.main(['criteo', '--out_dir', str(tmp_path / 'c'), '--train_rows', '50',
                '--eval_rows', '50', '--gzip'])
  assert sorted(os.listdir(tmp_path / 'c')) == ['.planted', '.readers.lock', 'eval.txt.gz',
                                                'oracle.json', 'train.txt.gz']
  labels, _ = datagen.true_probabilities(str(tmp_path / 'c'), 'train')
  assert labels.size == 50
