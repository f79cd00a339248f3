"""Smoke test of experiments/step_breakdown.py on tiny sizes (timings not asserted)."""

import json
import math
import os
import subprocess
import sys

import pytest

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
