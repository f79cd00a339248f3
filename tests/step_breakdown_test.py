"""Smoke test of experiments/step_breakdown.py on tiny sizes (timings not asserted)."""

import json
import math
import os
import subprocess
import sys

import pytest

from experiments import step_breakdown

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.parametrize('bf16', [False, True])
def test_breakdown_reports_every_program_against_the_step(tmp_path, bf16):
  out = tmp_path / 'breakdown.json'
  command = [sys.executable, '-m', 'experiments.step_breakdown', '--tiny', '--batches=64',
             '--rounds=2', '--min_time=0.02', f'--json_out={out}'] + (['--bf16'] if bf16 else [])
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert ('bf16 SGD' if bf16 else 'fp32 SGD') in result.stdout
  rows = json.loads(out.read_text())['results']['dot_b64_bf16' if bf16 else 'dot_b64']
  assert set(rows) == {'step', 'dense model', 'dense model, no batch norm', 'MLPs alone'}
  assert rows['step']['of_step'] == 1.0  # every round's step over itself
  assert all(math.isfinite(r['ms']) and r['ms'] > 0 and r['of_step'] > 0
             for r in rows.values()), rows


def test_of_step_is_the_median_of_each_rounds_ratio(monkeypatch):
  clock = [0.0]
  monkeypatch.setattr(step_breakdown.time, 'perf_counter', lambda: clock[0])

  def runner(round_costs):
    """A program whose call costs round_costs[i] seconds in round i (1 ms before the rounds)."""
    timed = []

    def run(n):
      if n >= 3:  # a round's measurement (calibration gives n = 3 below)
        clock[0] += n * round_costs[len(timed)]
        timed.append(n)
      else:
        clock[0] += n * 1e-3
    return run

  # The machine runs 3x slower in round 2 for the step only: ratios 1 and 1/3.
  run = {'step': runner([1e-3, 3e-3]), 'dense model': runner([1e-3, 1e-3])}
  rows = step_breakdown.measure(run, rounds=2, min_time=0.0025)
  assert rows['step'] == {'ms': pytest.approx(2.0), 'of_step': 1.0}
  assert rows['dense model']['ms'] == pytest.approx(1.0)
  # The median of the per-round ratios (2/3), not the ratio of the medians (1/2).
  assert rows['dense model']['of_step'] == pytest.approx(2 / 3)
