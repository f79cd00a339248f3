"""experiments/ablate.py on a tiny grid: the command line, the table, the plots and resuming."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from configs import ablation_interactions
from dlrm_jax import checkpoints
from experiments import ablate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CELLS = ('interaction_op-dot_seed-1', 'interaction_op-dot_seed-2',
         'interaction_op-cat_seed-1', 'interaction_op-cat_seed-2')
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def command_env():
  """The environment of a command run from the checkout (the session's compilation cache, set by
  conftest, is in it)."""
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join([ROOT, env.get('PYTHONPATH', '')])
  return env


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  """A finished 2 x 2 grid made by the command line, as a user would run it."""
  out_dir = tmp_path_factory.mktemp('ablation') / 'grid'
  command = [sys.executable, '-m', 'experiments.ablate',
             '--config=configs/ablation_interactions.py:tiny',
             '--grid', 'interaction_op=dot,cat', '--seeds', '1,2', f'--out_dir={out_dir}']
  run = subprocess.run(command, cwd=ROOT, env=command_env(),
                       capture_output=True, text=True, timeout=600, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  return out_dir, run.stdout, run.stderr


@pytest.mark.slow
def test_command_line_writes_cells_table_and_plots(finished):
  out_dir, stdout, stderr = finished
  assert '4 cells (4 trained now, 0 finished before)' in stdout
  # orbax's INFO lines (dozens a save) are kept out of the log, as in dlrm_jax.main's.
  assert 'cell 1/4: ' in stderr, stderr[-2000:]  # its own INFO lines still pass
  assert 'checkpoint_manager.py' not in stderr, stderr[-2000:]
  for cell in CELLS:
    with open(out_dir / cell / 'results.json') as f:
      assert json.load(f)['steps'] == 40
  # Every cell read the same planted data: one data directory, named in each cell's config.
  (data,) = os.listdir(out_dir / 'data')
  for cell in CELLS:
    with open(out_dir / cell / 'cell_config.json') as f:
      assert json.load(f)['output_dir'] == str(out_dir / 'data' / data)

  summary = pd.read_csv(out_dir / 'results.csv')
  assert list(summary['interaction_op']) == ['dot', 'cat']  # grid order, not sorted
  assert list(summary['seeds']) == [2, 2]
  cells = pd.read_csv(out_dir / 'cells.csv')
  for _, row in summary.iterrows():
    aucs = cells.loc[cells['interaction_op'] == row['interaction_op'], 'eval_auc']
    assert row['eval_auc_mean'] == pytest.approx(aucs.mean())
    assert row['eval_auc_std'] == pytest.approx(aucs.std(ddof=1))
    # The seed must change the run (initialisation and shuffle order), or the spread is fake.
    assert aucs.nunique() == 2
    assert row['steps_mean'] == 40 and row['steps_std'] == 0
    assert 0.5 < row['oracle_auc'] <= 1 and np.isfinite(row['train_samples_per_s_mean'])

  with open(out_dir / 'results.md') as f:
    markdown = f.read()
  assert '| interaction_op | seeds | eval AUC | eval logloss |' in markdown
  assert f"| dot | 2 | {summary['eval_auc_mean'][0]:.4f} ± " in markdown
  assert 'interaction_weight=2.0' in markdown  # the preamble names the planted setting
  for name in ('auc.png', 'loss.png'):
    with open(out_dir / name, 'rb') as f:
      image = f.read()
    assert image.startswith(PNG_MAGIC) and len(image) > 10_000, name


@pytest.mark.slow
def test_loss_curves_come_from_the_event_files(finished):
  out_dir, _, _ = finished
  steps, losses = ablate.read_scalars(str(out_dir / CELLS[0]), 'train_loss')
  np.testing.assert_array_equal(steps, [10, 20, 30, 40])  # log_every_steps=10, 40 steps
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


def copy_grid(finished, tmp_path):
  """A private copy of the finished grid, so that tests changing it do not affect the others."""
  out_dir = tmp_path / 'grid'
  shutil.copytree(finished[0], out_dir, ignore=shutil.ignore_patterns('jax_cache'))
  return out_dir


def tiny_base():
  return ablation_interactions.get_config('tiny')


@pytest.mark.slow
def test_resume_trains_only_the_unfinished_cell(finished, tmp_path):
  out_dir = copy_grid(finished, tmp_path)
  # As if the run had died after the cell's last checkpoint but before its results.json.
  os.remove(out_dir / CELLS[3] / 'results.json')
  kept = {c: (out_dir / c / 'results.json').read_bytes() for c in CELLS[:3]}
  from dlrm_jax import train  # pylint: disable=g-import-not-at-top
  trained = []

  def spy(config, workdir):
    trained.append(os.path.basename(workdir))
    return train.train_and_evaluate(config, workdir)

  result = ablate.run_ablation(tiny_base(), {'interaction_op': ('dot', 'cat')}, [1, 2],
                               str(out_dir), plots=False, train_fn=spy)
  assert trained == [CELLS[3]]
  assert list(result.cells['trained_now']) == [False, False, False, True]
  for cell, content in kept.items():
    assert (out_dir / cell / 'results.json').read_bytes() == content
  # It resumed from the cell's final checkpoint: no step was retrained, and the evaluation of
  # the restored model reproduces the first one (the same program on the same rows; abs 1e-6
  # for the round trip of the figures through cells.csv's text).
  resumed = result.cells.set_index('cell').loc[CELLS[3]]
  first = pd.read_csv(finished[0] / 'cells.csv').set_index('cell').loc[CELLS[3]]
  assert resumed['steps'] == 40
  assert resumed['eval_auc'] == pytest.approx(first['eval_auc'], abs=1e-6)


def fake_train(fail_at=None, preempt_at=None, eval_fails_at=None, untrained=()):
  """A stand-in for train_and_evaluate: AUC 0.6 + seed / 100 + 0.1 for dot, written as train.py
  writes it; raises at the cell named `fail_at`, as an interrupted grid would stop, at the cell
  named `preempt_at` writes a preempted run's results and raises as train.py does, and at
  `eval_fails_at` the results of a run whose evaluation failed after training. Cells named in
  `untrained` train no step (they were trained before): their rate is NaN, as train.py's."""
  calls = []

  def train_fn(config, workdir):
    name = os.path.basename(workdir)
    if name == fail_at:
      raise KeyboardInterrupt(name)
    if name == preempt_at:
      with open(os.path.join(workdir, 'results.json'), 'w') as f:
        json.dump({'steps': 3, 'preempted_at_step': 3}, f)
      raise checkpoints.Preempted('preemption notice (SIGTERM)')
    if name == eval_fails_at:
      with open(os.path.join(workdir, 'results.json'), 'w') as f:
        json.dump({'steps': 7, 'failed_after_training': 'DataError: eval.csv:9: ...',
                   'train_samples_per_s': 1234.0}, f)
      raise ValueError('eval.csv:9: ...')
    calls.append(name)
    auc = 0.6 + config.seed / 100 + (0.1 if config.interaction_op == 'dot' else 0.0)
    results = {'steps': 7, 'eval_auc': auc, 'eval_logloss': 0.2, 'eval_accuracy': 0.9,
               'train_samples_per_s': float('nan') if name in untrained else 1000.0 * config.seed,
               'oracle_auc': 0.9,
               'oracle_logloss': 0.1, 'train_time_s': 1.0}
    with open(os.path.join(workdir, 'results.json'), 'w') as f:
      json.dump(results, f)
    return results
  return train_fn, calls


