r"""Where the train step's time goes: the whole step against the dense model alone.

  python -m experiments.step_breakdown                          # ELM dot, batch 512 and 4096
  python -m experiments.step_breakdown --interaction=cat --batches=512 --rounds=9
  python -m experiments.step_breakdown --batches=512 --bf16       # the bf16 compute policy
  python -m experiments.step_breakdown --json_out=/tmp/breakdown.json

Per-op durations in a `jax.profiler` trace do not add up on XLA:CPU: its thunk executor runs
independent ops at once (the embedding lookup beside the bottom MLP, a layer's two backward dots
side by side), so an op's duration includes the time it shared the cores. This measures
wall-clock differences instead, in one process, alternately (A B C A B C ..., median of the
per-round ratios):
  * step: the trainer's jitted train step (sparse updates, fp32 or `--bf16`, SGD) on synthetic
    batches already on the device, as the benchmark's 'step' row;
  * dense model: the same MLPs, interaction and SGD update, with the pooled embeddings fed in as
    an input: no lookup, pooling, row gradients or table update;
  * dense model, no batch norm: the same without the bottom MLP's batch norm.
  * MLPs alone: the bottom and top MLPs' forward and backward, each its own program.
step - dense model is what the embedding path costs; dense model - the MLPs alone is roughly
what the interaction, batch norm, loss and optimizer add (roughly: programs of their own are not
a lower bound, the MLPs alone have come out slower than the dense model on a noisy round).
"""

import argparse
import functools
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import optax  # pylint: disable=g-import-not-at-top,wrong-import-position

from dlrm_jax import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from dlrm_jax import train  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import benchmark  # pylint: disable=g-import-not-at-top,wrong-import-position


def _setup(interaction: str, batch_size: int, batch_norm: bool, tiny: bool,
           bf16: bool) -> train.Setup:
  s = benchmark._sizes(tiny)  # pylint: disable=protected-access
  variant = dict(spec='elm', rows=s['rows'], embedding_dim=s['embedding_dim'],
                 max_list_len=s['max_list_len'], bottom_mlp=s['bottom_mlp'],
                 top_mlp=s['top_mlp'], interaction=interaction, batch_norm=batch_norm,
                 batch_size=batch_size, optimizer='gradientdescent', learning_rate=0.01,
                 bf16=bf16, seed=0, async_dispatch=False)
  config = benchmark.jax_config(variant)
  train.set_cpu_dispatch(config)  # as the trainer runs its steps
  return train.make_setup(config)


def _dense_step(setup: train.Setup, mlp, batch_stats, opt_state, batch, pooled):
  """The train step's dense half: the model from pooled embeddings, and optax on its MLPs."""
  def loss_fn(mlp):
    logits, stats = train.apply_model(setup, mlp, batch_stats, batch['dense'], pooled, True)
    return train.bce_loss(logits, batch['label'], batch['mask']), stats
  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(mlp)
  updates, opt_state = setup.tx.update(grads, opt_state, mlp)
  return optax.apply_updates(mlp, updates), batch_stats, opt_state, loss


def _mlp_grads(mlp: models.MLP) -> Callable:
  return jax.jit(lambda p, x: jax.grad(lambda p, x: jnp.sum(mlp.apply(p, x, True)),
                                       argnums=(0, 1))(p, x))


