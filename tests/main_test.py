"""`python -m dlrm_jax.main`: the command line itself, in fresh processes."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

from absl import app
import numpy as np
import pytest

from configs import default
from dlrm_jax import checkpoints
from dlrm_jax import cli
from dlrm_jax import feature_spec
from dlrm_jax import input_pipeline
from dlrm_jax import serving
import train_helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS='cpu')
MANY_STEPS = 100000  # more than a test waits for: the run ends only by its SIGTERM


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _command(tmp_path, steps, *extra):
  return [sys.executable, '-m', 'dlrm_jax.main', '--config=configs/default.py:tiny',
          f'--config.output_dir={tmp_path}', f'--workdir={tmp_path / "run"}',
          f'--config.steps={steps}', '--config.log_every_steps=50', *extra]


def _distributed(port, num_processes, process_id):
  return [f'--config.distributed.coordinator_address=127.0.0.1:{port}',
          f'--config.distributed.num_processes={num_processes}',
          f'--config.distributed.process_id={process_id}',
          '--config.distributed.cpu_collectives=True']


def _start(command, log_path, env=ENV):
  with open(log_path, 'w') as log:  # the child keeps its own descriptor
    return subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)


def _read(path):
  with open(path) as f:
    return f.read()


def _wait_for_training(log_path, seconds=300):
  deadline = time.monotonic() + seconds
  while time.monotonic() < deadline:
    if f'training to step {MANY_STEPS}' in _read(log_path):
      time.sleep(2)  # some steps in
      return
    time.sleep(0.2)
  raise AssertionError(f'training never started: {_read(log_path)[-3000:]}')


def _main_patched(patch: str) -> str:
  """A `python -c` script: `patch` (Python source), then dlrm_jax.main with the arguments."""
  return patch + ('\nimport runpy, sys\nsys.argv = ["main"] + sys.argv[1:]\n'
                  'runpy.run_module("dlrm_jax.main", run_name="__main__")\n')


def _two_processes(tmp_path, name, steps, *extra, devices=1, sigterm_to=None,
                   signum=signal.SIGTERM, timeout=300, script=None):
  """main in two processes of `devices` CPU devices each: their exit codes and logs. With
  `sigterm_to`, that process gets `signum` once training has started; with `script`, each runs
  that `python -c` script (`_main_patched`) instead. Processes still running after `timeout`
  seconds fail the test (subprocess.TimeoutExpired): a hang."""
  port = _free_port()
  env = dict(ENV, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  logs = [tmp_path / f'{name}{pid}.txt' for pid in (0, 1)]
  commands = [_command(tmp_path, steps, *extra, *_distributed(port, 2, pid)) for pid in (0, 1)]
  if script is not None:
    commands = [[sys.executable, '-c', script, *command[3:]] for command in commands]
  procs = [_start(command, log, env) for command, log in zip(commands, logs)]
  try:
    if sigterm_to is not None:
      _wait_for_training(logs[sigterm_to])
      procs[sigterm_to].send_signal(signum)
    codes = [p.wait(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      p.kill()
  return codes, [_read(path) for path in logs]


def _results(tmp_path):
  with open(tmp_path / 'run' / 'results.json') as f:
    return json.load(f)


def _latest_checkpoint(tmp_path):
  saved = [int(name) for name in os.listdir(tmp_path / 'run' / 'checkpoints') if name.isdigit()]
  return max(saved)


@pytest.mark.slow
def test_main_sets_dispatch_and_joins_a_multi_process_run_before_jax_starts(tmp_path):
  # Both settings only take effect before the process's JAX backend exists: a main that touched
  # JAX first (even to log its devices) would warn about the dispatch and fail to join.
  command = _command(tmp_path, 3, '--config.no_eval=True', *_distributed(_free_port(), 1, 0))
  proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert 'has no effect' not in proc.stderr
  results = _results(tmp_path)
  assert results['steps'] == 3
  assert results['cpu_async_dispatch'] is False  # configs/default.py's setting


@pytest.mark.parametrize('command', [['dlrm_jax.main'], ['dlrm_jax.planner', '--devices=1'],
                                     ['experiments.ablate', '--out_dir=ablation'],
                                     ['dlrm_jax.data_sources']])
def test_config_flag_mistakes_are_short_errors_naming_the_flag(tmp_path, command):
  # ml_collections raised both as tracebacks of its and absl's internals: a config file that
  # does not load (at the config's first use), and an override of a field it does not have.
  missing = tmp_path / 'configs' / 'defualt.py'
  default = os.path.join(ROOT, 'configs', 'default.py')
  flagfile = tmp_path.parent / f'{tmp_path.name}.flags'
  flagfile.write_text(f'--config={default}:tiny\n--config.eval_every=3\n')
  cases = [([f'--config={missing}:tiny'], 'FATAL Flags parsing error: --config: cannot load the '
            f'config file:\n  Attempted [Relative path]:\n    {missing}\n'),
           ([f'--config={missing}', '--config.steps=3'], str(missing)),
           ([f'--config={default}:tiny', '--config.eval_every=3'],
            "FATAL Flags parsing error: flag --config.eval_every=3: the config has no field "
            '\'eval_every\'. Did you mean "eval_every_steps" instead of "eval_every"?\n'),
           ([f'--config={default}:tiny', '--config.optimizer_hparams.nosuch', '3'],
            "flag --config.optimizer_hparams.nosuch: the config has no field 'nosuch'\n"),
           # The override that fails, not the first naming the field; absl's other forms.
           ([f'--config={default}:tiny', '--config.seed=1', '--config.optimizer_hparams.seed=2'],
            "flag --config.optimizer_hparams.seed=2: the config has no field 'seed'\n"),
           ([f'--config={default}:tiny', '--noconfig.no_evalx'],
            "flag --noconfig.no_evalx: the config has no field 'no_evalx'. Did you mean"),
           ([f'--config={default}:tiny', '--config.bottom_mlp[0]=32', '--config.eval_every=3'],
            "flag --config.eval_every=3: the config has no field 'eval_every'. Did you mean"),
           ([f'--config={default}:tiny', '--config.mesh_shape[5]=1'],
            'flag --config.mesh_shape[5]=1: tuple index out of range\n'),
           # absl reads a --flagfile's flags inside its parser, so they are not in argv.
           ([f'--flagfile={flagfile}'],
            "flag --config.eval_every=3: the config has no field 'eval_every'. Did you mean"),
           # Two run directories: --workdir won, and the checkpoint to resume went unused.
           ([f'--config={default}:tiny', f'--config.checkpoint={tmp_path}/a',
             f'--workdir={tmp_path}/b'], f'--workdir={tmp_path}/b and --config.checkpoint='
            f'{tmp_path}/a name two run directories')]
  if command != ['dlrm_jax.main']:
    # The parsing is shared: this checks the wiring (a config that does not load, a bad field).
    cases = [cases[0], cases[2]]
  for args, said in cases:
    proc = subprocess.run([sys.executable, '-m', *command, *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600,
                          env=dict(ENV, PYTHONPATH=ROOT))
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert said in proc.stderr and 'Traceback' not in proc.stderr, proc.stderr[-4000:]
    assert not os.listdir(tmp_path)


def test_a_home_relative_path_after_an_equals_sign_is_the_home_directory(tmp_path):
  # The shell leaves '~' alone in '--workdir=~/run': a directory named '~' was made in the
  # working directory, the run and its export in it.
  home, cwd = tmp_path / 'home', tmp_path / 'cwd'
  home.mkdir()
  cwd.mkdir()
  env = dict(ENV, HOME=str(home), PYTHONPATH=ROOT)
  command = [sys.executable, '-m', 'dlrm_jax.main',
             f'--config={os.path.join(ROOT, "configs", "default.py")}:tiny', '--workdir=~/run',
             '--config.output_dir=~/out', '--config.export_dir=~/serving', '--config.steps=3',
             '--config.no_eval=True']
  proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
  assert proc.returncode == 0, proc.stderr[-4000:]
  datagen = [sys.executable, '-m', 'dlrm_jax.datagen', 'elm', '--out_dir=~/planted',
             '--train_rows=50', '--eval_rows=20']
  proc = subprocess.run(datagen, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
  assert proc.returncode == 0, proc.stderr[-4000:]
  prepare = [sys.executable, '-m', 'dlrm_jax.data_sources',
             f'--config={os.path.join(ROOT, "configs", "default.py")}:tiny',
             '--config.data_location=~/planted', '--config.cache_dir=~/cache']
  proc = subprocess.run(prepare, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert not os.listdir(cwd)
  assert (home / 'run' / 'results.json').exists() and (home / 'serving' / 'spec.json').exists()
  assert (home / 'planted' / 'train.csv').exists() and os.listdir(home / 'cache')


@pytest.mark.slow
@pytest.mark.parametrize('signum,said', [(signal.SIGTERM, 'preemption notice (SIGTERM)'),
                                         (signal.SIGINT, 'Ctrl-C (SIGINT)')])
def test_sigterm_or_ctrl_c_checkpoints_the_current_step_then_a_rerun_resumes(tmp_path, signum,
                                                                            said):
  log_path = tmp_path / 'log.txt'
  proc = _start(_command(tmp_path, MANY_STEPS), log_path)
  _wait_for_training(log_path)
  proc.send_signal(signum)
  assert proc.wait(timeout=120) == 1
  log = _read(log_path)
  assert f'{said}: stopped after step' in log, log[-3000:]
  assert 'Traceback' not in log, log[-3000:]
  results = _results(tmp_path)
  assert results['preempted_by'] == signal.Signals(signum).name
  stopped = results['preempted_at_step']
  assert 0 < stopped < MANY_STEPS
  assert results['steps'] == results['last_checkpoint_step'] == stopped
  assert _latest_checkpoint(tmp_path) == stopped
  assert 'eval_auc' not in results  # stopping does not evaluate

  rerun = subprocess.run(_command(tmp_path, stopped + 3), cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env=ENV)
  assert rerun.returncode == 0, rerun.stderr[-4000:]
  assert f'training to step {stopped + 3} from step {stopped}' in rerun.stderr
  results = _results(tmp_path)
  assert results['steps'] == stopped + 3 and 'preempted_at_step' not in results
  assert 'eval_auc' in results


@pytest.mark.slow
@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT], ids=['SIGTERM', 'SIGINT'])
def test_a_signal_to_one_process_stops_every_process_at_one_checkpointed_step(tmp_path, signum):
  # JAX's preemption service catches SIGTERM once a process has joined a multi-process run;
  # without asking it, the run would ignore the signal. It takes no SIGINT: a Ctrl-C used to
  # kill the processes mid-step. Only one process gets the signal: process 1 SIGTERM, process 0
  # (which writes the results) the Ctrl-C.
  to = 1 if signum == signal.SIGTERM else 0
  codes, texts = _two_processes(tmp_path, 'log', MANY_STEPS, sigterm_to=to, signum=signum)
  assert codes == [1, 1], [t[-3000:] for t in texts]
  steps = {t.split('stopped after step ')[1].split()[0] for t in texts}
  assert len(steps) == 1, steps  # the same step on both
  stopped = int(steps.pop())
  assert _latest_checkpoint(tmp_path) == stopped
  assert _results(tmp_path)['preempted_at_step'] == stopped
  assert _results(tmp_path)['preempted_by'] == signal.Signals(signum).name
  if signum == signal.SIGINT:
    return

  # The same two processes evaluate the checkpoint; only process 0 writes the results.
  codes, texts = _two_processes(tmp_path, 'eval', MANY_STEPS, '--config.mode=eval')
  assert codes == [0, 0], [t[-3000:] for t in texts]
  with open(tmp_path / 'run' / 'eval_results.json') as f:
    assert json.load(f)['steps'] == stopped
  assert not os.path.exists(tmp_path / 'run' / 'eval_results_history.jsonl')


@pytest.mark.slow
def test_processes_started_seconds_apart_share_the_default_run_directory(tmp_path):
  # Without --workdir each process names model_DLRM_<timestamp> from its own clock; process 1
  # starts in a later second and must still join process 0's directory.
  port = _free_port()
  logs = [tmp_path / f'log{pid}.txt' for pid in (0, 1)]
  procs = []
  try:
    for pid, log in enumerate(logs):
      command = [sys.executable, '-m', 'dlrm_jax.main', '--config=configs/default.py:tiny',
                 f'--config.output_dir={tmp_path}', '--config.steps=3', '--config.no_eval=True',
                 *_distributed(port, 2, pid)]
      procs.append(_start(command, log))
      time.sleep(1.5 if pid == 0 else 0)
    codes = [p.wait(timeout=300) for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert codes == [0, 0], [_read(log)[-3000:] for log in logs]
  runs = [name for name in os.listdir(tmp_path) if name.startswith('model_DLRM_')]
  assert len(runs) == 1, runs
  with open(tmp_path / runs[0] / 'results.json') as f:
    assert json.load(f)['steps'] == 3


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_preemption_notices_take_signals_only_inside_the_block(signum):
  before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  with checkpoints.preemption_notices() as stop:
    assert not stop(1)
    os.kill(os.getpid(), signum)
    deadline = time.monotonic() + 10
    while not stop(2) and time.monotonic() < deadline:
      time.sleep(0.01)
    assert stop(2) == signal.Signals(signum).name
    if signum == signal.SIGINT:  # a second Ctrl-C aborts at once
      with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
  assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.slow
def test_bad_rows_in_one_processs_share_stop_both_or_are_counted_over_both(tmp_path):
  # Each process parses every second line: the bad rows at the even lines are process 1's
  # alone. Process 0 used to wait in its next collective while process 1 waited in JAX's
  # shutdown barrier, for 5 minutes, and then both aborted; with skip_bad_rows, results.json
  # counted process 0's rows only.
  planted = train_helpers.planted_dir(tmp_path / 'planted')
  data = tmp_path / 'data'
  data.mkdir()
  shutil.copy(os.path.join(planted, 'train.csv'), data / 'train.csv')
  with open(os.path.join(planted, 'eval.csv')) as f:
    good = f.read().splitlines()[:20]
  (data / 'eval.csv').write_text(''.join(f'{line}\n1,2,3\n' for line in good))
  common = (f'--config.data_location={data}', '--config.batch_size=64')
  # The hang ended after JAX's 5-minute shutdown barrier: a shorter wait tells it apart.
  codes, logs = _two_processes(tmp_path, 'strict', 3, *common, timeout=150)
  assert codes[0] != 0 and codes[1] != 0, codes
  assert 'eval.csv:2: column' in logs[1]
  assert 'failed on process 1: its log says why' in logs[0]
  assert not os.path.exists(tmp_path / 'run' / 'results.json')
  shutil.rmtree(tmp_path / 'run')
  # Parsing as it goes (no row cache): found in the first eval batch, read before training.
  codes, logs = _two_processes(tmp_path, 'csv', 3, *common, '--config.use_cache=False',
                               timeout=150)
  assert codes[0] != 0 and codes[1] != 0, codes
  assert 'eval.csv:2: column' in logs[1]
  assert 'reading the eval rows of' in logs[0] and 'failed on process 1' in logs[0]
  shutil.rmtree(tmp_path / 'run')
  codes, logs = _two_processes(tmp_path, 'skip', 3, *common, '--config.skip_bad_rows=True')
  assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
  results = _results(tmp_path)
  assert results['eval_num_examples'] == 20 and results['bad_rows'] == 20
  assert results['parse_stats']['bad_row_examples'][-1].startswith('and bad rows on process 1')


@pytest.mark.slow
def test_a_refusal_on_one_process_before_training_stops_every_process_at_once(tmp_path):
  # Process 0 alone takes the run directory's lock and checks export_dir. Refused, it waited in
  # JAX's 5-minute shutdown barrier while process 1 waited in its next collective, and then
  # both aborted with "Shutdown barrier has failed"; now both stop, process 1 naming the error.
  with checkpoints.training_lock(str(tmp_path / 'run')):
    codes, logs = _two_processes(tmp_path, 'locked', 3, timeout=150)
  assert codes[0] != 0 and codes[1] != 0, codes
  assert 'RunDirectoryInUse' in logs[0], logs[0][-3000:]
  assert ("taking the run directory's lock failed on process 0: its log says why (process 0: "
          'RunDirectoryInUse: run directory') in logs[1], logs[1][-3000:]
  not_a_directory = tmp_path / 'export_is_a_file'
  not_a_directory.write_text('')
  codes, logs = _two_processes(tmp_path, 'export', 3, f'--config.export_dir={not_a_directory}',
                               timeout=150)
  assert codes[0] != 0 and codes[1] != 0, codes
  assert ('checking the run directory and export_dir failed on process 0: its log says why '
          '(process 0: '
          f'ValueError: export_dir {not_a_directory} is a file') in logs[1], logs[1][-3000:]


EXPORT_FAILS_ON_PROCESS_0 = _main_patched(r"""
import jax
from dlrm_jax import serving
export_model = serving.export_model
def failing_on_process_0(*args, **kwargs):
  out = export_model(*args, **kwargs)
  if jax.process_index() == 0:
    raise OSError(28, 'No space left on device (process 0 only)')
  return out