def test_interrupted_grid_resumes_where_it_stopped(tmp_path):
  grid, seeds = {'interaction_op': ('dot', 'cat')}, [1, 2, 3]
  crashing, first_calls = fake_train(fail_at='interaction_op-cat_seed-2')
  with pytest.raises(KeyboardInterrupt):
    ablate.run_ablation(tiny_base(), grid, seeds, str(tmp_path), train_fn=crashing,
                        compilation_cache=False)
  assert first_calls == ['interaction_op-dot_seed-1', 'interaction_op-dot_seed-2',
                         'interaction_op-dot_seed-3', 'interaction_op-cat_seed-1']
  resuming, second_calls = fake_train()
  result = ablate.run_ablation(tiny_base(), grid, seeds, str(tmp_path), plots=False,
                               train_fn=resuming, compilation_cache=False)
  assert second_calls == ['interaction_op-cat_seed-2', 'interaction_op-cat_seed-3']
  dot, cat = result.summary.to_dict('records')
  assert dot['eval_auc_mean'] == pytest.approx(0.72) and cat['eval_auc_mean'] == pytest.approx(0.62)
  assert dot['eval_auc_std'] == pytest.approx(0.01)  # sample std of 0.71, 0.72, 0.73
  assert '| dot | 3 | 0.7200 ± 0.0100 | 0.2000 ± 0.0000 | 0.9000 ± 0.0000 | 2,000 ± 1,000 | ' \
         '7 ± 0 | 0.9000 | 0.1000 |' in result.markdown
  # The figure comparing several settings (the README's) takes finished ablations.
  path = ablate.plot_auc_panels({'a': result, 'b': result}, str(tmp_path / 'panels.png'))
  with open(path, 'rb') as f:
    assert f.read().startswith(PNG_MAGIC)


