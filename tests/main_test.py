"""`python -m dlrm_jax.main`: the command line itself, in a fresh process."""

import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_main_sets_dispatch_and_joins_a_multi_process_run_before_jax_starts(tmp_path):
  # Both settings only take effect before the process's JAX backend exists: a main that touched
  # JAX first (even to log its devices) would warn about the dispatch and fail to join.
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  workdir = tmp_path / 'run'
  command = [sys.executable, '-m', 'dlrm_jax.main', '--config=configs/default.py:tiny',
             f'--config.output_dir={tmp_path}', f'--workdir={workdir}', '--config.steps=3',
             '--config.no_eval=True', f'--config.distributed.coordinator_address=127.0.0.1:{port}',
             '--config.distributed.num_processes=1', '--config.distributed.process_id=0',
             '--config.distributed.cpu_collectives=True']
  proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert 'has no effect' not in proc.stderr
  with open(workdir / 'results.json') as f:
    results = json.load(f)
  assert results['steps'] == 3
  assert results['cpu_async_dispatch'] is False  # configs/default.py's setting
