"""Exact AUC, logloss and accuracy against brute-force definitions."""

import itertools
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from dlrm_jax import metric_writer
from dlrm_jax import metrics


def brute_force_auc(labels, scores):
  """P(score_pos > score_neg) + 0.5 P(tie) over every positive/negative pair."""
  pos = [s for s, y in zip(scores, labels) if y]
  neg = [s for s, y in zip(scores, labels) if not y]
  wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
  return wins / (len(pos) * len(neg))


@pytest.mark.parametrize('seed', range(5))
def test_exact_auc_matches_pairwise_count_with_ties(seed):
  rng = np.random.default_rng(seed)
  labels = rng.random(300) < 0.3
  # Few distinct scores, so many ties across classes.
  scores = rng.integers(0, 7, size=300) / 7.0
  assert metrics.exact_auc(labels, scores) == pytest.approx(brute_force_auc(labels, scores),
                                                            abs=1e-12)


def ranked_auc(labels, scores):
  """Mann-Whitney U from np.unique's tie-averaged ranks (what exact_auc computed before)."""
  labels = np.asarray(labels) > 0.5
  _, inverse, counts = np.unique(np.asarray(scores, np.float64), return_inverse=True,
                                 return_counts=True)
  mean_rank = np.cumsum(counts) - (counts - 1) / 2.0
  num_pos = labels.sum()
  return ((mean_rank[inverse][labels].sum() - num_pos * (num_pos + 1) / 2.0)
          / (num_pos * (labels.size - num_pos)))


@pytest.mark.parametrize('seed', range(4))
def test_exact_auc_matches_the_rank_formula_on_float32_scores_with_ties_and_nans(seed):
  rng = np.random.default_rng(seed)
  n = 5000
  labels = rng.random(n) < 0.2
  scores = rng.random(n).astype(np.float32)
  scores[rng.random(n) < 0.3] = 0.5  # a long run of ties across both classes
  scores[rng.random(n) < 0.05 * seed] = np.nan  # none for seed 0, then 5% to 15% of them
  # 1e-12: two float64 summation orders over 5000 rows.
  assert metrics.exact_auc(labels, scores) == pytest.approx(ranked_auc(labels, scores),
                                                            abs=1e-12)
  scores[:] = np.nan
  assert metrics.exact_auc(labels, scores) == 0.5


def test_exact_auc_memory_per_row():
  # np.unique's ranks took ~74 bytes a row of float32 scores (15 GB for Criteo 1TB's eval day).
  # Counted by tracemalloc, which sees numpy's buffers: not a timing, the same on every run.
  import tracemalloc  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  n = 200_000
  labels, scores = rng.random(n) < 0.2, rng.random(n).astype(np.float32)
  tracemalloc.start()
  try:
    metrics.exact_auc(labels, scores)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak / n < 40, peak / n  # 33.4 measured: the sort's order, then four counts a run


def test_logloss_is_the_same_in_pieces(monkeypatch):
  rng = np.random.default_rng(0)
  labels, probs = rng.random(1000) < 0.3, rng.random(1000).astype(np.float32)
  whole = metrics.logloss(labels, probs)
  monkeypatch.setattr(metrics, '_LOGLOSS_ROWS', 7)
  # 1e-12 relative: float64 sums of 1000 terms in another grouping.
  assert metrics.logloss(labels, probs) == pytest.approx(whole, rel=1e-12)
  assert whole == pytest.approx(-np.mean(np.where(labels, np.log(probs.astype(np.float64)),
                                                  np.log1p(-probs.astype(np.float64)))),
                                rel=1e-12)


def test_exact_auc_extremes_and_single_class():
  labels = np.array([0, 0, 1, 1])
  assert metrics.exact_auc(labels, [0.1, 0.2, 0.3, 0.4]) == 1.0
  assert metrics.exact_auc(labels, [0.4, 0.3, 0.2, 0.1]) == 0.0
  assert metrics.exact_auc(labels, [0.5] * 4) == 0.5
  assert np.isnan(metrics.exact_auc([1, 1], [0.2, 0.3]))


def test_logloss_and_accuracy_match_definitions():
  labels = np.array([1, 0, 1, 0])
  probs = np.array([0.9, 0.2, 0.4, 0.6])
  expected = -np.mean([np.log(0.9), np.log(0.8), np.log(0.4), np.log(0.4)])
  assert metrics.logloss(labels, probs) == pytest.approx(expected, rel=1e-12)
  assert metrics.accuracy(labels, probs) == 0.5
  # Clipping keeps a confident mistake finite, at Keras' BinaryCrossentropy epsilon 1e-7.
  assert metrics.logloss([1], [0.0]) == pytest.approx(-np.log(1e-7), rel=1e-9)
  # 1 - (1 - 1e-7) in float64 keeps ~9 of 16 digits (3e-11 relative seen): rel=1e-9.
  assert metrics.logloss([0], [1.0]) == pytest.approx(-np.log(1e-7), rel=1e-9)
  # A probability of exactly 0.5 predicts no click: DeepRec's tf.round rounds half to even.
  assert metrics.accuracy([0, 1], [0.5, 0.5]) == 0.5
  assert metrics.accuracy([0], [0.5]) == 1.0


