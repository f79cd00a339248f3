"""Smoke tests of experiments/benchmark.py: its arithmetic, its batches, and a tiny quick run.

Timings are never asserted (this machine's speed changes by 2x from one minute to the next);
only that the report has every expected number, positive and finite.
"""

import dataclasses
import io
import json
import math
import os
import statistics
import subprocess
import sys

from absl import app
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from dlrm_jax import feature_spec as fs  # pylint: disable=wrong-import-position
from experiments import benchmark  # pylint: disable=wrong-import-position


def test_importing_the_benchmark_defines_none_of_its_flags():
  # The TorchRec worker and other scripts import it: its flags came with it, and a script
  # defining a flag of the same name (--torch_threads) crashed at import.
  from absl import flags  # pylint: disable=g-import-not-at-top
  names = {'quick', 'pairs', 'torch_threads', 'worker'}
  before = set(flags.FLAGS)
  assert not names & before
  benchmark.define_flags()  # what running it defines
  try:
    assert names <= set(flags.FLAGS)
  finally:
    for name in set(flags.FLAGS) - before:
      delattr(flags.FLAGS, name)


def test_train_flops_per_sample_from_layer_sizes():
  spec = fs.elm_spec()
  # Forward: bottom 12-512-256-64-16, Gram of 25 vectors of 16, top 316-512-256-1 (dot) or
  # 400-512-256-1 (cat); training is 3x that.
  bottom = 2 * (12 * 512 + 512 * 256 + 256 * 64 + 64 * 16)
  dot = 3 * (bottom + 2 * 25 * 25 * 16 + 2 * (316 * 512 + 512 * 256 + 256))
  cat = 3 * (bottom + 2 * (400 * 512 + 512 * 256 + 256))
  assert benchmark.train_flops_per_sample(spec, (512, 256, 64, 16), (512, 256), 'dot') == dot
  assert benchmark.train_flops_per_sample(spec, (512, 256, 64, 16), (512, 256), 'cat') == cat
  assert dot == pytest.approx(2.75e6, rel=0.01)  # the README's rounded figure
  # dcn: cat's layers plus two products per cross layer, [400 -> 100] and [100 -> 400].
  dcn = cat + 3 * 2 * (2 * 400 * 100 + 2 * 100 * 400)
  assert benchmark.train_flops_per_sample(spec, (512, 256, 64, 16), (512, 256), 'dcn',
                                          dcn_num_layers=2, dcn_low_rank_dim=100) == dcn


def test_synthetic_batches_follow_the_spec_layout():
  spec = fs.elm_spec(hash_buckets=1000, embedding_dim=4, max_list_len=8)
  batches = benchmark.synthetic_batches(spec, batch_size=32, num_batches=2, seed=0)
  assert len(batches) == 2
  batch = batches[0]
  assert batch['ids'].shape == batch['weights'].shape == (32, spec.num_slots)
  assert batch['dense'].shape == (32, spec.num_dense)
  assert batch['label'].shape == batch['mask'].shape == (32,)
  for feature, start in zip(spec.sparse, spec.slot_starts[:-1]):
    window = slice(start, start + feature.max_len)
    ids, weights = batch['ids'][:, window], batch['weights'][:, window]
    assert ids.min() >= 0 and ids.max() < spec.table(feature.table).rows
    if feature.is_list:
      # Mean pooling: every list has at least one value and its weights sum to 1.
      np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-6)
    else:
      assert set(np.unique(weights)) <= {0.0, 1.0}
  # Same seed, same batches: both sides of a comparison train on identical data.
  again = benchmark.synthetic_batches(spec, batch_size=32, num_batches=2, seed=0)
  np.testing.assert_array_equal(again[1]['ids'], batches[1]['ids'])


def test_torchrec_batch_keeps_exactly_the_weighted_slots():
  pytest.importorskip('torchrec')
  from experiments import torchrec_dlrm  # pylint: disable=g-import-not-at-top
  spec = fs.elm_spec(hash_buckets=1000, embedding_dim=4, max_list_len=8)
  batch = benchmark.synthetic_batches(spec, batch_size=16, num_batches=1, seed=1)[0]
  keys = torchrec_dlrm.feature_order(spec)
  assert sorted(keys) == sorted(f.column for f in spec.sparse)
  converted = torchrec_dlrm.to_torch_batch(batch, spec, keys)
  lengths = converted['sparse'].lengths().numpy()
  assert lengths.sum() == np.count_nonzero(batch['weights'])