def runners(interaction: str, batch_size: int, tiny: bool,
            bf16: bool = False) -> Dict[str, Callable[[int], None]]:
  """name -> run(n): n calls of that program, returning when their work is done."""
  setup = _setup(interaction, batch_size, True, tiny, bf16)
  host = benchmark.synthetic_batches(setup.spec, batch_size, 4, seed=0)
  placed = functools.partial(jax.device_put, device=train.batch_sharding(setup.mesh))
  batches = [placed(b) for b in train.step_batches(iter(host), setup, False)]
  state = train.create_train_state(jax.random.PRNGKey(0), setup)
  pooled = [models.embed(train.lookup(state.params['tables'], b), b, setup.spec,
                         setup.emb_fusion) for b in batches]
  step = jax.jit(functools.partial(train.train_step, setup), donate_argnums=0)
  carry = {'step': state}

  def run_step(n):
    for i in range(n):
      carry['step'], _ = step(carry['step'], batches[i % len(batches)])
    jax.block_until_ready(carry['step'])

  def dense_runner(s: train.Setup):
    fresh = train.create_train_state(jax.random.PRNGKey(0), s)
    program = jax.jit(functools.partial(_dense_step, s), donate_argnums=(0, 1, 2))
    parts = [fresh.params['mlp'], fresh.batch_stats, fresh.opt_state]

    def run(n):
      for i in range(n):
        parts[:] = program(*parts, batches[i % len(batches)], pooled[i % len(batches)])[:3]
      jax.block_until_ready(parts)
    return run

  model = setup.model
  top_in = models.interaction_width(setup.spec, model.bottom_mlp[-1], model.interaction_op)
  key = jax.random.PRNGKey(1)
  mlps = []
  for mlp, width in ((models.MLP(model.bottom_mlp, False, model.dtype), setup.spec.num_dense),
                     (models.MLP(model.top_mlp, False, model.dtype), top_in)):
    x = jax.random.normal(key, (batch_size, width)).astype(model.dtype)
    mlps.append((_mlp_grads(mlp), mlp.init(key, x, True), x))

  def run_mlps(n):
    jax.block_until_ready([f(p, x) for _ in range(n) for f, p, x in mlps])

  return {'step': run_step,
          'dense model': dense_runner(setup),
          'dense model, no batch norm': dense_runner(
              _setup(interaction, batch_size, False, tiny, bf16)),
          'MLPs alone': run_mlps}


def measure(run: Dict[str, Callable[[int], None]], rounds: int, min_time: float
            ) -> Dict[str, Dict[str, float]]:
  """Median ms per call and median per-round ratio to 'step', alternating A B C ..."""
  for r in run.values():
    r(2)  # compiles
  start, n = time.perf_counter(), 0
  while time.perf_counter() - start < min_time:
    run['step'](1)
    n += 1
  ms: Dict[str, List[float]] = {name: [] for name in run}
  for _ in range(rounds):
    for name, r in run.items():
      t = time.perf_counter()
      r(n)
      ms[name].append(1e3 * (time.perf_counter() - t) / n)
  return {name: {'ms': statistics.median(v),
                 'of_step': statistics.median([a / b for a, b in zip(v, ms['step'])])}
          for name, v in ms.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--interaction', default='dot', choices=('dot', 'cat'))
  parser.add_argument('--batches', default='512,4096', help='batch sizes, comma-separated')
  parser.add_argument('--rounds', type=int, default=7, help='alternation rounds')
  parser.add_argument('--min_time', type=float, default=0.4,
                      help='seconds of work per measurement of the step')
  parser.add_argument('--bf16', action='store_true',
                      help='bfloat16 compute (float32 weights), as the trainer under bf16')
  parser.add_argument('--tiny', action='store_true',
                      help='tiny tables and MLPs: checks the machinery in seconds (tests)')
  parser.add_argument('--json_out', default='', help='where to write the results (optional)')
  args = parser.parse_args()
  results = {}
  for batch_size in (int(b) for b in args.batches.split(',')):
    rows = measure(runners(args.interaction, batch_size, args.tiny, args.bf16), args.rounds,
                   args.min_time)
    dtype = 'bf16' if args.bf16 else 'fp32'
    results[f'{args.interaction}_b{batch_size}' + ('_bf16' if args.bf16 else '')] = rows
    print(f'ELM {args.interaction} batch {batch_size}, {dtype} SGD, median of {args.rounds} '
          'rounds:')
    for name, row in rows.items():
      print(f"  {name:28s} {row['ms']:9.2f} ms  {row['of_step']:6.3f} of the step")
  if args.json_out:
    with open(args.json_out, 'w') as f:
      json.dump({'machine': benchmark.machine_info(), 'results': results}, f, indent=1)


if __name__ == '__main__':
  main()