def test_metric_writer_skips_unneeded_imports_and_reads_back(tmp_path):
  # Stand-in torch and boto3 packages on the path: importing one leaves a marker file.
  # tensorboardX would import both (the real torch costs ~190 MB in a JAX process, boto3 ~8 MB);
  # the writer must import neither, unless the log directory is on S3.
  markers = {}
  for name in ('torch', 'boto3'):
    fake = tmp_path / 'site' / name
    fake.mkdir(parents=True)
    markers[name] = tmp_path / f'{name}_was_imported'
    (fake / '__init__.py').write_text(
        f'open({str(markers[name])!r}, "a").write("x")\nTensor = object\n')
  script = (
      'import sys\n'
      'from dlrm_jax import metric_writer\n'
      f'w = metric_writer.MetricWriter({str(tmp_path / "run")!r})\n'
      'w.write_scalars(3, {"train_loss": 0.5})\n'
      'w.write_histograms(3, {"h": __import__("numpy").arange(5.0)})\n'
      'w.close()\n'
      f'steps, values = metric_writer.read_scalars({str(tmp_path / "run")!r}, "train_loss")\n'
      'assert list(steps) == [3] and list(values) == [0.5], (steps, values)\n'
      'import torch, boto3  # still importable afterwards\n')
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(tmp_path / 'site'), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]))
  subprocess.run([sys.executable, '-c', script], check=True, env=env)
  # The script's own import at the end ran each stand-in exactly once, after the writer.
  assert {name: m.read_text() for name, m in markers.items()} == {'torch': 'x', 'boto3': 'x'}
  for m in markers.values():
    m.unlink()
  script_without_import = script.rsplit('import torch', 1)[0]
  subprocess.run([sys.executable, '-c', script_without_import], check=True, env=env)
  assert not any(m.exists() for m in markers.values())
  # An S3 log directory keeps the client tensorboardX writes through.
  subprocess.run([sys.executable, '-c', 'from dlrm_jax import metric_writer\n'
                  'metric_writer._tensorboardx(logdir="s3://bucket/run")\n'], check=True, env=env)
  assert markers['boto3'].exists() and not markers['torch'].exists()


def test_results_with_an_undefined_metric_are_strict_json(tmp_path):
  # An eval set of one class has no AUC: results.json (and its history) must still parse
  # in readers without NaN (JSON has none), with the metric as null.
  from dlrm_jax import train  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / 'results.json')
  for auc in (float('nan'), np.float32('nan')):
    train.write_results(path, {'eval_auc': auc, 'eval_history': [{'auc': -np.inf}], 'steps': 3})
  strict = dict(parse_constant=lambda c: pytest.fail(f'{c} written'))
  with open(path) as f:
    assert json.load(f, **strict) == {'eval_auc': None, 'eval_history': [{'auc': None}],
                                      'steps': 3}
  with open(str(tmp_path / 'results_history.jsonl')) as f:
    assert json.loads(f.read(), **strict)['eval_auc'] is None


def test_the_history_survives_kills_around_its_append(tmp_path):
  path, history = tmp_path / 'results.json', tmp_path / 'results_history.jsonl'
  metrics.write_json_atomic(str(path), {'steps': 1})
  # Killed after the append, before the replacement: the rerun archives the same file again.
  for _ in range(2):
    metrics.archive_previous(str(path), str(history), 'unreadable')
  assert history.read_text() == '{"steps": 1}\n'
  # Killed in the middle of an append: the cut line stays, and the next record has a line.
  with open(history, 'a') as f:
    f.write('{"steps": 2, "eval')
  metrics.write_json_atomic(str(path), {'steps': 3})
  metrics.archive_previous(str(path), str(history), 'unreadable')
  assert history.read_text().splitlines() == ['{"steps": 1}', '{"steps": 2, "eval',
                                              '{"steps": 3}']
  # A new record after the same one further up is kept: only a repeat of the last is a kill's.
  metrics.write_json_atomic(str(path), {'steps': 1})
  metrics.archive_previous(str(path), str(history), 'unreadable')
  assert history.read_text().splitlines()[-1] == '{"steps": 1}'
  assert len(history.read_text().splitlines()) == 4
  # ... and a kill after that append, with earlier lines above it, adds no second copy (the
  # check once held only while the history had a single line).
  metrics.archive_previous(str(path), str(history), 'unreadable')
  assert len(history.read_text().splitlines()) == 4