def _positive_finite(value):
  return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_quick_tiny_run_writes_every_number(tmp_path):
  out = tmp_path / 'benchmark.json'
  command = [sys.executable, '-m', 'experiments.benchmark', '--tiny', '--quick', '--notorchrec',
             '--pairs=2', '--min_time=0.02', f'--json_out={out}',
             # Its own data and compilation cache: nothing left outside tmp_path, and no planted
             # data of another run (or a broken one) read in place of a fresh set.
             f'--data_dir={tmp_path / "data"}', f'--jax_cache_dir={tmp_path / "jax_cache"}']
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240,
                          check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  report = json.loads(out.read_text())
  assert {'machine', 'settings', 'summary', 'groups'} <= set(report)
  groups = {g['name']: g for g in report['groups']}
  assert set(groups) == {'elm_dot_b64', 'rows_elm_dot_b64'}

  rows = {row['label']: row for row in groups['elm_dot_b64']['rows']}
  # One TorchRec worker per OpenMP wait policy (the default two), both skipped here.
  assert 'skipped' in rows['torchrec sgd fp32 passive step']
  assert 'skipped' in rows['torchrec sgd fp32 default step']
  assert set(report['settings']['skipped']) == {'torchrec'}, report['settings']['skipped']
  expected = ['ours fp32 step', 'ours fp32 step+input', 'ours bf16 step',
              'ours fp32 end-to-end', 'ours fp32 end-to-end csv']
  for label in expected:
    row = rows[label]
    for key in ('samples_per_s', 'step_ms', 'ratio_vs_reference', 'flops_per_sample',
                'achieved_flops_per_s', 'ceiling_flops_per_s', 'ceiling_fraction',
                'peak_rss_mb', 'runtime_rss_mb', 'table_state_mb'):
      assert _positive_finite(row[key]), (label, key, row.get(key))
    # The runtime (before the model's first array) is part of the peak, never more.
    assert row['runtime_rss_mb'] < row['peak_rss_mb']
    assert len(row['samples_per_s_rounds']) == 2

  summary = report['summary']
  assert set(summary['matmul_ceiling_flops_per_s']) == {'fp32', 'bf16'}
  assert all(_positive_finite(v) for v in summary['matmul_ceiling_flops_per_s'].values())
  scaling = summary['row_scaling_step_time_ratio']
  assert list(scaling) == ['rows_elm_dot_b64/ours 10,000 rows step']
  assert all(_positive_finite(v) for v in scaling.values())
  assert all(_positive_finite(v) for v in summary['peak_rss_mb'].values())
  assert summary['ours_vs_torchrec'] == {}  # TorchRec was not run


def test_ratios_are_against_the_fastest_wait_policy_in_each_round():
  group = benchmark.build_groups(quick=True, tiny=True)[0]
  group = benchmark.per_wait_policy(group, ['PASSIVE', 'default'])
  labels = [v.label for v in group.variants]
  assert labels[:2] == ['torchrec sgd fp32 passive', 'torchrec sgd fp32 default']
  assert [v.omp_wait_policy for v in group.variants[:2]] == ['PASSIVE', '']
  # Round 1: PASSIVE is faster; round 2: the default policy is. Ours runs at 300/s in both.
  rounds = [{'torchrec sgd fp32 passive': {'rates': {'step': 200.0}},
             'torchrec sgd fp32 default': {'rates': {'step': 100.0}},
             'ours fp32': {'rates': {'step': 300.0}}},
            {'torchrec sgd fp32 passive': {'rates': {'step': 100.0}},
             'torchrec sgd fp32 default': {'rates': {'step': 250.0}},
             'ours fp32': {'rates': {'step': 300.0}}}]
  info = {label: {} for label in labels}
  result = benchmark.summarize_group(group, info, rounds, load=[0.0, 0.0])
  rows = {row['label']: row for row in result['rows']}
  assert result['reference_labels'] == ['torchrec sgd fp32 passive step',
                                        'torchrec sgd fp32 default step']
  assert rows['ours fp32 step']['ratio_rounds'] == pytest.approx([1.5, 1.2])
  assert rows['torchrec sgd fp32 passive step']['ratio_rounds'] == pytest.approx([1.0, 0.4])
  summary = benchmark.summarize([result])
  assert summary['ours_vs_torchrec'] == {
      f'{group.name}/ours fp32 step': pytest.approx(statistics.median([1.5, 1.2]))}
  # One policy: the labels stay as they were.
  single = benchmark.per_wait_policy(benchmark.build_groups(True, True)[0], ['default'])
  assert single.variants[0].label == 'torchrec sgd fp32'
  assert single.variants[0].omp_wait_policy == ''
  with pytest.raises(app.UsageError, match='spin'):
    benchmark.per_wait_policy(group, ['PASSIVE', 'spin'])
  # ACTIVE's threads spin while the other workers are timed: refused.
  with pytest.raises(app.UsageError, match='spinning while the other workers are timed'):
    benchmark.per_wait_policy(group, ['PASSIVE', 'ACTIVE'])


