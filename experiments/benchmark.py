r"""Speed of the DLRM train step against TorchRec on this machine, with ceilings and scaling.

  python -m experiments.benchmark                      # everything, about 10 minutes
  python -m experiments.benchmark --quick              # ELM dot batch 512 and row scaling, 1-2 min
  python -m experiments.benchmark --configs=elm_dot_b512,rows --pairs=7 --json_out=/tmp/b.json
  python -m experiments.benchmark --list               # the groups and what each compares

It prints a table and writes JSON (`--json_out`) with, per configuration:
  * samples/s of our jitted train step on synthetic batches ('step': batches already on the
    device; 'step+input': fed by train.step_batches, host-side dedup and transfer included),
    and of end-to-end training on planted ELM data ('end-to-end': the trainer's input and step
    over the row cache; 'end-to-end csv': parsing the CSV for every batch instead);
  * the same model in TorchRec (`experiments/torchrec_dlrm.py`, PyTorch on the CPU with as many
    threads as CPUs available, `--torch_threads`) and the ratio ours / TorchRec;
  * the model's training FLOPs per sample (3x the forward's matmul FLOPs, from the layer sizes)
    and the fraction of the machine's matrix-multiply ceiling that our step reaches, the ceiling
    (fp32 and bf16 jnp.dot of [B, 512] x [512, 512]) measured in the same process right after;
  * step time with 100k, 1M and 10M rows per table (the cost must follow the touched rows);
  * the peak resident memory of the process that ran the configuration.

How it measures, and why. The shared CPU here changes speed by about 2x from one minute to the
next, so a number measured on its own means little; only ratios taken side by side do. Each
configuration of a group runs in its own worker process (a JAX or a TorchRec program, never
both: their thread pools and allocators stay apart, and each process's peak RSS is that
configuration's memory). All workers of a group are built and warmed up first; then the parent
asks them in turn, A B C A B C ..., to run a fixed number of steps (calibrated to `--min_time`
seconds), and every ratio is the median over rounds of the ratio within a round. Absolute
samples/s are medians too and are printed for orientation only.

Synthetic batches are built from the `FeatureSpec` in the trainer's fixed-shape layout: ids are
Zipf-distributed ranks hashed into each table (hot rows scattered over the table, as hashing
does), list features hold 1 + Poisson(9) values (mean 10, at most `max_list_len`), 2% of scalar
values are missing. Both sides train on the same few batches, prepared before timing.
"""

import dataclasses
import importlib.util
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from absl import app
from absl import flags
import numpy as np

# `python experiments/benchmark.py` as well as `python -m experiments.benchmark`.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from configs import criteo_kaggle  # pylint: disable=g-import-not-at-top,wrong-import-position
from dlrm_jax import feature_spec as fs  # pylint: disable=g-import-not-at-top,wrong-import-position

# JAX is imported only inside the JAX worker (`JaxRunner`): the TorchRec worker imports this
# module for the batches and the protocol, and must not carry a JAX runtime in its memory.

_FLAGS = flags.FLAGS

# DeepRec's DLRM on Criteo (modelzoo/dlrm): hash buckets of C1..C26, dimension 16.
DEEPREC_CRITEO_ROWS = criteo_kaggle.DEEPREC_TABLE_ROWS

MATMUL_K = 512  # the ceiling's [B, 512] x [512, 512]: the width of the model's big layers


# ------------------------------------------------------------------------------------------------
# What is measured.

# What one worker times, per round (a worker reports one samples/s per kind):
KINDS = {
    'step': 'the jitted train step over batches already on the device (their ids deduplicated '
            'on the host beforehand); TorchRec: its train step over KeyedJaggedTensors built '
            'beforehand',
    'step+input': 'the same step fed by train.step_batches from the synthetic batches in the '
                  "row cache's compact layout: host dedup in the prefetch thread and the "
                  "transfer in the step's dispatch, overlapping the step (the like-for-like "
                  'comparison with TorchRec, which deduplicates inside its step)',
    'end-to-end': "the trainer's input pipeline and step on planted ELM data "
                  '(data_sources.train_batches, as train_and_evaluate feeds it): the row cache built from the CSV before '
                  'training, read in shuffled blocks, then dedup, transfer, step',
    'end-to-end csv': 'the same loop with use_cache=False: the CSV read, parsed, hashed and '
                      'shuffled (buffer 20000) for every batch, in the same process',
}


@dataclasses.dataclass(frozen=True)
class Variant:
  """One configuration, run by one worker process.

  framework: 'jax' (ours) or 'torchrec'.
  kinds: what the worker times, each round (see KINDS); TorchRec has only 'step'.
  optimizer: ours, for MLPs and tables alike ('gradientdescent', 'adagrad' or 'rowwise_adagrad');
    TorchRec's MLPs use the torch optimizer of that name (Adagrad for rowwise_adagrad).
  table_optimizer: TorchRec's fused table optimizer: 'sgd', 'adagrad' or 'rowwise_adagrad'.
  chunk_rows: the CSV reader's lines per parse for 'end-to-end csv' (see `build_groups`).
  """
  label: str
  framework: str
  spec: str
  rows: Any  # ELM: rows of every hashed table; Criteo: a tuple of 26
  batch_size: int
  interaction: str
  bottom_mlp: Tuple[int, ...]
  top_mlp: Tuple[int, ...]
  embedding_dim: int
  max_list_len: int
  kinds: Tuple[str, ...] = ('step',)
  batch_norm: bool = True
  bf16: bool = False
  optimizer: str = 'gradientdescent'
  table_optimizer: str = 'sgd'
  learning_rate: float = 0.01
  seed: int = 0
  num_batches: int = 4
  torch_threads: int = 2
  omp_wait_policy: str = 'PASSIVE'
  data_dir: str = ''
  chunk_rows: int = 4096
  jax_cache_dir: str = ''
  env: Tuple[Tuple[str, str], ...] = ()  # extra environment of the worker process
  async_dispatch: bool = False  # ours: config.cpu_async_dispatch
  dcn_num_layers: int = 3       # interaction 'dcn' only
  dcn_low_rank_dim: int = 512


@dataclasses.dataclass(frozen=True)
class Group:
  """Variants measured in alternation; ratios are against the first one's first kind, or the
  fastest of it and its wait-policy twins in each round (`per_wait_policy`)."""
  name: str
  what: str
  variants: Tuple[Variant, ...]


def make_spec(variant: Dict[str, Any]) -> fs.FeatureSpec:
  if variant['spec'] == 'elm':
    return fs.elm_spec(variant['rows'], variant['embedding_dim'], variant['max_list_len'])
  if variant['spec'] == 'criteo':
    return fs.criteo_spec(list(variant['rows']), variant['embedding_dim'])
  raise ValueError(f"spec {variant['spec']!r}: expected 'elm' or 'criteo'")