@pytest.mark.parametrize('how', ['preempt_at', 'eval_fails_at'])
def test_a_cell_stopped_by_preemption_or_a_failed_evaluation_runs_again_on_resume(tmp_path, how):
  grid, seeds = {'interaction_op': ('dot', 'cat')}, [1]
  preempted, first_calls = fake_train(**{how: 'interaction_op-cat_seed-1'})
  # The trainer's own message names --config.checkpoint; a grid resumes by its own command.
  expected = ((checkpoints.Preempted, 'stopped after step 3 and checkpointed; the same '
               'experiments.ablate command resumes this cell') if how == 'preempt_at' else
              (ValueError, 'eval.csv:9'))
  with pytest.raises(expected[0], match=expected[1]):
    ablate.run_ablation(tiny_base(), grid, seeds, str(tmp_path), plots=False,
                        train_fn=preempted, compilation_cache=False)
  assert first_calls == ['interaction_op-dot_seed-1']
  # A failed evaluation is redone without a step: the rate is the one the cell trained at.
  resuming, second_calls = fake_train(
      untrained=('interaction_op-cat_seed-1',) if how == 'eval_fails_at' else ())
  base = tiny_base()
  base.checkpoint = '/somewhere/else'  # cells train in their own directories anyway
  result = ablate.run_ablation(base, grid, seeds, str(tmp_path), plots=False,
                               train_fn=resuming, compilation_cache=False)
  assert second_calls == ['interaction_op-cat_seed-1']
  assert list(result.cells['eval_auc']) == pytest.approx([0.71, 0.61])
  assert list(result.cells['train_samples_per_s']) == [
      1000.0, 1234.0 if how == 'eval_fails_at' else 1000.0]


def test_the_grid_compilation_cache_is_the_grids_alone(tmp_path, no_compilation_cache):
  # It stayed on after run_ablation returned (or failed): the caller's later compiles, another
  # grid's included, went into this grid's directory.
  del no_compilation_cache  # used for its effect: a caller with no cache of its own
  import jax  # pylint: disable=g-import-not-at-top
  fake, calls = fake_train()
  seen = []

  def train_fn(config, workdir):
    seen.append(jax.config.jax_compilation_cache_dir)
    return fake(config, workdir)
  ablate.run_ablation(tiny_base(), {'interaction_op': ('dot',)}, [1], str(tmp_path / 'a'),
                      plots=False, train_fn=train_fn)
  assert seen == [str(tmp_path / 'a' / 'jax_cache')] and calls
  assert not jax.config.jax_compilation_cache_dir
  failing, _ = fake_train(fail_at='interaction_op-dot_seed-1')
  with pytest.raises(KeyboardInterrupt):
    ablate.run_ablation(tiny_base(), {'interaction_op': ('dot',)}, [1], str(tmp_path / 'b'),
                        plots=False, train_fn=failing)
  assert not jax.config.jax_compilation_cache_dir


