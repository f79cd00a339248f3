"""Smoke test of experiments/devices_benchmark.py on two device counts (timings not asserted)."""

import io
import json
import os
import subprocess
import sys

import pytest

from experiments import devices_benchmark

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


def test_ratio_is_the_median_of_each_rounds_ratio_to_the_first_count(tmp_path, monkeypatch):
  # samples/s per round: 1 device 100 then 300 (the machine sped up), 2 devices 100 then 100.
  rates = {1: [100.0, 300.0], 2: [100.0, 100.0]}

  class Stdin:
    def write(self, text):
      pass

    def flush(self):
      pass

    def close(self):
      pass

  class Process:
    def __init__(self, command, env, **kwargs):
      del command, kwargs
      n = int(env['XLA_FLAGS'].rsplit('=', 1)[1])
      self.stdin = Stdin()
      self.stdout = io.StringIO('READY\n' + ''.join(f'{json.dumps(r)}\n' for r in rates[n]))

    def wait(self):
      return 0

  monkeypatch.setattr(devices_benchmark.subprocess, 'Popen', Process)
  out = tmp_path / 'devices.json'
  monkeypatch.setattr(sys, 'argv', ['devices_benchmark', '--devices=1,2', '--rounds=2',
                                    f'--json_out={out}'])
  devices_benchmark.main()
  rows = json.loads(out.read_text())
  assert rows['1'] == {'samples_per_s': 200.0, 'ratio': 1.0}
  assert rows['2']['samples_per_s'] == 100.0
  # Per round 1 and 1/3: median 2/3 (not 100 / 200, the ratio of the medians).
  assert rows['2']['ratio'] == pytest.approx(2 / 3)