def test_the_default_wait_policy_worker_gets_no_inherited_policy(tmp_path, monkeypatch):
  # A PASSIVE exported in the shell used to make the 'default' twin a second PASSIVE worker.
  monkeypatch.setenv('OMP_WAIT_POLICY', 'PASSIVE')
  envs = {}

  class Process:
    def __init__(self, command, env, **kwargs):
      del command, kwargs
      self.stdin = io.StringIO()
      envs[len(envs)] = env

  monkeypatch.setattr(benchmark.subprocess, 'Popen', Process)
  group = benchmark.per_wait_policy(benchmark.build_groups(quick=True, tiny=True)[0],
                                    ['PASSIVE', 'default'])
  for variant in group.variants[:2]:
    benchmark.Worker(variant, str(tmp_path))
  assert envs[0]['OMP_WAIT_POLICY'] == 'PASSIVE' and 'OMP_WAIT_POLICY' not in envs[1]


def test_calibration_samples_a_quarter_of_min_time():
  # The first two steps after the warm-up take 50 ms each, the rest 10 ms: a two-step sample
  # alone gave 50 ms a step and windows a fifth of min_time long.
  class Runner:
    def __init__(self):
      self.slow = 2

    def time_steps(self, kind, n):
      del kind
      slow, self.slow = min(n, self.slow), max(0, self.slow - n)
      return 0.05 * slow + 0.01 * (n - slow)

  assert benchmark.calibrated_step_time(Runner(), 'step', 0.5) == pytest.approx(0.01)
  assert benchmark.calibrated_step_time(Runner(), 'step', 0.0) == pytest.approx(0.05)


def test_the_ceiling_is_measured_right_after_the_step():
  class Runner:
    def __init__(self):
      self.calls = []

    def time_steps(self, kind, n):
      self.calls.append(kind)
      return {'step': 0.5, 'step+input': 1.0, 'end-to-end': 2.0}[kind] * n / 10

    def extra_measurements(self):
      self.calls.append('ceiling')
      return {'ceiling_fp32_flops': 7.0}

  kinds = ('step', 'step+input', 'end-to-end')
  runner = Runner()
  rates, extra = benchmark.measure_round(runner, kinds, dict.fromkeys(kinds, 10), 4)
  assert runner.calls == ['step', 'ceiling', 'step+input', 'end-to-end']
  assert rates == pytest.approx({'step': 80.0, 'step+input': 40.0, 'end-to-end': 20.0})
  assert extra == {'ceiling_fp32_flops': 7.0}


def test_malloc_arena_max_adds_our_fp32_step_with_the_capped_allocator():
  groups = benchmark.build_groups(quick=False, tiny=True)
  elm, rows = groups[0], [g for g in groups if g.name.startswith('rows_')][0]
  capped = benchmark.with_malloc_arena_max(elm, 2)
  added = capped.variants[len(elm.variants):]
  assert [v.label for v in added] == ['ours fp32 arenas 2']
  ours = [v for v in elm.variants if v.label == 'ours fp32'][0]
  # Only the allocator and what is timed differ from the variant it is compared with.
  assert dataclasses.replace(added[0], label=ours.label, kinds=ours.kinds, env=()) == ours
  assert dict(added[0].env) == {'MALLOC_ARENA_MAX': '2'}
  assert added[0].kinds == ('step', 'step+input')
  assert 'MALLOC_ARENA_MAX=2' in benchmark.describe(added[0])
  # The row-scaling group has no 'ours fp32' and is left as it is.
  assert benchmark.with_malloc_arena_max(rows, 2) == rows


