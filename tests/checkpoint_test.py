"""Checkpoints, exact resume, crash safety, non-finite losses, eval/predict modes, export."""

import errno
import gc
import glob
import gzip
import importlib
import itertools
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback

import jax
import numpy as np
import pytest

import input_pipeline_test
import train_helpers as th
from dlrm_jax import checkpoints
from dlrm_jax import data_sources
from dlrm_jax import input_pipeline
from dlrm_jax import feature_spec
from dlrm_jax import metric_writer
from dlrm_jax import models
from dlrm_jax import serving
from dlrm_jax import train


def _config(tmp_path, **overrides):
  base = dict(steps=20, shuffle_buffer=256, log_every_steps=5, save_steps=5,
              keep_checkpoint_max=2)
  base.update(overrides)
  return th.tiny_config(tmp_path / 'out', **base)


def _restored(config, workdir):
  setup = train.make_setup(config)
  return train.restore_for_inference(setup, config, workdir)


def _restored_whole(config, workdir):
  """The newest checkpoint with its optimizer slots (restore_for_inference reads none)."""
  setup = train.make_setup(config)
  manager = checkpoints.make_manager(workdir, config)
  try:
    saved = train.checkpoint_setup(manager, setup, config, workdir)
    return train.restore_state(manager, setup, saved)
  finally:
    manager.close()