def test_a_resumed_runs_later_write_of_a_step_wins(tmp_path):
  # An interrupted run logged steps 5 and 10; its resume (a new event file) logged 10 again.
  first = metric_writer.MetricWriter(str(tmp_path))
  first.write_scalars(5, {'train_loss': 0.7})
  first.write_scalars(10, {'train_loss': 0.6})
  first.close()
  # At once: tensorboardX named event files by the second and emptied one opened again in it.
  resumed = metric_writer.MetricWriter(str(tmp_path))
  resumed.write_scalars(10, {'train_loss': 0.5})
  resumed.close()
  assert len(os.listdir(tmp_path)) == 2
  steps, values = metric_writer.read_scalars(str(tmp_path), 'train_loss')
  # approx: 0.7 comes back as its float32 rounding.
  assert list(steps) == [5, 10] and list(values) == pytest.approx([0.7, 0.5])


def test_a_flush_puts_every_summary_written_before_it_on_disk(tmp_path):
  # tensorboardX's flush wrote only what its thread had taken from its queue so far. (The run
  # directory's name is a glob pattern too, which the reader once matched against instead.)
  workdir = str(tmp_path / 'run [1]')
  writer = metric_writer.MetricWriter(workdir)
  for step in range(1, 201):
    writer.write_scalars(step, {'train_loss': 1.0 / step})
  writer.flush()
  steps, values = metric_writer.read_scalars(workdir, 'train_loss')
  writer.close()
  assert list(steps) == list(range(1, 201))
  # Event files hold float32: exactly the float32 roundings of what was written.
  np.testing.assert_array_equal(values, np.float32(1.0 / np.arange(1, 201)))


def test_a_log_call_after_the_flush_interval_puts_all_its_scalars_on_disk(tmp_path, monkeypatch):
  # Flushed after its first scalar, a call's others waited for the next call (a log interval).
  monkeypatch.setattr(metric_writer.MetricWriter, '_FLUSH_SECS', 0.2)
  writer = metric_writer.MetricWriter(str(tmp_path))
  time.sleep(0.3)  # the interval is over: this call flushes
  writer.write_scalars(7, {'train_loss': 0.5, 'learning_rate': 0.01, 'train_samples_per_s': 9.0})
  on_disk = metric_writer.read_scalar_tags(str(tmp_path))
  writer.close()
  assert on_disk == {'train_loss', 'learning_rate', 'train_samples_per_s'}


def test_each_run_marks_where_it_restarts_for_tensorboard(tmp_path):
  # TensorBoard drops the earlier files' points from a restart marker's step on; without one
  # its Python reader showed a resumed run's re-logged steps twice (checked with tensorboard
  # 2.21's EventAccumulator; the Rust data server keeps the later point either way).
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  for start_step in (0, 20):
    writer = metric_writer.MetricWriter(str(tmp_path / str(start_step)), start_step=start_step)
    writer.write_scalars(start_step + 5, {'train_loss': 0.5})
    writer.close()
    (path,) = (tmp_path / str(start_step)).glob('events.out.tfevents.*')
    records = metric_writer._records(str(path))  # pylint: disable=protected-access
    events = [event_pb2.Event.FromString(r) for r in records]
    assert [e.WhichOneof('what') for e in events] == ['file_version', 'session_log', 'summary']
    assert events[1].session_log.status == event_pb2.SessionLog.START
    assert events[1].step == start_step + 1  # the restored step's own points stay


def test_scalars_written_as_tensors_read_back(tmp_path):
  # TensorFlow 2 and clu write a scalar as a one-value float tensor, not a simple_value: the
  # reader returns those too (a run directory of an earlier release, or another writer's).
  from tensorboardX.proto import summary_pb2, tensor_pb2  # pylint: disable=g-import-not-at-top
  writer = metric_writer.MetricWriter(str(tmp_path))
  writer.write_scalars(3, {'train_loss': 0.5})
  tensor = tensor_pb2.TensorProto(dtype=1, float_val=[0.25])  # DT_FLOAT
  writer._write(4, [summary_pb2.Summary(  # pylint: disable=protected-access
      value=[summary_pb2.Summary.Value(tag='train_loss', tensor=tensor)])])
  writer.close()
  steps, values = metric_writer.read_scalars(str(tmp_path), 'train_loss')
  assert list(steps) == [3, 4] and list(values) == [0.5, 0.25]