def describe(v: Variant) -> str:
  """What a variant runs, in words, for the table's notes and the JSON."""
  dtype = 'bf16 compute with fp32 weights' if v.bf16 else 'fp32'
  if v.framework == 'torchrec':
    table = {'sgd': 'EXACT_SGD', 'adagrad': 'EXACT_ADAGRAD (elementwise)',
             'rowwise_adagrad': 'EXACT_ROWWISE_ADAGRAD (one accumulator per row)'}
    mlp = 'torch.optim.SGD' if v.optimizer == 'gradientdescent' else 'torch.optim.Adagrad'
    return (f'TorchRec FusedEmbeddingBagCollection, tables {table[v.table_optimizer]} fused into '
            f'backward, MLPs {mlp}, {dtype}, PyTorch CPU {v.torch_threads} threads, '
            f"OMP_WAIT_POLICY={v.omp_wait_policy or 'default'}")
  env = ''.join(f', {k}={v}' for k, v in v.env)
  dispatch = 'pool threads (async)' if v.async_dispatch else 'the calling thread'
  return (f'ours, optimizer {v.optimizer} (MLPs optax, tables row-wise on the touched rows), '
          f'{dtype}, emb_fusion + op_fusion + sparse_updates, XLA:CPU steps on {dispatch}{env}')


def table_summary(spec: fs.FeatureSpec) -> str:
  rows = sorted({t.rows for t in spec.tables}, reverse=True)
  counts = [sum(t.rows == r for t in spec.tables) for r in rows]
  return ' + '.join(f'{c}x{r}' for c, r in zip(counts, rows))


def train_flops_per_sample(spec: fs.FeatureSpec, bottom_mlp: Sequence[int],
                           top_mlp: Sequence[int], interaction: str,
                           dcn_num_layers: int = 3, dcn_low_rank_dim: int = 512) -> float:
  """Matmul FLOPs of one training sample: 3x the forward (backward = 2 matmuls per forward one),
  the usual convention and the issue's (2.75 MFLOP for ELM `dot`).

  The embedding gather and pooling are memory traffic, not FLOPs, and are left out; the dot
  interaction counts the full [n, n] Gram matrix, which the forward computes. The compiled step
  multiplies ~1.2% less (XLA's dots for ELM `dot`: 2.714 MFLOP against 2.746; Criteo `dot`
  -1.3%, `cat` -0.4%): the first layer has no input gradient, the dot interaction's written-out
  backward (models._pairwise_dots) is one batched matmul, not two, and the logit layer's input
  gradient is a broadcast product. Ceiling shares on that count are ~1.2% lower.
  """
  forward, width = 0, spec.num_dense
  for out in bottom_mlp:
    forward += 2 * width * out
    width = out
  n = spec.num_sparse + 1
  if interaction == 'dot':
    forward += 2 * n * n * spec.embedding_dim
    width = bottom_mlp[-1] + n * (n - 1) // 2
  else:
    width = bottom_mlp[-1] + spec.num_sparse * spec.embedding_dim
    if interaction == 'dcn':  # each cross layer: [N -> r] then [r -> N]
      forward += dcn_num_layers * 4 * width * dcn_low_rank_dim
  for out in tuple(top_mlp) + (1,):
    forward += 2 * width * out
    width = out
  return 3.0 * forward


def table_state_bytes(spec: fs.FeatureSpec, v: Variant) -> int:
  """Bytes of the tables and their optimizer slots (ours: adagrad keeps one float per weight)."""
  weights = spec.total_rows * spec.embedding_dim * 4
  if v.framework == 'torchrec':
    slots = {'sgd': 0, 'adagrad': weights, 'rowwise_adagrad': spec.total_rows * 4}
    return weights + slots[v.table_optimizer]
  slots = {'gradientdescent': 0, 'adagrad': weights, 'rowwise_adagrad': spec.total_rows * 4}
  return weights + slots[v.optimizer]


# ------------------------------------------------------------------------------------------------
# Synthetic batches.

def synthetic_batches(spec: fs.FeatureSpec, batch_size: int, num_batches: int, seed: int,
                      zipf_exponent: float = 1.2, mean_list_len: float = 10.0,
                      missing_scalar: float = 0.02) -> List[Dict[str, np.ndarray]]:
  """Batches in the trainer's layout (label, dense, ids, weights, mask), ids Zipf-distributed."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(num_batches):
    ids = np.zeros((batch_size, spec.num_slots), np.int32)
    weights = np.zeros((batch_size, spec.num_slots), np.float32)
    for index, (feature, start) in enumerate(zip(spec.sparse, spec.slot_starts[:-1])):
      rows = spec.table(feature.table).rows
      width = feature.max_len
      if feature.is_list:
        # An empty list field still holds one ('') token, so every list has a value.
        count = np.minimum(1 + rng.poisson(mean_list_len - 1, batch_size), width)
      else:
        count = (rng.random(batch_size) >= missing_scalar).astype(np.int64)
      present = np.arange(width)[None, :] < count[:, None]
      if feature.vocabulary is not None:
        table_ids = rng.integers(0, rows, (batch_size, width))
      else:
        # Popularity rank -> row through a multiplicative hash, salted per feature: hot ids land
        # anywhere in the table, and features sharing a table do not share hot rows.
        ranks = rng.zipf(zipf_exponent, (batch_size, width)).astype(np.uint64)
        salt = np.uint64((0x9E3779B97F4A7C15 * (index + 1)) % 2**64)
        table_ids = ((ranks * np.uint64(0xD6E8FEB86659FD93)) ^ salt) % np.uint64(rows)
      window = slice(start, start + width)
      ids[:, window] = np.where(present, table_ids, 0).astype(np.int32)
      weights[:, window] = np.where(present, 1.0 / np.maximum(count, 1)[:, None], 0.0)
    out.append({
        'label': (rng.random(batch_size) < 0.05).astype(np.float32),
        'dense': rng.standard_normal((batch_size, spec.num_dense)).astype(np.float32),
        'ids': ids,
        'weights': weights,
        'mask': np.ones(batch_size, np.float32),
    })
  return out


# ------------------------------------------------------------------------------------------------
# Worker side: one process per variant, driven by JSON lines on stdin, answering on stdout.

def _status_mb(field: str) -> Optional[float]:
  """A memory field of /proc/self/status (kB there) in MiB, or None where there is none."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith(field + ':'):
          return int(line.split()[1]) / 1024.0
  except OSError:
    pass
  return None


def rss_mb() -> Optional[float]:
  """This process's resident memory now (VmRSS), in MiB."""
  return _status_mb('VmRSS')