def _assert_same_params(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_run(tmp_path):
  straight = _config(tmp_path)
  straight_results = train.train_and_evaluate(straight, str(tmp_path / 'straight'))
  assert (straight_results['checkpoint_saves'], straight_results['last_checkpoint_step']) == (4, 20)
  # The first half saves synchronously, the rest (and the straight run) asynchronously: the
  # mode changes only when a save completes, never what is saved.
  half = _config(tmp_path, steps=10, async_checkpointing=False)
  train.train_and_evaluate(half, str(tmp_path / 'resumed'))
  assert checkpoints.make_manager(str(tmp_path / 'resumed'), half).latest_step() == 10
  results = train.train_and_evaluate(_config(tmp_path), str(tmp_path / 'resumed'))
  assert results['steps'] == 20
  # This run's saves only: steps 15 and 20.
  assert (results['checkpoint_saves'], results['last_checkpoint_step']) == (2, 20)
  # The first half's results moved to the history; results.json is the latest invocation's.
  with open(tmp_path / 'resumed' / 'results_history.jsonl') as f:
    history = [json.loads(line) for line in f]
  assert [h['steps'] for h in history] == [10]
  with open(tmp_path / 'resumed' / 'results.json') as f:
    assert json.load(f)['steps'] == 20
  a = _restored_whole(straight, str(tmp_path / 'straight'))
  b = _restored_whole(straight, str(tmp_path / 'resumed'))
  # Same batches in the same order from the same state, on CPU: bit-identical parameters,
  # optimizer slots and batch-norm statistics.
  _assert_same_params((a.params, a.table_opt_state, a.opt_state, a.batch_stats),
                      (b.params, b.table_opt_state, b.opt_state, b.batch_stats))


KILL_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import train_helpers as th
from dlrm_jax import train
config = th.tiny_config({out!r}, steps={steps}, save_steps=1, keep_checkpoint_max=2,
                        hash_buckets=100000, shuffle_buffer=0, log_every_steps=1, no_eval=True)
train.train_and_evaluate(config, {workdir!r})
"""


@pytest.mark.slow
def test_sigkill_during_save_resumes_from_last_complete_checkpoint(tmp_path):
  workdir = str(tmp_path / 'run')
  code = KILL_SCRIPT.format(tests=os.path.dirname(__file__), out=str(tmp_path / 'out'),
                            steps=40, workdir=workdir)
  proc = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  # Kill the moment a save is in flight: orbax writes into '<step>.orbax-checkpoint-tmp*'.
  # Wait until one step is complete, so there is something to resume from.
  killed_mid_save = False
  deadline = time.time() + 300
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  while proc.poll() is None and time.time() < deadline:
    names = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
    if any('tmp' in n for n in names) and any(n.isdigit() for n in names):
      proc.send_signal(signal.SIGKILL)
      killed_mid_save = True
      break
    time.sleep(0.002)
  proc.wait()
  assert killed_mid_save, 'the run finished before a save could be interrupted'
  config = th.tiny_config(tmp_path / 'out', steps=40, save_steps=1, keep_checkpoint_max=2,
                          hash_buckets=100000, shuffle_buffer=0, log_every_steps=1,
                          no_eval=True)
  manager = checkpoints.make_manager(workdir, config)
  step = manager.latest_step()
  assert step is not None and step < 40
  restored = _restored(config, workdir)  # must not raise: only complete steps are visible
  assert int(restored.step) == step
  # The killed save's directory, and one of a step the resumed run never saves again (as after
  # a preemption save off the save_steps grid): evaluating leaves them (a trainer may be
  # writing them), the resumed trainer, which holds the run directory, removes them.
  unfinished = sorted(n for n in os.listdir(ckpt_dir) if 'tmp' in n)
  stray = f'{step - 1}.orbax-checkpoint-tmp'
  shutil.copytree(os.path.join(ckpt_dir, str(step)), os.path.join(ckpt_dir, stray))
  _restored(config, workdir)
  assert sorted(n for n in os.listdir(ckpt_dir) if 'tmp' in n) == sorted(unfinished + [stray])
  results = train.train_and_evaluate(config, workdir)
  assert results['steps'] == 40
  assert not [n for n in os.listdir(ckpt_dir) if 'tmp' in n]


@pytest.mark.parametrize('steps,learning_rate,message', [
    # A non-finite loss stops the run at its step.
    (40, 1e30, r'non-finite .* step (\d+).*last good checkpoint is step 5'),
    # One more step at a learning rate that is inf in float32: its loss (computed before the
    # update) is finite, the parameters after it are not. The run used to exit 0 unsaved.
    (6, 1e39, 'non-finite parameters after step 6; the last good checkpoint is step 5')],
    ids=['loss', 'last_update'])
def test_non_finite_training_stops_and_keeps_the_good_checkpoint(tmp_path, steps, learning_rate,
                                                                 message):
  workdir = str(tmp_path / 'run')
  good = _config(tmp_path, steps=5, save_steps=5)
  train.train_and_evaluate(good, workdir)
  before = _restored(good, workdir)
  bad = _config(tmp_path, steps=steps, save_steps=5, learning_rate=learning_rate)
  with pytest.raises(FloatingPointError, match=message):
    train.train_and_evaluate(bad, workdir)
  _assert_same_params(before.params, _restored(good, workdir).params)


def test_an_infinite_loss_with_finite_parameters_stops_the_run_naming_its_step(
    tmp_path, monkeypatch):
  # The step reports +inf (not NaN) at step 3 of 6, its parameters finite, checked at the log
  # step 5: the run stops there naming step 3. The tests above make the parameters non-finite
  # too, which a later check would catch anyway, and took any step number.
  compile_step = train.compile_train_step

  def compiled(*args, **kwargs):
    step_fn, calls = compile_step(*args, **kwargs), itertools.count(1)

    def stepped(state, batch):  # no .lower: compile_ahead leaves it to the first call
      state, loss = step_fn(state, batch)
      return state, (loss * jax.numpy.inf if next(calls) == 3 else loss)
    return stepped

  monkeypatch.setattr(train, 'compile_train_step', compiled)
  config = _config(tmp_path, steps=6, save_steps=0, log_every_steps=5, no_eval=True)
  with pytest.raises(FloatingPointError, match=re.escape(
      'non-finite training loss at step 3; no checkpoint was saved before it')):
    train.train_and_evaluate(config, str(tmp_path / 'run'))


def test_eval_with_another_max_list_len_is_refused(tmp_path):
  # Lists are pooled over their first max_list_len values: evaluating, predicting or resuming
  # with another cut reads every history list differently from training (no error, other AUC).
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(_config(tmp_path, steps=3, save_steps=0, no_eval=True), workdir)
  trained = _config(tmp_path).max_list_len
  for mode in ('eval', 'train'):
    with pytest.raises(ValueError, match=rf'lists pooled over their first {trained} values in '
                                         rf'training, {trained + 1} now: '
                                         rf'--config.max_list_len={trained} reads them'):
      train.train_and_evaluate(_config(tmp_path, mode=mode, steps=4, max_list_len=trained + 1),
                               workdir)
  assert int(_restored(_config(tmp_path, mode='eval'), workdir).step) == 3


def test_non_finite_loss_before_any_checkpoint_says_there_is_none(tmp_path):
  # It used to say "the last good checkpoint is step None".
  with pytest.raises(FloatingPointError, match=r'non-finite training loss at step \d+; no '
                                               r'checkpoint was saved before it'):
    train.train_and_evaluate(_config(tmp_path, steps=40, save_steps=0, learning_rate=1e30),
                             str(tmp_path / 'run'))


def test_a_criteo_run_from_before_criteo_missing_is_read_as_it_was_trained(tmp_path):
  # Until criteo_missing existed an empty C field was dropped; such a run's config.json has no
  # criteo_missing. Read with the new default ' ', its never-trained rows would be looked up.
  workdir = str(tmp_path / 'run')
  common = dict(feature_spec='criteo', embedding_dim=4, bottom_mlp=(8, 4), no_eval=True)
  train.train_and_evaluate(_config(tmp_path, steps=3, save_steps=0, criteo_missing='',
                                   **common), workdir)
  config_path = os.path.join(workdir, 'config.json')
  with open(config_path) as f:
    saved = json.load(f)
  del saved['criteo_missing']
  with open(config_path, 'w') as f:
    json.dump(saved, f)
  with pytest.raises(ValueError, match="read as '' in training, ' ' now: "
                                       "--config.criteo_missing='' reads them"):
    _restored(_config(tmp_path, mode='eval', **common), workdir)
  assert int(_restored(_config(tmp_path, mode='eval', criteo_missing='', **common),
                       workdir).step) == 3


def test_an_export_of_per_table_arrays_looks_up_each_tables_rows(tmp_path):
  # emb_fusion=False: the export concatenates the tables' real rows (not their padding to a
  # multiple of 64, which would shift every later table's rows) into one array.
  config = _config(tmp_path, emb_fusion=False)
  setup = train.make_setup(config)
  state = train.create_train_state(jax.random.PRNGKey(0), setup)
  export_dir = str(tmp_path / 'export')
  serving.export_model(setup, state, export_dir, feature_spec.spec_args(config))
  assert serving.load_input_encoding(export_dir) == 'text'  # the default: text
  spec = setup.spec
  assert any(state.params['tables'][t.name].shape[0] != t.rows for t in spec.tables)
  lines = [input_pipeline_test.elm_line(user_id=f'u{i}', item_id=f'i{i}', times=str(i))
           for i in range(16)]
  batch = input_pipeline.parse_chunk(lines, spec, path='rows.csv', first_line=1)
  # Every slot looked up in its own table, then the model as evaluation runs it.
  tables = {name: np.asarray(t) for name, t in state.params['tables'].items()}
  names = [t.name for t in spec.tables]
  rows = np.stack([tables[names[spec.slot_table[s]]][batch['ids'][:, s]]
                   for s in range(spec.num_slots)], axis=1)
  pooled = models.pool_slots(jax.numpy.asarray(rows), batch['weights'], spec)
  logits = setup.model.apply({'params': state.params['mlp'], 'batch_stats': state.batch_stats},
                             batch['dense'], pooled, train=False)
  served = serving.load(export_dir)(batch['dense'], batch['ids'], batch['weights'])
  # The artifact is another XLA program over the same float32 values (its own fusions and sum
  # orders): rounding of ~1e-7 relative per op; a wrong row or table moves probabilities ~1e-2.
  np.testing.assert_allclose(served, jax.nn.sigmoid(logits), rtol=1e-5, atol=1e-7)


def test_an_evaluation_it_cannot_write_down_still_reports_its_figures(tmp_path, monkeypatch,
                                                                     capsys, caplog):
  # A run evaluated on a read-only mount: the whole evaluation ran, then eval_results.json
  # failed and the figures were never printed.
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(_config(tmp_path, steps=3, save_steps=0, no_eval=True), workdir)

  def read_only(path, results):
    raise OSError(errno.EROFS, 'Read-only file system', path)
  monkeypatch.setattr(train, 'write_results', read_only)
  monkeypatch.setattr(train, 'write_eval_summaries', read_only)
  results = train.train_and_evaluate(_config(tmp_path, steps=3, mode='eval'), workdir)
  assert f"AUC = {results['eval_auc']:.6f}" in capsys.readouterr().out
  assert 'eval_results.json not written' in caplog.text and 'Read-only' in caplog.text
  assert 'the eval summaries not written' in caplog.text


@pytest.mark.slow
def test_eval_and_predict_modes_and_exported_artifact_agree(tmp_path):
  workdir = str(tmp_path / 'run')
  export_dir = str(tmp_path / 'export')
  config = _config(tmp_path, export_dir=export_dir)
  results = train.train_and_evaluate(config, workdir)
  eval_path = os.path.join(str(tmp_path / 'out'), 'planted_elm', 'eval.csv')

  with open(os.path.join(export_dir, 'spec.json')) as f:
    recorded = json.load(f)
  assert (recorded['step'], recorded['run_directory']) == (20, workdir)  # where it came from
  assert serving.load_input_encoding(export_dir) == 'text'  # how requests encode rows

  config.mode = 'eval'
  evaluated = train.train_and_evaluate(config, workdir)
  # The same checkpoint's values and eval program: the same predictions, and so the same AUC
  # (1e-12 only absorbs its float64 sums in another order).
  assert evaluated['eval_auc'] == pytest.approx(results['eval_auc'], abs=1e-12)
  # ... and its metrics as TensorBoard scalars at the checkpoint's step, in <run>/eval as
  # DeepRec's evaluator writes them (mode=eval wrote none); a second evaluation of the step
  # is read back once. approx: event files hold float32.
  evaluated = train.train_and_evaluate(config, workdir)
  for name in ('auc', 'accuracy', 'logloss'):
    steps, values = metric_writer.read_scalars(os.path.join(workdir, 'eval'), f'eval_{name}')
    assert steps.tolist() == [20], name
    assert values.tolist() == pytest.approx([evaluated[f'eval_{name}']], rel=1e-6), name
  assert len(glob.glob(os.path.join(workdir, 'eval', 'events.out.tfevents.*'))) == 2
  # The trainer's own scalars stay where they were, with no eval-mode point among them.
  assert metric_writer.read_scalars(workdir, 'eval_auc')[0].tolist() == [20]

  config.mode = 'predict'
  config.predict_input = eval_path
  predicted = train.train_and_evaluate(config, workdir)
  probs = np.loadtxt(predicted['predict_output'])
  assert probs.shape == (input_pipeline.count_rows(eval_path),)
  assert np.all((probs > 0) & (probs < 1))
  # Into a directory that does not exist yet: made, as the run directory is.
  config.predict_output = str(tmp_path / 'scores' / 'day8' / 'p.txt')
  train.train_and_evaluate(config, workdir)
  np.testing.assert_array_equal(np.loadtxt(config.predict_output), probs)
  # Rows without the label column (a gzip'd file, as data to score often comes) score the same.
  label = train.make_setup(config).spec.column_index('clicked')
  with open(eval_path) as f:
    rows = [line.rstrip('\n').split(',') for line in f]
  unlabeled = str(tmp_path / 'to_score.csv.gz')
  with gzip.open(unlabeled, 'wt') as f:
    f.writelines(','.join(r[:label] + r[label + 1:]) + '\n' for r in rows)
  config.predict_input = unlabeled
  config.predict_output = str(tmp_path / 'unlabeled.txt')
  train.train_and_evaluate(config, workdir)
  np.testing.assert_array_equal(np.loadtxt(config.predict_output), probs)
  # Outputs that cannot take the scores fail before scoring, and nothing is left behind: the
  # input itself (it was overwritten with its probabilities), a directory, a failed read.
  with open(unlabeled, 'rb') as f:
    rows_before = f.read()
  for output, error in ((unlabeled, 'is the input file'), (str(tmp_path), 'is a directory')):
    config.predict_output = output
    with pytest.raises(ValueError, match=error):
      train.train_and_evaluate(config, workdir)
  with open(unlabeled, 'rb') as f:
    assert f.read() == rows_before
  bad = str(tmp_path / 'bad' / 'rows.csv')
  os.makedirs(os.path.dirname(bad))
  with open(bad, 'w') as f:
    f.write(','.join(rows[0]) + '\n' + ','.join(rows[1][:label] + ['x'] + rows[1][label + 1:])
            + '\n')
  config.predict_input, config.predict_output = bad, str(tmp_path / 'bad' / 'p.txt')
  with pytest.raises(input_pipeline.DataError, match="rows.csv:2: column 'clicked'"):
    train.train_and_evaluate(config, workdir)
  assert os.listdir(tmp_path / 'bad') == ['rows.csv']
  # A first line without the label decides the form: a labelled second row is the bad one, and
  # the message says why.
  with open(bad, 'w') as f:
    f.write(','.join(rows[0][:label] + rows[0][label + 1:]) + '\n' + ','.join(rows[1]) + '\n')
  with pytest.raises(input_pipeline.DataError, match=r'rows.csv:2: .*fields, expected .*the first '
                     r"line of .*rows.csv has one field fewer .* without the label column "
                     r"'clicked'"):
    train.train_and_evaluate(config, workdir)

  # A fresh process that imports only serving and the reader scores the same rows.
  script = (
      'import sys, numpy as np\n'
      'from dlrm_jax import serving, input_pipeline, feature_spec\n'
      f'score = serving.load({export_dir!r})\n'
      f'spec = serving.load_spec({export_dir!r})\n'
      'assert spec == feature_spec.elm_spec(1000, 4, 8)  # the tiny config\'s\n'
      'out = []\n'
      f'for b in input_pipeline.batches([{eval_path!r}], spec, 512, drop_remainder=False):\n'
      '  out.append(score(b["dense"], b["ids"], b["weights"])[b["mask"] > 0])\n'
      'assert "dlrm_jax.train" not in sys.modules and "dlrm_jax.models" not in sys.modules\n'
      '# Lowered for accelerators too: a model trained on a GPU serves on a CPU and back.\n'
      f'exported = serving.jax.export.deserialize(bytearray(open({export_dir!r} + "/" + '
      'serving.ARTIFACT, "rb").read()))\n'
      'assert set(exported.platforms) == {"cpu", "cuda", "tpu"}, exported.platforms\n'
      '# An empty request gets an empty answer (the symbolic batch dimension is at least 1).\n'
      'empty = score(b["dense"][:0], b["ids"][:0], b["weights"][:0])\n'
      'assert empty.shape == (0,) and empty.dtype == np.float32, empty\n'
      f'np.save({str(tmp_path / "served.npy")!r}, np.concatenate(out))\n')
  subprocess.run([sys.executable, '-c', script], check=True, cwd=th.ROOT, timeout=300)
  served = np.load(str(tmp_path / 'served.npy'))
  # Same float32 math, different XLA programs (direct gather vs unique rows, other summation
  # orders): ~1e-6 apart here; rtol 1e-4 leaves room for another CPU's vector width, while a
  # wrong row, weight or layer moves a probability by 1e-2 and more.
  np.testing.assert_allclose(served, probs, rtol=1e-4, atol=1e-6)


def test_results_keep_every_earlier_invocation_even_a_damaged_one(tmp_path):
  path = str(tmp_path / 'results.json')
  train.write_results(path, {'steps': 5})
  with open(path, 'a') as f:
    f.write('{ torn')  # e.g. edited by hand
  train.write_results(path, {'steps': 9})
  train.write_results(path, {'steps': 12})
  with open(tmp_path / 'results_history.jsonl') as f:
    history = [json.loads(line) for line in f]
  assert history[0] == {'unreadable_results': '{\n  "steps": 5\n}\n{ torn'}
  assert history[1] == {'steps': 9}
  with open(path) as f:
    assert json.load(f) == {'steps': 12}
  assert sorted(os.listdir(tmp_path)) == ['results.json', 'results_history.jsonl']


def _run_files(workdir):
  return {os.path.relpath(p, workdir): os.path.getmtime(p)
          for p in glob.glob(os.path.join(workdir, '**'), recursive=True) if os.path.isfile(p)}


def test_a_step_directory_orbax_did_not_write_is_refused_before_writing(tmp_path):
  # E.g. the user's own "checkpoints/2023": it was taken as the newest step, and failed only at
  # the restore with orbax's KeyError, after config.json had been replaced.
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(_config(tmp_path, steps=3, save_steps=0, no_eval=True), workdir)
  os.makedirs(os.path.join(workdir, 'checkpoints', '2023', 'notes'))
  before = _run_files(workdir)
  for mode in ('train', 'eval'):
    with pytest.raises(ValueError, match=re.escape(
        f'{os.path.join(workdir, "checkpoints", "2023")} is not a checkpoint that can be read')):
      train.train_and_evaluate(_config(tmp_path, steps=6, mode=mode), workdir)
    assert _run_files(workdir) == before
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '2023'))
  assert train.train_and_evaluate(_config(tmp_path, steps=6, no_eval=True), workdir)['steps'] == 6


def test_gradient_descent_resumed_on_the_other_path_is_refused_first(tmp_path):
  # Without slots, the sparse and dense states have the same arrays: the check let the resume
  # through, it replaced config.json, and orbax refused the restore after compiling.
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(_config(tmp_path, steps=3, save_steps=0, no_eval=True,
                                   optimizer='gradientdescent'), workdir)
  before = _run_files(workdir)
  for override, field in ((dict(no_acceleration=True), 'no_acceleration: false -> true'),
                          (dict(sparse_updates=False), 'sparse_updates: true -> false')):
    with pytest.raises(ValueError, match=re.escape(field) + '.*') as error:
      train.train_and_evaluate(_config(tmp_path, steps=6, no_eval=True,
                                       optimizer='gradientdescent', **override), workdir)
    assert 'state entries' in str(error.value)
    assert _run_files(workdir) == before
  assert train.train_and_evaluate(_config(tmp_path, steps=6, no_eval=True,
                                          optimizer='gradientdescent'), workdir)['steps'] == 6


def test_evaluation_reads_no_optimizer_slots_and_takes_any_optimizer(tmp_path):
  # Evaluation restored the whole train state: under adam two more copies of the tables, and an
  # evaluator had to repeat the run's optimizer settings (another one was refused).
  workdir = str(tmp_path / 'run')
  trained = train.train_and_evaluate(_config(tmp_path, steps=5, save_steps=0,
                                             optimizer='adam'), workdir)
  restored = _restored(_config(tmp_path, mode='eval', optimizer='adam'), workdir)
  assert restored.opt_state is None and restored.table_opt_state is None
  for override in (dict(optimizer='adam'), dict(optimizer='adagrad'),
                   dict(optimizer='gradientdescent', no_acceleration=True, emb_fusion=False)):
    results = train.train_and_evaluate(_config(tmp_path, mode='eval', **override), workdir)
    assert results['eval_auc'] == trained['eval_auc'], override  # the same parameters
  # What shapes the parameters still counts; the message does not ask for the optimizer.
  with pytest.raises(ValueError, match='embedding_dim: 4 -> 8') as error:
    _restored(_config(tmp_path, mode='eval', optimizer='adam', embedding_dim=8), workdir)
  assert 'the optimizer settings and emb_fusion may differ' in str(error.value)


def test_resume_into_another_model_fails_first_and_names_the_differences(tmp_path):
  workdir = str(tmp_path / 'run')
  trained = _config(tmp_path, steps=5, save_steps=0, no_eval=True)
  train.train_and_evaluate(trained, workdir)
  with open(os.path.join(workdir, 'config.json')) as f:
    saved_config = f.read()
  before = _run_files(workdir)
  cases = [  # (override, a field the message must name, the array kind it must report)
      (dict(hash_buckets=2000), 'hash_buckets: 1000 -> 2000', 'of another shape'),
      (dict(sparse_updates=False), 'sparse_updates: true -> false', 'checkpoint lacks'),
      (dict(optimizer='adagrad'), 'optimizer: "adamasync" -> "adagrad"', 'has no place for'),
      # Padded to a multiple of 64 rows, the arrays keep their shapes: the row counts differ,
      # in either layout.
      (dict(hash_buckets=1003), 'hash_buckets: 1000 -> 1003', 'of another row count'),
      (dict(hash_buckets=1003, emb_fusion=False), 'hash_buckets: 1000 -> 1003',
       'of another row count'),
  ]
  def caches():
    return sorted(glob.glob(os.path.join(trained.output_dir, '**', 'dlrm_cache', '*'),
                            recursive=True))
  cached = caches()
  assert cached
  for override, field, kind in cases:
    resumed = _config(tmp_path, steps=10, save_steps=0, no_eval=True, **override)
    with pytest.raises(ValueError) as error:
      train.train_and_evaluate(resumed, workdir)
    assert field in str(error.value) and kind in str(error.value), (override, error.value)
    assert 'steps: 5 -> 10' in str(error.value)
  # Refused before writing: the run directory (its config.json above all, the one record of the
  # checkpoint's settings) is as the first run left it; and before reading the data: the other
  # table sizes used to cache the train file for them first, a cache nothing would use.
  assert _run_files(workdir) == before
  assert caches() == cached
  with open(os.path.join(workdir, 'config.json')) as f:
    assert f.read() == saved_config
  with pytest.raises(ValueError, match='embedding_dim: 4 -> 8'):
    _restored(_config(tmp_path, embedding_dim=8, mode='eval'), workdir)
  with pytest.raises(ValueError, match='hash_buckets: 1000 -> 1001'):
    _restored(_config(tmp_path, hash_buckets=1001, mode='eval'), workdir)


@pytest.mark.slow
@pytest.mark.parametrize('optimizer,sparse', [('adamasync', True), ('adagraddecay', True),
                                              ('adam', False), ('adagraddecay', False),
                                              ('rowwise_adagrad', False)])
def test_a_resume_may_switch_emb_fusion(tmp_path, optimizer, sparse):
  # adagraddecay decays every 3 steps here, so its per-row decay periods must move with the rows;
  # adam on the dense path keeps optax slots for the tables inside opt_state, rowwise_adagrad
  # its [rows, 1] accumulators. (Started at 0.1: from FBGEMM's 0, a first step is g / |g|,
  # which turns the rounding of a tiny gradient into differences far above float32's.)
  hparams = {'adagraddecay': {'accumulator_decay_step': 3},
             'rowwise_adagrad': {'initial_accumulator_value': 0.1}}

  def config(steps, fused):
    return _config(tmp_path, steps=steps, save_steps=0, no_eval=True, optimizer=optimizer,
                   sparse_updates=sparse, emb_fusion=fused,
                   optimizer_hparams=hparams.get(optimizer, {}))
  straight, switched = str(tmp_path / 'straight'), str(tmp_path / 'switched')
  train.train_and_evaluate(config(12, True), straight)
  for steps, fused in [(4, True), (8, False), (12, True)]:
    train.train_and_evaluate(config(steps, fused), switched)
  spec = train.make_setup(config(12, True)).spec
  rows = {models.FUSED: spec.total_rows, **{t.name: t.rows for t in spec.tables}}

  def real_rows(path, leaf):
    # A re-laid array's padding rows are zero where a fresh one holds the optimizer's initial
    # value (adagrad: 0.1); they are never looked up, so only the tables' real rows compare.
    names = [getattr(k, 'key', None) for k in path]
    cut = [rows[n] for n in names if n in rows]
    return np.asarray(leaf, np.float64)[:cut[0]] if cut and np.ndim(leaf) else leaf

  for fused in (True, False):  # either layout restores the other's (slots included)
    want = jax.device_get(_restored_whole(config(12, fused), straight))
    got = jax.device_get(_restored_whole(config(12, fused), switched))
    assert int(got.step) == 12
    assert jax.tree.structure(got) == jax.tree.structure(want)
    # Fused and per-table steps sum each row's gradients in another order: float32 rounding.
    for x, y in zip(jax.tree_util.tree_leaves(jax.tree_util.tree_map_with_path(real_rows, got)),
                    jax.tree_util.tree_leaves(jax.tree_util.tree_map_with_path(real_rows, want))):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def test_resume_with_other_settings_keeps_the_earlier_config(tmp_path):
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(_config(tmp_path, steps=5, save_steps=0, no_eval=True), workdir)
  results = train.train_and_evaluate(
      _config(tmp_path, steps=8, save_steps=0, no_eval=True, learning_rate=0.02), workdir)
  assert results['steps'] == 8
  with open(os.path.join(workdir, 'config_history.jsonl')) as f:
    history = [json.loads(line) for line in f]
  assert [(c['steps'], c['learning_rate']) for c in history] == [(5, 0.01)]
  with open(os.path.join(workdir, 'config.json')) as f:
    current = json.load(f)
  assert (current['steps'], current['learning_rate']) == (8, 0.02)


def test_config_differences_leave_out_each_processs_own_settings():
  # config.json is process 0's: on process 1 its own id read as a difference in every refusal.
  saved = {'steps': 1, 'distributed': {'process_id': 0, 'num_processes': 2},
           'optimizer_hparams': {'beta1': None}}
  now = {'steps': 2, 'distributed': {'process_id': 1, 'num_processes': 2},
         'optimizer_hparams': {'beta1': 0.8}}
  assert checkpoints.config_differences(saved, now) == [
      'optimizer_hparams.beta1: null -> 0.8', 'steps: 1 -> 2']


def test_config_differences_name_dcns_sizes_only_where_a_side_uses_dcn():
  # A run from before the fields existed resumed with a warning about two settings nobody changed.
  saved = {'steps': 1, 'interaction_op': 'cat'}
  now = {'steps': 2, 'interaction_op': 'cat', 'dcn_num_layers': 3, 'dcn_low_rank_dim': 100}
  assert checkpoints.config_differences(saved, now) == ['steps: 1 -> 2']
  assert checkpoints.config_differences(saved, dict(now, interaction_op='dcn')) == [
      'dcn_low_rank_dim: "(absent)" -> 100', 'dcn_num_layers: "(absent)" -> 3',
      'interaction_op: "cat" -> "dcn"', 'steps: 1 -> 2']
  assert checkpoints.config_differences(dict(now, interaction_op='dcn'), now) == [
      'interaction_op: "dcn" -> "cat"']
  # Either side's dcn counts: the saved run's sizes are named when the new one leaves dcn.
  assert checkpoints.config_differences(
      {'interaction_op': 'dcn', 'dcn_low_rank_dim': 100},
      {'interaction_op': 'cat', 'dcn_low_rank_dim': 512}) == [
          'dcn_low_rank_dim: 100 -> 512', 'interaction_op: "dcn" -> "cat"']


def test_adagraddecay_resumes_only_with_its_decay_step(tmp_path):
  # Its rows count their decay periods in units of the step: resumed with another one, each row
  # took ~50 decays at its next touch while the MLPs' accumulators took at most one.
  workdir = str(tmp_path / 'run')

  def config(steps, **hparams):
    return _config(tmp_path, steps=steps, save_steps=0, no_eval=True, optimizer='adagraddecay',
                   optimizer_hparams=hparams)

  train.train_and_evaluate(config(3), workdir)  # the default step, 100000
  with pytest.raises(ValueError, match=r'accumulator_decay_step=100000, 4 now: '
                                       r'--config.optimizer_hparams.accumulator_decay_step=100000'):
    train.train_and_evaluate(config(6, accumulator_decay_step=4), workdir)
  assert train.train_and_evaluate(config(6, accumulator_decay_step=100000), workdir)['steps'] == 6
  # The rate may change: the periods' count stays right.
  results = train.train_and_evaluate(config(8, accumulator_decay_rate=0.5), workdir)
  assert results['steps'] == 8


def test_predict_mode_refuses_several_processes(tmp_path, monkeypatch):
  # Each process would read the whole file as its share of the batch (rows written twice).
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  config = _config(tmp_path, mode='predict', predict_input=str(tmp_path / 'rows.csv'))
  with pytest.raises(ValueError, match='single process, not 2'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))


def test_every_checkpoint_manager_is_closed(tmp_path, monkeypatch):
  # An open manager keeps its threads and metadata stores for the life of the process: a
  # notebook or a service that evaluates many times would pile them up.
  made = []
  make = checkpoints.make_manager

  def tracked(*args, **kwargs):
    manager = make(*args, **kwargs)
    close = manager.close
    manager.closes = 0

    def counted():
      manager.closes += 1
      close()
    manager.close = counted
    made.append(manager)
    return manager
  monkeypatch.setattr(checkpoints, 'make_manager', tracked)
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(_config(tmp_path, steps=3, save_steps=0, no_eval=True), workdir)
  train.train_and_evaluate(_config(tmp_path, mode='eval'), workdir)
  with pytest.raises(ValueError, match='embedding_dim: 4 -> 8'):  # refused, closed all the same
    _restored(_config(tmp_path, embedding_dim=8, mode='eval'), workdir)
  with pytest.raises(ValueError, match='embedding_dim: 4 -> 8'):  # a refused resume
    train.train_and_evaluate(_config(tmp_path, steps=6, embedding_dim=8), workdir)
  assert len(made) == 4 and all(m.closes >= 1 for m in made), [m.closes for m in made]


def test_eval_mode_without_checkpoint_says_so_and_names_the_newest_run(tmp_path):
  config = _config(tmp_path, mode='eval')
  with pytest.raises(FileNotFoundError, match='needs a checkpoint'):
    train.train_and_evaluate(config, str(tmp_path / 'empty'))
  assert not os.path.exists(tmp_path / 'empty')  # a mistyped run directory is not created
  rows = tmp_path / 'rows.csv'
  rows.write_text('1,2\n')
  predict = _config(tmp_path, mode='predict', predict_input=str(rows))
  with pytest.raises(FileNotFoundError, match='needs a checkpoint'):
    train.train_and_evaluate(predict, str(tmp_path / 'empty'))  # its output would go there
  assert not os.path.exists(tmp_path / 'empty')
  # ... and the (planted) data were not generated for it first: that takes minutes at full size.
  assert not os.path.exists(os.path.join(config.output_dir, 'planted_elm'))
  trained = os.path.join(config.output_dir, 'model_DLRM_1')
  results = train.train_and_evaluate(_config(tmp_path, steps=3, save_steps=0, no_eval=True),
                                     trained)
  assert 'oracle_auc' not in results  # nothing evaluated to set beside it
  with pytest.raises(FileNotFoundError, match=re.escape(f'the newest run under '
                                                        f'{config.output_dir} is {trained}')):
    train.train_and_evaluate(config, os.path.join(config.output_dir, 'model_DLRM_2'))
  # The training command with mode=eval added: no_eval is about training (it used to leave the
  # evaluation no rows, "eval.csv: no rows to evaluate").
  evaluate = _config(tmp_path, mode='eval', no_eval=True)
  results = train.train_and_evaluate(evaluate, trained)
  assert results['steps'] == 3 and results['eval_num_examples'] == evaluate.planted.eval_rows
  assert 0.5 < results['oracle_auc'] <= 1
  # An evaluator without the run's planted settings used to write the planted files anew from
  # its own (under a trainer that may still read them) and score the other rows without a word.
  planted = pathlib.Path(config.output_dir) / 'planted_elm'
  before = {p.name: p.read_bytes() for p in planted.glob('*.csv')}
  other = _config(tmp_path, mode='eval')
  other.planted.eval_rows += 10
  other.planted.seed += 1
  with pytest.raises(ValueError, match=re.escape(
      f'planted.eval_rows={config.planted.eval_rows!r}, this command has '
      f'{other.planted.eval_rows!r}: --config.planted.eval_rows={config.planted.eval_rows} ')
      + '.*' + re.escape(f'--config.planted.seed={config.planted.seed} evaluates on them')):
    train.train_and_evaluate(other, trained)
  assert {p.name: p.read_bytes() for p in planted.glob('*.csv')} == before
  # Compared with the generator's defaults filled in: the run left latent_dim unset (8).
  same = _config(tmp_path, mode='eval')
  same.planted.latent_dim = 8
  assert train.train_and_evaluate(same, trained)['steps'] == 3
  same.planted.latent_dim = 4
  with pytest.raises(ValueError, match=re.escape('--config.planted.latent_dim=8 evaluates')):
    train.train_and_evaluate(same, trained)
  assert {p.name: p.read_bytes() for p in planted.glob('*.csv')} == before
  # ... and a run trained on files, evaluated without naming them, is refused likewise.
  on_files = os.path.join(config.output_dir, 'model_DLRM_files')
  train.train_and_evaluate(_config(tmp_path, steps=1, save_steps=0, no_eval=True,
                                   data_location=str(planted)), on_files)
  with pytest.raises(ValueError, match=re.escape(f'--config.data_location={planted} evaluates')):
    train.train_and_evaluate(_config(tmp_path, mode='eval'), on_files)
  # A run that named its eval files: the refusal names them too (it named data_location alone,
  # and the command it gave then failed for want of eval.csv), quoted for the shell.
  (planted / 'day_8.csv').symlink_to(planted / 'eval.csv')
  named = os.path.join(config.output_dir, 'model_DLRM_named')
  train.train_and_evaluate(_config(tmp_path, steps=1, save_steps=0, no_eval=True,
                                   data_location=str(planted), eval_files='day_[8-9].csv'),
                           named)
  flags = f"--config.data_location={planted} --config.eval_files='day_[8-9].csv'"
  with pytest.raises(ValueError, match=re.escape(f'{flags} evaluates on the run')):
    train.train_and_evaluate(_config(tmp_path, mode='eval'), named)
  assert train.train_and_evaluate(
      _config(tmp_path, mode='eval', data_location=str(planted), eval_files='day_[8-9].csv'),
      named)['eval_num_examples'] == config.planted.eval_rows


def test_eval_mode_needs_only_the_eval_file_and_reports_its_bad_rows(tmp_path, caplog):
  trained = str(tmp_path / 'trained')
  config = _config(tmp_path, steps=3, save_steps=0, no_eval=True)
  train.train_and_evaluate(config, trained)
  # An evaluator's directory holds only the eval file (it used to be refused for want of
  # train.csv), here with one bad row in it.
  rows = (pathlib.Path(config.output_dir) / 'planted_elm' / 'eval.csv').read_text().splitlines()
  only_eval = tmp_path / 'only_eval'
  only_eval.mkdir()
  (only_eval / 'eval.csv').write_text('\n'.join(rows[:50] + ['1,2,3'] + rows[50:]) + '\n')
  evaluate = _config(tmp_path, mode='eval', data_location=str(only_eval), skip_bad_rows=True)
  with caplog.at_level(logging.WARNING):
    results = train.train_and_evaluate(evaluate, trained)
    assert results['eval_num_examples'] == len(rows) and results['bad_rows'] == 1
    with open(os.path.join(trained, 'eval_results.json')) as f:
      written = json.load(f)
    assert written['bad_rows'] == 1 and written['eval_data'] == [str(only_eval / 'eval.csv')]
    assert 'eval.csv:51:' in written['parse_stats']['bad_row_examples'][0]
    # A second evaluation reads the cache built by the first: its bad row is counted again.
    assert train.train_and_evaluate(evaluate, trained)['bad_rows'] == 1
  # The cache's bad rows are said once in the process, not at each of its openings (the
  # trainer opens each cache several times).
  said = [r for r in caplog.records if 'bad rows left out' in r.getMessage()]
  assert len(said) == 1 and 'eval.csv:51:' in said[0].getMessage()


@pytest.mark.parametrize('skip_bad_rows', [True, False])
def test_an_eval_file_without_a_good_row_stops_the_run_before_training(tmp_path, skip_bad_rows):
  # It used to train to the end and only then find that nothing was left to evaluate.
  planted = pathlib.Path(th.planted_dir(tmp_path / 'data'))
  local = tmp_path / 'local'
  local.mkdir()
  shutil.copy(planted / 'train.csv', local / 'train.csv')
  (local / 'eval.csv').write_text('clicked,user_id\n1,2,3\n')
  config = _config(tmp_path, steps=3, save_steps=0, data_location=str(local),
                   skip_bad_rows=skip_bad_rows)
  workdir = tmp_path / 'run'
  with pytest.raises(input_pipeline.DataError, match='eval.csv:1:') as raised:
    train.train_and_evaluate(config, str(workdir))
  if skip_bad_rows:
    assert 'no good row is left to evaluate' in str(raised.value)
  assert not (workdir / 'checkpoints').exists() or not os.listdir(workdir / 'checkpoints')
  assert not (workdir / 'results.json').exists()


@pytest.mark.parametrize('field,value', [
    ('eval_batch_size', 0), ('embedding_dim', 0), ('hash_buckets', 0), ('log_every_steps', 0),
    ('steps', -3), ('save_steps', -1), ('activation_summary_steps', -1), ('learning_rate', -0.1),
    ('learning_rate', float('nan')), ('bottom_mlp', ()), ('top_mlp', (16, 0)),
    ('cache_block_rows', 0), ('mode', 'serve'), ('interaction_op', 'Dot'), ('optimizer', 'sgd'),
    ('feature_spec', 'avazu'), ('bottom_mlp', (16, 8)), ('mesh_shape', (1,)),
    ('mesh_shape', (-1, -1)), ('mesh_shape', (0, 1)), ('seed', -5), ('seed', 2**63),
    # None, as TF's Saver(max_to_keep=None): a TypeError that named no field.
    ('keep_checkpoint_max', None), ('learning_rate', None), ('seed', None),
    ('num_workers', None),
    # Checked too, but no test held them: batch_size=0 got past the check to fail in the row
    # cache, after the planted data were written.
    ('batch_size', 0), ('max_list_len', 0), ('shuffle_buffer', -1), ('timeline', -1),
    ('split_parts', -1), ('eval_every_steps', -1), ('num_workers', -2),
    ('keep_checkpoint_max', -1), ('criteo_table_rows', (10, 0))])
def test_bad_config_values_fail_first_naming_the_field(tmp_path, field, value):
  # Each of these used to fail mid-run (after training, for eval_batch_size and embedding_dim)
  # or quietly did something else (save_steps=-1 saved every step). A misspelt interaction_op
  # or optimizer failed only after the planted data were written (a minute for the default's).
  workdir = tmp_path / 'run'
  config = _config(tmp_path, **{field: value})
  config.interaction_op = 'dot' if field == 'bottom_mlp' else config.interaction_op
  with pytest.raises(ValueError, match=re.escape(f'config.{field}={value!r} must be')):
    train.train_and_evaluate(config, str(workdir))
  assert not os.path.exists(workdir) and not os.path.exists(tmp_path / 'out')


@pytest.mark.parametrize('field,value', [('dcn_num_layers', 0), ('dcn_low_rank_dim', -1),
                                         ('dcn_num_layers', None)])
def test_bad_cross_layer_sizes_fail_first_naming_the_field(tmp_path, field, value):
  workdir = tmp_path / 'run'
  with pytest.raises(ValueError, match=re.escape(
      f'config.{field}={value!r} must be a whole number, at least 1, for interaction_op=dcn')):
    train.train_and_evaluate(_config(tmp_path, interaction_op='dcn', **{field: value}),
                             str(workdir))
  assert not os.path.exists(workdir) and not os.path.exists(tmp_path / 'out')
  # The sizes are read only for dcn.
  train.check_config(_config(tmp_path, interaction_op='cat', **{field: value}))


def test_predict_mode_without_an_input_fails_first(tmp_path):
  # Without the check it failed later, on "input file '' does not exist".
  with pytest.raises(ValueError, match=re.escape(
      "config.predict_input='' must be a file to score in mode=predict")):
    train.train_and_evaluate(_config(tmp_path, mode='predict'), str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run') and not os.path.exists(tmp_path / 'out')


def test_batches_must_split_over_the_data_axis(tmp_path):
  # 66 rows over 4 data devices used to fail at the first batch, in JAX's sharding code.
  config = _config(tmp_path, batch_size=66, eval_batch_size=512, mesh_shape=(-1, 1))
  with pytest.raises(ValueError, match=re.escape(
      'config.batch_size=66 does not split over the 4 devices of the mesh\'s data axis '
      '(mesh_shape (-1, 1)): use a multiple of 4, e.g. 68')):
    train.check_batch_split(config, 4)
  config.batch_size = 64
  train.check_batch_split(config, 4)
  config.eval_batch_size = 513
  with pytest.raises(ValueError, match=r'config.eval_batch_size=513 .* e.g. 516'):
    train.check_batch_split(config, 4)
  config.no_eval = True  # a run that never evaluates does not need it
  train.check_batch_split(config, 4)


def test_every_shipped_config_passes_the_config_check():
  paths = glob.glob(os.path.join(th.ROOT, 'configs', '*.py'))
  names = sorted(os.path.basename(p)[:-3] for p in paths if not p.endswith('__init__.py'))
  assert len(names) >= 7, names
  for name in names:
    train.check_config(importlib.import_module(f'configs.{name}').get_config())


def test_settings_that_another_one_overrides_are_named(caplog):
  # Both used to be ignored without a word.
  from configs import criteo_kaggle  # pylint: disable=g-import-not-at-top
  config = criteo_kaggle.get_config('deeprec_tables')
  with caplog.at_level(logging.INFO):
    train.check_config(config)  # checks say nothing: the planner runs them once per mesh
    assert not caplog.text
    train.log_overridden_settings(config)
    assert 'eval_files' not in caplog.text
    assert re.search(r'criteo_table_rows sizes the 26 tables \(19\d{6} rows in all\); '
                     r'hash_buckets=10000 is not used', caplog.text), caplog.text
    config.eval_files = 'eval.txt'
    train.log_overridden_settings(config)
  assert "config.eval_files='eval.txt' is not read: with split_parts=7" in caplog.text


def test_a_cross_rank_past_half_the_width_is_named(caplog):
  # The tiny ELM model's cross layers are 4 + 24 * 4 = 100 wide: rank 50 costs what a
  # full-rank layer does, 49 less.
  config = th.tiny_config('/nonexistent', interaction_op='dcn', dcn_low_rank_dim=49)
  with caplog.at_level(logging.INFO):
    train.log_overridden_settings(config)
    assert 'dcn_low_rank_dim' not in caplog.text
    config.dcn_low_rank_dim = 50
    train.log_overridden_settings(config)
  assert "dcn_low_rank_dim=50 is at least half the cross layers' width 100" in caplog.text


@pytest.mark.parametrize('optimizer,learning_rate,warned', [
    ('adamasync', 0.01, True), ('adam', 0.004, True), ('adamasync', 0.003, False),
    ('adagrad', 0.2, False)])
def test_dcn_under_a_fast_adam_is_warned_about(caplog, optimizer, learning_rate, warned):
  # The default config with dcn collapsed to a constant prediction under its Adam at 0.01.
  config = th.tiny_config('/nonexistent', interaction_op='dcn', optimizer=optimizer,
                          learning_rate=learning_rate)
  with caplog.at_level(logging.INFO):
    train.log_overridden_settings(config)
  assert ('the cross layers diverged under Adam' in caplog.text) == warned, caplog.text


def test_keep_checkpoint_max_zero_keeps_every_checkpoint(tmp_path):
  # DeepRec passes keep_checkpoint_max to TensorFlow's Saver, where 0 means keep them all.
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(_config(tmp_path, steps=15, save_steps=5, keep_checkpoint_max=0,
                                   no_eval=True), workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['10', '15', '5']


def test_unwritable_run_directory_fails_before_training(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  with pytest.raises(OSError, match='not writable'):
    train.train_and_evaluate(_config(tmp_path), str(blocker / 'run'))


def test_timeline_summaries_and_checkpoint_counts_are_written(tmp_path):
  from dlrm_jax import metric_writer
  workdir = str(tmp_path / 'run')
  config = _config(tmp_path, steps=16, timeline=2, activation_summary_steps=5)
  results = train.train_and_evaluate(config, workdir)
  # Saves at steps 5, 10 and 15, then the final step 16 (not a multiple of save_steps).
  assert (results['checkpoint_saves'], results['last_checkpoint_step']) == (4, 16)
  assert checkpoints.make_manager(workdir, config).latest_step() == 16
  with open(os.path.join(workdir, 'results.json')) as f:
    assert json.load(f)['last_checkpoint_step'] == 16
  # DeepRec's --timeline 2: one step's trace every 2 steps, here from the 11th step of the
  # invocation (step index 10) on.
  traces = glob.glob(os.path.join(workdir, 'timeline', '*', 'plugins', 'profile', '*',
                                  '*.xplane.pb'))
  assert sorted(os.path.relpath(t, os.path.join(workdir, 'timeline')).split(os.sep)[0]
                for t in traces) == ['step_11', 'step_13', 'step_15']
  tags = metric_writer.read_scalar_tags(workdir)
  for tag in ('train_loss', 'train_samples_per_s', 'learning_rate', 'eval_auc', 'eval_logloss',
              'eval_accuracy', 'zero_fraction/bottom_mlp/Dense_0'):
    assert tag in tags, (tag, sorted(tags))
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['steps'] == 16


def test_a_failure_in_a_traced_step_stops_the_trace(tmp_path, monkeypatch, caplog):
  # The trace of a failed step stayed on: the process's next run with a timeline failed at its
  # first trace ("Profile has already been started"), before any checkpoint.
  batches = data_sources.train_batches

  def failing_at_step_12(*args, **kwargs):
    for i, batch in enumerate(batches(*args, **kwargs)):
      if i == 12:
        raise OSError('the disk went away')
      yield batch
  monkeypatch.setattr(data_sources, 'train_batches', failing_at_step_12)
  with pytest.raises(OSError, match='the disk went away'):
    train.train_and_evaluate(_config(tmp_path, steps=16, timeline=1, no_eval=True,
                                     smartstaged=False), str(tmp_path / 'failed'))
  monkeypatch.undo()
  workdir = str(tmp_path / 'next')
  train.train_and_evaluate(_config(tmp_path, steps=12, timeline=1, no_eval=True), workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'timeline'))) == ['step_11', 'step_12']
  # A trace the timeline cannot start (the user's own, around the run) skips that step's.
  caplog.set_level('WARNING')
  with jax.profiler.trace(str(tmp_path / 'outer')):
    train.train_and_evaluate(_config(tmp_path, steps=11, timeline=1, no_eval=True),
                             str(tmp_path / 'traced'))
  assert 'profiler timeline: step 11 not traced' in caplog.text
  assert checkpoints.make_manager(str(tmp_path / 'traced'), _config(tmp_path)).latest_step() == 11


def test_logged_loss_is_the_mean_since_the_last_log_and_summaries_keep_their_own_steps(tmp_path):
  # The saves (every 3 steps) used to reset the logged mean (step 8 logged steps 7-8 only), and
  # activation summaries came only on log or save steps (7 and 14 are neither).
  from dlrm_jax import metric_writer
  every = dict(steps=16, shuffle_buffer=0, no_eval=True)
  per_step = str(tmp_path / 'per_step')
  train.train_and_evaluate(_config(tmp_path, log_every_steps=1, save_steps=0, **every), per_step)
  steps, losses = metric_writer.read_scalars(per_step, 'train_loss')
  np.testing.assert_array_equal(steps, np.arange(1, 17))
  # No rate on the invocation's first step: it compiles, and nothing was timed yet.
  rate_steps, _ = metric_writer.read_scalars(per_step, 'train_samples_per_s')
  np.testing.assert_array_equal(rate_steps, np.arange(2, 17))
  logged = str(tmp_path / 'logged')
  train.train_and_evaluate(_config(tmp_path, log_every_steps=4, save_steps=3,
                                   activation_summary_steps=7, **every), logged)
  steps, means = metric_writer.read_scalars(logged, 'train_loss')
  np.testing.assert_array_equal(steps, [4, 8, 12, 16])
  # Same seed and order: the same losses, each logged value the mean of its four steps (taken in
  # float32 by the trainer, in float64 here: 1e-5 relative is a few float32 roundings).
  np.testing.assert_allclose(means, losses.reshape(4, 4).mean(axis=1), rtol=1e-5)
  summary_steps, _ = metric_writer.read_scalars(logged, 'zero_fraction/bottom_mlp/Dense_0')
  np.testing.assert_array_equal(summary_steps, [7, 14])


def test_too_little_disk_for_checkpoints_fails_before_training(tmp_path, monkeypatch):
  import collections  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  usage = collections.namedtuple('usage', 'total used free')
  monkeypatch.setattr(shutil, 'disk_usage', lambda _: usage(10**6, 10**6 - 1000, 1000))
  workdir = tmp_path / 'run'
  with pytest.raises(OSError, match='GiB free, checkpoints of this run need'):
    train.train_and_evaluate(_config(tmp_path), str(workdir))
  assert not (workdir / 'checkpoints').exists()  # failed before anything was written


def test_a_bad_eval_file_fails_before_training(tmp_path):
  # The eval program is compiled from the first eval batch before the first step, so the eval
  # file's row cache is built then, and a bad row in it stops the run before anything is written.
  data = th.planted_dir(tmp_path / 'data', train_rows=400, eval_rows=50)
  path = os.path.join(data, 'eval.csv')
  with open(path) as f:
    lines = f.read().splitlines()
  lines[1] += ',surplus'
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  workdir, config = str(tmp_path / 'run'), _config(tmp_path, data_location=data)
  with pytest.raises(input_pipeline.DataError, match=r'eval\.csv:2: column'):
    train.train_and_evaluate(config, workdir)
  assert checkpoints.make_manager(workdir, config).latest_step() is None


@pytest.mark.slow
def test_saving_a_table_holds_no_copy_of_it(tmp_path):
  # A compressed write keeps every encoded chunk until the write completes (random floats do not
  # compress, so one table's worth: 1.08 GB for the Criteo tables). Saving a 256 MiB random table
  # must raise the peak by well under its size; the bound (half of it) leaves room for orbax's
  # own buffers and the allocator; with compression this test measured +239 MiB.
  script = f'''
import jax, jax.numpy as jnp, ml_collections
from dlrm_jax import checkpoints
def status(key):
  return int(open('/proc/self/status').read().split(key + ':')[1].split()[0]) / 1024
table = jax.random.normal(jax.random.PRNGKey(0), (4 << 20, 16), jnp.float32)
state = {{'table': table, 'w': jnp.ones((8, 8))}}
jax.block_until_ready(state)
manager = checkpoints.make_manager({str(tmp_path)!r}, ml_collections.ConfigDict(
    dict(keep_checkpoint_max=1, async_checkpointing=True)))
open('/proc/self/clear_refs', 'w').write('5')  # resets VmHWM to the current RSS
before = status('VmRSS')
checkpoints.save(manager, 1, state)
checkpoints.wait(manager)
print(status('VmHWM') - before)
restored = checkpoints.restore_latest(manager, state)
assert bool((restored['table'] == table).all())
'''
  if not os.path.exists('/proc/self/clear_refs'):
    pytest.skip('needs Linux /proc to read the peak RSS')
  out = subprocess.run([sys.executable, '-c', script], check=True, capture_output=True,
                       text=True).stdout
  growth_mib = float(out.split()[-1])
  assert growth_mib < 128, growth_mib


def test_synchronous_save_is_complete_on_return_and_frees_the_state_for_donation(tmp_path):
  config = th.tiny_config(tmp_path / 'out', async_checkpointing=False, keep_checkpoint_max=1)
  manager = checkpoints.make_manager(str(tmp_path / 'run'), config)
  table = jax.numpy.arange(4096.0).reshape(256, 16)
  checkpoints.save(manager, 7, {'table': table})
  assert manager.latest_step() == 7  # written and renamed into place before save returned
  # Nothing holds the saved buffer any more, so a step can update it in place.
  step = jax.jit(lambda t: t + 1, donate_argnums=0)
  updated = step(table)
  assert table.is_deleted()
  restored = checkpoints.restore_latest(manager, {'table': updated})
  np.testing.assert_array_equal(np.asarray(restored['table']),
                                np.arange(4096.0, dtype=np.float32).reshape(256, 16))


def test_a_second_training_run_on_one_directory_stops_and_the_lock_dies_with_its_run(tmp_path):
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(_config(tmp_path, steps=5, save_steps=0), workdir)
  # While the directory's lock is held, as by a run in progress, training there is refused and
  # reading is not: an evaluator may follow a run that is still training.
  with checkpoints.training_lock(workdir):
    with pytest.raises(checkpoints.RunDirectoryInUse, match=f'pid {os.getpid()} on '):
      train.train_and_evaluate(_config(tmp_path, steps=10, save_steps=0), workdir)
    assert _restored(_config(tmp_path, mode='eval'), workdir).step == 5
  # A run that fails inside the lock releases it.
  with pytest.raises(ValueError, match='does not fit'):
    train.train_and_evaluate(_config(tmp_path, steps=10, save_steps=0, embedding_dim=8), workdir)
  assert train.train_and_evaluate(_config(tmp_path, steps=10, save_steps=0), workdir)['steps'] == 10
  # So does a process that dies holding it (the kernel drops its flock).
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time\nfrom dlrm_jax import checkpoints\n'
       f'with checkpoints.training_lock({workdir!r}):\n  print("held", flush=True)\n'
       '  time.sleep(600)'],
      stdout=subprocess.PIPE, text=True, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  try:
    assert holder.stdout.readline().strip() == 'held'
    with pytest.raises(checkpoints.RunDirectoryInUse, match=f'pid {holder.pid} '):
      train.train_and_evaluate(_config(tmp_path, steps=12, save_steps=0), workdir)
  finally:
    holder.kill()
    holder.wait()
  assert train.train_and_evaluate(_config(tmp_path, steps=12, save_steps=0), workdir)['steps'] == 12


def test_a_run_failing_in_a_directory_another_run_just_took_raises_its_own_error(tmp_path,
                                                                                monkeypatch):
  # The failed run removes its empty directory; a second run opening the lock in between made
  # the removal raise 'Directory not empty' in place of the first run's error.
  workdir = tmp_path / 'run'
  real_remove = os.remove

  def remove_then_another_run_opens_the_lock(path):
    real_remove(path)
    (workdir / '.train.lock').write_text('pid 1 on elsewhere\n')
  monkeypatch.setattr(os, 'remove', remove_then_another_run_opens_the_lock)
  with pytest.raises(RuntimeError, match='the data are missing'):
    with checkpoints.training_lock(str(workdir)):
      raise RuntimeError('the data are missing')
  assert os.listdir(workdir) == ['.train.lock']  # the other run's, left alone


def test_a_resume_that_changes_the_data_order_says_so(tmp_path, caplog):
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(_config(tmp_path, steps=5, save_steps=0, no_eval=True), workdir)
  caplog.set_level('WARNING')
  # Steps and learning rate leave batch k's rows alone, and so does eval_parts without
  # split_parts: no warning.
  train.train_and_evaluate(_config(tmp_path, steps=8, save_steps=0, no_eval=True,
                                   learning_rate=0.02, eval_parts=3), workdir)
  assert 'another data order' not in caplog.text
  # Every changed setting is named, as a resume applies it (or a forgotten flag's default).
  assert ('resuming at step 5 with settings changed since the last invocation '
          f'({workdir}/config.json): eval_parts: 1 -> 3; learning_rate: 0.01 -> 0.02; '
          'steps: 5 -> 8') in caplog.text, caplog.text
  # Nor does a config.json of a release that listed only the planted fields it set (the others
  # are the generator's defaults, as now).
  with open(os.path.join(workdir, 'config.json')) as f:
    saved = json.load(f)
  saved['planted'] = {k: v for k, v in saved['planted'].items() if v is not None}
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(saved, f)
  train.warn_if_data_order_changes(_config(tmp_path), workdir, 8)
  assert 'another data order' not in caplog.text
  train.train_and_evaluate(_config(tmp_path, steps=10, save_steps=0, no_eval=True,
                                   batch_size=32, seed=7), workdir)
  assert re.search(r'resuming at step 8 with another data order \(batch_size: 64 -> 32; '
                   r'seed: \d+ -> 7\)', caplog.text), caplog.text


def test_export_replaces_only_an_earlier_export(tmp_path, monkeypatch):
  # Exporting replaces the whole directory: export_dir=output_dir used to delete every run in it.
  first = _config(tmp_path, steps=3, save_steps=0, no_eval=True)
  train.train_and_evaluate(first, os.path.join(first.output_dir, 'model_DLRM_1'))
  before = sorted(os.listdir(first.output_dir))
  refused = 'holds 2 entries besides an export.s model.jax_export, params.npz, spec.json'
  with pytest.raises(ValueError, match=refused):
    train.train_and_evaluate(_config(tmp_path, steps=3, no_eval=True,
                                     export_dir=first.output_dir), str(tmp_path / 'run2'))
  assert sorted(os.listdir(first.output_dir)) == before
  assert not os.path.exists(tmp_path / 'run2' / 'checkpoints' / '3')  # refused before training
  # An artifact among the runs did not make the directory an earlier export: a run trained
  # into an export directory went with the next export.
  (pathlib.Path(first.output_dir) / 'model.jax_export').write_text('')
  with pytest.raises(ValueError, match=refused):
    train.train_and_evaluate(_config(tmp_path, steps=3, no_eval=True,
                                     export_dir=first.output_dir), str(tmp_path / 'run2'))
  assert sorted(os.listdir(first.output_dir)) == sorted(before + ['model.jax_export'])
  # The run's own checkpoints, or a directory the run is in, before training too (the
  # checkpoints directory did not exist yet at the check, and was refused only after training).
  for inside in ('run2/checkpoints', 'run2/checkpoints/x', 'run2', '.'):
    with pytest.raises(ValueError, match='would replace the run directory'):
      train.train_and_evaluate(_config(tmp_path, steps=3, no_eval=True,
                                       export_dir=str(tmp_path / inside)), str(tmp_path / 'run2'))
  assert not os.path.exists(tmp_path / 'run2' / 'checkpoints' / '3')
  export = str(tmp_path / 'serving')
  train.train_and_evaluate(_config(tmp_path, steps=3, save_steps=0, no_eval=True,
                                   export_dir=export), str(tmp_path / 'run3'))
  # What killed exports left beside it (a copy of every parameter each) goes with the next
  # export; a running one's stays.
  prefix = serving._temporary_prefix(export)
  running = f'{prefix}{os.getpid()}-5e6f7a8b'
  # A host named as this one with '-4242' added: its names are not this host's.
  other_host = f'{prefix}4242-999999999-0a1b2c3d'
  for leftover in (f'{prefix}999999999-0a1b2c3d', f'{prefix}999999999-0a1b2c3d-old', running,
                   other_host):
    os.makedirs(tmp_path / leftover / 'artifact')
  os.symlink(tmp_path / 'plain_target', tmp_path / f'{prefix}999999998-1a2b3c4d')  # a dead link
  exchanged, exchange = [], serving._exchange
  monkeypatch.setattr(serving, '_exchange', lambda a, b: exchanged.append(exchange(a, b))
                      or exchanged[-1])
  train.train_and_evaluate(_config(tmp_path, steps=5, save_steps=0, no_eval=True,
                                   export_dir=export), str(tmp_path / 'run3'))
  # Swapped with the first in one step where the system can (Linux): a server never finds the
  # directory missing, as it did between two renames.
  assert exchanged == [sys.platform.startswith('linux')]
  assert sorted(os.listdir(export)) == ['model.jax_export', 'params.npz', 'spec.json']
  assert serving.load_spec(export) and 'serving' in os.listdir(tmp_path)
  assert sorted(n for n in os.listdir(tmp_path) if n.startswith(prefix)) == sorted(
      [running, other_host])
  shutil.rmtree(tmp_path / running)
  shutil.rmtree(tmp_path / other_host)
  # Where it cannot, the old artifact is moved aside first, and nothing is left either.
  monkeypatch.setattr(serving, '_exchange', lambda a, b: False)
  train.train_and_evaluate(_config(tmp_path, steps=7, save_steps=0, no_eval=True,
                                   export_dir=export), str(tmp_path / 'run3'))
  assert sorted(os.listdir(export)) == ['model.jax_export', 'params.npz', 'spec.json']
  assert not [n for n in os.listdir(tmp_path) if n.startswith(prefix)]
  # A symlink to an earlier export (a "current -> v1" layout) is replaced by the new directory;
  # what it pointed to is left as it was. (The link used to end the run with an error after the
  # export, and stay beside it.)
  monkeypatch.setattr(serving, '_exchange', exchange)
  os.rename(export, tmp_path / 'v1')
  os.symlink(tmp_path / 'v1', export)
  v1 = sorted(os.listdir(tmp_path / 'v1'))
  train.train_and_evaluate(_config(tmp_path, steps=9, save_steps=0, no_eval=True,
                                   export_dir=export), str(tmp_path / 'run3'))
  assert not os.path.islink(export) and sorted(os.listdir(export)) == v1
  assert sorted(os.listdir(tmp_path / 'v1')) == v1
  assert not [n for n in os.listdir(tmp_path) if n.startswith(prefix)]
  # Readable as any directory made here is (it was 0700, unreadable to a server of another user).
  os.mkdir(tmp_path / 'plain')
  assert os.stat(export).st_mode == os.stat(tmp_path / 'plain').st_mode


def test_an_unwritable_export_dir_fails_before_training(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('')
  workdir = tmp_path / 'run'
  with pytest.raises(OSError, match=re.escape(f'the directory of export_dir {blocker / "serving"}')):
    train.train_and_evaluate(_config(tmp_path, export_dir=str(blocker / 'serving' / 'v1')),
                             str(workdir))
  assert not os.path.exists(workdir / 'checkpoints' / '20')


def test_run_directories_orbax_cannot_use_are_refused_before_anything(tmp_path, monkeypatch):
  # A name that is not UTF-8 trained, then failed at the first save inside tensorstore.
  bad = os.fsdecode(os.fsencode(str(tmp_path)) + b'/bad\xffdir')
  with pytest.raises(ValueError, match='run directory .* is not valid UTF-8'):
    train.train_and_evaluate(_config(tmp_path), os.path.join(bad, 'run'))
  assert not os.path.exists(os.fsencode(bad))
  # A relative one is the working directory's too (the default ./result/model_DLRM_<time> is).
  os.makedirs(os.fsencode(bad))
  monkeypatch.chdir(bad)
  with pytest.raises(ValueError, match='run directory .* is not valid UTF-8'):
    train.train_and_evaluate(_config(tmp_path), 'run')
  assert os.listdir(os.fsencode(bad)) == []
  # 'link/../run': orbax's checkpoints went to <here>/run, the lock and results to the link's.
  (tmp_path / 'real' / 'sub').mkdir(parents=True)
  (tmp_path / 'cwd').mkdir()
  (tmp_path / 'cwd' / 'link').symlink_to(tmp_path / 'real' / 'sub')
  split = str(tmp_path / 'cwd' / 'link' / '..' / 'run')
  with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'real' / 'run'} to the file "
                                                 f"system but {tmp_path / 'cwd' / 'run'}")):
    train.train_and_evaluate(_config(tmp_path), split)
  assert not os.path.exists(tmp_path / 'real' / 'run')
  assert not os.path.exists(tmp_path / 'cwd' / 'run')
  # A link whose target is missing (an unmounted disk, a deleted run) is named as such.
  (tmp_path / 'dangling').symlink_to(tmp_path / 'gone')
  for mode in ('train', 'eval'):
    with pytest.raises(FileNotFoundError, match=re.escape(
        f"run directory {tmp_path / 'dangling'} is a symbolic link to {tmp_path / 'gone'}, "
        'which does not exist')):
      train.train_and_evaluate(_config(tmp_path, mode=mode), str(tmp_path / 'dangling'))
  assert not os.path.lexists(tmp_path / 'gone')


def _bad_row_after(tmp_path, name, good_rows=9000):
  """A data directory whose `name` file (train.csv or eval.csv) holds `good_rows` planted rows,
  then a bad one, past the first chunk of 8192 rows: with use_cache=False a file is parsed as it
  is read, so the row surfaces only when training or an evaluation reaches it. Returns
  (directory, the good rows)."""
  data = th.planted_dir(tmp_path)
  local = tmp_path / 'data'
  local.mkdir()
  for split in ('train.csv', 'eval.csv'):
    with open(os.path.join(data, split)) as f:
      good = f.read().splitlines()
    if split != name:
      (local / split).write_text('\n'.join(good) + '\n')
      continue
    rows = (good * (good_rows // len(good) + 1))[:good_rows]
    bad = good[0].split(',')
    bad[5] = 'abc'
    (local / split).write_text('\n'.join(rows + [','.join(bad)]) + '\n')
  return local, rows


def test_a_failed_evaluation_during_training_saves_its_step_first(tmp_path):
  local, rows = _bad_row_after(tmp_path, 'eval.csv')
  config = _config(tmp_path, data_location=str(local), use_cache=False, save_steps=0,
                   eval_every_steps=10)
  workdir = str(tmp_path / 'run')
  with pytest.raises(input_pipeline.DataError, match=f'eval.csv:{len(rows) + 1}:'):
    train.train_and_evaluate(config, workdir)
  assert _latest_checkpoint_step(workdir) == 10  # not lost: no save was due before step 20


@pytest.mark.parametrize('failure', ['eval', 'last_update'])
def test_a_save_still_being_written_when_the_run_fails_is_finished_first(tmp_path, monkeypatch,
                                                                          failure):
  # Step 10 is saved asynchronously, then the evaluation at step 10 fails on a bad row, or the
  # last step's update (11) goes non-finite after the loop. The process used to exit without
  # waiting: a large state's save was left half written, and the run lost every step. The
  # delayed save below stands in for such a state's.
  import threading  # pylint: disable=g-import-not-at-top
  local, rows = _bad_row_after(tmp_path, 'eval.csv')
  real_save, real_wait, in_flight = checkpoints.save, checkpoints.wait, []

  def slow_save(manager, step, state):
    # A copy, as orbax's asynchronous save takes one before it returns: later steps donate.
    snapshot = jax.tree.map(lambda x: x.copy(), state)
    in_flight.append(threading.Timer(1.0, real_save, (manager, step, snapshot)))
    in_flight[-1].start()

  def wait(manager):
    for timer in in_flight:
      timer.join()
    real_wait(manager)

  monkeypatch.setattr(checkpoints, 'save', slow_save)
  monkeypatch.setattr(checkpoints, 'wait', wait)
  config = _config(tmp_path, data_location=str(local), use_cache=False, save_steps=10,
                   eval_every_steps=10)
  expected = (input_pipeline.DataError, f'eval.csv:{len(rows) + 1}:')
  if failure == 'last_update':
    config = _config(tmp_path, steps=11, save_steps=10, no_eval=True)
    expected = (FloatingPointError, 'non-finite parameters after step 11; the last good '
                                    'checkpoint is step 10')
    finite, calls = train.all_finite, []

    def last_update_not_finite(tree):  # the save at step 10 checks first, then the final step
      calls.append(1)
      return np.bool_(False) if len(calls) == 2 else finite(tree)

    last_update_not_finite.lower = finite.lower  # compiled ahead as the real one
    monkeypatch.setattr(train, 'all_finite', last_update_not_finite)
  workdir = str(tmp_path / 'run')
  try:
    with pytest.raises(expected[0], match=expected[1]):
      train.train_and_evaluate(config, workdir)
    assert all(not t.is_alive() for t in in_flight)
  finally:
    for timer in in_flight:  # the old code's save, still waiting to be written
      timer.join()
  monkeypatch.undo()
  assert _latest_checkpoint_step(workdir) == 10
  assert int(_restored(config, workdir).step) == 10


@pytest.mark.parametrize('smartstaged', [True, False])
def test_a_notice_while_the_input_hangs_saves_the_step_reached(tmp_path, monkeypatch,
                                                              smartstaged):
  # Input that never comes (a hung mount): SIGTERM used to be noted and the wait went on, until
  # the scheduler's SIGKILL lost every step since the last save.
  import threading  # pylint: disable=g-import-not-at-top
  from dlrm_jax import data_sources  # pylint: disable=g-import-not-at-top
  real, hanging, released = data_sources.train_batches, threading.Event(), threading.Event()

  def hangs_after_seven(*args, **kwargs):
    yield from itertools.islice(real(*args, **kwargs), 7)
    hanging.set()
    released.wait()  # for the rest of the run: the test's end lets its thread go

  def notice():
    if hanging.wait(timeout=120):
      time.sleep(0.3)  # the loop is waiting for the eighth batch
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(data_sources, 'train_batches', hangs_after_seven)
  threading.Thread(target=notice, daemon=True).start()
  workdir = str(tmp_path / 'run')
  try:
    with pytest.raises(checkpoints.Preempted, match='stopped after step 7 of 20'):
      train.train_and_evaluate(_config(tmp_path, smartstaged=smartstaged, save_steps=0),
                               workdir)
  finally:
    released.set()
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  assert (results['preempted_at_step'], results['preempted_by']) == (7, 'SIGTERM')
  assert _latest_checkpoint_step(workdir) == 7


def test_a_stopped_or_failed_run_leaves_nothing_open_in_the_process(tmp_path, monkeypatch):
  # A notebook keeps the last exception: a stop's traceback kept the run's frame (its state,
  # input thread and row cache) alive beside the resumed run's; and each failed run left its
  # TensorBoard writer's threads and files open for good.
  import gc  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top
  real = data_sources.train_batches

  def open_things():
    # Identities, not counts: a thread left by an earlier test ended during this one in CI.
    gc.collect()
    return set(threading.enumerate()), th.open_files()

  def stopping(*args, **kwargs):
    for i, batch in enumerate(real(*args, **kwargs)):
      if i == 5:
        os.kill(os.getpid(), signal.SIGTERM)  # noted by the run, which stops after this step
      yield batch

  def failing(*args, **kwargs):
    for i, batch in enumerate(real(*args, **kwargs)):
      if i == 5:
        raise RuntimeError('the disk went away')
      yield batch
  train.train_and_evaluate(_config(tmp_path, steps=3, no_eval=True), str(tmp_path / 'warm'))
  before = open_things()
  monkeypatch.setattr(data_sources, 'train_batches', stopping)
  with pytest.raises(checkpoints.Preempted) as stopped:
    train.train_and_evaluate(_config(tmp_path, save_steps=0), str(tmp_path / 'stopped'))
  frames = [frame.f_code.co_name for frame, _ in traceback.walk_tb(stopped.tb)]
  assert not any('run_training' in name for name in frames), frames
  monkeypatch.setattr(data_sources, 'train_batches', failing)
  for _ in range(2):
    with pytest.raises(RuntimeError, match='the disk went away'):
      train.train_and_evaluate(_config(tmp_path, save_steps=0), str(tmp_path / 'failed'))
  deadline = time.monotonic() + 10  # an input thread ends by itself within 0.1 s of its stop
  while True:
    threads, fds = open_things()
    new = threads - before[0], fds - before[1]
    if not any(new) or time.monotonic() > deadline:
      break
    time.sleep(0.1)
  assert not any(new), new


def test_a_bad_train_row_found_mid_run_saves_the_step_before_it(tmp_path):
  # The bad row at line 9001 surfaces after ~128 steps of 64, long after the run began.
  local, _ = _bad_row_after(tmp_path, 'train.csv')
  config = _config(tmp_path, data_location=str(local), use_cache=False, save_steps=0, steps=400,
                   shuffle_buffer=0)
  workdir = str(tmp_path / 'run')
  before = {id(a) for a in jax.live_arrays()}
  with pytest.raises(input_pipeline.DataError, match='train.csv:9001:') as raised:
    train.train_and_evaluate(config, workdir)
  saved = _latest_checkpoint_step(workdir)
  assert 100 < saved < 9000 // 64, saved  # the steps before the bad row's chunk, not lost
  # The error, held (as a notebook holds its last one), keeps no array of the run alive: its
  # frames' state stayed beside the next run's.
  gc.collect()
  left = [a.shape for a in jax.live_arrays() if id(a) not in before]
  assert raised.value.line == 9001 and not left, left


def _latest_checkpoint_step(workdir):
  return max(int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit())


def test_a_failure_after_training_keeps_the_figures_and_a_rerun_only_evaluates(tmp_path):
  # A bad eval row found only in the final evaluation, after the last step was saved.
  local, rows = _bad_row_after(tmp_path, 'eval.csv')
  config = _config(tmp_path, data_location=str(local), use_cache=False, save_steps=0)
  workdir = str(tmp_path / 'run')
  with pytest.raises(input_pipeline.DataError, match=f'eval.csv:{len(rows) + 1}:'):
    train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, 'results.json')) as f:
    kept = json.load(f)
  assert kept['steps'] == kept['last_checkpoint_step'] == 20 and kept['train_samples_per_s'] > 0
  assert kept['failed_after_training'].startswith('DataError: ') and 'eval_auc' not in kept
  # mode=eval on the same bad row: the held error keeps no array of the restored state alive.
  config.mode = 'eval'
  before = {id(a) for a in jax.live_arrays()}
  with pytest.raises(input_pipeline.DataError, match=f'eval.csv:{len(rows) + 1}:') as raised:
    train.train_and_evaluate(config, workdir)
  gc.collect()
  left = [a.shape for a in jax.live_arrays() if id(a) not in before]
  assert raised.value.line == len(rows) + 1 and not left, left
  config.mode = 'train'
  (local / 'eval.csv').write_text('\n'.join(rows) + '\n')
  results = train.train_and_evaluate(config, workdir)
  assert results['steps'] == 20 and 0 < results['eval_auc'] < 1
  assert 'failed_after_training' not in results
  assert results['eval_data'] == [str(local / 'eval.csv')]
  # Nothing trained again: the training's figures are the ones it trained at, not a run of no
  # steps (train_samples_per_s None, checkpoint_saves 0).
  training = ('train_time_s', 'train_samples_per_s', 'checkpoint_saves', 'checkpoint_stall_s')
  assert {k: results[k] for k in training} == {k: kept[k] for k in training}
  # A rerun to export, without evaluating again, keeps the evaluation's figures too.
  config.no_eval, config.export_dir = True, str(tmp_path / 'export')
  exported = train.train_and_evaluate(config, workdir)
  assert exported['export_dir'] == config.export_dir
  figures = training + ('eval_auc', 'eval_logloss', 'eval_data', 'rows_parsed', 'parse_stats')
  with open(os.path.join(workdir, 'results.json')) as f:
    written = json.load(f)
  assert {k: written[k] for k in figures} == {k: results[k] for k in figures}
  # A rerun whose evaluation fails keeps the training's figures, not an earlier evaluation's.
  (local / 'eval.csv').write_text('\n'.join(rows) + '\n1,2,3\n')
  config.no_eval, config.export_dir = False, ''
  with pytest.raises(input_pipeline.DataError, match=f'eval.csv:{len(rows) + 1}:'):
    train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, 'results.json')) as f:
    failed = json.load(f)
  assert failed['failed_after_training'].startswith('DataError: ') and 'eval_auc' not in failed
  assert {k: failed[k] for k in training} == {k: kept[k] for k in training}


def test_a_run_that_fails_before_writing_leaves_no_new_directory(tmp_path):
  missing = str(tmp_path / 'no_data')
  workdir = tmp_path / 'model_DLRM_new'
  with pytest.raises(FileNotFoundError, match='no_data'):
    train.train_and_evaluate(_config(tmp_path, data_location=missing), str(workdir))
  assert not workdir.exists()
  # A directory that was there before (named by the user) stays, lock file and all.
  workdir.mkdir()
  with pytest.raises(FileNotFoundError, match='no_data'):
    train.train_and_evaluate(_config(tmp_path, data_location=missing), str(workdir))
  assert os.listdir(workdir) == ['.train.lock']


def test_runs_started_in_the_same_second_get_a_run_directory_each(tmp_path, monkeypatch):
  # The default run directory is named by the second. A second run in the same second (a
  # sweep's jobs launched together) stopped at the first one's lock, or, once the first had
  # ended, took its checkpoint as its own and trained nothing.
  monkeypatch.setattr(train.time, 'strftime', lambda fmt, *t: '20260101-000000')
  config = _config(tmp_path, steps=3, save_steps=0, no_eval=True)
  first, second = (train.train_and_evaluate(config) for _ in range(2))
  assert first['checkpoint_saves'] == second['checkpoint_saves'] == 1
  runs = lambda: sorted(glob.glob(str(tmp_path / 'out' / 'model_DLRM_*')))
  assert [os.path.basename(r) for r in runs()] == ['model_DLRM_20260101-000000',
                                                   'model_DLRM_20260101-000000-1']
  # One that fails before writing anything removes the directory it made.
  with pytest.raises(FileNotFoundError, match='no_data'):
    train.train_and_evaluate(_config(tmp_path, data_location=str(tmp_path / 'no_data')))
  assert len(runs()) == 2


def test_quiet_orbax_info_drops_only_orbax_info_lines_and_is_added_once():
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  handler = absl_logging.get_absl_handler()
  before = list(handler.filters)
  try:
    # As in a fresh process (an earlier in-process main() would have added one).
    handler.filters[:] = [f for f in before if not isinstance(f, checkpoints._QuietOrbax)]
    checkpoints.quiet_orbax_info()
    checkpoints.quiet_orbax_info()  # main() and ablate may both call it in one process
    (added,) = [f for f in handler.filters if isinstance(f, checkpoints._QuietOrbax)]
    record = lambda level, path: logging.LogRecord('absl', level, path, 1, 'm', (), None)
    orbax_file = '/site-packages/orbax/checkpoint/checkpoint_manager.py'
    assert not added.filter(record(logging.INFO, orbax_file))
    assert added.filter(record(logging.WARNING, orbax_file))
    assert added.filter(record(logging.INFO, '/work/dlrm_jax/train.py'))
  finally:
    handler.filters[:] = before


def test_an_evaluator_takes_the_newer_step_when_its_step_is_deleted(tmp_path):
  workdir = str(tmp_path / 'run')
  config = th.tiny_config(tmp_path / 'out', async_checkpointing=False, keep_checkpoint_max=1)
  trainer = checkpoints.make_manager(workdir, config)
  checkpoints.save(trainer, 1, {'w': jax.numpy.zeros(4)})
  evaluator = checkpoints.make_manager(workdir, config)
  assert evaluator.latest_step() == 1
  # The trainer saves step 2 and deletes step 1 after the evaluator listed the steps.
  checkpoints.save(trainer, 2, {'w': jax.numpy.ones(4)})
  assert not os.path.exists(os.path.join(workdir, 'checkpoints', '1'))
  restored = checkpoints.restore_latest(evaluator, {'w': jax.numpy.zeros(4)})
  np.testing.assert_array_equal(np.asarray(restored['w']), np.ones(4))


def test_only_a_partial_restore_reads_a_part_of_the_checkpoint(tmp_path):
  # Inference reads the parameters without the optimizer's slots (partial); a resume must read
  # all of them, so a state missing entries the checkpoint holds is refused there, not left
  # with the entries it happens to name.
  config = th.tiny_config(tmp_path / 'out', async_checkpointing=False)
  manager = checkpoints.make_manager(str(tmp_path / 'run'), config)
  checkpoints.save(manager, 1, {'params': jax.numpy.ones(3), 'slots': jax.numpy.full(3, 2.0)})
  part = {'params': jax.numpy.zeros(3)}
  restored = checkpoints.restore_latest(manager, part, partial=True)
  assert list(restored) == ['params']
  np.testing.assert_array_equal(np.asarray(restored['params']), np.ones(3))
  with pytest.raises(ValueError, match='the checkpoint at step 1 .* does not fit this config'):
    checkpoints.restore_latest(manager, part)


def _summaries_on_disk_at_saves(tmp_path, monkeypatch, tag, **overrides):
  """{step: the steps of `tag` on disk as that step's checkpoint is saved}: what a kill at that
  save would leave."""
  from dlrm_jax import metric_writer  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'run')
  on_disk = {}
  save = checkpoints.save

  def save_and_look(manager, step, state):
    on_disk[step] = list(metric_writer.read_scalars(workdir, tag)[0])
    return save(manager, step, state)

  monkeypatch.setattr(checkpoints, 'save', save_and_look)
  train.train_and_evaluate(_config(tmp_path, save_steps=5, **overrides), workdir)
  return on_disk


def test_summaries_up_to_a_checkpoint_are_on_disk_with_it(tmp_path, monkeypatch):
  # TensorBoard's writer flushed every 10 s: a kill lost the losses logged before the newest
  # checkpoint for good (the resumed run logs only the steps after it).
  on_disk = _summaries_on_disk_at_saves(tmp_path, monkeypatch, 'train_loss', steps=15,
                                        log_every_steps=1, no_eval=True)
  assert sorted(on_disk) == [5, 10, 15]
  # At least those: the writer also flushes every 10 s, which a slow machine reaches mid-run.
  assert set(range(1, 6)) <= set(on_disk[10]) and set(range(1, 11)) <= set(on_disk[15]), on_disk


def test_an_evaluation_during_training_is_on_disk_before_the_next_checkpoint(tmp_path,
                                                                            monkeypatch):
  # Step 5's evaluation comes after step 5's save: the resume from that save does not evaluate
  # step 5 again, so a kill before the next flush lost its figures for good.
  on_disk = _summaries_on_disk_at_saves(tmp_path, monkeypatch, 'eval_auc', steps=10,
                                        eval_every_steps=5, no_eval=False)
  assert on_disk[10] == [5], on_disk


@pytest.mark.parametrize('change', [dict(dcn_num_layers=2), dict(dcn_low_rank_dim=6)])
def test_eval_or_resume_with_other_cross_layers_is_refused(tmp_path, change):
  # Evaluation restores the parameters alone (a partial restore): a cross net with a layer
  # fewer than the checkpoint's must be refused like one of another rank, not read in part.
  workdir = str(tmp_path / 'run')
  common = dict(interaction_op='dcn', dcn_num_layers=3, dcn_low_rank_dim=8)
  train.train_and_evaluate(_config(tmp_path, steps=3, save_steps=0, no_eval=True, **common),
                           workdir)
  field = next(iter(change))
  for mode in ('eval', 'train'):
    with pytest.raises(ValueError, match=rf'does not fit this config: .*{field}: '):
      train.train_and_evaluate(_config(tmp_path, mode=mode, steps=4, **{**common, **change}),
                               workdir)
  assert int(_restored(_config(tmp_path, mode='eval', **common), workdir).step) == 3


def test_an_export_records_how_requests_encode_rows(tmp_path):
  # An unknown encoding is refused before anything is written; an export from before the
  # record was trained on text, the only encoding there was.
  with pytest.raises(ValueError, match=r"input_encoding 'csv': expected one of \['text', "
                                       r"'torchrec_npy'\]"):
    serving.export_model(None, None, str(tmp_path / 'export'), {}, input_encoding='csv')
  assert not os.path.exists(tmp_path / 'export')
  (tmp_path / 'old').mkdir()
  (tmp_path / 'old' / serving.SPEC).write_text(json.dumps({'name': 'elm', 'step': 3}))
  assert serving.load_input_encoding(str(tmp_path / 'old')) == 'text'

