"""Peak memory of whole training runs (the trainer, checkpoints included) over the state they train.

  python -m experiments.memory_benchmark [--rows 20000] [--steps 30] [--out memory.json]
      [--optimizers adamasync,adagrad,gradientdescent] [--table_rows deeprec|small] [--scales 2,3]

Every run is `train.train_and_evaluate` (what `python -m dlrm_jax.main` calls) in a process of its
own, on planted Criteo rows (`datagen criteo`) with the Criteo config (`configs/criteo_kaggle.py`)
and DeepRec's 26 table sizes (19.0M rows of 16 floats: 1162 MiB), `dot`. Each optimizer trains
`--steps` steps and saves once at the end, without eval; SGD (`gradientdescent`, no slots: the
hardest case for the ratio) also runs with eval (the last seventh of the rows, as the config
splits train.txt), and saves every 10 steps, asynchronously and synchronously
(`async_checkpointing`). SGD also runs with every table `--scales` times as large: the
peak's growth over the state's growth between scale 1 and the largest is what each further byte
of state costs, and the rest of the peak is a fixed cost.

Per run: the process's peak resident memory (VmHWM), the resident memory of the runtime before
the run (Python, JAX after a first compile, and every module the trainer imports), and the train
state (parameters, optimizer slots and batch-norm statistics, from their abstract shapes). The
table prints the peak over the state in all and the part above the runtime. Memory does not depend
on the machine's speed, so each variant runs once; peaks still move by a few percent between
runs (allocator and thread timing).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

from experiments import benchmark

WORKER = r'''
import json, sys
sys.path.insert(0, {root!r})
import jax
from dlrm_jax import train
from experiments import benchmark, memory_benchmark
config = memory_benchmark.make_config({overrides!r})
train.set_cpu_dispatch(config)  # what train_and_evaluate does first, before the runtime's compile
jax.jit(lambda x: x + 1)(jax.numpy.zeros(4)).block_until_ready()
runtime = benchmark.rss_mb()
train.train_and_evaluate(config, {workdir!r})
print('RESULT', json.dumps(dict(peak_rss_mb=benchmark.peak_rss_mb(), runtime_rss_mb=runtime)))
'''


def variants(optimizers, steps, table_rows, scales=()):
  """(name, overrides, table scale) of each run."""
  out = [(f'{opt}, save at the end', dict(optimizer=opt), 1) for opt in optimizers]
  if 'gradientdescent' not in optimizers:
    return out
  sgd = dict(optimizer='gradientdescent')
  out.append(('gradientdescent, save at the end, then eval', dict(sgd, no_eval=False), 1))
  if steps > 10:
    for mode in (True, False):
      out.append((f"gradientdescent, save every 10 steps, {'async' if mode else 'sync'}",
                  dict(sgd, save_steps=10, async_checkpointing=mode), 1))
  for scale in scales:
    out.append((f'gradientdescent, tables x{scale}, save at the end',
                dict(sgd, criteo_table_rows=[r * scale for r in table_rows]), scale))
  return out


def marginal(results):
  """Peak growth over state growth from SGD at scale 1 to its largest scale, or None."""
  sgd = [r for r in results if r['variant'] == 'gradientdescent, save at the end']
  scaled = [r for r in results if r['table_scale'] > 1]
  if not sgd or not scaled:
    return None
  big = max(scaled, key=lambda r: r['table_scale'])
  return dict(scale=big['table_scale'],
              peak_growth_over_state_growth=(big['peak_rss_mb'] - sgd[0]['peak_rss_mb'])
              / (big['state_mb'] - sgd[0]['state_mb']),
              fixed_mb=sgd[0]['peak_rss_mb'] - sgd[0]['state_mb'])


def make_config(overrides):
  """The Criteo config with a run's overrides (flattened field names)."""
  from configs import criteo_kaggle  # pylint: disable=g-import-not-at-top
  config = criteo_kaggle.get_config()
  config.update_from_flattened_dict(overrides)
  config.criteo_table_rows = tuple(config.criteo_table_rows)
  return config


def state_mb(overrides) -> float:
  """MiB of the train state the run creates, from abstract shapes (nothing is allocated)."""
  from dlrm_jax import train  # pylint: disable=g-import-not-at-top
  setup = train.make_setup(make_config(overrides))
  return train.state_bytes(train.abstract_train_state(setup)) / 2**20


def run_one(overrides, workdir: str) -> dict:
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  script = WORKER.format(root=root, overrides=overrides, workdir=workdir)
  proc = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True)
  lines = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')]
  if proc.returncode != 0 or not lines:
    raise RuntimeError(f'memory run {overrides} failed (exit {proc.returncode}):\n'
                       f'{proc.stderr[-3000:]}')
  return json.loads(lines[-1][len('RESULT '):])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rows', type=int, default=20000, help='planted train rows')
  parser.add_argument('--steps', type=int, default=30)
  parser.add_argument('--optimizers', default='adamasync,adagrad,gradientdescent')
  parser.add_argument('--table_rows', default='deeprec', choices=('deeprec', 'small'),
                      help="'small': DeepRec's sizes / 5000 (for smoke tests)")
  parser.add_argument('--scales', default='2,3',
                      help='SGD runs with every table this many times as large ("" = none)')
  parser.add_argument('--out', default='', help='write the results here as JSON')
  args = parser.parse_args(argv)
  rows = benchmark.DEEPREC_CRITEO_ROWS
  if args.table_rows == 'small':
    rows = tuple(max(2, r // 5000) for r in rows)

  with tempfile.TemporaryDirectory(prefix='dlrm_memory_') as tmp:
    data = os.path.join(tmp, 'criteo')
    subprocess.run([sys.executable, '-m', 'dlrm_jax.datagen', 'criteo', '--out_dir', data,
                    '--train_rows', str(args.rows), '--eval_rows', '1', '--seed', '1'],
                   check=True, capture_output=True)
    results = []
    scales = [int(x) for x in args.scales.split(',') if x]
    for i, (name, extra, scale) in enumerate(variants(args.optimizers.split(','), args.steps,
                                                      rows, scales)):
      overrides = {**dict(data_location=data, criteo_table_rows=list(rows), steps=args.steps,
                          interaction_op='dot', no_eval=True), **extra}
      row = dict(variant=name, table_scale=scale, state_mb=state_mb(overrides),
                 **run_one(overrides, os.path.join(tmp, f'run{i}')))
      row['peak_over_state'] = row['peak_rss_mb'] / row['state_mb']
      row['above_runtime_over_state'] = ((row['peak_rss_mb'] - row['runtime_rss_mb'])
                                         / row['state_mb'])
      results.append(row)
      print(f"{name:48s} state {row['state_mb']:7.0f} MiB  peak {row['peak_rss_mb']:7.0f} MiB "
            f"= {row['peak_over_state']:.2f}x  ({row['above_runtime_over_state']:.2f}x above the "
            f"{row['runtime_rss_mb']:.0f} MiB runtime)", flush=True)
  growth = marginal(results)
  if growth:
    print(f"from scale 1 to x{growth['scale']}: the peak grows "
          f"{growth['peak_growth_over_state_growth']:.2f}x as much as the state; at scale 1 the "
          f"peak is the state + {growth['fixed_mb']:.0f} MiB")
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(dict(rows=args.rows, steps=args.steps, table_rows=list(rows), results=results,
                     marginal=growth), f, indent=2)
  return results


if __name__ == '__main__':
  main()