def test_async_dispatch_adds_our_fp32_step_on_xla_pool_threads():
  groups = benchmark.build_groups(quick=False, tiny=True)
  elm, rows = groups[0], [g for g in groups if g.name.startswith('rows_')][0]
  twin = benchmark.with_async_dispatch(elm)
  added = twin.variants[len(elm.variants):]
  assert [v.label for v in added] == ['ours fp32 async dispatch']
  ours = [v for v in elm.variants if v.label == 'ours fp32'][0]
  assert not ours.async_dispatch  # ours runs as the trainer does: steps on the calling thread
  assert dataclasses.replace(added[0], label=ours.label, kinds=ours.kinds,
                             async_dispatch=False) == ours
  assert added[0].kinds == ('step', 'step+input')
  assert 'pool threads' in benchmark.describe(added[0])
  assert 'calling thread' in benchmark.describe(ours)
  config = benchmark.jax_config(dataclasses.asdict(added[0]))
  assert config.cpu_async_dispatch is True
  assert benchmark.with_async_dispatch(rows) == rows


def test_the_dcn_group_runs_both_sides_with_its_cross_layers():
  group, = [g for g in benchmark.build_groups(quick=False, tiny=True) if g.name == 'elm_dcn_b64']
  assert [(v.framework, v.interaction) for v in group.variants] == [('torchrec', 'dcn'),
                                                                      ('jax', 'dcn')]
  assert {(v.dcn_num_layers, v.dcn_low_rank_dim) for v in group.variants} == {(3, 8)}
  config = benchmark.jax_config(dataclasses.asdict(group.variants[1]))
  assert (config.interaction_op, config.dcn_num_layers, config.dcn_low_rank_dim) == ('dcn', 3, 8)
  assert 'rank 8' in group.what


def test_a_full_group_name_selects_that_group_alone():
  groups = benchmark.build_groups(quick=False, tiny=False)
  names = lambda wanted: [g.name for g in benchmark.select_groups(groups, wanted)]
  assert names(['elm_dot_b512']) == ['elm_dot_b512']
  assert names(['elm_dot_b512_adagrad']) == ['elm_dot_b512_adagrad']
  # Anything else is a prefix.
  assert names(['criteo']) == ['criteo_dot_b512', 'criteo_dot_b4096']
  assert names(['elm_dot']) == ['elm_dot_b512', 'elm_dot_b4096', 'elm_dot_b512_adagrad',
                                'elm_dot_b512_rowwise_adagrad']
  with pytest.raises(app.UsageError, match=r"no group matches \['nope'\]"):
    names(['elm_dot_b512', 'nope'])


def test_a_jemalloc_path_that_is_not_there_is_refused(tmp_path):
  # The loader would skip it with a note in a worker's log, and the jemalloc row time glibc.
  missing = str(tmp_path / 'libjemalloc.so.2')
  result = subprocess.run([sys.executable, '-m', 'experiments.benchmark', '--list',
                           f'--jemalloc={missing}'], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)
  assert result.returncode != 0
  assert f'--jemalloc: no file {missing}' in result.stderr


def _elm_group_rounds():
  """The quick tiny ELM group, with two hand-made rounds: TorchRec, ours fp32 (two kinds) and
  ours bf16, each with the ceilings measured in that round."""
  group = benchmark.build_groups(quick=True, tiny=True)[0]
  rounds = [
      {'torchrec sgd fp32': {'rates': {'step': 100.0}},
       'ours fp32': {'rates': {'step': 200.0, 'step+input': 100.0, 'end-to-end': 50.0,
                               'end-to-end csv': 20.0},
                     'ceiling_fp32_flops': 1e9, 'ceiling_bf16_flops': 2e9},
       'ours bf16': {'rates': {'step': 300.0}, 'ceiling_fp32_flops': 1e9,
                     'ceiling_bf16_flops': 2e9}},
      {'torchrec sgd fp32': {'rates': {'step': 200.0}},
       'ours fp32': {'rates': {'step': 600.0, 'step+input': 200.0, 'end-to-end': 150.0,
                               'end-to-end csv': 60.0},
                     'ceiling_fp32_flops': 4e9, 'ceiling_bf16_flops': 8e9},
       'ours bf16': {'rates': {'step': 500.0}, 'ceiling_fp32_flops': 4e9,
                     'ceiling_bf16_flops': 8e9}},
  ]
  info = {v.label: {} for v in group.variants}
  result = benchmark.summarize_group(group, info, rounds, load=[0.0, 0.0])
  return group, rounds, {row['label']: row for row in result['rows']}, result