def peak_rss_mb() -> float:
  """This process's peak resident memory.

  VmHWM, not getrusage's ru_maxrss: a child's ru_maxrss starts at its parent's peak (Linux copies
  it at fork), so every worker would report at least the parent's memory.
  """
  peak = _status_mb('VmHWM')
  return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def serve(runner_factory: Callable[[Dict[str, Any], List[Dict[str, np.ndarray]]], Any]) -> None:
  """Runs one variant: build, then answer 'calibrate', 'measure' and 'stop' requests.

  The runner has warm_up(), time_steps(kind, n) -> seconds (the n steps done), extra_measurements()
  and last_loss, and may have min_steps {kind: steps}.
  """
  protocol = os.fdopen(os.dup(1), 'w', buffering=1)
  # Whatever else writes to fd 1 (XLA, FBGEMM, warnings) must not corrupt the protocol.
  os.dup2(2, 1)

  def reply(**message):
    protocol.write(json.dumps(message) + '\n')

  try:
    variant = json.loads(sys.stdin.readline())
    start = time.perf_counter()
    host = synthetic_batches(make_spec(variant), variant['batch_size'], variant['num_batches'],
                             variant['seed'])
    runner = runner_factory(variant, host)
    del host
    runner.warm_up()
    reply(ready=True, build_s=time.perf_counter() - start)
    kinds, steps = variant['kinds'], {}
    for line in sys.stdin:
      request = json.loads(line)
      if request['cmd'] == 'calibrate':
        per_step = calibrated_step_time(runner, kinds[0], request['min_time'])
        n = max(2, math.ceil(request['min_time'] / max(per_step, 1e-6)))
        min_steps = getattr(runner, 'min_steps', {})
        steps = {kind: max(n, min_steps.get(kind, 1)) for kind in kinds}
        reply(steps=steps, step_s=per_step)
      elif request['cmd'] == 'measure':
        rates, extra = measure_round(runner, kinds, steps, variant['batch_size'])
        reply(rates=rates, loss=runner.last_loss, **extra)
      elif request['cmd'] == 'stop':
        reply(peak_rss_mb=peak_rss_mb(), **getattr(runner, 'memory', {}))
        return
      else:
        raise ValueError(f'unknown request {request!r}')
  except Exception:  # pylint: disable=broad-except
    reply(error=traceback.format_exc())
    sys.exit(1)


def measure_round(runner, kinds: Sequence[str], steps: Dict[str, int],
                  batch_size: int) -> Tuple[Dict[str, float], Dict[str, float]]:
  """One round of a worker: samples/s of every kind, and the runner's extra measurements (the
  matmul ceiling) taken right after the first kind, the step, not after all of them: the
  machine's speed drifts within seconds, and the ceiling share pairs the two."""
  rates, extra = {}, None
  for kind in kinds:
    rates[kind] = steps[kind] * batch_size / runner.time_steps(kind, steps[kind])
    if extra is None:
      extra = runner.extra_measurements()
  return rates, extra or {}


