"""Smoke test of experiments/data_benchmark.py's transfer measurement (timings not asserted)."""

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_transfer_measurement_reports_both_ways(tmp_path):
  command = [sys.executable, '-m', 'experiments.data_benchmark', f'--out_dir={tmp_path}',
             '--rows=2000', '--formats=elm', '--only=transfer', '--rss_rows=']
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  transfer = json.loads((tmp_path / 'results.json').read_text())['elm/transfer']
  assert set(transfer) == {'numpy_into_jit_ms_per_batch', 'device_put_then_jit_ms_per_batch',
                           'device_put_over_numpy'}
  assert all(math.isfinite(v) and v > 0 for v in transfer.values()), transfer
