"""Train-step samples/s on 1, 2 and 4 CPU devices of this machine (data-parallel overhead).

  python -m experiments.devices_benchmark [--devices 1,2,4] [--rounds 5] [--steps 30]

The device count is fixed when JAX starts, so every count runs in its own worker process; the
workers are started once and asked in turn (A B C A B C ...), and each count's figure is the
median over rounds of its ratio to the first count in the same round. On one machine the forced
CPU devices share the same cores, so this measures the cost of splitting the batch, not a
speed-up.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

WORKER = r'''
import sys, time, json
sys.path.insert(0, {root!r})
import jax, numpy as np
from configs import default
from dlrm_jax import train, models
config = default.get_config()
train.set_cpu_dispatch(config)  # as the trainer runs its steps, before JAX starts
setup = train.make_setup(config)
spec = setup.spec
rng = np.random.default_rng(0)
B = config.batch_size
ids = (rng.zipf(1.2, size=(B, spec.num_slots)) % config.hash_buckets).astype(np.int32)
ids = np.where(spec.slot_table[None] >= 13, ids % 5, ids).astype(np.int32)
weights = np.zeros((B, spec.num_slots), np.float32)
for f, a in zip(spec.sparse, spec.slot_starts[:-1]):
  n = rng.integers(1, 20, B) if f.is_list else np.ones(B, int)
  for b in range(B):
    weights[b, a:a + n[b]] = 1 / n[b]
host = dict(label=(rng.random(B) < 0.05).astype(np.float32),
            dense=rng.normal(size=(B, spec.num_dense)).astype(np.float32),
            ids=ids, weights=weights, mask=np.ones(B, np.float32))
# Placed once: the step is timed without the batch's transfer.
batch = jax.device_put(next(train.step_batches(iter([host]), setup, smartstaged=False)),
                       train.batch_sharding(setup.mesh))
state = train.create_train_state(jax.random.PRNGKey(0), setup)
step = train.compile_train_step(setup, state, True)
for _ in range(3):
  state, loss = step(state, batch)
jax.block_until_ready(loss)
print('READY', flush=True)
for line in sys.stdin:
  t = time.perf_counter()
  for _ in range({steps}):
    state, loss = step(state, batch)
  jax.block_until_ready(loss)
  print(json.dumps(B * {steps} / (time.perf_counter() - t)), flush=True)
'''


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--devices', default='1,2,4')
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--steps', type=int, default=30)
  parser.add_argument('--json_out', default='')
  args = parser.parse_args()
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  counts = [int(c) for c in args.devices.split(',')]
  workers, logs = {}, {}
  for n in counts:
    env = dict(os.environ, JAX_PLATFORMS='cpu',
               XLA_FLAGS=f'--xla_force_host_platform_device_count={n}')
    logs[n] = tempfile.TemporaryFile('w+')  # the worker's stderr, shown if it fails
    workers[n] = subprocess.Popen(
        [sys.executable, '-c', WORKER.format(root=root, steps=args.steps)], env=env, text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=logs[n])
  for n, w in workers.items():
    for line in w.stdout:
      if line.startswith('READY'):
        break
    else:
      w.wait()
      logs[n].seek(0)
      raise RuntimeError(f'the {n}-device worker failed to start:\n{logs[n].read()[-3000:]}')
  rates = {n: [] for n in counts}
  for _ in range(args.rounds):
    for n, w in workers.items():
      w.stdin.write('go\n')
      w.stdin.flush()
      rates[n].append(json.loads(w.stdout.readline()))
  for w in workers.values():
    w.stdin.close()
    w.wait()
  base = np.asarray(rates[counts[0]])
  result = {}
  print(f'{"devices":>8} {"samples/s":>10} {"x 1 device":>11}')
  for n in counts:
    ratio = float(np.median(np.asarray(rates[n]) / base))
    result[n] = {'samples_per_s': float(np.median(rates[n])), 'ratio': ratio}
    print(f'{n:>8} {result[n]["samples_per_s"]:>10,.0f} {ratio:>11.2f}')
  if args.json_out:
    with open(args.json_out, 'w') as f:
      json.dump(result, f, indent=2)


if __name__ == '__main__':
  main()