serving.export_model = failing_on_process_0
""")


@pytest.mark.slow
def test_a_failure_of_process_0_alone_after_training_hangs_no_process(tmp_path):
  # Only process 0 writes the export and the summaries. When its write failed, the others went
  # on to sum the parse counts over the processes and waited for process 0 there for good.
  codes, _ = _two_processes(tmp_path, 'export', 3, f'--config.export_dir={tmp_path / "export"}',
                            script=EXPORT_FAILS_ON_PROCESS_0, timeout=240)
  # Process 1 exits 0 when it had ended its run before process 0 failed; otherwise process 0's
  # failure stops it (train.stopping_together), naming that failure.
  assert codes[0] == 1 and codes[1] in (0, 1), codes
  if codes[1]:
    assert 'stopping: process 0 failed: OSError: [Errno 28]' in _read(tmp_path / 'export1.txt')
  results = _results(tmp_path)
  assert results['failed_after_training'].startswith('OSError: [Errno 28]')
  assert results['rows_parsed'] > 0 and 0 < results['eval_auc'] < 1


SUMMARIES_FAIL_ON_PROCESS_0 = _main_patched(r"""
import time
import jax
from dlrm_jax import metric_writer
write_scalars = metric_writer.MetricWriter.write_scalars
def failing_on_process_0(self, step, scalars):
  if jax.process_index() == 0 and step == 2:
    print(f'FAILING AT {time.time()}', flush=True)
    raise OSError(28, 'No space left on device (process 0 only)')
  return write_scalars(self, step, scalars)
