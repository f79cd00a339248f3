"""Smoke tests of experiments/data_benchmark.py's transfer and npy measurements (timings not
asserted)."""

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def benchmark_results(tmp_path, formats, only):
  """results.json of a 2000-row data_benchmark run of `only` on `formats`."""
  command = [sys.executable, '-m', 'experiments.data_benchmark', f'--out_dir={tmp_path}',
             '--rows=2000', f'--formats={formats}', f'--only={only}', '--rss_rows=']
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return json.loads((tmp_path / 'results.json').read_text())


def test_transfer_measurement_reports_both_ways(tmp_path):
  transfer = benchmark_results(tmp_path, 'elm', 'transfer')['elm/transfer']
  assert set(transfer) == {'numpy_into_jit_ms_per_batch', 'device_put_then_jit_ms_per_batch',
                           'device_put_over_numpy'}
  assert all(math.isfinite(v) and v > 0 for v in transfer.values()), transfer


def test_torchrec_npy_first_pass_caches_every_row(tmp_path):
  npy = benchmark_results(tmp_path, 'criteo', 'npy')['criteo/torchrec_npy_first_pass']
  assert npy['rows'] == 2000 and npy['rows_per_s'] > 0, npy
  assert not os.path.exists(tmp_path / 'cache_npy')  # the measurement's cache is removed