def test_step_time_and_flops_follow_the_median_rate():
  group, _, rows, _ = _elm_group_rounds()
  ours = [v for v in group.variants if v.label == 'ours fp32'][0]
  row = rows['ours fp32 step']
  assert row['samples_per_s'] == statistics.median([200.0, 600.0]) == 400.0
  # One step is batch_size samples: ms per step, not per sample.
  assert row['step_ms'] == pytest.approx(1e3 * ours.batch_size / 400.0)
  assert row['achieved_flops_per_s'] == pytest.approx(row['flops_per_sample'] * 400.0)


def test_ratio_to_own_step_is_the_kind_over_the_step_per_round():
  _, _, rows, _ = _elm_group_rounds()
  # step+input runs at 1/2 and 1/3 of the step: median 5/12, below 1 (it is slower).
  assert rows['ours fp32 step+input']['ratio_vs_own_step'] == pytest.approx(
      statistics.median([100 / 200, 200 / 600]))
  assert rows['ours fp32 end-to-end']['ratio_vs_own_step'] == pytest.approx(0.25)


def test_ceiling_share_pairs_each_round_with_its_own_ceiling_and_dtype():
  _, _, rows, _ = _elm_group_rounds()
  fp32 = rows['ours fp32 step']
  flops = fp32['flops_per_sample']
  # Per round: rate x flops over that round's ceiling; the rounds' ceilings differ 4x.
  assert fp32['ceiling_fraction'] == pytest.approx(
      statistics.median([flops * 200 / 1e9, flops * 600 / 4e9]))
  # Another kind's share uses its own rate, not the step's.
  assert rows['ours fp32 step+input']['ceiling_fraction'] == pytest.approx(
      statistics.median([flops * 100 / 1e9, flops * 200 / 4e9]))
  # bf16 compute is held against the bf16 ceiling, not the fp32 one.
  bf16 = rows['ours bf16 step']
  assert bf16['ceiling_fraction'] == pytest.approx(
      statistics.median([flops * 300 / 2e9, flops * 500 / 8e9]))
  assert bf16['ceiling_flops_per_s'] == pytest.approx(statistics.median([2e9, 8e9]))


def test_row_scaling_reports_step_time_over_the_smallest_tables():
  group = [g for g in benchmark.build_groups(quick=True, tiny=True)
           if g.name.startswith('rows_')][0]
  small, big = [v.label for v in group.variants]
  # The bigger tables run at half the samples/s: their step takes twice as long.
  rounds = [{small: {'rates': {'step': 400.0}}, big: {'rates': {'step': 200.0}}}] * 3
  result = benchmark.summarize_group(group, {small: {}, big: {}}, rounds, load=[0.0] * 3)
  summary = benchmark.summarize([result])
  assert summary['row_scaling_step_time_ratio'] == {
      f'{group.name}/{big} step': pytest.approx(2.0)}


def test_table_state_counts_adagrad_slots():
  group = benchmark.build_groups(quick=False, tiny=True)
  adagrad = [g for g in group if g.name.endswith('_adagrad')]
  assert [g.name for g in adagrad] == ['elm_dot_b64_adagrad', 'elm_dot_b64_rowwise_adagrad']
  spec = benchmark.make_spec(dataclasses.asdict(adagrad[0].variants[0]))
  weights = spec.total_rows * spec.embedding_dim * 4
  by_label = {v.label: v for g in adagrad for v in g.variants}
  assert benchmark.table_state_bytes(spec, by_label['ours adagrad']) == 2 * weights
  assert benchmark.table_state_bytes(spec, by_label['torchrec adagrad']) == 2 * weights
  for label in ('torchrec rowwise_adagrad', 'ours rowwise_adagrad'):  # a float per row
    assert benchmark.table_state_bytes(spec, by_label[label]) == weights + spec.total_rows * 4
  assert [v.optimizer for v in adagrad[1].variants] == ['rowwise_adagrad'] * 2
  sgd = benchmark.build_groups(quick=True, tiny=True)[0].variants[1]
  assert benchmark.table_state_bytes(spec, sgd) == weights


def test_peak_memory_is_vmhwm_in_mib(monkeypatch):
  status = 'Name:\tpython\nVmPeak:\t 9999 kB\nVmHWM:\t    3072 kB\nVmRSS:\t    1024 kB\n'
  monkeypatch.setattr(benchmark, 'open', lambda *a, **k: io.StringIO(status), raising=False)
  assert benchmark.peak_rss_mb() == 3.0
  assert benchmark.rss_mb() == 1.0