metric_writer.MetricWriter.write_scalars = failing_on_process_0
""")


@pytest.mark.slow
def test_a_failure_of_one_process_during_training_stops_every_process_at_once(tmp_path):
  # Process 0 alone writes the summaries. When a write failed mid-run, process 1 waited in its
  # next step's collective while process 0 waited in JAX's shutdown barrier: both aborted
  # ("Shutdown barrier has failed") after 5 minutes, process 1's log not saying why.
  codes, logs = _two_processes(tmp_path, 'summaries', MANY_STEPS, '--config.no_eval=True',
                               '--config.log_every_steps=1', script=SUMMARIES_FAIL_ON_PROCESS_0,
                               timeout=200)  # under the 300 s the hang took
  ended = time.time()
  assert codes == [1, 1], [t[-3000:] for t in logs]
  # Well under a second when it works (process 0 waits for process 1 to read its error); the
  # margin is for a loaded machine.
  failed_at = float(logs[0].split('FAILING AT ')[1].split()[0])
  assert ended - failed_at < 60, ended - failed_at
  assert 'OSError: [Errno 28] No space left on device (process 0 only)' in logs[0]
  assert ('stopping: process 0 failed: OSError: [Errno 28] No space left on device (process 0 '
          'only) (its log says why)') in logs[1], logs[1][-3000:]


@pytest.mark.slow
def test_a_model_axis_across_processes_is_refused(tmp_path):
  # Each process reads its own rows: devices sharing a data index in different processes would
  # be replicas holding different batches (their "replicated" weights drifted apart).
  codes, logs = _two_processes(tmp_path, 'mesh', 5, '--config.mesh_shape=(1,2)')
  assert codes == [1, 1], [t[-3000:] for t in logs]
  assert all('the model axis (2) spans processes [0, 1]' in t for t in logs)


@pytest.mark.slow
def test_two_processes_with_sharded_tables_export_one_artifact(tmp_path):
  # No process holds the tables as one addressable array: the export gathers them and process 0
  # alone writes. The artifact scores as the checkpoint does in one process.
  export = tmp_path / 'export'
  codes, logs = _two_processes(tmp_path, 'log', 5, '--config.no_eval=True',
                               f'--config.export_dir={export}', '--config.mesh_shape=(2,2)',
                               devices=2)
  assert codes == [0, 0], [t[-3000:] for t in logs]
  assert sorted(os.listdir(tmp_path)).count('export') == 1
  assert not [n for n in os.listdir(tmp_path) if '.export-' in n]

  eval_path = tmp_path / 'planted_elm' / 'eval.csv'
  predicted = subprocess.run(
      _command(tmp_path, 5, '--config.mode=predict', f'--config.predict_input={eval_path}',
               f'--config.predict_output={tmp_path / "probs.txt"}'),
      cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)
  assert predicted.returncode == 0, predicted.stderr[-4000:]
  probs = np.loadtxt(tmp_path / 'probs.txt')

  score = serving.load(str(export))
  spec = feature_spec.elm_spec(1000, 4, 8)  # the tiny config's
  served = np.concatenate([
      score(b['dense'], b['ids'], b['weights'])[b['mask'] > 0]
      for b in input_pipeline.batches([str(eval_path)], spec, 512, drop_remainder=False)])
  # Same float32 math, different XLA programs (direct gather vs unique rows, other summation
  # orders): ~1e-6 apart here; rtol 1e-4 leaves room for another CPU's vector width, while a
  # wrong row, weight or layer moves a probability by 1e-2 and more.
  np.testing.assert_allclose(served, probs, rtol=1e-4, atol=1e-6)


# Every setting that names a path, spelled out (not cli._PATH_FIELDS: a name dropped from that
# list would drop out of the check too).
PATH_SETTINGS = ('data_location', 'cache_dir', 'tfds_data_dir', 'predict_input',
                 'predict_output', 'output_dir', 'checkpoint', 'export_dir')


def test_every_path_setting_after_an_equals_sign_is_home_relative(tmp_path, monkeypatch):
  # '--config.checkpoint=~/run' (as a stopped run's message suggests) made a directory named
  # '~' in the working directory, like the other path settings before them.
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  config = default.get_config('tiny')
  for name in PATH_SETTINGS:
    config[name] = f'~/{name}'
  config = cli.command_line_config(config)
  assert {n: config[n] for n in PATH_SETTINGS} == {
      n: str(tmp_path / 'home' / n) for n in PATH_SETTINGS}


def test_workdir_and_checkpoint_naming_one_directory_are_accepted(tmp_path, monkeypatch):
  # Both name the run directory: the same one, however spelled, is no conflict.
  monkeypatch.setenv('HOME', str(tmp_path))
  monkeypatch.chdir(tmp_path)
  run = str(tmp_path / 'run')
  config = default.get_config('tiny')
  for workdir, checkpoint in ((run, run), (run + '/', run), ('run', run), ('~/run', '~/run'),
                              ('./run', '~/run/')):
    config.checkpoint = checkpoint
    config = cli.command_line_config(config)
    assert os.path.realpath(cli.run_directory(workdir, config)) == run, (workdir, checkpoint)
  config.checkpoint = str(tmp_path / 'other')
  with pytest.raises(app.UsageError, match='name two run directories'):
    cli.run_directory(run, config)


def test_space_separated_config_and_stray_arguments_are_short_errors(tmp_path):
  default_py = os.path.join(ROOT, 'configs', 'default.py')
  env = dict(ENV, PYTHONPATH=ROOT)
  # absl's '--config PATH' form: the override's mistake is still named, without a traceback.
  proc = subprocess.run([sys.executable, '-m', 'dlrm_jax.main', '--config', f'{default_py}:tiny',
                         '--config.eval_every=3'], cwd=tmp_path, capture_output=True, text=True,
                        timeout=600, env=env)
  assert proc.returncode == 1, proc.stderr[-4000:]
  assert ("flag --config.eval_every=3: the config has no field 'eval_every'. Did you mean"
          in proc.stderr and 'Traceback' not in proc.stderr), proc.stderr[-4000:]
  # A value left apart from its '=' ('--config.learning_rate= 0.1') is a stray argument: refused,
  # not a run with the setting unchanged.
  proc = subprocess.run([sys.executable, '-m', 'dlrm_jax.main', f'--config={default_py}:tiny',
                         f'--config.output_dir={tmp_path}', '--config.steps=1',
                         '--config.no_eval=True', 'stray'], cwd=tmp_path, capture_output=True,
                        text=True, timeout=600, env=env)
  assert proc.returncode == 1, proc.stderr[-4000:]
  assert "Unexpected arguments: ['stray']" in proc.stderr, proc.stderr[-4000:]
  assert not os.listdir(tmp_path)