class MatmulCeiling:
  """FLOP/s of jnp.dot [m, 512] x [512, 512] in fp32 and bf16, the best of a few shapes.

  bf16 is the product the bf16 step runs: bf16 operands with float32 accumulation
  (preferred_element_type), rounded to bf16 for the next product. On XLA:CPU that is the
  native bf16 kernel, about twice the float32 rate here; a bf16-output dot is not (it runs at
  about the float32 rate), and would understate the ceiling.
  """

  def __init__(self, batch_size: int):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    self._jax = jax
    self._cases = []
    rng = np.random.default_rng(0)
    # The weights keep the activations' scale, so repeated products stay finite.
    w = rng.standard_normal((MATMUL_K, MATMUL_K)) / math.sqrt(MATMUL_K)
    for m in sorted({512, batch_size}):
      x = rng.standard_normal((m, MATMUL_K))
      # About 1 GFLOP per call: long enough to time, short enough to repeat.
      repeats = max(2, int(1e9 // (2 * m * MATMUL_K * MATMUL_K)))
      for name, dtype in (('fp32', jnp.float32), ('bf16', jnp.bfloat16)):
        fn = jax.jit(lambda x, w, r=repeats: jax.lax.fori_loop(
            0, r, lambda _, y: jnp.dot(y, w, preferred_element_type=jnp.float32).astype(y.dtype),
            x))
        args = (jnp.asarray(x, dtype), jnp.asarray(w, dtype))
        jax.block_until_ready(fn(*args))
        self._cases.append((name, fn, args, 2.0 * m * MATMUL_K * MATMUL_K * repeats))

  def measure(self) -> Dict[str, float]:
    best = {}
    for name, fn, args, flop in self._cases:
      for _ in range(3):
        start = time.perf_counter()
        self._jax.block_until_ready(fn(*args))
        rate = flop / (time.perf_counter() - start)
        best[name] = max(best.get(name, 0.0), rate)
    return {f'ceiling_{name}_flops': rate for name, rate in best.items()}


def jax_config(variant: Dict[str, Any]):
  """The trainer's config for a variant: the default with the variant's sizes and switches."""
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.feature_spec = variant['spec']
  if variant['spec'] == 'criteo':
    config.criteo_table_rows = tuple(variant['rows'])
  else:
    config.hash_buckets = variant['rows']
  config.embedding_dim = variant['embedding_dim']
  config.max_list_len = variant['max_list_len']
  config.bottom_mlp = tuple(variant['bottom_mlp'])
  config.top_mlp = tuple(variant['top_mlp'])
  config.interaction_op = variant['interaction']
  if variant['interaction'] == 'dcn':
    config.dcn_num_layers = variant['dcn_num_layers']
    config.dcn_low_rank_dim = variant['dcn_low_rank_dim']
  config.batch_norm = variant['batch_norm']
  config.batch_size = variant['batch_size']
  config.optimizer = variant['optimizer']
  config.learning_rate = variant['learning_rate']
  config.bf16 = variant['bf16']
  config.seed = variant['seed']
  config.cpu_async_dispatch = variant['async_dispatch']
  return config


def _cycle(items):
  while True:
    yield from items


class JaxRunner:
  """Our training step, all accelerations on, fed three ways (KINDS)."""

  def __init__(self, variant: Dict[str, Any], host_batches: List[Dict[str, np.ndarray]]):
    # Imported here, not at the top: see the note under the imports.
    import jax  # pylint: disable=g-import-not-at-top
    from dlrm_jax import train  # pylint: disable=g-import-not-at-top
    self._jax = jax
    if variant['jax_cache_dir']:
      # Later groups and later runs reuse the compiled programs: building a worker is then
      # seconds instead of a minute on this machine.
      jax.config.update('jax_compilation_cache_dir', variant['jax_cache_dir'])
      jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
    self.kinds = variant['kinds']
    config = jax_config(variant)
    train.set_cpu_dispatch(config)  # before anything starts the backend, as the trainer does
    setup = train.make_setup(config)
    # The runtime's own memory: Python, the libraries, and XLA's compiler loaded by a first
    # compile, before the model's first array.
    jax.block_until_ready(jax.jit(lambda x: x + 1)(np.zeros(1)))
    self.memory = {'runtime_rss_mb': rss_mb()}
    # In the trainer's order: the step compiled before the state exists. The batches of 'step'
    # are put on the (one) device uncommitted: the step takes them without a copy and from the
    # program it compiled for host batches. Committed to the batch's sharding, they made JAX
    # trace and compile the step a second time (~20 MiB more in this worker, same speed).
    abstract = train.abstract_train_state(setup)
    self.step_fn = train.compile_train_step(setup, abstract, op_fusion=True)
    first = next(train.step_batches(iter(host_batches), setup, False))
    train.compile_ahead([(self.step_fn, (abstract, first))])
    # Compiled before the state, as the step is: the heap its compiles free is handed back
    # (create_train_state trims) before the tables are allocated, not left beside them.
    self.ceiling = MatmulCeiling(config.batch_size)
    self.state = train.create_train_state(train.init_key(config.seed), setup)
    self.sources = {}
    if 'step' in self.kinds:
      self.sources['step'] = _cycle([jax.device_put(b) for b in
                                     train.step_batches(iter(host_batches), setup, False)])
    if 'step+input' in self.kinds:
      # In the row cache's compact layout, as the trainer reads its batches.
      from dlrm_jax import row_cache  # pylint: disable=g-import-not-at-top
      compact = [row_cache.compact_from_padded(b, setup.spec) for b in host_batches]
      self.sources['step+input'] = train.step_batches(_cycle(compact), setup, True)
    if 'end-to-end' in self.kinds:
      from dlrm_jax import data_sources  # pylint: disable=g-import-not-at-top
      config.data_location = variant['data_dir']
      data = data_sources.resolve(config, setup.spec)  # builds the row cache, before timing
      reader = data_sources.train_batches(config, setup.spec, data, num_steps=2**40,
                                          compact=True)
      self.sources['end-to-end'] = train.step_batches(reader, setup, True)
    if 'end-to-end csv' in self.kinds:
      from dlrm_jax import input_pipeline  # pylint: disable=g-import-not-at-top
      reader = input_pipeline.batches(
          [os.path.join(variant['data_dir'], 'train.csv')], setup.spec, config.batch_size,
          shuffle_buffer=config.shuffle_buffer, seed=config.seed, num_epochs=None,
          chunk_rows=variant['chunk_rows'])
      self.sources['end-to-end csv'] = train.step_batches(reader, setup, True)
      # A measurement window holds at least one reader chunk (it parses chunk_rows at a time).
      self.min_steps = {'end-to-end csv': math.ceil(variant['chunk_rows'] / config.batch_size)}
    self.num_host_batches = len(host_batches)
    self.last_loss = float('nan')

  def warm_up(self) -> None:
    """Compiles every batch shape the sources produce (dedup capacities vary a little)."""
    for kind in self.kinds:
      steps = self.num_host_batches + 1
      if kind in getattr(self, 'min_steps', {}):
        steps = max(steps, 2 * self.min_steps[kind])
      self._run(kind, steps)

  def _run(self, kind: str, n: int) -> float:
    """Runs n steps; returns when the work they caused ended (perf_counter)."""
    loss = None
    source = self.sources[kind]
    for _ in range(n):
      self.state, loss = self.step_fn(self.state, next(source))
    self._jax.block_until_ready(self.state)
    end = time.perf_counter()
    if loss is not None:
      self.last_loss = float(loss)
    if kind != 'step':
      end = _wait_until_idle()
    return end

  def time_steps(self, kind: str, n: int) -> float:
    start = time.perf_counter()
    return self._run(kind, n) - start

  def extra_measurements(self) -> Dict[str, float]:
    return self.ceiling.measure()


def _wait_until_idle(quiet_s: float = 0.01, timeout_s: float = 120.0) -> float:
  """Waits until this process uses (almost) no CPU: the prefetch thread waits on a full queue.

  A measurement through the input thread thus starts and ends with the queue full, so a window of
  n steps contains exactly n batches prepared, and the input work it caused is inside the window
  (the step's own threads are idle once block_until_ready returned). Returns when the first quiet
  interval began, so the window does not also hold the wait itself (at most 10% of quiet_s of
  work falls outside it).
  """
  deadline = time.perf_counter() + timeout_s
  while True:
    began, cpu = time.perf_counter(), time.process_time()
    time.sleep(quiet_s)
    if time.process_time() - cpu < 0.1 * quiet_s or time.perf_counter() > deadline:
      return began


# ------------------------------------------------------------------------------------------------
# Parent side: start workers, alternate them, collect medians.

def calibrated_step_time(runner, kind: str, min_time: float) -> float:
  """Seconds a step of `kind` takes, from a sample of at least a quarter of `min_time`.

  The sample doubles from 2 steps until it is that long: two steps right after the warm-up have
  run 2x slower than the steady rate, and the measuring windows came out that much short.
  """
  count, seconds = 2, runner.time_steps(kind, 2)
  while seconds < min_time / 4 and count < 4096:
    count *= 2
    seconds = runner.time_steps(kind, count)
  return seconds / count


class WorkerError(RuntimeError):
  pass


class Worker:
  """A running worker process for one variant."""

  def __init__(self, variant: Variant, log_dir: str):
    self.variant = variant
    env = dict(os.environ)
    if variant.framework == 'torchrec':
      command = [sys.executable, os.path.join(_ROOT, 'experiments', 'torchrec_dlrm.py')]
      if variant.omp_wait_policy:
        env['OMP_WAIT_POLICY'] = variant.omp_wait_policy
      else:  # OpenMP's default, whatever this shell exports
        env.pop('OMP_WAIT_POLICY', None)
    else:
      command = [sys.executable, os.path.abspath(__file__), '--worker']
    env.update(dict(variant.env))
    safe = ''.join(c if c.isalnum() else '_' for c in variant.label)
    self.log_path = os.path.join(log_dir, f'{safe}.log')
    self._log = open(self.log_path, 'w')
    self.process = subprocess.Popen(command, cwd=_ROOT, stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=self._log, text=True,
                                    env=env)
    self._send(dataclasses.asdict(variant))

  def _send(self, message: Dict[str, Any]) -> None:
    try:
      self.process.stdin.write(json.dumps(message) + '\n')
      self.process.stdin.flush()
    except BrokenPipeError as e:
      raise WorkerError(self._failure('exited')) from e

  def _failure(self, what: str) -> str:
    with open(self.log_path) as f:
      tail = f.read()[-3000:]
    return f'{self.variant.label}: worker {what}; log tail:\n{tail}'

  def receive(self) -> Dict[str, Any]:
    line = self.process.stdout.readline()
    if not line:
      self.process.wait()
      raise WorkerError(self._failure(f'exited with code {self.process.returncode}'))
    message = json.loads(line)
    if 'error' in message:
      raise WorkerError(f'{self.variant.label}: {message["error"]}')
    return message

  def request(self, **message) -> Dict[str, Any]:
    self._send(message)
    return self.receive()

  def close(self) -> None:
    if self.process.poll() is None:
      self.process.kill()
      self.process.wait()
    self._log.close()


def _median(values: Sequence[Optional[float]]) -> Optional[float]:
  values = [v for v in values if v is not None and math.isfinite(v)]
  return statistics.median(values) if values else None


def run_group(group: Group, pairs: int, min_time: float, skip: Dict[str, str], log_dir: str,
              log: Callable[[str], None]) -> Dict[str, Any]:
  """Builds every variant's worker, then measures them A B C A B C ... `pairs` times."""
  info = {v.label: {} for v in group.variants}
  workers: Dict[str, Worker] = {}
  rounds: List[Dict[str, Dict[str, Any]]] = []
  load = []

  def drop(label, error):
    info[label]['error'] = str(error)
    log(f'  {label}: FAILED ({str(error).strip().splitlines()[-1][:200]})')
    workers.pop(label).close()

  try:
    for v in group.variants:
      needs_data = any(k.startswith('end-to-end') for k in v.kinds)
      reason = skip.get(v.framework) or (needs_data and skip.get('end-to-end'))
      if reason and not (v.framework == 'jax' and len(v.kinds) > 1):
        info[v.label]['skipped'] = reason
      else:
        if reason:  # keep the variant, drop the kind that cannot run
          v = dataclasses.replace(v, kinds=tuple(k for k in v.kinds
                                                 if not k.startswith('end-to-end')))
          info[v.label]['skipped_end_to_end'] = reason
        workers[v.label] = Worker(v, log_dir)
    for label in list(workers):  # they all build at once; collect each
      try:
        info[label]['build_s'] = workers[label].receive()['build_s']
      except WorkerError as e:
        drop(label, e)
    for label in list(workers):
      try:
        info[label]['steps_per_measurement'] = workers[label].request(
            cmd='calibrate', min_time=min_time)['steps']
      except WorkerError as e:
        drop(label, e)
    for r in range(pairs):
      measured = {}
      for label in list(workers):
        try:
          measured[label] = workers[label].request(cmd='measure')
        except WorkerError as e:
          drop(label, e)
      rounds.append(measured)
      load.append(os.getloadavg()[0])
      log(f'  round {r + 1}/{pairs}: ' + ', '.join(
          f'{label} {kind} {rate:,.0f}/s' for label, m in measured.items()
          for kind, rate in m['rates'].items()))
    for label in list(workers):
      try:
        info[label].update(workers[label].request(cmd='stop'))
      except WorkerError as e:
        drop(label, e)
  finally:
    for worker in workers.values():
      worker.close()
  return summarize_group(group, info, rounds, load)


def summarize_group(group: Group, info: Dict[str, Dict[str, Any]],
                    rounds: List[Dict[str, Dict[str, Any]]], load: List[float]) -> Dict[str, Any]:
  """One row per (variant, kind): medians over rounds, ratios within rounds."""
  def rate(r, label, kind):
    return r.get(label, {}).get('rates', {}).get(kind)

  # The first variant's first kind, or the first that ran when it did not (TorchRec absent).
  ran = [(v.label, kind) for v in group.variants for kind in v.kinds
         if any(rate(r, v.label, kind) for r in rounds)]
  reference = ran[0] if ran else (group.variants[0].label, group.variants[0].kinds[0])
  family = reference_family(group, reference[0])

  # Per round, the reference configuration under its fastest OpenMP wait policy.
  reference_rates = [max([rate(r, label, reference[1]) or 0.0 for label in family]) or None
                     for r in rounds]

  rows = []
  for v in group.variants:
    spec = make_spec(dataclasses.asdict(v))
    flops = train_flops_per_sample(spec, v.bottom_mlp, v.top_mlp, v.interaction,
                                   v.dcn_num_layers, v.dcn_low_rank_dim)
    base = {'variant': v.label, 'framework': v.framework, 'describe': describe(v),
            'config': dataclasses.asdict(v), 'tables': table_summary(spec),
            'table_state_mb': table_state_bytes(spec, v) / 2**20,
            'flops_per_sample': flops, **info[v.label]}
    for kind in v.kinds:
      row = dict(base, label=f'{v.label} {kind}', kind=kind)
      rates = [rate(r, v.label, kind) for r in rounds if rate(r, v.label, kind)]
      if not rates:
        rows.append(row)
        continue
      ratios = [rate(r, v.label, kind) / ref for r, ref in zip(rounds, reference_rates)
                if rate(r, v.label, kind) and ref]
      median_rate = _median(rates)
      row.update({
          'samples_per_s': median_rate,
          'samples_per_s_rounds': rates,
          'step_ms': 1e3 * v.batch_size / median_rate,
          'ratio_vs_reference': _median(ratios),
          'ratio_rounds': ratios,
          'achieved_flops_per_s': flops * median_rate,
          'final_loss': rounds[-1].get(v.label, {}).get('loss'),
      })
      if kind != 'step':
        within = [rate(r, v.label, kind) / rate(r, v.label, 'step') for r in rounds
                  if rate(r, v.label, kind) and rate(r, v.label, 'step')]
        row['ratio_vs_own_step'] = _median(within)
      ceiling_key = f"ceiling_{'bf16' if v.bf16 else 'fp32'}_flops"
      measured = [r[v.label] for r in rounds if v.label in r and ceiling_key in r[v.label]]
      if measured:
        # Per round: the step's FLOP/s over the ceiling measured right after it.
        row['ceiling_flops_per_s'] = _median([m[ceiling_key] for m in measured])
        row['ceiling_fraction'] = _median([flops * m['rates'][kind] / m[ceiling_key]
                                           for m in measured if kind in m['rates']])
        row['ceiling_rounds'] = {k: [m[k] for m in measured]
                                 for k in ('ceiling_fp32_flops', 'ceiling_bf16_flops')
                                 if all(k in m for m in measured)}
      rows.append(row)
  name = ' '.join(reference)
  if len(family) > 1:
    name = f"the fastest in each round of {' / '.join(family)} {reference[1]}"
  return {'name': group.name, 'what': group.what, 'reference': name,
          'reference_labels': [f'{label} {reference[1]}' for label in family],
          'load_average_1min_rounds': load, 'rows': rows}


def reference_family(group: Group, label: str) -> List[str]:
  """The variant `label` and its twins that differ from it only in OMP_WAIT_POLICY."""
  def key(v):
    return dataclasses.replace(v, label='', omp_wait_policy='')
  first = next(v for v in group.variants if v.label == label)
  return [v.label for v in group.variants if key(v) == key(first)]


def per_wait_policy(group: Group, policies: Sequence[str]) -> Group:
  """Each TorchRec variant once per OpenMP wait policy, side by side; one policy keeps labels."""
  variants = []
  for v in group.variants:
    if v.framework != 'torchrec':
      variants.append(v)
    elif len(policies) == 1:
      variants.append(dataclasses.replace(v, omp_wait_policy=_policy_env(policies[0])))
    else:
      variants += [dataclasses.replace(v, label=f'{v.label} {p.lower()}',
                                       omp_wait_policy=_policy_env(p)) for p in policies]
  return dataclasses.replace(group, variants=tuple(variants))


def _policy_env(policy: str) -> str:
  """A --torch_omp_wait_policies value as OMP_WAIT_POLICY's value ('' = unset)."""
  if policy.upper() == 'ACTIVE':
    # An ACTIVE worker's threads spin for as long as it waits for its next turn: a core taken
    # from every other worker's measurement.
    raise app.UsageError('--torch_omp_wait_policies: ACTIVE keeps its threads spinning while the '
                         'other workers are timed; the default policy spins, then sleeps')
  if policy.upper() not in ('PASSIVE', 'DEFAULT'):
    raise app.UsageError(f'--torch_omp_wait_policies: {policy!r} is neither PASSIVE nor default')
  return '' if policy.upper() == 'DEFAULT' else policy.upper()


# ------------------------------------------------------------------------------------------------
# The groups.

def _sizes(tiny: bool) -> Dict[str, Any]:
  if tiny:
    return dict(rows=1000, embedding_dim=4, bottom_mlp=(16, 4), top_mlp=(16,), max_list_len=8,
                batches=(64, 256), row_scaling=(1000, 10000, 100000), dcn_low_rank_dim=8,
                criteo_rows=tuple(max(2, r // 5000) for r in DEEPREC_CRITEO_ROWS))
  return dict(rows=100000, embedding_dim=16, bottom_mlp=(512, 256, 64, 16), top_mlp=(512, 256),
              max_list_len=50, batches=(512, 4096), row_scaling=(100000, 1000000, 10000000),
              # A quarter of ELM's 400-wide concatenation: TorchRec's advice for a rank that
              # keeps a full-rank cross layer's accuracy.
              dcn_low_rank_dim=100,
              criteo_rows=DEEPREC_CRITEO_ROWS)


def build_groups(quick: bool, tiny: bool) -> List[Group]:
  """Every group of the mode, in run order."""
  s = _sizes(tiny)
  common = dict(embedding_dim=s['embedding_dim'], bottom_mlp=s['bottom_mlp'],
                top_mlp=s['top_mlp'], max_list_len=s['max_list_len'])
  ours_kinds = ('step', 'step+input')

  def elm(label, framework, batch, interaction, **kw):
    # The end-to-end csv reader parses max(4096, 2 batches) lines per chunk, not the trainer's
    # 8192: a measurement window must hold whole chunks, and 8192 lines are 16 steps of 512.
    return Variant(label=label, framework=framework, spec='elm', rows=kw.pop('rows', s['rows']),
                   batch_size=batch, interaction=interaction, chunk_rows=max(4096, 2 * batch),
                   **common, **kw)

  def criteo(label, framework, batch, **kw):
    return Variant(label=label, framework=framework, spec='criteo', rows=s['criteo_rows'],
                   batch_size=batch, interaction='dot', **common, **kw)

  groups = []
  batches = s['batches'][:1] if quick else s['batches']
  interactions = ('dot',) if quick else ('dot', 'cat')
  for batch in batches:
    for op in interactions:
      groups.append(Group(
          f'elm_{op}_b{batch}',
          f'ELM {op} batch {batch}, SGD on both sides (ours gradientdescent; TorchRec fused '
          'EXACT_SGD + torch SGD)',
          (elm('torchrec sgd fp32', 'torchrec', batch, op),
           elm('ours fp32', 'jax', batch, op,
               kinds=ours_kinds + ('end-to-end', 'end-to-end csv')),
           elm('ours bf16', 'jax', batch, op, bf16=True))))
  if not quick:
    batch = s['batches'][0]
    dcn = dict(dcn_num_layers=3, dcn_low_rank_dim=s['dcn_low_rank_dim'])
    groups.append(Group(
        f'elm_dcn_b{batch}',
        f"ELM dcn batch {batch}: MLPerf DLRMv2's interaction, 3 low-rank cross layers of rank "
        f"{s['dcn_low_rank_dim']} over cat's concatenation (TorchRec DLRM_DCN), SGD",
        (elm('torchrec sgd fp32', 'torchrec', batch, 'dcn', **dcn),
         elm('ours fp32', 'jax', batch, 'dcn', kinds=ours_kinds, **dcn))))
    groups.append(Group(
        f'elm_dot_b{batch}_adagrad',
        f'ELM dot batch {batch}, Adagrad, elementwise (an accumulator per weight, touched '
        'rows only) on both sides: ours adagrad, TorchRec EXACT_ADAGRAD',
        (elm('torchrec adagrad', 'torchrec', batch, 'dot', optimizer='adagrad',
             table_optimizer='adagrad'),
         elm('ours adagrad', 'jax', batch, 'dot', optimizer='adagrad', kinds=ours_kinds))))
    groups.append(Group(
        f'elm_dot_b{batch}_rowwise_adagrad',
        f'ELM dot batch {batch}, row-wise Adagrad (one accumulator per table row) on both '
        "sides: ours rowwise_adagrad, TorchRec EXACT_ROWWISE_ADAGRAD (its usual table "
        'optimizer); the MLPs Adagrad with accumulator 0 and eps 1e-8',
        (elm('torchrec rowwise_adagrad', 'torchrec', batch, 'dot', optimizer='rowwise_adagrad',
             table_optimizer='rowwise_adagrad'),
         elm('ours rowwise_adagrad', 'jax', batch, 'dot', optimizer='rowwise_adagrad',
             kinds=ours_kinds))))
    for batch in s['batches']:
      groups.append(Group(
          f'criteo_dot_b{batch}',
          f"Criteo dot batch {batch}, DeepRec's 26 hash-bucket sizes (up to 5M rows, "
          f"{sum(s['criteo_rows']):,} rows in all), SGD",
          (criteo('torchrec sgd fp32', 'torchrec', batch),
           criteo('ours fp32', 'jax', batch, kinds=ours_kinds))))
  scaling = s['row_scaling'][:2] if quick else s['row_scaling']
  batch = s['batches'][0]
  groups.append(Group(
      f'rows_elm_dot_b{batch}',
      f'ELM dot batch {batch}, ours fp32 gradientdescent with every hashed table at '
      f'{", ".join(f"{r:,}" for r in scaling)} rows: the step time should not follow the table',
      tuple(elm(f'ours {r:,} rows', 'jax', batch, 'dot', rows=r) for r in scaling)))
  return groups


def with_ours_fp32_twin(group: Group, label: str, kinds: Tuple[str, ...],
                        env: Tuple[Tuple[str, str], ...] = (), **changes) -> Group:
  """Adds 'ours fp32' again under `label`, timing `kinds` in the environment `env` and with the
  Variant fields `changes`: an A/B of the process's surroundings (allocator, its settings,
  dispatch). Groups without 'ours fp32' are unchanged."""
  ours = [v for v in group.variants if v.label == 'ours fp32']
  if not ours:
    return group
  variant = dataclasses.replace(ours[0], label=label, kinds=kinds, env=env, **changes)
  return dataclasses.replace(group, variants=group.variants + (variant,))


def with_jemalloc(group: Group, library: str) -> Group:
  """Adds our fp32 step under jemalloc that keeps freed memory (see experiments/README.md)."""
  return with_ours_fp32_twin(
      group, 'ours fp32 jemalloc', ('step',),
      (('LD_PRELOAD', library),
       ('MALLOC_CONF', 'retain:true,dirty_decay_ms:-1,muzzy_decay_ms:-1')))


def with_malloc_arena_max(group: Group, arenas: int) -> Group:
  """Adds our fp32 step and step+input with glibc's malloc arenas capped at `arenas`."""
  return with_ours_fp32_twin(group, f'ours fp32 arenas {arenas}', ('step', 'step+input'),
                             (('MALLOC_ARENA_MAX', str(arenas)),))


def with_async_dispatch(group: Group) -> Group:
  """Adds our fp32 step and step+input with each step run on XLA:CPU's pool threads."""
  return with_ours_fp32_twin(group, 'ours fp32 async dispatch', ('step', 'step+input'),
                             async_dispatch=True)


def select_groups(groups: List[Group], wanted: Sequence[str]) -> List[Group]:
  if not wanted:
    return groups
  names = {g.name for g in groups}

  def matches(name: str, w: str) -> bool:
    # A full name is not also a prefix: elm_dot_b512 must not pull in elm_dot_b512_adagrad.
    return name == w if w in names else name.startswith(w)

  unknown = [w for w in wanted if not any(matches(g.name, w) for g in groups)]
  if unknown:
    raise app.UsageError(f'--configs: no group matches {unknown}; groups: '
                         f'{", ".join(g.name for g in groups)}')
  return [g for g in groups if any(matches(g.name, w) for w in wanted)]


def prepare_planted_data(data_dir: str, tiny: bool) -> Tuple[str, Optional[str]]:
  """The planted ELM data for end-to-end runs: (directory, None) or ('', why not)."""
  try:
    from dlrm_jax import datagen  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    return '', f'dlrm_jax.datagen unavailable: {e}'
  train_rows = 4000 if tiny else 200000
  data_dir = data_dir or os.path.join(tempfile.gettempdir(), 'dlrm_jax_benchmark',
                                      f'planted_elm_{train_rows}')
  try:
    datagen.ensure_planted_data(data_dir, 'elm', train_rows=train_rows, eval_rows=1000, seed=1)
  except Exception as e:  # pylint: disable=broad-except
    return '', f'planted data generation failed: {e}'
  return data_dir, None


# ------------------------------------------------------------------------------------------------
# Report.

def summarize(groups: List[Dict[str, Any]]) -> Dict[str, Any]:
  """The headline numbers: ratios vs TorchRec, ceiling fractions, row scaling, memory."""
  out = {'ours_vs_torchrec': {}, 'ceiling_fraction': {}, 'step+input_vs_step': {},
         'end-to-end_vs_step': {}, 'row_scaling_step_time_ratio': {}, 'peak_rss_mb': {},
         'samples_per_s': {}}
  ceilings = {'fp32': [], 'bf16': []}
  for g in groups:
    torchrec_reference = g['reference_labels'][0].startswith('torchrec')
    for row in g['rows']:
      key = f"{g['name']}/{row['label']}"
      if row.get('samples_per_s') is None:
        continue
      out['samples_per_s'][key] = row['samples_per_s']
      if row.get('peak_rss_mb') is not None:
        out['peak_rss_mb'][f"{g['name']}/{row['variant']}"] = row['peak_rss_mb']
      if row.get('ceiling_fraction') is not None:
        out['ceiling_fraction'][key] = row['ceiling_fraction']
      if row['kind'] == 'step':
        for dtype in ceilings:
          ceilings[dtype] += row.get('ceiling_rounds', {}).get(f'ceiling_{dtype}_flops', [])
      if row.get('ratio_vs_own_step') is not None:
        out.setdefault(f"{row['kind']}_vs_step", {})[key] = row['ratio_vs_own_step']
      ratio = row.get('ratio_vs_reference')
      if ratio is None or row['label'] in g['reference_labels']:
        continue
      if torchrec_reference and row['framework'] != 'torchrec':
        out['ours_vs_torchrec'][key] = ratio
      if g['name'].startswith('rows_'):
        out['row_scaling_step_time_ratio'][key] = 1.0 / ratio
  out['matmul_ceiling_flops_per_s'] = {k: _median(v) for k, v in ceilings.items() if v}
  out['memory'] = {f"{g['name']}/{variant}": m for g in groups
                   for variant, m in memory_ratios(g).items()}
  return out


def memory_ratios(group: Dict[str, Any]) -> Dict[str, Dict[str, float]]:
  """Per variant that reported its runtime's memory: peak RSS over the table state, in all and
  above the runtime (the process before the model's first array)."""
  out = {}
  for row in group['rows']:
    if row.get('peak_rss_mb') and row.get('runtime_rss_mb') and row.get('table_state_mb'):
      state = row['table_state_mb']
      out[row['variant']] = {
          'peak_rss_mb': row['peak_rss_mb'], 'runtime_rss_mb': row['runtime_rss_mb'],
          'state_mb': state, 'peak_over_state': row['peak_rss_mb'] / state,
          'above_runtime_over_state': (row['peak_rss_mb'] - row['runtime_rss_mb']) / state}
  return out


def format_table(groups: List[Dict[str, Any]], summary: Dict[str, Any]) -> str:
  """The printed report: one block per group, then what each row means."""
  lines = []
  for g in groups:
    width = max([32] + [len(row['label']) for row in g['rows']])  # the labels' column
    header = (f'{"":{width}s} {"samples/s":>10s} {"x ref":>6s} {"(min-max)":>11s} '
              f'{"step ms":>8s} {"GFLOP/s":>8s} {"ceiling":>8s} {"peak MB":>8s}')
    lines += ['', f"== {g['name']}: {g['what']}. Reference: {g['reference']}", header]
    for row in g['rows']:
      if row.get('samples_per_s') is None:
        why = (row.get('skipped') or row.get('skipped_end_to_end') or row.get('error')
               or 'no result').strip().splitlines()[-1]
        lines.append(f"{row['label']:{width}s} -- {why[:120]}")
        continue
      ratios = row['ratio_rounds']
      spread = f'({min(ratios):.2f}-{max(ratios):.2f})' if ratios else ''
      ratio = f"{row['ratio_vs_reference']:.2f}" if row['ratio_vs_reference'] else '-'
      fraction = (f"{100 * row['ceiling_fraction']:.1f}%"
                  if row.get('ceiling_fraction') is not None else '-')
      rss = f"{row['peak_rss_mb']:.0f}" if row.get('peak_rss_mb') else '-'
      lines.append(f"{row['label']:{width}s} {row['samples_per_s']:10,.0f} {ratio:>6s} "
                   f"{spread:>11s} {row['step_ms']:8.2f} {row['achieved_flops_per_s'] / 1e9:8.1f} "
                   f'{fraction:>8s} {rss:>8s}')
    for variant, m in memory_ratios(g).items():
      if m['state_mb'] < 512:  # small tables: the ratio says more about the runtime than them
        continue
      lines.append(f"  memory of {variant}: peak {m['peak_rss_mb']:.0f} MiB = "
                   f"{m['peak_over_state']:.2f}x its tables and slots ({m['state_mb']:.0f} MiB); "
                   f"{m['above_runtime_over_state']:.2f}x above the {m['runtime_rss_mb']:.0f} MiB "
                   'the runtime held before the first array')
  lines += ['', 'What the rows are:']
  lines += [f'  {kind}: {text}' for kind, text in KINDS.items()]
  seen = set()
  for g in groups:
    for row in g['rows']:
      if row['describe'] not in seen:
        seen.add(row['describe'])
        lines.append(f"  {row['variant']}: {row['describe']}")
  ceiling = summary['matmul_ceiling_flops_per_s']
  if ceiling:
    lines.append('  matmul ceiling, median over rounds of the best jnp.dot [B,512]x[512,512] '
                 'measured right after each step: ' +
                 ', '.join(f'{k} {v / 1e9:.1f} GFLOP/s' for k, v in ceiling.items()))
  lines.append("  'x ref': median over rounds of samples/s over the reference's in the same "
               "round. 'GFLOP/s': matmul FLOPs of training (3x forward, from the layer sizes) x "
               "samples/s. 'ceiling': that over the ceiling of the step's compute dtype, measured "
               "in the same process in the same round. 'peak MB': the worker process's VmHWM.")
  return '\n'.join(lines)


def machine_info() -> Dict[str, Any]:
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  info = {'python': platform.python_version(), 'platform': platform.platform(),
          'cpu_count': os.cpu_count(), 'load_average': os.getloadavg()}
  for package in ('jax', 'jaxlib', 'flax', 'torch', 'torchrec', 'fbgemm-gpu-cpu'):
    try:
      info[package] = metadata.version(package)
    except metadata.PackageNotFoundError:
      pass
  try:
    with open('/proc/cpuinfo') as f:
      names = [l.split(':', 1)[1].strip() for l in f if l.startswith('model name')]
    info['cpu'] = names[0] if names else ''
  except OSError:
    pass
  return info


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if _FLAGS.worker:
    serve(JaxRunner)
    return
  quick = _FLAGS.quick
  # Many short rounds rather than a few long ones: the load here comes in bursts of seconds, and
  # the closer in time A and B run, the more alike their conditions.
  pairs = _FLAGS.pairs or (3 if quick else 7)
  min_time = _FLAGS.min_time if _FLAGS.min_time is not None else (0.4 if quick else 0.5)
  groups = select_groups(build_groups(quick, _FLAGS.tiny), _FLAGS.configs)
  if _FLAGS.jemalloc:
    # The loader skips a preload it cannot find with a note in the worker's log only: the row
    # labelled jemalloc would time glibc's allocator. Workers run from the repository root: a
    # relative path is made absolute here.
    library = os.path.abspath(_FLAGS.jemalloc)
    if not os.path.isfile(library):
      raise app.UsageError(f'--jemalloc: no file {library} (give the library\'s path; Debian: '
                           'apt-get install libjemalloc2)')
    groups = [with_jemalloc(g, library) for g in groups]
  if _FLAGS.malloc_arena_max > 0:
    groups = [with_malloc_arena_max(g, _FLAGS.malloc_arena_max) for g in groups]
  if _FLAGS.async_dispatch:
    groups = [with_async_dispatch(g) for g in groups]
  if not _FLAGS.torch_omp_wait_policies:
    raise app.UsageError('--torch_omp_wait_policies: give at least one of PASSIVE, default')
  groups = [per_wait_policy(g, _FLAGS.torch_omp_wait_policies) for g in groups]
  if _FLAGS.list:
    for g in groups:
      print(f'{g.name}: {g.what}')
      for v in g.variants:
        print(f"  {v.label} [{', '.join(v.kinds)}]: {describe(v)}")
    return

  skip = {}
  if not _FLAGS.torchrec:
    skip['torchrec'] = 'TorchRec not requested (--notorchrec)'
  elif importlib.util.find_spec('torchrec') is None:
    skip['torchrec'] = 'TorchRec is not installed (experiments/README.md says how)'
  data_dir = ''
  if any(k.startswith('end-to-end') for g in groups for v in g.variants for k in v.kinds):
    data_dir, why = prepare_planted_data(_FLAGS.data_dir, _FLAGS.tiny)
    if why:
      skip['end-to-end'] = why
  torch_threads = _FLAGS.torch_threads or len(os.sched_getaffinity(0))
  cache = _FLAGS.jax_cache_dir
  if cache is None:
    cache = os.path.join(tempfile.gettempdir(), 'dlrm_jax_benchmark', 'jax_cache')
  groups = [dataclasses.replace(g, variants=tuple(
      dataclasses.replace(v, data_dir=data_dir, torch_threads=torch_threads,
                          jax_cache_dir=cache)
      for v in g.variants)) for g in groups]

  def log(message):
    print(message, flush=True)

  started = time.perf_counter()
  results = []
  with tempfile.TemporaryDirectory(prefix='dlrm_benchmark_logs_') as log_dir:
    for g in groups:
      log(f'[{time.perf_counter() - started:4.0f}s] {g.name}')
      results.append(run_group(g, pairs, min_time, skip, log_dir, log))
  summary = summarize(results)
  print(format_table(results, summary))
  report = {
      'machine': machine_info(),
      'settings': {'quick': quick, 'tiny': _FLAGS.tiny, 'pairs': pairs, 'min_time_s': min_time,
                   'torch_threads': torch_threads,
                   'configs': list(_FLAGS.configs), 'seconds': time.perf_counter() - started,
                   'skipped': skip, 'kinds': KINDS},
      'summary': summary,
      'groups': results,
  }
  os.makedirs(os.path.dirname(os.path.abspath(_FLAGS.json_out)), exist_ok=True)
  with open(_FLAGS.json_out, 'w') as f:
    json.dump(report, f, indent=2)
  print(f'\nwrote {_FLAGS.json_out} ({time.perf_counter() - started:.0f}s)')


def define_flags():
  """The command's flags, defined only when it runs: modules that import this one (the
  TorchRec worker, the memory and step benchmarks, the parity script) must not get them."""
  flags.DEFINE_bool('quick', False, 'ELM dot batch 512 (ours fp32/bf16/end-to-end vs TorchRec) and '
                    '100k vs 1M rows: 1-2 minutes.')
  flags.DEFINE_list('configs', [], 'Groups to run (see --list): a full name selects that group '
                    'alone, anything else the groups it begins (criteo: both Criteo groups); '
                    'empty = all groups of the mode.')
  flags.DEFINE_integer('pairs', None, 'Alternation rounds per group (default 7; 3 with --quick).')
  flags.DEFINE_float('min_time', None, 'Seconds of work per measurement (default 0.5; 0.4 with '
                     '--quick).')
  flags.DEFINE_string('json_out', 'benchmark.json', 'Where to write the results.')
  flags.DEFINE_bool('torchrec', True, 'Measure TorchRec too (skipped when it is not installed).')
  flags.DEFINE_bool('tiny', False, 'Tiny tables and MLPs: checks the machinery in seconds (tests).')
  flags.DEFINE_integer('torch_threads', None, 'PyTorch intra-op threads of the TorchRec workers '
                       "(default: the CPUs this process may run on, as many as XLA:CPU's pool "
                       'takes for ours).')
  flags.DEFINE_list('torch_omp_wait_policies', ['PASSIVE', 'default'],
                    "OMP_WAIT_POLICY of the TorchRec workers, one worker per value ('default' = "
                    "unset: OpenMP's spin-then-sleep; PASSIVE as OpenMP defines it; not ACTIVE, "
                    'whose threads spin on while the other workers are timed). '
                    'With several, each TorchRec configuration runs once per policy in the same '
                    'alternation and ours is compared with the fastest of them in each round: on a '
                    'shared CPU a spinning thread waits for a peer that is not running and PASSIVE '
                    'wins; when both cores are there, spinning has run TorchRec 1.85x faster '
                    '(experiments/README.md).')
  flags.DEFINE_string('data_dir', '', 'Planted ELM data for the end-to-end runs; default: a '
                      'directory under the system temp dir, generated on first use.')
  flags.DEFINE_string('jax_cache_dir', None, "JAX's persistent compilation cache for the workers "
                      "(default: under the system temp dir; '' = off). Only build time changes.")
  flags.DEFINE_string('jemalloc', '', 'Path of libjemalloc.so.2: adds "ours fp32 jemalloc" '
                      '(LD_PRELOAD, freed memory kept instead of returned to the OS) to the ELM '
                      'and Criteo groups.')
  flags.DEFINE_integer('malloc_arena_max', 0,
                       'N > 0 adds "ours fp32 arenas N" (MALLOC_ARENA_MAX=N: glibc\'s per-thread '
                       'heaps capped at N, less freed memory kept per thread) to the ELM and '
                       'Criteo groups.')
  flags.DEFINE_bool('async_dispatch', False,
                    'Adds "ours fp32 async dispatch" (cpu_async_dispatch=True, JAX\'s default: '
                    'each step runs on a pool thread) to the ELM and Criteo groups.')
  flags.DEFINE_bool('list', False, 'Print the groups of the mode and exit.')
  flags.DEFINE_bool('worker', False, 'Internal: serve one JAX configuration on stdin/stdout.')


if __name__ == '__main__':
  define_flags()
  app.run(main)