def test_a_bad_value_anywhere_in_the_grid_stops_it_before_the_first_cell(tmp_path):
  train_fn, calls = fake_train()
  with pytest.raises(ValueError, match=r'grid cell learning_rate--0.1_seed-1: bad config: '
                                       r'config.learning_rate=-0.1 must be'):
    ablate.run_ablation(tiny_base(), {'learning_rate': (0.1, -0.1)}, [1, 2], str(tmp_path),
                        plots=False, train_fn=train_fn, compilation_cache=False)
  assert calls == []
  # An optimizer argument that only a later cell's optimizer lacks (found when that cell built
  # its optimizer, after the first cell had trained).
  grid = {'optimizer': ('adamasync', 'adagrad'), 'optimizer_hparams.epsilon': (1e-7,)}
  with pytest.raises(ValueError, match=r"grid cell optimizer-adagrad.*optimizer 'adagrad' "
                                       r'takes no epsilon'):
    ablate.run_ablation(tiny_base(), grid, [1], str(tmp_path / 'hparams'), plots=False,
                        train_fn=train_fn, compilation_cache=False)
  assert calls == []


def test_a_home_relative_out_dir_is_under_the_home_directory(tmp_path):
  # The shell leaves '~' alone in '--out_dir=~/grid': a directory named '~' was made in the
  # working directory. A bad grid value stops the run just after the directory is made.
  home, cwd = tmp_path / 'home', tmp_path / 'cwd'
  home.mkdir()
  cwd.mkdir()
  env = dict(os.environ, HOME=str(home), PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  command = [sys.executable, '-m', 'experiments.ablate',
             f'--config={os.path.join(ROOT, "configs", "ablation_interactions.py")}:tiny',
             '--grid', 'learning_rate=-0.1', '--seeds', '1', '--out_dir=~/grid']
  run = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode != 0 and 'config.learning_rate=-0.1 must be' in run.stderr
  assert not os.listdir(cwd) and (home / 'grid').is_dir()


@pytest.mark.parametrize('args, message', [
    (['--grid', 'interaction_op=dot,cat', '--grid', 'learning_rate=0.1,O.2', '--seeds', '1'],
     "--grid 'learning_rate=0.1,O.2': could not convert string to float: 'O.2'"),
    (['--grid', 'interaction_op=dot,cat', '--seeds', '1,two'], '--seeds=1,two: expected integers')])
def test_a_mistyped_grid_or_seed_is_a_short_error_naming_it(tmp_path, args, message):
  command = [sys.executable, '-m', 'experiments.ablate',
             '--config=configs/ablation_interactions.py:tiny', *args,
             f'--out_dir={tmp_path / "grid"}']
  run = subprocess.run(command, cwd=ROOT, env=command_env(), capture_output=True, text=True,
                       timeout=600, check=False)
  assert run.returncode == 1 and message in run.stderr, run.stderr[-3000:]
  assert 'Traceback' not in run.stderr and not os.path.exists(tmp_path / 'grid')


def test_resume_refuses_an_out_dir_of_another_config(tmp_path):
  grid = {'interaction_op': ('dot',)}
  train_fn, _ = fake_train()
  ablate.run_ablation(tiny_base(), grid, [1], str(tmp_path), plots=False, train_fn=train_fn,
                      compilation_cache=False)
  changed = tiny_base()
  changed.learning_rate = 0.1
  with pytest.raises(ValueError, match='learning_rate'):
    ablate.run_ablation(changed, grid, [1], str(tmp_path), plots=False, train_fn=train_fn,
                        compilation_cache=False)


def test_grid_values_take_the_type_of_their_field():
  config = tiny_base()
  grid = ablate.parse_grid(['interaction_op=dot,cat', 'learning_rate=0.1,1', 'batch_norm=false',
                            'top_mlp=32-16,8', 'planted.interaction_weight=0,3'], config)
  assert grid == {'interaction_op': ('dot', 'cat'), 'learning_rate': (0.1, 1.0),
                  'batch_norm': (False,), 'top_mlp': ((32, 16), (8,)),
                  'planted.interaction_weight': (0.0, 3.0)}
  assert isinstance(grid['learning_rate'][1], float)
  cells = ablate.make_cells(grid, [5])
  assert len(cells) == 2 * 2 * 1 * 2 * 2
  assert cells[0].name == ('interaction_op-dot_learning_rate-0.1_batch_norm-False_top_mlp-32-16_'
                           'planted.interaction_weight-0.0_seed-5')
  config = ablate.cell_config(config, cells[-1], '/out')
  assert config.top_mlp == (8,) and config.planted.interaction_weight == 3.0 and config.seed == 5
  for bad, error, message in (
      ('no_such_field=1', KeyError, "no field 'no_such_field'"),
      ('seed=1,2', ValueError, 'pass --seeds'),
      ('interaction_op', ValueError, 'expected FIELD=VALUE'),
      ('batch_norm=maybe', ValueError, "--grid 'batch_norm=maybe': 'maybe' is not a boolean")):
    with pytest.raises(error, match=re.escape(message)):
      ablate.parse_grid([bad], tiny_base())
  # An unset optimizer argument (a placeholder, None) takes its declared type.
  grid = ablate.parse_grid(['optimizer_hparams.accumulator_decay_step=10,1000',
                            'optimizer_hparams.beta1=0.5'], tiny_base())
  assert grid == {'optimizer_hparams.accumulator_decay_step': (10, 1000),
                  'optimizer_hparams.beta1': (0.5,)}
  cell = ablate.make_cells(grid, [1])[1]
  config = ablate.cell_config(tiny_base(), cell, '/out')
  assert config.optimizer_hparams.accumulator_decay_step == 1000


def test_each_planted_setting_gets_its_own_data_directory():
  a, b = tiny_base(), tiny_base()
  assert ablate.data_dir(a, '/out') == ablate.data_dir(b, '/out')
  b.planted.interaction_weight = 0.0
  assert ablate.data_dir(a, '/out') != ablate.data_dir(b, '/out')


def test_resume_accepts_fields_added_by_a_newer_version(tmp_path):
  grid = {'interaction_op': ('dot',)}
  train_fn, calls = fake_train()
  ablate.run_ablation(tiny_base(), grid, [1], str(tmp_path), plots=False, train_fn=train_fn,
                      compilation_cache=False)
  # The cell was trained before the config gained a field (its default keeps old behaviour).
  path = tmp_path / 'interaction_op-dot_seed-1' / 'cell_config.json'
  recorded = json.loads(path.read_text())
  del recorded['log_every_steps']
  path.write_text(json.dumps(recorded))
  result = ablate.run_ablation(tiny_base(), grid, [1], str(tmp_path), plots=False,
                               train_fn=train_fn, compilation_cache=False)
  assert calls == ['interaction_op-dot_seed-1'] and not result.cells['trained_now'].any()


def test_a_single_seed_shows_no_spread():
  cells = pd.DataFrame([
      {'interaction_op': 'dot', 'variant': 'interaction_op=dot', 'seed': 1, 'eval_auc': 0.71,
       'eval_logloss': 0.2, 'eval_accuracy': 0.9, 'train_samples_per_s': 1000.0, 'steps': 7,
       'oracle_auc': 0.9, 'oracle_logloss': 0.1}])
  summary = ablate.summarize(cells, ['interaction_op'])
  assert np.isnan(summary['eval_auc_std'][0])  # one seed has no sample std, not 0
  table = ablate.markdown_table(summary, ['interaction_op'])
  assert '| dot | 1 | 0.7100 | 0.2000 | 0.9000 | 1,000 | 7 | 0.9000 | 0.1000 |' in table
  assert '±' not in table


def test_each_variant_keeps_its_own_oracle():
  # A grid over a planted field changes the data: each variant's oracle is its own cells'.
  rows = []
  for weight, oracle in ((1.0, 0.8), (2.0, 0.9)):
    for seed in (1, 2):
      rows.append({'planted.interaction_weight': weight,
                   'variant': f'planted.interaction_weight={weight}', 'seed': seed,
                   'eval_auc': oracle - 0.05, 'oracle_auc': oracle,
                   'oracle_logloss': 1 - oracle})
  summary = ablate.summarize(pd.DataFrame(rows), ['planted.interaction_weight'])
  assert list(summary['oracle_auc']) == pytest.approx([0.8, 0.9])
  assert list(summary['oracle_logloss']) == pytest.approx([0.2, 0.1])
