"""Smoke test of experiments/devices_benchmark.py on two device counts (timings not asserted)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(tmp_path, devices):
  out = tmp_path / 'devices.json'
  command = [sys.executable, '-m', 'experiments.devices_benchmark', f'--devices={devices}',
             '--rounds=2', '--steps=2', f'--json_out={out}']
  return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                        check=False), out


@pytest.mark.slow
def test_every_device_count_is_measured_against_the_first(tmp_path):
  result, out = _run(tmp_path, '1,2')
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  rows = json.loads(out.read_text())
  assert set(rows) == {'1', '2'}
  assert rows['1']['ratio'] == 1.0  # each round's first count over itself
  assert all(r['samples_per_s'] > 0 and r['ratio'] > 0 for r in rows.values()), rows


@pytest.mark.slow
def test_a_worker_that_cannot_start_says_why(tmp_path):
  # 512 rows do not split over 3 devices: the worker's own error reaches the caller.
  result, _ = _run(tmp_path, '3')
  assert result.returncode != 0
  assert 'config.batch_size=512 does not split over the 3 devices' in result.stderr, \
      result.stderr[-3000:]
