"""Smoke test of experiments/memory_benchmark.py (whole trainer runs; memory not asserted)."""

import json
import os
import subprocess
import sys

import pytest

from dlrm_jax import models
from experiments import benchmark
from experiments import memory_benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_memory_runs_report_peak_runtime_and_state(tmp_path):
  out = tmp_path / 'memory.json'
  command = [sys.executable, '-m', 'experiments.memory_benchmark', '--table_rows=small',
             '--rows=1000', '--steps=4', '--optimizers=gradientdescent,adagrad', '--scales=2',
             f'--out={out}']
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  report = json.loads(out.read_text())
  rows = {r['variant']: r for r in report['results']}
  assert set(rows) == {'gradientdescent, save at the end', 'adagrad, save at the end',
                       'gradientdescent, save at the end, then eval',
                       'gradientdescent, tables x2, save at the end'}
  sgd, adagrad = rows['gradientdescent, save at the end'], rows['adagrad, save at the end']
  for row in rows.values():
    assert row['peak_rss_mb'] >= row['runtime_rss_mb'] > 0, row
    assert row['peak_over_state'] == row['peak_rss_mb'] / row['state_mb']
  # Adagrad keeps one accumulator per table element: its state is at least the SGD state plus
  # the tables again (rows padded up, so "at least"), and at most twice the SGD state.
  table_mb = sum(max(2, r // 5000) for r in benchmark.DEEPREC_CRITEO_ROWS) * 16 * 4 / 2**20
  assert sgd['state_mb'] >= table_mb
  # + 1e-6: the MiB figures are float sums, not exact.
  assert sgd['state_mb'] + table_mb <= adagrad['state_mb'] <= 2 * sgd['state_mb'] + 1e-6
  # Twice the rows of every table: the SGD state grows by the tables once more (the fused array
  # is padded to a multiple of 64 rows, so by up to 64 rows more), and the marginal figure is
  # computed from exactly these two runs.
  double = rows['gradientdescent, tables x2, save at the end']
  padding_mb = models.ROW_MULTIPLE * 16 * 4 / 2**20
  assert table_mb - padding_mb <= double['state_mb'] - sgd['state_mb'] <= table_mb + padding_mb
  assert report['marginal']['scale'] == 2
  assert report['marginal']['peak_growth_over_state_growth'] == pytest.approx(
      (double['peak_rss_mb'] - sgd['peak_rss_mb']) / (double['state_mb'] - sgd['state_mb']))


def test_the_trainer_imports_neither_pandas_nor_pyarrow():
  # Together they hold ~64 MiB resident in every training process (pandas imports pyarrow when
  # it is installed, and tensorflow-datasets installs it); the trainer dedups ids with numpy.
  probe = ('import sys; from dlrm_jax import main, train; '
           'print(sorted(m for m in ("pandas", "pyarrow") if m in sys.modules))')
  result = subprocess.run([sys.executable, '-c', probe], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=True)
  assert result.stdout.strip().splitlines()[-1] == '[]', result.stdout + result.stderr


def test_marginal_compares_scale_one_with_the_largest_scale():
  results = [
      {'variant': 'gradientdescent, save at the end', 'table_scale': 1, 'state_mb': 100.0,
       'peak_rss_mb': 900.0, 'runtime_rss_mb': 600.0},
      {'variant': 'gradientdescent, tables x2, save at the end', 'table_scale': 2,
       'state_mb': 200.0, 'peak_rss_mb': 1100.0, 'runtime_rss_mb': 600.0},
      {'variant': 'gradientdescent, tables x3, save at the end', 'table_scale': 3,
       'state_mb': 300.0, 'peak_rss_mb': 1200.0, 'runtime_rss_mb': 600.0},
  ]
  growth = memory_benchmark.marginal(results)
  assert growth['scale'] == 3
  assert growth['peak_growth_over_state_growth'] == pytest.approx((1200 - 900) / (300 - 100))
  # The fixed cost: the peak at scale 1 above its state (runtime included).
  assert growth['fixed_mb'] == pytest.approx(800.0)
  assert memory_benchmark.marginal(results[:1]) is None
