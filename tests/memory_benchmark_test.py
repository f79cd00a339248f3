"""Smoke test of experiments/memory_benchmark.py (whole trainer runs; memory not asserted)."""

import json
import os
import subprocess
import sys

from experiments import benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_memory_runs_report_peak_runtime_and_state(tmp_path):
  out = tmp_path / 'memory.json'
  command = [sys.executable, '-m', 'experiments.memory_benchmark', '--table_rows=small',
             '--rows=1000', '--steps=4', '--optimizers=gradientdescent,adagrad', f'--out={out}']
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  rows = {r['variant']: r for r in json.loads(out.read_text())['results']}
  assert set(rows) == {'gradientdescent, save at the end', 'adagrad, save at the end',
                       'gradientdescent, save at the end, then eval'}
  sgd, adagrad = rows['gradientdescent, save at the end'], rows['adagrad, save at the end']
  for row in rows.values():
    assert row['peak_rss_mb'] >= row['runtime_rss_mb'] > 0, row
    assert row['peak_over_state'] == row['peak_rss_mb'] / row['state_mb']
  # Adagrad keeps one accumulator per table element: its state is at least the SGD state plus
  # the tables again (rows padded up, so "at least"), and at most twice the SGD state.
  table_mb = sum(max(2, r // 5000) for r in benchmark.DEEPREC_CRITEO_ROWS) * 16 * 4 / 2**20
  assert sgd['state_mb'] >= table_mb
  assert sgd['state_mb'] + table_mb <= adagrad['state_mb'] <= 2 * sgd['state_mb'] + 1e-6