def test_memory_ratios_and_the_printed_spread():
  _, _, rows, result = _elm_group_rounds()
  for row in result['rows']:
    row.update(peak_rss_mb=1500.0, runtime_rss_mb=500.0, table_state_mb=1000.0)
  m = benchmark.memory_ratios(result)['ours fp32']
  assert m['peak_over_state'] == 1.5 and m['above_runtime_over_state'] == 1.0
  # The printed (min-max) of the per-round ratios, whatever their order.
  rows['ours fp32 step']['ratio_rounds'] = [1.5, 1.2, 1.3]
  table = benchmark.format_table([result], benchmark.summarize([result]))
  line = [l for l in table.splitlines() if l.startswith('ours fp32 step ')][0]
  assert '(1.20-1.50)' in line
  assert 'peak 1500 MiB = 1.50x its tables' in table
  assert '1.00x above the 500 MiB' in table


def test_ours_vs_torchrec_lists_only_our_rows():
  # A second TorchRec configuration in a group (here added to the Adagrad one) is outside the
  # reference and not ours.
  group = [g for g in benchmark.build_groups(quick=False, tiny=True)
           if g.name.endswith('_adagrad')][0]
  extra = dataclasses.replace(group.variants[0], label='torchrec rowwise_adagrad',
                              table_optimizer='rowwise_adagrad')
  group = dataclasses.replace(group, variants=group.variants[:1] + (extra,) + group.variants[1:])
  labels = [v.label for v in group.variants]
  assert labels == ['torchrec adagrad', 'torchrec rowwise_adagrad', 'ours adagrad']
  rounds = [{'torchrec adagrad': {'rates': {'step': 100.0}},
             'torchrec rowwise_adagrad': {'rates': {'step': 150.0}},
             'ours adagrad': {'rates': {'step': 300.0, 'step+input': 250.0}}}] * 2
  result = benchmark.summarize_group(group, {l: {} for l in labels}, rounds, load=[0.0] * 2)
  summary = benchmark.summarize([result])
  assert summary['ours_vs_torchrec'] == {
      f'{group.name}/ours adagrad step': pytest.approx(3.0),
      f'{group.name}/ours adagrad step+input': pytest.approx(2.5)}


def _summarized_with_made_up_rates(name_end, policies=None):
  group = [g for g in benchmark.build_groups(quick=False, tiny=True)
           if g.name.endswith(name_end)][0]
  if policies:
    group = benchmark.per_wait_policy(group, policies)
  labels = [v.label for v in group.variants]
  rounds = [{l: {'rates': {'step': 100.0 * (i + 1), 'step+input': 90.0}}
             for i, l in enumerate(labels)}] * 2
  return group, benchmark.summarize_group(group, {l: {} for l in labels}, rounds, load=[0.0] * 2)


def test_a_dcn_rows_flops_count_its_cross_layers():
  group, result = _summarized_with_made_up_rates('_dcn_b64')
  v = group.variants[0]
  spec = benchmark.make_spec(dataclasses.asdict(v))
  want = benchmark.train_flops_per_sample(spec, v.bottom_mlp, v.top_mlp, 'dcn', 3, 8)
  assert want > benchmark.train_flops_per_sample(spec, v.bottom_mlp, v.top_mlp, 'cat')
  assert {r['flops_per_sample'] for r in result['rows']} == {want}


def test_the_label_column_fits_the_longest_label_in_any_row_and_skipped_rows_too():
  # 'torchrec rowwise_adagrad passive step' is 37 characters: it pushed its row's figures right
  # of the header's columns.
  group, result = _summarized_with_made_up_rates('_rowwise_adagrad', ['PASSIVE', 'default'])
  result = dict(result, rows=sorted(result['rows'], key=lambda r: len(r['label'])))
  result['rows'][0] = dict(result['rows'][0], samples_per_s=None, skipped='not here')
  width = max(len(r['label']) for r in result['rows'])
  assert width > 32
  table = benchmark.format_table([result], benchmark.summarize([result])).splitlines()
  start = table.index([l for l in table if l.startswith('== ')][0]) + 1
  header, skipped = table[start], table[start + 1]
  assert header.index('samples/s') == width + 2
  assert skipped.index(' -- ') == width
